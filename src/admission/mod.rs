//! The async side of the limiter: requests wait here for their token, and one clock task per
//! bucket hands tokens out on time.
//!
//! `Limiter` (pure logic) sits behind a mutex held only for microseconds. A waiting request
//! holds a `Ticket`; dropping a ticket before its verdict (the client went away) takes the
//! waiter out of the queue, and a token that was granted but never picked up is refunded, so a
//! disconnected client never consumes quota.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

mod lease;

pub use lease::LeasePlan;

use crate::limiter::{
    Admission, Ask, Grant, Limiter, LimiterSettings, LimiterSnapshot, LimiterState, Priority,
    Rejection, Resolution, Supply, UpstreamSignal, Usage, WaiterId,
};

/// The final answer for a waiting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A token (or a probe) is the request's; the stamp goes back with the upstream's answer.
    Granted(Grant),
    Rejected {
        why: Rejection,
        retry_after: Duration,
    },
}

/// The clock every admission decision is made with (tokio's, so tests may pause it).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

pub(super) struct GateState {
    pub(super) limiter: Limiter,
    waiting: HashMap<WaiterId, oneshot::Sender<Verdict>>,
}

impl GateState {
    /// Hands a verdict to a waiter; a grant whose waiter is already gone is given back.
    fn resolve(&mut self, id: WaiterId, verdict: Verdict, now: Instant) {
        if let Some(tx) = self.waiting.remove(&id) {
            if let (Err(_), Verdict::Granted(grant)) = (tx.send(verdict), verdict) {
                // The waiter vanished between its last poll and this grant.
                self.limiter.refund(grant, now);
            }
        }
    }
}

/// One shared bucket with its queue of waiting requests.
pub struct AdmissionGate {
    state: Mutex<GateState>,
    /// Wakes the clock when the next thing to do may have moved earlier.
    pub(super) wake: Notify,
    clock_started: AtomicBool,
    /// Set when the bucket is shared with other sidecars (`shared_quota`).
    shared: AtomicBool,
    /// Wakes the links to the shared bucket (one per key): more waiters, or a controller
    /// change to publish.
    pub(super) link_wakes: Vec<Arc<Notify>>,
}

/// A request's place in the queue (or its immediate verdict).
pub struct Ticket {
    gate: Arc<AdmissionGate>,
    pending: Option<(WaiterId, oneshot::Receiver<Verdict>)>,
    verdict: Option<Verdict>,
}

impl AdmissionGate {
    pub fn new(settings: LimiterSettings) -> Arc<Self> {
        let limiter = Limiter::new(settings, now());
        let keys = limiter.key_count();
        Arc::new(AdmissionGate {
            state: Mutex::new(GateState {
                limiter,
                waiting: HashMap::new(),
            }),
            wake: Notify::new(),
            clock_started: AtomicBool::new(false),
            shared: AtomicBool::new(false),
            link_wakes: (0..keys).map(|_| Arc::new(Notify::new())).collect(),
        })
    }

    /// Wakes every key's link.
    fn wake_links(&self) {
        for wake in &self.link_wakes {
            wake.notify_one();
        }
    }

