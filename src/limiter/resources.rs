//! What a waiter needs, all at once: a key that is ready, its model's lane on that key, its
//! configured model limit (or its model's learned concurrency), its client's cap, and room for
//! its cost in each token budget that applies. Apart from the queue, so that the queue can ask
//! about each waiter while it picks the next one.
//!
//! **Backfilling.** A waiter whose cost does not fit a token budget yet keeps its place, and
//! smaller waiters behind it may go: but only as far as they do not put off the instant it
//! fits. The first such waiter in the queue's order is the one held for (`Backfill`): for each
//! budget it waits on, the instant `at` it will fit there; a later waiter may take from that
//! budget only what leaves room for it at `at` (its tokens still count then, since `at` is
//! within a window of now). So small requests fill the gaps and the big one goes on time, and
//! a client is not starved because its prompts are large.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use super::{ClientCaps, Lane, ModelLanes, ModelLimit, ModelRef, TokenCost, TokenWindow, Waiter};

/// A token budget one waiter is held for.
#[derive(Debug, Clone, PartialEq)]
enum Budget {
    Key(usize),
    Model(usize),
    Client(Arc<str>),
}

/// The waiter held for, while one is (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Backfill {
    /// Each budget it waits on, its cost there, and when it fits there.
    held: Option<Vec<(Budget, TokenCost, Instant)>>,
}

impl Backfill {
    /// The room `budget` leaves for a later waiter costing `cost`: all of it when nobody is held
    /// for on that budget.
    fn allows(&self, budget: &Budget, window: &TokenWindow, cost: TokenCost, now: Instant) -> bool {
        if !window.fits(cost, now) {
            return false;
        }
        let Some(held) = &self.held else {
            return true;
        };
        held.iter()
            .filter(|(b, _, _)| b == budget)
            .all(|(_, theirs, at)| window.fits_beside(cost, *theirs, *at))
    }
}

pub(super) struct Resources<'a> {
    pub lanes: &'a [Lane],
    pub models: &'a [ModelLimit],
    pub learned: &'a ModelLanes,
    pub clients: &'a ClientCaps,
}

