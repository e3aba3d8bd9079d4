//! A mock of the external API on loopback: OpenAI-style chat completions (buffered JSON or an
//! SSE stream), `GET /v1/models`, a slow endpoint, and a hidden quota it enforces without
//! telling the client (strict sliding window, fixed window or token bucket). It counts every
//! arrival, every violation (a request beyond the quota) and the hits per API key, remembers
//! the headers it was sent, and answers on a control endpoint: `GET /_mock/stats`,
//! `POST /_mock/quota` (`{"limit": 10, "window_ms": 2000}`, or `null` for none) and
//! `POST /_mock/reset`. Used by the tests and, through `examples/mock_upstream.rs`, by the
//! benchmarks.
//!
//! Per model (set through `MockState`): a rate quota of its own, counted per key
//! (`set_model_quota`; a request it refuses takes no slot of the key's quota), and a lockout
//! (`lock_model`: every request of the model refused for a while, with or without a
//! `Retry-After`, the body saying "try again in N hours" either way). The quota may be
//! stated in headers on every chat answer (`state_limits`: OpenAI's `x-ratelimit-*` or
//! Anthropic's `anthropic-ratelimit-requests-*`), truthfully or with a value the test chooses.
//! NVIDIA's worker-capacity error comes as a 429 (`worker_busy_next`), a 503
//! (`worker_503_next`) or as the first event of a 200 stream (`worker_in_stream_next`).
//!
//! For key pools and per-model limits (set through `MockState`, not the control endpoint):
//! a key (the `Authorization: Bearer` value) may have a quota of its own
//! (`set_key_quota`; keys without one share the global quota), a key may be revoked
//! (`revoke_key`: 401 on every request), and a model may have a concurrency limit and an
//! answer delay (`set_model_limit`: the excess gets NVIDIA's worker-capacity 429).
//!
//! `MockUpstream::start` serves through axum, so its answers are framed however hyper frames
//! them. `MockUpstream::start_framed` serves the same state through a hand-written HTTP/1.1
//! server instead, because real upstreams frame their answers (429s above all) in ways hyper
//! never does, and the proxy has to absorb a 429 whatever its framing. The [`Framing`]
//! variants, applied to 429 answers and to buffered chat answers:
//!
//! - `OneWrite`: status line, headers and body in one write (one TCP segment).
//! - `Split { delay }`: the head, then after `delay` the body (Content-Length framing), as
//!   Python's `http.server` does.
//! - `Chunked { delay }`: `Transfer-Encoding: chunked`; the head, then after `delay` the body
//!   in one or two chunks and the last chunk.
//! - `BodyNever`: a 429 head with a Content-Length whose body never comes; the connection
//!   stays open for 60 s. Successes go out as `OneWrite`.
//!
//! The raw server answers only `POST /v1/chat/completions` (a `stream: true` request gets
//! buffered JSON) and `GET /v1/models`, 404 to anything else. It keeps connections alive and
//! reads Content-Length and chunked request bodies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

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
    /// NVIDIA's overloaded worker: `{"status":429,"title":"Too Many Requests","detail":
    /// "ResourceExhausted: Worker local total request limit reached (33/32)"}`, no
    /// `Retry-After`. It looks like a quota 429 but says nothing about the quota.
    WorkerCapacity,
    /// A 429 with `retry-after-ms: N`, the millisecond hint some gateways send instead of
    /// (or before) `Retry-After`.
    RetryAfterMs(u64),
}

/// How the raw server (`MockUpstream::start_framed`) puts an answer on the wire. Applies to
/// 429 answers and to buffered chat answers; `/v1/models` and 404s always go out in one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Status line, headers and body in a single write: one TCP segment.
    OneWrite,
    /// The head in one write, then after `delay` the body in another (Content-Length
    /// framing), as Python's `http.server` answers: the head can arrive alone.
    Split { delay: Duration },
    /// `Transfer-Encoding: chunked`: the head, then after `delay` the body as one or two
    /// chunks, then `0\r\n\r\n`.
    Chunked { delay: Duration },
    /// A 429 head with a Content-Length, and then no body: the connection stays open for
    /// 60 s and closes. Only 429s; successes go out as `OneWrite`.
    BodyNever,
}

/// The body of `MockState::unavailable_next` answers.
const UNAVAILABLE_BODY: &str = r#"{"message":"ResourceExhausted: All workers are busy, please retry later","type":"Service Unavailable","code":503}"#;

/// The body of `LimitStyle::WorkerCapacity` and of `MockState::worker_busy_next` answers.
const WORKER_CAPACITY_BODY: &str = r#"{"status":429,"title":"Too Many Requests","detail":"ResourceExhausted: Worker local total request limit reached (33/32)"}"#;

/// How the mock states its quota in headers (`MockState::state_limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stating {
    /// `x-ratelimit-limit-requests`, `-remaining-requests`, `-reset-requests` (a duration).
    OpenAi,
    /// `anthropic-ratelimit-requests-limit`, `-remaining`, `-reset` (RFC 3339).
    Anthropic,
}

/// A model's lockout (`MockState::lock_model`).
#[derive(Debug, Clone, Copy)]
struct Lockout {
    until: Instant,
    retry_after_header: bool,
}

/// The body of the 401 a revoked key gets (`MockState::revoke_key`).
const REVOKED_BODY: &str = r#"{"error":{"message":"invalid key","type":"authentication_error"}}"#;

/// FNV-1a 64 of `bytes`: what `Arrival::body_checksum` holds, so a test can check that the
/// body it sent arrived byte for byte without the mock keeping every body.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
    /// `fnv1a64` of the request body.
    pub body_checksum: u64,
    /// Answered 429 by `MockState::worker_busy_next` or by a model's concurrency limit
    /// (`MockState::set_model_limit`), not by the quota: not a violation.
    pub worker_busy: bool,
    /// The JSON body's `"model"`, when there is one.
    pub model: Option<String>,
    /// Refused by the model's own quota or lockout, not by the key's quota.
    pub by_model: bool,
    /// Refused by the token quota (`MockState::set_token_quota`).
    pub by_tokens: bool,
}

/// The prompt tokens the mock counts for a request body: its bytes over 4.
pub fn prompt_tokens(body_len: usize) -> u64 {
    (body_len / 4) as u64
}

