//! The controller's tuning (`adaptive:`) and the states it reports.

use std::time::Duration;

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
            ceiling_headroom: 0.02,
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