impl Resources<'_> {
    /// Whether the waiter's own limits (its configured model, its client, its model's learned
    /// concurrency, and their token budgets for `cost`) let it go now. Its model's rate lanes
    /// and its key's token budget are per key: see `ready_lane`.
    pub fn limits_allow(
        &self,
        client: &str,
        model: Option<usize>,
        learned: Option<ModelRef>,
        cost: Option<TokenCost>,
        now: Instant,
    ) -> bool {
        let configured = model.and_then(|m| self.models.get(m));
        configured.is_none_or(|m| m.ready(cost, now))
            && (configured.is_some()
                || learned
                    .and_then(|m| self.learned.get(m))
                    .is_none_or(|m| m.concurrency.ready(None, now)))
            && self.clients.ready(client, cost, now)
    }

    /// Whether `waiter` can be served now, on some key.
    pub fn serve(&self, waiter: &Waiter, now: Instant) -> bool {
        self.limits_allow(
            &waiter.client,
            waiter.model,
            waiter.learned,
            waiter.cost(),
            now,
        ) && self
            .ready_lane(waiter.learned, waiter.cost(), now)
            .is_some()
    }

    /// Whether `waiter` can be served now, on some key, leaving room for the waiter held for
    /// (see the module doc). The first waiter that only its token budgets hold becomes the one
    /// held for.
    pub fn serve_backfilling(
        &self,
        waiter: &Waiter,
        backfill: &RefCell<Backfill>,
        now: Instant,
    ) -> bool {
        let Some(cost) = waiter.cost() else {
            return self.serve(waiter, now);
        };
        // Held by something else than tokens: it has no claim on them yet.
        if !self.limits_allow(&waiter.client, waiter.model, waiter.learned, None, now)
            || self.ready_lane(waiter.learned, None, now).is_none()
        {
            return false;
        }
        let b = backfill.borrow();
        let model = waiter.model.and_then(|m| {
            let window = self.models.get(m)?.tokens.as_ref()?;
            Some((Budget::Model(m), window))
        });
        let client = self
            .clients
            .window(&waiter.client)
            .map(|w| (Budget::Client(waiter.client.clone()), w));
        let own_fit = [&model, &client]
            .into_iter()
            .flatten()
            .all(|(budget, window)| b.allows(budget, window, cost, now));
        let lane = own_fit
            .then(|| self.backfill_lane(waiter.learned, cost, &b, now))
            .flatten();
        if lane.is_some() {
            return true;
        }
        if b.held.is_some() {
            return false;
        }
        drop(b);
        // The first waiter that tokens alone hold: held for, on every budget it waits on.
        let mut held = Vec::new();
        for (budget, window) in [model, client].into_iter().flatten() {
            if !window.fits(cost, now) {
                held.extend(window.fits_at(cost, now).map(|at| (budget, cost, at)));
            }
        }
        let key = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| l.ready(now).is_some())
            .filter_map(|(i, l)| Some((i, l.tokens.as_ref()?.fits_at(cost, now)?)))
            .min_by_key(|(_, at)| *at);
        let fits_a_key = self
            .lanes
            .iter()
            .any(|l| l.ready(now).is_some() && l.tokens_fit(Some(cost), now));
        if let (Some((i, at)), false) = (key, fits_a_key) {
            held.push((Budget::Key(i), cost, at));
        }
        backfill.borrow_mut().held = Some(held);
        false
    }

    /// `ready_lane`, on the keys whose token budget leaves room for the waiter held for.
    pub fn backfill_lane(
        &self,
        learned: Option<ModelRef>,
        cost: TokenCost,
        backfill: &Backfill,
        now: Instant,
    ) -> Option<usize> {
        self.pick_lane(learned, now, |i, lane| {
            lane.tokens
                .as_ref()
                .is_none_or(|w| backfill.allows(&Budget::Key(i), w, cost, now))
        })
    }

    /// The token budget a request costing `cost` could never fit in: every key's that is in
    /// the pool (when each has one), its model's or its client's. `None` when it fits, or its
    /// cost is only a guess.
    pub fn too_small_for(
        &self,
        client: &str,
        model: Option<usize>,
        cost: Option<TokenCost>,
    ) -> Option<u64> {
        let cost = cost.filter(|c| c.known)?;
        let mut keys = self.lanes.iter().filter(|l| l.active).peekable();
        keys.peek()?;
        let mut largest = 0;
        for lane in keys {
            match &lane.tokens {
                Some(w) if !w.can_fit(cost) => largest = largest.max(w.limit()),
                _ => {
                    largest = 0;
                    break;
                }
            }
        }
        let model = model
            .and_then(|m| self.models.get(m))
            .and_then(|m| m.tokens.as_ref())
            .filter(|w| !w.can_fit(cost))
            .map(|w| w.limit());
        (largest > 0)
            .then_some(largest)
            .or(model)
            .or_else(|| self.clients.too_small_for(client, cost))
    }

    /// The key that can serve a request of `learned` costing `cost` soonest: one with a token
    /// (or a slot) in hand for it and room in its token budget, the fullest first; one where
    /// the key or the model's lane would only probe, when none has a token.
    pub fn ready_lane(
        &self,
        learned: Option<ModelRef>,
        cost: Option<TokenCost>,
        now: Instant,
    ) -> Option<usize> {
        self.pick_lane(learned, now, |_, lane| lane.tokens_fit(cost, now))
    }

    fn pick_lane(
        &self,
        learned: Option<ModelRef>,
        now: Instant,
        room: impl Fn(usize, &Lane) -> bool,
    ) -> Option<usize> {
        let mut best: Option<(usize, bool, f64)> = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            let Some(key_regular) = lane.ready(now) else {
                continue;
            };
            if !room(i, lane) {
                continue;
            }
            let Some(model_regular) = self.learned.ready(learned, i, now) else {
                continue;
            };
            let regular = key_regular && model_regular;
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
}
