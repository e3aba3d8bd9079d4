//! One upstream key's share of the limiter: its bucket (or the slots leased for it from a
//! shared bucket) and the adaptive controller that sets its rate. The upstream counts each key
//! on its own, so each key retreats and recovers on its own. Also the pool's rule for taking a
//! key out when the upstream refuses it, and for bringing it back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::blame::Blame;
use super::{
    Admit, Grant, Limiter, RetreatController, Slots, Supply, TokenBucket, TokenLearning,
    TokenWindow,
};

/// 403s in a row after which a key leaves the pool (see `Limiter::key_refused`).
pub const FORBIDDEN_IN_A_ROW: u32 = 3;

#[derive(Debug)]
pub struct Lane {
    pub name: Arc<str>,
    /// The key's own rate; `None` follows the route's `rate_rpm`.
    pub own_rpm: Option<f64>,
    /// The key's own token budget; `None` follows the route's `tpm`.
    pub own_tpm: Option<u64>,
    pub bucket: TokenBucket,
    /// The key's token budget (`tpm`), when one is configured or the upstream stated one.
    pub tokens: Option<TokenWindow>,
    /// The token limit the upstream stated for this key (`StatedTokens`), used while none is
    /// configured.
    pub stated_tpm: Option<u64>,
    /// The token limit learned from 429s, used while none is configured or stated.
    pub token_learning: TokenLearning,
    pub slots: Slots,
    pub supply: Supply,
    pub controller: RetreatController,
    /// False once the upstream refused the key itself (401/403): it gets no more requests.
    pub active: bool,
    /// 403s in a row on this key: one may be about a model the key may not use, several
    /// in a row are about the key.
    pub forbidden_in_a_row: u32,
    /// How the last token of this lane was granted.
    pub last_grant: Grant,
    /// A 429 charged to a model of this key while the key is judged (see `blame`).
    pub blame: Option<Blame>,
    /// The last fresh 429 charged to a model of this key, and when.
    pub model_charged: Option<(super::ModelRef, Instant)>,
    /// The key was charged while one model alone used it (see `blame`): that model, and when.
    pub alone: Option<(super::ModelRef, Instant)>,
    /// The highest limit the upstream stated for this key (`rate_rpm: auto`).
    pub stated: Option<f64>,
    /// Up to when demand was told to the controller.
    noted: Instant,
}

impl Lane {
    pub fn new(key: &super::KeyRate, base: &super::LimiterSettings, now: Instant) -> Lane {
        let own_rpm = key.rpm;
        Lane {
            name: key.name.clone(),
            own_rpm,
            own_tpm: key.tpm,
            bucket: TokenBucket::new(base.capacity, now),
            tokens: key.tpm.or(base.base_tpm).map(|t| TokenWindow::new(t, now)),
            stated_tpm: None,
            token_learning: TokenLearning::new(now),
            slots: Slots::default(),
            supply: Supply::Refill { share: 1.0 },
            controller: RetreatController::new(
                own_rpm.unwrap_or(base.base_rpm),
                base.retreat.clone(),
                now,
            ),
            active: true,
            forbidden_in_a_row: 0,
            last_grant: Grant::default(),
            blame: None,
            model_charged: None,
            alone: None,
            stated: None,
            noted: now,
        }
    }

    /// Brings the bucket and the controller up to `now`; `idle` when nobody waits, so that
    /// the bucket does not save beyond its capacity.
    pub fn advance(&mut self, now: Instant, idle: bool) {
        // Demand waited since the last call if someone queued, or the last token had just
        // been used (the state since then: every change of either comes with a call).
        let busy = !idle || !self.bucket.has_token();
        if now > self.noted {
            self.controller.note_demand(self.noted, now, busy);
            self.noted = now;
        }
        let rate = self.refill_rate(now);
        if rate == 0.0 {
            self.bucket.hold(now);
        } else {
            self.bucket.refill(now, rate, idle);
        }
        self.slots.prune(now);
        if let Some(tokens) = self.tokens.as_mut() {
            tokens.advance(now);
        }
        self.controller.tick(now);
    }

    /// Tokens per second the local bucket earns now.
    pub fn refill_rate(&self, now: Instant) -> f64 {
        match self.supply {
            Supply::Refill { share } => self.controller.admission_rate_per_sec(now) * share,
            Supply::Leased => 0.0,
        }
    }

    /// Whether `take` would succeed now, and whether it would be a regular token (not a probe).
    pub fn ready(&self, now: Instant) -> Option<bool> {
        if !self.active {
            return None;
        }
        match self.controller.admit(now) {
            Admit::Open => (self.slots.open(now) > 0 || self.bucket.has_token()).then_some(true),
            Admit::Probe => match self.supply {
                Supply::Leased => (self.slots.open(now) > 0).then_some(false),
                Supply::Refill { .. } => Some(false),
            },
            Admit::Closed => None,
        }
    }

    /// Takes a token: an open leased slot first, else one from the local bucket. While the
    /// controller probes, only a probe may go: without a token of the local bucket, but with a
    /// leased slot when the quota is shared.
    pub fn take(&mut self, lane: usize, now: Instant) -> bool {
        let taken = match self.controller.admit(now) {
            Admit::Open => self.slots.try_take(now) || self.bucket.try_take(),
            Admit::Probe => match self.supply {
                Supply::Leased => self.slots.try_take(now),
                Supply::Refill { .. } => true,
            },
            Admit::Closed => false,
        };
        if taken {
            self.last_grant = Grant {
                lane,
                ..self.controller.grant()
            };
            if self.last_grant.probe {
                self.controller.probe_sent(now);
            }
        }
        taken
    }

