//! Holding request bodies: read before admission, so that a waiting client that hangs up is
//! noticed and the request can be sent again after an upstream 429.
//!
//! Pingora re-sends a request body on a retry only from its own retry buffer, which is fixed
//! at 64 KiB (`BODY_BUF_LIMIT` in pingora-core); once a body outgrows it, the buffer is
//! dropped and the retry is refused. Bodies are therefore held in one of two ways:
//!
//! - up to 64 KiB, in Pingora's retry buffer, which sends it on every attempt;
//! - larger (up to `adaptive.max_replay_body`), in a buffer of ours. Retry buffering is
//!   switched on only for the last 64 KiB or less of the body, so Pingora's buffer holds the
//!   tail and is never truncated. Because that buffer is not empty, Pingora hands it to
//!   `request_body_filter` at the start of every attempt (`proxy_handle_downstream` in
//!   pingora-proxy's `proxy_h1.rs`, `proxy_h2.rs` alike), where the proxy puts the whole body
//!   in its place.
//!
//! How a body is to be read is decided once, from its head (`BodyPlan`, part of the request's
//! intake). Every held byte is counted against `adaptive.replay_body_budget`. A body that is too large,
//! does not fit the budget, or has no declared length (chunked) is not read ahead: it streams
//! through when its turn comes and is not replayable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora_core::{Error, ErrorType, Result};
use pingora_proxy::Session;
use prometheus::IntGauge;

/// The size of Pingora's retry buffer (`BODY_BUF_LIMIT` in pingora-core).
pub const PINGORA_RETRY_BUFFER: usize = 64 * 1024;

/// Why a body streams through instead of being held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHeld {
    /// Larger than `adaptive.max_replay_body`.
    TooLarge,
    /// The held bodies already use `adaptive.replay_body_budget`.
    BudgetFull,
    /// No `Content-Length`: its size is known only once it is read.
    Chunked,
}

impl NotHeld {
    pub fn as_str(self) -> &'static str {
        match self {
            NotHeld::TooLarge => "body_too_large",
            NotHeld::BudgetFull => "budget_full",
            NotHeld::Chunked => "chunked_body",
        }
    }
}

/// How a request's body is read, as its head declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// No body.
    Empty,
    /// A plain `Content-Length` of this many bytes, small enough to hold: read ahead of
    /// admission when the budget has room (`hold`).
    Hold(usize),
    /// Not read ahead: it streams through when its turn comes.
    Stream(NotHeld),
}

impl BodyPlan {
    /// The plan for `head`'s body, holding at most `max_body` bytes
    /// (`adaptive.max_replay_body`). A malformed length never gets here: `classify::refusal`
    /// refuses it.
    pub fn of(head: &RequestHeader, max_body: usize) -> BodyPlan {
        if head.headers.contains_key(http::header::TRANSFER_ENCODING) {
            return BodyPlan::Stream(NotHeld::Chunked);
        }
        if !head.headers.contains_key(http::header::CONTENT_LENGTH) {
            return BodyPlan::Empty;
        }
        match declared_length(head) {
            Some(0) => BodyPlan::Empty,
            Some(len) if len <= max_body => BodyPlan::Hold(len),
            Some(_) => BodyPlan::Stream(NotHeld::TooLarge),
            None => BodyPlan::Stream(NotHeld::Chunked),
        }
    }
}

/// How a request's body is held.
#[derive(Debug)]
pub enum BodyHold {
    /// Nothing read yet.
    Unread,
    /// The request has no body.
    Empty,
    /// Read completely into Pingora's retry buffer.
    RetryBuffer { _held: Reservation },
    /// Read completely into `body`; Pingora's retry buffer holds its tail (see the module doc).
    Kept { body: Bytes, _held: Reservation },
    /// Streams through when the request's turn comes; not replayable.
    Streamed(NotHeld),
}

impl BodyHold {
    /// The whole body is in hand: the request can be sent again, and the client's connection
    /// can be watched while it waits (nothing of the body is left to read).
    pub fn is_complete(&self) -> bool {
        matches!(
            self,
            BodyHold::Empty | BodyHold::RetryBuffer { .. } | BodyHold::Kept { .. }
        )
    }

