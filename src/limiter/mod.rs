//! The quota itself: a token bucket, the queue of requests waiting for it, and the adaptive
//! controller that sets its rate. Pure logic: nothing here reads the clock, spawns a task or
//! knows about HTTP; every call is given `now`, so it is tested exactly and without sleeping.

mod bucket;
mod queue;
mod retreat;
mod signals;
mod slots;

pub use bucket::TokenBucket;
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

/// Everything the limiter is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSettings {
    pub base_rpm: f64,
    pub capacity: u32,
    pub queue_max: usize,
    pub retreat: RetreatSettings,
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
    Granted(WaiterId),
    Expired { id: WaiterId, retry_after: Duration },
}

/// A read-only picture of the limiter for status pages and metrics.
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
}

/// What a limiter carries across a restart.
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

/// One shared quota: bucket, queue and controller together.
#[derive(Debug)]
pub struct Limiter {
    bucket: TokenBucket,
    slots: Slots,
    supply: Supply,
    queue: AdmissionQueue,
    controller: RetreatController,
    queue_max: usize,
    next_id: WaiterId,
    /// How the last token was granted (every grant of one `poll` is granted alike).
    last_grant: Grant,
}

impl Limiter {
    pub fn new(settings: LimiterSettings, now: Instant) -> Self {
        Limiter {
            bucket: TokenBucket::new(settings.capacity, now),
            slots: Slots::default(),
            supply: Supply::Refill { share: 1.0 },
            queue: AdmissionQueue::new(),
            controller: RetreatController::new(settings.base_rpm, settings.retreat, now),
            queue_max: settings.queue_max,
            next_id: 0,
            last_grant: Grant::default(),
        }
    }

    /// Brings the bucket and the controller up to `now`.
    fn advance(&mut self, now: Instant) {
        let rate = self.refill_rate(now);
        if rate == 0.0 {
            self.bucket.hold(now);
        } else {
            self.bucket.refill(now, rate, self.queue.is_empty());
        }
        self.slots.prune(now);
        self.controller.tick(now);
    }

    /// Tokens per second the local bucket earns now.
    fn refill_rate(&self, now: Instant) -> f64 {
        match self.supply {
            Supply::Refill { share } => self.controller.admission_rate_per_sec(now) * share,
            Supply::Leased => 0.0,
        }
    }

    /// Takes a token: an open leased slot first, else one from the local bucket. While the
    /// controller probes, only a probe may go: without a token of the local bucket, but with a
    /// leased slot when the quota is shared.
    fn take(&mut self, now: Instant) -> bool {
        let taken = match self.controller.admit(now) {
            Admit::Open => self.slots.try_take(now) || self.bucket.try_take(),
            Admit::Probe => match self.supply {
                Supply::Leased => self.slots.try_take(now),
                Supply::Refill { .. } => true,
            },
            Admit::Closed => false,
        };
        if taken {
            self.last_grant = self.controller.grant();
            if self.last_grant.probe {
                self.controller.probe_sent(now);
            }
        }
        taken
    }

    /// How the last token was granted.
    pub fn last_grant(&self) -> Grant {
        self.last_grant
    }

    /// Switches between the local bucket and leased slots. Slots already held stay valid; a
    /// local bucket starts empty and earns nothing before `refill_from` nor before the last
    /// slot held, so the switch never adds a burst to what was leased. With leased slots the
    /// controller sees only this instance's share of the traffic, so it stops learning its
    /// ceiling from the rate it saw accepted.
    pub fn set_supply(&mut self, supply: Supply, now: Instant, refill_from: Instant) {
        self.advance(now);
        if supply == Supply::Leased {
            self.controller.set_partial_view(true);
        }
        if supply == self.supply {
            return;
        }
        self.supply = supply;
        let start = self
            .slots
            .last_start()
            .map_or(refill_from, |last| last.max(refill_from))
            .max(now);
        self.bucket = TokenBucket::with_tokens(self.capacity(), 0.0, start);
    }

    pub fn supply(&self) -> Supply {
        self.supply
    }

    /// Takes slots leased from the shared bucket; each stays open for `grace`.
    pub fn add_slots(&mut self, starts: &[Instant], grace: Duration, now: Instant) {
        self.advance(now);
        if self.controller.is_paused(now) {
            return;
        }
        for at in starts {
            self.slots.add(*at, grace);
        }
    }

    /// How many more slots the waiters need than are held.
    pub fn slots_wanted(&self) -> usize {
        self.queue.len().saturating_sub(self.slots.held())
    }

