//! The controller's vocabulary: how a grant is stamped, what the bucket may do, the phases
//! and their data, and what is learned of the upstream's rate.

use std::time::Instant;

use super::Probing;

/// How a token was granted, so that the answer to it can be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grant {
    /// The key controller's epoch when the token was granted (see the module doc).
    pub epoch: u64,
    /// The grant was a probe sent while the key's controller was probing.
    pub probe: bool,
    /// The key (lane of the limiter) the token was taken from.
    pub lane: usize,
    /// The configured model limit whose slot the grant holds (an index into `models`).
    pub model: Option<usize>,
    /// The learned lane of the request's model on that key, and how it was granted there.
    pub learned: Option<ModelGrant>,
    /// The grant tests whether a 429 another model met on this key was about the key.
    pub test: bool,
    /// What the grant reserved on the token budgets, to be settled once the upstream counted.
    pub tokens: Option<crate::limiter::HoldId>,
}

/// How a grant was stamped by the lane of its model on its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelGrant {
    /// Which model (a reference into the limiter's learned models).
    pub model: crate::limiter::ModelRef,
    /// That lane's epoch when the token was granted.
    pub epoch: u64,
    /// The grant was that lane's probe.
    pub probe: bool,
}

/// What the controller lets the bucket do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Grant tokens at the effective rate.
    Open,
    /// Probing: one request may go now, as a probe, without a token.
    Probe,
    /// Nothing may go now (paused, or a probe is out or not yet due).
    Closed,
}

/// Where the controller stands, with what each phase needs to know.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// At the base rate.
    Normal,
    /// Cut by a 429 at `quiet_since` (or later 429s); probing while the window is still full.
    Retreat {
        quiet_since: Instant,
        probing: Option<Probing>,
    },
    /// Climbing back; `last_step` is when the rate last went up. `above` is the rate the
    /// last step above the learned ceiling started from: a 429 on that step goes back to it.
    Recover {
        last_step: Instant,
        above: Option<f64>,
    },
}

/// Where a known ceiling comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CeilingSource {
    /// What a busy window accepted before a 429.
    Window,
    /// The upstream's own `x-ratelimit-limit-*` (or `anthropic-ratelimit-*`) headers.
    Header,
    /// The operator's configuration (`models[].rate_rpm`).
    Config,
}

impl CeilingSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CeilingSource::Window => "window",
            CeilingSource::Header => "header",
            CeilingSource::Config => "config",
        }
    }
}

/// A rate recovery does not climb above (except by rare explicit steps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ceiling {
    pub rpm: f64,
    pub source: CeilingSource,
}

/// What the controller learned of the upstream's rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Learned {
    /// Nothing: no cut since the base rate was last reached.
    Nothing,
    /// Cut at `since`, before a whole busy window was observed: recovery holds at the cut
    /// rate until one has passed, which then teaches the ceiling. A window after the cut that
    /// was not busy teaches nothing: the cut rate is then only a floor.
    Pending { since: Instant },
    /// The upstream's rate (less the headroom): recovery climbs to it.
    Known(Ceiling),
    /// Only proven up to this rate: recovery verifies one step above per busy window.
    Floor(f64),
}

impl Learned {
    /// The rate recovery climbs to by itself, if it is bounded.
    pub fn bound(&self) -> Option<f64> {
        match self {
            Learned::Known(c) => Some(c.rpm),
            Learned::Floor(rpm) => Some(*rpm),
            Learned::Nothing | Learned::Pending { .. } => None,
        }
    }
}

/// Why the upstream last refused a request of this lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// A 429 without a word on when to come back.
    RateLimit,
    /// A 429 that said how long to wait.
    RetryAfter,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::RateLimit => "rate_limit",
            RefusalReason::RetryAfter => "retry_after",
        }
    }
}

/// The last 429 a lane met.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    pub at: Instant,
    pub reason: RefusalReason,
}
