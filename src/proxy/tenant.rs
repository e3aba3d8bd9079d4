//! Who a request is for, beyond its path: the client its key names (when `clients` is
//! configured), and the deadline its client set.

use std::time::Duration;

use http::HeaderName;
use pingora::http::RequestHeader;

use super::respond::Answer;
use crate::config::{ClientSettings, Clients};

/// The longest deadline a client may set (a year): longer ones are as good as none.
const MAX_CLIENT_TIMEOUT: f64 = 31_536_000.0;

/// The configured client whose key the request carries as `Authorization: Bearer <key>`, or
/// the 401 to answer.
pub fn client_by_key<'a>(
    req: &RequestHeader,
    clients: &'a Clients,
) -> Result<&'a ClientSettings, Answer> {
    let presented = req
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(presented) = presented else {
        return Err(Answer::refused(
            401,
            "this sidecar requires a client key: send Authorization: Bearer <client key>",
            "invalid_client_key",
        ));
    };
    clients.by_key(presented).ok_or_else(|| {
        Answer::refused(
            401,
            "the client key is not one this sidecar knows",
            "invalid_client_key",
        )
    })
}

/// The time the client says it will wait for its answer: `X-Request-Timeout`, or the
/// `X-Stainless-Timeout` the OpenAI SDKs send with their own timeout (whole seconds); the
/// shorter when both are there. Values that are not a positive number of seconds are ignored.
pub fn client_timeout(req: &RequestHeader) -> Option<Duration> {
    static TIMEOUTS: [HeaderName; 2] = [
        HeaderName::from_static("x-request-timeout"),
        HeaderName::from_static("x-stainless-timeout"),
    ];
    let headers = &req.headers;
    TIMEOUTS
        .iter()
        .filter_map(|name| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs > 0.0)
        .map(|secs| Duration::from_secs_f64(secs.min(MAX_CLIENT_TIMEOUT)))
        .min()
}
