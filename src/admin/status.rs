//! The status snapshot of `GET /status` and the dashboard stream, compatible field for field
//! with the earlier Python service (fields are added, never renamed).
//!
//! One sampler task builds the snapshot once per second, refreshes the gauges, adds a sample
//! to the five-minute history, and publishes the serialised JSON on a watch channel; every
//! subscriber reads that one string, so a hundred dashboards cost no more snapshot work than
//! one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use super::history::{History, HistorySample};
use super::lanes::{key_views, round3, KeyView, LearnedView};
use crate::activity::ClientsView;
use crate::app::App;
use crate::limiter::{LimiterSnapshot, ModelSnapshot, Priority};
use crate::metrics::Outcome;
use crate::shared_quota::SharedQuotaStatus;

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub timestamp: f64,
    pub uptime_seconds: u64,
    pub token_bucket: BucketView,
    pub retreat: RetreatView,
    pub requests: RequestsView,
    pub errors: ErrorsView,
    pub inflight: i64,
    pub upstream_429_per_minute: u64,
    /// Upstream 429s since the start.
    pub upstream_429_total: u64,
    pub routes: Vec<RouteView>,
    /// The upstream keys of the default route: one entry (`default`) without a key pool.
    /// The keys themselves never appear, only their names.
    pub keys: Vec<KeyView>,
    /// The model limits of the default route, in match order.
    pub models: Vec<ModelSnapshot>,
    /// The models the default route learned without configuration.
    pub learned_models: LearnedView,
    /// Present when the quota is shared with other sidecars through Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_quota: Option<SharedQuotaStatus>,
    /// The top clients of the last minute: requests, shares of the quota, queue waits.
    pub clients: ClientsView,
    /// The newest sample of the five-minute history (`GET /api/dashboard/history`): a
    /// dashboard appends it to the history it was sent on connect. `null` before the first.
    pub history_sample: Option<HistorySample>,
}

#[derive(Debug, Serialize)]
pub struct BucketView {
    pub tokens: f64,
    pub capacity: f64,
    pub rate_rpm: f64,
    pub queue_size: usize,
    pub queue_max_size: usize,
    pub queue_by_priority: QueueView,
}

#[derive(Debug, Serialize)]
pub struct QueueView {
    pub high: usize,
    pub normal: usize,
    pub low: usize,
}

#[derive(Debug, Serialize)]
pub struct RetreatView {
    pub state: &'static str,
    /// Probing a full window after a 429: one request at a time, no tokens issued.
    pub probing: bool,
    pub effective_rpm: f64,
    pub base_rpm: f64,
    pub upstream_429_rate: f64,
    /// Seconds until the upstream's `Retry-After` pause ends (0 when not paused).
    pub pause_remaining_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct RequestsView {
    pub total: u64,
    /// Forwarded upstream with a token.
    pub nvidia: u64,
    pub passthrough: u64,
    /// Answered 429 by the sidecar itself.
    pub ratelimited: u64,
    /// Requests finished during the last second.
    pub per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct ErrorsView {
    pub queue_full_rejects: u64,
    pub upstream_errors: u64,
    pub queue_timeouts: u64,
    pub client_closed: u64,
    /// Answered 400 `request_too_large`: more than a whole token budget.
    pub too_large: u64,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub name: String,
    pub path_prefix: String,
    pub upstream: String,
    pub passthrough: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<BucketView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retreat: Option<RetreatView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyView>,
}

fn bucket_view(s: &LimiterSnapshot) -> BucketView {
    BucketView {
        tokens: round3(s.tokens),
        capacity: s.capacity,
        rate_rpm: s.base_rpm,
        queue_size: s.queue_depth.iter().sum(),
        queue_max_size: s.queue_max,
        queue_by_priority: QueueView {
            high: s.queue_depth[0],
            normal: s.queue_depth[1],
            low: s.queue_depth[2],
        },
    }
}

fn retreat_view(s: &LimiterSnapshot) -> RetreatView {
    RetreatView {
        state: s.state.as_str(),
        probing: s.probing,
        effective_rpm: round3(s.effective_rpm),
        base_rpm: s.base_rpm,
        upstream_429_rate: round3(s.upstream_429_ratio),
        pause_remaining_seconds: round3(s.paused_for.map_or(0.0, |d| d.as_secs_f64())),
    }
}

/// Totals kept at every snapshot, for rates over time.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    finished: u64,
    upstream_429: u64,
}

/// Counters as of the last history sample, for the per-second counts of the next.
#[derive(Debug, Clone, Copy, Default)]
struct SampledTotals {
    granted: u64,
    upstream_429: u64,
    rejected: u64,
}

/// Builds snapshots; keeps the short history that per-second and per-minute rates need, and
/// the five-minute history of the dashboard.
pub struct StatusBuilder {
    app: Arc<App>,
    totals: VecDeque<Sample>,
    history: History,
    sampled: Option<SampledTotals>,
}

impl StatusBuilder {
    pub fn new(app: Arc<App>) -> Self {
        StatusBuilder {
            app,
            totals: VecDeque::new(),
            history: History::new(),
            sampled: None,
        }
    }

