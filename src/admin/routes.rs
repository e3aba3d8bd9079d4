//! Admin routes: metrics, health, status and the dashboard stream; the config API is in
//! `config_api`, the dashboard page in `dashboard`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{config_api, dashboard, limits_api, AdminState};

/// Largest request body the admin API accepts (config patches are tiny).
const BODY_LIMIT: usize = 64 * 1024;

pub(crate) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/status", get(status))
        .route("/api/dashboard/stream", get(stream))
        .route("/api/dashboard/history", get(history))
        .route("/", get(dashboard::page))
        .route("/api/dashboard", get(dashboard::page))
        .route("/static/vendor/uplot/{file}", get(dashboard::vendor))
        .route(
            "/api/admin/config",
            get(config_api::show).post(config_api::patch),
        )
        .route(
            "/api/admin/config/overrides",
            delete(config_api::clear_overrides),
        )
        .route("/api/admin/reload", post(config_api::reload))
        .route("/api/admin/limits/reset", post(limits_api::reset))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    // Gauges are refreshed by the sampler every second; refresh them for this scrape too.
    let _ = state.snapshot();
    // The proxy's connections are counted by its slots; the gauges show them as they are.
    let (metrics, slots) = (&state.app.metrics, &state.proxy_slots);
    metrics.connections_open.set(slots.open() as i64);
    metrics.connections_idle.set(slots.idle() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.app.metrics.render(),
    )
        .into_response()
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": "draining"})),
        )
            .into_response();
    }
    let slots = &state.proxy_slots;
    if !slots.can_accept() {
        // Every connection busy and none idle to close for room: a new client is refused.
        let reason = format!(
            "server.max_connections ({}) connections open, none idle",
            slots.max()
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": reason})),
        )
            .into_response();
    }
    if slots.open() >= slots.max() {
        // At the cap with some idle: the listener accepts, and a probe connection would only
        // close an idle client's connection to make room for itself.
        return Json(json!({"status": "ready"})).into_response();
    }
    let probe = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(state.app.settings().proxy_probe_addr()),
    )
    .await;
    match probe {
        Ok(Ok(_)) => Json(json!({"status": "ready"})).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": "proxy listener is not accepting connections"})),
        )
            .into_response(),
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.snapshot_json(),
    )
        .into_response()
}

/// The last five minutes, one sample per second, oldest first.
async fn history(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.history_json(),
    )
        .into_response()
}

/// Whether a stream request asks for the history first (`?history=1` or `?history=true`).
fn wants_history(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "history" | "history=1" | "history=true"))
    })
}

/// One `data: <snapshot>` event per second per subscriber, starting with the current one;
/// ends when the sidecar shuts down. With `?history=1` an `event: history` with the last five
/// minutes comes first; without it the stream is exactly the Python service's, so scripts that
/// read every `data:` line as a snapshot keep working.
async fn stream(
    State(state): State<Arc<AdminState>>,
    RawQuery(query): RawQuery,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    use futures_util::StreamExt;
    let mut rx = state.status.clone();
    rx.mark_changed();
    // The first snapshot is the newest at the time it is sent: its sample is the history's
    // last one or the next, never further ahead (the page skips samples it already has).
    let first = wants_history(query.as_deref())
        .then(|| Ok(Event::default().event("history").data(state.history_json())));
    let snapshots = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let json = rx.borrow_and_update().clone();
        Some((Ok(Event::default().data(&*json)), rx))
    });
    let events = futures_util::stream::iter(first).chain(snapshots);
    Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    )
}

#[cfg(test)]
mod tests {
    use super::wants_history;

    #[test]
    fn the_history_is_sent_first_only_when_asked_for() {
        for query in ["history=1", "history", "a=b&history=true"] {
            assert!(wants_history(Some(query)), "{query}");
        }
        for query in ["", "history=0", "history=false", "historyx=1", "x=history"] {
            assert!(!wants_history(Some(query)), "{query}");
        }
        assert!(!wants_history(None));
    }
}
