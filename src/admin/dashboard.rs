//! The dashboard page and its vendored chart library, compiled into the binary.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../../static/dashboard.html");
const UPLOT_JS: &str = include_str!("../../static/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../static/vendor/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../static/vendor/uplot/LICENSE");

pub(crate) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

pub(crate) async fn vendor(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "uPlot.iife.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "uPlot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        "LICENSE" => (UPLOT_LICENSE, "text/plain; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}
