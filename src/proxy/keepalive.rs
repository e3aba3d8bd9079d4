//! Keeping a waiting streaming client alive (`routes[].keepalive_while_queued`).
//!
//! Many LLM clients give up when no byte arrives for a minute, while a request may wait longer
//! than that for its token. A `"stream": true` request on such a route that is still waiting
//! after `KEEPALIVE_AFTER` gets its `200` and `text/event-stream` headers at once, then an SSE
//! comment line every `KEEPALIVE_INTERVAL`, which clients ignore. When its token comes the
//! upstream's events follow on the same stream (the upstream's own status line and headers
//! are not sent: the client has had ours). What this trades away: the status is promised
//! before the outcome is known, so a failure after that (the deadline passed, the upstream
//! answered an error) reaches the client as an OpenAI-style `data: {"error": …}` event and the
//! end of the stream, not as an HTTP status a client library would retry on.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora_core::Result;
use pingora_proxy::Session;

use super::attempt::keep_error_body;
use super::respond::error_body;
use super::wait;
use crate::admission::{Ticket, Verdict};

/// How long a streaming request waits before it gets its headers.
pub const KEEPALIVE_AFTER: Duration = Duration::from_secs(3);

/// Time between two comment lines while the request waits.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

const COMMENT: &[u8] = b": waiting for a request token\n\n";

/// Where the client's side of a request stands, as far as keeping it alive goes.
#[derive(Debug, Default)]
pub enum Downstream {
    /// Answered the usual way: not a streaming request on a keep-alive route.
    #[default]
    Plain,
    /// A streaming request on a keep-alive route that has had nothing yet: if it waits past
    /// `KEEPALIVE_AFTER`, it gets its headers.
    MayKeepAlive,
    /// Its `200` and event-stream headers (and comments) went out while it waited.
    KeptAlive,
    /// The upstream's events are reaching it.
    Streaming,
    /// The upstream answered an error after the client had its `200`: the error's status
    /// and the start of its body, turned into an error event at its end.
    EndingWithError { status: u16, body: BytesMut },
}

impl Downstream {
    /// The state a request starts in: `keeps_alive` for a streaming request on a
    /// `keepalive_while_queued` route.
    pub fn for_request(keeps_alive: bool) -> Downstream {
        match keeps_alive {
            true => Downstream::MayKeepAlive,
            false => Downstream::Plain,
        }
    }

    /// The client has the stream's headers, and nothing of the upstream's answer: it can
    /// still be sent again, and a failure reaches the client as an error event.
    pub fn awaits_answer(&self) -> bool {
        matches!(
            self,
            Downstream::KeptAlive | Downstream::EndingWithError { .. }
        )
    }

    /// The client was promised a `200` while it waited.
    pub fn headers_sent(&self) -> bool {
        !matches!(self, Downstream::Plain | Downstream::MayKeepAlive)
    }

    /// The upstream answered `status` to a request whose client has its headers already.
    pub fn upstream_answered(&mut self, status: u16) {
        if matches!(self, Downstream::KeptAlive) && !(200..300).contains(&status) {
            *self = Downstream::EndingWithError {
                status,
                body: BytesMut::new(),
            };
        }
    }

    /// A chunk of the upstream's answer on its way to a kept-alive client: the events of a
    /// success go through; an error's body is swallowed, and its end carries an error event
    /// in its place.
    pub fn answer_body(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        match self {
            Downstream::KeptAlive if body.as_ref().is_some_and(|b| !b.is_empty()) => {
                *self = Downstream::Streaming;
            }
            Downstream::EndingWithError { status, body: kept } => {
                if let Some(chunk) = body.take() {
                    keep_error_body(kept, &chunk);
                }
                if end_of_stream {
                    let text = String::from_utf8_lossy(kept);
                    let message = format!(
                        "the upstream answered {status}: {}",
                        text.trim().chars().take(512).collect::<String>()
                    );
                    let event =
                        error_body(&message, "upstream_error", &format!("upstream_{status}"));
                    *body = Some(error_event(&event));
                }
            }
            _ => {}
        }
    }
}

