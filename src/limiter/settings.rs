//! What a limiter is configured with, and how a running limiter takes over new settings
//! without losing tokens, waiters or what its controllers learned.

use std::sync::Arc;
use std::time::Instant;

use super::{ClientCap, Limiter, ModelLimit, ModelSettings, RetreatSettings};

/// An upstream key as the limiter knows it: a name and, optionally, a rate of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRate {
    pub name: Arc<str>,
    /// `None` follows the route's rate (`base_rpm`).
    pub rpm: Option<f64>,
    /// Its own token budget; `None` follows the route's (`base_tpm`).
    pub tpm: Option<u64>,
}

/// Everything the limiter is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSettings {
    pub base_rpm: f64,
    /// Tokens per minute of every key without a budget of its own; `None`: no token budget.
    pub base_tpm: Option<u64>,
    pub capacity: u32,
    pub queue_max: usize,
    pub retreat: RetreatSettings,
    /// The key pool; empty means one key, named `default`, at `base_rpm`.
    pub keys: Vec<KeyRate>,
    /// Per-model limits, in the order they are matched.
    pub models: Vec<ModelSettings>,
    /// Per-client rate caps.
    pub client_caps: Vec<ClientCap>,
    /// `rate_rpm: auto`: the upstream's stated limits set the keys' and models' rates.
    pub auto: bool,
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
            base_tpm: None,
            capacity,
            queue_max,
            retreat,
            keys: Vec::new(),
            models: Vec::new(),
            client_caps: Vec::new(),
            auto: false,
        }
    }

    pub(super) fn key_rates(&self) -> Vec<KeyRate> {
        if self.keys.is_empty() {
            vec![KeyRate {
                name: Arc::from("default"),
                rpm: None,
                tpm: None,
            }]
        } else {
            self.keys.clone()
        }
    }
}

impl Limiter {
    /// Sets the route's rate: the rate of every key without a rate of its own.
    /// With `rate_rpm: auto` a key keeps the limit the upstream stated for it.
    pub fn set_base_rpm(&mut self, rpm: f64, now: Instant) {
        self.advance(now);
        let auto = self.auto;
        for lane in self.lanes.iter_mut().filter(|l| l.own_rpm.is_none()) {
            if auto && lane.stated.is_some() {
                continue;
            }
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
        self.auto = settings.auto;
        self.base_tpm = settings.base_tpm;
        if !self.auto {
            for lane in &mut self.lanes {
                lane.stated = None;
            }
            self.learned.forget_stated();
        }
        for (lane, key) in self.lanes.iter_mut().zip(settings.key_rates()) {
            lane.own_rpm = key.rpm;
            lane.own_tpm = key.tpm;
            lane.set_tpm(lane.budget_tpm(settings.base_tpm), now);
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
}
