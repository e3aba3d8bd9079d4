//! Read-only pictures of a limiter (for `/status` and the metrics) and the state it carries
//! across a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Ceiling, Lane, Learned, Limiter, Priority, RetreatState, Supply, TokenBucket};

/// A read-only picture of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySnapshot {
    pub name: Arc<str>,
    pub active: bool,
    pub tokens: f64,
    pub base_rpm: f64,
    pub effective_rpm: f64,
    pub state: RetreatState,
    pub probing: bool,
    pub paused_for: Option<Duration>,
}

/// A read-only picture of one model limit (`/status` shows it as it is).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelSnapshot {
    pub pattern: String,
    pub in_flight: u32,
    /// The concurrency allowed now (`None`: unlimited).
    pub concurrency_limit: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub rate_rpm: Option<f64>,
    pub capacity_errors: u64,
}

/// A read-only picture of the limiter for status pages and metrics. The rate fields are the
/// sums over the active keys; the controller's state is that of the key cut furthest.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSnapshot {
    pub tokens: f64,
    pub capacity: f64,
    pub base_rpm: f64,
    pub effective_rpm: f64,
    pub state: RetreatState,
    /// Probing a full window after a 429: one request at a time, no tokens issued.
    pub probing: bool,
    pub upstream_429_ratio: f64,
    /// Waiters by priority: high, normal, low.
    pub queue_depth: [usize; 3],
    pub queue_max: usize,
    pub paused_for: Option<Duration>,
    pub keys: Vec<KeySnapshot>,
    pub models: Vec<ModelSnapshot>,
}

/// What a limiter carries across a restart (its first key's state).
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterState {
    pub tokens: f64,
    pub effective_rpm: f64,
    pub state: RetreatState,
    /// Time left of an upstream-imposed pause when the state was taken.
    pub pause_remaining: Option<Duration>,
    /// The ceiling recovery climbs to, when one is known.
    pub ceiling: Option<Ceiling>,
}

impl Limiter {
    pub fn snapshot(&mut self, now: Instant) -> LimiterSnapshot {
        self.advance(now);
        let keys: Vec<KeySnapshot> = self
            .lanes
            .iter()
            .map(|l| KeySnapshot {
                name: l.name.clone(),
                active: l.active,
                tokens: (l.bucket.tokens() + l.slots.open(now) as f64).min(l.bucket.capacity()),
                base_rpm: l.controller.base_rpm(),
                effective_rpm: l.controller.effective_rpm(),
                state: l.controller.state(),
                probing: l.controller.is_probing(),
                paused_for: l.paused_for(now),
            })
            .collect();
        let active: Vec<&Lane> = self.lanes.iter().filter(|l| l.active).collect();
        let cut_furthest = active
            .iter()
            .copied()
            .min_by(|a, b| {
                let ratio = |l: &Lane| l.controller.effective_rpm() / l.controller.base_rpm();
                ratio(a).total_cmp(&ratio(b))
            })
            .unwrap_or(&self.lanes[0]);
        LimiterSnapshot {
            tokens: keys.iter().filter(|k| k.active).map(|k| k.tokens).sum(),
            capacity: active.iter().map(|l| l.bucket.capacity()).sum(),
            base_rpm: active.iter().map(|l| l.controller.base_rpm()).sum(),
            effective_rpm: active.iter().map(|l| l.controller.effective_rpm()).sum(),
            state: cut_furthest.controller.state(),
            probing: cut_furthest.controller.is_probing(),
            upstream_429_ratio: cut_furthest.controller.upstream_429_ratio(now),
            queue_depth: [
                self.queue.depth(Priority::High),
                self.queue.depth(Priority::Normal),
                self.queue.depth(Priority::Low),
            ],
            queue_max: self.queue_max,
            paused_for: cut_furthest.paused_for(now),
            keys,
            models: self
                .models
                .iter()
                .map(|m| ModelSnapshot {
                    pattern: m.settings.pattern.clone(),
                    in_flight: m.in_flight,
                    concurrency_limit: m.concurrency_limit(),
                    max_concurrency: m.settings.max_concurrency,
                    rate_rpm: m.settings.rate_rpm,
                    capacity_errors: m.capacity_errors,
                })
                .collect(),
        }
    }

    /// The state of the first key, to save for a restart.
    pub fn export(&mut self, now: Instant) -> LimiterState {
        self.export_key(0, now)
    }

    /// The state of key `lane`, to save for a restart.
    pub fn export_key(&mut self, lane: usize, now: Instant) -> LimiterState {
        self.advance(now);
        let lane = self.lane(lane);
        LimiterState {
            tokens: lane.bucket.tokens().min(lane.bucket.capacity()),
            effective_rpm: lane.controller.effective_rpm(),
            state: lane.controller.state(),
            pause_remaining: lane.paused_for(now),
            ceiling: match lane.controller.learned() {
                Learned::Known(c) => Some(c),
                _ => None,
            },
        }
    }

    /// Takes over a saved state that is `age` old: the pause is shortened by the age, and the
    /// bucket earns what it would have earned meanwhile at the saved rate, never more than its
    /// capacity — so a restart neither forgets a retreat nor bursts into the upstream.
    pub fn restore(&mut self, saved: &LimiterState, age: Duration, now: Instant) {
        self.restore_key(0, saved, age, now);
    }

    /// `restore` for key `lane`.
    pub fn restore_key(&mut self, lane: usize, saved: &LimiterState, age: Duration, now: Instant) {
        let lane = self.lane_mut(lane);
        let pause_until = saved
            .pause_remaining
            .and_then(|p| p.checked_sub(age))
            .filter(|p| !p.is_zero())
            .map(|p| now + p);
        lane.controller.restore(
            saved.state,
            saved.effective_rpm,
            saved.ceiling,
            pause_until,
            now,
        );
        let earning = age.saturating_sub(saved.pause_remaining.unwrap_or_default());
        let margin = 1.0 - lane.controller.settings().safety_margin;
        let earned = earning.as_secs_f64() * lane.controller.effective_rpm() * margin / 60.0;
        // Leased slots are the only tokens of a shared bucket; nothing saved locally counts.
        let tokens = if pause_until.is_some() || lane.supply == Supply::Leased {
            0.0
        } else {
            saved.tokens + earned
        };
        let capacity = lane.bucket.capacity() as u32;
        lane.bucket = TokenBucket::with_tokens(capacity, tokens, now);
    }
}
