//! A mock of the external API on loopback: OpenAI-style chat completions (buffered JSON or an
//! SSE stream), `GET /v1/models`, a slow endpoint, and a hidden quota it enforces without
//! telling the client (strict sliding window, fixed window or token bucket). It counts every
//! arrival, every violation (a request beyond the quota) and the hits per API key, remembers
//! the headers it was sent, and answers on a control endpoint: `GET /_mock/stats`,
//! `POST /_mock/quota` (`{"limit": 10, "window_ms": 2000}`, or `null` for none) and
//! `POST /_mock/reset`. Used by the tests and, through `examples/mock_upstream.rs`, by the
//! benchmarks.

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

/// How the hidden quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// At most `limit` accepted requests in any interval of `window` (the strictest).
    SlidingWindow,
    /// At most `limit` per consecutive window, counted from the mock's start.
    FixedWindow,
    /// A bucket of `limit` tokens refilled at `limit` per `window`, starting full.
    TokenBucket,
}

/// The hidden quota.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub limit: usize,
    pub window: Duration,
    pub kind: QuotaKind,
}

impl Quota {
    pub fn sliding(limit: usize, window: Duration) -> Quota {
        Quota {
            limit,
            window,
            kind: QuotaKind::SlidingWindow,
        }
    }
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
    /// OpenAI-style headers on every answer: `x-ratelimit-remaining-requests` and
    /// `x-ratelimit-reset-requests` (time until the oldest request leaves the window).
    RateLimitHeaders,
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
    started: Instant,
    accepted: Mutex<VecDeque<Instant>>,
    /// Token bucket quota: (tokens, last refill).
    bucket: Mutex<(f64, Instant)>,
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

