//! What every mutating admin endpoint checks first, and the admin plane's JSON error answer.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AdminState;

/// A JSON error answer `{"detail": …}`.
pub(crate) fn detail(status: StatusCode, text: impl Into<String>) -> Response {
    (status, Json(json!({"detail": text.into()}))).into_response()
}

/// What every mutating endpoint checks first, so that no web page can change the sidecar:
/// the `Host` must be one the sidecar serves (no DNS rebinding), an `Origin`, when a browser
/// sends one, must be the admin plane's own, a body must be declared JSON (a cross-site form
/// or `no-cors` fetch cannot send that without a preflight, which is never granted), and the
/// admin token must be presented when one is configured.
pub(crate) fn guard_mutation(
    state: &AdminState,
    headers: &HeaderMap,
    needs_json: bool,
) -> Result<(), Box<Response>> {
    let settings = state.app.settings();
    let host = headers
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    if host
        .as_deref()
        .is_some_and(|h| !settings.access.allows_host(h))
    {
        return Err(Box::new(detail(
            StatusCode::FORBIDDEN,
            "this Host is not one the sidecar serves; add it to access.allowed_hosts",
        )));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let own = host.is_some_and(|h| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(&h))
        });
        if !own {
            return Err(Box::new(detail(
                StatusCode::FORBIDDEN,
                format!("requests from {origin} may not change the sidecar"),
            )));
        }
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if needs_json && !json {
        return Err(Box::new(detail(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send Content-Type: application/json",
        )));
    }
    authorize(state, headers)
}

/// Mutating endpoints need `Authorization: Bearer <admin token>` when a token is configured.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let settings = state.app.settings();
    let Some(token) = &settings.admin.token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) {
        Ok(())
    } else {
        let mut response = detail(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs the admin bearer token",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer".parse().expect("static header value"),
        );
        Err(Box::new(response))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