    /// The five-minute history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The sampler's once-a-second step: a snapshot of now, whose history sample is added to
    /// the ring and carried in the snapshot.
    pub fn tick(&mut self) -> Snapshot {
        let mut snapshot = self.build();
        let totals = SampledTotals {
            granted: self.app.activity.grants_total(),
            upstream_429: snapshot.upstream_429_total,
            rejected: snapshot.requests.ratelimited,
        };
        // The first sample has no second before it: it counts nothing rather than everything.
        let before = self.sampled.replace(totals).unwrap_or(totals);
        let waits = self.app.activity.waits(crate::admission::now());
        let sample = HistorySample {
            t: snapshot.timestamp,
            state: snapshot.retreat.state,
            probing: snapshot.retreat.probing,
            paused: snapshot.retreat.pause_remaining_seconds > 0.0,
            effective_rpm: snapshot.retreat.effective_rpm,
            base_rpm: snapshot.retreat.base_rpm,
            queue_depth: snapshot.token_bucket.queue_size,
            queue_wait_p50_ms: waits.p50_ms,
            queue_wait_p99_ms: waits.p99_ms,
            requests_per_second: snapshot.requests.per_second,
            granted: totals.granted.saturating_sub(before.granted),
            upstream_429: totals.upstream_429.saturating_sub(before.upstream_429),
            rejected: totals.rejected.saturating_sub(before.rejected),
        };
        self.history.push(sample.clone());
        snapshot.history_sample = Some(sample);
        snapshot
    }

