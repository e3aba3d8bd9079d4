//! The adaptive controller: retreats when the upstream answers 429, recovers when it stops.
//!
//! States: `normal` (effective rate = base rate), `retreat` (rate cut, waiting for a quiet
//! period), `recover` (rate climbing back additively).
//!
//! **Probing.** The controller does not know the upstream's window. A 429 without
//! `Retry-After` says the window is full *now*, not when it frees: sending on at the cut rate
//! into a window that stays full for tens of seconds would collect a 429 every interval. So a
//! cut also starts probing: no tokens are issued, one request at a time goes as a probe, the
//! first one interval of the cut rate after the 429 (and not before a `Retry-After` pause has
//! ended), and every further 429 triples the spacing. The first probe the upstream accepts (or
//! that gets no answer within [`PROBE_ANSWER_TIMEOUT`]) ends probing and the cut rate resumes.
//! An incident therefore costs 1 + ⌈log₃(time the window stays full ÷ first spacing)⌉
//! violations, whatever the window; with an honest `Retry-After`, one.
//!
//! **Epochs.** Every cut starts a new epoch, and every grant is stamped with the epoch it was
//! given in ([`Grant`]). Answers to grants of an older epoch were sent before the cut took
//! effect: they are counted in the window but neither cut again nor judge a probe.
//!
//! **Ceiling.** A cut also sets a *ceiling* for recovery: the rate the upstream accepted over
//! the whole `window` that ended at the cut, less a headroom. Before a whole window has been
//! observed there is no such figure: recovery then holds at the cut rate until a whole window
//! has passed and the ceiling is learned from it. So recovery never climbs above what the
//! upstream was seen to accept; it probes one step higher only after `probe_interval` of quiet
//! at the ceiling.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::signals::{NonRateLimitReason, UpstreamSignal};

mod probing;
mod settings;
mod shared;

use probing::Probing;
pub use settings::{RetreatSettings, RetreatState};
pub use shared::SharedControl;

/// Most responses the sliding window keeps; older ones fall out even inside the window.
const MAX_SAMPLES: usize = 65_536;

/// Factor by which the spacing between probes grows with every probe the upstream refuses.
const PROBE_GROWTH: u32 = 3;

/// Longest spacing between two probes.
const PROBE_SPACING_MAX: Duration = Duration::from_secs(600);

