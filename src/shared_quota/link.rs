//! The link between one route's gate and its bucket in Redis: leases slots for the requests
//! waiting at the gate, publishes the local controller's cuts and steps, takes over those of
//! the other sidecars, keeps a heartbeat, and falls back to the local share when Redis cannot
//! be reached, rejoining on the first answer.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::client::{Change, LeaseReply, LeaseRequest};
use super::SharedQuota;
use crate::admission::{now, AdmissionGate};
use crate::limiter::{RetreatState, SharedControl, Supply};

/// Time between round trips while nothing else asks for one: the heartbeat that keeps this
/// sidecar counted as alive and brings the others' controller changes while it is idle. (A
/// cut takes effect sooner anyway: every lease is spaced at the shared rate.)
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Time between attempts while Redis is unreachable.
const RETRY: Duration = Duration::from_millis(250);
/// A leased slot that nobody takes stays open at least this long (timer jitter).
const MIN_GRACE: Duration = Duration::from_millis(5);
/// The least lateness allowed to a slot, whatever the safety margin (it may be 0).
const MIN_BUDGET: Duration = Duration::from_millis(20);

/// What the link remembers between round trips.
struct LinkState {
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

/// Runs until the gate is dropped (its route left the configuration). `route` names the
/// shared bucket: the route's name, with the key's name for a pool of several keys.
pub async fn run(
    shared: Arc<SharedQuota>,
    route: String,
    gate: Weak<AdmissionGate>,
    lane: usize,
    wake: Arc<Notify>,
) {
    serve(&shared, &route, gate, lane, wake).await;
    shared.forget(&route);
}

async fn serve(
    shared: &SharedQuota,
    route: &str,
    gate: Weak<AdmissionGate>,
    lane: usize,
    wake: Arc<Notify>,
) {
    let settings = &shared.settings;
    let mut link = LinkState {
        agreed: None,
        seen_version: -1,
        next_heartbeat: now(),
        full_until: now(),
        paced_until: now(),
        degraded: false,
        local_from: now(),
        reach: settings.lease_ahead,
    };
    loop {
        let Some(g) = gate.upgrade() else { return };
        let plan = g.lease_plan(lane);
        drop(g);
        let t = now();
        let change = link.agreed.map_or(Change::None, |agreed| {
            let agreed = without_past_pause(agreed, t);
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
        let lease_at = link
            .full_until
            .max(if plan.held == 0 { t } else { link.paced_until });
        let wanted = if t >= lease_at { plan.wanted } else { 0 };
        // While Redis is out of reach only the retry timer calls it, whatever there is to say.
        let idle = link.degraded || (change == Change::None && wanted == 0);
        if idle && t < link.next_heartbeat {
            let mut at = link.next_heartbeat;
            if plan.wanted > 0 && !link.degraded {
                at = at.min(lease_at);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                _ = wake.notified() => {}
            }
            continue;
        }

        let control = plan.control;
        let request = LeaseRequest {
            route,
            wanted: wanted.min(shared.settings.max_lease as usize),
            own_rpm: plan.own_rpm,
            margin: plan.margin,
            capacity: plan.capacity,
            horizon: settings.lease_ahead,
            change,
            rate: control.effective_rpm,
            state: control.state.as_gauge(),
            ceiling: control.ceiling_rpm.unwrap_or(0.0),
            pause: control
                .pause_until
                .map_or(Duration::ZERO, |p| p.saturating_duration_since(t)),
            seen_version: link.seen_version,
            waiting: plan.waiting,
            held: plan.held,
            // Coming back after the local share began to earn: the others may still be
            // spending theirs until their next retry answers (a retry interval and two
            // timeouts at worst), so the shared schedule waits that long.
            rejoin_hold: (link.degraded && t >= link.local_from)
                .then(|| link.reach.max(RETRY + settings.timeout * 2)),
        };
        let sent = now();
        let result = shared.call(&request).await;
        let Some(g) = gate.upgrade() else { return };
        let t = now();
        link.next_heartbeat = t + HEARTBEAT;
        match result {
            Ok(reply) => {
                if link.degraded {
                    link.degraded = false;
                    g.set_supply(lane, Supply::Leased, t);
                    shared.rejoined(route);
                }
                let first_contact = link.agreed.is_none();
                absorb(&g, lane, &mut link, &plan.control, &reply, first_contact);
                // Slots are placed on this host's clock as of the answer, so they may open up
                // to a round trip late; a slot may also be taken a little after it opens. Both
                // crowd the next slot, and together they must stay within what the safety
                // margin leaves in the window. A slow answer's slots are left to lapse.
                let budget = plan.window.mul_f64(plan.margin / 2.0).max(MIN_BUDGET);
                let taken = if t - sent <= budget {
                    let grace = budget.min(reply.spacing / 2).max(MIN_GRACE);
                    let starts: Vec<Instant> =
                        reply.slots.iter().map(|offset| t + *offset).collect();
                    g.take_slots(lane, &starts, grace);
                    starts.len()
                } else {
                    0
                };
                shared.leased(route, taken, reply.live);
                link.reach = reply.horizon.max(settings.lease_ahead);
                let ahead = link.reach;
                if reply.slots.len() < request.wanted && reply.next_free > ahead {
                    // The schedule is taken up to the horizon: ask again when half of it is
                    // free, so that one lease brings several slots instead of racing the other
                    // sidecars for each one. (Fewer slots than wanted with the schedule not
                    // full means this sidecar holds its part: it asks again when it has
                    // spent its slots.)
                    link.full_until = t + reply.next_free.saturating_sub(ahead / 2).max(ahead / 4);
                }
                link.paced_until = t + ahead / 2;
            }
            Err(error) => {
                if !link.degraded {
                    link.degraded = true;
                    let share = g.fallback_share(lane, shared.instances());
                    // Other sidecars may hold slots up to a horizon ahead: the local share
                    // starts after that, so that the two never add up.
                    link.local_from = t + link.reach;
                    g.set_supply(lane, Supply::Refill { share }, link.local_from);
                    shared.degraded(route, &error, share);
                }
                // Ask again soon, so that the sidecars rejoin close together.
                link.next_heartbeat = t + RETRY;
                link.full_until = link.next_heartbeat;
            }
        }
    }
}

/// Takes in one answer's controller state, unless the local one changed while the call was
/// under way (that change goes out with the next call). At first contact a local state that
/// is slower than the shared one (a restored retreat, 429s seen before Redis answered) is not
/// dropped but published.
fn absorb(
    gate: &AdmissionGate,
    lane: usize,
    link: &mut LinkState,
    sent: &SharedControl,
    reply: &LeaseReply,
    first_contact: bool,
) {
    let t = now();
    let remote = reply.rate.map(|rate| SharedControl {
        effective_rpm: rate,
        state: RetreatState::from_gauge(reply.state),
        ceiling_rpm: (reply.ceiling > 0.0).then_some(reply.ceiling),
        pause_until: (!reply.pause.is_zero()).then(|| t + reply.pause),
    });
    let local = gate.shared_control(lane);
    let news = reply.version != link.seen_version;
    link.seen_version = reply.version;
    if first_contact {
        let nobody_slower = SharedControl {
            effective_rpm: f64::INFINITY,
            state: RetreatState::Normal,
            ceiling_rpm: None,
            pause_until: None,
        };
        let shared = remote.unwrap_or(nobody_slower);
        if local.slows_down(&shared) {
            link.agreed = Some(shared);
            return;
        }
    }
    let moved_meanwhile = local.differs(&without_past_pause(*sent, t));
    if let Some(remote) = remote {
        if !moved_meanwhile && (first_contact || news) {
            gate.adopt_shared(lane, &remote);
        }
    }
    link.agreed = Some(if moved_meanwhile {
        remote.unwrap_or(*sent)
    } else {
        gate.shared_control(lane)
    });
}

fn without_past_pause(mut control: SharedControl, now: Instant) -> SharedControl {
    control.pause_until = control.pause_until.filter(|p| *p > now);
    control
}
