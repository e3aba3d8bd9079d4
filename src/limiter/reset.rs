//! Forgetting what was learned, on an operator's word (the admin API's reset): a key's
//! controller, a model's lanes (and its learned concurrency), or everything of a route.

use std::time::Instant;

use super::{Limiter, ModelLimit, ModelSettings};

/// What a reset could not find.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResetError {
    #[error("no upstream key is named {0:?}")]
    NoSuchKey(String),
    #[error("no model {0:?} has been learned")]
    NoSuchModel(String),
}

impl Limiter {
    /// Resets what was learned of `key` (by name) and of `model` (by id): both given, that
    /// model's lane on that key; only a key, the key's own controller; only a model, its lanes
    /// on every key and its concurrency; neither, everything. Returns what was reset.
    pub fn reset_learning(
        &mut self,
        key: Option<&str>,
        model: Option<&str>,
        now: Instant,
    ) -> Result<Vec<String>, ResetError> {
        self.advance(now);
        let keys: Vec<usize> = match key {
            Some(name) => vec![self
                .lanes
                .iter()
                .position(|l| &*l.name == name)
                .ok_or_else(|| ResetError::NoSuchKey(name.to_string()))?],
            None => (0..self.lanes.len()).collect(),
        };
        let models: Vec<_> = match model {
            Some(id) => vec![self
                .learned
                .find(id)
                .ok_or_else(|| ResetError::NoSuchModel(id.to_string()))?],
            None if key.is_none() => self
                .learned
                .models()
                .filter_map(|m| self.learned.find(&m.id))
                .collect(),
            None => Vec::new(),
        };
        let mut done = Vec::new();
        if model.is_none() {
            for &k in &keys {
                let lane = &mut self.lanes[k];
                lane.controller.reset(now);
                lane.blame = None;
                lane.model_charged = None;
                lane.alone = None;
                done.push(format!("key {}", lane.name));
            }
        }
        for m in models {
            let Some(learned) = self.learned.get_mut(m) else {
                continue;
            };
            if key.is_none() {
                let in_flight = learned.concurrency.in_flight;
                learned.concurrency = ModelLimit::new(
                    ModelSettings {
                        pattern: learned.id.to_string(),
                        rate_rpm: None,
                        max_concurrency: None,
                        tpm: None,
                    },
                    now,
                );
                learned.concurrency.in_flight = in_flight;
            }
            for &k in &keys {
                if let Some(Some(lane)) = learned.lanes.get_mut(k) {
                    lane.controller.reset(now);
                    lane.bucket = super::TokenBucket::new(1, now);
                    done.push(format!(
                        "model {} on key {}",
                        learned.id, self.lanes[k].name
                    ));
                }
            }
        }
        self.stalled = false;
        Ok(done)
    }
}
