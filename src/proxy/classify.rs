//! Who is asking and for what: the client id, the priority, and the requests an egress proxy
//! for configured upstreams refuses outright.

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderName, Method};
use pingora::http::RequestHeader;
use pingora_proxy::Session;

use crate::app::RouteTable;
use crate::config::Settings;
use crate::limiter::Priority;

use super::body::plain_length;
use super::respond::Answer;
use super::tenant;

/// Longest client id kept from `X-Client-Id`.
const CLIENT_ID_MAX: usize = 64;

pub static X_CLIENT_ID: HeaderName = HeaderName::from_static("x-client-id");
pub static X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");

/// Who asks, as far as the queue is concerned.
pub struct Asker {
    pub client: Arc<str>,
    pub weight: u32,
    pub priority: Priority,
    /// When the request gives up waiting: `request_timeout` (or `low_priority_timeout`), or
    /// the client's own shorter timeout, from `started`.
    pub deadline: Instant,
}

/// Who sends `req` from `peer`, or the answer that refuses it (a client key that is missing
/// or unknown, when `clients` is configured).
pub fn who_asks(
    req: &RequestHeader,
    peer: Option<IpAddr>,
    settings: &Settings,
    started: Instant,
) -> Result<Asker, Answer> {
    let (client, weight, priority) = if settings.clients.is_enabled() {
        let known = tenant::client_by_key(req, &settings.clients)?;
        (
            known.id.clone(),
            known.weight,
            priority(req).min(known.max_priority),
        )
    } else {
        let client = client_id(req, peer);
        let priority = settings.access.cap_priority(&client, priority(req));
        (client, 1, priority)
    };
    let budget = match priority {
        Priority::Low => settings.low_priority_timeout,
        _ => settings.request_timeout,
    };
    // The client's own timeout: nothing is sent upstream after it has given up.
    let budget = tenant::client_timeout(req).map_or(budget, |t| t.min(budget));
    Ok(Asker {
        client,
        weight,
        priority,
        deadline: started + budget,
    })
}

/// The IP address of the client at the other end of `session`.
pub fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The client id: `X-Client-Id` (control characters dropped, at most 64 characters), else the
/// peer's address.
pub fn client_id(req: &RequestHeader, peer: Option<IpAddr>) -> Arc<str> {
    let header = req
        .headers
        .get(&X_CLIENT_ID)
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
        None => match peer {
            Some(ip) => peer_id(ip),
            None => Arc::from("unknown"),
        },
    }
}

/// The id of a client known by its address alone. Clients of a sidecar are mostly one or a
/// few local processes: each thread keeps the last address's id, not to format and allocate
/// it again for every request.
fn peer_id(ip: IpAddr) -> Arc<str> {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, Arc<str>)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match last.as_ref() {
            Some((known, id)) if *known == ip => id.clone(),
            _ => {
                let id: Arc<str> = Arc::from(ip.to_string());
                *last = Some((ip, id.clone()));
                id
            }
        }
    })
}

/// The priority from `X-Priority`; normal when absent or unreadable.
pub fn priority(req: &RequestHeader) -> Priority {
    req.headers
        .get(&X_PRIORITY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(Priority::Normal)
}

/// Whether a request path could mean another path to the upstream than the one routes are
/// matched on: dot segments (`/v1/models/../chat/completions`), raw or percent-encoded, and
/// encoded or back slashes (`..%2F`). No API client needs them; an upstream that normalises
/// them would otherwise serve a counted endpoint through a passthrough route.
pub fn ambiguous_path(target: &[u8]) -> bool {
    let path_end = memchr::memchr2(b'?', b'#', target).unwrap_or(target.len());
    if memchr::memchr3(b'.', b'%', b'\\', &target[..path_end]).is_none() {
        // No dot, escape or back slash: the usual path, plain as it is.
        return false;
    }
    let lower = target.to_ascii_lowercase();
    let end = lower
        .iter()
        .position(|b| *b == b'?' || *b == b'#')
        .unwrap_or(lower.len());
    let path = &lower[..end];
    if path.contains(&b'\\')
        || path
            .windows(3)
            .any(|w| w == b"%2f" || w == b"%5c" || w == b"%00")
    {
        return true;
    }
    String::from_utf8_lossy(path)
        .replace("%2e", ".")
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// Whether the client waits for `100 Continue` before it sends its body.
pub fn expects_continue(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The refusal for what this proxy must not do: `CONNECT`, paths that could reach another
/// endpoint than the one they are routed as, a `Host` it does not serve (a web page that
/// rebinds its name to this machine), and absolute-form targets on hosts that are not
/// configured upstreams.
pub fn refusal(req: &RequestHeader, table: &RouteTable) -> Option<Answer> {
    let mut lengths = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = lengths.next();
    if lengths.next().is_some() || first.is_some_and(|v| v.as_bytes().contains(&b',')) {
        // Two framings for one body: what the upstream reads may differ from what we held.
        return Some(Answer::refused(
            400,
            "the request has more than one Content-Length",
            "bad_request",
        ));
    }
    if first.is_some_and(|v| plain_length(v.as_bytes()).is_none()) {
        return Some(Answer::refused(
            400,
            "the request's Content-Length is not a plain number of bytes",
            "bad_request",
        ));
    }
    // The target as the client sent it: what the upstream will see and normalise.
    if ambiguous_path(req.raw_path()) {
        return Some(Answer::refused(
            400,
            "the request path has dot segments or encoded slashes; send it in its plain form",
            "invalid_path",
        ));
    }
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
        let host = req
            .headers
            .get(http::header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()));
        if host.is_some_and(|h| !table.settings.access.allows_host(&h)) {
            return Some(Answer::refused(
                403,
                "this Host is not one the sidecar serves; add it to access.allowed_hosts",
                "forbidden_host",
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::ambiguous_path;
    use crate::proxy::body::plain_length;

    #[test]
    fn only_digits_are_a_content_length() {
        for good in ["0", "5", "1048576", "0005"] {
            assert!(plain_length(good.as_bytes()).is_some(), "{good}");
        }
        for bad in [
            "",
            "+5",
            "-1",
            "5 5",
            "0x5",
            "5.0",
            " 5",
            "99999999999999999999",
        ] {
            assert!(plain_length(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn dot_segments_and_encoded_separators_are_ambiguous() {
        for path in [
            "/v1/models/../chat/completions",
            "/v1/models/..%2Fchat/completions",
            "/v1/models/%2e%2e/chat/completions",
            "/v1/models/%2E%2E/chat/completions",
            "/v1/models/./x",
            "/v1/models\\..\\chat",
            "/v1/models%5c..%5cchat",
            "http://localhost/v1/models/../chat",
        ] {
            assert!(ambiguous_path(path.as_bytes()), "{path}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/models",
            "/v1/models/meta/llama-3.1-8b-instruct",
            "/v1/files/a..b",
            "/v1/chat/completions?next=%2F..%2F",
        ] {
            assert!(!ambiguous_path(path.as_bytes()), "{path}");
        }
    }
}
