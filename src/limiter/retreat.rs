//! The adaptive controller: retreats when the upstream answers 429, recovers when it stops.
//!
//! States: `normal` (effective rate = base rate), `retreat` (rate cut, waiting for a quiet
//! period), `recover` (rate climbing back additively). A cut also sets a *ceiling*: the rate the
//! upstream actually accepted over the last window (or, before a whole window has been seen,
//! the rate that provoked the 429s), less a headroom. Recovery climbs to that ceiling and holds
//! there, probing higher only after a long quiet time, so an upstream quota below the configured
//! rate is learned in one cycle instead of being violated again on every recovery.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::signals::UpstreamSignal;

/// Most responses the sliding window keeps; older ones fall out even inside the window.
const MAX_SAMPLES: usize = 65_536;

/// Tuning of the controller (config section `adaptive:`).
#[derive(Debug, Clone, PartialEq)]
pub struct RetreatSettings {
    /// Sliding window over which the 429 ratio and the accepted rate are measured.
    pub window: Duration,
    /// 429 ratio in the window above which the controller retreats (0: the first 429).
    pub threshold: f64,
    /// Factor applied to the effective rate on a retreat.
    pub decrease_factor: f64,
    /// Lowest effective rate, as a fraction of the base rate.
    pub floor_fraction: f64,
    /// Time without a 429 after which a retreat turns into recovery.
    pub quiet_period: Duration,
    /// Fraction of the base rate added at every recovery step.
    pub recover_step: f64,
    /// Time between recovery steps.
    pub recover_interval: Duration,
    /// How far below the learned upstream rate recovery stops.
    pub ceiling_headroom: f64,
    /// Quiet time at the ceiling after which recovery probes one step higher.
    pub probe_interval: Duration,
    /// Admissions run this fraction below the effective rate, so that arrival jitter never
    /// pushes two grants closer together than the upstream's window allows.
    pub safety_margin: f64,
}

impl Default for RetreatSettings {
    fn default() -> Self {
        RetreatSettings {
            window: Duration::from_secs(60),
            threshold: 0.0,
            decrease_factor: 0.5,
            floor_fraction: 0.1,
            quiet_period: Duration::from_secs(15),
            recover_step: 0.1,
            recover_interval: Duration::from_secs(5),
            ceiling_headroom: 0.05,
            probe_interval: Duration::from_secs(300),
            safety_margin: 0.01,
        }
    }
}

/// The controller's state, reported as `normal`, `retreat` or `recover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetreatState {
    Normal,
    Retreat,
    Recover,
}

impl RetreatState {
    pub fn as_str(self) -> &'static str {
        match self {
            RetreatState::Normal => "normal",
            RetreatState::Retreat => "retreat",
            RetreatState::Recover => "recover",
        }
    }

    /// The number used by the `retreat_state` gauge.
    pub fn as_gauge(self) -> i64 {
        match self {
            RetreatState::Normal => 0,
            RetreatState::Retreat => 1,
            RetreatState::Recover => 2,
        }
    }

    /// The state for a gauge number (anything unknown reads as `normal`).
    pub fn from_gauge(value: i64) -> RetreatState {
        match value {
            1 => RetreatState::Retreat,
            2 => RetreatState::Recover,
            _ => RetreatState::Normal,
        }
    }
}

/// The part of the controller that several instances sharing one quota agree on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedControl {
    pub effective_rpm: f64,
    pub state: RetreatState,
    pub ceiling_rpm: Option<f64>,
    pub pause_until: Option<Instant>,
}

impl SharedControl {
    /// Whether `self`, compared with `before`, slows the quota down: a lower rate or a
    /// longer pause. Such a change applies to every instance at once; any other change (a
    /// recovery step) only when nobody changed the shared state meanwhile.
    pub fn slows_down(&self, before: &SharedControl) -> bool {
        self.effective_rpm < before.effective_rpm - 1e-9
            || self
                .pause_until
                .is_some_and(|p| before.pause_until.is_none_or(|b| p > b))
    }

