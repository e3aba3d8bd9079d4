//! Every metric the sidecar exports (prefix `nvidia_sidecar_`), defined in one place.
//!
//! Label values are bounded: routes come from the config, codes are HTTP status numbers,
//! priorities and outcomes are fixed sets. Model ids (learned from request bodies) are labels
//! of the lane gauges, bounded by the number of models a route learns at once. The token
//! counters name the first `TOKEN_LABELS_MAX` client ids and model ids they see, and count
//! every later one as `other` (`BoundedLabels`), so that no client can grow the series.

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

mod bounded;
mod lanes;
mod route;

pub use bounded::{BoundedLabels, TOKEN_LABELS_MAX};
pub use lanes::LaneGauges;
pub use route::RouteMetrics;

/// How a request ended, as counted in `requests_total{outcome}` and written to the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent upstream with a token.
    Forwarded,
    /// Sent upstream without a token (passthrough route, or fail-open fallback).
    Passthrough,
    RejectedQueueFull,
    RejectedQueueTimeout,
    /// The upstream locked the request's model beyond its deadline.
    RejectedModelLocked,
    /// Its estimated cost is more than a whole token budget (400 `request_too_large`).
    RejectedTooLarge,
    /// The client went away (while queued or while the answer streamed).
    ClientClosed,
    /// The upstream could not be reached, timed out or broke off.
    UpstreamError,
    /// The client sent something broken (a bad chunk, a body shorter than declared) or too
    /// slowly.
    ClientError,
    /// Refused before admission: CONNECT, a foreign absolute-form target.
    Refused,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Forwarded,
        Outcome::Passthrough,
        Outcome::RejectedQueueFull,
        Outcome::RejectedQueueTimeout,
        Outcome::RejectedModelLocked,
        Outcome::RejectedTooLarge,
        Outcome::ClientClosed,
        Outcome::UpstreamError,
        Outcome::ClientError,
        Outcome::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Passthrough => "passthrough",
            Outcome::RejectedQueueFull => "rejected_queue_full",
            Outcome::RejectedQueueTimeout => "rejected_queue_timeout",
            Outcome::RejectedModelLocked => "rejected_model_locked",
            Outcome::RejectedTooLarge => "rejected_too_large",
            Outcome::ClientClosed => "client_closed",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ClientError => "client_error",
            Outcome::Refused => "refused",
        }
    }
}

/// The sidecar's metrics, registered in their own registry.
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub upstream_responses: IntCounterVec,
    pub replays: IntCounterVec,
    /// Upstream refusals by what they were about (`rate_limit`, `worker_capacity`,
    /// `insufficient_quota`); `upstream_responses_total` keeps the status codes.
    pub upstream_refusals: IntCounterVec,
    /// Requests on a rate-limited route that could not be replayed after a 429, by why not.
    pub replay_unavailable: IntCounterVec,
    /// Attempts sent upstream on each key of the pool.
    pub key_requests: IntCounterVec,
    /// 1 while a key is in the pool, 0 once the upstream refused it.
    pub key_active: IntGaugeVec,
    pub key_effective_rpm: GaugeVec,
    /// Requests of each configured model in flight, and the concurrency allowed now.
    pub model_inflight: IntGaugeVec,
    pub model_concurrency_limit: GaugeVec,
    /// Request bodies held in memory for replay right now, bytes.
    pub held_body_bytes: IntGauge,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub tokens_available: GaugeVec,
    pub rate_effective_rpm: GaugeVec,
    pub rate_base_rpm: GaugeVec,
    pub retreat_state: IntGaugeVec,
    pub upstream_429_ratio: GaugeVec,
    pub upstream_duration: HistogramVec,
    pub inflight: IntGauge,
    /// Proxy connections open and idle (set from the proxy's slots at each scrape), and closed,
    /// by why (`front::conn::Closed`).
    pub connections_open: IntGauge,
    pub connections_idle: IntGauge,
    pub connections_closed: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub uptime: Gauge,
    /// Shared quota (only moves when `shared_quota` is configured).
    pub shared_degraded: IntGaugeVec,
    pub shared_instances: IntGauge,
    pub shared_slots: IntCounterVec,
    pub redis_calls: IntCounterVec,
    pub redis_duration: Histogram,
    /// What every key and learned model's lane learned.
    pub lanes: LaneGauges,
    /// Tokens the upstream counted (its answers' `usage`), by key, by client, by model.
    pub key_tokens: IntCounterVec,
    pub client_tokens: IntCounterVec,
    pub model_tokens: IntCounterVec,
    /// The client and model ids the token counters name.
    pub token_clients: BoundedLabels,
    pub token_models: BoundedLabels,
}

