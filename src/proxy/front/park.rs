//! Parking: a request that has to queue waits before Pingora's session for it exists.
//!
//! While `request_filter` waits for a token, Pingora keeps the request's whole state alive:
//! its boxed per-request future (about 14 KB), the HTTP session, the header buffer. That is
//! most of the 40-odd KiB a waiting request used to cost (BENCHMARKS.md, scenario 6). So when
//! a bucket is congested (someone waits already, or no token is in hand), the connection loop
//! (`connection`) reads the next request's head and body itself, classifies it as
//! `request_filter` does, and waits for its verdict holding only those bytes. Pingora then
//! reads the bytes again from the connection (`HeaderDeadline::replay`) as if they had just
//! arrived, and gets the verdict as the connection's context, which `request_filter` takes
//! instead of queueing the request again.
//!
//! Parking changes where a request waits, not what happens to it: the answer, the metrics and
//! the access-log line are `request_filter`'s, as for any request. Whatever is not plain is
//! handed over unparked and waits the usual way: a header that does not parse here, a request
//! that is refused, a body that is streamed (chunked, too large, over the budget, or behind
//! `Expect: 100-continue`), a route that keeps waiting streams alive, and a passthrough route.

use std::any::Any;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;
use pingora_core::protocols::http::authority::validate_request_authority;
use tokio::io::AsyncReadExt;

use super::stream::FrontStream;
use crate::admission::{now, AdmissionGate, Verdict};
use crate::app::{App, RouteTable};
use crate::proxy::body::{BodyBudget, Reservation};
use crate::proxy::intake::{Arrival, BodyPlan, Intake, Mode};
use crate::proxy::wait::{self, ClientWatch, Stir};

/// The longest request head read here; a longer one is left to Pingora.
const MAX_HEAD: usize = 64 * 1024;

/// The most header lines read here (Pingora's own limit).
const MAX_HEADERS: usize = 256;

/// A request taken in at the connection door, handed to `request_filter` with what was
/// decided about it there: its intake, and, when it parked, the verdict it waited for.
pub struct Parked {
    /// When its head was read: the start of its queue wait.
    pub started: Instant,
    /// The route table its intake was made by.
    table: Arc<RouteTable>,
    intake: Option<Intake>,
    wait: Wait,
    /// Its body's share of `adaptive.replay_body_budget` while it waited.
    held: Option<Reservation>,
    /// Counted as arrived and in flight from the moment it parked; `request_filter` takes
    /// the count over. `None` for a request that was not parked.
    arrival: Option<Arrival>,
}

/// How a request's wait at the connection door ended.
enum Wait {
    /// It has its verdict from `gate` (until `request_filter` takes it).
    Decided {
        gate: Arc<AdmissionGate>,
        verdict: Verdict,
    },
    /// Its client hung up.
    ClientLeft,
    /// It did not wait here: it is not one to park, or its body stalled. It queues the
    /// usual way.
    NotParked,
}

impl Parked {
    /// Its intake, when `table` is the route table it was made by; `None` after a reload (the
    /// request is taken in again by the new table), or once taken.
    pub fn intake_for(&mut self, table: &Arc<RouteTable>) -> Option<Intake> {
        Arc::ptr_eq(&self.table, table)
            .then(|| self.intake.take())
            .flatten()
    }

    /// The verdict for the request, now routed to `gate`. `None` when it has none, or when it
    /// is routed elsewhere now (a reload came in between): it queues again there, and what it
    /// was granted here is given back.
    pub fn verdict_from(&mut self, gate: &Arc<AdmissionGate>) -> Option<Verdict> {
        match std::mem::replace(&mut self.wait, Wait::NotParked) {
            Wait::Decided {
                gate: from,
                verdict,
            } if Arc::ptr_eq(&from, gate) => Some(verdict),
            other => {
                self.wait = other;
                None
            }
        }
    }

    fn intake(&self) -> &Intake {
        self.intake.as_ref().expect("made with its intake")
    }

    /// The body's share of the budget, for the request to hold its body with.
    pub fn take_body(&mut self) -> Option<Reservation> {
        self.held.take()
    }

