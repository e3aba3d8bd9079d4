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

/// Time between round trips while nothing else asks for one: the heartbeat, and the retry
/// interval while Redis is unreachable.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Time between attempts while Redis is unreachable.
const RETRY: Duration = Duration::from_millis(250);
/// A leased slot that nobody takes stays open at least this long (timer jitter).
const MIN_GRACE: Duration = Duration::from_millis(5);

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
}

/// Runs until the gate is dropped (its route left the configuration).
pub async fn run(
    shared: Arc<SharedQuota>,
    route: String,
    gate: Weak<AdmissionGate>,
    wake: Arc<Notify>,
) {
    let mut link = LinkState {
        agreed: None,
        seen_version: -1,
        next_heartbeat: now(),
        full_until: now(),
        paced_until: now(),
        degraded: false,
    };
    loop {
        let Some(g) = gate.upgrade() else { return };
        let plan = g.lease_plan();
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
        if change == Change::None && wanted == 0 && t < link.next_heartbeat {
            let mut at = link.next_heartbeat;
            if plan.wanted > 0 {
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
            route: &route,
            wanted: wanted.min(shared.settings.max_lease as usize),
            own_rpm: plan.own_rpm,
            margin: plan.margin,
            capacity: plan.capacity,
            horizon: shared.settings.lease_ahead,
            change,
            rate: control.effective_rpm,
            state: control.state.as_gauge(),
            ceiling: control.ceiling_rpm.unwrap_or(0.0),
            pause: control
                .pause_until
                .map_or(Duration::ZERO, |p| p.saturating_duration_since(t)),
            seen_version: link.seen_version,
            waiting: plan.wanted,
            rejoining: link.degraded,
        };
        let result = shared.call(&request).await;
        let Some(g) = gate.upgrade() else { return };
        let t = now();
        link.next_heartbeat = t + HEARTBEAT;
        match result {
            Ok(reply) => {
                if link.degraded {
                    link.degraded = false;
                    g.set_supply(Supply::Leased, t);
                    shared.rejoined(&route);
                }
                absorb(&g, &mut link, &plan.control, &reply, t, plan.margin);
                shared.leased(&route, reply.slots.len(), reply.live);
                let ahead = shared.settings.lease_ahead;
                if reply.slots.len() < request.wanted {
                    // The schedule is taken up to the horizon: ask again when half of it is
                    // free, so that one lease brings several slots instead of racing the other
                    // sidecars for each one.
                    link.full_until = t + reply.next_free.saturating_sub(ahead / 2).max(ahead / 4);
                }
                link.paced_until = t + ahead / 2;
            }
            Err(error) => {
                if !link.degraded {
                    link.degraded = true;
                    let share = g.fallback_share(shared.instances());
                    // Other sidecars may hold slots up to a horizon ahead: the local share
                    // starts after that, so that the two never add up.
                    g.set_supply(Supply::Refill { share }, t + shared.settings.lease_ahead);
                    shared.degraded(&route, &error, share);
                }
                // Ask again soon, so that the sidecars rejoin close together.
                link.next_heartbeat = t + RETRY;
                link.full_until = link.next_heartbeat;
            }
        }
    }
}

/// Takes in one answer: the shared controller state (unless the local one changed while the
/// call was under way; that change goes out with the next call) and the leased slots.
fn absorb(
    gate: &AdmissionGate,
    link: &mut LinkState,
    sent: &SharedControl,
    reply: &LeaseReply,
    t: Instant,
    margin: f64,
) {
    let remote = reply.rate.map(|rate| SharedControl {
        effective_rpm: rate,
        state: RetreatState::from_gauge(reply.state),
        ceiling_rpm: (reply.ceiling > 0.0).then_some(reply.ceiling),
        pause_until: (!reply.pause.is_zero()).then(|| t + reply.pause),
    });
    let local = gate.shared_control();
    let moved_meanwhile = local.differs(&without_past_pause(*sent, t));
    if let Some(remote) = remote.filter(|_| reply.version != link.seen_version) {
        if !moved_meanwhile {
            gate.adopt_shared(&remote);
        }
    }
    link.seen_version = reply.version;
    link.agreed = Some(if moved_meanwhile {
        remote.unwrap_or(*sent)
    } else {
        gate.shared_control()
    });

    // A slot may be taken a little after it opens (timers are not exact), but not so late
    // that it crowds the next one: a fraction of the spacing the safety margin pays for.
    let grace = reply.spacing.mul_f64(margin.max(0.0)).max(MIN_GRACE);
    let starts: Vec<Instant> = reply.slots.iter().map(|offset| t + *offset).collect();
    gate.take_slots(&starts, grace);
}

fn without_past_pause(mut control: SharedControl, now: Instant) -> SharedControl {
    control.pause_until = control.pause_until.filter(|p| *p > now);
    control
}
