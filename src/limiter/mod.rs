//! The quota itself: the token buckets, the queue of requests waiting for them, and the
//! adaptive controllers that set their rates. Pure logic: nothing here reads the clock, spawns
//! a task or knows about HTTP; every call is given `now`, so it is tested exactly and without
//! sleeping.
//!
//! **Several resources, one queue.** A request needs a token of one of the upstream keys
//! (`lane`: each key has its own bucket and controller, since the upstream counts per key),
//! and, when configured, a slot and a token of its model's limit (`models`) and a token of its
//! client's cap (`clients`). It waits for all of them in the one queue, in the one fairness
//! order, and takes them all at once or none: nothing is held while waiting, so no two
//! requests can each hold what the other waits for (no deadlock). A waiter whose model or
//! client limit is spent is passed over and keeps its place, so a full model never holds up
//! another model's requests; it is served first once its limit frees, because the order only
//! moves on by serving. Keys are never passed over for a waiter: any key serves any request.

// The limiter is handed `now`: reading the clock here fails the lint (see clippy.toml).
#![deny(clippy::disallowed_methods)]

mod bucket;
mod clients;
mod lane;
mod model_lanes;
mod models;
mod queue;
mod request;
mod retreat;
mod settings;
mod shared;
mod signals;
mod slots;
mod snapshot;

pub use bucket::TokenBucket;
pub use clients::{ClientCap, ClientCaps};
pub use model_lanes::ModelRef;
pub use models::{model_index, ModelLimit, ModelSettings};
pub use queue::{AdmissionQueue, Priority, Waiter, WaiterId};
pub use request::{Admission, Ask, Rejection, Resolution};
pub use retreat::{
    Admit, Ceiling, CeilingSource, Grant, Learned, ModelGrant, Phase, Refusal, RefusalReason,
    RetreatController, RetreatSettings, RetreatState, SharedControl, PROBE_ANSWER_TIMEOUT,
};
pub use settings::{KeyRate, LimiterSettings};
pub use shared::Supply;
pub use signals::{
    parse_go_duration, retry_after_header, seconds, NonRateLimitReason, UpstreamSignal,
};
pub use slots::Slots;
pub use snapshot::{KeySnapshot, LimiterSnapshot, LimiterState, ModelSnapshot};

use std::sync::Arc;
use std::time::{Duration, Instant};

use lane::Lane;

/// One shared quota: the keys' buckets and controllers, the model and client limits, and the
/// queue, together.
#[derive(Debug)]
pub struct Limiter {
    lanes: Vec<Lane>,
    models: Vec<ModelLimit>,
    clients: ClientCaps,
    queue: AdmissionQueue,
    queue_max: usize,
    next_id: WaiterId,
    /// How the last token was granted.
    last_grant: Grant,
    /// The last `poll` left a token unused because every waiter's model or client limit was
    /// spent: the next wake-up is when one of those frees, not when a token does.
    stalled: bool,
}

impl Limiter {
    pub fn new(settings: LimiterSettings, now: Instant) -> Self {
        let lanes = settings
            .key_rates()
            .into_iter()
            .map(|k| {
                Lane::new(
                    k.name,
                    k.rpm,
                    settings.base_rpm,
                    settings.capacity,
                    settings.retreat.clone(),
                    now,
                )
            })
            .collect();
        Limiter {
            lanes,
            models: settings
                .models
                .iter()
                .map(|m| ModelLimit::new(m.clone(), now))
                .collect(),
            clients: ClientCaps::new(&settings.client_caps, now),
            queue: AdmissionQueue::new(),
            queue_max: settings.queue_max,
            next_id: 0,
            last_grant: Grant::default(),
            stalled: false,
        }
    }

    /// Brings the buckets and the controllers up to `now`.
    fn advance(&mut self, now: Instant) {
        // Tokens are owed only to waiters that could use them: while every waiter is held by
        // its model or client limit, a bucket saves no more than its capacity, so that the
        // wait does not end in a burst.
        let idle = self.queue.is_empty() || self.stalled;
        for lane in &mut self.lanes {
            lane.advance(now, idle);
        }
        for model in &mut self.models {
            model.advance(now);
        }
        self.clients.advance(now);
    }