/// Waits for the ticket's verdict while watching the client when `watch_client` (see
/// `wait`), keeping a kept-alive request's stream alive meanwhile. `None` means the client
/// left. `watch_client` is only safe once the request body has been read completely.
pub async fn verdict(
    session: &mut Session,
    ticket: &mut Ticket,
    watch_client: bool,
    downstream: &mut Downstream,
) -> Result<Option<Verdict>> {
    match downstream {
        Downstream::MayKeepAlive | Downstream::KeptAlive => {
            keep_alive(session, ticket, watch_client, downstream).await
        }
        _ => Ok(wait::verdict(ticket, watch_client.then_some(session)).await),
    }
}

/// Waits for the verdict; past `KEEPALIVE_AFTER` the client gets the stream's headers, and a
/// comment line every `KEEPALIVE_INTERVAL` meanwhile.
async fn keep_alive(
    session: &mut Session,
    ticket: &mut Ticket,
    watch_client: bool,
    downstream: &mut Downstream,
) -> Result<Option<Verdict>> {
    let mut wait = match downstream {
        Downstream::KeptAlive => KEEPALIVE_INTERVAL,
        _ => KEEPALIVE_AFTER,
    };
    loop {
        let verdict = wait::verdict(ticket, watch_client.then_some(&mut *session));
        match tokio::time::timeout(wait, verdict).await {
            Ok(verdict) => return Ok(verdict),
            Err(_) if !downstream.headers_sent() => {
                let mut header = ResponseHeader::build(200, Some(4))?;
                header.insert_header(http::header::CONTENT_TYPE, "text/event-stream")?;
                header.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
                header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
                // A failure to write means the client left.
                session
                    .write_response_header(Box::new(header), false)
                    .await
                    .map_err(|e| e.into_down())?;
                *downstream = Downstream::KeptAlive;
                comment(session).await?;
                wait = KEEPALIVE_INTERVAL;
            }
            Err(_) => comment(session).await?,
        }
    }
}

/// Writes one comment line; a failure means the client left.
async fn comment(session: &mut Session) -> Result<()> {
    session
        .write_response_body(Some(Bytes::from_static(COMMENT)), false)
        .await
        .map_err(|e| e.into_down())
}

/// The event that ends a kept-alive stream whose request failed: the error body the client
/// would otherwise have had with an HTTP status.
pub fn error_event(error_body: &[u8]) -> Bytes {
    let mut event = Vec::with_capacity(error_body.len() + 16);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(error_body);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

/// Ends a kept-alive stream with an error event.
pub async fn end_with_error(session: &mut Session, error_body: &[u8]) -> Result<()> {
    session
        .write_response_body(Some(error_event(error_body)), true)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(bytes: &'static [u8]) -> Option<Bytes> {
        Some(Bytes::from_static(bytes))
    }

    #[test]
    fn a_kept_alive_stream_goes_from_waiting_to_events_or_to_an_error_event() {
        let mut plain = Downstream::for_request(false);
        plain.upstream_answered(500);
        assert!(matches!(plain, Downstream::Plain) && !plain.headers_sent());

        let mut success = Downstream::KeptAlive;
        assert!(success.awaits_answer());
        success.upstream_answered(200);
        success.answer_body(&mut Some(Bytes::new()), false);
        assert!(success.awaits_answer(), "an empty chunk is no event");
        let mut events = chunk(b"data: {}\n\n");
        success.answer_body(&mut events, false);
        assert!(matches!(success, Downstream::Streaming) && !success.awaits_answer());
        assert_eq!(
            events,
            chunk(b"data: {}\n\n"),
            "events go through untouched"
        );

        let mut failed = Downstream::KeptAlive;
        failed.upstream_answered(503);
        let mut part = chunk(b"{\"detail\":\"busy\"}");
        failed.answer_body(&mut part, false);
        assert_eq!(part, None, "the error's body is not sent as events");
        assert!(failed.awaits_answer());
        let mut end = None;
        failed.answer_body(&mut end, true);
        let event = String::from_utf8(end.unwrap().to_vec()).unwrap();
        assert!(
            event.starts_with("data: {") && event.ends_with("\n\n"),
            "{event}"
        );
        assert!(
            event.contains("upstream_503") && event.contains("busy"),
            "{event}"
        );
    }
}
