//! Collects configuration problems while values are checked, so that every problem is
//! reported at once, each with its key.

use std::net::IpAddr;
use std::time::Duration;

use super::{ConfigError, Secret};
use crate::limiter::Priority;

/// Lowest and highest rate any bucket may be given, in requests per minute.
pub(super) const MIN_RPM: f64 = 0.01;
pub(super) const MAX_RPM: f64 = 10_000_000.0;
/// The largest token budget: ten billion tokens a minute.
pub(super) const MAX_TPM: u64 = 10_000_000_000;

/// Collects problems while validating.
pub(super) struct Checker {
    pub(super) errors: Vec<ConfigError>,
}

impl Checker {
    pub(super) fn fail(&mut self, key: &str, reason: impl Into<String>) {
        self.errors.push(ConfigError::new(key, reason));
    }

    pub(super) fn positive(&mut self, key: &str, value: f64) -> f64 {
        if !(value.is_finite() && value > 0.0) {
            self.fail(key, format!("must be > 0, got {value}"));
        }
        value
    }

    pub(super) fn fraction(
        &mut self,
        key: &str,
        value: f64,
        low_inclusive: bool,
        high_inclusive: bool,
    ) -> f64 {
        let low_ok = if low_inclusive {
            value >= 0.0
        } else {
            value > 0.0
        };
        let high_ok = if high_inclusive {
            value <= 1.0
        } else {
            value < 1.0
        };
        if !(value.is_finite() && low_ok && high_ok) {
            let lo = if low_inclusive { "[0" } else { "(0" };
            let hi = if high_inclusive { "1]" } else { "1)" };
            self.fail(key, format!("must be in {lo}, {hi}, got {value}"));
        }
        value
    }

    pub(super) fn duration(
        &mut self,
        key: &str,
        value: Option<super::Seconds>,
        default: f64,
        allow_zero: bool,
    ) -> Duration {
        let secs = value.map_or(default, |s| s.0);
        if !secs.is_finite() || secs < 0.0 || (!allow_zero && secs == 0.0) {
            let bound = if allow_zero { ">= 0" } else { "> 0" };
            self.fail(key, format!("must be {bound} seconds, got {secs}"));
            return Duration::from_secs_f64(default);
        }
        if secs > 31_536_000.0 {
            self.fail(key, format!("must be at most a year, got {secs} seconds"));
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(secs)
    }

    pub(super) fn priority(&mut self, key: &str, value: &str) -> Priority {
        value.parse().unwrap_or_else(|_| {
            self.fail(key, format!("must be high, normal or low, got {value:?}"));
            Priority::High
        })
    }

    pub(super) fn ip(&mut self, key: &str, value: &str) -> IpAddr {
        value.parse().unwrap_or_else(|_| {
            self.fail(key, format!("must be an IP address, got {value:?}"));
            IpAddr::from([127, 0, 0, 1])
        })
    }

    pub(super) fn secret(
        &mut self,
        file_key: &str,
        file: Option<&str>,
        env_name: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<Secret> {
        if let Some(path) = file {
            return match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim().to_string())),
                Ok(_) => {
                    self.fail(file_key, format!("{path} is empty"));
                    None
                }
                Err(e) => {
                    self.fail(file_key, format!("cannot read {path}: {e}"));
                    None
                }
            };
        }
        env_name
            .and_then(env)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(Secret::new)
    }

    /// A rate in requests per minute within the bounds every bucket takes.
    /// A token budget (`tpm`): at least one token a minute, at most `MAX_TPM`.
    pub(super) fn tpm(&mut self, key: &str, tpm: u64) -> Option<u64> {
        if !(1..=MAX_TPM).contains(&tpm) {
            self.fail(
                key,
                format!("must be between 1 and {MAX_TPM} tokens per minute, got {tpm}"),
            );
            return None;
        }
        Some(tpm)
    }

    pub(super) fn rpm(&mut self, key: &str, rpm: f64) -> bool {
        if !(rpm.is_finite() && rpm > 0.0) {
            self.fail(key, format!("must be > 0, got {rpm}"));
            return false;
        }
        if !(MIN_RPM..=MAX_RPM).contains(&rpm) {
            self.fail(
                key,
                format!("must be between {MIN_RPM} and {MAX_RPM} requests per minute, got {rpm:e}"),
            );
            return false;
        }
        true
    }
}
