//! A mock of the external API on loopback: OpenAI-style chat completions (buffered JSON or an
//! SSE stream), `GET /v1/models`, a slow endpoint, and a hidden quota it enforces without
//! telling the client. It counts every arrival, every violation (a request beyond the quota),
//! and remembers the headers it was sent.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;

/// The hidden quota: at most `limit` accepted requests in any `window` (strict sliding window).
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub limit: usize,
    pub window: Duration,
}

/// How the mock says "too many requests".
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitStyle {
    /// NVIDIA's: `{"status":429,"title":"Too Many Requests"}` without `Retry-After`.
    Nvidia,
    /// A 429 with `Retry-After: N` seconds.
    RetryAfter(u64),
    /// OpenAI's billing 429 (`insufficient_quota`): not a rate limit.
    InsufficientQuota,
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    pub path: String,
    pub status: u16,
    pub client: Option<String>,
    pub authorization: Option<String>,
    pub host: Option<String>,
    pub body_len: usize,
}

pub struct MockState {
    quota: Mutex<Option<Quota>>,
    style: Mutex<LimitStyle>,
    accepted: Mutex<VecDeque<Instant>>,
    arrivals: Mutex<Vec<Arrival>>,
    /// The next N chat requests get a 429 whatever the quota says.
    fail_next: AtomicUsize,
    pub streams_finished: AtomicUsize,
}

impl MockState {
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Requests answered 429 because of the quota (or `fail_next`).
    pub fn violations(&self) -> usize {
        self.arrivals().iter().filter(|a| a.status == 429).count()
    }

    /// Chat requests accepted in `[from, to)`.
    pub fn accepted_between(&self, from: Instant, to: Instant) -> usize {
        self.arrivals()
            .iter()
            .filter(|a| {
                a.status == 200 && a.at >= from && a.at < to && a.path.starts_with("/v1/chat")
            })
            .count()
    }

    pub fn violations_between(&self, from: Instant, to: Instant) -> usize {
        self.arrivals()
            .iter()
            .filter(|a| a.status == 429 && a.at >= from && a.at < to)
            .count()
    }

    pub fn set_quota(&self, quota: Option<Quota>) {
        *self.quota.lock().unwrap() = quota;
    }

    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Takes a quota slot for an arrival now; false means the request is over the quota.
    fn admit(&self, at: Instant) -> bool {
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return false;
        }
        let Some(quota) = *self.quota.lock().unwrap() else {
            return true;
        };
        let mut accepted = self.accepted.lock().unwrap();
        while accepted
            .front()
            .is_some_and(|t| at.duration_since(*t) >= quota.window)
        {
            accepted.pop_front();
        }
        if accepted.len() >= quota.limit {
            false
        } else {
            accepted.push_back(at);
            true
        }
    }

    fn record(&self, at: Instant, path: &str, status: u16, headers: &HeaderMap, body_len: usize) {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        self.arrivals.lock().unwrap().push(Arrival {
            at,
            path: path.to_string(),
            status,
            client: header("x-mock-client"),
            authorization: header("authorization"),
            host: header("host"),
            body_len,
        });
    }
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    pub state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    /// Starts a plain-HTTP mock on a free loopback port.
    pub async fn start(quota: Option<Quota>, style: LimitStyle) -> MockUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (state, app) = Self::app(quota, style);
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        MockUpstream { addr, state, task }
    }

    /// Starts a TLS mock on a free loopback port, serving `cert` for `localhost`.
    pub async fn start_tls(identity: &super::tls::TestIdentity) -> MockUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, app) = Self::app(None, LimitStyle::Nvidia);
        let tls = super::tls::TlsListener::new(listener, identity.server_config());
        let task = tokio::spawn(async move {
            axum::serve(tls, app).await.unwrap();
        });
        MockUpstream { addr, state, task }
    }

    fn app(quota: Option<Quota>, style: LimitStyle) -> (Arc<MockState>, Router) {
        let state = Arc::new(MockState {
            quota: Mutex::new(quota),
            style: Mutex::new(style),
            accepted: Mutex::new(VecDeque::new()),
            arrivals: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
            streams_finished: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .route("/slow", get(slow))
            .fallback(any(echo))
            .with_state(state.clone());
        (state, app)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn too_many(style: LimitStyle) -> Response {
    match style {
        LimitStyle::Nvidia => (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json")],
            r#"{"status":429,"title":"Too Many Requests"}"#,
        )
            .into_response(),
        LimitStyle::RetryAfter(secs) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("retry-after", &secs.to_string())],
            r#"{"status":429,"title":"Too Many Requests"}"#,
        )
            .into_response(),
        LimitStyle::InsufficientQuota => (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json")],
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota","param":null}}"#,
        )
            .into_response(),
    }
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    let request: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    if !state.admit(at) {
        state.record(at, "/v1/chat/completions", 429, &headers, body.len());
        let style = *state.style.lock().unwrap();
        return too_many(style);
    }
    state.record(at, "/v1/chat/completions", 200, &headers, body.len());
    if request["stream"].as_bool() == Some(true) {
        let chunks = request["chunks"].as_u64().unwrap_or(5);
        let delay = Duration::from_millis(request["chunk_delay_ms"].as_u64().unwrap_or(100));
        let done = state.clone();
        let stream = async_stream(chunks, delay, done);
        return Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let answer = serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "model": "mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]
    });
    ([("content-type", "application/json")], answer.to_string()).into_response()
}

/// SSE chunks `data: {...}` with a delay before each, then `data: [DONE]`.
fn async_stream(
    chunks: u64,
    delay: Duration,
    state: Arc<MockState>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(0u64, move |i| {
        let state = state.clone();
        async move {
            if i > chunks {
                state.streams_finished.fetch_add(1, Ordering::SeqCst);
                return None;
            }
            let event = if i == chunks {
                "data: [DONE]\n\n".to_string()
            } else {
                if i > 0 {
                    tokio::time::sleep(delay).await;
                }
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"chunk{i}\"}}}}]}}\n\n")
            };
            Some((Ok(Bytes::from(event)), i + 1))
        }
    })
}

async fn models(State(state): State<Arc<MockState>>, headers: HeaderMap) -> Response {
    state.record(Instant::now(), "/v1/models", 200, &headers, 0);
    (
        [("content-type", "application/json")],
        r#"{"object":"list","data":[{"id":"mock"}]}"#,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct SlowQuery {
    ms: u64,
}

async fn slow(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Query(q): Query<SlowQuery>,
) -> Response {
    state.record(Instant::now(), "/slow", 200, &headers, 0);
    tokio::time::sleep(Duration::from_millis(q.ms)).await;
    "slow".into_response()
}

async fn echo(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    state.record(Instant::now(), uri.path(), 200, &headers, body.len());
    format!("echo {}", uri.path()).into_response()
}
