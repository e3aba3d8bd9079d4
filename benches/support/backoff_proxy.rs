//! The baseline of the adaptive matrix: a proxy that learns nothing. It forwards every
//! request at once; after an upstream 429 it backs the key off for a fixed time (no request
//! goes upstream until then) and sends the refused request again when the time is over, as
//! many times as it takes within the client's time. What a simple retrying gateway does,
//! beside which the sidecar's learning shows what it buys.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

struct Backoff {
    upstream: String,
    http: reqwest::Client,
    /// No request goes upstream before then.
    paused_until: Mutex<Option<Instant>>,
    backoff: Duration,
    give_up_after: Duration,
}

pub struct BackoffProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BackoffProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BackoffProxy {
    /// A proxy to `upstream` on a free loopback port, backing off `backoff` after each 429.
    pub async fn start(upstream: &str, backoff: Duration) -> BackoffProxy {
        let state = Arc::new(Backoff {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(256)
                .build()
                .expect("an HTTP client"),
            paused_until: Mutex::new(None),
            backoff,
            give_up_after: Duration::from_secs(300),
        });
        let app = Router::new()
            .route("/v1/chat/completions", axum::routing::post(forward))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        BackoffProxy { addr, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn forward(State(s): State<Arc<Backoff>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    loop {
        let pause = *s.paused_until.lock().unwrap();
        if let Some(until) = pause.filter(|u| *u > Instant::now()) {
            tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
        }
        let mut request = s
            .http
            .post(format!("{}/v1/chat/completions", s.upstream))
            .body(body.clone());
        for name in ["content-type", "x-client-id", "authorization"] {
            if let Some(v) = headers.get(name) {
                request = request.header(name, v);
            }
        }
        let answer = match request.send().await {
            Ok(a) => a,
            Err(_) => return StatusCode::BAD_GATEWAY.into_response(),
        };
        let status = answer.status().as_u16();
        if status == 429 && started.elapsed() + s.backoff < s.give_up_after {
            let until = Instant::now() + s.backoff;
            let mut paused = s.paused_until.lock().unwrap();
            if paused.is_none_or(|p| p < until) {
                *paused = Some(until);
            }
            continue;
        }
        let bytes = answer.bytes().await.unwrap_or_default();
        return (StatusCode::from_u16(status).unwrap(), bytes).into_response();
    }
}