    /// Turns this gate into a client of the shared bucket: from now on it grants only slots
    /// leased by its link (or its local share while the link is down).
    pub fn share(&self) {
        self.shared.store(true, Ordering::Release);
        let t = now();
        let mut state = self.lock();
        for lane in 0..state.limiter.key_count() {
            state.limiter.set_supply(lane, Supply::Leased, t, t);
        }
    }

    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Acquire)
    }

    /// Shared, but running on its local share because the shared bucket cannot be reached.
    pub fn is_degraded(&self) -> bool {
        self.is_shared() && self.lock().limiter.any_refilling()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, GateState> {
        // A panic while holding the lock leaves plain data behind; keep serving with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts this gate's clock on the current runtime the first time it is needed; the clock
    /// ends by itself once nothing but the clock holds the gate.
    fn ensure_clock(self: &Arc<Self>) {
        if !self.clock_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run_clock(self.clone()));
        }
    }

    /// Asks for a token for a new request.
    pub fn admit(
        self: &Arc<Self>,
        client: Arc<str>,
        priority: Priority,
        deadline: Instant,
    ) -> Ticket {
        self.admit_with(Ask::new(client, priority, deadline))
    }

    /// Asks for a key's token and the request's own limits (model, client) for a new request.
    pub fn admit_with(self: &Arc<Self>, ask: Ask) -> Ticket {
        self.ask(|limiter, now| limiter.request_with(ask, now))
    }

    /// Asks again for a request the upstream answered with a 429, ahead of its class, with
    /// the request's own limits.
    pub fn admit_again_with(self: &Arc<Self>, ask: Ask) -> Ticket {
        self.ask(|limiter, now| limiter.request_again_with(ask, now))
    }

    /// Whether a request arriving now would wait: someone waits already, or no key has a
    /// token, an open slot or a due probe for it.
    pub fn would_queue(&self) -> bool {
        self.lock().limiter.would_queue(now())
    }

    /// Gives back a grant whose request never went out: its token, and its model slot.
    pub fn refund(&self, grant: Grant) {
        self.lock().limiter.refund(grant, now());
        self.wake.notify_one();
    }

    /// The upstream counted `usage` for the request granted as `grant`: its token reservations
    /// become that; what it did not use may let a waiter go.
    pub fn settle_tokens(&self, grant: Grant, usage: Usage) {
        self.lock().limiter.settle_tokens(grant, usage, now());
        self.wake.notify_one();
    }

    /// The request granted as `grant` is over: its model slot goes to the next waiter.
    pub fn release(&self, grant: Grant) {
        if grant.model.is_some() || grant.learned.is_some() {
            // The clock is woken only when a waiter may go now.
            if self.lock().limiter.release(grant) {
                self.wake.notify_one();
            }
        }
    }

    /// Feeds the upstream's answer to the request granted as `grant` to its model's
    /// concurrency: `capacity` when the model's workers were full.
    pub fn observe_capacity(&self, grant: Grant, capacity: bool) {
        self.lock().limiter.observe_capacity(grant, capacity, now());
        // Only a lower limit can change what the clock does next (a raised one frees a
        // waiter when a request ends, and `release` wakes the clock then).
        if capacity {
            self.wake.notify_one();
        }
    }

    /// The upstream refused a request on key `lane` (401, or a 403); true when the key left
    /// the pool now (see `Limiter::key_refused`).
    pub fn key_refused(&self, lane: usize, unauthorized: bool) -> bool {
        let revoked = self.lock().limiter.key_refused(lane, unauthorized);
        self.wake.notify_one();
        revoked
    }

    /// Brings key `lane` back into the pool: a reload gave it a new value.
    pub fn reinstate(&self, lane: usize) {
        self.lock().limiter.reinstate(lane);
        self.wake.notify_one();
    }

    /// Forgets what was learned of a key, a model, or both (see `Limiter::reset_learning`).
    pub fn reset_learning(
        &self,
        key: Option<&str>,
        model: Option<&str>,
    ) -> Result<Vec<String>, crate::limiter::ResetError> {
        let done = self.lock().limiter.reset_learning(key, model, now());
        self.wake.notify_one();
        if self.is_shared() {
            self.wake_links();
        }
        done
    }

    /// The first key still in the pool: the one requests sent without a token use.
    pub fn first_active_key(&self) -> usize {
        self.lock().limiter.first_active_lane()
    }

    /// Whether the key of lane `lane` is still in the pool.
    pub fn is_key_active(&self, lane: usize) -> bool {
        self.lock().limiter.key_active(lane)
    }

    /// How many keys the pool has.
    pub fn key_count(&self) -> usize {
        self.lock().limiter.key_count()
    }

    fn ask(self: &Arc<Self>, request: impl FnOnce(&mut Limiter, Instant) -> Admission) -> Ticket {
        self.ensure_clock();
        let mut state = self.lock();
        let admission = request(&mut state.limiter, now());
        self.ticket(state, admission)
    }

    fn ticket(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, GateState>,
        admission: Admission,
    ) -> Ticket {
        let (pending, verdict) = match admission {
            Admission::Granted => (None, Some(Verdict::Granted(state.limiter.last_grant()))),
            Admission::Rejected { why, retry_after } => {
                (None, Some(Verdict::Rejected { why, retry_after }))
            }
            Admission::Queued(id) => {
                let (tx, rx) = oneshot::channel();
                state.waiting.insert(id, tx);
                drop(state);
                self.wake.notify_one();
                if self.is_shared() {
                    self.wake_links();
                }
                (Some((id, rx)), None)
            }
        };
        Ticket {
            gate: self.clone(),
            pending,
            verdict,
        }
    }

    /// Feeds the upstream's answer to the request granted as `grant` to the adaptive controller.
    pub fn observe(&self, signal: &UpstreamSignal, grant: Grant) -> UpstreamSignal {
        let judged = self.lock().limiter.observe_answer(signal, grant, now());
        self.wake.notify_one();
        if self.is_shared() {
            self.wake_links();
        }
        judged
    }

    /// The limit the upstream stated on its answer to `grant` (`rate_rpm: auto`).
    pub fn observe_stated(&self, grant: Grant, stated: crate::limiter::StatedLimit) {
        self.lock().limiter.observe_stated(grant, stated, now());
        self.wake.notify_one();
    }

    /// Takes the token limit the upstream stated on its answer to `grant`.
    pub fn observe_stated_tokens(&self, grant: Grant, stated: crate::limiter::StatedTokens) {
        self.lock()
            .limiter
            .observe_stated_tokens(grant, stated, now());
        self.wake.notify_one();
    }

    /// The stamp for answers to requests sent without a token: the first active key's, which
    /// they go out on.
    pub fn current_grant(&self) -> Grant {
        self.lock().limiter.untokened_grant()
    }

    pub fn snapshot(&self) -> LimiterSnapshot {
        self.lock().limiter.snapshot(now())
    }

    /// Applies new limiter settings without resetting tokens, queue or retreat state.
    pub fn reconfigure(&self, settings: &LimiterSettings) {
        let t = now();
        let mut state = self.lock();
        // The keys' own rates first: a key that lost its own rate follows the route's next.
        state.limiter.set_limits(settings, t);
        state.limiter.set_base_rpm(settings.base_rpm, t);
        state.limiter.set_capacity(settings.capacity, t);
        state.limiter.set_queue_max(settings.queue_max);
        state
            .limiter
            .set_retreat_settings(settings.retreat.clone(), t);
        drop(state);
        self.wake.notify_one();
    }

    /// Grants and expires what is due; returns when to look again.
    fn tick(&self) -> Option<Instant> {
        let t = now();
        let mut state = self.lock();
        let resolutions = state.limiter.poll(t);
        for resolution in resolutions {
            let (id, verdict) = match resolution {
                Resolution::Granted(id, grant) => (id, Verdict::Granted(grant)),
                Resolution::Expired {
                    id,
                    why,
                    retry_after,
                } => (id, Verdict::Rejected { why, retry_after }),
            };
            state.resolve(id, verdict, t);
        }
        let held: usize = (0..state.limiter.key_count())
            .map(|lane| state.limiter.slots_held(lane))
            .sum();
        if self.is_shared() && held == 0 && state.limiter.queue_len() > 0 {
            // The slots in hand are spent and requests still wait: lease now, not at the
            // next pacing step.
            self.wake_links();
        }
        state.limiter.next_wakeup(t)
    }

    /// The limiter state to save for a restart.
    pub fn export(&self) -> LimiterState {
        self.lock().limiter.export(now())
    }

    /// The state of every key by name, to save for a restart.
    pub fn export_keys(&self) -> Vec<(Arc<str>, LimiterState)> {
        let t = now();
        let mut state = self.lock();
        let names: Vec<Arc<str>> = state.limiter.key_names();
        names
            .into_iter()
            .enumerate()
            .map(|(lane, name)| (name, state.limiter.export_key(lane, t)))
            .collect()
    }

    /// The model lanes to save for a restart.
    pub fn export_models(&self) -> Vec<crate::limiter::SavedModelLane> {
        self.lock().limiter.export_models(now())
    }

    /// Takes over a saved model lane that is `age` old; false when it has no place now.
    pub fn restore_model(&self, saved: &crate::limiter::SavedModelLane, age: Duration) -> bool {
        let restored = self.lock().limiter.restore_model(saved, age, now());
        self.wake.notify_one();
        restored
    }

    /// Takes over a saved state that is `age` old (of the first key).
    pub fn restore(&self, saved: &LimiterState, age: Duration) {
        self.lock().limiter.restore(saved, age, now());
        self.wake.notify_one();
    }

    /// Takes over the saved state of the key named `name`; false when there is no such key.
    pub fn restore_key(&self, name: &str, saved: &LimiterState, age: Duration) -> bool {
        let mut state = self.lock();
        let Some(lane) = state.limiter.key_names().iter().position(|n| &**n == name) else {
            return false;
        };
        state.limiter.restore_key(lane, saved, age, now());
        drop(state);
        self.wake.notify_one();
        true
    }

    /// Whether an upstream 429 on the key of `grant` is worth sending again now: not while
    /// the upstream says the account is out of credit.
    pub fn replays_429s(&self, grant: Grant) -> bool {
        !self
            .lock()
            .limiter
            .controller_of(grant.lane)
            .billing_refused(now())
    }

    /// How long a request refused on `grant` must wait at least before it could be sent
    /// again (see `Limiter::replay_not_before`).
    pub fn replay_wait(&self, grant: Grant) -> Duration {
        let t = now();
        self.lock()
            .limiter
            .replay_not_before(grant, t)
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(t))
    }

    /// How long a new request of `priority` would wait now.
    pub fn estimated_wait(&self, priority: Priority) -> Duration {
        self.lock().limiter.estimated_wait(priority, now())
    }

    fn abandon(&self, id: WaiterId, rx: &mut oneshot::Receiver<Verdict>) {
        let t = now();
        let mut state = self.lock();
        if state.limiter.cancel(id, t) {
            state.waiting.remove(&id);
        } else if let Ok(Verdict::Granted(grant)) = rx.try_recv() {
            // Granted, but the request is gone before it could use the token: give it back.
            state.limiter.refund(grant, t);
        }
        drop(state);
        self.wake.notify_one();
    }
}

