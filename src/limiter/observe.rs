//! What an upstream answer does to the limiter: it goes to the key's controller and to the
//! lane of the request's model on that key, and a 429 is charged to one of them (see
//! `blame`); capacity answers (and every success) go to the model's concurrency.

use std::time::Instant;

use super::blame::Charge;
use super::{Grant, Limiter, NonRateLimitReason, UpstreamSignal};

impl Limiter {
    /// Feeds an upstream answer to the first key's controller, as the answer to a grant of
    /// now.
    pub fn observe(&mut self, signal: &UpstreamSignal, now: Instant) {
        let grant = self.lane(0).controller.unprobed_grant();
        self.observe_answer(signal, grant, now);
    }

    /// Feeds the upstream's answer to the request granted as `grant`. A pause empties the
    /// bucket of the lane it applies to; so does the start of probing, so that no token saved
    /// before the cut is spent into a full window when probing ends.
    ///
    /// Returns the answer as the limiter judged it: a 429 it found to be about tokens is
    /// `NotRateLimit(TokenBudget)` (see `learn_tokens`).
    pub fn observe_answer(
        &mut self,
        signal: &UpstreamSignal,
        grant: Grant,
        now: Instant,
    ) -> UpstreamSignal {
        self.advance(now);
        let judged = self.learn_tokens(signal.clone(), grant, now);
        self.observe_judged(&judged, grant, now);
        judged
    }

    fn observe_judged(&mut self, signal: &UpstreamSignal, grant: Grant, now: Instant) {
        // Full workers are the model's limit, not the key's: they never cut a rate.
        match signal {
            UpstreamSignal::NotRateLimit(
                NonRateLimitReason::WorkerConcurrency | NonRateLimitReason::Unavailable,
            ) => self.observe_capacity(grant, true, now),
            UpstreamSignal::Accepted { .. } => self.observe_capacity(grant, false, now),
            _ => {}
        }
        let key = grant.lane.min(self.lanes.len() - 1);
        if matches!(signal, UpstreamSignal::Accepted { .. }) {
            self.lanes[key].forbidden_in_a_row = 0;
        }
        let charge = match signal {
            UpstreamSignal::RateLimited { .. } => self.charge(grant, now),
            _ => Charge::Key,
        };
        let limited = matches!(signal, UpstreamSignal::RateLimited { .. });
        self.check_deadlines |= limited;
        if let (Charge::Judge | Charge::Model, Some(mg)) = (charge, grant.learned) {
            if !mg.probe {
                self.charged_model(key, mg.model, now);
            }
            if charge == Charge::Judge {
                self.start_judging(key, mg.model, now);
            }
        }
        if charge == Charge::KeyAfterAll {
            self.acquit(key);
        }
        if let (Charge::KeyAlone, Some(mg)) = (charge, grant.learned) {
            self.lanes[key].alone = Some((mg.model, now));
        }
        if let Some(mg) = grant.learned {
            let key_rpm = self.lanes[key].controller.effective_rpm();
            if let Some(lane) = self
                .learned
                .lane_mut(mg.model, key, key_rpm, &self.retreat, now)
            {
                let charged = limited && matches!(charge, Charge::Model | Charge::Judge);
                if limited && !charged {
                    lane.controller.record(now, true);
                    if mg.probe {
                        lane.controller.probe_returned();
                    }
                } else {
                    let probing_before = lane.controller.is_probing();
                    lane.controller
                        .observe_stamped(signal, mg.epoch, mg.probe, now);
                    if lane.controller.is_paused(now)
                        || (lane.controller.is_probing() && !probing_before)
                    {
                        lane.bucket.drain();
                    }
                }
            }
        }
        self.test_answered(grant, signal);
        let lane = &mut self.lanes[key];
        if limited && matches!(charge, Charge::Model | Charge::Judge) {
            lane.controller.record(now, true);
            return;
        }
        let probing_before = lane.controller.is_probing();
        lane.controller.observe_answer(signal, grant, now);
        if charge == Charge::KeyAfterAll && lane.controller.is_probing() {
            // The test was the first request into the full window: it counts as the first
            // probe.
            lane.controller.probe_refused(now);
        }
        if lane.controller.is_paused(now) {
            lane.bucket.drain();
            lane.slots.clear();
        } else if lane.controller.is_probing() && !probing_before {
            lane.bucket.drain();
        }
    }

    /// What an answer teaches of the key's token limit (see `token_learning`): an accepted
    /// answer's cost, or a 429 that was about tokens, which it becomes
    /// (`NonRateLimitReason::TokenBudget`). A key whose budget is configured or stated learns
    /// nothing from 429s.
    fn learn_tokens(
        &mut self,
        signal: UpstreamSignal,
        grant: Grant,
        now: Instant,
    ) -> UpstreamSignal {
        let Some(id) = grant.tokens else {
            return signal;
        };
        let k = grant.lane.min(self.lanes.len() - 1);
        let base_tpm = self.base_tpm;
        match signal {
            UpstreamSignal::Accepted { .. } => {
                if let Some(hold) = self.holds.get(id) {
                    let lane = &mut self.lanes[k];
                    let learns = lane.learns_tokens(base_tpm);
                    if let (Some(tpm), true) = (lane.token_learning.accepted(id, hold, now), learns)
                    {
                        lane.adopt_tpm(tpm);
                    }
                }
                signal
            }
            UpstreamSignal::RateLimited { .. } => {
                if !self.lanes[k].learns_tokens(base_tpm) {
                    return signal;
                }
                let Some(hold) = self.holds.get(id) else {
                    return signal;
                };
                let lane = &mut self.lanes[k];
                let Some(tpm) = lane.token_learning.refused(hold, now) else {
                    if lane.budget_tpm(base_tpm).is_none() {
                        // A learned budget was forgotten: the key has none now.
                        lane.tokens = None;
                    }
                    return signal;
                };
                // The refused request counts nowhere: the upstream did not take it.
                self.holds.take(id);
                if let Some(window) = lane.tokens.as_mut() {
                    window.refund(hold);
                }
                lane.adopt_tpm(tpm);
                self.stalled = false;
                UpstreamSignal::NotRateLimit(NonRateLimitReason::TokenBudget)
            }
            _ => signal,
        }
    }

    /// The upstream answered a request granted as `grant`: `capacity` when it said the
    /// model's workers are full (which says nothing about the key's rate). It goes to the
    /// configured limit of the model, or else to what is learned of it.
    pub fn observe_capacity(&mut self, grant: Grant, capacity: bool, now: Instant) {
        let limit = match grant.model {
            Some(m) => self.models.get_mut(m),
            None => grant
                .learned
                .and_then(|mg| self.learned.get_mut(mg.model))
                .map(|m| &mut m.concurrency),
        };
        if let Some(limit) = limit {
            if capacity {
                limit.capacity_error(now);
            } else {
                limit.answered();
            }
        }
    }
}
