//! Who is asking and for what: the client id, the priority, and the requests an egress proxy
//! for configured upstreams refuses outright.

use std::sync::Arc;

use http::Method;
use pingora_proxy::Session;

use crate::app::RouteTable;
use crate::limiter::Priority;

use super::respond::Answer;

/// Longest client id kept from `X-Client-Id`.
const CLIENT_ID_MAX: usize = 64;

/// The client id: `X-Client-Id` (control characters dropped, at most 64 characters), else the
/// peer's address.
pub fn client_id(session: &Session) -> Arc<str> {
    let header = session
        .req_header()
        .headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    match header {
        Some(id) => Arc::from(
            id.chars()
                .filter(|c| !c.is_control())
                .take(CLIENT_ID_MAX)
                .collect::<String>(),
        ),
        None => match session.client_addr().and_then(|a| a.as_inet()) {
            Some(inet) => Arc::from(inet.ip().to_string()),
            None => Arc::from("unknown"),
        },
    }
}

/// The priority from `X-Priority`; normal when absent or unreadable.
pub fn priority(session: &Session) -> Priority {
    session
        .req_header()
        .headers
        .get("x-priority")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(Priority::Normal)
}

/// The refusal for what this proxy must not do: `CONNECT`, and absolute-form targets on hosts
/// that are not configured upstreams.
pub fn refusal(session: &Session, table: &RouteTable) -> Option<Answer> {
    let req = session.req_header();
    if req.method == Method::CONNECT {
        return Some(Answer::refused(
            405,
            "CONNECT is not supported: this is not an open proxy",
            "method_not_allowed",
        ));
    }
    // Pingora normalises the parsed URI; the raw target shows an absolute-form request.
    // Origin-form targets (the usual case) start with '/' and need no parsing.
    if req.raw_path().starts_with(b"/") {
        return None;
    }
    let uri = String::from_utf8_lossy(req.raw_path())
        .parse::<http::Uri>()
        .ok()
        .filter(|uri| uri.scheme().is_some() && uri.host().is_some())?;
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    });
    if table.is_configured_upstream(host, port) {
        return None;
    }
    let message = format!("{host} is not a configured upstream: this is not an open proxy");
    Some(Answer::refused(403, &message, "forbidden_target"))
}
