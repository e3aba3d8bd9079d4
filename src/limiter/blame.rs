//! Who an upstream 429 is charged to: the key it went out on, or the model it asked for.
//!
//! The upstream counts both: each key has its quota, and each model on it may have a lower one.
//! Cutting the key for a model's 429 drags every other model down to that model's pace;
//! cutting only the model for a key's 429 keeps sending the other models into a full window.
//! So the rules, for a fresh 429 (of the key's current epoch, not its probe):
//!
//! 1. a request without a model charges the key;
//! 2. if requests of other models wait for the key, the 429 is charged to the model for now
//!    and the key is *judged*: the next request of another model on it is its test. The
//!    upstream accepting it says the key had room (the model stays charged); a 429 on it, or
//!    on any other model's request meanwhile, says the key is full: the key is cut and the
//!    model's lane gets back what it had before;
//! 3. else, with one model alone on the key, nothing tells the two apart: the key is charged
//!    (so a single-model client sees its key retreat, as it always did), and what the key
//!    learns is remembered as that model's. The first request of another model hands it over:
//!    the model's lane takes the key's retreat, the key starts again from its base rate. If
//!    the key was the limit after all, both models meet 429s and the key is charged then;
//! 4. with other models seen lately that cannot test now (their own lanes hold them, or none
//!    of theirs waits at this instant), a key that was accepted nearly its whole rate over a
//!    busy window (running full) is charged; one that was not, was not the limit: the model
//!    met one of its own. A model whose own lane already holds it below the key is charged
//!    itself even on a full key: the other models filling the key met no 429 (one that did
//!    charges the key, whatever else holds), so the key is full of what the upstream accepts,
//!    and the 429 is the model's.
//!
//! A test costs no extra request: it is a request that would have gone anyway, and the key
//! goes on at its rate while the test is out, since a 429 comes back long before the next
//! token at these rates.

use std::time::{Duration, Instant};

use super::model_lanes::RateLane;
use super::{Grant, Limiter, ModelRef, UpstreamSignal, PROBE_ANSWER_TIMEOUT};

/// A 429 charged to a model while the key is still being judged.
#[derive(Debug, Clone)]
pub struct Blame {
    pub model: ModelRef,
    /// The model's lane from before the 429, given back if the key turns out to be full.
    before: Box<RateLane>,
    since: Instant,
    /// When the test (one at a time) went out.
    pub(super) test_out: Option<Instant>,
}

/// Who a 429 is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// The key: its controller cuts, the model's lane only counts the 429.
    Key,
    /// The model's lane: it cuts, the key only counts the 429.
    Model,
    /// The model's lane for now, with the key judged by its next request of another model.
    Judge,
    /// The key, and the model judged before gets back its lane: the key was full.
    KeyAfterAll,
    /// The key, with one model alone on it: what the key learns is that model's, handed to
    /// its lane when another model comes.
    KeyAlone,
}

/// A blame nobody could test within this long stays with the model.
const BLAME_TEST_WITHIN: Duration = Duration::from_secs(60);

impl Limiter {
    /// Who the 429 on `grant` is charged to (see the module doc).
    pub(super) fn charge(&self, grant: Grant, now: Instant) -> Charge {
        let key = self.lane(grant.lane);
        let Some(mg) = grant.learned else {
            return Charge::Key;
        };
        let controller = &key.controller;
        if grant.epoch != controller.epoch() || (grant.probe && controller.is_probing()) {
            // Sent before the key's last cut, or the key's own probe: the key's business.
            return Charge::Key;
        }
        if let Some(blame) = &key.blame {
            return if grant.test || blame.model != mg.model {
                Charge::KeyAfterAll
            } else {
                Charge::Model
            };
        }
        let lane = self.learned.lane(mg.model, grant.lane);
        if mg.probe && lane.is_some_and(|l| l.controller.is_probing()) {
            // The model's probe: its lane is already charged.
            return Charge::Model;
        }
        if key.model_charged.is_some_and(|(other, at)| {
            other != mg.model && now.saturating_duration_since(at) < controller.settings().window
        }) {
            // Another model met a 429 of its own on this key lately: 429s across models.
            return Charge::Key;
        }
        let resources = self.resources();
        let others_wait = self.queue.iter().any(|w| {
            w.learned != Some(mg.model)
                && resources.limits_allow(&w.client, w.model, w.learned, w.cost(), now)
                && self.can_test(grant.lane, w.learned, now)
        });
        let window = controller.settings().window;
        let others_seen = self.learned.models().any(|m| {
            Some(m.id.as_ref()) != self.learned.get(mg.model).map(|x| x.id.as_ref())
                && m.lanes
                    .get(grant.lane)
                    .and_then(Option::as_ref)
                    .and_then(|l| l.controller.last_answer())
                    .is_some_and(|at| now.saturating_duration_since(at) < window)
        });
        if others_wait {
            Charge::Judge
        } else if !others_seen {
            Charge::KeyAlone
        } else if controller.running_full(now) && !lane.is_some_and(|l| l.limiting(now)) {
            Charge::Key
        } else {
            Charge::Model
        }
    }

