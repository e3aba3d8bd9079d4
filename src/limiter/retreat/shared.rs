//! What several sidecars sharing one quota agree on of their controllers, and how a
//! controller takes it over; also the state it carries across a restart.

use std::time::Instant;

use super::{Ceiling, CeilingSource, Learned, Phase, RetreatController, RetreatState};

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

impl RetreatController {
    /// Restores a saved state (effective rate clamped to the current base and floor). A saved
    /// ceiling comes back as it was; without one, the restored rate is only a floor, which
    /// recovery verifies one step per busy window.
    pub fn restore(
        &mut self,
        state: RetreatState,
        effective_rpm: f64,
        ceiling: Option<Ceiling>,
        pause_until: Option<Instant>,
        now: Instant,
    ) {
        self.effective_rpm = effective_rpm.clamp(self.floor_rpm(), self.base_rpm);
        self.phase = match state {
            RetreatState::Normal => Phase::Normal,
            RetreatState::Retreat => Phase::Retreat {
                quiet_since: now,
                probing: None,
            },
            RetreatState::Recover => Phase::Recover {
                last_step: now,
                above: None,
            },
        };
        if state == RetreatState::Normal {
            self.effective_rpm = self.base_rpm;
            self.learned = Learned::Nothing;
        } else {
            self.learned = match ceiling {
                Some(c) => Learned::Known(Ceiling {
                    rpm: c.rpm.clamp(self.effective_rpm, self.base_rpm),
                    ..c
                }),
                None => Learned::Floor(self.effective_rpm),
            };
        }
        self.pause_until = pause_until
            .filter(|p| *p > now)
            .map(|p| p.min(now + self.max_pause));
    }

    /// What other instances sharing the quota should know of this controller.
    pub fn shared(&self, now: Instant) -> SharedControl {
        SharedControl {
            effective_rpm: self.effective_rpm,
            state: self.state(),
            ceiling_rpm: self.ceiling_rpm(),
            pause_until: self.pause_until.filter(|p| *p > now),
        }
    }

    /// Takes over the state the instances sharing the quota agreed on. The quiet period and
    /// the recovery interval count from now, so a step taken by one instance is not repeated
    /// by the others; a pause is only ever lengthened.
    pub fn adopt(&mut self, shared: &SharedControl, now: Instant) {
        let changed = shared.state != self.state()
            || (shared.effective_rpm - self.effective_rpm).abs() > 1e-9;
        match shared.state {
            RetreatState::Normal => self.back_to_normal(),
            state => {
                self.effective_rpm = shared.effective_rpm.clamp(self.floor_rpm(), self.base_rpm);
                let ceiling = shared
                    .ceiling_rpm
                    .map(|c| c.clamp(self.floor_rpm(), self.base_rpm));
                self.learned = match (ceiling, self.learned) {
                    (Some(rpm), Learned::Floor(_)) => Learned::Floor(rpm),
                    (Some(rpm), Learned::Known(c)) => Learned::Known(Ceiling { rpm, ..c }),
                    (Some(rpm), _) => Learned::Known(Ceiling {
                        rpm,
                        source: CeilingSource::Window,
                    }),
                    (None, learned) => learned,
                };
                match (state, &mut self.phase) {
                    (RetreatState::Retreat, Phase::Retreat { quiet_since, .. }) => {
                        if changed {
                            *quiet_since = now;
                        }
                    }
                    (RetreatState::Retreat, _) => {
                        self.phase = Phase::Retreat {
                            quiet_since: now,
                            probing: None,
                        };
                    }
                    (RetreatState::Recover, Phase::Recover { last_step, .. }) => {
                        if changed {
                            *last_step = now;
                        }
                    }
                    (_, _) => {
                        self.phase = Phase::Recover {
                            last_step: now,
                            above: None,
                        };
                    }
                }
            }
        }
        if let Some(until) = shared.pause_until.filter(|p| *p > now) {
            if self.pause_until.is_none_or(|p| p < until) {
                self.pause_until = Some(until);
            }
        }
    }

    /// See `partial_view`.
    pub fn set_partial_view(&mut self, partial: bool) {
        self.partial_view = partial;
    }
}
