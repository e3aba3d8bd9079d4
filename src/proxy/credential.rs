//! The upstream credential: the pool key a request goes out with, in place of the client's.

use pingora::http::RequestHeader;

use crate::config::{Settings, UpstreamKey};

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
