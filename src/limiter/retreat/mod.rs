//! The adaptive controller of one lane (a key, or a model on a key): retreats when the
//! upstream answers 429, recovers when it stops. It reads as its phases ([`Phase`]):
//!
//! - `Normal`: the rate is the base rate;
//! - `Retreat`: the rate was cut by a 429; while the upstream's window is still full the
//!   controller probes it (see below), then it waits for a quiet period;
//! - `Recover`: the rate climbs back, step by step, to what the upstream was seen to accept.
//!
//! **Probing.** The controller does not know the upstream's window. A 429 without
//! `Retry-After` says the window is full *now*, not when it frees: sending on at the cut rate
//! into a window that stays full for tens of seconds would collect a 429 every interval. So a
//! cut also starts probing: no tokens are issued, one request at a time goes as a probe, the
//! first one interval of the cut rate after the 429 (and not before a `Retry-After` pause has
//! ended), and every further 429 triples the spacing — but never waits past the moment the
//! oldest request accepted in our window leaves it, when an upstream whose window is no
//! longer than ours has room again. The first probe the upstream accepts (or that gets no
//! answer within [`PROBE_ANSWER_TIMEOUT`]) ends probing and the cut rate resumes.
//!
//! **Epochs.** Every cut starts a new epoch, and every grant is stamped with the epoch it was
//! given in ([`Grant`]). Answers to grants of an older epoch were sent before the cut took
//! effect: they are counted in the window but neither cut again nor judge a probe.
//!
//! **What is learned ([`Learned`]), only from busy time** (see `history`): a cut after a window
//! in which demand waited nearly all along learns the rate that window accepted, less a
//! headroom, as a known ceiling; recovery climbs to it and tries one step above it only after
//! `probe_interval`. A cut after a window that was partly idle learns nothing yet: recovery
//! holds at the cut rate until a whole busy window has passed, and learns from that one. A
//! window that shows little more than the cut rate proves only that rate (a floor): recovery
//! then verifies one step above it per busy window, not per `probe_interval`. Idle time
//! teaches nothing.

use std::time::{Duration, Instant};

use super::signals::{NonRateLimitReason, UpstreamSignal};

mod history;
mod phase;
mod probing;
mod recover;
mod settings;
mod shared;

use history::History;
pub use phase::{
    Admit, Ceiling, CeilingSource, Grant, Learned, ModelGrant, Phase, Refusal, RefusalReason,
};
pub use probing::Probing;
pub use settings::{RetreatSettings, RetreatState};
pub use shared::SharedControl;

/// Factor by which the spacing between probes grows with every probe the upstream refuses.
const PROBE_GROWTH: u32 = 3;

/// Longest spacing between two probes.
const PROBE_SPACING_MAX: Duration = Duration::from_secs(600);

/// Longest pause a key takes from the upstream's word: a key paused for hours would stop every
/// model on it. A model's lane may be paused longer (see `for_model`).
pub const KEY_MAX_PAUSE: Duration = Duration::from_secs(3600);

/// Longest pause a model's lane takes (NVIDIA answers some models "try again in 5 hours").
pub const MODEL_MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// Share of its effective rate a key must have had accepted over a busy window for a 429 to
/// be about the key itself, whichever model met it.
pub const KEY_FULL_SHARE: f64 = 0.9;

/// A window after a cut that accepted no more than this share above the cut rate was spent
/// at the cut rate: it proves that rate (a floor), and says nothing of the quota above it.
const AT_THE_CUT_RATE: f64 = 0.1;

/// The deepest cut for a 429 at a known ceiling (see `cut`).
const AT_CEILING_DECREASE: f64 = 0.9;

/// A probe still unanswered after this long is taken as accepted. Rate-limit answers come at
/// once, while an accepted LLM request may take minutes before its response header.
pub const PROBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Decides the effective request rate of one lane from what the upstream answers.
#[derive(Debug, Clone)]
pub struct RetreatController {
    settings: RetreatSettings,
    base_rpm: f64,
    effective_rpm: f64,
    phase: Phase,
    learned: Learned,
    pause_until: Option<Instant>,
    history: History,
    /// Bumped by every cut; see [`Grant`].
    epoch: u64,
    /// The highest rate that ran a whole busy window without a 429 since the last cut: proven
    /// safe, so a later ceiling is never below it.
    proven_rpm: Option<f64>,
    last_cut: Option<Instant>,
    last_refusal: Option<Refusal>,
    /// Set when this controller sees only part of the traffic on the quota (it is shared
    /// with other sidecars): the rate it saw accepted says nothing about the quota then.
    partial_view: bool,
    /// The upstream said the account is out of credit (a billing 429) until about then: its
    /// 429s are passed on at once rather than replayed.
    billing_until: Option<Instant>,
    /// A model's lane on a key: its base rate is its key's, of which its demand got only a
    /// share, so a cut starts from what it was sent, not from its nominal rate.
    shares_parent: bool,
    /// Longest pause the upstream's word imposes on this lane.
    max_pause: Duration,
    /// The lowest rate a step above the ceiling met a 429 at, since the last real cut: the
    /// upstream's rate lies between the ceiling and it, so the next step goes half-way.
    refused_rpm: Option<f64>,
}

