//! The gate as one key's link to the shared bucket sees it: what to lease, the slots it
//! brings, and the controller state shared with the other sidecars. One handle per key of a
//! gate, so that the link has one narrow way in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{now, AdmissionGate};
use crate::limiter::{SharedControl, Supply};

/// What the link to the shared bucket needs from this gate for its next round trip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeasePlan {
    /// Slots the waiters need beyond those held (0 while paused).
    pub wanted: usize,
    /// Leased slots in hand, open or ahead.
    pub held: usize,
    /// Requests waiting here.
    pub waiting: usize,
    pub own_rpm: f64,
    pub margin: f64,
    /// The upstream's window as configured (`adaptive.window`).
    pub window: Duration,
    pub capacity: u32,
    pub control: SharedControl,
}

/// One key of a gate, as its link to the shared bucket uses it.
pub struct Lease<'a> {
    gate: &'a AdmissionGate,
    lane: usize,
}

impl AdmissionGate {
    /// The lease handle of this key.
    pub fn lease(&self, lane: usize) -> Lease<'_> {
        Lease { gate: self, lane }
    }
}

impl Lease<'_> {
    /// The alarm clock of this key's link (held apart from the gate so that a sleeping link
    /// does not keep a retired gate alive).
    pub fn link_wake(&self) -> Arc<Notify> {
        self.gate.link_wakes[self.lane.min(self.gate.link_wakes.len() - 1)].clone()
    }

    /// What to ask the shared bucket of this key for.
    pub fn plan(&self) -> LeasePlan {
        let t = now();
        let mut state = self.gate.lock();
        let limiter = &mut state.limiter;
        let control = limiter.shared_control(self.lane, t);
        let controller = limiter.controller_of(self.lane);
        LeasePlan {
            wanted: if controller.is_paused(t) {
                0
            } else {
                limiter.slots_wanted(self.lane, t)
            },
            held: limiter.slots_held(self.lane),
            waiting: limiter.queue_len(),
            own_rpm: controller.effective_rpm(),
            margin: controller.settings().safety_margin,
            window: controller.settings().window,
            capacity: limiter.capacity(),
            control,
        }
    }

    /// Key `lane`'s controller state as other sidecars should see it.
    pub fn shared_control(&self) -> SharedControl {
        self.gate.lock().limiter.shared_control(self.lane, now())
    }

    /// Takes slots leased for this key (their starts on this host's clock).
    pub fn take_slots(&self, starts: &[Instant], grace: Duration) {
        if starts.is_empty() {
            return;
        }
        self.gate
            .lock()
            .limiter
            .add_slots(self.lane, starts, grace, now());
        self.gate.wake.notify_one();
    }

    /// The model lanes of this key that hold a model back, for the other sidecars.
    pub fn model_controls(&self) -> Vec<(Arc<str>, SharedControl)> {
        self.gate.lock().limiter.model_controls(self.lane, now())
    }

    /// Takes over what the sidecars sharing this key report of its models.
    pub fn adopt_model_controls(&self, reports: &[(Arc<str>, SharedControl)], live: u32) {
        self.gate
            .lock()
            .limiter
            .adopt_model_controls(self.lane, reports, live, now());
        self.gate.wake.notify_one();
    }

    /// Takes over the controller state the sidecars agreed on for this key.
    pub fn adopt_shared(&self, control: &SharedControl) {
        self.gate
            .lock()
            .limiter
            .adopt_shared(self.lane, control, now());
        self.gate.wake.notify_one();
    }

    /// The share of this key's rate this gate takes on its own when `instances` sidecars
    /// share it.
    pub fn fallback_share(&self, instances: Option<u32>) -> f64 {
        self.gate
            .lock()
            .limiter
            .fallback_share(self.lane, instances)
    }

    /// Switches this key between leased slots and the local share; a local bucket earns
    /// nothing before `refill_from`.
    pub fn set_supply(&self, supply: Supply, refill_from: Instant) {
        self.gate
            .lock()
            .limiter
            .set_supply(self.lane, supply, now(), refill_from);
        self.gate.wake.notify_one();
    }
}
