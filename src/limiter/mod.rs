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

mod blame;
mod bucket;
mod calibration;
mod clients;
mod deadline;
mod lane;
mod model_lanes;
mod models;
mod observe;
mod queue;
mod request;
mod reset;
mod resources;
mod retreat;
mod schedule;
mod settings;
mod shared;
mod signals;
mod slots;
mod snapshot;
mod stated;
mod token_learning;
mod token_window;

pub use bucket::TokenBucket;
pub use calibration::{Calibration, Priced, TokenAsk, Usage, DEFAULT_COMPLETION};
pub use clients::{ClientCap, ClientCaps};
pub use model_lanes::{LearnedModel, ModelLanes, ModelRef, RateLane, MAX_LEARNED_MODELS};
pub use models::{model_index, ModelLimit, ModelSettings};
pub use queue::{AdmissionQueue, Priority, Waiter, WaiterId};
pub use request::{Admission, Ask, Rejection, Resolution};
pub use reset::ResetError;
pub use retreat::{
    Admit, Ceiling, CeilingSource, Grant, Learned, ModelGrant, Phase, Refusal, RefusalReason,
    RetreatController, RetreatSettings, RetreatState, SharedControl, PROBE_ANSWER_TIMEOUT,
};
pub use settings::{KeyRate, LimiterSettings};
pub use shared::Supply;
pub use signals::{
    parse_go_duration, parse_rfc3339, retry_after_header, seconds, NonRateLimitReason, StatedLimit,
    StatedTokens, UpstreamSignal,
};
pub use slots::Slots;
pub use snapshot::{
    KeySnapshot, LearnedModelSnapshot, Learning, LimiterSnapshot, LimiterState, ModelLaneSnapshot,
    ModelSnapshot, SavedModelLane, TokenBudgetSnapshot,
};
pub use token_window::{HoldId, Holds, TokenCost, TokenHold, TokenWindow, TOKEN_WINDOW};

use std::sync::Arc;
use std::time::{Duration, Instant};

use lane::Lane;
use resources::{Backfill, Resources};
use token_learning::TokenLearning;

/// One shared quota: the keys' buckets and controllers, the model and client limits, and the
/// queue, together.
#[derive(Debug)]
pub struct Limiter {
    lanes: Vec<Lane>,
    models: Vec<ModelLimit>,
    /// What is learned per model id, on each key.
    learned: ModelLanes,
    retreat: RetreatSettings,
    clients: ClientCaps,
    queue: AdmissionQueue,
    queue_max: usize,
    next_id: WaiterId,
    /// How the last token was granted.
    last_grant: Grant,
    /// The last `poll` left a token unused because every waiter's model or client limit was
    /// spent: the next wake-up is when one of those frees, not when a token does.
    stalled: bool,
    /// A 429 came since the last `poll`: a pause or a probe may put waiters past their
    /// deadline (see `deadline`).
    check_deadlines: bool,
    /// `rate_rpm: auto` (see `stated`).
    auto: bool,
    /// What requests naming no learned model cost (see `calibration`).
    calibration: Calibration,
    /// The token reservations of granted requests, until their answers are counted.
    holds: Holds,
    /// The route's `tpm`: while it is set, a stated token limit only tells what is spent.
    base_tpm: Option<u64>,
}

impl Limiter {
    pub fn new(settings: LimiterSettings, now: Instant) -> Self {
        let lanes = settings
            .key_rates()
            .iter()
            .map(|k| Lane::new(k, &settings, now))
            .collect();
        let keys = settings.key_rates().len();
        Limiter {
            lanes,
            learned: ModelLanes::new(keys),
            retreat: settings.retreat.clone(),
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
            check_deadlines: false,
            auto: settings.auto,
            calibration: Calibration::default(),
            holds: Holds::default(),
            base_tpm: settings.base_tpm,
        }
    }

    /// Brings the buckets and the controllers up to `now`.
    fn advance(&mut self, now: Instant) {
        // Tokens are owed only to waiters that could use them: while every waiter is held by
        // its model or client limit, a bucket saves no more than its capacity, so that the
        // wait does not end in a burst.
        let idle = self.queue.is_empty() || self.stalled;
        let base_tpm = self.base_tpm;
        for lane in &mut self.lanes {
            lane.advance(now, idle);
            if lane.token_learning.advance(now).is_some() {
                // A learned budget climbed after a quiet window.
                lane.set_tpm(lane.budget_tpm(base_tpm), now);
            }
        }
        let lanes = &self.lanes;
        self.learned
            .advance(now, |key| lanes[key].controller.effective_rpm());
        for model in &mut self.models {
            model.advance(now);
        }
        self.clients.advance(now);
        self.holds.prune(now);
        self.settle_judgements(now);
    }

