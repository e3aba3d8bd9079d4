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
use crate::limiter::{model_index, Ask};
use crate::proxy::body::{declared_length, BodyBudget, Reservation};
use crate::proxy::classify::{self, Asker};
use crate::proxy::context::Inflight;
use crate::proxy::tenant;

/// The longest request head read here; a longer one is left to Pingora.
const MAX_HEAD: usize = 64 * 1024;

/// The most header lines read here (Pingora's own limit).
const MAX_HEADERS: usize = 256;

/// A request that waited before its session began, and the verdict it got.
pub struct Parked {
    /// When its head was read: the start of its queue wait.
    pub started: Instant,
    gate: Arc<AdmissionGate>,
    outcome: Outcome,
    /// Its body's share of `adaptive.replay_body_budget` while it waited.
    held: Option<Reservation>,
    /// Counts it in `inflight_requests` from the moment it parks (a stopping sidecar waits
    /// for it); `request_filter` takes the count over.
    pub inflight: Option<Inflight>,
}

/// How a parked request's wait ended.
enum Outcome {
    /// It has its verdict (until `request_filter` takes it).
    Decided(Verdict),
    /// Its client hung up.
    ClientLeft,
    /// It was read ahead but not parked (its body stalled): it queues the usual way.
    NotParked,
}

impl Parked {
    /// The verdict for the request, now routed to `gate`. `None` when it has none, or when it
    /// is routed elsewhere now (a reload came in between): it queues again there, and what it
    /// was granted here is given back.
    pub fn verdict_from(&mut self, gate: &Arc<AdmissionGate>) -> Option<Verdict> {
        if !Arc::ptr_eq(&self.gate, gate) {
            return None;
        }
        match std::mem::replace(&mut self.outcome, Outcome::NotParked) {
            Outcome::Decided(verdict) => Some(verdict),
            other => {
                self.outcome = other;
                None
            }
        }
    }

    /// The body's share of the budget, for the request to hold its body with.
    pub fn take_body(&mut self) -> Option<Reservation> {
        self.held.take()
    }

    /// The client hung up while the request was parked.
    pub fn client_left(&self) -> bool {
        matches!(self.outcome, Outcome::ClientLeft)
    }
}

/// Hands `parked` to the session Pingora is about to serve, for `request_filter` to take
/// (`Parked::taken_from`).
///
/// Pingora carries a connection's context to its next request only erased, as the
/// `Box<dyn Any>` of `set_connection_user_context`, and offers no typed way: these two
/// functions are the one place where the verdict is erased and recovered.
pub fn hand_over(session: &mut ServerSession, parked: Parked) {
    session.set_connection_user_context(Some(Box::new(parked)));
}

