//! Sending a request again after an upstream 429 (or a 503 from a busy worker), and where
//! Pingora still allows it.
//!
//! **Where a response can still be abandoned.** Pingora (0.9, `proxy_h1.rs` and
//! `proxy_h2.rs`) reads the upstream's answer in one half of a duplex loop and passes it as
//! tasks (header, body chunks) to the other half, which filters them and writes them to the
//! client in batches: `process_upstream_tasks` takes the task that woke it plus whatever else
//! is already queued, runs `upstream_response_filter` / `upstream_response_body_filter` on
//! each, then writes the batch. An error from a filter abandons the attempt before the batch
//! is written; `error_while_proxy` decides whether it is retried, and the retry loop in
//! `proxy_to_upstream`'s caller calls `upstream_peer` again and re-sends the request body.
//!
//! The header is the only safe place to decide. When the status line and headers arrive in
//! one read and the body in a later one (a chunked body, a slow or absent body, many servers'
//! plain framing), the header's batch holds the header alone and is written to the client
//! before any body filter runs: a decision taken from the body would come after the client
//! already has the 429. So a 429 on a replayable request is abandoned in
//! `upstream_response_filter`, from its status and headers, whatever follows. The price: its
//! body is never read, so a 429 that is a billing or capacity error in disguise is replayed as
//! a rate limit. Refusals that are passed on to the client are read (first 4 KiB) and
//! classified by their body; once one says the account is out of credit
//! (`insufficient_quota`), the route's 429s are passed on at once for a window.

use std::time::{Duration, SystemTime};

use pingora::http::ResponseHeader;
use pingora_core::{Error, ErrorType};
use pingora_proxy::Session;

use crate::admission::{now, AdmissionGate};
use crate::config::Settings;
use crate::limiter::{retry_after_header, UpstreamSignal};

use super::context::{RequestCtx, Stage};
use super::SidecarProxy;

/// The error that sends a request back to the queue after an upstream refusal.
const REPLAY_ERROR: ErrorType = ErrorType::Custom("upstream rate limited, replaying");

/// The reading of an upstream answer from its status line and headers alone.
pub fn read_header(response: &ResponseHeader) -> UpstreamSignal {
    UpstreamSignal::read(
        response.status.as_u16(),
        |name| response.headers.get(name).and_then(|v| v.to_str().ok()),
        &[],
        SystemTime::now(),
    )
}

/// Longest wait before a 503 is replayed, whatever its `Retry-After` says.
const UNAVAILABLE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A 503 without `Retry-After` is replayed after this long.
const UNAVAILABLE_BACKOFF: Duration = Duration::from_secs(1);

/// Whether the answer is a refusal the request may be replayed after, and how long to wait
/// before it queues again: at once for a 429 (the limiter paces it); after `Retry-After` or a
/// second for a 503, a worker that is busy for now (NVIDIA's "ResourceExhausted"), which says
/// nothing about the key's rate.
pub fn backoff(response: &ResponseHeader) -> Option<Duration> {
    match response.status.as_u16() {
        429 => Some(Duration::ZERO),
        503 => Some(
            retry_after_header(
                |name| response.headers.get(name).and_then(|v| v.to_str().ok()),
                SystemTime::now(),
            )
            .unwrap_or(UNAVAILABLE_BACKOFF)
            .min(UNAVAILABLE_BACKOFF_MAX),
        ),
        _ => None,
    }
}

/// Whether an upstream 429 on this request goes back to the queue: the request holds a token
/// for this attempt, its whole body is in hand, it has replays left, nothing has reached the
/// client, the upstream has not lately said the account is out of credit, and its deadline
/// leaves room for the wait the limiter expects.
pub fn may_replay(
    ctx: &RequestCtx,
    settings: &Settings,
    gate: &AdmissionGate,
    session: &Session,
    signal: &UpstreamSignal,
    backoff: Duration,
) -> bool {
    // The pause this answer asks for is not in the limiter's estimate yet.
    let asked = match signal {
        UpstreamSignal::RateLimited {
            retry_after: Some(wait),
        } => *wait,
        _ => Duration::ZERO,
    };
    let Stage::Admitted { grant } = ctx.stage else {
        return false;
    };
    // A refused probe waits for the next one; a request whose replay could not be served in
    // time is passed on instead, so that its body is read (it may say "try again in 5 hours").
    let held = gate.replay_wait(grant);
    ctx.body.is_complete()
        && ctx.replays < settings.max_replays
        && nothing_of_the_answer_sent(ctx, session)
        && gate.replays_429s(grant)
        && (gate.estimated_wait(ctx.priority()) + asked.max(backoff)).max(held)
            < ctx.deadline().saturating_duration_since(now())
}

/// Nothing of the upstream's answer has reached the client: no response at all, or only the
/// headers and comments of a kept-alive stream.
pub fn nothing_of_the_answer_sent(ctx: &RequestCtx, session: &Session) -> bool {
    session.response_written().is_none() || ctx.downstream.awaits_answer()
}

/// The error that abandons the attempt and sends the request back to the queue.
pub fn replay_error() -> Box<Error> {
    let mut e = Error::explain(
        REPLAY_ERROR,
        "the upstream refused (429 or 503); the request goes back to the queue",
    );
    e.set_retry(true);
    e.into_up()
}

impl SidecarProxy {
    /// Abandons the attempt under way: the request gives back its model slot and waits
    /// `backoff`, then for a new token (see `replay`). Returns the error that does it.
    pub(super) fn send_again(
        &self,
        ctx: &mut RequestCtx,
        backoff: std::time::Duration,
    ) -> Box<pingora_core::Error> {
        // The attempt is over: its model slot goes to the next waiter.
        ctx.attempt.slot = None;
        ctx.replays += 1;
        ctx.stage = Stage::ReplayPending { backoff };
        self.app
            .metrics
            .replays
            .with_label_values(&[ctx.route_name()])
            .inc();
        replay_error()
    }
}
