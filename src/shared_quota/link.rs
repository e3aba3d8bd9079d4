//! The link between one route's gate (one key of it) and its bucket in Redis: the async shell
//! around `planner`, which decides. It asks the gate what is needed, sleeps or calls Redis as
//! the planner says, and hands the answer (slots, the shared controller state) to the gate, or
//! falls back to the local share when Redis cannot be reached.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::client::{LeaseRequest, ModelReport};
use super::planner::{Next, Planner};
use super::SharedQuota;
use crate::admission::{now, AdmissionGate};
use crate::limiter::{SharedControl, Supply};

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
    let mut planner = Planner::new(
        settings.lease_ahead,
        settings.max_lease,
        settings.timeout,
        now(),
    );
    let mut models = ModelExchange::default();
    loop {
        let Some(g) = gate.upgrade() else { return };
        let plan = g.lease(lane).plan();
        drop(g);
        let t = now();
        let call = match planner.next(&plan, t) {
            Next::Sleep(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                    _ = wake.notified() => {}
                }
                continue;
            }
            Next::Call(call) => call,
        };
        let control = plan.control;
        let request = LeaseRequest {
            route,
            wanted: call.wanted,
            own_rpm: plan.own_rpm,
            margin: plan.margin,
            capacity: plan.capacity,
            horizon: settings.lease_ahead,
            change: call.change,
            rate: control.effective_rpm,
            state: control.state,
            ceiling: control.ceiling_rpm.unwrap_or(0.0),
            pause: control
                .pause_until
                .map_or(Duration::ZERO, |p| p.saturating_duration_since(t)),
            seen_version: planner.seen_version(),
            waiting: plan.waiting,
            held: plan.held,
            rejoin_hold: call.rejoin_hold,
        };
        let sent = now();
        let result = shared.call(&request).await;
        let Some(g) = gate.upgrade() else { return };
        let t = now();
        match result {
            Ok(reply) => {
                let lease = g.lease(lane);
                let local = lease.shared_control();
                let answered = planner.answered(&call, &plan, &reply, local, sent, t);
                if answered.rejoined {
                    lease.set_supply(Supply::Leased, t);
                    shared.rejoined(route);
                }
                if let Some(remote) = answered.adopt {
                    lease.adopt_shared(&remote);
                }
                if answered.agree_local {
                    planner.agree(lease.shared_control());
                }
                lease.take_slots(&answered.slots, answered.grace);
                shared.leased(route, answered.slots.len(), reply.live);
                let local = lease.model_controls();
                drop(g);
                models
                    .exchange(shared, route, &gate, lane, local, reply.live)
                    .await;
            }
            Err(error) => {
                if let Some(local_from) = planner.failed(t) {
                    let lease = g.lease(lane);
                    let share = lease.fallback_share(shared.instances());
                    lease.set_supply(Supply::Refill { share }, local_from);
                    shared.degraded(route, &error, share);
                }
            }
        }
    }
}

/// What the link knows of the model reports between round trips.
#[derive(Debug, Default)]
struct ModelExchange {
    /// The last answer named models: keep asking even with nothing to report.
    remote: bool,
    round: u64,
}

/// Ask for the others' model reports every this many leases when neither side has any.
const MODELS_EVERY: u64 = 4;

impl ModelExchange {
    /// Reports this key's model lanes (`local`) and takes over what all sidecars report,
    /// after a lease: every time there is something to say or hear, else every few leases.
    async fn exchange(
        &mut self,
        shared: &SharedQuota,
        route: &str,
        gate: &Weak<AdmissionGate>,
        lane: usize,
        local: Vec<(Arc<str>, SharedControl)>,
        live: u32,
    ) {
        self.round += 1;
        if local.is_empty() && !self.remote && !self.round.is_multiple_of(MODELS_EVERY) {
            return;
        }
        let t = now();
        let reports: Vec<ModelReport> = local
            .iter()
            .map(|(model, c)| ModelReport {
                model: model.to_string(),
                rate: c.effective_rpm,
                state: c.state,
                ceiling: c.ceiling_rpm.unwrap_or(0.0),
                pause: c
                    .pause_until
                    .map_or(Duration::ZERO, |p| p.saturating_duration_since(t)),
            })
            .collect();
        // A failure says nothing new: the lease decides whether Redis is out of reach.
        let Ok(answer) = shared.models(route, &reports).await else {
            return;
        };
        self.remote = !answer.is_empty();
        let Some(g) = gate.upgrade() else { return };
        let t = now();
        let adopt: Vec<(Arc<str>, SharedControl)> = answer
            .into_iter()
            .map(|r| {
                let control = SharedControl {
                    effective_rpm: r.rate,
                    state: r.state,
                    ceiling_rpm: (r.ceiling > 0.0).then_some(r.ceiling),
                    pause_until: (!r.pause.is_zero()).then(|| t + r.pause),
                };
                (Arc::from(r.model.as_str()), control)
            })
            .collect();
        g.lease(lane).adopt_model_controls(&adopt, live);
    }
}
