//! `rate_rpm: auto`: the upstream's stated limits set the rates. A limit stated on the answer
//! to a request of a model is that model's on its key; the key runs at the highest limit
//! stated on it, so that no model is held below its own. Until anything is stated, the
//! route's rate is 40 (NVIDIA's usual figure) and 429s teach the rest.
//!
//! Stated values are taken with care: what is no limit at all is dropped when it is read
//! (`StatedLimit::read`); a limit well below what the lane was seen to accept over its last
//! window contradicts it and is ignored; a limit above the rate now raises it to at most twice
//! what the upstream accepted over the last window, so a huge or false value never lifts the
//! rate far above what was accepted; and a ceiling learned from 429s still caps recovery.

use std::time::Instant;

use super::{Grant, Limiter, StatedLimit};

/// A stated limit below this share of what the lane accepted over its last window
/// contradicts what was seen, and is ignored.
const CONTRADICTS_BELOW: f64 = 0.9;

/// The lowest rate a statement sets (a model limited to less than this by a stated value is
/// more likely a hostile value than a limit).
const STATED_MIN_RPM: f64 = 1.0;

impl Limiter {
    /// Takes the limit the upstream stated on its answer to `grant` (with `rate_rpm: auto`).
    pub fn observe_stated(&mut self, grant: Grant, stated: StatedLimit, now: Instant) {
        if !self.auto {
            return;
        }
        self.advance(now);
        let k = grant.lane.min(self.lanes.len() - 1);
        let rpm = stated.rpm.max(STATED_MIN_RPM);
        if let Some(mg) = grant.learned {
            let key_rpm = self.lanes[k].controller.effective_rpm();
            if let Some(lane) = self
                .learned
                .lane_mut(mg.model, k, key_rpm, &self.retreat, now)
            {
                let accepted = lane.controller.accepted_rpm(now);
                if rpm >= CONTRADICTS_BELOW * accepted {
                    lane.stated = Some(rpm);
                }
            }
        }
        let key = &mut self.lanes[k];
        if key.own_rpm.is_some() {
            // The operator set this key's rate: that wins.
            return;
        }
        let highest = key.stated.map_or(rpm, |s| s.max(rpm));
        let stated_for_key = if grant.learned.is_none() {
            rpm
        } else {
            highest
        };
        let accepted = key.controller.accepted_rpm(now);
        if stated_for_key < CONTRADICTS_BELOW * accepted {
            return;
        }
        key.stated = Some(stated_for_key);
        let current = key.controller.base_rpm();
        let base = if stated_for_key > current {
            stated_for_key.min(current.max(2.0 * accepted))
        } else {
            stated_for_key
        };
        if (base - current).abs() > 1e-9 {
            key.controller.set_base_rpm(base);
        }
    }
}
