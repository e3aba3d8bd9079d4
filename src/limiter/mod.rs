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

mod bucket;
mod clients;
mod lane;
mod models;
mod queue;
mod retreat;
mod signals;
mod slots;

pub use bucket::TokenBucket;
pub use clients::{ClientCap, ClientCaps};
pub use models::{model_index, ModelLimit, ModelSettings};
pub use queue::{AdmissionQueue, Priority, Waiter, WaiterId};
pub use retreat::{
    Admit, Grant, RetreatController, RetreatSettings, RetreatState, SharedControl,
    PROBE_ANSWER_TIMEOUT,
};
pub use signals::{
    parse_go_duration, retry_after_header, seconds, NonRateLimitReason, UpstreamSignal,
};
pub use slots::Slots;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lane::Lane;

/// An upstream key as the limiter knows it: a name and, optionally, a rate of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRate {
    pub name: Arc<str>,
    /// `None` follows the route's rate (`base_rpm`).
    pub rpm: Option<f64>,
}

/// Everything the limiter is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSettings {
    pub base_rpm: f64,
    pub capacity: u32,
    pub queue_max: usize,
    pub retreat: RetreatSettings,
    /// The key pool; empty means one key, named `default`, at `base_rpm`.
    pub keys: Vec<KeyRate>,
    /// Per-model limits, in the order they are matched.
    pub models: Vec<ModelSettings>,
    /// Per-client rate caps.
    pub client_caps: Vec<ClientCap>,
}

impl LimiterSettings {
    /// One key at `base_rpm`, no model or client limits.
    pub fn single(
        base_rpm: f64,
        capacity: u32,
        queue_max: usize,
        retreat: RetreatSettings,
    ) -> Self {
        LimiterSettings {
            base_rpm,
            capacity,
            queue_max,
            retreat,
            keys: Vec::new(),
            models: Vec::new(),
            client_caps: Vec::new(),
        }
    }

    fn key_rates(&self) -> Vec<KeyRate> {
        if self.keys.is_empty() {
            vec![KeyRate {
                name: Arc::from("default"),
                rpm: None,
            }]
        } else {
            self.keys.clone()
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The queue already holds `queue_max_size` waiters.
    QueueFull,
    /// The deadline passed before a token was free.
    QueueTimeout,
}

impl Rejection {
    /// The `code` of the OpenAI-style error body.
    pub fn code(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
        }
    }
}

/// The immediate answer to a request for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Granted,
    Queued(WaiterId),
    Rejected {
        why: Rejection,
        retry_after: Duration,
    },
}

/// What happened to a waiter while time passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Granted(WaiterId, Grant),
    Expired { id: WaiterId, retry_after: Duration },
}

/// One request for admission.
#[derive(Debug, Clone)]
pub struct Ask {
    pub client: Arc<str>,
    pub priority: Priority,
    pub deadline: Instant,
    /// The client's weight among the waiters of its class.
    pub weight: u32,
    /// The model limit the request falls under.
    pub model: Option<usize>,
}

impl Ask {
    pub fn new(client: Arc<str>, priority: Priority, deadline: Instant) -> Ask {
        Ask {
            client,
            priority,
            deadline,
            weight: 1,
            model: None,
        }
    }
}

/// A read-only picture of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySnapshot {
    pub name: Arc<str>,
    pub active: bool,
    pub tokens: f64,
    pub base_rpm: f64,
    pub effective_rpm: f64,
    pub state: RetreatState,
    pub probing: bool,
    pub paused_for: Option<Duration>,
}

/// A read-only picture of one model limit.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSnapshot {
    pub pattern: String,
    pub in_flight: u32,
    /// The concurrency allowed now (`None`: unlimited).
    pub concurrency_limit: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub rate_rpm: Option<f64>,
    pub capacity_errors: u64,
}

/// A read-only picture of the limiter for status pages and metrics. The rate fields are the
/// sums over the active keys; the controller's state is that of the key cut furthest.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSnapshot {
    pub tokens: f64,
    pub capacity: f64,
    pub base_rpm: f64,
    pub effective_rpm: f64,
    pub state: RetreatState,
    /// Probing a full window after a 429: one request at a time, no tokens issued.
    pub probing: bool,
    pub upstream_429_ratio: f64,
    /// Waiters by priority: high, normal, low.
    pub queue_depth: [usize; 3],
    pub queue_max: usize,
    pub paused_for: Option<Duration>,
    pub keys: Vec<KeySnapshot>,
    pub models: Vec<ModelSnapshot>,
}