impl Parked {
    /// The parked request `hand_over` gave the session, from the context Pingora passes
    /// on; `None` for any other context.
    pub fn taken_from(context: Box<dyn Any + Send + Sync>) -> Option<Parked> {
        context.downcast::<Parked>().ok().map(|parked| *parked)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Granted, but the request never used it (Pingora refused the head, or the route
        // changed): the token and the model slot go back.
        if let Outcome::Decided(Verdict::Granted(grant)) = self.outcome {
            self.gate.refund(grant);
        }
    }
}

/// `buf` holds the first bytes of the next request on `stream`, from `peer`. When a bucket is
/// congested, reads the rest of the request's head and body into `buf` and, if the request is
/// one to park, waits for its verdict while watching the client. Then `buf` holds the
/// request and no more; what came after it (the start of a pipelined request) is returned
/// beside it, to be read once this one is answered.
pub async fn park(
    app: &App,
    bodies: &BodyBudget,
    stream: &mut FrontStream,
    buf: &mut BytesMut,
    peer: Option<IpAddr>,
) -> Option<(Parked, BytesMut)> {
    let settings = {
        let table = app.table();
        let congested = table
            .all()
            .any(|r| r.gate.as_ref().is_some_and(|g| g.would_queue()));
        if !congested {
            return None;
        }
        table.settings.clone()
    };
    let started = now();
    // Decided from the head in one step, so that nothing of the parsed head is kept while
    // the request waits.
    let (plan, head_len) = {
        let (req, head_len) = read_head(stream, buf).await?;
        (plan(req, &app.table(), peer, started)?, head_len)
    };
    let body_len = plan.body_len;
    let held = match body_len {
        0 => None,
        len if len > settings.max_replay_body => return None,
        len => Some(bodies.reserve(len, settings.replay_body_budget)?),
    };
    // From here on the request does not go back to `request_filter` uncounted.
    app.activity.arrived(&plan.asker.client, started);
    if body_len > 0 {
        let deadline = tokio::time::Instant::from_std(plan.asker.deadline);
        let read = tokio::time::timeout_at(deadline, read_to(stream, buf, head_len + body_len));
        if !matches!(read.await, Ok(true)) {
            // The body stalled past the deadline, or the client left: the request goes on
            // unparked, its time counted from its arrival (its deadline has passed, or its
            // body will never come).
            let parked = Parked {
                started,
                gate: plan.gate,
                outcome: Outcome::NotParked,
                held: None,
                inflight: None,
            };
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
    let inflight = Inflight::new(&app.metrics.inflight);
    let Plan { gate, asker, .. } = plan;
    let model_id = tenant::fields_of(&buf[head_len..head_len + body_len]).model_id();
    let model = model_id
        .as_deref()
        .and_then(|id| model_index(&settings.models, id));
    if buf.capacity() > buf.len() + 256 {
        // It waits holding its bytes, not the room the first read had.
        *buf = BytesMut::from(&buf[..]);
    }
    let mut ticket = gate.admit_with(Ask {
        client: asker.client,
        priority: asker.priority,
        deadline: asker.deadline,
        weight: asker.weight,
        model,
        model_id,
    });
    let verdict = match ticket.immediate() {
        Some(verdict) => Some(verdict),
        None => {
            // Watch the client while it waits: it may hang up. A byte that arrives instead
            // is the start of a pipelined request; it is kept for later, and watching stops.
            let mut probe = [0u8; 1];
            let pipelined = !ahead.is_empty();
            let watch = async {
                if !pipelined {
                    stream.read(&mut probe).await
                } else {
                    // Pipelined already: nothing to watch for.
                    std::future::pending().await
                }
            };
            tokio::select! {
                verdict = ticket.verdict() => Some(verdict),
                read = watch => match read {
                    Ok(n) if n > 0 => {
                        ahead.extend_from_slice(&probe[..n]);
                        Some(ticket.verdict().await)
                    }
                    _ => None,
                },
            }
        }
    };
    // Dropping the ticket now gives up the place of a client that left.
    drop(ticket);
    let parked = Parked {
        started,
        gate,
        outcome: verdict.map_or(Outcome::ClientLeft, Outcome::Decided),
        held,
        inflight: Some(inflight),
    };
    Some((parked, ahead))
}

/// What parking needs to know of a request, read from its head.
struct Plan {
    gate: Arc<AdmissionGate>,
    asker: Asker,
    /// The length of its body, which is read ahead.
    body_len: usize,
}

/// The plan for the request `req`, from `peer`, by the routes of `table`; `None` when it is
/// not one to park.
fn plan(
    req: RequestHeader,
    table: &RouteTable,
    peer: Option<IpAddr>,
    started: Instant,
) -> Option<Plan> {
    // What Pingora refuses with a 400 (an ambiguous authority), or the sidecar refuses, is
    // answered at once.
    if validate_request_authority(&req).is_err() || classify::refusal(&req, table).is_some() {
        return None;
    }
    let route = table.route_for(req.uri.path());
    let gate = route.gate.clone()?;
    let settings = &table.settings;
    // A request whose own bucket can serve it now gets its token at once in `request_filter`.
    if route.settings.keepalive_while_queued
        || (settings.fallback_passthrough && gate.is_degraded())
        || !gate.would_queue()
    {
        return None;
    }
    Some(Plan {
        gate,
        asker: classify::who_asks(&req, peer, settings, started).ok()?,
        body_len: plain_body_length(&req)?,
    })
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

/// The length of a body that can be read ahead: 0 without one, its single `Content-Length`
/// otherwise. `None` for a chunked body, a doubtful length, or a client that waits for
/// `100 Continue` before it sends its body.
fn plain_body_length(req: &RequestHeader) -> Option<usize> {
    if req.headers.contains_key(http::header::TRANSFER_ENCODING) || classify::expects_continue(req)
    {
        return None;
    }
    if !req.headers.contains_key(http::header::CONTENT_LENGTH) {
        return Some(0);
    }
    declared_length(req)
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
        assert_eq!(plain_body_length(&req), Some(12));
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

    #[test]
    fn only_plain_bodies_are_read_ahead() {
        let length = |bytes: &[u8]| plain_body_length(&head(bytes).unwrap());
        assert_eq!(length(b"GET / HTTP/1.1\r\n\r\n"), Some(0));
        assert_eq!(
            length(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Some(5)
        );
        for bytes in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert_eq!(length(bytes), None, "{}", String::from_utf8_lossy(bytes));
        }
    }
}
