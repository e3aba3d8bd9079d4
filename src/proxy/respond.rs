//! The sidecar's own answers: its 429s, its refusals, and the error responses for what failed,
//! all in the OpenAI error shape.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_proxy::Session;

use crate::limiter::Rejection;
use crate::logging::log_value;

/// An OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, code: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "code": code, "param": null}
    });
    Bytes::from(body.to_string())
}

/// One complete answer of the sidecar's own.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub retry_after: Option<Duration>,
}

impl Answer {
    /// The sidecar's own 429: queue full, deadline passed (or it would pass before a token
    /// could be had), or the request's `model` locked by the upstream, with an honest
    /// `Retry-After`.
    pub fn rejected(
        why: Rejection,
        retry_after: Duration,
        after_upstream_429: bool,
        model: Option<&str>,
    ) -> Answer {
        let message = match (why, after_upstream_429) {
            (Rejection::QueueFull, _) => "the sidecar's queue is full; retry later".to_string(),
            (Rejection::QueueTimeout, false) => {
                "no request token became free, or could become free, before the request's deadline"
                    .to_string()
            }
            (Rejection::QueueTimeout, true) => {
                "the upstream kept answering 429 and no token became free again before the deadline"
                    .to_string()
            }
            (Rejection::TooLarge { tokens, limit }, _) => {
                // Waiting would not help: a 400, which SDKs do not retry.
                let message = format!(
                    "the request is estimated at {tokens} tokens, more than the whole token budget of {limit} tokens per minute (tpm) it falls under, so it could never be sent; shorten the prompt or lower max_tokens"
                );
                return Answer {
                    status: 400,
                    body: error_body(&message, "invalid_request_error", why.code()),
                    retry_after: None,
                };
            }
            (Rejection::ModelLocked, _) => {
                let until = std::time::SystemTime::now() + retry_after;
                format!(
                    "the upstream refuses model {} until about {}; the sidecar answers its requests at once until then",
                    log_value(model.unwrap_or("?")),
                    httpdate::fmt_http_date(until)
                )
            }
        };
        Answer {
            status: 429,
            body: error_body(&message, "rate_limit_exceeded", why.code()),
            retry_after: Some(retry_after),
        }
    }

    /// A refusal before admission (405, 403).
    pub fn refused(status: u16, message: &str, code: &str) -> Answer {
        Answer {
            status,
            body: error_body(message, "invalid_request_error", code),
            retry_after: None,
        }
    }

    /// The answer for a request that failed with `e` before a response reached the client.
    pub fn for_failure(e: &Error, upstream: &str) -> Answer {
        let (status, code) = if e.esource() == &ErrorSource::Downstream {
            match e.etype() {
                ErrorType::ReadTimedout => (408, "request_timeout"),
                _ => (400, "bad_request"),
            }
        } else {
            match e.etype() {
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    (504, "upstream_timeout")
                }
                ErrorType::HTTPStatus(status) => (*status, "upstream_error"),
                _ => (502, "upstream_unreachable"),
            }
        };
        let message = format!("upstream {upstream} failed: {}", e.etype().as_str());
        Answer {
            status,
            body: error_body(&message, "upstream_error", code),
            retry_after: None,
        }
    }

    /// Writes the answer and ends the response.
    pub async fn send(self, session: &mut Session) -> Result<()> {
        let mut header = ResponseHeader::build(self.status, Some(4))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        header.insert_header(http::header::CONTENT_LENGTH, self.body.len().to_string())?;
        if let Some(wait) = self.retry_after {
            header.insert_header(
                http::header::RETRY_AFTER,
                retry_after_secs(wait).to_string(),
            )?;
        }
        session.set_keepalive(None);
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(self.body), true).await
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

/// Whether an error means the client went away (or broke off) rather than a failure of ours
/// or the upstream's.
pub fn client_gone(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        )
}