    /// Returns a token that was granted as `grant` but never used.
    pub fn refund(&mut self, grant: Grant) {
        if grant.probe {
            if grant.epoch == self.controller.grant().epoch && self.controller.is_probing() {
                self.controller.probe_returned();
            }
            return;
        }
        // A leased slot is not handed back: by now it may be late enough to crowd the next
        // one. It lapses, and the shared quota is under-used by one request.
        if let Supply::Refill { .. } = self.supply {
            self.bucket.refund();
        }
    }

    /// Whether `cost` fits in the key's token budget now (always, without one).
    pub fn tokens_fit(&self, cost: Option<super::TokenCost>, now: Instant) -> bool {
        match (&self.tokens, cost) {
            (Some(window), Some(cost)) => window.fits(cost, now),
            _ => true,
        }
    }

    /// The key's token budget: configured (its own, else the route's `base`), else stated by
    /// the upstream, else learned from its 429s.
    pub fn budget_tpm(&self, base: Option<u64>) -> Option<u64> {
        self.own_tpm
            .or(base)
            .or(self.stated_tpm)
            .or(self.token_learning.learned_tpm())
    }

    /// Whether the key's budget is its own to learn: neither configured nor stated.
    pub fn learns_tokens(&self, base: Option<u64>) -> bool {
        self.own_tpm.or(base).or(self.stated_tpm).is_none()
    }

    /// Where the key's token budget comes from: `config`, `header` or `learned`.
    pub fn budget_source(&self, base: Option<u64>) -> &'static str {
        if self.own_tpm.or(base).is_some() {
            "config"
        } else if self.learns_tokens(base) {
            "learned"
        } else {
            "header"
        }
    }

    /// Takes a budget learned or stated now: a key without a budget yet starts it with what
    /// its requests cost over the last window.
    pub fn adopt_tpm(&mut self, tpm: u64) {
        match self.tokens.as_mut() {
            Some(window) => window.set_limit(tpm),
            None => self.tokens = Some(self.token_learning.budget(tpm)),
        }
    }

    /// Takes the key's token budget over to `tpm` (`None`: no budget any more); what was
    /// reserved stays reserved.
    pub fn set_tpm(&mut self, tpm: Option<u64>, now: Instant) {
        match (self.tokens.as_mut(), tpm) {
            (Some(window), Some(tpm)) => window.set_limit(tpm),
            (None, Some(tpm)) => self.tokens = Some(TokenWindow::new(tpm, now)),
            (_, None) => self.tokens = None,
        }
    }

    /// When this lane can next grant (`None`: not before something else changes).
    pub fn next_token_at(&self, now: Instant) -> Option<Instant> {
        if !self.active {
            return None;
        }
        match self.controller.pause_until().filter(|p| *p > now) {
            Some(resume) => Some(resume),
            // A shared key probes with a leased slot: not before one is open.
            None if self.controller.is_probing() => match self.supply {
                Supply::Leased => self
                    .controller
                    .next_probe_event()
                    .zip(self.slots.next_open(now))
                    .map(|(probe, slot)| probe.max(slot)),
                Supply::Refill { .. } => self.controller.next_probe_event(),
            },
            None => {
                let refill = self.bucket.next_token_at(self.refill_rate(now), now);
                let slot = self.slots.next_open(now);
                match (refill, slot) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// Requests per second this lane lets through now, for wait estimates.
    pub fn estimated_rate(&self) -> f64 {
        if !self.active {
            return 0.0;
        }
        let share = match self.supply {
            Supply::Refill { share } => share,
            Supply::Leased => 1.0,
        };
        self.controller.effective_rpm() * (1.0 - self.controller.settings().safety_margin) * share
            / 60.0
    }

    /// Time left of an upstream-imposed pause.
    pub fn paused_for(&self, now: Instant) -> Option<Duration> {
        self.controller
            .pause_until()
            .map(|p| p.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }
}

/// Keys in and out of the pool.
impl Limiter {
    /// The upstream refused a request on key `lane` with 401 (`unauthorized`) or 403. A 401
    /// is about the key: it leaves the pool. A 403 may be about what the request asked for (a
    /// model this key may not use): the key leaves only after `FORBIDDEN_IN_A_ROW` of them with
    /// nothing accepted between. Returns true when the key left the pool now.
    pub fn key_refused(&mut self, lane: usize, unauthorized: bool) -> bool {
        let Some(l) = self.lanes.get_mut(lane) else {
            return false;
        };
        l.forbidden_in_a_row += u32::from(!unauthorized);
        if unauthorized || l.forbidden_in_a_row >= FORBIDDEN_IN_A_ROW {
            self.revoke(lane)
        } else {
            false
        }
    }

    /// The names of the keys, in lane order.
    pub fn key_names(&self) -> Vec<Arc<str>> {
        self.lanes.iter().map(|l| l.name.clone()).collect()
    }

    /// Brings a key back into the pool (its value was replaced by a reload).
    pub fn reinstate(&mut self, lane: usize) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.active = true;
            l.forbidden_in_a_row = 0;
        }
    }

    /// Takes a key out of the pool: the upstream refused the key itself. The last active key
    /// is kept, since with no key at all nothing could be sent; false when nothing changed.
    pub fn revoke(&mut self, lane: usize) -> bool {
        let active = self.lanes.iter().filter(|l| l.active).count();
        match self.lanes.get_mut(lane) {
            Some(l) if l.active && active > 1 => {
                l.active = false;
                true
            }
            _ => false,
        }
    }
}
