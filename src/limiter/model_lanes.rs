//! What the limiter learns per model, without being told: the upstream limits each model on
//! its own (NVIDIA: some models well below the key's 40 rpm, some locked for hours), so
//! every model id seen on a route gets, on each key, a lane of its own ([`RateLane`]): a
//! bucket and a controller whose base rate is its key's effective rate. While the lane is
//! `normal` it holds nothing back; once a 429 is charged to it (see `blame`), it runs at its
//! own learned rate, below the key's, and probes and recovers on its own. A model also learns
//! its concurrency from NVIDIA's "Worker local total request limit reached", unless
//! `models:` configures it.
//!
//! Clients can send any model id, so the number of learned models is bounded
//! ([`MAX_LEARNED_MODELS`]): a new id takes the place of the least recently used one that
//! nobody waits for or has in flight, and the evictions are counted. A [`ModelRef`] names
//! its place and the generation of that place, so a stale reference finds nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::{
    Admit, ModelLimit, ModelSettings, RetreatController, RetreatSettings, RetreatState, TokenBucket,
};

/// Most model ids learned per route at once.
pub const MAX_LEARNED_MODELS: usize = 64;

/// A reference to one learned model of the limiter, checked against reuse of its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

/// One model's lane on one key.
#[derive(Debug, Clone)]
pub struct RateLane {
    pub bucket: TokenBucket,
    pub controller: RetreatController,
    /// The limit the upstream stated for this model on this key (`rate_rpm: auto`).
    pub stated: Option<f64>,
    /// The key's effective rate as of the last `advance`.
    key_rpm: f64,
    /// This sidecar's share of the lane's rate when the quota is shared with others (1 alone).
    share: f64,
    /// Up to when demand was told to the controller.
    noted: Instant,
}

impl RateLane {
    fn new(key_rpm: f64, retreat: RetreatSettings, now: Instant) -> RateLane {
        RateLane {
            bucket: TokenBucket::new(1, now),
            controller: RetreatController::for_model(key_rpm, retreat, now),
            stated: None,
            key_rpm,
            share: 1.0,
            noted: now,
        }
    }

    /// Whether the lane holds its model back: it runs at a rate of its own (learned, or
    /// stated below its key's), or is paused.
    pub fn limiting(&self, now: Instant) -> bool {
        self.controller.state() != RetreatState::Normal
            || self.controller.is_paused(now)
            || self.stated.is_some_and(|s| s < self.key_rpm)
    }

    /// Brings the lane up to `now`, following its key's rate; `busy` when requests of the
    /// model waited since the last call.
    fn advance(&mut self, now: Instant, key_rpm: f64, busy: bool) {
        let busy = busy || (self.limiting(now) && !self.bucket.has_token());
        if now > self.noted {
            self.controller.note_demand(self.noted, now, busy);
            self.noted = now;
        }
        self.key_rpm = key_rpm;
        self.controller
            .set_base_rpm(self.stated.map_or(key_rpm, |s| s.min(key_rpm)));
        let rate = self.controller.admission_rate_per_sec(now) * self.share;
        if rate == 0.0 {
            self.bucket.hold(now);
        } else {
            self.bucket.refill(now, rate, !busy);
        }
        self.controller.tick(now);
    }

    /// Whether a request of the model may go on this key now: `Some(true)` with a token,
    /// `Some(false)` as the lane's probe.
    pub fn ready(&self, now: Instant) -> Option<bool> {
        if !self.limiting(now) {
            return Some(true);
        }
        match self.controller.admit(now) {
            Admit::Open => self.bucket.has_token().then_some(true),
            Admit::Probe => Some(false),
            Admit::Closed => None,
        }
    }

    /// Takes what `ready` promised; returns the lane's stamp (epoch, probe).
    pub fn take(&mut self, now: Instant) -> (u64, bool) {
        let epoch = self.controller.epoch();
        if !self.limiting(now) {
            return (epoch, false);
        }
        match self.controller.admit(now) {
            Admit::Probe => {
                self.controller.probe_sent(now);
                (epoch, true)
            }
            _ => {
                self.bucket.try_take();
                (epoch, false)
            }
        }
    }

    /// When the lane lets its model go next by itself (`None`: it does not hold it back).
    pub fn next_open_at(&self, now: Instant) -> Option<Instant> {
        if !self.limiting(now) {
            return None;
        }
        if let Some(resume) = self.controller.pause_until().filter(|p| *p > now) {
            return Some(resume);
        }
        if self.controller.is_probing() {
            return self.controller.next_probe_event();
        }
        self.bucket.next_token_at(
            self.controller.admission_rate_per_sec(now) * self.share,
            now,
        )
    }
}