    /// The mock's clock origin.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn violations_between(&self, from: Instant, to: Instant) -> usize {
        self.arrivals()
            .iter()
            .filter(|a| a.status == 429 && a.at >= from && a.at < to)
            .count()
    }

    pub fn set_quota(&self, quota: Option<Quota>) {
        *self.quota.lock().unwrap() = quota;
        if let Some(q) = quota {
            *self.bucket.lock().unwrap() = (q.limit as f64, Instant::now());
        }
    }

    /// Forgets every arrival (the quota's own memory too).
    pub fn reset(&self) {
        self.arrivals.lock().unwrap().clear();
        self.accepted.lock().unwrap().clear();
        let limit = self.quota.lock().unwrap().map_or(0, |q| q.limit);
        *self.bucket.lock().unwrap() = (limit as f64, Instant::now());
    }

    /// Counts for the control endpoint.
    pub fn stats(&self) -> serde_json::Value {
        let arrivals = self.arrivals();
        let mut per_key: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for a in &arrivals {
            let key = a
                .authorization
                .clone()
                .unwrap_or_else(|| "(none)".to_string());
            let entry = per_key.entry(key).or_default();
            entry.0 += 1;
            if a.status == 429 {
                entry.1 += 1;
            }
        }
        let since_start = |t: Instant| t.duration_since(self.started).as_millis() as u64;
        serde_json::json!({
            "violation_ms": arrivals.iter().filter(|a| a.status == 429).map(|a| since_start(a.at)).collect::<Vec<_>>(),
            "arrivals": arrivals.len(),
            "accepted": arrivals.iter().filter(|a| a.status == 200).count(),
            "violations": arrivals.iter().filter(|a| a.status == 429).count(),
            "per_key": per_key
                .into_iter()
                .map(|(k, (hits, violations))| (k, serde_json::json!({"hits": hits, "violations": violations})))
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// Requests still allowed now and the time until the next slot frees (for headers).
    fn headroom(&self, at: Instant) -> Option<(usize, Duration)> {
        let quota = (*self.quota.lock().unwrap())?;
        let accepted = self.accepted.lock().unwrap();
        Some(match quota.kind {
            QuotaKind::SlidingWindow => {
                let in_window: Vec<&Instant> = accepted
                    .iter()
                    .filter(|t| at.duration_since(**t) < quota.window)
                    .collect();
                let reset = in_window
                    .first()
                    .map_or(Duration::ZERO, |t| quota.window - at.duration_since(**t));
                (quota.limit.saturating_sub(in_window.len()), reset)
            }
            QuotaKind::FixedWindow => {
                let window = quota.window.as_nanos().max(1);
                let elapsed = at.duration_since(self.started).as_nanos();
                let index = |t: Instant| t.duration_since(self.started).as_nanos() / window;
                let used = accepted
                    .iter()
                    .filter(|t| index(**t) == elapsed / window)
                    .count();
                let reset = Duration::from_nanos((window - elapsed % window) as u64);
                (quota.limit.saturating_sub(used), reset)
            }
            QuotaKind::TokenBucket => {
                let (tokens, last) = *self.bucket.lock().unwrap();
                let rate = quota.limit as f64 / quota.window.as_secs_f64();
                let tokens =
                    (tokens + at.duration_since(last).as_secs_f64() * rate).min(quota.limit as f64);
                let reset = if tokens >= 1.0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64((1.0 - tokens) / rate)
                };
                (tokens.floor() as usize, reset)
            }
        })
    }

    /// The next `n` chat requests get a 429 whatever the quota says.
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
        let allowed = match quota.kind {
            QuotaKind::SlidingWindow => {
                while accepted
                    .front()
                    .is_some_and(|t| at.duration_since(*t) >= quota.window)
                {
                    accepted.pop_front();
                }
                accepted.len() < quota.limit
            }
            QuotaKind::FixedWindow => {
                let index = |t: Instant| {
                    t.duration_since(self.started).as_nanos() / quota.window.as_nanos().max(1)
                };
                let now_index = index(at);
                accepted.iter().filter(|t| index(**t) == now_index).count() < quota.limit
            }
            QuotaKind::TokenBucket => {
                let mut bucket = self.bucket.lock().unwrap();
                let rate = quota.limit as f64 / quota.window.as_secs_f64();
                let (tokens, last) = *bucket;
                let tokens =
                    (tokens + at.duration_since(last).as_secs_f64() * rate).min(quota.limit as f64);
                let allowed = tokens >= 1.0;
                *bucket = (if allowed { tokens - 1.0 } else { tokens }, at);
                allowed
            }
        };
        if allowed {
            accepted.push_back(at);
            // Keep memory bounded for long runs; only the sliding window needs old entries.
            while accepted.len() > 100_000 {
                accepted.pop_front();
            }
        }
        allowed
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
        Self::start_on(0, quota, style).await
    }

    /// Starts a plain-HTTP mock on a given loopback port (0: any free one).
    pub async fn start_on(port: u16, quota: Option<Quota>, style: LimitStyle) -> MockUpstream {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
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
            started: Instant::now(),
            accepted: Mutex::new(VecDeque::new()),
            bucket: Mutex::new((quota.map_or(0.0, |q| q.limit as f64), Instant::now())),
            arrivals: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
            streams_finished: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .route("/slow", get(slow))
            .route("/_mock/stats", get(stats))
            .route("/_mock/quota", post(set_quota))
            .route("/_mock/reset", post(reset))
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
        LimitStyle::RateLimitHeaders => (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("x-ratelimit-remaining-requests", "0")],
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded","param":null}}"#,
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
    let style = *state.style.lock().unwrap();
    if !state.admit(at) {
        state.record(at, "/v1/chat/completions", 429, &headers, body.len());
        let mut response = too_many(style);
        if style == LimitStyle::RateLimitHeaders {
            add_ratelimit_headers(&state, at, &mut response);
        }
        return response;
    }
    state.record(at, "/v1/chat/completions", 200, &headers, body.len());
    if style == LimitStyle::RateLimitHeaders && request["stream"].as_bool() != Some(true) {
        let answer = serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion", "model": "mock",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]});
        let mut response =
            ([("content-type", "application/json")], answer.to_string()).into_response();
        add_ratelimit_headers(&state, at, &mut response);
        return response;
    }
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

/// OpenAI-style `x-ratelimit-*` headers describing the quota as of `at`.
fn add_ratelimit_headers(state: &MockState, at: Instant, response: &mut Response) {
    if let Some((remaining, reset)) = state.headroom(at) {
        let headers = response.headers_mut();
        headers.insert("x-ratelimit-remaining-requests", remaining.into());
        let reset = format!("{}ms", reset.as_millis().max(1));
        headers.insert("x-ratelimit-reset-requests", reset.parse().unwrap());
    }
}

async fn stats(State(state): State<Arc<MockState>>) -> Response {
    axum::Json(state.stats()).into_response()
}

#[derive(serde::Deserialize)]
struct QuotaChange {
    limit: usize,
    window_ms: u64,
    #[serde(default)]
    kind: Option<String>,
}

async fn set_quota(State(state): State<Arc<MockState>>, body: Bytes) -> Response {
    let change: Option<QuotaChange> = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let quota = change.map(|c| Quota {
        limit: c.limit,
        window: Duration::from_millis(c.window_ms),
        kind: match c.kind.as_deref() {
            Some("fixed") => QuotaKind::FixedWindow,
            Some("bucket") => QuotaKind::TokenBucket,
            _ => QuotaKind::SlidingWindow,
        },
    });
    state.set_quota(quota);
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn reset(State(state): State<Arc<MockState>>) -> Response {
    state.reset();
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}