    /// Its count as arrived and in flight, when it was counted here.
    pub fn take_arrival(&mut self) -> Option<Arrival> {
        self.arrival.take()
    }

    /// The client hung up while the request was parked.
    pub fn client_left(&self) -> bool {
        matches!(self.wait, Wait::ClientLeft)
    }
}

/// Hands `parked` to the session Pingora is about to serve, for `request_filter` to take
/// (`Parked::taken_from`).
///
/// Pingora carries a connection's context to its next request only erased, as the
/// `Box<dyn Any>` of `set_connection_user_context`, and offers no typed way: these two
/// functions are the one place where the verdict is erased and recovered.
pub fn hand_over(session: &mut ServerSession, parked: Box<Parked>) {
    session.set_connection_user_context(Some(parked));
}

impl Parked {
    /// The parked request `hand_over` gave the session, from the context Pingora passes
    /// on; `None` for any other context.
    pub fn taken_from(context: Box<dyn Any + Send + Sync>) -> Option<Box<Parked>> {
        context.downcast::<Parked>().ok()
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Granted, but the request never used it (Pingora refused the head, or the route
        // changed): the token and the model slot go back.
        if let Wait::Decided {
            gate,
            verdict: Verdict::Granted(grant),
        } = &self.wait
        {
            gate.refund(*grant);
        }
    }
}

/// `buf` holds the first bytes of the next request on `stream`, from `peer`. When a bucket is
/// congested, reads the rest of the request's head and takes it in (`Intake`); if it is one
/// to park, reads its body into `buf` too and waits for its verdict while watching the
/// client. Then `buf` holds the request and no more; what came after it (the start of a
/// pipelined request) is returned beside it, to be read once this one is answered.
pub async fn park(
    app: &App,
    bodies: &BodyBudget,
    stream: &mut FrontStream,
    buf: &mut BytesMut,
    peer: Option<IpAddr>,
) -> Option<(Box<Parked>, BytesMut)> {
    let congested = app
        .table()
        .all()
        .any(|r| r.gate.as_ref().is_some_and(|g| g.would_queue()));
    if !congested {
        return None;
    }
    let started = now();
    // Taken in from the head in one step, so that nothing of the parsed head is kept while
    // the request waits.
    let (table, taken, head_len) = {
        let (req, head_len) = read_head(stream, buf).await?;
        let table = app.table();
        let taken = take_in(&req, &table, peer, started)?;
        (table, taken, head_len)
    };
    // Boxed as it will be handed over: while it waits, the connection's future holds a
    // pointer to it, not its intake.
    let not_parked = |intake, arrival| {
        Box::new(Parked {
            started,
            table: table.clone(),
            intake: Some(intake),
            wait: Wait::NotParked,
            held: None,
            arrival,
        })
    };
    let (intake, gate, body_len) = match taken {
        Taken::Park(intake, gate, body_len) => (intake, gate, body_len),
        Taken::Pass(intake) => return Some((not_parked(intake, None), BytesMut::new())),
    };
    let settings = &table.settings;
    let held = match body_len {
        0 => None,
        len => match bodies.reserve(len, settings.replay_body_budget) {
            Some(held) => Some(held),
            None => return Some((not_parked(intake, None), BytesMut::new())),
        },
    };
    // From here on the request does not go back to `request_filter` uncounted.
    let arrival = Arrival::count(app, &intake.who.client, started);
    let mut parked = not_parked(intake, Some(arrival));
    if body_len > 0 {
        let deadline = parked.intake().who.deadline;
        let read = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline),
            read_to(stream, buf, head_len + body_len),
        );
        if !matches!(read.await, Ok(true)) {
            // The body stalled past the deadline, or the client left: the request goes on
            // unparked, its time counted from its arrival (its deadline has passed, or its
            // body will never come).
            return Some((parked, BytesMut::new()));
        }
    }
    // Reads may have brought more than the request: the start of the next one, copied out
    // (a split would keep the whole first read's room alive while the request waits).
    let end = head_len + body_len;
    let mut ahead = match buf.len() > end {
        true => BytesMut::from(&buf[end..]),
        false => BytesMut::new(),
    };
    buf.truncate(end);
    let models = &settings.models;
    let intake = parked.intake.as_mut().expect("made with its intake");
    intake.read_body(Some(&buf[head_len..end]), models);
    if buf.capacity() > buf.len() + 256 {
        // It waits holding its bytes, not the room the first read had.
        *buf = BytesMut::from(&buf[..]);
    }
    let mut ticket = gate.admit_with(parked.intake().ask());
    let mut watched = Watched {
        stream,
        ahead: &mut ahead,
    };
    let verdict = wait::verdict(&mut ticket, Some(&mut watched)).await;
    // Dropping the ticket now gives up the place of a client that left.
    drop(ticket);
    parked.held = held;
    parked.wait = match verdict {
        Some(verdict) => Wait::Decided { gate, verdict },
        None => Wait::ClientLeft,
    };
    Some((parked, ahead))
}