impl RetreatController {
    pub fn new(base_rpm: f64, settings: RetreatSettings, now: Instant) -> Self {
        RetreatController {
            history: History::new(settings.window, now),
            settings,
            base_rpm,
            effective_rpm: base_rpm,
            phase: Phase::Normal,
            learned: Learned::Nothing,
            pause_until: None,
            epoch: 0,
            proven_rpm: None,
            last_cut: None,
            last_refusal: None,
            partial_view: false,
            billing_until: None,
            shares_parent: false,
            max_pause: KEY_MAX_PAUSE,
            refused_rpm: None,
        }
    }

    /// A controller for a model's lane on a key (see `shares_parent`).
    pub fn for_model(base_rpm: f64, settings: RetreatSettings, now: Instant) -> Self {
        RetreatController {
            shares_parent: true,
            max_pause: MODEL_MAX_PAUSE,
            ..RetreatController::new(base_rpm, settings, now)
        }
    }

    /// Feeds one upstream answer to the controller, as if it answered a grant of the current
    /// epoch that was not a probe.
    pub fn observe(&mut self, signal: &UpstreamSignal, now: Instant) {
        self.observe_answer(signal, self.unprobed_grant(), now);
    }

    /// The stamp of a request sent now without a token or outside probing (a passthrough
    /// answer, a fail-open request): of the current epoch, never a probe.
    pub fn unprobed_grant(&self) -> Grant {
        Grant {
            probe: false,
            ..self.grant()
        }
    }

    /// Feeds the upstream's answer to the request granted as `grant` (its key's stamp).
    pub fn observe_answer(&mut self, signal: &UpstreamSignal, grant: Grant, now: Instant) {
        self.observe_stamped(signal, grant.epoch, grant.probe, now);
    }

    /// Feeds the upstream's answer to a request this controller stamped with `epoch` and
    /// `probe`.
    pub fn observe_stamped(
        &mut self,
        signal: &UpstreamSignal,
        epoch: u64,
        probe: bool,
        now: Instant,
    ) {
        let current = epoch == self.epoch;
        let probe = current && probe && self.is_probing();
        match signal {
            UpstreamSignal::Accepted { pause } => {
                self.history.record(now, false);
                if let Some(pause) = pause {
                    self.pause_for(*pause, now);
                }
                if probe {
                    self.end_probing();
                }
            }
            UpstreamSignal::RateLimited { retry_after } => {
                self.history.record(now, true);
                if !current {
                    // Sent before the last cut took effect: already answered for.
                    return;
                }
                self.last_refusal = Some(Refusal {
                    at: now,
                    reason: if retry_after.is_some() {
                        RefusalReason::RetryAfter
                    } else {
                        RefusalReason::RateLimit
                    },
                });
                if let Some(wait) = retry_after {
                    self.pause_for(*wait, now);
                }
                if let Phase::Retreat { quiet_since, .. } = &mut self.phase {
                    *quiet_since = now;
                }
                if probe {
                    self.probe_refused(now);
                    return;
                }
                let cut = match self.phase {
                    Phase::Normal => {
                        retry_after.is_some()
                            || self.history.limited_ratio(now) > self.settings.threshold
                    }
                    Phase::Recover { .. } | Phase::Retreat { .. } => true,
                };
                if cut {
                    self.cut(now);
                    // With `Retry-After` the probing starts when the pause ends: the upstream's
                    // word on when its window frees is checked with one request before the
                    // cut rate resumes.
                    self.start_probing(now);
                }
            }
            UpstreamSignal::NotRateLimit(reason) => {
                if *reason == NonRateLimitReason::InsufficientQuota {
                    self.billing_until = Some(now + self.settings.window);
                }
                if probe {
                    self.probe_returned();
                }
            }
            UpstreamSignal::NoAnswer => {
                if probe {
                    // The probe learned nothing about the quota: the next one may go.
                    self.probe_returned();
                }
            }
        }
    }