    /// A snapshot of now; also refreshes the gauges of `/metrics`.
    pub fn build(&mut self) -> Snapshot {
        let app = &self.app;
        let m = &app.metrics;
        let table = app.table();
        let names: Vec<&str> = table.all().map(|r| r.name()).collect();
        let count = |o: Outcome| m.requests_with(names.iter().copied(), o);
        let finished: u64 = Outcome::ALL.iter().map(|o| count(*o)).sum();
        let upstream_429: u64 = names
            .iter()
            .map(|r| m.upstream_responses.with_label_values(&[r, "429"]).get())
            .sum();

        let now = Instant::now();
        self.totals.push_back(Sample {
            at: now,
            finished,
            upstream_429,
        });
        while self
            .totals
            .front()
            .is_some_and(|s| now.duration_since(s.at) > Duration::from_secs(61))
        {
            self.totals.pop_front();
        }
        let per_second = self.rate_over(Duration::from_secs(1), |s| s.finished);
        let minute_ago = self
            .totals
            .iter()
            .find(|s| now.duration_since(s.at) <= Duration::from_secs(60))
            .copied();
        let per_minute_429 = minute_ago.map_or(0, |s| upstream_429.saturating_sub(s.upstream_429));

        let mut depth = [0i64; 3];
        let mut routes = Vec::new();
        let mut main = None;
        for route in table.all() {
            let snapshot = route.gate.as_ref().map(|g| g.snapshot());
            if let Some(s) = &snapshot {
                let name = route.name();
                m.tokens_available.with_label_values(&[name]).set(s.tokens);
                m.rate_effective_rpm
                    .with_label_values(&[name])
                    .set(s.effective_rpm);
                m.rate_base_rpm.with_label_values(&[name]).set(s.base_rpm);
                m.retreat_state
                    .with_label_values(&[name])
                    .set(s.state.as_gauge());
                m.upstream_429_ratio
                    .with_label_values(&[name])
                    .set(s.upstream_429_ratio);
                for (d, q) in depth.iter_mut().zip(s.queue_depth) {
                    *d += q as i64;
                }
                m.lanes.export(name, s);
                for k in &s.keys {
                    m.key_active
                        .with_label_values(&[name, &k.name])
                        .set(i64::from(k.active));
                    m.key_effective_rpm
                        .with_label_values(&[name, &k.name])
                        .set(k.effective_rpm);
                }
                for model in &s.models {
                    m.model_inflight
                        .with_label_values(&[name, &model.pattern])
                        .set(i64::from(model.in_flight));
                    match model.concurrency_limit {
                        Some(limit) => m
                            .model_concurrency_limit
                            .with_label_values(&[name, &model.pattern])
                            .set(f64::from(limit)),
                        None => {
                            let _ = m
                                .model_concurrency_limit
                                .remove_label_values(&[name, &model.pattern]);
                        }
                    }
                }
            }
            if main.is_none() {
                main = snapshot.clone();
            }
            routes.push(RouteView {
                name: route.name().to_string(),
                path_prefix: route.settings.path_prefix.clone(),
                upstream: route.settings.upstream.to_string(),
                passthrough: route.settings.is_passthrough(),
                bucket: snapshot.as_ref().map(bucket_view),
                retreat: snapshot.as_ref().map(retreat_view),
                keys: snapshot.as_ref().map(key_views).unwrap_or_default(),
            });
        }
        for (priority, d) in Priority::ALL.iter().zip(depth) {
            m.queue_depth.with_label_values(&[priority.as_str()]).set(d);
        }
        let uptime = app.started.elapsed();
        m.uptime.set(uptime.as_secs_f64());
        let main = main.expect("the default route always has a bucket");
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| round3(d.as_secs_f64()));
        Snapshot {
            timestamp,
            uptime_seconds: uptime.as_secs(),
            token_bucket: bucket_view(&main),
            retreat: retreat_view(&main),
            requests: RequestsView {
                total: finished,
                nvidia: count(Outcome::Forwarded),
                passthrough: count(Outcome::Passthrough),
                ratelimited: count(Outcome::RejectedQueueFull)
                    + count(Outcome::RejectedQueueTimeout)
                    + count(Outcome::RejectedModelLocked),
                per_second: round3(per_second),
            },
            errors: ErrorsView {
                queue_full_rejects: count(Outcome::RejectedQueueFull),
                upstream_errors: count(Outcome::UpstreamError),
                queue_timeouts: count(Outcome::RejectedQueueTimeout),
                client_closed: count(Outcome::ClientClosed),
                too_large: count(Outcome::RejectedTooLarge),
            },
            inflight: m.inflight.get(),
            upstream_429_per_minute: per_minute_429,
            upstream_429_total: upstream_429,
            routes,
            keys: key_views(&main),
            models: main.models.clone(),
            learned_models: LearnedView::of(&main),
            shared_quota: app.shared.as_ref().map(|q| q.status()),
            clients: app.activity.clients(crate::admission::now()),
            history_sample: self.history.latest().cloned(),
        }
    }

    /// Events per second of `value` over about `span`, from the history.
    fn rate_over(&self, span: Duration, value: impl Fn(&Sample) -> u64) -> f64 {
        let (Some(last), true) = (self.totals.back(), self.totals.len() > 1) else {
            return 0.0;
        };
        let first = self
            .totals
            .iter()
            .rev()
            .skip(1)
            .find(|s| last.at.duration_since(s.at) >= span)
            .or(self.totals.front())
            .expect("totals hold at least two samples");
        let elapsed = last.at.duration_since(first.at).as_secs_f64();
        if elapsed <= 0.0 {
            0.0
        } else {
            value(last).saturating_sub(value(first)) as f64 / elapsed
        }
    }
}

/// Publishes one serialised snapshot per second until `stop`; when it returns, every
/// subscriber's stream ends.
pub(crate) async fn run_sampler(
    state: Arc<super::AdminState>,
    tx: watch::Sender<Arc<str>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                tx.send_replace(Arc::from(state.tick_json()));
            }
            _ = stop.changed() => return,
        }
    }
}
