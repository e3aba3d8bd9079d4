//! What a waiter needs, all at once: a key that is ready, its model's lane on that key, its
//! configured model limit (or its model's learned concurrency), and its client's cap. Apart
//! from the queue, so that the queue can ask about each waiter while it picks the next one.

use std::time::Instant;

use super::{ClientCaps, Lane, ModelLanes, ModelLimit, ModelRef, Waiter};

pub(super) struct Resources<'a> {
    pub lanes: &'a [Lane],
    pub models: &'a [ModelLimit],
    pub learned: &'a ModelLanes,
    pub clients: &'a ClientCaps,
}

impl Resources<'_> {
    /// Whether the waiter's own limits (its configured model, its client, its model's learned
    /// concurrency) let it go now. Its model's rate lanes are per key: see `ready_lane`.
    pub fn limits_allow(
        &self,
        client: &str,
        model: Option<usize>,
        learned: Option<ModelRef>,
    ) -> bool {
        let configured = model.and_then(|m| self.models.get(m));
        configured.is_none_or(ModelLimit::ready)
            && (configured.is_some()
                || learned
                    .and_then(|m| self.learned.get(m))
                    .is_none_or(|m| m.concurrency.ready()))
            && self.clients.ready(client)
    }

    /// Whether `waiter` can be served now, on some key.
    pub fn serve(&self, waiter: &Waiter, now: Instant) -> bool {
        self.limits_allow(&waiter.client, waiter.model, waiter.learned)
            && self.ready_lane(waiter.learned, now).is_some()
    }

    /// The key that can serve a request of `learned` soonest: one with a token (or a slot) in
    /// hand for it, the fullest first; one where the key or the model's lane would only probe,
    /// when none has a token.
    pub fn ready_lane(&self, learned: Option<ModelRef>, now: Instant) -> Option<usize> {
        let mut best: Option<(usize, bool, f64)> = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            let Some(key_regular) = lane.ready(now) else {
                continue;
            };
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