/// A learned model: its lanes (one per key, made on first use) and its concurrency.
#[derive(Debug)]
pub struct LearnedModel {
    pub id: Arc<str>,
    pub lanes: Vec<Option<RateLane>>,
    /// The concurrency learned from capacity errors (for a model `models:` does not limit).
    pub concurrency: ModelLimit,
    /// Requests of this model in the queue.
    pub waiting: u32,
    pub last_used: Instant,
    /// What its requests cost in tokens, learned from its answers.
    pub calibration: super::Calibration,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    model: Option<LearnedModel>,
}

/// The learned models of one route.
#[derive(Debug)]
pub struct ModelLanes {
    slots: Vec<Slot>,
    by_id: HashMap<Arc<str>, u32>,
    keys: usize,
    max: usize,
    /// Models dropped to make room for new ones.
    pub evicted: u64,
}

impl ModelLanes {
    pub fn new(keys: usize) -> ModelLanes {
        ModelLanes::with_max(keys, MAX_LEARNED_MODELS)
    }

    pub fn with_max(keys: usize, max: usize) -> ModelLanes {
        ModelLanes {
            slots: Vec::new(),
            by_id: HashMap::new(),
            keys,
            max: max.max(1),
            evicted: 0,
        }
    }

    /// The model named `id`, learned from now on if it is new. `None` when every place is
    /// taken by a model in use: the request then goes by its key's rate alone.
    pub fn intern(&mut self, id: &Arc<str>, now: Instant) -> Option<ModelRef> {
        if let Some(&slot) = self.by_id.get(id) {
            let s = &mut self.slots[slot as usize];
            let model = s.model.as_mut().expect("an indexed slot holds its model");
            model.last_used = now;
            return Some(ModelRef {
                slot,
                generation: s.generation,
            });
        }
        let slot = match self.slots.iter().position(|s| s.model.is_none()) {
            Some(free) => free,
            None if self.slots.len() < self.max => {
                self.slots.push(Slot {
                    generation: 0,
                    model: None,
                });
                self.slots.len() - 1
            }
            None => self.evict()?,
        };
        let s = &mut self.slots[slot];
        s.generation = s.generation.wrapping_add(1);
        s.model = Some(LearnedModel {
            id: id.clone(),
            lanes: (0..self.keys).map(|_| None).collect(),
            concurrency: ModelLimit::new(
                ModelSettings {
                    pattern: id.to_string(),
                    rate_rpm: None,
                    max_concurrency: None,
                    tpm: None,
                },
                now,
            ),
            waiting: 0,
            last_used: now,
            calibration: super::Calibration::default(),
        });
        let slot = u32::try_from(slot).expect("at most MAX_LEARNED_MODELS slots");
        self.by_id.insert(id.clone(), slot);
        Some(ModelRef {
            slot,
            generation: self.slots[slot as usize].generation,
        })
    }