    /// Records an answer in the window without acting on it: a 429 that was charged to
    /// another lane (the key's, or a model's) still counts among this lane's answers.
    pub fn record(&mut self, now: Instant, rate_limited: bool) {
        self.history.record(now, rate_limited);
    }

    /// Whether the upstream accepted nearly this lane's whole effective rate over the busy
    /// window that ends now: it was running at its limit, so a 429 then is about it.
    pub fn running_full(&self, now: Instant) -> bool {
        self.history.busy_window(now)
            && self.history.accepted_rpm(now)
                >= KEY_FULL_SHARE * self.effective_rpm * (1.0 - self.settings.safety_margin)
    }

    /// Takes back the decisions of `earlier` (a copy of this controller from before a 429 that
    /// turned out to be another lane's), keeping what was observed since. The epoch moves on,
    /// so that answers to what was granted in between judge nothing.
    pub fn take_back(&mut self, earlier: &RetreatController) {
        self.effective_rpm = earlier.effective_rpm;
        self.phase = earlier.phase;
        self.learned = earlier.learned;
        self.pause_until = earlier.pause_until;
        self.proven_rpm = earlier.proven_rpm;
        self.last_cut = earlier.last_cut;
        self.epoch += 1;
    }

    /// Requests per minute the upstream accepted of this lane over the last window.
    pub fn accepted_rpm(&self, now: Instant) -> f64 {
        self.history.accepted_rpm(now)
    }

    /// When this lane last had an answer.
    pub fn last_answer(&self) -> Option<Instant> {
        self.history.last_answer()
    }

    /// Demand waited for this lane from `from` to `to` (`busy`), or it did not.
    pub fn note_demand(&mut self, from: Instant, to: Instant, busy: bool) {
        if busy {
            self.history.busy(from, to);
        }
    }