/// A probe still unanswered after this long is taken as accepted. Rate-limit answers come at
/// once, while an accepted LLM request may take minutes before its response header.
pub const PROBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How a token was granted, so that the answer to it can be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grant {
    /// The controller's epoch when the token was granted (see the module doc).
    pub epoch: u64,
    /// The grant was a probe sent while the controller was probing.
    pub probe: bool,
    /// The key (lane of the limiter) the token was taken from.
    pub lane: usize,
    /// The model limit whose slot the grant holds (an index into the limiter's models).
    pub model: Option<usize>,
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

/// Decides the effective request rate from what the upstream answers.
#[derive(Debug, Clone)]
pub struct RetreatController {
    settings: RetreatSettings,
    base_rpm: f64,
    effective_rpm: f64,
    state: RetreatState,
    ceiling_rpm: Option<f64>,
    pause_until: Option<Instant>,
    last_429: Option<Instant>,
    /// Time of the last cut, recovery step or probe.
    last_change: Instant,
    observing_since: Instant,
    /// (time, was a rate-limit 429) of recent upstream answers.
    samples: VecDeque<(Instant, bool)>,
    /// Set when this controller sees only part of the traffic on the quota (it is shared
    /// with other sidecars): the rate it saw accepted says nothing about the quota then.
    partial_view: bool,
    /// Bumped by every cut; see [`Grant`].
    epoch: u64,
    probing: Option<Probing>,
    /// A cut came before a whole window was observed: the ceiling is learned from the first
    /// whole window, which ends then.
    learn_ceiling_at: Option<Instant>,
    /// The ceiling came from a window that saw little more than the cut rate, so it says
    /// nothing of the quota above: recovery verifies one step above it per whole window.
    ceiling_uninformed: bool,
    /// The highest rate that ran a whole window without a 429 since the last cut: proven
    /// safe, so a later ceiling is never below it.
    verified_rpm: Option<f64>,
    last_cut: Option<Instant>,
    /// Recovery tried a step above the ceiling, which was this rate: if the step meets a 429,
    /// the rate goes back to it rather than being cut.
    stepped_above: Option<f64>,
    /// The upstream said the account is out of credit (a billing 429) until about then: its
    /// 429s are passed on at once rather than replayed.
    billing_until: Option<Instant>,
}

impl RetreatController {
    pub fn new(base_rpm: f64, settings: RetreatSettings, now: Instant) -> Self {
        RetreatController {
            settings,
            base_rpm,
            effective_rpm: base_rpm,
            state: RetreatState::Normal,
            ceiling_rpm: None,
            pause_until: None,
            last_429: None,
            last_change: now,
            observing_since: now,
            samples: VecDeque::new(),
            partial_view: false,
            epoch: 0,
            probing: None,
            learn_ceiling_at: None,
            ceiling_uninformed: false,
            verified_rpm: None,
            last_cut: None,
            stepped_above: None,
            billing_until: None,
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

    /// Feeds the upstream's answer to the request granted as `grant`.
    pub fn observe_answer(&mut self, signal: &UpstreamSignal, grant: Grant, now: Instant) {
        let current = grant.epoch == self.epoch;
        let probe = current && grant.probe && self.probing.is_some();
        match signal {
            UpstreamSignal::Accepted { pause } => {
                self.record(now, false);
                if let Some(pause) = pause {
                    self.pause_for(*pause, now);
                }
                if probe {
                    self.probing = None;
                }
            }
            UpstreamSignal::RateLimited { retry_after } => {
                self.record(now, true);
                if !current {
                    // Sent before the last cut took effect: already answered for.
                    return;
                }
                self.last_429 = Some(now);
                if let Some(wait) = retry_after {
                    self.pause_for(*wait, now);
                }
                if probe {
                    self.probe_refused(now);
                    return;
                }
                let cut = match self.state {
                    RetreatState::Normal => {
                        retry_after.is_some()
                            || self.upstream_429_ratio(now) > self.settings.threshold
                    }
                    RetreatState::Recover | RetreatState::Retreat => true,
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
                    if let Some(p) = self.probing.as_mut() {
                        p.in_flight = None;
                    }
                }
            }
            UpstreamSignal::NoAnswer => {
                if probe {
                    // The probe learned nothing about the quota: the next one may go.
                    if let Some(p) = self.probing.as_mut() {
                        p.in_flight = None;
                    }
                }
            }
        }
    }

    /// The stamp of a token granted now.
    pub fn grant(&self) -> Grant {
        Grant {
            epoch: self.epoch,
            probe: self.probing.is_some(),
            lane: 0,
            model: None,
        }
    }

    /// A billing 429 was seen within the last window: 429s are not worth replaying.
    pub fn billing_refused(&self, now: Instant) -> bool {
        self.billing_until.is_some_and(|until| until > now)
    }

    pub fn is_probing(&self) -> bool {
        self.probing.is_some()
    }

    fn cut(&mut self, now: Instant) {
        let ceiling = match self.accepted_rpm(now) {
            Some(accepted) => Some(accepted.min(self.effective_rpm)),
            // Sharing the quota, this controller never sees the whole traffic.
            None if self.partial_view => Some(self.effective_rpm),
            None => None,
        };
        self.effective_rpm = (self.effective_rpm * self.settings.decrease_factor)
            .max(self.floor_rpm())
            .min(self.base_rpm);
        // A window that held an earlier cut was not spent near the quota all along: what it
        // accepted is a floor, not the quota.
        self.ceiling_uninformed = self
            .last_cut
            .is_some_and(|last| now.saturating_duration_since(last) < self.settings.window);
        self.last_cut = Some(now);
        let verified = self.verified_rpm.take().unwrap_or(0.0);
        self.ceiling_rpm = match ceiling {
            Some(c) => Some(self.headroom(c).max(verified).min(self.base_rpm)),
            None => {
                // Hold at the cut rate until a whole window has been observed.
                self.learn_ceiling_at = Some(self.observing_since + self.settings.window);
                Some(self.effective_rpm)
            }
        };
        if let Some(c) = self.ceiling_rpm {
            self.effective_rpm = self.effective_rpm.min(c);
        }
        if let Some(good) = self
            .stepped_above
            .take()
            .map(|good| good.clamp(self.floor_rpm(), self.base_rpm))
        {
            // The step above the ceiling found the quota: back to the rate below it.
            self.ceiling_rpm = Some(good);
            self.effective_rpm = good;
            self.ceiling_uninformed = false;
        }
        self.state = RetreatState::Retreat;
        self.last_change = now;
        self.epoch += 1;
        self.probing = None;
    }

    /// A rate less the headroom, within the floor and the base rate.
    fn headroom(&self, rpm: f64) -> f64 {
        (rpm * (1.0 - self.settings.ceiling_headroom)).clamp(self.floor_rpm(), self.base_rpm)
    }

    fn pause_for(&mut self, wait: Duration, now: Instant) {
        let until = now + wait;
        if self.pause_until.is_none_or(|p| p < until) {
            self.pause_until = Some(until);
        }
    }

    fn record(&mut self, now: Instant, rate_limited: bool) {
        self.samples.push_back((now, rate_limited));
        if self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.prune(now);
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(t, _)) = self.samples.front() {
            if now.saturating_duration_since(t) > self.settings.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Requests per minute the upstream accepted over the whole window that ends at `end`, if
    /// one was observed.
    fn accepted_rpm(&self, end: Instant) -> Option<f64> {
        let window = self.settings.window;
        if self.partial_view
            || end.saturating_duration_since(self.observing_since) < window
            || window.is_zero()
        {
            return None;
        }
        let accepted = self
            .samples
            .iter()
            .filter(|(t, limited)| {
                !limited && *t <= end && end.saturating_duration_since(*t) <= window
            })
            .count();
        Some(accepted as f64 * 60.0 / window.as_secs_f64())
    }

    /// Advances retreat → recover → normal as time passes.
    pub fn tick(&mut self, now: Instant) {
        if self.pause_until.is_some_and(|p| p <= now) {
            self.pause_until = None;
        }
        if self
            .probing
            .and_then(|p| p.in_flight)
            .is_some_and(|sent| now >= sent + PROBE_ANSWER_TIMEOUT)
        {
            // No 429 came back in time: the upstream is working on it.
            self.probing = None;
        }
        if let Some(at) = self.learn_ceiling_at.filter(|at| *at <= now) {
            self.learn_ceiling_at = None;
            if let Some(accepted) = self.accepted_rpm(at) {
                let ceiling = self.headroom(accepted);
                // A window that was mostly spent at the cut rate only proves the cut rate.
                self.ceiling_uninformed =
                    accepted <= self.effective_rpm * (1.0 + self.settings.ceiling_headroom);
                self.ceiling_rpm = Some(ceiling.max(self.effective_rpm));
            }
        }
        if self.state != RetreatState::Normal
            && self.probing.is_none()
            && now.saturating_duration_since(
                self.last_change
                    .max(self.last_429.unwrap_or(self.last_change)),
            ) >= self.settings.window
        {
            self.verified_rpm = Some(self.verified_rpm.unwrap_or(0.0).max(self.effective_rpm));
            self.stepped_above = None;
        }
        let s = &self.settings;
        match self.state {
            RetreatState::Normal => {}
            RetreatState::Retreat => {
                let quiet_since = self.last_429.unwrap_or(self.last_change);
                if self.pause_until.is_none()
                    && self.probing.is_none()
                    && now.saturating_duration_since(quiet_since) >= s.quiet_period
                {
                    self.state = RetreatState::Recover;
                    self.last_change = now;
                }
            }
            RetreatState::Recover => {
                let step = s.recover_step * self.base_rpm;
                let ceiling = self.ceiling_rpm.unwrap_or(self.base_rpm).min(self.base_rpm);
                let ceiling_known = self.learn_ceiling_at.is_none();
                while ceiling_known
                    && now.saturating_duration_since(self.last_change) >= s.recover_interval
                    && self.effective_rpm < ceiling
                {
                    self.effective_rpm = (self.effective_rpm + step).min(ceiling);
                    self.last_change += s.recover_interval;
                }
                // Above a ceiling learned from a saturated window: rarely and explicitly. Above
                // one that only proves the cut rate: one step per whole window.
                let above_every = if self.ceiling_uninformed {
                    s.window.min(s.probe_interval)
                } else {
                    s.probe_interval
                };
                let mut ceiling = ceiling;
                while ceiling_known
                    && self.effective_rpm >= ceiling
                    && self.effective_rpm < self.base_rpm
                    && now.saturating_duration_since(self.last_change) >= above_every
                {
                    self.stepped_above = Some(ceiling);
                    ceiling += step;
                    self.ceiling_rpm = Some(ceiling);
                    self.effective_rpm = (self.effective_rpm + step).min(self.base_rpm);
                    self.last_change += above_every;
                }
                if self.effective_rpm >= self.base_rpm {
                    self.effective_rpm = self.base_rpm;
                    self.ceiling_rpm = None;
                    self.state = RetreatState::Normal;
                }
            }
        }
    }

    /// Changes the base rate without losing the retreat state.
    pub fn set_base_rpm(&mut self, base_rpm: f64) {
        self.base_rpm = base_rpm;
        if self.state == RetreatState::Normal {
            self.effective_rpm = base_rpm;
        } else {
            self.ceiling_rpm = self.ceiling_rpm.map(|c| c.min(base_rpm));
            self.effective_rpm = self.effective_rpm.min(base_rpm).max(self.floor_rpm());
            if self.effective_rpm >= base_rpm && self.state == RetreatState::Recover {
                self.state = RetreatState::Normal;
                self.ceiling_rpm = None;
            }
        }
    }

    pub fn set_settings(&mut self, settings: RetreatSettings) {
        self.settings = settings;
        self.effective_rpm = self.effective_rpm.clamp(self.floor_rpm(), self.base_rpm);
    }

    /// Share of rate-limit 429s among the upstream answers of the window.
    pub fn upstream_429_ratio(&self, now: Instant) -> f64 {
        let window = self.settings.window;
        let (total, limited) = self
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= window)
            .fold((0usize, 0usize), |(n, l), (_, limited)| {
                (n + 1, l + usize::from(*limited))
            });
        if total == 0 {
            0.0
        } else {
            limited as f64 / total as f64
        }
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
        self.state
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