/// The completion tokens of every answer.
pub const COMPLETION_TOKENS: u64 = 2;

/// Each model's quota, and what it remembers per key.
type ModelQuotas = HashMap<String, (Quota, HashMap<String, QuotaBook>)>;

pub struct MockState {
    quota: Mutex<Option<Quota>>,
    style: Mutex<LimitStyle>,
    started: Instant,
    /// What the global quota remembers (requests whose key has no quota of its own).
    book: Mutex<QuotaBook>,
    /// Keys (the bearer value) with a quota of their own, and what each remembers.
    key_quotas: Mutex<HashMap<String, (Quota, QuotaBook)>>,
    /// Keys answered 401 on every request.
    revoked: Mutex<HashSet<String>>,
    /// Models with a concurrency limit and an answer delay.
    models: Arc<Mutex<HashMap<String, ModelBook>>>,
    arrivals: Mutex<Vec<Arrival>>,
    /// The next N chat requests get a 429 whatever the quota says.
    fail_next: AtomicUsize,
    /// The next N chat requests get the worker-capacity 429 whatever the quota says.
    worker_busy_next: AtomicUsize,
    /// The next N chat requests get a 503 "all workers are busy".
    unavailable_next: AtomicUsize,
    /// The next N chat requests get a 503 with the worker-capacity detail.
    worker_503_next: AtomicUsize,
    /// The next N streamed chat requests get a 200 whose first event is the capacity error.
    worker_in_stream_next: AtomicUsize,
    /// Models with a rate quota of their own, counted per key (the bearer value, "" without).
    model_quotas: Mutex<ModelQuotas>,
    /// Models refused outright for a while.
    lockouts: Mutex<HashMap<String, Lockout>>,
    /// How the quota is stated in headers, and the limit to state instead of the true one.
    stating: Mutex<Option<(Stating, Option<String>)>>,
    pub streams_finished: AtomicUsize,
    /// A quota of prompt tokens (`prompt_tokens`) per window, per key.
    token_quota: Mutex<Option<(u64, Duration)>>,
    /// What each key's token quota remembers: (when, tokens) of accepted requests.
    token_books: Mutex<HashMap<String, VecDeque<(Instant, u64)>>>,
    /// Models that answer a request carrying `stream_options` with a 400.
    no_stream_options: Mutex<HashSet<String>>,
    /// The token quota is stated in OpenAI's headers (`x-ratelimit-*-tokens`).
    states_tokens: AtomicBool,
}

/// What one quota remembers: the accepted arrivals (sliding and fixed windows) and the token
/// bucket (tokens, last refill).
struct QuotaBook {
    accepted: VecDeque<Instant>,
    bucket: (f64, Instant),
}

impl QuotaBook {
    fn new(quota: Option<Quota>) -> QuotaBook {
        QuotaBook {
            accepted: VecDeque::new(),
            bucket: (quota.map_or(0.0, |q| q.limit as f64), Instant::now()),
        }
    }

    /// Takes a slot of `quota` for an arrival at `at`; false means it is over the quota.
    fn admit(&mut self, quota: Quota, started: Instant, at: Instant) -> bool {
        let accepted = &mut self.accepted;
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
                    t.duration_since(started).as_nanos() / quota.window.as_nanos().max(1)
                };
                let now_index = index(at);
                accepted.iter().filter(|t| index(**t) == now_index).count() < quota.limit
            }
            QuotaKind::TokenBucket => {
                let rate = quota.limit as f64 / quota.window.as_secs_f64();
                let (tokens, last) = self.bucket;
                let tokens =
                    (tokens + at.duration_since(last).as_secs_f64() * rate).min(quota.limit as f64);
                let allowed = tokens >= 1.0;
                self.bucket = (if allowed { tokens - 1.0 } else { tokens }, at);
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

    /// Requests `quota` still allows at `at` and the time until the next slot frees.
    fn headroom(&self, quota: Quota, started: Instant, at: Instant) -> (usize, Duration) {
        let accepted = &self.accepted;
        match quota.kind {
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
                let elapsed = at.duration_since(started).as_nanos();
                let index = |t: Instant| t.duration_since(started).as_nanos() / window;
                let used = accepted
                    .iter()
                    .filter(|t| index(**t) == elapsed / window)
                    .count();
                let reset = Duration::from_nanos((window - elapsed % window) as u64);
                (quota.limit.saturating_sub(used), reset)
            }
            QuotaKind::TokenBucket => {
                let (tokens, last) = self.bucket;
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
        }
    }
}

/// A model's concurrency limit, answer delay and requests in flight.
struct ModelBook {
    max_concurrency: usize,
    delay: Duration,
    in_flight: usize,
    /// The most requests in flight at once since the limit was set (or the last reset).
    peak: usize,
}

/// One in-flight request of a limited model; dropping it (the answer was sent, or the client
/// went away) frees its place.
struct ModelSlot {
    models: Arc<Mutex<HashMap<String, ModelBook>>>,
    model: String,
    delay: Duration,
}

impl Drop for ModelSlot {
    fn drop(&mut self) {
        if let Some(book) = self.models.lock().unwrap().get_mut(&self.model) {
            book.in_flight = book.in_flight.saturating_sub(1);
        }
    }
}