    /// The share of the rate one of `instances` sidecars takes while the shared bucket is out
    /// of reach. Each local bucket may put up to its capacity more requests into a window
    /// than its rate says (the tokens it holds at the window's start); the shares leave room
    /// for those of the other `instances - 1` in the controller's window, so the sidecars
    /// together stay within the quota as one sidecar alone would. `None` (the number is
    /// unknown): the floor fraction.
    pub fn fallback_share(&self, instances: Option<u32>) -> f64 {
        let s = self.controller.settings();
        let Some(n) = instances.filter(|n| *n > 0).map(f64::from) else {
            return s.floor_fraction;
        };
        let per_window =
            self.controller.effective_rpm() * (1.0 - s.safety_margin) * s.window.as_secs_f64()
                / 60.0;
        let burst = self.bucket.capacity();
        let room = if per_window > 0.0 {
            (1.0 - (n - 1.0) * burst / per_window).max(0.0)
        } else {
            0.0
        };
        (room / n).max(s.floor_fraction / n)
    }

    pub fn slots_held(&self) -> usize {
        self.slots.held()
    }

    /// The controller state to share with other instances.
    pub fn shared_control(&mut self, now: Instant) -> SharedControl {
        self.advance(now);
        self.controller.shared(now)
    }

    /// Takes over the controller state the instances agreed on; a pause drops every token.
    pub fn adopt_shared(&mut self, shared: &SharedControl, now: Instant) {
        self.advance(now);
        self.controller.adopt(shared, now);
        if self.controller.is_paused(now) {
            self.bucket.drain();
            self.slots.clear();
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
        self.advance(now);
        if self.queue.waiting_at_or_above(priority) == 0 && self.take(now) {
            return Admission::Granted;
        }
        if self.queue.len() >= self.queue_max {
            return Admission::Rejected {
                why: Rejection::QueueFull,
                retry_after: self.estimated_wait(priority, now),
            };
        }
        if deadline <= now {
            return Admission::Rejected {
                why: Rejection::QueueTimeout,
                retry_after: self.estimated_wait(priority, now),
            };
        }
        self.enqueue(client, priority, deadline, now, false)
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
        self.advance(now);
        if deadline <= now {
            return Admission::Rejected {
                why: Rejection::QueueTimeout,
                retry_after: self.estimated_wait(priority, now),
            };
        }
        if self.queue.waiting_at_or_above(priority) == 0 && self.take(now) {
            return Admission::Granted;
        }
        self.enqueue(client, priority, deadline, now, true)
    }

    fn enqueue(
        &mut self,
        client: Arc<str>,
        priority: Priority,
        deadline: Instant,
        now: Instant,
        front: bool,
    ) -> Admission {
        let id = self.next_id;
        self.next_id += 1;
        let waiter = Waiter {
            client,
            priority,
            deadline,
            enqueued: now,
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

    /// Returns a token that was granted as `grant` but never used.
    pub fn refund(&mut self, grant: Grant, now: Instant) {
        self.advance(now);
        if grant.probe {
            if grant == self.controller.grant() {
                self.controller.probe_returned();
            }
            return;
        }
        // A leased slot is not handed back: by now it may be late enough to crowd the next
        // one. It lapses, and the shared quota is under-used by one request.
        if let Supply::Refill { .. } = self.supply {
            self.bucket.refund();
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
        while !self.queue.is_empty() && self.take(now) {
            let (id, _) = self.queue.pop_next().expect("queue is not empty");
            resolved.push(Resolution::Granted(id));
        }
        if self.queue.is_empty() {
            // Nobody is owed the surplus any more.
            self.bucket.refill(now, 0.0, true);
        }
        resolved
    }

    /// When `poll` next has something to do; `None` while nobody waits.
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let deadline = self.queue.next_deadline()?;
        let token = match self.controller.pause_until().filter(|p| *p > now) {
            Some(resume) => Some(resume),
            None if self.controller.is_probing() => self.controller.next_probe_event(),
            None => {
                let refill = self.bucket.next_token_at(self.refill_rate(now), now);
                let slot = self.slots.next_open(now);
                match (refill, slot) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        };
        Some(token.map_or(deadline, |t| t.min(deadline)))
    }

    /// Feeds an upstream answer to the controller, as the answer to a grant of now.
    pub fn observe(&mut self, signal: &UpstreamSignal, now: Instant) {
        let grant = self.controller.unprobed_grant();
        self.observe_answer(signal, grant, now);
    }

    /// Feeds the upstream's answer to the request granted as `grant`. A pause empties the
    /// bucket; so does the start of probing, so that no token saved before the cut is spent
    /// into a full window when probing ends.
    pub fn observe_answer(&mut self, signal: &UpstreamSignal, grant: Grant, now: Instant) {
        self.advance(now);
        let probing_before = self.controller.is_probing();
        self.controller.observe_answer(signal, grant, now);
        if self.controller.is_paused(now) {
            self.bucket.drain();
            self.slots.clear();
        } else if self.controller.is_probing() && !probing_before {
            self.bucket.drain();
        }
    }

    /// An honest guess at how long a request of `priority` would wait now: the waiters ahead
    /// of it, less the tokens in hand, at the current rate, plus any pause.
    pub fn estimated_wait(&self, priority: Priority, now: Instant) -> Duration {
        let ahead = self.queue.waiting_at_or_above(priority) as f64 + 1.0;
        let missing = (ahead - self.bucket.tokens() - self.slots.held() as f64).max(0.0);
        let paused = self
            .controller
            .pause_until()
            .map_or(Duration::ZERO, |p| p.saturating_duration_since(now));
        let share = match self.supply {
            Supply::Refill { share } => share,
            Supply::Leased => 1.0,
        };
        let rate = self.controller.effective_rpm()
            * (1.0 - self.controller.settings().safety_margin)
            * share
            / 60.0;
        let refill = if rate > 0.0 {
            Duration::from_secs_f64((missing / rate).min(86_400.0))
        } else {
            Duration::from_secs(86_400)
        };
        paused + refill
    }

    pub fn set_base_rpm(&mut self, rpm: f64, now: Instant) {
        self.advance(now);
        self.controller.set_base_rpm(rpm);
    }

    pub fn set_capacity(&mut self, capacity: u32, now: Instant) {
        self.advance(now);
        self.bucket.set_capacity(capacity);
    }

    pub fn set_queue_max(&mut self, queue_max: usize) {
        self.queue_max = queue_max;
    }

    pub fn set_retreat_settings(&mut self, settings: RetreatSettings, now: Instant) {
        self.advance(now);
        self.controller.set_settings(settings);
    }

    pub fn snapshot(&mut self, now: Instant) -> LimiterSnapshot {
        self.advance(now);
        LimiterSnapshot {
            tokens: (self.bucket.tokens() + self.slots.open(now) as f64)
                .min(self.bucket.capacity()),
            capacity: self.bucket.capacity(),
            base_rpm: self.controller.base_rpm(),
            effective_rpm: self.controller.effective_rpm(),
            state: self.controller.state(),
            probing: self.controller.is_probing(),
            upstream_429_ratio: self.controller.upstream_429_ratio(now),
            queue_depth: [
                self.queue.depth(Priority::High),
                self.queue.depth(Priority::Normal),
                self.queue.depth(Priority::Low),
            ],
            queue_max: self.queue_max,
            paused_for: self
                .controller
                .pause_until()
                .map(|p| p.saturating_duration_since(now))
                .filter(|d| !d.is_zero()),
        }
    }

    /// The state to save for a restart.
    pub fn export(&mut self, now: Instant) -> LimiterState {
        self.advance(now);
        LimiterState {
            tokens: self.bucket.tokens().min(self.bucket.capacity()),
            effective_rpm: self.controller.effective_rpm(),
            state: self.controller.state(),
            pause_remaining: self
                .controller
                .pause_until()
                .map(|p| p.saturating_duration_since(now))
                .filter(|d| !d.is_zero()),
        }
    }

    /// Takes over a saved state that is `age` old: the pause is shortened by the age, and the
    /// bucket earns what it would have earned meanwhile at the saved rate, never more than its
    /// capacity — so a restart neither forgets a retreat nor bursts into the upstream.
    pub fn restore(&mut self, saved: &LimiterState, age: Duration, now: Instant) {
        let pause_until = saved
            .pause_remaining
            .and_then(|p| p.checked_sub(age))
            .filter(|p| !p.is_zero())
            .map(|p| now + p);
        self.controller
            .restore(saved.state, saved.effective_rpm, pause_until, now);
        let earning = age.saturating_sub(saved.pause_remaining.unwrap_or_default());
        let margin = 1.0 - self.controller.settings().safety_margin;
        let earned = earning.as_secs_f64() * self.controller.effective_rpm() * margin / 60.0;
        // Leased slots are the only tokens of a shared bucket; nothing saved locally counts.
        let tokens = if pause_until.is_some() || self.supply == Supply::Leased {
            0.0
        } else {
            saved.tokens + earned
        };
        self.bucket = TokenBucket::with_tokens(self.capacity(), tokens, now);
    }

    pub fn is_waiting(&self, id: WaiterId) -> bool {
        self.queue.contains(id)
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn tokens(&self) -> f64 {
        self.bucket.tokens()
    }

    pub fn capacity(&self) -> u32 {
        self.bucket.capacity() as u32
    }

    pub fn controller(&self) -> &RetreatController {
        &self.controller
    }
}

#[cfg(test)]
mod simulation;
#[cfg(test)]
mod tests;