    /// Whether the waiter's own limits (model, client) let it go now.
    fn limits_allow(&self, client: &str, model: Option<usize>) -> bool {
        model
            .and_then(|m| self.models.get(m))
            .is_none_or(ModelLimit::ready)
            && self.clients.ready(client)
    }

    /// The key that can serve a request soonest: one with a token (or a slot) in hand, the
    /// fullest first; a probing key only when none has a token.
    fn ready_lane(&self, now: Instant) -> Option<usize> {
        let mut best: Option<(usize, bool, f64)> = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            let Some(regular) = lane.ready(now) else {
                continue;
            };
            let tokens = lane.bucket.tokens() + lane.slots.open(now) as f64;
            let better = match best {
                None => true,
                Some((_, best_regular, best_tokens)) => {
                    (regular, tokens) > (best_regular, best_tokens)
                }
            };
            if better {
                best = Some((i, regular, tokens));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// Takes a key's token and the request's own limits, all or nothing.
    fn take_all(&mut self, client: &str, model: Option<usize>, now: Instant) -> Option<Grant> {
        if !self.limits_allow(client, model) {
            return None;
        }
        let lane = self.ready_lane(now)?;
        if !self.lanes[lane].take(lane, now) {
            return None;
        }
        if let Some(m) = model.and_then(|m| self.models.get_mut(m)) {
            m.take();
        }
        self.clients.take(client);
        let grant = Grant {
            model: model.filter(|m| *m < self.models.len()),
            ..self.lanes[lane].last_grant
        };
        self.last_grant = grant;
        Some(grant)
    }

    /// How the last token was granted.
    pub fn last_grant(&self) -> Grant {
        self.last_grant
    }

    fn lane(&self, index: usize) -> &Lane {
        &self.lanes[index.min(self.lanes.len() - 1)]
    }

    fn lane_mut(&mut self, index: usize) -> &mut Lane {
        let last = self.lanes.len() - 1;
        &mut self.lanes[index.min(last)]
    }

    /// Asks for a token: granted at once when one is free and nobody of equal or higher
    /// priority waits, otherwise queued until `deadline`, or rejected when the queue is full.
    pub fn request(
        &mut self,
        client: Arc<str>,
        priority: Priority,
        deadline: Instant,
        now: Instant,
    ) -> Admission {
        self.request_with(Ask::new(client, priority, deadline), now)
    }

    /// `request`, with a weight and a model.
    pub fn request_with(&mut self, ask: Ask, now: Instant) -> Admission {
        self.admit(ask, now, false)
    }

    /// Queues a request that already had a token and must be sent again (the upstream answered
    /// 429): ahead of its class, and never refused for a full queue, since it was admitted once.
    pub fn request_again_with(&mut self, ask: Ask, now: Instant) -> Admission {
        self.admit(ask, now, true)
    }

    /// Grants at once when nobody of equal or higher priority waits and every resource is
    /// free; else rejects (a full queue, unless `again`; a passed deadline) or queues (ahead
    /// of its class when `again`). A request sent `again` past its deadline is not granted.
    fn admit(&mut self, ask: Ask, now: Instant, again: bool) -> Admission {
        self.advance(now);
        let expired = ask.deadline <= now;
        if !(again && expired)
            && self.queue.waiting_at_or_above(ask.priority) == 0
            && self.take_all(&ask.client, ask.model, now).is_some()
        {
            return Admission::Granted;
        }
        let why = if !again && self.queue.len() >= self.queue_max {
            Some(Rejection::QueueFull)
        } else if expired {
            Some(Rejection::QueueTimeout)
        } else {
            None
        };
        if let Some(why) = why {
            return Admission::Rejected {
                why,
                retry_after: self.estimated_wait(ask.priority, now),
            };
        }
        self.enqueue(ask, now, again)
    }

    fn enqueue(&mut self, ask: Ask, now: Instant, front: bool) -> Admission {
        let id = self.next_id;
        self.next_id += 1;
        let waiter = Waiter {
            client: ask.client,
            priority: ask.priority,
            deadline: ask.deadline,
            enqueued: now,
            weight: ask.weight.max(1),
            model: ask.model,
        };
        if front {
            self.queue.push_front(id, waiter);
        } else {
            self.queue.push_back(id, waiter);
        }
        Admission::Queued(id)
    }

    /// Takes a waiter out of the queue (its client went away). Returns false if it was no
    /// longer waiting (already granted or expired); nothing is consumed either way.
    pub fn cancel(&mut self, id: WaiterId, now: Instant) -> bool {
        self.advance(now);
        self.queue.remove(id).is_some()
    }

    /// Returns a token that was granted as `grant` but never used, with its model slot.
    pub fn refund(&mut self, grant: Grant, now: Instant) {
        self.advance(now);
        if let Some(m) = grant.model.and_then(|m| self.models.get_mut(m)) {
            m.refund();
        }
        if let Some(lane) = self.lanes.get_mut(grant.lane) {
            lane.refund(grant);
        }
    }

    /// The request granted as `grant` is over: its model slot is free again.
    pub fn release(&mut self, grant: Grant) {
        if let Some(m) = grant.model.and_then(|m| self.models.get_mut(m)) {
            m.release();
            self.stalled = false;
        }
    }

    /// Expires waiters whose deadline passed and grants tokens to the next waiters in line.
    pub fn poll(&mut self, now: Instant) -> Vec<Resolution> {
        self.advance(now);
        let mut resolved: Vec<Resolution> = Vec::new();
        for (id, waiter) in self.queue.expire(now) {
            let retry_after = self.estimated_wait(waiter.priority, now);
            resolved.push(Resolution::Expired { id, retry_after });
        }
        self.stalled = false;
        while !self.queue.is_empty() && self.ready_lane(now).is_some() {
            let next = if self.models.is_empty() && self.clients.is_empty() {
                self.queue.pop_next()
            } else {
                let (models, clients) = (&self.models, &self.clients);
                self.queue.pop_next_ready(|w| {
                    w.model
                        .and_then(|m| models.get(m))
                        .is_none_or(ModelLimit::ready)
                        && clients.ready(&w.client)
                })
            };
            let Some((id, waiter)) = next else {
                self.stalled = true;
                break;
            };
            let grant = self
                .take_all(&waiter.client, waiter.model, now)
                .expect("a ready key and a waiter whose limits allow it");
            resolved.push(Resolution::Granted(id, grant));
        }
        if self.queue.is_empty() {
            // Nobody is owed the surplus any more.
            for lane in &mut self.lanes {
                lane.bucket.refill(now, 0.0, true);
            }
        }
        resolved
    }

    /// When `poll` next has something to do; `None` while nobody waits.
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let deadline = self.queue.next_deadline()?;
        let next = if self.stalled {
            // Tokens wait for a model or client limit: a slot freed wakes the clock itself
            // (`release`); a rate wakes it here.
            self.queue
                .iter()
                .filter_map(|w| {
                    let model = w
                        .model
                        .and_then(|m| self.models.get(m))
                        .and_then(|m| m.next_token_at(now));
                    let client = self.clients.next_token_at(&w.client, now);
                    match (model, client) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    }
                })
                .filter(|t| *t > now)
                .min()
        } else {
            self.lanes.iter().filter_map(|l| l.next_token_at(now)).min()
        };
        Some(next.map_or(deadline, |t| t.min(deadline)))
    }