    /// What the waiters draw on, apart from the queue.
    fn resources(&self) -> Resources<'_> {
        Resources {
            lanes: &self.lanes,
            models: &self.models,
            learned: &self.learned,
            clients: &self.clients,
        }
    }

    fn ready_lane(
        &self,
        learned: Option<ModelRef>,
        cost: Option<TokenCost>,
        now: Instant,
    ) -> Option<usize> {
        self.resources().ready_lane(learned, cost, now)
    }

    /// Whether a token budget is configured anywhere: waiters may then be held by their cost.
    fn any_token_budget(&self) -> bool {
        self.lanes.iter().any(|l| l.tokens.is_some())
            || self.models.iter().any(|m| m.tokens.is_some())
            || !self.clients.is_empty()
    }

    /// Takes a key's token, the lane of the request's model on that key, the request's own
    /// limits, and its cost of every token budget that applies, all or nothing.
    fn take_all(
        &mut self,
        client: &str,
        model: Option<usize>,
        learned: Option<ModelRef>,
        priced: Option<Priced>,
        backfill: &Backfill,
        now: Instant,
    ) -> Option<Grant> {
        let cost = priced.map(|p| p.cost);
        let resources = self.resources();
        if !resources.limits_allow(client, model, learned, cost, now) {
            return None;
        }
        let key = match cost {
            Some(cost) => resources.backfill_lane(learned, cost, backfill, now)?,
            None => resources.ready_lane(learned, None, now)?,
        };
        if !self.lanes[key].take(key, now) {
            return None;
        }
        if let Some(cost) = cost {
            let lane = &mut self.lanes[key];
            lane.token_learning.granted(cost, now);
            if let Some(window) = lane.tokens.as_mut() {
                window.take(cost, now);
            }
        }
        let key_rpm = self.lanes[key].controller.effective_rpm();
        let model_grant = learned.and_then(|m| {
            let lane = self.learned.lane_mut(m, key, key_rpm, &self.retreat, now)?;
            let (epoch, probe) = lane.take(now);
            Some(ModelGrant {
                model: m,
                epoch,
                probe,
            })
        });
        if let Some(m) = learned.and_then(|m| self.learned.get_mut(m)) {
            m.concurrency.take(None, now);
            m.last_used = now;
        }
        if let Some(m) = model.and_then(|m| self.models.get_mut(m)) {
            m.take(cost, now);
        }
        let client_budget = self.clients.take(client, cost, now);
        let test = self.take_test(key, learned, now);
        let grant = Grant {
            model: model.filter(|m| *m < self.models.len()),
            learned: model_grant,
            test,
            tokens: priced.map(|p| {
                self.holds.add(TokenHold {
                    at: now,
                    cost: p.cost,
                    ask: p.ask,
                    client: client_budget,
                })
            }),
            ..self.lanes[key].last_grant
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
        let learned = ask
            .model_id
            .as_ref()
            .and_then(|id| self.learned.intern(id, now));
        self.hand_over_alone(learned, now);
        let priced = ask.tokens.map(|t| Priced {
            ask: t,
            cost: self.calibration_of(learned).cost(t),
        });
        let cost = priced.map(|p| p.cost);
        if let Some(limit) = self.resources().too_small_for(&ask.client, ask.model, cost) {
            let tokens = cost.map_or(0, |c| c.tokens);
            return Admission::Rejected {
                why: Rejection::TooLarge { tokens, limit },
                retry_after: Duration::ZERO,
            };
        }
        let expired = ask.deadline <= now;
        if !(again && expired)
            && self.queue.waiting_at_or_above(ask.priority) == 0
            && self
                .take_all(
                    &ask.client,
                    ask.model,
                    learned,
                    priced,
                    &Backfill::default(),
                    now,
                )
                .is_some()
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
        if let Some((why, retry_after)) = self.unreachable(&ask, learned, again, self.next_id, now)
        {
            // Its deadline would pass before it could be served: it is told now.
            self.next_id += 1;
            return Admission::Rejected { why, retry_after };
        }
        self.enqueue(ask, learned, priced, now, again)
    }

    fn enqueue(
        &mut self,
        ask: Ask,
        learned: Option<ModelRef>,
        priced: Option<Priced>,
        now: Instant,
        front: bool,
    ) -> Admission {
        let id = self.next_id;
        self.next_id += 1;
        let waiter = Waiter {
            client: ask.client,
            priority: ask.priority,
            deadline: ask.deadline,
            enqueued: now,
            weight: ask.weight.max(1),
            model: ask.model,
            learned,
            priced,
        };
        self.learned.waiting(learned, true);
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
        match self.queue.remove(id) {
            Some(waiter) => {
                self.learned.waiting(waiter.learned, false);
                true
            }
            None => false,
        }
    }

    /// Returns a token that was granted as `grant` but never used, with its model slot.
    pub fn refund(&mut self, grant: Grant, now: Instant) {
        self.advance(now);
        if let Some(m) = grant.model.and_then(|m| self.models.get_mut(m)) {
            m.refund();
        }
        if let Some(mg) = grant.learned {
            if let Some(m) = self.learned.get_mut(mg.model) {
                m.concurrency.release();
                if let Some(Some(lane)) = m.lanes.get_mut(grant.lane) {
                    if mg.probe && mg.epoch == lane.controller.epoch() {
                        lane.controller.probe_returned();
                    } else if !mg.probe && lane.limiting(now) {
                        lane.bucket.refund();
                    }
                }
            }
        }
        self.test_returned(grant);
        if let Some(lane) = self.lanes.get_mut(grant.lane) {
            lane.refund(grant);
        }
        if let Some(hold) = grant.tokens.and_then(|id| self.holds.take(id)) {
            self.for_each_budget(grant, |window| window.refund(hold));
            self.clients.refund_tokens(hold);
            if let Some(lane) = self.lanes.get_mut(grant.lane) {
                lane.token_learning.refund(hold);
            }
        }
    }

    /// The upstream counted `actual` tokens for the request granted as `grant`: its
    /// reservation on every token budget it took from becomes that, so that what it did not
    /// use goes back (or what it used beyond the estimate is charged).
    /// What was counted also teaches what the request's model costs (see `calibration`).
    pub fn settle_tokens(&mut self, grant: Grant, usage: Usage, now: Instant) {
        self.advance(now);
        let Some(hold) = grant.tokens.and_then(|id| self.holds.take(id)) else {
            return;
        };
        let actual = usage.total();
        self.for_each_budget(grant, |window| window.settle(hold, actual));
        self.clients.settle(hold, actual);
        if let (Some(lane), Some(id)) = (self.lanes.get_mut(grant.lane), grant.tokens) {
            lane.token_learning.settle(id, hold, actual);
        }
        self.calibration_mut(grant.learned.map(|m| m.model))
            .learn(hold.ask, usage);
        // Tokens given back may let a waiter go.
        self.stalled = false;
    }

    /// The token reservation `grant` holds, until its answer is counted.
    pub fn token_hold(&self, grant: Grant) -> Option<TokenHold> {
        self.holds.get(grant.tokens?)
    }

    /// What is learned of the costs of `learned`'s requests.
    pub fn calibration_of(&self, learned: Option<ModelRef>) -> &Calibration {
        learned
            .and_then(|m| self.learned.get(m))
            .map_or(&self.calibration, |m| &m.calibration)
    }

    fn calibration_mut(&mut self, learned: Option<ModelRef>) -> &mut Calibration {
        match learned.and_then(|m| self.learned.get_mut(m)) {
            Some(m) => &mut m.calibration,
            None => &mut self.calibration,
        }
    }

    /// The key's and the model's token budgets `grant` took from.
    fn for_each_budget(&mut self, grant: Grant, mut apply: impl FnMut(&mut TokenWindow)) {
        if let Some(window) = self
            .lanes
            .get_mut(grant.lane)
            .and_then(|l| l.tokens.as_mut())
        {
            apply(window);
        }
        if let Some(window) = grant
            .model
            .and_then(|m| self.models.get_mut(m))
            .and_then(|m| m.tokens.as_mut())
        {
            apply(window);
        }
    }

    /// The request granted as `grant` is over: its model slot is free again. True when a
    /// waiter held by that slot may go now.
    pub fn release(&mut self, grant: Grant) -> bool {
        let mut freed = false;
        if let Some(m) = grant.model.and_then(|m| self.models.get_mut(m)) {
            m.release();
            freed = true;
        }
        if let Some(m) = grant.learned.and_then(|mg| self.learned.get_mut(mg.model)) {
            m.concurrency.release();
            // An unlimited concurrency held nobody back.
            freed |= m.concurrency.concurrency_limit().is_some();
        }
        if freed {
            self.stalled = false;
        }
        freed && !self.queue.is_empty()
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
        !self.queue.is_empty() || self.ready_lane(None, None, now).is_none()
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
mod matrix;
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod model_tests;
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
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod token_tests;
