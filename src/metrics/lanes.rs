//! The learning of every lane as gauges: a key's own lane (`model=""`) and each learned
//! model's lane on a key. Model ids come from clients, so their series are bounded by the
//! limiter's bound on learned models, and a model's series leave with it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Registry};

use super::{opts, register};
use crate::limiter::{Learning, LimiterSnapshot, RetreatState};

pub struct LaneGauges {
    state: IntGaugeVec,
    rate: GaugeVec,
    ceiling: GaugeVec,
    next_step: GaugeVec,
    last_429: GaugeVec,
    learned: IntGaugeVec,
    evicted: IntCounterVec,
    /// The (key, model) series exported last, per route, so that those of a model that is
    /// gone are removed.
    exported: Mutex<HashMap<String, HashSet<(String, String)>>>,
}

impl LaneGauges {
    pub fn new(r: &Registry) -> LaneGauges {
        let lane = |name: &str, help: &str| {
            register(
                r,
                GaugeVec::new(opts(name, help), &["route", "key", "model"]),
            )
        };
        LaneGauges {
            state: register(
                r,
                IntGaugeVec::new(
                    opts(
                        "lane_state",
                        "State of each lane: 0 normal, 1 retreat, 2 recover. model=\"\" is the key's own lane.",
                    ),
                    &["route", "key", "model"],
                ),
            ),
            rate: lane(
                "lane_rate_rpm",
                "The rate each lane lets through now, requests per minute (a model's at most its key's).",
            ),
            ceiling: lane(
                "lane_ceiling_rpm",
                "The rate each lane's recovery climbs to (absent while nothing is learned).",
            ),
            next_step: lane(
                "lane_next_step_seconds",
                "Seconds until each lane's rate goes up by itself (absent when it will not).",
            ),
            last_429: lane(
                "lane_last_429_timestamp_seconds",
                "Unix time of each lane's last upstream 429 (absent before the first).",
            ),
            learned: register(
                r,
                IntGaugeVec::new(
                    opts("learned_models", "Models learned without configuration."),
                    &["route"],
                ),
            ),
            evicted: register(
                r,
                IntCounterVec::new(
                    opts(
                        "learned_models_evicted_total",
                        "Learned models dropped to make room for new ones.",
                    ),
                    &["route"],
                ),
            ),
            exported: Mutex::new(HashMap::new()),
        }
    }

    /// Sets the series of route `route` from its limiter's snapshot.
    pub fn export(&self, route: &str, s: &LimiterSnapshot) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut seen = HashSet::new();
        for key in &s.keys {
            let name = key.name.to_string();
            self.lane(
                route,
                &name,
                "",
                key.state,
                key.effective_rpm,
                &key.learning,
                now,
            );
            seen.insert((name.clone(), String::new()));
            for m in &key.models {
                self.lane(
                    route,
                    &name,
                    &m.model,
                    m.state,
                    m.effective_rpm,
                    &m.learning,
                    now,
                );
                seen.insert((name.clone(), m.model.to_string()));
            }
        }
        let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        let before = exported.insert(route.to_string(), seen.clone());
        for (key, model) in before.unwrap_or_default().difference(&seen) {
            let labels = [route, key.as_str(), model.as_str()];
            let _ = self.state.remove_label_values(&labels);
            for g in [&self.rate, &self.ceiling, &self.next_step, &self.last_429] {
                let _ = g.remove_label_values(&labels);
            }
        }
        self.learned
            .with_label_values(&[route])
            .set(i64::try_from(s.learned.len()).unwrap_or(i64::MAX));
        let evicted = self.evicted.with_label_values(&[route]);
        evicted.inc_by(s.learned_evicted.saturating_sub(evicted.get()));
    }

    #[allow(clippy::too_many_arguments)]
    fn lane(
        &self,
        route: &str,
        key: &str,
        model: &str,
        state: RetreatState,
        rate: f64,
        learning: &Learning,
        now: f64,
    ) {
        let labels = [route, key, model];
        self.state.with_label_values(&labels).set(state.as_gauge());
        self.rate.with_label_values(&labels).set(rate);
        let optional = |g: &GaugeVec, value: Option<f64>| match value {
            Some(v) => g.with_label_values(&labels).set(v),
            None => {
                let _ = g.remove_label_values(&labels);
            }
        };
        optional(&self.ceiling, learning.ceiling_rpm);
        optional(
            &self.next_step,
            learning.next_step_in.map(|d| d.as_secs_f64()),
        );
        optional(
            &self.last_429,
            learning.last_429_ago.map(|ago| now - ago.as_secs_f64()),
        );
    }
}