    /// Feeds an upstream answer to the first key's controller, as the answer to a grant of
    /// now.
    pub fn observe(&mut self, signal: &UpstreamSignal, now: Instant) {
        let grant = self.lane(0).controller.unprobed_grant();
        self.observe_answer(signal, grant, now);
    }

    /// Feeds the upstream's answer to the request granted as `grant` to its key's controller.
    /// A pause empties the key's bucket; so does the start of probing, so that no token saved
    /// before the cut is spent into a full window when probing ends.
    pub fn observe_answer(&mut self, signal: &UpstreamSignal, grant: Grant, now: Instant) {
        self.advance(now);
        let lane = self.lane_mut(grant.lane);
        if matches!(signal, UpstreamSignal::Accepted { .. }) {
            lane.forbidden_in_a_row = 0;
        }
        let probing_before = lane.controller.is_probing();
        lane.controller.observe_answer(signal, grant, now);
        if lane.controller.is_paused(now) {
            lane.bucket.drain();
            lane.slots.clear();
        } else if lane.controller.is_probing() && !probing_before {
            lane.bucket.drain();
        }
    }

    /// The upstream answered a request of `model`: `capacity` when it said the model's
    /// workers are full (which says nothing about the key's rate).
    pub fn observe_model(&mut self, model: usize, capacity: bool, now: Instant) {
        if let Some(m) = self.models.get_mut(model) {
            if capacity {
                m.capacity_error(now);
            } else {
                m.answered();
            }
        }
    }