/// What the connection door makes of a request it has read the head of.
enum Taken {
    /// It parks: it waits here for a token from the gate, its body (of this length) read
    /// ahead.
    Park(Intake, Arc<AdmissionGate>, usize),
    /// It goes on to `request_filter` at once, with its intake.
    Pass(Intake),
}

/// What becomes of the request `req` from `peer`, by the routes of `table`; `None` for one
/// that is refused, which `request_filter` answers.
fn take_in(
    req: &RequestHeader,
    table: &RouteTable,
    peer: Option<IpAddr>,
    started: Instant,
) -> Option<Taken> {
    // What Pingora refuses with a 400 (an ambiguous authority), or the sidecar refuses, is
    // answered at once.
    if validate_request_authority(req).is_err() {
        return None;
    }
    let intake = Intake::new(req, peer, started, table).ok()?;
    let Mode::Gated(gate) = &intake.mode else {
        return Some(Taken::Pass(intake));
    };
    let body_len = match intake.body {
        BodyPlan::Empty => 0,
        BodyPlan::Hold(len) => len,
        BodyPlan::Stream(_) => return Some(Taken::Pass(intake)),
    };
    // A request whose own bucket can serve it now gets its token at once in
    // `request_filter`; a waiting stream is kept alive there, and a body behind
    // `100 Continue` is read there once admitted.
    if intake.route.settings.keepalive_while_queued || intake.continues || !gate.would_queue() {
        return Some(Taken::Pass(intake));
    }
    let gate = gate.clone();
    Some(Taken::Park(intake, gate, body_len))
}

/// A parked request's connection, watched while it waits. A byte that arrives instead of a
/// hang-up is the start of a pipelined request: it is kept in `ahead`, and watching stops.
struct Watched<'a> {
    stream: &'a mut FrontStream,
    ahead: &'a mut BytesMut,
}

impl ClientWatch for Watched<'_> {
    async fn stirs(&mut self) -> Stir {
        if !self.ahead.is_empty() {
            // Pipelined already: nothing to watch for.
            return std::future::pending().await;
        }
        let mut probe = [0u8; 1];
        match self.stream.read(&mut probe).await {
            Ok(n) if n > 0 => {
                self.ahead.extend_from_slice(&probe[..n]);
                Stir::Spoke
            }
            _ => Stir::Left,
        }
    }
}

/// Reads until `buf` holds a whole request head, as httparse (Pingora's parser) ends it: the
/// head and its length. `None` when the stream ends or fails first, the head does not parse
/// here, or it is longer than `MAX_HEAD` (Pingora reads on and answers it).
async fn read_head(stream: &mut FrontStream, buf: &mut BytesMut) -> Option<(RequestHeader, usize)> {
    loop {
        match parse_head(buf) {
            Ok(Some(head)) => return Some(head),
            Ok(None) => {}
            Err(()) => return None,
        }
        if buf.len() >= MAX_HEAD {
            return None;
        }
        buf.reserve(1024);
        match stream.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Reads until `buf` holds `len` bytes; false when the stream ends or fails first.
async fn read_to(stream: &mut FrontStream, buf: &mut BytesMut, len: usize) -> bool {
    while buf.len() < len {
        buf.reserve(len - buf.len());
        match stream.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
    true
}

/// The request head at the start of `buf`, as Pingora's parser (httparse) reads it, and its
/// length: `Ok(None)` while it is incomplete, `Err` for anything httparse does not take as it
/// is (Pingora then parses it, and answers it if it must). Not in `read_head` itself: the
/// parser's header array would be kept in every connection's future.
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(RequestHeader, usize)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return Err(());
    };
    let mut req = RequestHeader::build_no_case(method, path.as_bytes(), Some(parsed.headers.len()))
        .map_err(|_| ())?;
    for header in parsed.headers.iter() {
        let name = http::HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| ())?;
        let value = http::HeaderValue::from_bytes(header.value).map_err(|_| ())?;
        req.append_header(name, value).map_err(|_| ())?;
    }
    Ok(Some((req, len)))
}