    /// Frees the place of the least recently used model nobody waits for or has in flight.
    fn evict(&mut self) -> Option<usize> {
        let (slot, _) = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.model.as_ref().map(|m| (i, m)))
            .filter(|(_, m)| m.waiting == 0 && m.concurrency.in_flight == 0)
            .min_by_key(|(_, m)| m.last_used)?;
        let model = self.slots[slot].model.take().expect("filtered on Some");
        self.by_id.remove(&model.id);
        self.evicted += 1;
        Some(slot)
    }

    pub fn get(&self, model: ModelRef) -> Option<&LearnedModel> {
        let s = self.slots.get(model.slot as usize)?;
        s.model
            .as_ref()
            .filter(|_| s.generation == model.generation)
    }

    pub fn get_mut(&mut self, model: ModelRef) -> Option<&mut LearnedModel> {
        let s = self.slots.get_mut(model.slot as usize)?;
        if s.generation != model.generation {
            return None;
        }
        s.model.as_mut()
    }

    /// The lane of `model` on key `key`, made now if the model has none there yet.
    pub fn lane_mut(
        &mut self,
        model: ModelRef,
        key: usize,
        key_rpm: f64,
        retreat: &RetreatSettings,
        now: Instant,
    ) -> Option<&mut RateLane> {
        let m = self.get_mut(model)?;
        let lane = m.lanes.get_mut(key)?;
        Some(lane.get_or_insert_with(|| RateLane::new(key_rpm, retreat.clone(), now)))
    }

    /// The lane of `model` on key `key`, if it has one.
    pub fn lane(&self, model: ModelRef, key: usize) -> Option<&RateLane> {
        self.get(model)?.lanes.get(key)?.as_ref()
    }

    /// Whether `model` may go on key `key` now (see `RateLane::ready`).
    pub fn ready(&self, model: Option<ModelRef>, key: usize, now: Instant) -> Option<bool> {
        match model.and_then(|m| self.lane(m, key)) {
            Some(lane) => lane.ready(now),
            None => Some(true),
        }
    }

    /// Brings every lane up to `now`; `key_rpm` gives each key's effective rate.
    pub fn advance(&mut self, now: Instant, key_rpm: impl Fn(usize) -> f64) {
        for model in self.slots.iter_mut().filter_map(|s| s.model.as_mut()) {
            let busy = model.waiting > 0;
            for (key, lane) in model.lanes.iter_mut().enumerate() {
                if let Some(lane) = lane {
                    lane.advance(now, key_rpm(key), busy);
                }
            }
        }
    }

    /// Whether any model may be held back now: a lane runs at a rate of its own or is
    /// paused, or a concurrency was learned.
    pub fn any_limiting(&self, now: Instant) -> bool {
        self.models().any(|m| {
            m.concurrency.concurrency_limit().is_some()
                || m.lanes.iter().flatten().any(|l| l.limiting(now))
        })
    }

    pub fn models(&self) -> impl Iterator<Item = &LearnedModel> {
        self.slots.iter().filter_map(|s| s.model.as_ref())
    }

    /// The learned model named `id`, if there is one.
    pub fn find(&self, id: &str) -> Option<ModelRef> {
        let slot = *self.by_id.get(id)?;
        Some(ModelRef {
            slot,
            generation: self.slots[slot as usize].generation,
        })
    }

    /// A waiter of `model` joined (`true`) or left the queue.
    pub fn waiting(&mut self, model: Option<ModelRef>, joined: bool) {
        if let Some(m) = model.and_then(|m| self.get_mut(m)) {
            if joined {
                m.waiting += 1;
            } else {
                m.waiting = m.waiting.saturating_sub(1);
            }
        }
    }

    /// How many models are learned now.
    pub fn count(&self) -> usize {
        self.by_id.len()
    }

    /// Takes over a new number of keys (lanes of keys that are gone are dropped).
    pub fn set_keys(&mut self, keys: usize) {
        self.keys = keys;
        for model in self.slots.iter_mut().filter_map(|s| s.model.as_mut()) {
            model.lanes.resize_with(keys, || None);
        }
    }

    /// This sidecar's share of every model lane's rate on key `key` (the quota is shared by
    /// `1 / share` sidecars); the lanes then see only part of the traffic.
    pub fn set_share(&mut self, key: usize, share: f64) {
        for model in self.slots.iter_mut().filter_map(|s| s.model.as_mut()) {
            if let Some(Some(lane)) = model.lanes.get_mut(key) {
                lane.share = share;
                lane.controller.set_partial_view(share < 1.0);
            }
        }
    }

    /// Drops every stated limit (`rate_rpm` is no longer `auto`).
    pub fn forget_stated(&mut self) {
        for model in self.slots.iter_mut().filter_map(|s| s.model.as_mut()) {
            for lane in model.lanes.iter_mut().flatten() {
                lane.stated = None;
            }
        }
    }

    /// Applies new controller settings to every lane.
    pub fn set_retreat_settings(&mut self, settings: &RetreatSettings) {
        for model in self.slots.iter_mut().filter_map(|s| s.model.as_mut()) {
            for lane in model.lanes.iter_mut().flatten() {
                lane.controller.set_settings(settings.clone());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn models_in_use_are_never_evicted_and_the_least_recently_used_one_goes_first() {
        let t0 = Instant::now();
        let mut lanes = ModelLanes::with_max(1, 2);
        let a = lanes.intern(&Arc::from("a"), t0).unwrap();
        let b = lanes
            .intern(&Arc::from("b"), t0 + Duration::from_secs(1))
            .unwrap();
        lanes.waiting(Some(a), true);
        // "a" is waited for: "b" makes room for "c" although "a" is older.
        let c = lanes
            .intern(&Arc::from("c"), t0 + Duration::from_secs(2))
            .unwrap();
        assert_eq!(lanes.evicted, 1);
        assert!(lanes.get(b).is_none(), "b's reference is stale now");
        assert_eq!(lanes.get(c).unwrap().id.as_ref(), "c");
        assert_eq!(lanes.find("a"), Some(a));
        // Both in use: a new id gets no lane.
        lanes.waiting(Some(c), true);
        assert_eq!(
            lanes.intern(&Arc::from("d"), t0 + Duration::from_secs(3)),
            None
        );
        lanes.waiting(Some(a), false);
        let d = lanes
            .intern(&Arc::from("d"), t0 + Duration::from_secs(4))
            .unwrap();
        assert!(lanes.get(a).is_none());
        assert_eq!(lanes.count(), 2);
        assert_eq!(lanes.find("d"), Some(d));
    }
}
