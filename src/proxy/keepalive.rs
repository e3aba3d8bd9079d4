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

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora_core::Result;
use pingora_proxy::Session;

use crate::admission::{Ticket, Verdict};

/// How long a streaming request waits before it gets its headers.
pub const KEEPALIVE_AFTER: Duration = Duration::from_secs(3);

/// Time between two comment lines while the request waits.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

const COMMENT: &[u8] = b": waiting for a request token\n\n";

/// Waits for the ticket's verdict like `wait_for_token`; past `KEEPALIVE_AFTER` the client
/// gets the stream's headers and a comment line every `KEEPALIVE_INTERVAL` meanwhile.
/// `started` is set once the headers are out. `None` means the client left.
pub async fn wait_keeping_alive(
    session: &mut Session,
    ticket: &mut Ticket,
    watch_client: bool,
    started: &mut bool,
) -> Result<Option<Verdict>> {
    let mut wait = if *started {
        KEEPALIVE_INTERVAL
    } else {
        KEEPALIVE_AFTER
    };
    loop {
        match tokio::time::timeout(wait, super::wait_for_token(session, ticket, watch_client)).await
        {
            Ok(verdict) => return Ok(verdict),
            Err(_) if !*started => {
                let mut header = ResponseHeader::build(200, Some(4))?;
                header.insert_header(http::header::CONTENT_TYPE, "text/event-stream")?;
                header.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
                header.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
                // A failure to write means the client left.
                session
                    .write_response_header(Box::new(header), false)
                    .await
                    .map_err(|e| e.into_down())?;
                *started = true;
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
