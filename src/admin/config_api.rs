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

use super::routes::{detail, guard_mutation};
use super::AdminState;
use crate::app::{ChangeReport, ChangeRequest, ChangeSource};
use crate::config::{effective_view, ConfigError, Overrides, LIVE_FIELDS};

pub(crate) async fn show(State(state): State<Arc<AdminState>>) -> Response {
    let layers = state.app.layers();
    let settings = state.app.settings();
    Json(json!({
        "source": layers.path.as_deref().unwrap_or("(embedded default)"),
        "config": effective_view(&settings),
        "overrides": layers.overrides,
        "override_fields": layers.overrides.names(),
        "live_fields": LIVE_FIELDS,
    }))
    .into_response()
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