/// The client's own idle timeout for its connection, `Keep-Alive: timeout=N`, when `buf`
/// starts with a whole request head that has one.
pub fn client_keepalive(buf: &[u8]) -> Option<Duration> {
    // Rare in requests: a look for the header's name first spares parsing the others.
    let named = memchr::memchr_iter(b':', buf).any(|colon| {
        colon >= 11
            && buf[colon - 10..colon].eq_ignore_ascii_case(b"keep-alive")
            && buf[colon - 11] == b'\n'
    });
    if !named {
        return None;
    }
    let (req, _) = parse_head(buf).ok()??;
    let value = req.headers.get("keep-alive")?.to_str().ok()?;
    value.split(',').find_map(|param| {
        let (name, secs) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        let secs: u64 = secs.trim().parse().ok()?;
        Some(Duration::from_secs(secs))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head of a complete one, or `None`.
    fn head(buf: &[u8]) -> Option<RequestHeader> {
        parse_head(buf).ok().flatten().map(|(req, _)| req)
    }

    /// Only its length.
    fn length(buf: &[u8]) -> Result<Option<usize>, ()> {
        parse_head(buf).map(|head| head.map(|(_, len)| len))
    }

    #[test]
    fn heads_parse_as_pingora_reads_them() {
        let req = head(
            b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nX-Priority: high\r\nContent-Length: 12\r\n\r\n",
        )
        .unwrap();
        assert_eq!(req.method, http::Method::POST);
        assert_eq!(req.uri.path(), "/v1/chat/completions");
        assert_eq!(req.raw_path(), b"/v1/chat/completions?x=1");
        assert_eq!(req.headers["x-priority"], "high");
        assert!(head(b"GET / HTTP/1.1\r\nHost: a\r\n").is_none());
        // Bare line feeds end a head for httparse, as for Pingora.
        assert_eq!(
            head(b"GET /v1/models HTTP/1.1\nHost: a\n\n").map(|r| r.uri.path().to_string()),
            Some("/v1/models".to_string())
        );
        assert!(head(b"GET / HTTP/1.1\r\nBad Header: a\r\n\r\n").is_none());
    }

    #[test]
    fn a_head_ends_where_httparse_ends_it() {
        assert_eq!(
            length(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"),
            Ok(Some(27))
        );
        assert_eq!(length(b"GET / HTTP/1.1\nHost: a\n\nbody"), Ok(Some(24)));
        assert_eq!(length(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(length(b"GET / HTTP/1.1\r\nBad Header: a\r\n\r\n"), Err(()));
    }

    #[test]
    fn a_clients_keep_alive_timeout_is_read_from_a_whole_head() {
        let secs = |head: &[u8]| client_keepalive(head).map(|d| d.as_secs());
        assert_eq!(
            secs(b"GET / HTTP/1.1\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"),
            Some(5)
        );
        assert_eq!(
            secs(b"GET / HTTP/1.1\r\nkeep-alive: max=3,TIMEOUT = 7\r\n\r\n"),
            Some(7)
        );
        for head in [
            &b"GET / HTTP/1.1\r\nKeep-Alive: timeout=5\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nKeep-Alive: timeout=-1\r\n\r\n",
            b"GET / HTTP/1.1\r\nKeep-Alive: timeout=soon\r\n\r\n",
        ] {
            assert_eq!(secs(head), None, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_context_that_is_not_a_parked_request_is_not_taken_for_one() {
        let other: Box<dyn Any + Send + Sync> = Box::new(7u32);
        assert!(Parked::taken_from(other).is_none());
    }
}
