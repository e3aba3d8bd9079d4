//! Read-only pictures of a limiter (for `/status` and the metrics) and the state it carries
//! across a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    model_index, Ceiling, CeilingSource, Lane, Learned, Limiter, ModelSettings, Priority,
    RetreatController, RetreatState, Supply, TokenBucket,
};

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
    /// What the key's controller learned, and when it moves next.
    pub learning: Learning,
    /// The highest limit the upstream stated for the key (`rate_rpm: auto`).
    pub stated_rpm: Option<f64>,
    /// The lanes of the models learned on this key.
    pub models: Vec<ModelLaneSnapshot>,
    /// The key's token budget, if it has one.
    pub token_budget: Option<TokenBudgetSnapshot>,
}

/// A token budget as it stands: its limit, what counts in it now, and where the limit comes
/// from (`config`, or `header` when the upstream stated it).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBudgetSnapshot {
    pub tpm: u64,
    pub used: u64,
    pub source: &'static str,
}

/// What a controller learned and what it does next, for `/status` and the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Learning {
    /// The rate recovery climbs to, if there is one.
    pub ceiling_rpm: Option<f64>,
    /// Where it comes from: `window`, `header`, `config`, `proven` (a floor a busy window
    /// proved, stepped above once per window) or `pending` (held at the cut rate until a
    /// whole busy window teaches it).
    pub ceiling_source: Option<&'static str>,
    /// When the rate goes up next by itself.
    pub next_step_in: Option<Duration>,
    /// How long ago the lane met its last 429, and what it said.
    pub last_429_ago: Option<Duration>,
    pub last_429_reason: Option<&'static str>,
}

impl Learning {
    /// With nothing learned from 429s, a limit that holds the lane anyway (stated by the
    /// upstream, or configured) shows as its ceiling.
    fn or_limit(mut self, limit: Option<Ceiling>) -> Learning {
        if let (None, Some(c)) = (self.ceiling_rpm, limit) {
            self.ceiling_rpm = Some(c.rpm);
            self.ceiling_source = Some(c.source.as_str());
        }
        self
    }

    fn of(controller: &RetreatController, now: Instant) -> Learning {
        let (ceiling_rpm, ceiling_source) = match controller.learned() {
            Learned::Nothing => (None, None),
            Learned::Pending { .. } => (Some(controller.effective_rpm()), Some("pending")),
            Learned::Known(c) => (Some(c.rpm), Some(c.source.as_str())),
            Learned::Floor(rpm) => (Some(rpm), Some("proven")),
        };
        let refusal = controller.last_refusal();
        Learning {
            ceiling_rpm,
            ceiling_source,
            next_step_in: controller
                .next_step_at()
                .map(|at| at.saturating_duration_since(now)),
            last_429_ago: refusal.map(|r| now.saturating_duration_since(r.at)),
            last_429_reason: refusal.map(|r| r.reason.as_str()),
        }
    }
}

/// A read-only picture of one model's lane on one key.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLaneSnapshot {
    pub model: Arc<str>,
    /// Whether the lane holds its model back (below its key's rate, or paused).
    pub limiting: bool,
    pub state: RetreatState,
    pub effective_rpm: f64,
    pub probing: bool,
    pub paused_for: Option<Duration>,
    pub learning: Learning,
    /// The limit the upstream stated for this model on this key (`rate_rpm: auto`).
    pub stated_rpm: Option<f64>,
}

