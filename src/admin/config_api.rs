//! The config API: the effective configuration (secrets masked, overrides marked), live
//! patches of the runtime fields, clearing the overrides, and reloading the file. Every change
//! goes through `App::change`, the same validate-and-swap path as a reload.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::guard::{detail, guard_mutation};
use super::AdminState;
use crate::app::{ChangeReport, ChangeRequest, ChangeSource};
use crate::config::{effective_view, ConfigError, Overrides, LIVE_FIELDS};

/// The keys the earlier Python service answered at the top level of `GET /api/admin/config`;
/// scripts read them there (`.rate_rpm`), so they stay, with its meaning.
pub(crate) const PYTHON_KEYS: [&str; 11] = [
    "listen_host",
    "listen_port",
    "metrics_port",
    "upstream_url",
    "rate_rpm",
    "bucket_capacity",
    "request_timeout",
    "queue_max_size",
    "low_priority_timeout",
    "fallback_enabled_passthrough",
    "log_level",
];

pub(crate) async fn show(State(state): State<Arc<AdminState>>) -> Response {
    let layers = state.app.layers();
    let table = state.app.table();
    let settings = &table.settings;
    let config = effective_view(settings);
    let mut answer = serde_json::Map::new();
    for key in PYTHON_KEYS {
        answer.insert(key.to_string(), config[key].clone());
    }
    // In the Python service `rate_rpm` was the rate in force, after any retreat.
    let mut base = config["rate_rpm"].clone();
    if let Some(gate) = &table.default.gate {
        let snapshot = gate.snapshot();
        answer.insert("rate_rpm".to_string(), json!(snapshot.effective_rpm));
        // With `rate_rpm: auto` the base is what the upstream stated (or 40 before it did).
        base = json!(snapshot.base_rpm);
    }
    answer.insert("base_rpm".to_string(), base);
    answer.insert(
        "source".to_string(),
        json!(layers.path.as_deref().unwrap_or("(embedded default)")),
    );
    answer.insert("config".to_string(), config);
    answer.insert("overrides".to_string(), json!(layers.overrides));
    answer.insert(
        "override_fields".to_string(),
        json!(layers.overrides.names()),
    );
    answer.insert("live_fields".to_string(), json!(LIVE_FIELDS));
    Json(Value::Object(answer)).into_response()
}

fn rejected(errors: &[ConfigError]) -> Response {
    let sentences: Vec<String> = errors.iter().map(ConfigError::sentence).collect();
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"detail": sentences.join("; "), "errors": sentences})),
    )
        .into_response()
}

fn applied(report: ChangeReport) -> Response {
    Json(json!({
        "status": "ok",
        "changed": report.changed,
        "restart_required": report.restart_required,
    }))
    .into_response()
}

pub(crate) async fn patch(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = guard_mutation(&state, &headers, true) {
        return *denied;
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return detail(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        }
    };
    let overrides = match Overrides::from_json(&value) {
        Ok(o) => o,
        Err(errors) => return rejected(&errors),
    };
    match state
        .app
        .change(ChangeSource::AdminConfig, ChangeRequest::Patch(overrides))
    {
        Ok(report) => applied(report),
        Err(errors) => rejected(&errors),
    }
}

pub(crate) async fn clear_overrides(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = guard_mutation(&state, &headers, false) {
        return *denied;
    }
    match state
        .app
        .change(ChangeSource::AdminConfig, ChangeRequest::ClearOverrides)
    {
        Ok(report) => applied(report),
        Err(errors) => rejected(&errors),
    }
}

pub(crate) async fn reload(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = guard_mutation(&state, &headers, true) {
        return *denied;
    }
    match state
        .app
        .change(ChangeSource::AdminReload, ChangeRequest::Reload)
    {
        Ok(report) => applied(report),
        Err(errors) => rejected(&errors),
    }
}