    /// Whether the two differ in anything other instances should learn.
    pub fn differs(&self, other: &SharedControl) -> bool {
        (self.effective_rpm - other.effective_rpm).abs() > 1e-9
            || self.state != other.state
            || self.ceiling_rpm.map(|c| (c * 1e6).round())
                != other.ceiling_rpm.map(|c| (c * 1e6).round())
            || self.pause_until != other.pause_until
    }
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
        }
    }

    /// Restores a saved state (effective rate clamped to the current base and floor).
    pub fn restore(
        &mut self,
        state: RetreatState,
        effective_rpm: f64,
        pause_until: Option<Instant>,
        now: Instant,
    ) {
        self.state = state;
        self.effective_rpm = effective_rpm.clamp(self.floor_rpm(), self.base_rpm);
        if state != RetreatState::Normal {
            self.ceiling_rpm = Some(self.effective_rpm);
            self.last_429 = Some(now);
        } else {
            self.effective_rpm = self.base_rpm;
        }
        self.pause_until = pause_until.filter(|p| *p > now);
        self.last_change = now;
    }

    /// What other instances sharing the quota should know of this controller.
    pub fn shared(&self, now: Instant) -> SharedControl {
        SharedControl {
            effective_rpm: self.effective_rpm,
            state: self.state,
            ceiling_rpm: self.ceiling_rpm,
            pause_until: self.pause_until.filter(|p| *p > now),
        }
    }

    /// Takes over the state the instances sharing the quota agreed on. The quiet period and
    /// the recovery interval count from now, so a step taken by one instance is not repeated
    /// by the others; a pause is only ever lengthened.
    pub fn adopt(&mut self, shared: &SharedControl, now: Instant) {
        if shared.state == RetreatState::Retreat && self.state != RetreatState::Retreat {
            self.last_429 = Some(now);
        }
        if shared.state != self.state || (shared.effective_rpm - self.effective_rpm).abs() > 1e-9 {
            self.last_change = now;
        }
        self.state = shared.state;
        if shared.state == RetreatState::Normal {
            self.effective_rpm = self.base_rpm;
            self.ceiling_rpm = None;
        } else {
            self.effective_rpm = shared.effective_rpm.clamp(self.floor_rpm(), self.base_rpm);
            self.ceiling_rpm = shared
                .ceiling_rpm
                .map(|c| c.clamp(self.floor_rpm(), self.base_rpm));
        }
        if let Some(until) = shared.pause_until.filter(|p| *p > now) {
            if self.pause_until.is_none_or(|p| p < until) {
                self.pause_until = Some(until);
            }
        }
    }

    /// Feeds one upstream answer to the controller.
    pub fn observe(&mut self, signal: &UpstreamSignal, now: Instant) {
        match signal {
            UpstreamSignal::Accepted { pause } => {
                self.record(now, false);
                if let Some(pause) = pause {
                    self.pause_for(*pause, now);
                }
            }
            UpstreamSignal::RateLimited { retry_after } => {
                self.record(now, true);
                self.last_429 = Some(now);
                if let Some(wait) = retry_after {
                    self.pause_for(*wait, now);
                }
                let cut = match self.state {
                    RetreatState::Normal => {
                        retry_after.is_some()
                            || self.upstream_429_ratio(now) > self.settings.threshold
                    }
                    RetreatState::Recover => true,
                    // Already cut: the 429s still arriving were sent before the cut took effect.
                    RetreatState::Retreat => false,
                };
                if cut {
                    self.cut(now);
                }
            }
            UpstreamSignal::NotRateLimit(_) => {}
        }
    }

    fn cut(&mut self, now: Instant) {
        let ceiling = (self
            .accepted_rpm(now)
            .unwrap_or(self.effective_rpm)
            .min(self.effective_rpm)
            * (1.0 - self.settings.ceiling_headroom))
            .clamp(self.floor_rpm(), self.base_rpm);
        self.ceiling_rpm = Some(ceiling);
        self.effective_rpm = (self.effective_rpm * self.settings.decrease_factor)
            .min(ceiling)
            .max(self.floor_rpm());
        self.state = RetreatState::Retreat;
        self.last_change = now;
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

    /// See `partial_view`.
    pub fn set_partial_view(&mut self, partial: bool) {
        self.partial_view = partial;
    }

    /// Requests per minute the upstream accepted over the last whole window, if one was seen.
    fn accepted_rpm(&self, now: Instant) -> Option<f64> {
        let window = self.settings.window;
        if self.partial_view
            || now.saturating_duration_since(self.observing_since) < window
            || window.is_zero()
        {
            return None;
        }
        let accepted = self
            .samples
            .iter()
            .filter(|(t, limited)| !limited && now.saturating_duration_since(*t) <= window)
            .count();
        Some(accepted as f64 * 60.0 / window.as_secs_f64())
    }

    /// Advances retreat → recover → normal as time passes.
    pub fn tick(&mut self, now: Instant) {
        if self.pause_until.is_some_and(|p| p <= now) {
            self.pause_until = None;
        }
        let s = &self.settings;
        match self.state {
            RetreatState::Normal => {}
            RetreatState::Retreat => {
                let quiet_since = self.last_429.unwrap_or(self.last_change);
                if self.pause_until.is_none()
                    && now.saturating_duration_since(quiet_since) >= s.quiet_period
                {
                    self.state = RetreatState::Recover;
                    self.last_change = now;
                }
            }
            RetreatState::Recover => {
                let step = s.recover_step * self.base_rpm;
                let ceiling = self.ceiling_rpm.unwrap_or(self.base_rpm).min(self.base_rpm);
                while now.saturating_duration_since(self.last_change) >= s.recover_interval
                    && self.effective_rpm < ceiling
                {
                    self.effective_rpm = (self.effective_rpm + step).min(ceiling);
                    self.last_change += s.recover_interval;
                }
                if self.effective_rpm >= ceiling
                    && now.saturating_duration_since(self.last_change) >= s.probe_interval
                {
                    self.ceiling_rpm = Some(ceiling + step);
                    self.effective_rpm = (self.effective_rpm + step).min(self.base_rpm);
                    self.last_change = now;
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

    /// Tokens per second the bucket refills at right now (zero while paused).
    pub fn admission_rate_per_sec(&self, now: Instant) -> f64 {
        if self.is_paused(now) {
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
mod tests {
    use super::*;

    const LIMITED: UpstreamSignal = UpstreamSignal::RateLimited { retry_after: None };
    const OK: UpstreamSignal = UpstreamSignal::Accepted { pause: None };

    fn settings() -> RetreatSettings {
        RetreatSettings {
            window: Duration::from_secs(10),
            quiet_period: Duration::from_secs(5),
            recover_interval: Duration::from_secs(1),
            recover_step: 0.1,
            ..RetreatSettings::default()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn retreats_on_429_then_recovers_back_to_base() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(&LIMITED, t0 + secs(1));
        assert_eq!(c.state(), RetreatState::Retreat);
        // Before a whole window was seen the ceiling comes from the rate that caused the 429.
        assert_eq!(c.effective_rpm(), 30.0);
        c.tick(t0 + secs(5));
        assert_eq!(
            c.state(),
            RetreatState::Retreat,
            "quiet period not over yet"
        );
        c.tick(t0 + secs(6));
        assert_eq!(c.state(), RetreatState::Recover);
        c.tick(t0 + secs(9));
        assert!(
            (c.effective_rpm() - 48.0).abs() < 1e-9,
            "three steps of 6 rpm: {}",
            c.effective_rpm()
        );
        c.tick(t0 + secs(60));
        assert!(
            (c.effective_rpm() - 57.0).abs() < 1e-9,
            "holds at the ceiling: {}",
            c.effective_rpm()
        );
        assert_eq!(c.state(), RetreatState::Recover);
        // After a long quiet time at the ceiling it probes upward and returns to normal.
        // The last climbing step was at 11 s.
        c.tick(t0 + secs(11 + 299));
        assert_eq!(c.state(), RetreatState::Recover);
        c.tick(t0 + secs(11 + 300));
        assert_eq!(c.state(), RetreatState::Normal);
        assert_eq!(c.effective_rpm(), 60.0);
    }

    #[test]
    fn learns_the_upstream_rate_after_a_full_window() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        // Accepted at 2 per second (120 rpm): more than we send, so the ceiling is our own rate.
        for i in 0..20u64 {
            c.observe(&OK, t0 + Duration::from_millis(500 * i + 500));
        }
        c.observe(&LIMITED, t0 + secs(11));
        // 19 accepted within the last 10 s -> 114 rpm > effective, so the ceiling is 60 * 0.95.
        assert!((c.ceiling_rpm.unwrap() - 57.0).abs() < 1e-9);

        let mut c = RetreatController::new(60.0, settings(), t0);
        for i in 0..7u64 {
            c.observe(&OK, t0 + secs(4 + i));
        }
        c.observe(&LIMITED, t0 + secs(11));
        // 7 accepted within the last 10 s -> 42 rpm, less the 5% headroom.
        let ceiling = c.ceiling_rpm.unwrap();
        assert!((ceiling - 42.0 * 0.95).abs() < 1e-9, "ceiling {ceiling}");
        assert_eq!(c.effective_rpm(), 30.0);
    }

    #[test]
    fn retry_after_pauses_and_retreats() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(
            &UpstreamSignal::RateLimited {
                retry_after: Some(secs(20)),
            },
            t0,
        );
        assert!(c.is_paused(t0 + secs(19)));
        assert_eq!(c.admission_rate_per_sec(t0 + secs(19)), 0.0);
        c.tick(t0 + secs(19));
        assert_eq!(c.state(), RetreatState::Retreat, "no recovery while paused");
        c.tick(t0 + secs(20));
        assert!(!c.is_paused(t0 + secs(20)));
        assert_eq!(c.state(), RetreatState::Recover);
    }

    #[test]
    fn a_429_during_recovery_retreats_again_and_one_during_retreat_does_not_cut_twice() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(&LIMITED, t0);
        c.observe(&LIMITED, t0 + Duration::from_millis(10));
        assert_eq!(c.effective_rpm(), 30.0);
        c.tick(t0 + secs(7));
        assert_eq!(c.state(), RetreatState::Recover);
        c.observe(&LIMITED, t0 + secs(8));
        assert_eq!(c.state(), RetreatState::Retreat);
        assert!(c.effective_rpm() < 30.0);
        assert!(c.effective_rpm() >= c.floor_rpm());
    }

    #[test]
    fn threshold_ignores_rare_429s() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(
            60.0,
            RetreatSettings {
                threshold: 0.2,
                ..settings()
            },
            t0,
        );
        for i in 0..9 {
            c.observe(&OK, t0 + Duration::from_millis(i));
        }
        c.observe(&LIMITED, t0 + secs(1));
        assert_eq!(c.state(), RetreatState::Normal);
        c.observe(&LIMITED, t0 + secs(1));
        c.observe(&LIMITED, t0 + secs(1));
        assert_eq!(c.state(), RetreatState::Retreat);
        assert!((c.upstream_429_ratio(t0 + secs(1)) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn base_rate_change_keeps_state() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(&LIMITED, t0);
        c.set_base_rpm(120.0);
        assert_eq!(c.state(), RetreatState::Retreat);
        assert_eq!(c.effective_rpm(), 30.0);
        c.set_base_rpm(20.0);
        assert_eq!(c.effective_rpm(), 20.0);
        let mut n = RetreatController::new(60.0, settings(), t0);
        n.set_base_rpm(90.0);
        assert_eq!(n.effective_rpm(), 90.0);
        assert_eq!(n.state(), RetreatState::Normal);
    }
}
