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

use super::routes::{authorize, detail};
use super::AdminState;
use crate::app::{ChangeReport, ChangeRequest, ChangeSource};
use crate::config::{ConfigError, Overrides, RouteSettings, Settings, LIVE_FIELDS};

const MASK: &str = "***";

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

fn route_json(r: &RouteSettings) -> Value {
    json!({
        "path_prefix": r.path_prefix,
        "upstream_url": r.upstream.to_string(),
        "passthrough": r.is_passthrough(),
        "rate_rpm": r.bucket.as_ref().map(|b| b.base_rpm),
        "bucket_capacity": r.bucket.as_ref().map(|b| b.capacity),
    })
}

/// The configuration in force with every default filled in and secrets masked.
fn effective(settings: &Settings) -> Value {
    let bucket = settings
        .default_route
        .bucket
        .as_ref()
        .expect("the default route always has a bucket");
    let a = &bucket.retreat;
    let u = &settings.upstream;
    let s = &settings.server;
    json!({
        "listen_host": settings.listen_host.to_string(),
        "listen_port": settings.listen_port,
        "metrics_port": settings.metrics_port,
        "upstream_url": settings.default_route.upstream.to_string(),
        "rate_rpm": bucket.base_rpm,
        "bucket_capacity": bucket.capacity,
        "request_timeout": secs(settings.request_timeout),
        "queue_max_size": bucket.queue_max,
        "low_priority_timeout": secs(settings.low_priority_timeout),
        "fallback_enabled_passthrough": settings.fallback_passthrough,
        "log_level": settings.log_level,
        "adaptive": {
            "window": secs(a.window),
            "retreat_threshold": a.threshold,
            "decrease_factor": a.decrease_factor,
            "floor_fraction": a.floor_fraction,
            "quiet_period": secs(a.quiet_period),
            "recover_step": a.recover_step,
            "recover_interval": secs(a.recover_interval),
            "ceiling_headroom": a.ceiling_headroom,
            "probe_interval": secs(a.probe_interval),
            "safety_margin": a.safety_margin,
            "max_replays": settings.max_replays,
        },
        "upstream": {
            "api_key": u.api_key.as_ref().map(|_| MASK),
            "connect_timeout": secs(u.connect_timeout),
            "read_timeout": secs(u.read_timeout),
            "idle_timeout": secs(u.idle_timeout),
            "dns_ttl": secs(u.dns_ttl),
            "ca_file": u.ca_file,
            "headers": u.headers.iter().map(|(k, _)| (k.to_string(), Value::from(MASK))).collect::<serde_json::Map<_, _>>(),
        },
        "routes": settings.routes.iter().map(route_json).collect::<Vec<_>>(),
        "admin": {
            "listen_host": settings.admin.listen_host.to_string(),
            "token": settings.admin.token.as_ref().map(|_| MASK),
        },
        "server": {
            "threads": s.threads,
            "grace_period": secs(s.grace_period),
            "graceful_shutdown_timeout": secs(s.graceful_shutdown_timeout),
            "pid_file": s.pid_file,
            "upgrade_sock": s.upgrade_sock,
        },
        "state_dir": settings.state_dir.as_ref().map(|p| p.display().to_string()),
    })
}

pub(crate) async fn show(State(state): State<Arc<AdminState>>) -> Response {
    let layers = state.app.layers();
    let settings = state.app.settings();
    Json(json!({
        "source": layers.path.as_deref().unwrap_or("(embedded default)"),
        "config": effective(&settings),
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

pub(crate) async fn patch(State(state): State<Arc<AdminState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = authorize(&state, &headers) {
        return denied;
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return detail(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")),
    };
    let overrides = match Overrides::from_json(&value) {
        Ok(o) => o,
        Err(errors) => return rejected(&errors),
    };
    match state.app.change(ChangeSource::AdminConfig, ChangeRequest::Patch(overrides)) {
        Ok(report) => applied(report),
        Err(errors) => rejected(&errors),
    }
}

pub(crate) async fn clear_overrides(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&state, &headers) {
        return denied;
    }
    match state.app.change(ChangeSource::AdminConfig, ChangeRequest::ClearOverrides) {
        Ok(report) => applied(report),
        Err(errors) => rejected(&errors),
    }
}

pub(crate) async fn reload(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&state, &headers) {
        return denied;
    }
    match state.app.change(ChangeSource::AdminReload, ChangeRequest::Reload) {
        Ok(report) => applied(report),
        Err(errors) => rejected(&errors),
    }
}