    /// The body to send in place of the retry buffer's tail, when it is kept by us.
    pub fn kept(&self) -> Option<&Bytes> {
        match self {
            BodyHold::Kept { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// The memory all held bodies may take together.
#[derive(Clone)]
pub struct BodyBudget {
    used: Arc<AtomicUsize>,
    gauge: IntGauge,
}

/// Bytes of the budget held by one request; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    used: Arc<AtomicUsize>,
    gauge: IntGauge,
    bytes: usize,
}

impl BodyBudget {
    pub fn new(gauge: IntGauge) -> BodyBudget {
        BodyBudget {
            used: Arc::new(AtomicUsize::new(0)),
            gauge,
        }
    }

    /// Reserves `bytes` if they fit within `limit` together with what is held already.
    pub fn reserve(&self, bytes: usize, limit: usize) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .ok()?;
        self.gauge.add(bytes as i64);
        Some(Reservation {
            used: self.used.clone(),
            gauge: self.gauge.clone(),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.gauge.sub(self.bytes as i64);
    }
}

/// Reads the request body ahead of admission as `plan` says (see the module doc), when the
/// held bodies leave room for it within `limit` (`adaptive.replay_body_budget`). `held` is the
/// share of the budget the body has already (a parked request's).
pub async fn hold(
    session: &mut Session,
    plan: BodyPlan,
    deadline: Instant,
    budget: &BodyBudget,
    limit: usize,
    held: Option<Reservation>,
) -> Result<BodyHold> {
    if session.downstream_session.is_body_empty() {
        return Ok(BodyHold::Empty);
    }
    let len = match plan {
        BodyPlan::Empty => return Ok(BodyHold::Empty),
        BodyPlan::Stream(why) => return Ok(BodyHold::Streamed(why)),
        BodyPlan::Hold(len) => len,
    };
    let reservation = match held.filter(|r| r.bytes == len) {
        Some(reservation) => reservation,
        None => match budget.reserve(len, limit) {
            Some(reservation) => reservation,
            None => return Ok(BodyHold::Streamed(NotHeld::BudgetFull)),
        },
    };
    let deadline = tokio::time::Instant::from_std(deadline);
    let read = async {
        if len <= PINGORA_RETRY_BUFFER {
            session.downstream_session.enable_retry_buffering();
            while session
                .downstream_session
                .read_request_body()
                .await?
                .is_some()
            {}
            return Ok(BodyHold::RetryBuffer { _held: reservation });
        }
        let mut body = BytesMut::with_capacity(len);
        loop {
            if len.saturating_sub(body.len()) <= PINGORA_RETRY_BUFFER {
                // From here on Pingora keeps what is read: the tail that makes it call
                // `request_body_filter` on every attempt.
                session.downstream_session.enable_retry_buffering();
            }
            match session.downstream_session.read_request_body().await? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        Ok::<_, Box<Error>>(BodyHold::Kept {
            body: body.freeze(),
            _held: reservation,
        })
    };
    let held = match tokio::time::timeout_at(deadline, read).await {
        Ok(held) => held?,
        Err(_) => {
            return Error::e_explain(
                ErrorType::ReadTimedout,
                "request body not received before the deadline",
            )
            .map_err(|e| e.into_down())
        }
    };
    if session.downstream_session.retry_buffer_truncated() {
        // Cannot happen with a correct Content-Length; never send a truncated body twice.
        return Error::e_explain(
            ErrorType::InvalidHTTPHeader,
            "request body longer than declared",
        )
        .map_err(|e| e.into_down());
    }
    if matches!(held, BodyHold::Kept { .. })
        && session.downstream_session.get_retry_buffer().is_none()
    {
        // Pingora reads at most 64 KiB at a time, so the tail is always there; without it
        // Pingora would send no body at all, so fail clearly rather than hang.
        return Error::e_explain(
            ErrorType::InternalError,
            "the request body's tail is not in Pingora's retry buffer",
        );
    }
    Ok(held)
}

/// The request's `Content-Length`, when it declares exactly one, as HTTP allows it.
pub fn declared_length(req: &RequestHeader) -> Option<usize> {
    let mut values = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = plain_length(values.next()?.as_bytes())?;
    values.next().is_none().then_some(first)
}

/// A `Content-Length` value as HTTP allows it: digits only (the parser has taken the spaces
/// around it off already), fitting a length. `+5`, `5 5` or `0x5` are read differently by
/// different parsers, so none is taken.
pub fn plain_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The held body's bytes, when the whole body is in hand.
pub fn held_body(session: &Session, body: &BodyHold) -> Option<Bytes> {
    match body {
        BodyHold::Kept { body, .. } => Some(body.clone()),
        BodyHold::RetryBuffer { .. } => session.downstream_session.get_retry_buffer(),
        _ => None,
    }
}
