//! What the gate's clock asks of the limiter: grant and expire what is due (`poll`), and say
//! when to look again (`next_wakeup`).

use std::time::Instant;

use std::cell::RefCell;

use super::resources::{Backfill, Resources};
use super::{Limiter, Rejection, Resolution};

impl Limiter {
    /// Expires waiters whose deadline passed and grants tokens to the next waiters in line.
    pub fn poll(&mut self, now: Instant) -> Vec<Resolution> {
        self.advance(now);
        let mut resolved: Vec<Resolution> = Vec::new();
        if std::mem::take(&mut self.check_deadlines) {
            resolved.extend(self.expire_unreachable(now));
        }
        for (id, waiter) in self.queue.expire(now) {
            self.learned.waiting(waiter.learned, false);
            let retry_after = self.estimated_wait(waiter.priority, now);
            resolved.push(Resolution::Expired {
                id,
                why: Rejection::QueueTimeout,
                retry_after,
            });
        }
        self.stalled = false;
        let gated =
            !self.models.is_empty() || self.any_token_budget() || self.learned.any_limiting(now);
        while !self.queue.is_empty() && self.ready_lane(None, None, now).is_some() {
            let backfill = RefCell::new(Backfill::default());
            let next = if gated {
                let resources = Resources {
                    lanes: &self.lanes,
                    models: &self.models,
                    learned: &self.learned,
                    clients: &self.clients,
                };
                self.queue
                    .pop_next_ready(|w| resources.serve_backfilling(w, &backfill, now))
            } else {
                self.queue.pop_next()
            };
            let Some((id, waiter)) = next else {
                self.stalled = true;
                break;
            };
            self.learned.waiting(waiter.learned, false);
            let grant = self
                .take_all(
                    &waiter.client,
                    waiter.model,
                    waiter.learned,
                    waiter.priced,
                    &backfill.borrow(),
                    now,
                )
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
        let keys = self.lanes.iter().filter_map(|l| l.next_token_at(now)).min();
        let next = if self.stalled {
            // Tokens wait for a model or client limit: a slot freed wakes the clock itself
            // (`release`); a rate, a probe or a pause of a model's lane wakes it here.
            let held = self
                .queue
                .iter()
                .filter_map(|w| {
                    let model = w
                        .model
                        .and_then(|m| self.models.get(m))
                        .and_then(|m| m.next_ready_at(w.cost(), now));
                    let client = self.clients.next_ready_at(&w.client, w.cost(), now);
                    let lanes = w.learned.and_then(|m| {
                        (0..self.lanes.len())
                            .filter_map(|k| self.learned.lane(m, k)?.next_open_at(now))
                            .min()
                    });
                    // The key budgets: the first that has room for it.
                    let budgets = w.cost().and_then(|cost| {
                        self.lanes
                            .iter()
                            .filter(|l| l.active)
                            .filter_map(|l| l.tokens.as_ref()?.fits_at(cost, now))
                            .min()
                    });
                    [model, client, lanes, budgets].into_iter().flatten().max()
                })
                .filter(|t| *t > now)
                .min();
            match (held, keys.filter(|t| *t > now)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        } else {
            keys
        };
        let next = [next, self.next_judgement_event()]
            .into_iter()
            .flatten()
            .min();
        Some(next.map_or(deadline, |t| t.min(deadline)))
    }
}
