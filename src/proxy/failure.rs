//! A request that failed before its answer was complete: what its client is told, if anyone
//! is still there to tell.

use pingora_core::Error;
use pingora_proxy::Session;

use super::context::{RequestCtx, Stage};
use super::keepalive;
use super::respond::{client_gone, Answer};

/// Answers a request that failed with `e` before its response was complete, when there is
/// anyone to answer: the sidecar's own 429 or the failure's status with a JSON body, or, on a
/// kept-alive stream whose upstream events have not begun, the error event that ends it.
/// Returns the status sent (0: none).
pub async fn answer_failure(session: &mut Session, e: &Error, ctx: &RequestCtx) -> u16 {
    if ctx.stage == Stage::ClientLeft || client_gone(e) {
        return 0;
    }
    let kept_alive = ctx.downstream.awaits_answer();
    if session.response_written().is_some() && !kept_alive {
        return 0;
    }
    let answer = match ctx.stage {
        Stage::Rejected {
            why,
            retry_after,
            after_upstream_429,
        } => Answer::rejected(why, retry_after, after_upstream_429, ctx.model_id()),
        _ => {
            let upstream = ctx
                .route()
                .map_or("?".to_string(), |r| r.settings.upstream.to_string());
            Answer::for_failure(e, &upstream)
        }
    };
    let status = answer.status;
    let sent = if kept_alive {
        keepalive::end_with_error(session, &answer.body).await
    } else {
        answer.send(session).await
    };
    if sent.is_ok() {
        status
    } else {
        0
    }
}
