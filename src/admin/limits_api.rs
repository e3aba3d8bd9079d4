//! `POST /api/admin/limits/reset`: forgets what a route's limiter learned of a key, a model,
//! or both, so that a lane stuck below what the upstream now grants starts again from its base
//! rate. The same guard as every mutating endpoint (Host, Origin, JSON body, admin token).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::guard::{detail, guard_mutation};
use super::AdminState;

/// What to reset: the route (`default` unless named), and a key's name, a model id, both, or
/// neither (everything the route learned).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetRequest {
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

pub(crate) async fn reset(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(answer) = guard_mutation(&state, &headers, true) {
        return *answer;
    }
    let request: ResetRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ResetRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return detail(
                    StatusCode::BAD_REQUEST,
                    format!("expected {{\"route\", \"key\", \"model\"}} (each optional): {e}"),
                )
            }
        }
    };
    let table = state.app.table();
    let name = request.route.as_deref().unwrap_or("default");
    let Some(route) = table.all().find(|r| r.name() == name) else {
        return detail(StatusCode::NOT_FOUND, format!("no route is named {name:?}"));
    };
    let Some(gate) = &route.gate else {
        return detail(
            StatusCode::BAD_REQUEST,
            format!("route {name:?} is a passthrough route: it learns nothing"),
        );
    };
    match gate.reset_learning(request.key.as_deref(), request.model.as_deref()) {
        Ok(done) => {
            log::info!("admin reset of route {name}: {}", done.join(", "));
            Json(json!({"status": "ok", "route": name, "reset": done})).into_response()
        }
        Err(e) => detail(StatusCode::NOT_FOUND, e.to_string()),
    }
}
