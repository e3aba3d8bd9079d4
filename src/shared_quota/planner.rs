//! The link's decisions, without a clock and without Redis: when to lease and how many slots,
//! which controller change to publish, how to take in an answer (slots, the shared controller
//! state), when to fall back to the local share and how to rejoin. Every call is handed `now`
//! and what the gate reports, and returns what to do; `link` carries it out. So the whole
//! protocol is tested at exact instants, the way the limiter is.

use std::time::{Duration, Instant};

use super::client::{Change, LeaseReply};
use crate::admission::LeasePlan;
use crate::limiter::{RetreatState, SharedControl};

/// Time between round trips while nothing else asks for one: the heartbeat that keeps this
/// sidecar counted as alive and brings the others' controller changes while it is idle. (A
/// cut takes effect sooner anyway: every lease is spaced at the shared rate.)
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Time between attempts while Redis is unreachable.
pub const RETRY: Duration = Duration::from_millis(250);
/// A leased slot that nobody takes stays open at least this long (timer jitter).
const MIN_GRACE: Duration = Duration::from_millis(5);
/// The least lateness allowed to a slot, whatever the safety margin (it may be 0).
const MIN_BUDGET: Duration = Duration::from_millis(20);

/// What the next step is.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Nothing to say before this instant (unless the gate wakes the link).
    Sleep(Instant),
    /// Call the lease script.
    Call(Call),
}

/// The decisions of one call; the rest of the request is what the gate reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Slots to ask for.
    pub wanted: usize,
    /// The controller change to publish.
    pub change: Change,
    /// Coming back from the local share: how long the shared schedule waits for the others.
    pub rejoin_hold: Option<Duration>,
}

/// What to do with an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    /// Redis answered after a time on the local share: lease again from now on.
    pub rejoined: bool,
    /// The shared controller state to take over.
    pub adopt: Option<SharedControl>,
    /// The gate's state once `adopt` is taken over is what was agreed: hand it to `agree`.
    pub agree_local: bool,
    /// Starts of the slots to take (on this host's clock), each open for `grace`. Empty when
    /// the answer came too late for its slots to be safe.
    pub slots: Vec<Instant>,
    pub grace: Duration,
}

/// The link's memory between round trips.
#[derive(Debug, Clone)]
pub struct Planner {
    lease_ahead: Duration,
    max_lease: usize,
    timeout: Duration,
    /// The controller state last agreed with Redis; a local difference is published.
    agreed: Option<SharedControl>,
    seen_version: i64,
    next_heartbeat: Instant,
    /// No lease before this: the shared schedule is taken up to the horizon until then.
    full_until: Instant,
    /// While slots are in hand, no lease before this, so that waiters gather for one.
    paced_until: Instant,
    degraded: bool,
    /// While degraded: when the local share starts to earn.
    local_from: Instant,
    /// How far ahead any sidecar may hold slots: `lease_ahead`, or the longer horizon Redis
    /// last reported (at low rates).
    reach: Duration,
}

impl Planner {
    pub fn new(lease_ahead: Duration, max_lease: u32, timeout: Duration, now: Instant) -> Planner {
        Planner {
            lease_ahead,
            max_lease: max_lease as usize,
            timeout,
            agreed: None,
            seen_version: -1,
            next_heartbeat: now,
            full_until: now,
            paced_until: now,
            degraded: false,
            local_from: now,
            reach: lease_ahead,
        }
    }

    /// The version of the shared state last seen, for the call.
    pub fn seen_version(&self) -> i64 {
        self.seen_version
    }

    #[cfg(test)]
    pub fn is_degraded(&self) -> bool {
        self.degraded
    }

    /// What to do now, given what the gate reports.
    pub fn next(&self, plan: &LeasePlan, now: Instant) -> Next {
        let change = self.agreed.map_or(Change::None, |agreed| {
            let agreed = without_past_pause(agreed, now);
            if !plan.control.differs(&agreed) {
                Change::None
            } else if plan.control.slows_down(&agreed) {
                Change::Slow
            } else {
                Change::Step
            }
        });
        // Lease when slots are wanted and either none is in hand (the queue would stall) or
        // the pause between leases is over: waiters gather, and one round trip serves them.
        let lease_at = self.full_until.max(if plan.held == 0 {
            now
        } else {
            self.paced_until
        });
        let wanted = if now >= lease_at { plan.wanted } else { 0 };
        // While Redis is out of reach only the retry timer calls it, whatever there is to say.
        let idle = self.degraded || (change == Change::None && wanted == 0);
        if idle && now < self.next_heartbeat {
            let mut at = self.next_heartbeat;
            if plan.wanted > 0 && !self.degraded {
                at = at.min(lease_at);
            }
            return Next::Sleep(at);
        }
        Next::Call(Call {
            wanted: wanted.min(self.max_lease),
            change,
            // Coming back after the local share began to earn: the others may still be
            // spending theirs until their next retry answers (a retry interval and two
            // timeouts at worst), so the shared schedule waits that long.
            rejoin_hold: (self.degraded && now >= self.local_from)
                .then(|| self.reach.max(RETRY + self.timeout * 2)),
        })
    }