/// What a limiter carries across a restart (its first key's state).
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterState {
    pub tokens: f64,
    pub effective_rpm: f64,
    pub state: RetreatState,
    /// Time left of an upstream-imposed pause when the state was taken.
    pub pause_remaining: Option<Duration>,
}

/// Where the tokens come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Supply {
    /// The local bucket refills at `share` of the effective rate: 1 for a sidecar of its own,
    /// a fraction for one that shares the quota but cannot reach the shared bucket.
    Refill { share: f64 },
    /// Only slots leased from the shared bucket are granted; the local bucket stays empty.
    Leased,
}

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
        let idle = self.queue.is_empty();
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

    pub fn supply(&self, lane: usize) -> Supply {
        self.lane(lane).supply
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
    pub fn slots_wanted(&self, lane: usize) -> usize {
        if !self.key_active(lane) {
            return 0;
        }
        let active = self.lanes.iter().filter(|l| l.active);
        let held: usize = active.clone().map(|l| l.slots.held()).sum();
        let keys = active.count().max(1);
        self.queue.len().saturating_sub(held).div_ceil(keys)
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
        self.advance(now);
        if self.queue.waiting_at_or_above(ask.priority) == 0
            && self.take_all(&ask.client, ask.model, now).is_some()
        {
            return Admission::Granted;
        }
        if self.queue.len() >= self.queue_max {
            return Admission::Rejected {
                why: Rejection::QueueFull,
                retry_after: self.estimated_wait(ask.priority, now),
            };
        }
        if ask.deadline <= now {
            return Admission::Rejected {
                why: Rejection::QueueTimeout,
                retry_after: self.estimated_wait(ask.priority, now),
            };
        }
        self.enqueue(ask, now, false)
    }

    /// Queues a request that already had a token and must be sent again (the upstream answered
    /// 429): ahead of its class, and never refused for a full queue, since it was admitted once.
    pub fn request_again(
        &mut self,
        client: Arc<str>,
        priority: Priority,
        deadline: Instant,
        now: Instant,
    ) -> Admission {
        self.request_again_with(Ask::new(client, priority, deadline), now)
    }

    /// `request_again`, with a weight and a model.
    pub fn request_again_with(&mut self, ask: Ask, now: Instant) -> Admission {
        self.advance(now);
        if ask.deadline <= now {
            return Admission::Rejected {
                why: Rejection::QueueTimeout,
                retry_after: self.estimated_wait(ask.priority, now),
            };
        }
        if self.queue.waiting_at_or_above(ask.priority) == 0
            && self.take_all(&ask.client, ask.model, now).is_some()
        {
            return Admission::Granted;
        }
        self.enqueue(ask, now, true)
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

    /// Takes a key out of the pool: the upstream refused the key itself. The last active key
    /// is kept, since with no key at all nothing could be sent; false when nothing changed.
    pub fn revoke(&mut self, lane: usize) -> bool {
        let active = self.lanes.iter().filter(|l| l.active).count();
        match self.lanes.get_mut(lane) {
            Some(l) if l.active && active > 1 => {
                l.active = false;
                true
            }
            _ => false,
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

    /// Sets the route's rate: the rate of every key without a rate of its own.
    pub fn set_base_rpm(&mut self, rpm: f64, now: Instant) {
        self.advance(now);
        for lane in self.lanes.iter_mut().filter(|l| l.own_rpm.is_none()) {
            lane.controller.set_base_rpm(rpm);
        }
    }

    pub fn set_capacity(&mut self, capacity: u32, now: Instant) {
        self.advance(now);
        for lane in &mut self.lanes {
            lane.bucket.set_capacity(capacity);
        }
    }

    pub fn set_queue_max(&mut self, queue_max: usize) {
        self.queue_max = queue_max;
    }

    pub fn set_retreat_settings(&mut self, settings: RetreatSettings, now: Instant) {
        self.advance(now);
        for lane in &mut self.lanes {
            lane.controller.set_settings(settings.clone());
        }
    }

    /// Takes over new key rates, model limits and client caps. Keys are matched by position
    /// (their names are fixed until a restart); a model keeps what it learned while its
    /// pattern stays at its place.
    pub fn set_limits(&mut self, settings: &LimiterSettings, now: Instant) {
        self.advance(now);
        for (lane, key) in self.lanes.iter_mut().zip(settings.key_rates()) {
            lane.own_rpm = key.rpm;
            if let Some(rpm) = key.rpm {
                lane.controller.set_base_rpm(rpm);
            }
        }
        let mut models: Vec<ModelLimit> = Vec::with_capacity(settings.models.len());
        for (i, m) in settings.models.iter().enumerate() {
            match self.models.get_mut(i) {
                Some(old) if old.settings.pattern == m.pattern => {
                    old.reconfigure(m.clone(), now);
                    models.push(std::mem::replace(old, ModelLimit::new(m.clone(), now)));
                }
                _ => models.push(ModelLimit::new(m.clone(), now)),
            }
        }
        self.models = models;
        self.clients.reconfigure(&settings.client_caps, now);
        self.stalled = false;
    }

    pub fn snapshot(&mut self, now: Instant) -> LimiterSnapshot {
        self.advance(now);
        let keys: Vec<KeySnapshot> = self
            .lanes
            .iter()
            .map(|l| KeySnapshot {
                name: l.name.clone(),
                active: l.active,
                tokens: (l.bucket.tokens() + l.slots.open(now) as f64).min(l.bucket.capacity()),
                base_rpm: l.controller.base_rpm(),
                effective_rpm: l.controller.effective_rpm(),
                state: l.controller.state(),
                probing: l.controller.is_probing(),
                paused_for: l.paused_for(now),
            })
            .collect();
        let active: Vec<&Lane> = self.lanes.iter().filter(|l| l.active).collect();
        let cut_furthest = active
            .iter()
            .copied()
            .min_by(|a, b| {
                let ratio = |l: &Lane| l.controller.effective_rpm() / l.controller.base_rpm();
                ratio(a).total_cmp(&ratio(b))
            })
            .unwrap_or(&self.lanes[0]);
        LimiterSnapshot {
            tokens: keys.iter().filter(|k| k.active).map(|k| k.tokens).sum(),
            capacity: active.iter().map(|l| l.bucket.capacity()).sum(),
            base_rpm: active.iter().map(|l| l.controller.base_rpm()).sum(),
            effective_rpm: active.iter().map(|l| l.controller.effective_rpm()).sum(),
            state: cut_furthest.controller.state(),
            probing: cut_furthest.controller.is_probing(),
            upstream_429_ratio: cut_furthest.controller.upstream_429_ratio(now),
            queue_depth: [
                self.queue.depth(Priority::High),
                self.queue.depth(Priority::Normal),
                self.queue.depth(Priority::Low),
            ],
            queue_max: self.queue_max,
            paused_for: cut_furthest.paused_for(now),
            keys,
            models: self
                .models
                .iter()
                .map(|m| ModelSnapshot {
                    pattern: m.settings.pattern.clone(),
                    in_flight: m.in_flight,
                    concurrency_limit: m.concurrency_limit(),
                    max_concurrency: m.settings.max_concurrency,
                    rate_rpm: m.settings.rate_rpm,
                    capacity_errors: m.capacity_errors,
                })
                .collect(),
        }
    }

    /// The state to save for a restart.
    pub fn export(&mut self, now: Instant) -> LimiterState {
        self.advance(now);
        let lane = self.lane(0);
        LimiterState {
            tokens: lane.bucket.tokens().min(lane.bucket.capacity()),
            effective_rpm: lane.controller.effective_rpm(),
            state: lane.controller.state(),
            pause_remaining: lane.paused_for(now),
        }
    }

    /// Takes over a saved state that is `age` old: the pause is shortened by the age, and the
    /// bucket earns what it would have earned meanwhile at the saved rate, never more than its
    /// capacity — so a restart neither forgets a retreat nor bursts into the upstream.
    pub fn restore(&mut self, saved: &LimiterState, age: Duration, now: Instant) {
        let lane = self.lane_mut(0);
        let pause_until = saved
            .pause_remaining
            .and_then(|p| p.checked_sub(age))
            .filter(|p| !p.is_zero())
            .map(|p| now + p);
        lane.controller
            .restore(saved.state, saved.effective_rpm, pause_until, now);
        let earning = age.saturating_sub(saved.pause_remaining.unwrap_or_default());
        let margin = 1.0 - lane.controller.settings().safety_margin;
        let earned = earning.as_secs_f64() * lane.controller.effective_rpm() * margin / 60.0;
        // Leased slots are the only tokens of a shared bucket; nothing saved locally counts.
        let tokens = if pause_until.is_some() || lane.supply == Supply::Leased {
            0.0
        } else {
            saved.tokens + earned
        };
        let capacity = lane.bucket.capacity() as u32;
        lane.bucket = TokenBucket::with_tokens(capacity, tokens, now);
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

    /// Whether any key takes tokens from its local bucket while the quota is shared.
    pub fn any_refilling(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| matches!(l.supply, Supply::Refill { .. }))
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
mod simulation;
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests;