const PREFIX: &str = "nvidia_sidecar";

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

/// Registers a freshly built metric; names and labels are fixed here, so failure is a bug.
fn register<T: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<T>,
) -> T {
    let metric = metric.expect("metric definitions are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("every metric is registered once");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        // Queue waits run from milliseconds to minutes, upstream times up to several minutes.
        let wait_buckets = exponential_buckets(0.005, 2.0, 17).expect("valid bucket layout");
        let upstream_buckets = exponential_buckets(0.01, 2.0, 16).expect("valid bucket layout");
        let per_route =
            |name: &str, help: &str| register(r, GaugeVec::new(opts(name, help), &["route"]));
        let tokens = |name: &str, help: &str, label: &str| {
            register(
                r,
                IntCounterVec::new(opts(name, help), &["route", label, "kind"]),
            )
        };
        let m = Metrics {
            key_tokens: tokens(
                "tokens_total",
                "Tokens the upstream counted (its answers' usage), by route, key and kind: prompt, completion.",
                "key",
            ),
            client_tokens: tokens(
                "client_tokens_total",
                "Tokens the upstream counted, by route, client and kind (the first 64 client ids; later ones as other).",
                "client",
            ),
            model_tokens: tokens(
                "model_tokens_total",
                "Tokens the upstream counted, by route, model and kind (the first 64 model ids; later ones as other).",
                "model",
            ),
            token_clients: BoundedLabels::new(TOKEN_LABELS_MAX),
            token_models: BoundedLabels::new(TOKEN_LABELS_MAX),
            requests: register(
                r,
                IntCounterVec::new(
                    opts("requests_total", "Requests by route and outcome."),
                    &["route", "outcome"],
                ),
            ),
            upstream_responses: register(
                r,
                IntCounterVec::new(
                    opts(
                        "upstream_responses_total",
                        "Upstream responses by route and status code.",
                    ),
                    &["route", "code"],
                ),
            ),
            replays: register(
                r,
                IntCounterVec::new(
                    opts(
                        "replays_total",
                        "Requests sent again after an upstream 429.",
                    ),
                    &["route"],
                ),
            ),
            upstream_refusals: register(
                r,
                IntCounterVec::new(
                    opts(
                        "upstream_refusals_total",
                        "Upstream refusals by route and reason: rate_limit, worker_capacity, insufficient_quota.",
                    ),
                    &["route", "reason"],
                ),
            ),
            replay_unavailable: register(
                r,
                IntCounterVec::new(
                    opts(
                        "replay_unavailable_total",
                        "Requests forwarded without a kept body, so not replayable, by reason: body_too_large, budget_full, chunked_body.",
                    ),
                    &["route", "reason"],
                ),
            ),
            key_requests: register(
                r,
                IntCounterVec::new(
                    opts(
                        "key_requests_total",
                        "Attempts sent upstream with a token, by route and upstream key name.",
                    ),
                    &["route", "key"],
                ),
            ),
            key_active: register(
                r,
                IntGaugeVec::new(
                    opts(
                        "key_active",
                        "1 while the upstream key is in the pool, 0 once the upstream refused it (401/403).",
                    ),
                    &["route", "key"],
                ),
            ),
            key_effective_rpm: register(
                r,
                GaugeVec::new(
                    opts(
                        "key_rate_effective_rpm",
                        "Effective rate of each upstream key after retreat, requests per minute.",
                    ),
                    &["route", "key"],
                ),
            ),
            model_inflight: register(
                r,
                IntGaugeVec::new(
                    opts(
                        "model_inflight_requests",
                        "Requests of each configured model (pattern) in flight upstream.",
                    ),
                    &["route", "model"],
                ),
            ),
            model_concurrency_limit: register(
                r,
                GaugeVec::new(
                    opts(
                        "model_concurrency_limit",
                        "Requests of each configured model allowed in flight now (after worker-capacity cuts); absent while unlimited.",
                    ),
                    &["route", "model"],
                ),
            ),
            held_body_bytes: register(
                r,
                IntGauge::with_opts(opts(
                    "held_body_bytes",
                    "Request bodies kept in memory for replay, bytes.",
                )),
            ),
            queue_depth: register(
                r,
                IntGaugeVec::new(
                    opts("queue_depth", "Requests waiting for a token."),
                    &["priority"],
                ),
            ),
            queue_wait: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "queue_wait_seconds",
                        "Time admitted requests waited for a token.",
                    )
                    .namespace(PREFIX)
                    .buckets(wait_buckets),
                    &["priority"],
                ),
            ),
            tokens_available: per_route("tokens_available", "Tokens in the bucket."),
            rate_effective_rpm: per_route(
                "rate_effective_rpm",
                "Effective refill rate, requests per minute.",
            ),
            rate_base_rpm: per_route(
                "rate_base_rpm",
                "Configured base rate, requests per minute.",
            ),
            retreat_state: register(
                r,
                IntGaugeVec::new(
                    opts(
                        "retreat_state",
                        "Adaptive controller state: 0 normal, 1 retreat, 2 recover.",
                    ),
                    &["route"],
                ),
            ),
            upstream_429_ratio: per_route(
                "upstream_429_ratio",
                "Share of upstream 429s over the controller's window.",
            ),
            upstream_duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "upstream_duration_seconds",
                        "Time from sending upstream to the end of the answer.",
                    )
                    .namespace(PREFIX)
                    .buckets(upstream_buckets),
                    &["route"],
                ),
            ),
            inflight: register(
                r,
                IntGauge::with_opts(opts(
                    "inflight_requests",
                    "Requests being handled right now.",
                )),
            ),
            connections_open: register(
                r,
                IntGauge::with_opts(opts(
                    "proxy_connections_open",
                    "Connections open on the proxy port.",
                )),
            ),
            connections_idle: register(
                r,
                IntGauge::with_opts(opts(
                    "proxy_connections_idle",
                    "Proxy connections waiting for their next request.",
                )),
            ),
            connections_closed: register(
                r,
                IntCounterVec::new(
                    opts(
                        "proxy_connections_closed_total",
                        "Proxy connections closed, by why: client, request_end, header_deadline, idle_timeout, evicted, refused_full, stopping, lost_stream.",
                    ),
                    &["reason"],
                ),
            ),
            config_reloads: register(
                r,
                IntCounterVec::new(
                    opts(
                        "config_reloads_total",
                        "Configuration reloads by source and result.",
                    ),
                    &["source", "result"],
                ),
            ),
            build_info: register(
                r,
                IntGaugeVec::new(
                    opts("build_info", "Build information; the value is always 1."),
                    &["version"],
                ),
            ),
            uptime: register(
                r,
                Gauge::with_opts(opts("uptime_seconds", "Seconds since start.")),
            ),
            shared_degraded: register(
                r,
                IntGaugeVec::new(
                    opts(
                        "shared_quota_degraded",
                        "1 while the shared bucket in Redis cannot be reached and the route runs on its local share.",
                    ),
                    &["route"],
                ),
            ),
            shared_instances: register(
                r,
                IntGauge::with_opts(opts(
                    "shared_quota_instances",
                    "Sidecars last seen alive on the shared quota.",
                )),
            ),
            shared_slots: register(
                r,
                IntCounterVec::new(
                    opts(
                        "shared_quota_slots_total",
                        "Slots of the shared quota leased by this sidecar.",
                    ),
                    &["route"],
                ),
            ),
            redis_calls: register(
                r,
                IntCounterVec::new(
                    opts(
                        "redis_calls_total",
                        "Round trips to Redis by result (ok, error, timeout).",
                    ),
                    &["result"],
                ),
            ),
            redis_duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "redis_call_duration_seconds",
                        "Time of one round trip to Redis.",
                    )
                    .namespace(PREFIX)
                    .buckets(exponential_buckets(0.0001, 2.0, 14).expect("valid bucket layout")),
                ),
            ),
            lanes: LaneGauges::new(r),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Requests of `outcome` over the given routes.
    pub fn requests_with<'a>(
        &self,
        routes: impl IntoIterator<Item = &'a str>,
        outcome: Outcome,
    ) -> u64 {
        routes
            .into_iter()
            .map(|route| {
                self.requests
                    .with_label_values(&[route, outcome.as_str()])
                    .get()
            })
            .sum()
    }

    /// Text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The sum of a counter over all its label values.
pub fn total(counter: &IntCounterVec) -> u64 {
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().value() as u64)
        .sum()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