    /// An honest guess at how long a request of `priority` would wait now: the waiters ahead
    /// of it, less the tokens in hand, at the current rate of the keys, plus any pause.
    pub fn estimated_wait(&self, priority: Priority, now: Instant) -> Duration {
        let ahead = self.queue.waiting_at_or_above(priority) as f64 + 1.0;
        let active = || self.lanes.iter().filter(|l| l.active);
        let in_hand: f64 = active()
            .filter(|l| l.paused_for(now).is_none())
            .map(|l| l.bucket.tokens() + l.slots.held() as f64)
            .sum();
        let missing = (ahead - in_hand).max(0.0);
        let rate: f64 = active()
            .filter(|l| l.paused_for(now).is_none())
            .map(Lane::estimated_rate)
            .sum();
        if rate > 0.0 {
            return Duration::from_secs_f64((missing / rate).min(86_400.0));
        }
        // Every key is paused: the first to resume, then its rate.
        let resume = active()
            .filter_map(|l| l.paused_for(now).map(|p| (p, l.estimated_rate())))
            .min_by_key(|(p, _)| *p);
        match resume {
            Some((paused, rate)) if rate > 0.0 => {
                paused + Duration::from_secs_f64((missing / rate).min(86_400.0))
            }
            _ => Duration::from_secs(86_400),
        }
    }

    pub fn is_waiting(&self, id: WaiterId) -> bool {
        self.queue.contains(id)
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Tokens in hand over the active keys.
    pub fn tokens(&self) -> f64 {
        self.lanes
            .iter()
            .filter(|l| l.active)
            .map(|l| l.bucket.tokens())
            .sum()
    }

    pub fn capacity(&self) -> u32 {
        self.lane(0).bucket.capacity() as u32
    }

    /// The first key's controller.
    pub fn controller(&self) -> &RetreatController {
        &self.lane(0).controller
    }

    /// The controller of the key a grant was taken from.
    pub fn controller_of(&self, lane: usize) -> &RetreatController {
        &self.lane(lane).controller
    }

    /// Whether the key of lane `lane` is still in the pool.
    /// The first key still in the pool (the last one is never taken out).
    pub fn first_active_lane(&self) -> usize {
        self.lanes.iter().position(|l| l.active).unwrap_or(0)
    }

    /// The stamp of a request sent without a token (passthrough, fail-open): the first active
    /// key's, which it goes out on, and never a probe.
    pub fn untokened_grant(&self) -> Grant {
        let lane = self.first_active_lane();
        Grant {
            lane,
            ..self.controller_of(lane).unprobed_grant()
        }
    }

    /// Whether a request arriving at `now` would wait: someone waits already, or no key has a
    /// token, an open slot or a due probe for it.
    pub fn would_queue(&mut self, now: Instant) -> bool {
        self.advance(now);
        !self.queue.is_empty() || self.ready_lane(now).is_none()
    }

    pub fn key_active(&self, lane: usize) -> bool {
        self.lanes.get(lane).is_some_and(|l| l.active)
    }

    /// How many keys the pool has.
    pub fn key_count(&self) -> usize {
        self.lanes.len()
    }
}

// Tests pick their own instants.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod pool_tests;
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod proptests;
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod shared_tests;
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod simulation;
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests;