    /// Whether a request of `learned` on key `key` can test the key: its model's lane does not
    /// hold it back (a 429 on a model with a limit of its own would say nothing of the key).
    fn can_test(&self, key: usize, learned: Option<ModelRef>, now: Instant) -> bool {
        learned
            .and_then(|m| self.learned.lane(m, key))
            .is_none_or(|lane| !lane.limiting(now))
    }

    /// A fresh 429 was charged to `model` on key `key`.
    pub(super) fn charged_model(&mut self, key: usize, model: ModelRef, now: Instant) {
        self.lane_mut(key).model_charged = Some((model, now));
    }

    /// A request of `learned` arrived: a key whose retreat was learned from another model
    /// alone hands that retreat over to the lane of that model.
    pub(super) fn hand_over_alone(&mut self, learned: Option<ModelRef>, now: Instant) {
        for key in 0..self.lanes.len() {
            let Some((alone, _)) = self.lanes[key].alone else {
                continue;
            };
            if learned == Some(alone) {
                continue;
            }
            self.lanes[key].alone = None;
            if self.lanes[key].controller.state() == super::RetreatState::Normal
                && !self.lanes[key].controller.is_paused(now)
            {
                continue;
            }
            let key_rpm = self.lanes[key].controller.base_rpm();
            let learned_by_key = self.lanes[key].controller.clone();
            let Some(lane) = self
                .learned
                .lane_mut(alone, key, key_rpm, &self.retreat, now)
            else {
                continue;
            };
            lane.controller.take_back(&learned_by_key);
            lane.bucket = super::TokenBucket::with_tokens(1, 0.0, now);
            let k = &mut self.lanes[key];
            k.controller.reset(now);
            k.model_charged = Some((alone, now));
        }
    }

    /// Starts judging key `key` for the 429 its lane of `model` is about to be charged.
    pub(super) fn start_judging(&mut self, key: usize, model: ModelRef, now: Instant) {
        let Some(before) = self.learned.lane(model, key).cloned() else {
            return;
        };
        self.lane_mut(key).blame = Some(Blame {
            model,
            before: Box::new(before),
            since: now,
            test_out: None,
        });
    }

    /// The key was full after all: the judged model's lane gets back what it had.
    pub(super) fn acquit(&mut self, key: usize) {
        let Some(blame) = self.lane_mut(key).blame.take() else {
            return;
        };
        if let Some(m) = self.learned.get_mut(blame.model) {
            if let Some(Some(lane)) = m.lanes.get_mut(key) {
                lane.controller.take_back(&blame.before.controller);
                lane.bucket = blame.before.bucket.clone();
            }
        }
    }

    /// Whether a grant of `learned` on key `key` is the test of its key's judgement; marks
    /// the test as out.
    pub(super) fn take_test(
        &mut self,
        key: usize,
        learned: Option<ModelRef>,
        now: Instant,
    ) -> bool {
        if !self.can_test(key, learned, now) {
            return false;
        }
        match self.lane_mut(key).blame.as_mut() {
            Some(blame) if blame.test_out.is_none() && learned != Some(blame.model) => {
                blame.test_out = Some(now);
                true
            }
            _ => false,
        }
    }

    /// The answer to a test: accepted, the key had room (the model stays charged); no answer
    /// at all, another request may test.
    pub(super) fn test_answered(&mut self, grant: Grant, signal: &UpstreamSignal) {
        if !grant.test {
            return;
        }
        let key = self.lane_mut(grant.lane);
        match signal {
            UpstreamSignal::Accepted { .. } => key.blame = None,
            UpstreamSignal::RateLimited { .. } => {}
            UpstreamSignal::NotRateLimit(_) | UpstreamSignal::NoAnswer => {
                if let Some(blame) = key.blame.as_mut() {
                    blame.test_out = None;
                }
            }
        }
    }

    /// A test granted but never sent: another request may test.
    pub(super) fn test_returned(&mut self, grant: Grant) {
        if grant.test {
            if let Some(blame) = self.lane_mut(grant.lane).blame.as_mut() {
                blame.test_out = None;
            }
        }
    }

    /// Judgements that time has settled: a test with no 429 back in time was accepted, and a
    /// judgement nobody could test stays with the model.
    pub(super) fn settle_judgements(&mut self, now: Instant) {
        for key in &mut self.lanes {
            let settled = key.blame.as_ref().is_some_and(|b| match b.test_out {
                Some(sent) => now >= sent + PROBE_ANSWER_TIMEOUT,
                None => now.saturating_duration_since(b.since) >= BLAME_TEST_WITHIN,
            });
            if settled {
                key.blame = None;
            }
        }
    }

    /// When a judgement settles by itself.
    pub(super) fn next_judgement_event(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|l| l.blame.as_ref())
            .map(|b| match b.test_out {
                Some(sent) => sent + PROBE_ANSWER_TIMEOUT,
                None => b.since + BLAME_TEST_WITHIN,
            })
            .min()
    }
}
