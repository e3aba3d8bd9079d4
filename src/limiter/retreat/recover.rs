//! Time passing: a pause ends, a probe times out, a window teaches what a cut could not yet,
//! and the phases move on: retreat → recover (after a quiet period) → normal, the rate
//! climbing to what was learned and above it only rarely (see the module doc of `retreat`).

use std::time::Instant;

use super::{Ceiling, CeilingSource, Learned, Phase, RetreatController, AT_THE_CUT_RATE};

impl RetreatController {
    /// Advances retreat → recover → normal as time passes.
    pub fn tick(&mut self, now: Instant) {
        if self.pause_until.is_some_and(|p| p <= now) {
            self.pause_until = None;
        }
        self.probe_timeout(now);
        if let Learned::Pending { since } = self.learned {
            if self.history.busy_window(now) {
                self.learn_from_window(now);
            } else if now.saturating_duration_since(since) >= self.settings.window {
                self.learned = Learned::Floor(self.effective_rpm);
            }
        }
        let quiet_since = match self.phase {
            Phase::Normal => None,
            Phase::Retreat {
                probing: Some(_), ..
            } => None,
            Phase::Retreat { quiet_since, .. } => Some(quiet_since),
            Phase::Recover { last_step, .. } => Some(last_step),
        };
        let quiet_for = quiet_since.map(|at| {
            let last_429 = self.last_refusal.map_or(at, |r| r.at.max(at));
            now.saturating_duration_since(last_429)
        });
        if quiet_for.is_some_and(|q| q >= self.settings.window) && self.history.busy_window(now) {
            // A whole busy window ran at this rate without a 429: it is proven.
            self.proven_rpm = Some(self.proven_rpm.unwrap_or(0.0).max(self.effective_rpm));
            if let Phase::Recover { above, .. } = &mut self.phase {
                *above = None;
            }
        }
        match self.phase {
            Phase::Normal => {}
            Phase::Retreat { quiet_since, .. } => {
                if self.pause_until.is_none()
                    && !self.is_probing()
                    && now.saturating_duration_since(quiet_since) >= self.settings.quiet_period
                {
                    self.phase = Phase::Recover {
                        last_step: now,
                        above: None,
                    };
                }
            }
            Phase::Recover { last_step, above } => self.recover(now, last_step, above),
        }
    }

    /// The first whole busy window after a cut that came too early to learn from.
    fn learn_from_window(&mut self, now: Instant) {
        let accepted = self.history.accepted_rpm(now);
        let rpm = self.headroom(accepted).max(self.effective_rpm);
        // A window that was mostly spent at the cut rate only proves the cut rate.
        self.learned = if accepted <= self.effective_rpm * (1.0 + AT_THE_CUT_RATE) {
            Learned::Floor(rpm)
        } else {
            Learned::Known(Ceiling {
                rpm,
                source: CeilingSource::Window,
            })
        };
    }

    fn recover(&mut self, now: Instant, mut last_step: Instant, mut above: Option<f64>) {
        let s = &self.settings;
        let step = s.recover_step * self.base_rpm;
        if matches!(self.learned, Learned::Pending { .. }) {
            // Nothing to climb to before a whole busy window has taught it.
            return;
        }
        let mut bound = self
            .learned
            .bound()
            .unwrap_or(self.base_rpm)
            .min(self.base_rpm);
        while now.saturating_duration_since(last_step) >= s.recover_interval
            && self.effective_rpm < bound
        {
            self.effective_rpm = (self.effective_rpm + step).min(bound);
            last_step += s.recover_interval;
        }
        // Above a known ceiling: rarely and explicitly. Above one that only proves a rate:
        // one step per whole window.
        let above_every = match self.learned {
            Learned::Floor(_) => s.window.min(s.probe_interval),
            _ => s.probe_interval,
        };
        // Half-way to a rate a step above was refused at, if there is one; not at all once
        // that is closer than half a percent of the base rate.
        let step_above = match self.refused_rpm {
            Some(refused) => ((refused - bound) / 2.0).min(step),
            None => step,
        };
        while self.effective_rpm >= bound
            && self.effective_rpm < self.base_rpm
            && step_above >= 0.005 * self.base_rpm
            && now.saturating_duration_since(last_step) >= above_every
        {
            above = Some(bound);
            bound += step_above;
            self.learned = match self.learned {
                Learned::Known(c) => Learned::Known(Ceiling { rpm: bound, ..c }),
                _ => Learned::Floor(bound),
            };
            self.effective_rpm = (self.effective_rpm + step_above).min(self.base_rpm);
            last_step += above_every;
        }
        if self.effective_rpm >= self.base_rpm {
            self.back_to_normal();
        } else {
            self.phase = Phase::Recover { last_step, above };
        }
    }

    pub(super) fn back_to_normal(&mut self) {
        self.effective_rpm = self.base_rpm;
        self.phase = Phase::Normal;
        self.learned = Learned::Nothing;
    }

    /// When the rate goes up next by itself, if it will.
    pub fn next_step_at(&self) -> Option<Instant> {
        let s = &self.settings;
        match self.phase {
            Phase::Normal => None,
            Phase::Retreat {
                probing: Some(_), ..
            } => None,
            Phase::Retreat { quiet_since, .. } => Some(quiet_since + s.quiet_period),
            Phase::Recover { last_step, .. } => {
                if matches!(self.learned, Learned::Pending { .. }) {
                    return None;
                }
                let bound = self.learned.bound().unwrap_or(self.base_rpm);
                if self.effective_rpm < bound {
                    Some(last_step + s.recover_interval)
                } else if matches!(self.learned, Learned::Floor(_)) {
                    Some(last_step + s.window.min(s.probe_interval))
                } else {
                    Some(last_step + s.probe_interval)
                }
            }
        }
    }
}