/// A read-only picture of one learned model (across keys).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LearnedModelSnapshot {
    pub model: String,
    pub in_flight: u32,
    pub waiting: u32,
    /// The concurrency learned from capacity errors (`None`: unlimited).
    pub concurrency_limit: Option<u32>,
    pub capacity_errors: u64,
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
    /// The models learned without configuration.
    pub learned: Vec<LearnedModelSnapshot>,
    /// Learned models dropped to make room for new ones, since the start.
    pub learned_evicted: u64,
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
        let patterns: Vec<ModelSettings> = self.models.iter().map(|m| m.settings.clone()).collect();
        // The rate `models:` gives a model id, if any.
        let configured = |id: &str| model_index(&patterns, id).and_then(|i| patterns[i].rate_rpm);
        let keys: Vec<KeySnapshot> = self
            .lanes
            .iter()
            .enumerate()
            .map(|(k, l)| KeySnapshot {
                name: l.name.clone(),
                active: l.active,
                tokens: (l.bucket.tokens() + l.slots.open(now) as f64).min(l.bucket.capacity()),
                base_rpm: l.controller.base_rpm(),
                effective_rpm: l.controller.effective_rpm(),
                state: l.controller.state(),
                probing: l.controller.is_probing(),
                paused_for: l.paused_for(now),
                learning: Learning::of(&l.controller, now).or_limit(l.stated.map(|rpm| Ceiling {
                    rpm,
                    source: CeilingSource::Header,
                })),
                stated_rpm: l.stated,
                token_budget: l.tokens.as_ref().map(|w| TokenBudgetSnapshot {
                    tpm: w.limit(),
                    used: w.used(now),
                    source: l.budget_source(self.base_tpm),
                }),
                models: self
                    .learned
                    .models()
                    .filter_map(|m| {
                        let lane = m.lanes.get(k)?.as_ref()?;
                        let c = &lane.controller;
                        Some(ModelLaneSnapshot {
                            model: m.id.clone(),
                            limiting: lane.limiting(now),
                            state: c.state(),
                            effective_rpm: c.effective_rpm().min(l.controller.effective_rpm()),
                            probing: c.is_probing(),
                            paused_for: c
                                .pause_until()
                                .map(|p| p.saturating_duration_since(now))
                                .filter(|d| !d.is_zero()),
                            learning: Learning::of(c, now).or_limit(
                                lane.stated
                                    .filter(|s| *s < l.controller.effective_rpm())
                                    .map(|rpm| Ceiling {
                                        rpm,
                                        source: CeilingSource::Header,
                                    })
                                    .or_else(|| {
                                        configured(&m.id).map(|rpm| Ceiling {
                                            rpm,
                                            source: CeilingSource::Config,
                                        })
                                    }),
                            ),
                            stated_rpm: lane.stated,
                        })
                    })
                    .collect(),
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
            learned: self
                .learned
                .models()
                .map(|m| LearnedModelSnapshot {
                    model: m.id.to_string(),
                    in_flight: m.concurrency.in_flight,
                    waiting: m.waiting,
                    concurrency_limit: m.concurrency.concurrency_limit(),
                    capacity_errors: m.concurrency.capacity_errors,
                })
                .collect(),
            learned_evicted: self.learned.evicted,
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

/// A learned model's lane on a key, to save for a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedModelLane {
    pub key: Arc<str>,
    pub model: Arc<str>,
    pub state: LimiterState,
}

impl Limiter {
    /// The lanes that hold a model back (the others learned nothing worth keeping), to save
    /// for a restart.
    pub fn export_models(&mut self, now: Instant) -> Vec<SavedModelLane> {
        self.advance(now);
        let mut saved = Vec::new();
        for m in self.learned.models() {
            for (k, lane) in m.lanes.iter().enumerate() {
                let Some(lane) = lane.as_ref().filter(|l| l.limiting(now)) else {
                    continue;
                };
                let c = &lane.controller;
                saved.push(SavedModelLane {
                    key: self.lanes[k].name.clone(),
                    model: m.id.clone(),
                    state: LimiterState {
                        tokens: lane.bucket.tokens().min(1.0),
                        effective_rpm: c.effective_rpm(),
                        state: c.state(),
                        pause_remaining: c
                            .pause_until()
                            .map(|p| p.saturating_duration_since(now))
                            .filter(|d| !d.is_zero()),
                        ceiling: match c.learned() {
                            Learned::Known(ceiling) => Some(ceiling),
                            _ => None,
                        },
                    },
                });
            }
        }
        saved
    }

    /// Takes over a saved model lane that is `age` old; false when its key is gone or no
    /// place is free for its model.
    pub fn restore_model(&mut self, saved: &SavedModelLane, age: Duration, now: Instant) -> bool {
        self.advance(now);
        let Some(key) = self.lanes.iter().position(|l| l.name == saved.key) else {
            return false;
        };
        let Some(model) = self.learned.intern(&saved.model, now) else {
            return false;
        };
        let key_rpm = self.lanes[key].controller.effective_rpm();
        let Some(lane) = self
            .learned
            .lane_mut(model, key, key_rpm, &self.retreat, now)
        else {
            return false;
        };
        let pause_until = saved
            .state
            .pause_remaining
            .and_then(|p| p.checked_sub(age))
            .filter(|p| !p.is_zero())
            .map(|p| now + p);
        lane.controller.restore(
            saved.state.state,
            saved.state.effective_rpm,
            saved.state.ceiling,
            pause_until,
            now,
        );
        lane.bucket = TokenBucket::with_tokens(1, 0.0, now);
        true
    }
}