    /// The stamp of a token granted now.
    pub fn grant(&self) -> Grant {
        Grant {
            epoch: self.epoch,
            probe: self.is_probing(),
            ..Grant::default()
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A billing 429 was seen within the last window: 429s are not worth replaying.
    pub fn billing_refused(&self, now: Instant) -> bool {
        self.billing_until.is_some_and(|until| until > now)
    }

    fn cut(&mut self, now: Instant) {
        let before = self.effective_rpm;
        // The rate that proved too much: the effective rate, or for a model's lane what its
        // demand actually got of its key's rate.
        let min_busy = self.settings.window / 10;
        let too_much = match self.history.sent_rpm(now, min_busy) {
            Some(sent) if self.shares_parent => sent.min(self.effective_rpm),
            _ => self.effective_rpm,
        };
        let measured = if self.partial_view {
            // Sharing the quota, this controller never sees the whole traffic.
            Some(self.effective_rpm)
        } else if self.history.busy_window(now) {
            Some(self.history.accepted_rpm(now).min(self.effective_rpm))
        } else {
            None
        };
        // At a known ceiling, a 429 says the ceiling was a little high (a fixed window's or a
        // token bucket's count runs ahead of its rate): a small cut to what the window
        // accepted. Anywhere else the quota may have fallen far: the usual multiplicative cut.
        let at_known_ceiling = matches!(self.phase, Phase::Recover { above: None, .. })
            && matches!(self.learned, Learned::Known(c) if before >= c.rpm * (1.0 - 1e-6));
        let decrease = match measured {
            Some(m) if at_known_ceiling => (self.headroom(m) / before).max(AT_CEILING_DECREASE),
            _ => self.settings.decrease_factor,
        };
        self.effective_rpm = (too_much * decrease.min(1.0))
            .max(self.floor_rpm())
            .min(self.base_rpm);
        // A window that held an earlier cut was not spent near the quota all along: what it
        // accepted is a floor, not the quota.
        let earlier_cut = self
            .last_cut
            .is_some_and(|last| now.saturating_duration_since(last) < self.settings.window);
        self.last_cut = Some(now);
        // A rate proven before is a floor for the ceiling, unless this 429 came at it.
        let proven = self
            .proven_rpm
            .take()
            .filter(|p| *p < before * (1.0 - 1e-6))
            .unwrap_or(0.0);
        self.learned = match measured {
            Some(rpm) => {
                let rpm = self.headroom(rpm).max(proven).min(self.base_rpm);
                if earlier_cut {
                    Learned::Floor(rpm)
                } else {
                    Learned::Known(Ceiling {
                        rpm,
                        source: CeilingSource::Window,
                    })
                }
            }
            None => Learned::Pending { since: now },
        };
        if let Some(bound) = self.learned.bound() {
            self.effective_rpm = self.effective_rpm.min(bound);
        }
        if let Phase::Recover {
            above: Some(good), ..
        } = self.phase
        {
            // The step above the ceiling found the quota: back to the rate below it.
            let good = good.clamp(self.floor_rpm(), self.base_rpm);
            self.refused_rpm = Some(self.refused_rpm.map_or(before, |r| r.min(before)));
            let rpm = match self.learned {
                Learned::Known(c) => c.rpm.max(good),
                _ => good,
            };
            self.learned = Learned::Known(Ceiling {
                rpm,
                source: CeilingSource::Window,
            });
            self.effective_rpm = good;
        } else {
            self.refused_rpm = None;
        }
        self.phase = Phase::Retreat {
            quiet_since: now,
            probing: None,
        };
        self.epoch += 1;
    }

    /// A rate less the headroom, within the floor and the base rate.
    fn headroom(&self, rpm: f64) -> f64 {
        (rpm * (1.0 - self.settings.ceiling_headroom)).clamp(self.floor_rpm(), self.base_rpm)
    }

    fn pause_for(&mut self, wait: Duration, now: Instant) {
        let until = now + wait.min(self.max_pause);
        if self.pause_until.is_none_or(|p| p < until) {
            self.pause_until = Some(until);
        }
    }

    /// Forgets what was learned: back to the base rate, no pause, no probing (an operator's
    /// reset through the admin API).
    pub fn reset(&mut self, now: Instant) {
        self.back_to_normal();
        self.pause_until = None;
        self.proven_rpm = None;
        self.last_cut = None;
        self.history.clear(now);
        self.epoch += 1;
    }

    /// Changes the base rate without losing the retreat state.
    pub fn set_base_rpm(&mut self, base_rpm: f64) {
        self.base_rpm = base_rpm;
        if self.phase == Phase::Normal {
            self.effective_rpm = base_rpm;
            return;
        }
        self.learned = match self.learned {
            Learned::Known(c) => Learned::Known(Ceiling {
                rpm: c.rpm.min(base_rpm),
                ..c
            }),
            Learned::Floor(rpm) => Learned::Floor(rpm.min(base_rpm)),
            other => other,
        };
        self.effective_rpm = self.effective_rpm.min(base_rpm).max(self.floor_rpm());
        if self.effective_rpm >= base_rpm && matches!(self.phase, Phase::Recover { .. }) {
            self.back_to_normal();
        }
    }

    pub fn set_settings(&mut self, settings: RetreatSettings) {
        self.history.set_window(settings.window);
        self.settings = settings;
        self.effective_rpm = self.effective_rpm.clamp(self.floor_rpm(), self.base_rpm);
    }

    /// Share of rate-limit 429s among the upstream answers of the window.
    pub fn upstream_429_ratio(&self, now: Instant) -> f64 {
        self.history.limited_ratio(now)
    }

    /// Tokens per second the bucket refills at right now (zero while paused or probing).
    pub fn admission_rate_per_sec(&self, now: Instant) -> f64 {
        if self.admit(now) != Admit::Open {
            0.0
        } else {
            self.effective_rpm * (1.0 - self.settings.safety_margin) / 60.0
        }
    }

    pub fn is_paused(&self, now: Instant) -> bool {
        self.pause_until.is_some_and(|p| p > now)
    }

    pub fn floor_rpm(&self) -> f64 {
        self.base_rpm * self.settings.floor_fraction
    }

    pub fn state(&self) -> RetreatState {
        match self.phase {
            Phase::Normal => RetreatState::Normal,
            Phase::Retreat { .. } => RetreatState::Retreat,
            Phase::Recover { .. } => RetreatState::Recover,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn learned(&self) -> Learned {
        self.learned
    }

    /// The rate recovery climbs to: the known ceiling or the proven floor, or while a ceiling
    /// is still to be learned, the rate it holds at.
    pub fn ceiling_rpm(&self) -> Option<f64> {
        match self.learned {
            Learned::Pending { .. } => Some(self.effective_rpm),
            other => other.bound(),
        }
    }

    pub fn last_refusal(&self) -> Option<Refusal> {
        self.last_refusal
    }

    pub fn effective_rpm(&self) -> f64 {
        self.effective_rpm
    }

    pub fn base_rpm(&self) -> f64 {
        self.base_rpm
    }

    pub fn pause_until(&self) -> Option<Instant> {
        self.pause_until
    }

    pub fn settings(&self) -> &RetreatSettings {
        &self.settings
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests;