/// The clock of one gate: grants tokens and expires waiters when they are due. It ends when
/// nobody but the clock holds the gate any more (the route was removed by a reload).
async fn run_clock(gate: Arc<AdmissionGate>) {
    /// Longest idle sleep, so that a retired gate's clock notices it is alone.
    const IDLE_CHECK: Duration = Duration::from_secs(1);
    loop {
        if Arc::strong_count(&gate) == 1 {
            return;
        }
        let at = gate.tick().unwrap_or_else(|| now() + IDLE_CHECK);
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
            _ = gate.wake.notified() => {}
        }
    }
}

impl Ticket {
    /// Waits for the verdict. Cancel-safe: dropping the future keeps the ticket's place, and
    /// dropping the ticket gives it up.
    pub async fn verdict(&mut self) -> Verdict {
        if let Some(verdict) = self.verdict {
            return verdict;
        }
        let (_, rx) = self
            .pending
            .as_mut()
            .expect("a ticket without verdict is pending");
        let verdict = rx.await.unwrap_or(Verdict::Rejected {
            why: Rejection::QueueTimeout,
            retry_after: Duration::from_secs(1),
        });
        self.pending = None;
        self.verdict = Some(verdict);
        verdict
    }

    /// The verdict if it is already known (granted or rejected without queueing).
    pub fn immediate(&self) -> Option<Verdict> {
        self.verdict
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((id, mut rx)) = self.pending.take() {
            self.gate.abandon(id, &mut rx);
        }
    }
}

#[cfg(test)]
mod tests;