    /// Takes in an answer to `call`, sent at `sent` with the controller state `sent_control`;
    /// `local` is the gate's controller state now, `plan` what the gate reported for the call.
    pub fn answered(
        &mut self,
        call: &Call,
        plan: &LeasePlan,
        reply: &LeaseReply,
        local: SharedControl,
        sent: Instant,
        now: Instant,
    ) -> Answered {
        self.next_heartbeat = now + HEARTBEAT;
        let rejoined = std::mem::take(&mut self.degraded);
        let (adopt, agree_local) = self.absorb(&plan.control, reply, local, now);
        // Slots are placed on this host's clock as of the answer, so they may open up to a
        // round trip late; a slot may also be taken a little after it opens. Both crowd the
        // next slot, and together they must stay within what the safety margin leaves in the
        // window. A slow answer's slots are left to lapse.
        let budget = plan.window.mul_f64(plan.margin / 2.0).max(MIN_BUDGET);
        let grace = budget.min(reply.spacing / 2).max(MIN_GRACE);
        let slots = if now - sent <= budget {
            reply.slots.iter().map(|offset| now + *offset).collect()
        } else {
            Vec::new()
        };
        self.reach = reply.horizon.max(self.lease_ahead);
        let ahead = self.reach;
        if reply.slots.len() < call.wanted && reply.next_free > ahead {
            // The schedule is taken up to the horizon: ask again when half of it is free, so
            // that one lease brings several slots instead of racing the other sidecars for
            // each one. (Fewer slots than wanted with the schedule not full means this sidecar
            // holds its part: it asks again when it has spent its slots.)
            self.full_until = now + reply.next_free.saturating_sub(ahead / 2).max(ahead / 4);
        }
        self.paced_until = now + ahead / 2;
        Answered {
            rejoined,
            adopt,
            agree_local,
            slots,
            grace,
        }
    }

    /// The gate's controller state after an answer was taken in is the agreed one.
    pub fn agree(&mut self, local: SharedControl) {
        self.agreed = Some(local);
    }

    /// The call failed (Redis out of reach). Returns, when this starts a time on the local
    /// share, the instant from which the local share may earn: other sidecars may hold slots
    /// up to a horizon ahead, so that the two never add up.
    pub fn failed(&mut self, now: Instant) -> Option<Instant> {
        let newly = !self.degraded;
        if newly {
            self.degraded = true;
            self.local_from = now + self.reach;
        }
        // Ask again soon, so that the sidecars rejoin close together.
        self.next_heartbeat = now + RETRY;
        self.full_until = self.next_heartbeat;
        newly.then_some(self.local_from)
    }

    /// Takes in one answer's controller state, unless the local one changed while the call
    /// was under way (that change goes out with the next call). At first contact a local
    /// state that is slower than the shared one (a restored retreat, 429s seen before Redis
    /// answered) is not dropped but published. Returns the state the gate should adopt, and
    /// whether the gate's state after that is the agreed one.
    fn absorb(
        &mut self,
        sent: &SharedControl,
        reply: &LeaseReply,
        local: SharedControl,
        now: Instant,
    ) -> (Option<SharedControl>, bool) {
        let first_contact = self.agreed.is_none();
        let remote = reply.rate.map(|rate| SharedControl {
            effective_rpm: rate,
            state: reply.state,
            ceiling_rpm: (reply.ceiling > 0.0).then_some(reply.ceiling),
            pause_until: (!reply.pause.is_zero()).then(|| now + reply.pause),
        });
        let news = reply.version != self.seen_version;
        self.seen_version = reply.version;
        if first_contact {
            let nobody_slower = SharedControl {
                effective_rpm: f64::INFINITY,
                state: RetreatState::Normal,
                ceiling_rpm: None,
                pause_until: None,
            };
            let shared = remote.unwrap_or(nobody_slower);
            if local.slows_down(&shared) {
                self.agreed = Some(shared);
                return (None, false);
            }
        }
        let moved_meanwhile = local.differs(&without_past_pause(*sent, now));
        if moved_meanwhile {
            self.agreed = Some(remote.unwrap_or(*sent));
            return (None, false);
        }
        self.agreed = Some(local);
        (remote.filter(|_| first_contact || news), true)
    }
}

fn without_past_pause(mut control: SharedControl, now: Instant) -> SharedControl {
    control.pause_until = control.pause_until.filter(|p| *p > now);
    control
}
