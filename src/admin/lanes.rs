//! The keys and the learned models as `/status` shows them: per key and per model, the state,
//! the rate now, the ceiling learned and where it came from, when the rate moves next, and the
//! last 429. The keys' own values never appear, only their names.

use serde::Serialize;

use crate::limiter::{
    LearnedModelSnapshot, Learning, LimiterSnapshot, ModelLaneSnapshot, MAX_LEARNED_MODELS,
};

#[derive(Debug, Serialize)]
pub struct KeyView {
    pub name: String,
    /// False once the upstream refused the key (401/403): it gets no more requests.
    pub active: bool,
    pub tokens: f64,
    pub base_rpm: f64,
    pub effective_rpm: f64,
    pub state: &'static str,
    pub probing: bool,
    pub pause_remaining_seconds: f64,
    #[serde(flatten)]
    pub learning: LearningView,
    /// The highest limit the upstream stated for this key (`rate_rpm: auto`; `null`: none).
    pub stated_rpm: Option<f64>,
    /// The lanes of the models learned on this key.
    pub models: Vec<ModelLaneView>,
    /// The key's token budget (`null`: none): `tpm`, the tokens that count in the last 60 s
    /// (`used`), and `source`, `config` or `header` (stated by the upstream).
    pub token_budget: Option<TokenBudgetView>,
}

#[derive(Debug, Serialize)]
pub struct TokenBudgetView {
    pub tpm: u64,
    pub used: u64,
    pub source: &'static str,
}

/// What a lane learned, and what it does next.
#[derive(Debug, Serialize)]
pub struct LearningView {
    /// The rate recovery climbs to (`null`: none, the lane is at its base rate).
    pub ceiling_rpm: Option<f64>,
    /// `window` (what a busy window accepted), `header` (the upstream's stated limit),
    /// `config`, `proven` (a floor that recovery steps above once per window) or `pending`
    /// (held at the cut rate until a whole busy window teaches the ceiling).
    pub ceiling_source: Option<&'static str>,
    /// Seconds until the rate goes up by itself (`null`: it will not).
    pub next_step_in_seconds: Option<f64>,
    pub last_429_seconds_ago: Option<f64>,
    /// `rate_limit` (a bare 429) or `retry_after`.
    pub last_429_reason: Option<&'static str>,
}

impl LearningView {
    fn of(l: &Learning) -> LearningView {
        LearningView {
            ceiling_rpm: l.ceiling_rpm.map(round3),
            ceiling_source: l.ceiling_source,
            next_step_in_seconds: l.next_step_in.map(|d| round3(d.as_secs_f64())),
            last_429_seconds_ago: l.last_429_ago.map(|d| round3(d.as_secs_f64())),
            last_429_reason: l.last_429_reason,
        }
    }
}

/// One model's lane on one key.
#[derive(Debug, Serialize)]
pub struct ModelLaneView {
    pub model: String,
    /// Whether the lane holds its model back (below its key's rate, or paused).
    pub limiting: bool,
    pub state: &'static str,
    /// The rate the model gets on this key now (at most the key's).
    pub effective_rpm: f64,
    pub probing: bool,
    pub pause_remaining_seconds: f64,
    #[serde(flatten)]
    pub learning: LearningView,
    /// The limit the upstream stated for this model on this key (`rate_rpm: auto`).
    pub stated_rpm: Option<f64>,
}

impl ModelLaneView {
    fn of(m: &ModelLaneSnapshot) -> ModelLaneView {
        ModelLaneView {
            model: m.model.to_string(),
            limiting: m.limiting,
            state: m.state.as_str(),
            effective_rpm: round3(m.effective_rpm),
            probing: m.probing,
            pause_remaining_seconds: round3(m.paused_for.map_or(0.0, |d| d.as_secs_f64())),
            learning: LearningView::of(&m.learning),
            stated_rpm: m.stated_rpm,
        }
    }
}

pub fn key_views(s: &LimiterSnapshot) -> Vec<KeyView> {
    s.keys
        .iter()
        .map(|k| KeyView {
            name: k.name.to_string(),
            active: k.active,
            tokens: round3(k.tokens),
            base_rpm: k.base_rpm,
            effective_rpm: round3(k.effective_rpm),
            state: k.state.as_str(),
            probing: k.probing,
            pause_remaining_seconds: round3(k.paused_for.map_or(0.0, |d| d.as_secs_f64())),
            learning: LearningView::of(&k.learning),
            stated_rpm: k.stated_rpm,
            models: k.models.iter().map(ModelLaneView::of).collect(),
            token_budget: k.token_budget.as_ref().map(|b| TokenBudgetView {
                tpm: b.tpm,
                used: b.used,
                source: b.source,
            }),
        })
        .collect()
}

/// The models learned without configuration, bounded in number.
#[derive(Debug, Serialize)]
pub struct LearnedView {
    pub count: usize,
    /// At most this many are learned at once: a new model takes the place of the least
    /// recently used one that nobody waits for.
    pub max: usize,
    /// Models dropped to make room for new ones, since the start.
    pub evicted: u64,
    pub models: Vec<LearnedModelSnapshot>,
}

impl LearnedView {
    pub fn of(s: &LimiterSnapshot) -> LearnedView {
        LearnedView {
            count: s.learned.len(),
            max: MAX_LEARNED_MODELS,
            evicted: s.learned_evicted,
            models: s.learned.clone(),
        }
    }
}

/// Rounded to three decimals, as `/status` shows its numbers.
pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
