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

/// The probing after a 429 without `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Probing {
    /// When the next probe may go.
    next_at: Instant,
    /// The wait before the next probe after one more refused probe.
    spacing: Duration,
    /// When the probe now out was sent.
    in_flight: Option<Instant>,
}

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
            recover_step: 0.05,
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

    /// What the bucket may do now.
    pub fn admit(&self, now: Instant) -> Admit {
        if self.is_paused(now) {
            return Admit::Closed;
        }
        match &self.probing {
            None => Admit::Open,
            Some(p) if p.in_flight.is_none() && p.next_at <= now => Admit::Probe,
            Some(_) => Admit::Closed,
        }
    }

    /// A probe was granted now.
    pub fn probe_sent(&mut self, now: Instant) {
        if let Some(p) = self.probing.as_mut() {
            p.in_flight = Some(now);
        }
    }

    /// A probe was granted but never sent (its client left): the next one may go.
    pub fn probe_returned(&mut self) {
        if let Some(p) = self.probing.as_mut() {
            p.in_flight = None;
        }
    }

    /// When probing next changes on its own: the next probe is due, or the one out times out.
    pub fn next_probe_event(&self) -> Option<Instant> {
        let p = self.probing.as_ref()?;
        Some(
            p.in_flight
                .map_or(p.next_at, |sent| sent + PROBE_ANSWER_TIMEOUT),
        )
    }

    /// A billing 429 was seen within the last window: 429s are not worth replaying.
    pub fn billing_refused(&self, now: Instant) -> bool {
        self.billing_until.is_some_and(|until| until > now)
    }

    pub fn is_probing(&self) -> bool {
        self.probing.is_some()
    }

    fn start_probing(&mut self, now: Instant) {
        // The first probe waits one interval of the cut rate, as a token would.
        let first =
            Duration::from_secs_f64(60.0 / self.effective_rpm.max(1e-6)).min(PROBE_SPACING_MAX);
        self.probing = Some(Probing {
            next_at: now + first,
            spacing: first,
            in_flight: None,
        });
    }

    fn probe_refused(&mut self, now: Instant) {
        // A `Retry-After` on the refusal pauses as well; whichever ends later counts.
        if let Some(p) = self.probing.as_mut() {
            p.spacing = (p.spacing * PROBE_GROWTH).min(PROBE_SPACING_MAX);
            p.next_at = now + p.spacing;
            p.in_flight = None;
        }
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

    /// See `partial_view`.
    pub fn set_partial_view(&mut self, partial: bool) {
        self.partial_view = partial;
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends a probe at `now` (it must be due) and returns its stamp.
    fn probe(c: &mut RetreatController, now: Instant) -> Grant {
        assert_eq!(c.admit(now), Admit::Probe, "a probe is due");
        let grant = c.grant();
        assert!(grant.probe);
        c.probe_sent(now);
        grant
    }

    /// `n` accepted answers one per `every` from `from`.
    fn accepted(c: &mut RetreatController, from: Instant, every: Duration, n: u32) {
        for i in 0..n {
            c.observe(&OK, from + every * i);
        }
    }

    #[test]
    fn a_429_without_retry_after_probes_with_growing_spacing_and_the_first_success_resumes() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(&LIMITED, t0 + secs(1));
        assert_eq!(c.state(), RetreatState::Retreat);
        assert_eq!(c.effective_rpm(), 30.0);
        assert!(c.is_probing());
        // No tokens while probing; the first probe waits one interval of the cut rate (2 s).
        assert_eq!(c.admission_rate_per_sec(t0 + secs(1)), 0.0);
        assert_eq!(c.admit(t0 + ms(2999)), Admit::Closed);
        let first = probe(&mut c, t0 + secs(3));
        assert_eq!(c.admit(t0 + secs(4)), Admit::Closed, "one probe at a time");
        c.observe_answer(&LIMITED, first, t0 + secs(3));
        // Refused: three times the spacing.
        assert_eq!(c.next_probe_event(), Some(t0 + secs(9)));
        assert_eq!(c.admit(t0 + ms(8999)), Admit::Closed);
        let second = probe(&mut c, t0 + secs(9));
        c.observe_answer(&LIMITED, second, t0 + secs(9));
        assert_eq!(c.next_probe_event(), Some(t0 + secs(27)));
        let third = probe(&mut c, t0 + secs(27));
        c.observe_answer(&OK, third, t0 + secs(27));
        assert!(!c.is_probing());
        assert_eq!(c.admit(t0 + secs(27)), Admit::Open);
        assert_eq!(c.effective_rpm(), 30.0, "the cut rate resumes");
        assert!((c.admission_rate_per_sec(t0 + secs(27)) - 30.0 * 0.99 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn answers_to_grants_from_before_the_cut_neither_cut_again_nor_judge_a_probe() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        let before = c.grant();
        c.observe_answer(&LIMITED, before, t0);
        assert_eq!(c.effective_rpm(), 30.0);
        // More answers to requests that were already on their way.
        c.observe_answer(&LIMITED, before, t0 + ms(10));
        c.observe_answer(&OK, before, t0 + ms(20));
        assert_eq!(c.effective_rpm(), 30.0, "cut once");
        assert!(c.is_probing(), "an old success does not end probing");
        assert!((c.upstream_429_ratio(t0 + ms(20)) - 2.0 / 3.0).abs() < 1e-9);
        // A 429 on a grant of the new epoch that is no probe (the cut rate was still too
        // high) cuts again.
        let p = probe(&mut c, t0 + secs(2));
        c.observe_answer(&OK, p, t0 + secs(2));
        let after = c.grant();
        c.observe_answer(&LIMITED, after, t0 + secs(3));
        assert_eq!(c.effective_rpm(), 15.0);
        assert!(c.is_probing());
    }

    #[test]
    fn a_probe_without_an_answer_counts_as_accepted_after_the_timeout_and_a_lost_one_is_freed() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(&LIMITED, t0);
        let lost = probe(&mut c, t0 + secs(2));
        // The client left before the upstream answered: the next probe may go at once.
        c.observe_answer(&UpstreamSignal::NoAnswer, lost, t0 + secs(2));
        let _slow = probe(&mut c, t0 + secs(2));
        c.tick(t0 + secs(2) + PROBE_ANSWER_TIMEOUT - ms(1));
        assert!(c.is_probing());
        assert_eq!(
            c.next_probe_event(),
            Some(t0 + secs(2) + PROBE_ANSWER_TIMEOUT)
        );
        c.tick(t0 + secs(2) + PROBE_ANSWER_TIMEOUT);
        assert!(
            !c.is_probing(),
            "no 429 came back: the upstream is working on it"
        );
    }

    #[test]
    fn retry_after_pauses_then_one_probe_checks_the_upstream_s_word() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(
            &UpstreamSignal::RateLimited {
                retry_after: Some(secs(20)),
            },
            t0,
        );
        assert!(c.is_paused(t0 + secs(19)));
        assert_eq!(c.admit(t0 + secs(19)), Admit::Closed);
        assert_eq!(c.admission_rate_per_sec(t0 + secs(19)), 0.0);
        c.tick(t0 + secs(19));
        assert_eq!(c.state(), RetreatState::Retreat, "no recovery while paused");
        // The window was still full when the pause ended (the upstream said too little):
        // the probe is refused, and the next one waits three times as long, no second cut.
        let p = probe(&mut c, t0 + secs(20));
        c.observe_answer(
            &UpstreamSignal::RateLimited {
                retry_after: Some(secs(2)),
            },
            p,
            t0 + secs(20),
        );
        assert_eq!(c.effective_rpm(), 30.0);
        assert_eq!(c.admit(t0 + secs(22)), Admit::Closed);
        let p = probe(&mut c, t0 + secs(26));
        c.observe_answer(&OK, p, t0 + secs(26));
        assert_eq!(c.admit(t0 + secs(26)), Admit::Open);
        c.tick(t0 + secs(26));
        assert_eq!(c.state(), RetreatState::Recover);
    }

    /// NVIDIA's numbers: 40 per rolling minute, the sidecar at 60 rpm. The first 429 comes
    /// after 40 s, before a whole window was observed: no ceiling can be known then, and
    /// scaling 40 s of history up to a minute would give 60 rpm. Recovery holds at the cut
    /// rate until the window has passed, then climbs to what the upstream accepted in it.
    #[test]
    fn no_ceiling_is_learned_from_less_than_a_whole_window() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, RetreatSettings::default(), t0);
        accepted(&mut c, t0, secs(1), 40);
        c.observe(&LIMITED, t0 + secs(40));
        assert_eq!(c.effective_rpm(), 30.0);
        let p = probe(&mut c, t0 + secs(42));
        c.observe_answer(&LIMITED, p, t0 + secs(42));
        let p = probe(&mut c, t0 + secs(48));
        c.observe_answer(&LIMITED, p, t0 + secs(48));
        c.tick(t0 + secs(59));
        assert_eq!(c.ceiling_rpm, Some(30.0), "held at the cut rate");
        c.tick(t0 + secs(60));
        let learned = 40.0 * 0.95;
        assert_eq!(
            c.ceiling_rpm,
            Some(learned),
            "40 accepted in the first minute"
        );
        let p = probe(&mut c, t0 + secs(66));
        c.observe_answer(&OK, p, t0 + secs(66));
        let mut highest = 0.0f64;
        // (Until `probe_interval` after the last step, when recovery tries one step higher.)
        for s in 66..300 {
            c.tick(t0 + secs(s));
            highest = highest.max(c.effective_rpm());
        }
        assert_eq!(c.effective_rpm(), learned);
        assert!(highest <= learned, "climbed to {highest}");
        assert_eq!(c.state(), RetreatState::Recover);
    }

    #[test]
    fn a_whole_window_before_the_cut_gives_the_ceiling_at_once() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        // Accepted at 2 per second (120 rpm): more than we send, so the ceiling is our own rate.
        accepted(&mut c, t0 + ms(500), ms(500), 20);
        c.observe(&LIMITED, t0 + secs(11));
        assert!((c.ceiling_rpm.unwrap() - 57.0).abs() < 1e-9);

        let mut c = RetreatController::new(60.0, settings(), t0);
        accepted(&mut c, t0 + secs(4), secs(1), 7);
        c.observe(&LIMITED, t0 + secs(11));
        // 7 accepted within the last 10 s -> 42 rpm, less the 5% headroom.
        let ceiling = c.ceiling_rpm.unwrap();
        assert!((ceiling - 42.0 * 0.95).abs() < 1e-9, "ceiling {ceiling}");
        assert_eq!(c.effective_rpm(), 30.0);
    }

    #[test]
    fn a_window_spent_at_the_cut_rate_is_verified_one_step_per_window() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        c.observe(&LIMITED, t0 + secs(1));
        let p = probe(&mut c, t0 + secs(3));
        c.observe_answer(&OK, p, t0 + secs(3));
        // 30 rpm for the rest of the first window: it proves the cut rate, nothing more.
        accepted(&mut c, t0 + secs(4), secs(2), 4);
        c.tick(t0 + secs(10));
        assert_eq!(c.ceiling_rpm, Some(30.0));
        // Recovery tries one step (6 rpm) above it per whole window (10 s) of quiet.
        c.tick(t0 + secs(19));
        assert_eq!(c.effective_rpm(), 30.0);
        c.tick(t0 + secs(20));
        assert_eq!(c.effective_rpm(), 36.0);
        c.tick(t0 + secs(30));
        assert_eq!(c.effective_rpm(), 42.0);
        // The rates that ran a whole window without a 429 are proven: a cut never sets the
        // ceiling below them.
        c.tick(t0 + secs(40));
        let before = c.grant();
        c.observe_answer(&LIMITED, before, t0 + secs(40));
        assert!(c.ceiling_rpm.unwrap() >= 42.0 - 1e-9, "{:?}", c.ceiling_rpm);
    }

    #[test]
    fn above_a_learned_ceiling_recovery_probes_only_after_the_probe_interval() {
        let t0 = Instant::now();
        let mut c = RetreatController::new(60.0, settings(), t0);
        accepted(&mut c, t0 + ms(500), ms(500), 20);
        c.observe(
            &UpstreamSignal::RateLimited {
                retry_after: Some(secs(1)),
            },
            t0 + secs(11),
        );
        // The pause ends at 12 s; the first probe waits one interval of the cut rate (2 s).
        let p = probe(&mut c, t0 + secs(13));
        c.observe_answer(&OK, p, t0 + secs(13));
        c.tick(t0 + secs(16));
        assert_eq!(c.state(), RetreatState::Recover);
        c.tick(t0 + secs(60));
        assert!(
            (c.effective_rpm() - 57.0).abs() < 1e-9,
            "holds at the ceiling"
        );
        // Recovery began at 16 s; the last climbing step, to 57, was at 21 s.
        c.tick(t0 + secs(21 + 299));
        assert!((c.effective_rpm() - 57.0).abs() < 1e-9);
        c.tick(t0 + secs(21 + 300));
        assert_eq!(c.state(), RetreatState::Normal);
        assert_eq!(c.effective_rpm(), 60.0);
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
