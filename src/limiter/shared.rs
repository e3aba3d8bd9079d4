//! The limiter as one of several sidecars sharing a quota sees it: each key draws either on
//! its local bucket or on slots leased from the shared bucket, and its controller state is
//! agreed with the other sidecars.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Limiter, SharedControl, TokenBucket};

/// Where the tokens come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Supply {
    /// The local bucket refills at `share` of the effective rate: 1 for a sidecar of its own,
    /// a fraction for one that shares the quota but cannot reach the shared bucket.
    Refill { share: f64 },
    /// Only slots leased from the shared bucket are granted; the local bucket stays empty.
    Leased,
}

impl Limiter {
    /// Switches key `lane` between the local bucket and leased slots. Slots already held
    /// stay valid; a local bucket starts empty and earns nothing before `refill_from` nor
    /// before the last slot held, so the switch never adds a burst to what was leased. With
    /// leased slots the controller sees only this instance's share of the traffic, so it stops
    /// learning its ceiling from the rate it saw accepted.
    pub fn set_supply(&mut self, lane: usize, supply: Supply, now: Instant, refill_from: Instant) {
        self.advance(now);
        let lane = self.lane_mut(lane);
        if supply == Supply::Leased {
            lane.controller.set_partial_view(true);
        }
        if supply == lane.supply {
            return;
        }
        lane.supply = supply;
        let start = lane
            .slots
            .last_start()
            .map_or(refill_from, |last| last.max(refill_from))
            .max(now);
        let capacity = lane.bucket.capacity() as u32;
        lane.bucket = TokenBucket::with_tokens(capacity, 0.0, start);
    }

    /// Takes slots leased from the shared bucket; each stays open for `grace`.
    pub fn add_slots(&mut self, lane: usize, starts: &[Instant], grace: Duration, now: Instant) {
        self.advance(now);
        let lane = self.lane_mut(lane);
        if lane.controller.is_paused(now) {
            return;
        }
        for at in starts {
            lane.slots.add(*at, grace);
        }
    }

    /// How many more slots the waiters need of key `lane` than are held: the waiters not
    /// covered by the slots of every key, shared out evenly over the active keys.
    pub fn slots_wanted(&self, lane: usize, now: Instant) -> usize {
        if !self.key_active(lane) {
            return 0;
        }
        let active = self.lanes.iter().filter(|l| l.active);
        let held: usize = active.clone().map(|l| l.slots.held()).sum();
        let keys = active.count().max(1);
        // Waiters held by their model or client limit would let a leased slot lapse.
        let ready = if self.models.is_empty() && self.clients.is_empty() {
            self.queue.len()
        } else {
            let resources = self.resources();
            self.queue
                .iter()
                .filter(|w| resources.limits_allow(&w.client, w.model, w.learned, w.cost(), now))
                .count()
        };
        ready.saturating_sub(held).div_ceil(keys)
    }

    /// The share of the rate one of `instances` sidecars takes while the shared bucket is out
    /// of reach. Each local bucket may put up to its capacity more requests into a window
    /// than its rate says (the tokens it holds at the window's start); the shares leave room
    /// for those of the other `instances - 1` in the controller's window, so the sidecars
    /// together stay within the quota as one sidecar alone would. `None` (the number is
    /// unknown): the floor fraction.
    pub fn fallback_share(&self, lane: usize, instances: Option<u32>) -> f64 {
        let lane = self.lane(lane);
        let s = lane.controller.settings();
        let Some(n) = instances.filter(|n| *n > 0).map(f64::from) else {
            return s.floor_fraction;
        };
        let per_window =
            lane.controller.effective_rpm() * (1.0 - s.safety_margin) * s.window.as_secs_f64()
                / 60.0;
        let burst = lane.bucket.capacity();
        let room = if per_window > 0.0 {
            (1.0 - (n - 1.0) * burst / per_window).max(0.0)
        } else {
            0.0
        };
        (room / n).max(s.floor_fraction / n)
    }

    pub fn slots_held(&self, lane: usize) -> usize {
        self.lane(lane).slots.held()
    }

    /// The controller state to share with other instances.
    pub fn shared_control(&mut self, lane: usize, now: Instant) -> SharedControl {
        self.advance(now);
        self.lane(lane).controller.shared(now)
    }

    /// Takes over the controller state the instances agreed on; a pause drops every token.
    pub fn adopt_shared(&mut self, lane: usize, shared: &SharedControl, now: Instant) {
        self.advance(now);
        let lane = self.lane_mut(lane);
        lane.controller.adopt(shared, now);
        if lane.controller.is_paused(now) {
            lane.bucket.drain();
            lane.slots.clear();
        }
    }

    /// The lanes of key `lane` that hold a model back, as the other sidecars should see them.
    pub fn model_controls(&mut self, lane: usize, now: Instant) -> Vec<(Arc<str>, SharedControl)> {
        self.advance(now);
        self.learned
            .models()
            .filter_map(|m| {
                let l = m.lanes.get(lane)?.as_ref()?;
                l.limiting(now)
                    .then(|| (m.id.clone(), l.controller.shared(now)))
            })
            .collect()
    }

    /// Takes over what the sidecars sharing key `lane` report of its models: a report that
    /// slows a lane down (a lower rate, a longer pause) is taken at once. Each sidecar runs
    /// a model's lane at its share of the rate (`1 / live`), so that together they stay
    /// within the model's limit; and, seeing only its part of the traffic, a lane learns no
    /// ceiling from what it saw accepted.
    pub fn adopt_model_controls(
        &mut self,
        lane: usize,
        reports: &[(Arc<str>, SharedControl)],
        live: u32,
        now: Instant,
    ) {
        self.advance(now);
        let share = 1.0 / f64::from(live.max(1));
        let key_rpm = self.lane(lane).controller.effective_rpm();
        for (model, remote) in reports {
            let Some(m) = self.learned.intern(model, now) else {
                continue;
            };
            let Some(l) = self.learned.lane_mut(m, lane, key_rpm, &self.retreat, now) else {
                continue;
            };
            if remote.slows_down(&l.controller.shared(now)) {
                l.controller.adopt(remote, now);
                if l.controller.is_paused(now) || l.controller.is_probing() {
                    l.bucket.drain();
                }
            }
        }
        self.learned.set_share(lane, share);
    }

    /// Whether any key takes tokens from its local bucket while the quota is shared.
    pub fn any_refilling(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| matches!(l.supply, Supply::Refill { .. }))
    }
}
