//! Who a request is for, beyond its path: the client its key names (when `clients` is
//! configured), the deadline its client set, and the model its body asks for.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;
use pingora::http::RequestHeader;
use pingora_proxy::Session;
use serde::Deserialize;

use super::body::BodyHold;
use crate::config::{ClientSettings, Clients, Settings, UpstreamKey};

use super::respond::Answer;

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

/// Puts the key of lane `lane` in place of the client's credential: the key of the attempt's
/// grant, or for a request sent without one (passthrough, fail-open) the first key still in
/// the pool. Without a key the client's own `Authorization` goes on, unless it is a client key
/// of this sidecar, which never leaves it. Returns the key used.
pub fn put_upstream_key<'a>(
    request: &mut RequestHeader,
    settings: &'a Settings,
    lane: usize,
) -> pingora_core::Result<Option<&'a UpstreamKey>> {
    let key = settings.upstream.keys.get(lane);
    match key.and_then(|k| k.authorization.as_ref()) {
        Some(authorization) => {
            request.insert_header(http::header::AUTHORIZATION, authorization.clone())?;
        }
        None if settings.clients.is_enabled() => {
            request.remove_header(&http::header::AUTHORIZATION);
        }
        None => {}
    }
    Ok(key)
}

/// The held body's bytes, when the whole body is in hand.
pub fn held_body(session: &Session, body: &BodyHold) -> Option<Bytes> {
    match body {
        BodyHold::Kept { body, .. } => Some(body.clone()),
        BodyHold::RetryBuffer { .. } => session.downstream_session.get_retry_buffer(),
        _ => None,
    }
}

/// What the sidecar reads from a JSON request body.
#[derive(Debug, Default, Deserialize, PartialEq)]
pub struct BodyFields {
    /// The model asked for.
    pub model: Option<String>,
    /// `"stream": true`: the answer comes as server-sent events.
    pub stream: Option<bool>,
}

/// Longest model id whose limits are learned; a longer one (no real model has one) goes by
/// its key's rate alone, so that clients cannot make the sidecar keep arbitrary text.
const MAX_MODEL_ID: usize = 256;

impl BodyFields {
    /// The model the body asks for, as the limiter learns it.
    pub fn model_id(&self) -> Option<std::sync::Arc<str>> {
        self.model
            .as_deref()
            .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_ID)
            .map(std::sync::Arc::from)
    }
}

/// The fields of a JSON request body; none when the body is not a JSON object or a field has
/// another type than the API gives it.
pub fn fields_of(body: &[u8]) -> BodyFields {
    serde_json::from_slice(body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_of(body: &[u8]) -> Option<String> {
        fields_of(body).model
    }

    #[test]
    fn the_model_is_read_from_json_bodies_only() {
        assert_eq!(
            model_of(
                br#"{"messages":[{"role":"user","content":"hi"}],"model":"meta/x","stream":true}"#
            ),
            Some("meta/x".to_string())
        );
        assert_eq!(model_of(br#"{"messages":[]}"#), None);
        assert_eq!(model_of(br#"{"model":7}"#), None);
        assert_eq!(model_of(b"not json"), None);
        assert_eq!(model_of(b""), None);
        assert_eq!(
            fields_of(br#"{"model":"m","stream":true}"#).stream,
            Some(true)
        );
        assert_eq!(fields_of(br#"{"stream":"yes"}"#), BodyFields::default());
    }
}
