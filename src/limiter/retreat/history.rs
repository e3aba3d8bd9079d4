//! What a controller remembers of its recent past: the upstream's answers, and the time in
//! which demand waited for it ("busy" time: requests queued for the lane, or its last token
//! had just been used).
//!
//! Only busy time says anything about the upstream's ceiling. A window in which requests
//! waited shows what the upstream lets through when asked for more; a window that was mostly
//! idle shows only what the clients asked for. So a window teaches a ceiling only when it was
//! busy nearly all along (`BUSY_SHARE`), and a rate counts as proven only after a whole busy
//! window ran at it without a 429.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most answers kept; older ones fall out even inside the window.
const MAX_SAMPLES: usize = 65_536;

/// Most busy intervals kept (they are merged, so this is only reached by a lane whose demand
/// comes and goes thousands of times a window).
const MAX_INTERVALS: usize = 4096;

/// Share of a window that must have been busy for the window to teach anything.
pub const BUSY_SHARE: f64 = 0.9;

#[derive(Debug, Clone)]
pub struct History {
    window: Duration,
    /// Since when answers and demand have been recorded.
    started: Instant,
    /// (time, was a rate-limit 429) of recent answers.
    samples: VecDeque<(Instant, bool)>,
    /// Intervals in which demand waited, oldest first, never overlapping.
    busy: VecDeque<(Instant, Instant)>,
}

impl History {
    pub fn new(window: Duration, now: Instant) -> History {
        History {
            window,
            started: now,
            samples: VecDeque::new(),
            busy: VecDeque::new(),
        }
    }

    pub fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// Forgets everything before `now` (a reset of what was learned).
    pub fn clear(&mut self, now: Instant) {
        *self = History::new(self.window, now);
    }

    pub fn record(&mut self, at: Instant, rate_limited: bool) {
        self.samples.push_back((at, rate_limited));
        if self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.prune(at);
    }

    /// Demand waited from `from` to `to`.
    pub fn busy(&mut self, from: Instant, to: Instant) {
        if to <= from {
            return;
        }
        match self.busy.back_mut() {
            Some((_, end)) if *end >= from => *end = (*end).max(to),
            _ => {
                self.busy.push_back((from, to));
                if self.busy.len() > MAX_INTERVALS {
                    self.busy.pop_front();
                }
            }
        }
        self.prune(from);
    }

    /// Keeps two windows, so that a window ending a little in the past can still be judged.
    fn prune(&mut self, now: Instant) {
        let Some(keep_from) = now.checked_sub(self.window * 2) else {
            return;
        };
        while self.samples.front().is_some_and(|(t, _)| *t < keep_from) {
            self.samples.pop_front();
        }
        while self.busy.front().is_some_and(|(_, end)| *end < keep_from) {
            self.busy.pop_front();
        }
    }

    /// Busy time within `[from, to]`.
    pub fn busy_between(&self, from: Instant, to: Instant) -> Duration {
        self.busy
            .iter()
            .map(|(a, b)| {
                let start = (*a).max(from);
                let end = (*b).min(to);
                end.saturating_duration_since(start)
            })
            .sum()
    }

    /// Whether the whole window that ends at `end` was observed and busy nearly all along.
    pub fn busy_window(&self, end: Instant) -> bool {
        let window = self.window;
        if window.is_zero() || end.saturating_duration_since(self.started) < window {
            return false;
        }
        let from = end.checked_sub(window).unwrap_or(self.started);
        self.busy_between(from, end).as_secs_f64() >= BUSY_SHARE * window.as_secs_f64()
    }

    /// Requests per minute the upstream accepted over the window that ends at `end`.
    pub fn accepted_rpm(&self, end: Instant) -> f64 {
        let window = self.window.as_secs_f64();
        if window <= 0.0 {
            return 0.0;
        }
        let accepted = self
            .samples
            .iter()
            .filter(|(t, limited)| {
                !limited && *t <= end && end.saturating_duration_since(*t) <= self.window
            })
            .count();
        accepted as f64 * 60.0 / window
    }

    /// Requests per minute sent (answered either way) per busy minute of the window ending
    /// at `end`: the pace at which the lane's demand was served when it waited. `None` with
    /// less than `min_busy` of busy time to measure it over.
    pub fn sent_rpm(&self, end: Instant, min_busy: Duration) -> Option<f64> {
        let from = end.checked_sub(self.window).unwrap_or(self.started);
        let busy = self.busy_between(from, end);
        if busy < min_busy || busy.is_zero() {
            return None;
        }
        let sent = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= from && *t <= end)
            .count();
        Some(sent as f64 * 60.0 / busy.as_secs_f64())
    }

    /// When the last answer came.
    pub fn last_answer(&self) -> Option<Instant> {
        self.samples.back().map(|(t, _)| *t)
    }

    /// Share of rate-limit 429s among the answers of the window ending at `now`.
    pub fn limited_ratio(&self, now: Instant) -> f64 {
        let (total, limited) = self
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= self.window)
            .fold((0usize, 0usize), |(n, l), (_, limited)| {
                (n + 1, l + usize::from(*limited))
            });
        if total == 0 {
            0.0
        } else {
            limited as f64 / total as f64
        }
    }

    /// When the oldest request accepted within the window ending at `now` leaves it: an
    /// upstream whose window is no longer than ours has room again by then.
    pub fn window_frees_at(&self, now: Instant) -> Option<Instant> {
        self.samples
            .iter()
            .find(|(t, limited)| !limited && now.saturating_duration_since(*t) < self.window)
            .map(|(t, _)| *t + self.window)
            .filter(|at| *at > now)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_window_is_busy_only_when_demand_waited_nearly_all_along() {
        let t0 = Instant::now();
        let mut h = History::new(secs(60), t0);
        h.busy(t0, t0 + secs(50));
        assert!(!h.busy_window(t0 + secs(50)), "not a whole window yet");
        assert!(!h.busy_window(t0 + secs(60)), "50 of 60 s busy");
        h.busy(t0 + secs(50), t0 + secs(55));
        assert!(h.busy_window(t0 + secs(60)), "55 of 60 s busy");
        // Merged, not stacked.
        assert_eq!(h.busy.len(), 1);
        assert!(!h.busy_window(t0 + secs(100)), "idle since 55 s");
    }

    #[test]
    fn the_sent_rate_counts_busy_time_only() {
        let t0 = Instant::now();
        let mut h = History::new(secs(60), t0);
        // 40 s idle, then 20 answers in 20 busy seconds.
        h.busy(t0 + secs(40), t0 + secs(60));
        for i in 0..20 {
            h.record(t0 + secs(40 + i), false);
        }
        assert_eq!(h.sent_rpm(t0 + secs(60), secs(5)), Some(60.0));
        assert_eq!(h.accepted_rpm(t0 + secs(60)), 20.0);
        assert_eq!(h.sent_rpm(t0 + secs(60), secs(30)), None);
    }

    #[test]
    fn the_window_frees_when_its_oldest_accepted_request_leaves() {
        let t0 = Instant::now();
        let mut h = History::new(secs(60), t0);
        h.record(t0 + secs(5), true);
        h.record(t0 + secs(7), false);
        h.record(t0 + secs(9), false);
        assert_eq!(h.window_frees_at(t0 + secs(10)), Some(t0 + secs(67)));
        assert_eq!(h.window_frees_at(t0 + secs(68)), Some(t0 + secs(69)));
        assert_eq!(h.window_frees_at(t0 + secs(70)), None);
    }
}
