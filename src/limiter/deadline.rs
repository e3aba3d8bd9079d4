//! Telling a request at once that it cannot be served before its deadline, instead of when the
//! deadline passes.
//!
//! Only what is firm counts: a pause the upstream imposed (on the key, or on the request's
//! model, which NVIDIA locks for hours), the next probe of a lane that probes a full window
//! (one request per probe, so nobody else goes before it), and the requests that must go
//! first (higher classes, and the client's own earlier ones) at the keys' *base* rates, which
//! no recovery exceeds. A request told "not before then" gets a `Retry-After` spread a little
//! by a hash of its place, so that the clients' retries do not come back in one wave.

use std::time::{Duration, Instant};

use super::{Ask, Grant, Limiter, ModelRef, Rejection, Resolution, Waiter, WaiterId};

/// Most a `Retry-After` is spread by: a tenth of the wait, up to this.
const SPREAD_MAX: Duration = Duration::from_secs(30);

impl Limiter {
    /// The earliest a request of `learned` could go on some key by what is firm now, if that
    /// is later than now, and why: `ModelLocked` when the model's own pause is what holds it
    /// on every key.
    fn not_before(&self, learned: Option<ModelRef>, now: Instant) -> Option<(Instant, Rejection)> {
        let mut earliest: Option<(Instant, Rejection)> = None;
        for (k, lane) in self.lanes.iter().enumerate().filter(|(_, l)| l.active) {
            let key = firm_wait(&lane.controller, now);
            let model = learned
                .and_then(|m| self.learned.lane(m, k))
                .and_then(|l| firm_wait(&l.controller, now));
            let (at, why) = match (key, model) {
                (None, None) => return None,
                (Some(key_at), None) => (key_at, Rejection::QueueTimeout),
                (None, Some(model_at)) => (model_at, model_why(learned, &self.learned, k, now)),
                (Some(key_at), Some(model_at)) if model_at > key_at => {
                    (model_at, model_why(learned, &self.learned, k, now))
                }
                (Some(key_at), Some(_)) => (key_at, Rejection::QueueTimeout),
            };
            if earliest.is_none_or(|(e, _)| at < e) {
                earliest = Some((at, why));
            }
        }
        earliest
    }

    /// The earliest a request refused on `grant` could be sent again by what is firm, if that
    /// is later than now: a refused probe waits for the next (three times the spacing), any
    /// other for what holds its lanes now.
    pub fn replay_not_before(&self, grant: Grant, now: Instant) -> Option<Instant> {
        let key = &self.lane(grant.lane).controller;
        if grant.probe && grant.epoch == key.epoch() {
            return key.next_probe_if_refused(now);
        }
        if let Some(mg) = grant.learned.filter(|mg| mg.probe) {
            let lane = self.learned.lane(mg.model, grant.lane)?;
            if mg.epoch == lane.controller.epoch() {
                return lane.controller.next_probe_if_refused(now);
            }
        }
        self.not_before(grant.learned.map(|mg| mg.model), now)
            .map(|(at, _)| at)
    }

    /// Why a new request (`again`: a replay, ahead of its class) cannot be served before its
    /// deadline, and when to come back; `None` when it may.
    pub(super) fn unreachable(
        &self,
        ask: &Ask,
        learned: Option<ModelRef>,
        again: bool,
        id: WaiterId,
        now: Instant,
    ) -> Option<(Rejection, Duration)> {
        let firm = self.not_before(learned, now);
        let base_per_sec: f64 = self
            .lanes
            .iter()
            .filter(|l| l.active)
            .map(|l| l.controller.base_rpm() * (1.0 - l.controller.settings().safety_margin))
            .sum::<f64>()
            / 60.0;
        let ahead = self.queue.surely_ahead(&ask.client, ask.priority, again);
        let queued = (base_per_sec > 0.0 && ahead > 0)
            .then(|| now + Duration::from_secs_f64((ahead as f64 / base_per_sec).min(86_400.0)));
        let (at, why) = match (firm, queued) {
            (Some((f, why)), Some(q)) if f >= q => (f, why),
            (_, Some(q)) => (q, Rejection::QueueTimeout),
            (Some(firm), None) => firm,
            (None, None) => return None,
        };
        (at > ask.deadline).then(|| (why, spread(at - now, id)))
    }

    /// Answers the waiters that what is firm now puts past their deadline (after a 429 that
    /// paused or probes a lane): `Expired` at once, each with its `Retry-After`.
    pub(super) fn expire_unreachable(&mut self, now: Instant) -> Vec<Resolution> {
        let doomed: Vec<(WaiterId, Rejection, Duration)> = self
            .queue
            .iter_with_ids()
            .filter_map(|(id, w): (WaiterId, &Waiter)| {
                let (at, why) = self.not_before(w.learned, now)?;
                (at > w.deadline).then(|| (id, why, spread(at - now, id)))
            })
            .collect();
        doomed
            .into_iter()
            .filter_map(|(id, why, retry_after)| {
                let waiter = self.queue.remove(id)?;
                self.learned.waiting(waiter.learned, false);
                Some(Resolution::Expired {
                    id,
                    why,
                    retry_after,
                })
            })
            .collect()
    }
}

/// When a controller lets a request go at the earliest by what is firm: the end of a pause,
/// the next probe when one is due later and none is out. `None`: it may go now, or soon.
fn firm_wait(controller: &super::RetreatController, now: Instant) -> Option<Instant> {
    if let Some(resume) = controller.pause_until().filter(|p| *p > now) {
        // After a pause, a lane that probes sends its first probe no earlier.
        return Some(resume);
    }
    // A probe out may be answered any moment: nothing firm then.
    controller.probe_due_at().filter(|at| *at > now)
}

fn model_why(
    learned: Option<ModelRef>,
    lanes: &super::ModelLanes,
    key: usize,
    now: Instant,
) -> Rejection {
    let paused = learned
        .and_then(|m| lanes.lane(m, key))
        .is_some_and(|l| l.controller.is_paused(now));
    if paused {
        Rejection::ModelLocked
    } else {
        Rejection::QueueTimeout
    }
}

/// `wait`, spread by up to a tenth of it (at most `SPREAD_MAX`) by a hash of `id`.
fn spread(wait: Duration, id: WaiterId) -> Duration {
    // splitmix64: a well-mixed fraction of the id.
    let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let fraction = (z >> 11) as f64 / (1u64 << 53) as f64;
    wait + (wait / 10).min(SPREAD_MAX).mul_f64(fraction)
}
