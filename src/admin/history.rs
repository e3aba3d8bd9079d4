//! The last five minutes, one sample per second, so that a dashboard shows them the moment it
//! opens: served by `GET /api/dashboard/history` and as the first event of
//! `GET /api/dashboard/stream?history=1`; every later snapshot carries the newest sample.
//!
//! The ring has a fixed capacity and is filled only by the sampler task, once per second;
//! `/status` requests and scrapes read it but never add to it.

use std::collections::VecDeque;

use serde::Serialize;

/// Samples kept: five minutes at one per second.
pub const HISTORY_LEN: usize = 300;

/// One second of the sidecar, as the dashboard charts it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistorySample {
    /// Unix time of the sample, seconds.
    pub t: f64,
    /// The controller's state: `normal`, `retreat` or `recover`.
    pub state: &'static str,
    /// Probing a full window after a 429 (one request at a time, no tokens issued).
    pub probing: bool,
    /// Waiting out the upstream's `Retry-After`.
    pub paused: bool,
    pub effective_rpm: f64,
    pub base_rpm: f64,
    /// Requests waiting for a token.
    pub queue_depth: usize,
    /// Queue wait quantiles of the requests granted over the 10 s before the sample, in
    /// milliseconds; `null` when none was granted.
    pub queue_wait_p50_ms: Option<f64>,
    pub queue_wait_p99_ms: Option<f64>,
    /// Requests finished per second.
    pub requests_per_second: f64,
    /// Tokens granted during this second.
    pub granted: u64,
    /// Upstream 429s during this second.
    pub upstream_429: u64,
    /// 429s the sidecar answered itself during this second.
    pub rejected: u64,
}

/// A ring of the last `HISTORY_LEN` samples, oldest first.
#[derive(Debug)]
pub struct History {
    samples: VecDeque<HistorySample>,
}

/// The body of `GET /api/dashboard/history` and of the stream's `history` event.
#[derive(Debug, Serialize)]
pub struct HistoryView<'a> {
    /// Seconds between samples.
    pub interval_seconds: u64,
    /// Samples kept at most.
    pub capacity: usize,
    /// Oldest first.
    pub samples: &'a VecDeque<HistorySample>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    pub fn new() -> Self {
        History {
            samples: VecDeque::with_capacity(HISTORY_LEN),
        }
    }

    /// Adds the newest sample, dropping the oldest once the ring is full.
    pub fn push(&mut self, sample: HistorySample) {
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn latest(&self) -> Option<&HistorySample> {
        self.samples.back()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn view(&self) -> HistoryView<'_> {
        HistoryView {
            interval_seconds: 1,
            capacity: HISTORY_LEN,
            samples: &self.samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64) -> HistorySample {
        HistorySample {
            t,
            state: "normal",
            probing: false,
            paused: false,
            effective_rpm: 40.0,
            base_rpm: 40.0,
            queue_depth: 0,
            queue_wait_p50_ms: None,
            queue_wait_p99_ms: None,
            requests_per_second: 0.0,
            granted: 0,
            upstream_429: 0,
            rejected: 0,
        }
    }

    #[test]
    fn the_ring_keeps_the_last_five_minutes_in_order_within_its_capacity() {
        let mut history = History::new();
        assert!(history.is_empty() && history.latest().is_none());
        let reserved = history.samples.capacity();
        for t in 0..1000 {
            history.push(sample(f64::from(t)));
            assert!(history.len() <= HISTORY_LEN);
        }
        assert_eq!(history.len(), HISTORY_LEN);
        assert_eq!(history.samples.front().map(|s| s.t), Some(700.0));
        assert_eq!(history.latest().map(|s| s.t), Some(999.0));
        assert!(history
            .samples
            .iter()
            .zip(history.samples.iter().skip(1))
            .all(|(a, b)| b.t == a.t + 1.0));
        // The ring never reallocated past the room it reserved.
        assert_eq!(history.samples.capacity(), reserved);

        let json = serde_json::to_value(history.view()).expect("serialises");
        assert_eq!(json["capacity"], 300);
        assert_eq!(json["interval_seconds"], 1);
        assert_eq!(json["samples"].as_array().map(Vec::len), Some(300));
        assert_eq!(
            json["samples"][0]["queue_wait_p50_ms"],
            serde_json::Value::Null
        );
        assert_eq!(json["samples"][299]["state"], "normal");
    }
}