/// `when` in RFC 3339, UTC, whole seconds (as Anthropic's reset headers).
fn rfc3339(when: std::time::SystemTime) -> String {
    let secs = when
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The key of `Authorization: Bearer <key>`.
fn bearer_key(authorization: &str) -> Option<&str> {
    let (scheme, key) = authorization.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// The JSON body's `"model"`, if the body is a JSON object that has one.
fn model_of(body: &[u8]) -> Option<String> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value["model"].as_str().map(str::to_string)
}

impl MockState {
    fn new(quota: Option<Quota>, style: LimitStyle) -> Arc<MockState> {
        Arc::new(MockState {
            quota: Mutex::new(quota),
            style: Mutex::new(style),
            started: Instant::now(),
            book: Mutex::new(QuotaBook::new(quota)),
            key_quotas: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashSet::new()),
            models: Arc::new(Mutex::new(HashMap::new())),
            arrivals: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
            worker_busy_next: AtomicUsize::new(0),
            unavailable_next: AtomicUsize::new(0),
            worker_503_next: AtomicUsize::new(0),
            worker_in_stream_next: AtomicUsize::new(0),
            model_quotas: Mutex::new(HashMap::new()),
            lockouts: Mutex::new(HashMap::new()),
            stating: Mutex::new(None),
            streams_finished: AtomicUsize::new(0),
            token_quota: Mutex::new(None),
            token_books: Mutex::new(HashMap::new()),
            no_stream_options: Mutex::new(HashSet::new()),
            states_tokens: AtomicBool::new(false),
        })
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Requests answered 429 because of the quota (or `fail_next`); `worker_busy_next`
    /// rejections are not violations, since they say nothing about the quota.
    pub fn violations(&self) -> usize {
        self.arrivals().iter().filter(|a| a.is_violation()).count()
    }

    /// Requests answered with the worker-capacity 429 by `worker_busy_next`.
    pub fn worker_rejections(&self) -> usize {
        self.arrivals().iter().filter(|a| a.worker_busy).count()
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
            .filter(|a| a.is_violation() && a.at >= from && a.at < to)
            .count()
    }

    pub fn set_quota(&self, quota: Option<Quota>) {
        *self.quota.lock().unwrap() = quota;
        if let Some(q) = quota {
            self.book.lock().unwrap().bucket = (q.limit as f64, Instant::now());
        }
    }

    /// Gives requests sent with `Authorization: Bearer <key>` a quota of their own (their own
    /// accepted list, bucket and violations), or with `None` puts them back under the global
    /// quota. Keys without a quota of their own share the global one.
    pub fn set_key_quota(&self, key: &str, quota: Option<Quota>) {
        let mut keys = self.key_quotas.lock().unwrap();
        match quota {
            Some(q) => {
                keys.insert(key.to_string(), (q, QuotaBook::new(Some(q))));
            }
            None => {
                keys.remove(key);
            }
        }
    }

    /// From now on every request sent with `Authorization: Bearer <key>` gets a 401
    /// `{"error":{"message":"invalid key","type":"authentication_error"}}`, as an upstream
    /// answers a revoked API key (on chat, `/v1/models`, `/slow` and the echo fallback alike).
    /// Recorded with status 401: not a violation. `reset` does not undo it.
    pub fn revoke_key(&self, key: &str) {
        self.revoked.lock().unwrap().insert(key.to_string());
    }

    /// Chat requests whose JSON `"model"` is `model` are answered after `delay`, and at most
    /// `max_concurrency` of them may be in flight: the excess gets NVIDIA's worker-capacity
    /// 429 at once (counted by `worker_rejections`, not a violation, no quota slot taken). A
    /// stream holds its place until it ends.
    pub fn set_model_limit(&self, model: &str, max_concurrency: usize, delay: Duration) {
        let mut models = self.models.lock().unwrap();
        let in_flight = models.get(model).map_or(0, |m| m.in_flight);
        models.insert(
            model.to_string(),
            ModelBook {
                max_concurrency,
                delay,
                in_flight,
                peak: in_flight,
            },
        );
    }

    /// The most requests for `model` (set with `set_model_limit`) the mock ever had in
    /// flight at once; 0 for a model without a limit.
    pub fn model_peak_in_flight(&self, model: &str) -> usize {
        self.models.lock().unwrap().get(model).map_or(0, |m| m.peak)
    }

    /// Requests for `model` (set with `set_model_limit`) in flight now.
    pub fn model_in_flight(&self, model: &str) -> usize {
        self.models
            .lock()
            .unwrap()
            .get(model)
            .map_or(0, |m| m.in_flight)
    }

    /// Every arrival sent with `Authorization: Bearer <key>`.
    pub fn arrivals_for_key(&self, key: &str) -> Vec<Arrival> {
        self.arrivals()
            .into_iter()
            .filter(|a| a.key() == Some(key))
            .collect()
    }

    /// Chat requests sent with `key` and accepted.
    pub fn accepted_for_key(&self, key: &str) -> usize {
        self.arrivals_for_key(key)
            .iter()
            .filter(|a| a.status == 200 && a.path.starts_with("/v1/chat"))
            .count()
    }

    /// Requests sent with `key` and answered 429 by the quota (the key's own, or the global
    /// one for a key without its own).
    pub fn violations_for_key(&self, key: &str) -> usize {
        self.arrivals_for_key(key)
            .iter()
            .filter(|a| a.is_violation())
            .count()
    }

    /// Forgets every arrival (the quotas' own memory too, per key as well).
    pub fn reset(&self) {
        self.arrivals.lock().unwrap().clear();
        let quota = *self.quota.lock().unwrap();
        *self.book.lock().unwrap() = QuotaBook::new(quota);
        for (quota, book) in self.key_quotas.lock().unwrap().values_mut() {
            *book = QuotaBook::new(Some(*quota));
        }
        for book in self.models.lock().unwrap().values_mut() {
            book.peak = book.in_flight;
        }
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
            if a.is_violation() {
                entry.1 += 1;
            }
        }
        let since_start = |t: Instant| t.duration_since(self.started).as_millis() as u64;
        serde_json::json!({
            "violation_ms": arrivals.iter().filter(|a| a.is_violation()).map(|a| since_start(a.at)).collect::<Vec<_>>(),
            "arrivals": arrivals.len(),
            "accepted": arrivals.iter().filter(|a| a.status == 200).count(),
            "violations": arrivals.iter().filter(|a| a.is_violation()).count(),
            "worker_rejections": arrivals.iter().filter(|a| a.worker_busy).count(),
            "per_key": per_key
                .into_iter()
                .map(|(k, (hits, violations))| (k, serde_json::json!({"hits": hits, "violations": violations})))
                .collect::<serde_json::Map<_, _>>(),
        })
    }

    /// Requests still allowed now and the time until the next slot frees (for headers), under
    /// `key`'s own quota if it has one, else the global one.
    fn headroom(&self, key: Option<&str>, at: Instant) -> Option<(usize, Duration)> {
        if let Some(key) = key {
            if let Some((quota, book)) = self.key_quotas.lock().unwrap().get(key) {
                return Some(book.headroom(*quota, self.started, at));
            }
        }
        let quota = (*self.quota.lock().unwrap())?;
        Some(self.book.lock().unwrap().headroom(quota, self.started, at))
    }

    /// Requests for `model` also count against a quota of their own, per key; `None` removes
    /// it. A request the model's quota refuses gets the style's 429 and takes no slot of the
    /// key's quota.
    pub fn set_model_quota(&self, model: &str, quota: Option<Quota>) {
        let mut quotas = self.model_quotas.lock().unwrap();
        match quota {
            Some(q) => {
                quotas.insert(model.to_string(), (q, HashMap::new()));
            }
            None => {
                quotas.remove(model);
            }
        }
    }

    /// For `duration` from now every request for `model` gets a 429 whose body says "try
    /// again in N hours" (or minutes), with `Retry-After` when `retry_after_header`.
    pub fn lock_model(&self, model: &str, duration: Duration, retry_after_header: bool) {
        self.lockouts.lock().unwrap().insert(
            model.to_string(),
            Lockout {
                until: Instant::now() + duration,
                retry_after_header,
            },
        );
    }

    /// States the quota in headers on every chat answer, the true limit per minute or
    /// `limit` as given (any text: a test of hostile values).
    pub fn state_limits(&self, stating: Option<Stating>, limit: Option<&str>) {
        *self.stating.lock().unwrap() = stating.map(|s| (s, limit.map(str::to_string)));
    }

    /// The next `n` chat requests get a 503 with NVIDIA's worker-capacity detail.
    pub fn worker_503_next(&self, n: usize) {
        self.worker_503_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` streamed chat requests get a 200 whose first event is NVIDIA's
    /// worker-capacity error (the axum mock only: the raw one does not stream).
    pub fn worker_in_stream_next(&self, n: usize) {
        self.worker_in_stream_next.store(n, Ordering::SeqCst);
    }

    /// Requests for `model` refused by its own quota or lockout.
    pub fn model_refusals(&self, model: &str) -> usize {
        self.arrivals()
            .iter()
            .filter(|a| a.by_model && a.model.as_deref() == Some(model))
            .count()
    }

    /// Chat requests for `model` accepted in `[from, to)`.
    pub fn accepted_of_model_between(&self, model: &str, from: Instant, to: Instant) -> usize {
        self.arrivals()
            .iter()
            .filter(|a| {
                a.status == 200
                    && a.at >= from
                    && a.at < to
                    && a.model.as_deref() == Some(model)
                    && a.path.starts_with("/v1/chat")
            })
            .count()
    }

    /// The lockout answer for `model`, if it is locked now.
    fn lockout_answer(&self, model: Option<&str>, at: Instant) -> Option<Answer> {
        let lockout = *self.lockouts.lock().unwrap().get(model?)?;
        let left = lockout.until.checked_duration_since(at)?;
        let hours = left.as_secs_f64() / 3600.0;
        let words = if hours >= 1.0 {
            format!("{} hours", hours.ceil() as u64)
        } else {
            format!(
                "{} minutes",
                (left.as_secs_f64() / 60.0).ceil().max(1.0) as u64
            )
        };
        let body = format!(
            r#"{{"status":429,"title":"Too Many Requests","detail":"The model is rate limited for this account, try again in {words}"}}"#
        );
        let mut answer = Answer::json(429, body);
        if lockout.retry_after_header {
            answer.set_header("retry-after", left.as_secs().max(1).to_string());
        }
        Some(answer)
    }

    /// Takes a slot of `model`'s own quota under `key`; false when it is over that quota.
    fn admit_model(&self, model: Option<&str>, key: Option<&str>, at: Instant) -> bool {
        let Some(model) = model else { return true };
        let mut quotas = self.model_quotas.lock().unwrap();
        let Some((quota, books)) = quotas.get_mut(model) else {
            return true;
        };
        let quota = *quota;
        books
            .entry(key.unwrap_or("").to_string())
            .or_insert_with(|| QuotaBook::new(Some(quota)))
            .admit(quota, self.started, at)
    }

    /// The stated-limit headers on a chat answer, if the mock states its quota.
    fn add_stated(&self, key: Option<&str>, at: Instant, answer: &mut Answer) {
        let Some((stating, limit)) = self.stating.lock().unwrap().clone() else {
            return;
        };
        let quota = key
            .and_then(|k| self.key_quotas.lock().unwrap().get(k).map(|(q, _)| *q))
            .or(*self.quota.lock().unwrap());
        let Some(quota) = quota else { return };
        let (remaining, reset) = self
            .headroom(key, at)
            .unwrap_or((quota.limit, Duration::ZERO));
        let per_minute = quota.limit as f64 * 60.0 / quota.window.as_secs_f64();
        let limit = limit.unwrap_or_else(|| format!("{}", per_minute.round() as u64));
        match stating {
            Stating::OpenAi => {
                answer.set_header("x-ratelimit-limit-requests", limit);
                answer.set_header("x-ratelimit-remaining-requests", remaining.to_string());
                answer.set_header(
                    "x-ratelimit-reset-requests",
                    format!("{}ms", reset.as_millis().max(1)),
                );
            }
            Stating::Anthropic => {
                answer.set_header("anthropic-ratelimit-requests-limit", limit);
                answer.set_header(
                    "anthropic-ratelimit-requests-remaining",
                    remaining.to_string(),
                );
                let when = std::time::SystemTime::now() + reset;
                answer.set_header("anthropic-ratelimit-requests-reset", rfc3339(when));
            }
        }
    }

    /// At most `limit` prompt tokens (`prompt_tokens` of the body) in any `window`, per key;
    /// a request that would go over is answered 429 as the request quota would be.
    pub fn set_token_quota(&self, limit: u64, window: Duration) {
        *self.token_quota.lock().unwrap() = Some((limit, window));
    }

    /// States the token quota on chat answers (200s and its own 429s) in OpenAI's headers:
    /// `x-ratelimit-limit-tokens`, `-remaining-tokens`, `-reset-tokens`, and
    /// `x-ratelimit-remaining-requests: 1000` beside them.
    pub fn state_tokens(&self) {
        self.states_tokens.store(true, Ordering::SeqCst);
    }

    /// The token headers for `key` at `at`, when they are stated.
    fn add_token_headers(&self, key: Option<&str>, at: Instant, answer: &mut Answer) {
        if !self.states_tokens.load(Ordering::SeqCst) {
            return;
        }
        let Some((limit, window)) = *self.token_quota.lock().unwrap() else {
            return;
        };
        let books = self.token_books.lock().unwrap();
        let live: Vec<(Instant, u64)> = books
            .get(key.unwrap_or(""))
            .map(|b| {
                b.iter()
                    .copied()
                    .filter(|(t, _)| at.duration_since(*t) < window)
                    .collect()
            })
            .unwrap_or_default();
        let used: u64 = live.iter().map(|(_, n)| n).sum();
        let reset = live
            .first()
            .map_or(Duration::ZERO, |(t, _)| window - at.duration_since(*t));
        answer.set_header("x-ratelimit-limit-tokens", limit.to_string());
        answer.set_header(
            "x-ratelimit-remaining-tokens",
            limit.saturating_sub(used).to_string(),
        );
        answer.set_header(
            "x-ratelimit-reset-tokens",
            format!("{}ms", reset.as_millis().max(1)),
        );
        answer.set_header("x-ratelimit-remaining-requests", "1000".to_string());
    }

    /// `model` answers a request that carries `stream_options` with a 400.
    pub fn reject_stream_options(&self, model: &str) {
        self.no_stream_options
            .lock()
            .unwrap()
            .insert(model.to_string());
    }

    /// Whether `tokens` fit in `key`'s token quota at `at`.
    fn token_room(&self, key: Option<&str>, at: Instant, tokens: u64) -> bool {
        let Some((limit, window)) = *self.token_quota.lock().unwrap() else {
            return true;
        };
        let mut books = self.token_books.lock().unwrap();
        let book = books.entry(key.unwrap_or("").to_string()).or_default();
        while book
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) >= window)
        {
            book.pop_front();
        }
        book.iter().map(|(_, n)| n).sum::<u64>() + tokens <= limit
    }

    fn take_tokens(&self, key: Option<&str>, at: Instant, tokens: u64) {
        if self.token_quota.lock().unwrap().is_some() {
            let mut books = self.token_books.lock().unwrap();
            books
                .entry(key.unwrap_or("").to_string())
                .or_default()
                .push_back((at, tokens));
        }
    }

    /// Answers refused by the token quota.
    pub fn token_violations(&self) -> usize {
        self.arrivals().iter().filter(|a| a.by_tokens).count()
    }

    /// Prompt tokens of the requests accepted in `[from, to)`.
    pub fn tokens_accepted_between(&self, from: Instant, to: Instant) -> u64 {
        self.arrivals()
            .iter()
            .filter(|a| a.status == 200 && a.at >= from && a.at < to)
            .map(|a| prompt_tokens(a.body_len))
            .sum()
    }

    /// The next `n` chat requests get a 429 whatever the quota says.
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` chat requests get NVIDIA's worker-capacity 429 whatever the quota says,
    /// without taking a quota slot: an overloaded worker, not a spent quota. Counted by
    /// `worker_rejections`, not by `violations`.
    pub fn worker_busy_next(&self, n: usize) {
        self.worker_busy_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` chat requests get a 503 whose body is NVIDIA's "ResourceExhausted: All
    /// workers are busy", without taking a quota slot. Recorded with status 503.
    pub fn unavailable_next(&self, n: usize) {
        self.unavailable_next.store(n, Ordering::SeqCst);
    }

    fn take_worker_busy(&self) -> bool {
        self.worker_busy_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Takes a quota slot for an arrival now, under `key`'s own quota if it has one, else the
    /// global one; false means the request is over the quota.
    fn admit(&self, at: Instant, key: Option<&str>) -> bool {
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return false;
        }
        if let Some(key) = key {
            if let Some((quota, book)) = self.key_quotas.lock().unwrap().get_mut(key) {
                return book.admit(*quota, self.started, at);
            }
        }
        let Some(quota) = *self.quota.lock().unwrap() else {
            return true;
        };
        self.book.lock().unwrap().admit(quota, self.started, at)
    }

    /// The 401 of a revoked key, if the request carries one.
    fn revoked_answer(&self, headers: &HeaderMap) -> Option<Answer> {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_key)?;
        self.revoked
            .lock()
            .unwrap()
            .contains(key)
            .then(|| Answer::json(401, REVOKED_BODY))
    }

    /// Takes a place for a request for `model` if the model has a concurrency limit: `Err`
    /// when it is at its limit, `Ok(None)` when it has no limit. The place is taken only if
    /// `admit` (the quota) lets the request in.
    fn take_model_slot(
        &self,
        model: Option<&str>,
        admit: impl FnOnce() -> bool,
    ) -> Result<(bool, Option<ModelSlot>), ()> {
        let mut models = self.models.lock().unwrap();
        let Some((name, book)) = model.and_then(|m| models.get_mut(m).map(|b| (m, b))) else {
            drop(models);
            return Ok((admit(), None));
        };
        if book.in_flight >= book.max_concurrency {
            return Err(());
        }
        if !admit() {
            return Ok((false, None));
        }
        book.in_flight += 1;
        book.peak = book.peak.max(book.in_flight);
        let slot = ModelSlot {
            models: self.models.clone(),
            model: name.to_string(),
            delay: book.delay,
        };
        Ok((true, Some(slot)))
    }

    /// Records an arrival, with the model its body names (if it is JSON and names one).
    fn record(
        &self,
        at: Instant,
        path: &str,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
        worker_busy: bool,
    ) {
        let arrival = Arrival {
            model: model_of(body),
            ..Arrival::new(at, path, status, headers, body, worker_busy)
        };
        self.arrivals.lock().unwrap().push(arrival);
    }
}

impl Arrival {
    /// An arrival without a model.
    fn new(
        at: Instant,
        path: &str,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
        worker_busy: bool,
    ) -> Arrival {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Arrival {
            at,
            path: path.to_string(),
            status,
            client: header("x-mock-client"),
            authorization: header("authorization"),
            host: header("host"),
            body_len: body.len(),
            body_checksum: fnv1a64(body),
            worker_busy,
            model: None,
            by_model: false,
            by_tokens: false,
        }
    }

    fn is_violation(&self) -> bool {
        self.status == 429 && !self.worker_busy
    }

    /// The key of its `Authorization: Bearer <key>`.
    pub fn key(&self) -> Option<&str> {
        self.authorization.as_deref().and_then(bearer_key)
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

    /// Starts a plain-HTTP mock on a free loopback port that frames its 429s and buffered chat
    /// answers as `framing` says (see [`Framing`]), through a hand-written HTTP/1.1 server
    /// sharing the axum mock's quota, styles and bookkeeping.
    pub async fn start_framed(
        quota: Option<Quota>,
        style: LimitStyle,
        framing: Framing,
    ) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = MockState::new(quota, style);
        let task = tokio::spawn(raw::serve(listener, state.clone(), framing));
        MockUpstream { addr, state, task }
    }

    fn app(quota: Option<Quota>, style: LimitStyle) -> (Arc<MockState>, Router) {
        let state = MockState::new(quota, style);
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

/// An answer independent of the server that sends it, so that the axum mock and the raw one
/// say exactly the same things.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Answer {
    fn json(status: u16, body: impl Into<String>) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "application/json".to_string())],
            body: body.into(),
        }
    }

    /// Sets a header, replacing one of the same name (like `HeaderMap::insert`).
    fn set_header(&mut self, name: &'static str, value: String) {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value));
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap();
        let mut response = (status, self.body).into_response();
        for (name, value) in self.headers {
            response
                .headers_mut()
                .insert(name, HeaderValue::from_str(&value).unwrap());
        }
        response
    }
}

fn too_many(style: LimitStyle) -> Answer {
    const NVIDIA: &str = r#"{"status":429,"title":"Too Many Requests"}"#;
    match style {
        LimitStyle::Nvidia => Answer::json(429, NVIDIA),
        LimitStyle::RetryAfter(secs) => {
            let mut answer = Answer::json(429, NVIDIA);
            answer.set_header("retry-after", secs.to_string());
            answer
        }
        LimitStyle::RetryAfterMs(ms) => {
            let mut answer = Answer::json(429, NVIDIA);
            answer.set_header("retry-after-ms", ms.to_string());
            answer
        }
        LimitStyle::RateLimitHeaders => {
            let mut answer = Answer::json(
                429,
                r#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded","param":null}}"#,
            );
            answer.set_header("x-ratelimit-remaining-requests", "0".to_string());
            answer
        }
        LimitStyle::InsufficientQuota => Answer::json(
            429,
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota","param":null}}"#,
        ),
        LimitStyle::WorkerCapacity => Answer::json(429, WORKER_CAPACITY_BODY),
    }
}

/// What the mock does with a chat request.
enum ChatOutcome {
    /// A 429: the quota, `fail_next`, `worker_busy_next` or a model's concurrency limit; or
    /// the 401 of a revoked key.
    Limited(Answer),
    /// Accepted, answered with buffered JSON.
    Buffered(Answer),
    /// Accepted, answered with an SSE stream of `chunks` events `delay` apart, and a last
    /// event with `usage` (prompt tokens) when the request asked for it.
    Stream {
        chunks: u64,
        delay: Duration,
        usage: Option<u64>,
    },
    /// A 200 stream whose first event is NVIDIA's worker-capacity error.
    StreamError,
}

/// Decides and records a chat request. `can_stream` false answers `stream: true` requests
/// with buffered JSON (the raw server does not stream). An accepted request for a model with
/// a concurrency limit comes with its place (`ModelSlot`): the server answers after the
/// slot's delay and holds the slot until the answer is sent (a stream, until it ends).
fn decide_chat(
    state: &MockState,
    headers: &HeaderMap,
    body: &[u8],
    can_stream: bool,
) -> (ChatOutcome, Option<ModelSlot>) {
    const PATH: &str = "/v1/chat/completions";
    let at = Instant::now();
    let request: serde_json::Value =
        serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let model = request["model"].as_str();
    // The body was parsed once already: record its model without parsing it again.
    let record_full = |status: u16, worker_busy: bool, by_model: bool, by_tokens: bool| {
        let arrival = Arrival {
            model: model.map(str::to_string),
            by_model,
            by_tokens,
            ..Arrival::new(at, PATH, status, headers, body, worker_busy)
        };
        state.arrivals.lock().unwrap().push(arrival);
    };
    let record_as = |status: u16, worker_busy: bool, by_model: bool| {
        record_full(status, worker_busy, by_model, false)
    };
    let record = |status: u16, worker_busy: bool| record_as(status, worker_busy, false);
    let style = *state.style.lock().unwrap();
    if let Some(answer) = state.revoked_answer(headers) {
        record(401, false);
        return (ChatOutcome::Limited(answer), None);
    }
    if state
        .unavailable_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        record(503, true);
        return (
            ChatOutcome::Limited(Answer::json(503, UNAVAILABLE_BODY)),
            None,
        );
    }
    if state
        .worker_503_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        record(503, true);
        return (
            ChatOutcome::Limited(Answer::json(503, WORKER_CAPACITY_BODY)),
            None,
        );
    }
    if state.take_worker_busy() {
        record(429, true);
        return (
            ChatOutcome::Limited(Answer::json(429, WORKER_CAPACITY_BODY)),
            None,
        );
    }
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_key);
    if let Some(answer) = state.lockout_answer(model, at) {
        record_as(429, false, true);
        return (ChatOutcome::Limited(answer), None);
    }
    if !request["stream_options"].is_null()
        && model.is_some_and(|m| state.no_stream_options.lock().unwrap().contains(m))
    {
        record(400, false);
        let body = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","code":null}}"#;
        return (ChatOutcome::Limited(Answer::json(400, body)), None);
    }
    let tokens = prompt_tokens(body.len());
    if !state.token_room(key, at, tokens) {
        record_full(429, false, false, true);
        let mut answer = too_many(style);
        state.add_token_headers(key, at, &mut answer);
        return (ChatOutcome::Limited(answer), None);
    }
    if !state.admit_model(model, key, at) {
        record_as(429, false, true);
        let mut answer = too_many(style);
        state.add_stated(key, at, &mut answer);
        return (ChatOutcome::Limited(answer), None);
    }
    let (admitted, slot) = match state.take_model_slot(model, || state.admit(at, key)) {
        Ok(taken) => taken,
        Err(()) => {
            record(429, true);
            return (
                ChatOutcome::Limited(Answer::json(429, WORKER_CAPACITY_BODY)),
                None,
            );
        }
    };
    if !admitted {
        record(429, false);
        let mut answer = too_many(style);
        if style == LimitStyle::RateLimitHeaders {
            add_ratelimit_headers(state, key, at, &mut answer);
        }
        state.add_stated(key, at, &mut answer);
        return (ChatOutcome::Limited(answer), None);
    }
    record(200, false);
    state.take_tokens(key, at, tokens);
    let streaming = request["stream"].as_bool() == Some(true);
    if streaming
        && can_stream
        && state
            .worker_in_stream_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return (ChatOutcome::StreamError, slot);
    }
    if streaming && can_stream {
        let outcome = ChatOutcome::Stream {
            chunks: request["chunks"].as_u64().unwrap_or(5),
            delay: Duration::from_millis(request["chunk_delay_ms"].as_u64().unwrap_or(100)),
            usage: (request["stream_options"]["include_usage"].as_bool() == Some(true))
                .then_some(tokens),
        };
        return (outcome, slot);
    }
    let answer = serde_json::json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "model": "mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tokens, "completion_tokens": COMPLETION_TOKENS, "total_tokens": tokens + COMPLETION_TOKENS}
    });
    let mut answer = Answer::json(200, answer.to_string());
    // As before the raw server: rate limit headers on buffered answers only, not on streams.
    if style == LimitStyle::RateLimitHeaders {
        add_ratelimit_headers(state, key, at, &mut answer);
    }
    state.add_stated(key, at, &mut answer);
    state.add_token_headers(key, at, &mut answer);
    (ChatOutcome::Buffered(answer), slot)
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let (outcome, slot) = decide_chat(&state, &headers, &body, true);
    if let Some(slot) = &slot {
        tokio::time::sleep(slot.delay).await;
    }
    match outcome {
        ChatOutcome::Limited(answer) | ChatOutcome::Buffered(answer) => answer.into_response(),
        ChatOutcome::StreamError => Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(
                "data: {\"error\":{\"message\":\"ResourceExhausted: Worker local total request limit reached (33/32)\",\"code\":503}}\n\ndata: [DONE]\n\n",
            ))
            .unwrap(),
        ChatOutcome::Stream {
            chunks,
            delay,
            usage,
        } => {
            let stream = async_stream(chunks, delay, usage, state.clone(), slot);
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

/// SSE chunks `data: {...}` with a delay before each, then `data: [DONE]`. A model's `slot`
/// is held until the stream ends or is dropped.
fn async_stream(
    chunks: u64,
    delay: Duration,
    usage: Option<u64>,
    state: Arc<MockState>,
    slot: Option<ModelSlot>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold((0u64, slot), move |(i, slot)| {
        let state = state.clone();
        async move {
            if i > chunks {
                state.streams_finished.fetch_add(1, Ordering::SeqCst);
                return None;
            }
            let event = if i == chunks {
                match usage {
                    Some(prompt) => format!(
                        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{COMPLETION_TOKENS}}}}}\n\ndata: [DONE]\n\n"
                    ),
                    None => "data: [DONE]\n\n".to_string(),
                }
            } else {
                if i > 0 {
                    tokio::time::sleep(delay).await;
                }
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"chunk{i}\"}}}}]}}\n\n")
            };
            Some((Ok(Bytes::from(event)), (i + 1, slot)))
        }
    })
}

async fn models(State(state): State<Arc<MockState>>, headers: HeaderMap) -> Response {
    models_answer(&state, &headers).into_response()
}

fn models_answer(state: &MockState, headers: &HeaderMap) -> Answer {
    if let Some(answer) = state.revoked_answer(headers) {
        state.record(Instant::now(), "/v1/models", 401, headers, &[], false);
        return answer;
    }
    state.record(Instant::now(), "/v1/models", 200, headers, &[], false);
    Answer::json(200, r#"{"object":"list","data":[{"id":"mock"}]}"#)
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
    if let Some(answer) = state.revoked_answer(&headers) {
        state.record(Instant::now(), "/slow", 401, &headers, &[], false);
        return answer.into_response();
    }
    state.record(Instant::now(), "/slow", 200, &headers, &[], false);
    tokio::time::sleep(Duration::from_millis(q.ms)).await;
    "slow".into_response()
}

async fn echo(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: Bytes,
) -> Response {
    if let Some(answer) = state.revoked_answer(&headers) {
        state.record(Instant::now(), uri.path(), 401, &headers, &body, false);
        return answer.into_response();
    }
    state.record(Instant::now(), uri.path(), 200, &headers, &body, false);
    format!("echo {}", uri.path()).into_response()
}

/// OpenAI-style `x-ratelimit-*` headers describing the quota (`key`'s own, if it has one) as
/// of `at`.
fn add_ratelimit_headers(state: &MockState, key: Option<&str>, at: Instant, answer: &mut Answer) {
    if let Some((remaining, reset)) = state.headroom(key, at) {
        answer.set_header("x-ratelimit-remaining-requests", remaining.to_string());
        let reset = format!("{}ms", reset.as_millis().max(1));
        answer.set_header("x-ratelimit-reset-requests", reset);
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

/// The hand-written HTTP/1.1 server behind `MockUpstream::start_framed`: hyper would frame
/// answers its own way, and the point is to frame them the ways real upstreams do.
mod raw {
    use super::*;

    /// How long a `BodyNever` connection stays open after its 429 head.
    const BODY_NEVER_HOLD: Duration = Duration::from_secs(60);

    /// Accepts connections until aborted. The connections live in a `JoinSet` owned by this
    /// task, so aborting it (dropping the `MockUpstream`) also ends held `BodyNever`
    /// connections instead of leaving them to the end of the test.
    pub(super) async fn serve(listener: TcpListener, state: Arc<MockState>, framing: Framing) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of descriptors or similar: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Each write is its own segment, so `Split` and `Chunked` really split.
            let _ = stream.set_nodelay(true);
            while connections.try_join_next().is_some() {}
            connections.spawn(connection(stream, state.clone(), framing));
        }
    }

    struct Request {
        method: String,
        path: String,
        headers: HeaderMap,
        body: Vec<u8>,
        /// The client asked to close after this answer (or spoke HTTP/1.0 without
        /// keep-alive).
        close: bool,
    }

    /// Serves requests on one connection until the client closes it, asks to, sends
    /// something unreadable, or a `BodyNever` answer ends it.
    async fn connection(stream: TcpStream, state: Arc<MockState>, framing: Framing) {
        let mut conn = BufReader::new(stream);
        while let Ok(Some(request)) = read_request(&mut conn).await {
            let (answer, framed) = match (request.method.as_str(), request.path.as_str()) {
                ("POST", "/v1/chat/completions") => {
                    let (outcome, slot) =
                        decide_chat(&state, &request.headers, &request.body, false);
                    if let Some(slot) = &slot {
                        tokio::time::sleep(slot.delay).await;
                    }
                    match outcome {
                        ChatOutcome::Limited(answer) | ChatOutcome::Buffered(answer) => {
                            (answer, true)
                        }
                        ChatOutcome::Stream { .. } | ChatOutcome::StreamError => {
                            unreachable!("can_stream is false")
                        }
                    }
                }
                ("GET", "/v1/models") => (models_answer(&state, &request.headers), false),
                _ => {
                    let path = request.path.clone();
                    state.record(
                        Instant::now(),
                        &path,
                        404,
                        &request.headers,
                        &request.body,
                        false,
                    );
                    let mut answer = Answer::json(404, "not found");
                    answer.set_header("content-type", "text/plain".to_string());
                    (answer, false)
                }
            };
            let framing = match framing {
                _ if !framed => Framing::OneWrite,
                Framing::BodyNever if answer.status != 429 => Framing::OneWrite,
                other => other,
            };
            match write_answer(&mut conn, &answer, framing, request.close).await {
                Ok(true) if !request.close => {}
                _ => return,
            }
        }
    }

    /// Reads one request; `None` when the client closed the connection between requests.
    async fn read_request(conn: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
        let mut line = Vec::new();
        // A client may send a stray CRLF before a request line (RFC 9112, 2.2).
        loop {
            line.clear();
            if conn.read_until(b'\n', &mut line).await? == 0 {
                return Ok(None);
            }
            if !trim_eol(&line).is_empty() {
                break;
            }
        }
        let request_line = String::from_utf8_lossy(trim_eol(&line)).into_owned();
        let mut parts = request_line.split_whitespace();
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("bad request line"));
        };
        let path = target.split('?').next().unwrap_or_default().to_string();

        let mut headers = HeaderMap::new();
        loop {
            line.clear();
            if conn.read_until(b'\n', &mut line).await? == 0 {
                return Err(invalid("connection closed inside the head"));
            }
            let header = trim_eol(&line);
            if header.is_empty() {
                break;
            }
            let colon = header
                .iter()
                .position(|b| *b == b':')
                .ok_or_else(|| invalid("header without a colon"))?;
            let name =
                HeaderName::from_bytes(&header[..colon]).map_err(|_| invalid("header name"))?;
            let value = HeaderValue::from_bytes(header[colon + 1..].trim_ascii())
                .map_err(|_| invalid("header value"))?;
            headers.append(name, value);
        }

        let has_token = |name: &str, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        let close = has_token("connection", "close")
            || (version == "HTTP/1.0" && !has_token("connection", "keep-alive"));

        if has_token("expect", "100-continue") {
            conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body = if has_token("transfer-encoding", "chunked") {
            read_chunked(conn).await?
        } else if let Some(length) = headers.get("content-length") {
            let length: usize = length
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| invalid("content-length"))?;
            let mut body = vec![0; length];
            conn.read_exact(&mut body).await?;
            body
        } else {
            Vec::new()
        };
        Ok(Some(Request {
            method: method.to_string(),
            path,
            headers,
            body,
            close,
        }))
    }

    /// A chunked request body: size lines (extensions ignored), data, and trailers skipped.
    async fn read_chunked(conn: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if conn.read_until(b'\n', &mut line).await? == 0 {
                return Err(invalid("connection closed inside a chunked body"));
            }
            let size = String::from_utf8_lossy(trim_eol(&line));
            let size = size.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid("chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if conn.read_until(b'\n', &mut line).await? == 0 || trim_eol(&line).is_empty() {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            conn.read_exact(&mut body[start..]).await?;
            let mut crlf = [0; 2];
            conn.read_exact(&mut crlf).await?;
            if &crlf != b"\r\n" {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
    }

    /// Writes `answer` framed as `framing`. False means the connection cannot carry another
    /// request (a `BodyNever` answer left it mid-message).
    async fn write_answer(
        conn: &mut BufReader<TcpStream>,
        answer: &Answer,
        framing: Framing,
        close: bool,
    ) -> std::io::Result<bool> {
        let body = answer.body.as_bytes();
        match framing {
            Framing::OneWrite => {
                let mut message = head(answer, Some(body.len()), close);
                message.extend_from_slice(body);
                conn.write_all(&message).await?;
            }
            Framing::Split { delay } => {
                conn.write_all(&head(answer, Some(body.len()), close))
                    .await?;
                conn.flush().await?;
                tokio::time::sleep(delay).await;
                conn.write_all(body).await?;
            }
            Framing::Chunked { delay } => {
                conn.write_all(&head(answer, None, close)).await?;
                conn.flush().await?;
                tokio::time::sleep(delay).await;
                // Two chunks when there is enough body, so a reader must join them.
                let (first, second) = body.split_at(body.len() / 2);
                for chunk in [first, second].into_iter().filter(|c| !c.is_empty()) {
                    let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
                    frame.extend_from_slice(chunk);
                    frame.extend_from_slice(b"\r\n");
                    conn.write_all(&frame).await?;
                }
                conn.write_all(b"0\r\n\r\n").await?;
            }
            Framing::BodyNever => {
                conn.write_all(&head(answer, Some(body.len()), close))
                    .await?;
                conn.flush().await?;
                tokio::time::sleep(BODY_NEVER_HOLD).await;
                return Ok(false);
            }
        }
        conn.flush().await?;
        Ok(true)
    }

    /// Status line and headers; `length` None means chunked.
    fn head(answer: &Answer, length: Option<usize>, close: bool) -> Vec<u8> {
        let reason = StatusCode::from_u16(answer.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Unknown");
        let mut head = format!("HTTP/1.1 {} {reason}\r\n", answer.status);
        for (name, value) in &answer.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        match length {
            Some(length) => head.push_str(&format!("content-length: {length}\r\n")),
            None => head.push_str("transfer-encoding: chunked\r\n"),
        }
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    fn trim_eol(line: &[u8]) -> &[u8] {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        line.strip_suffix(b"\r").unwrap_or(line)
    }

    fn invalid(what: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
    }
}
