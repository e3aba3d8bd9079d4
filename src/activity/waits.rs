//! Queue waits of granted requests over the last seconds, as a log-scaled histogram per
//! second: fixed memory, no allocation per request, quantiles within about 9 %.
//!
//! A request at NVIDIA's 40 per minute gets its token every second and a half, so one second
//! alone mostly holds no wait at all; the quantiles are taken over `WAIT_WINDOW_SECONDS`.

use std::time::Duration;

use serde::Serialize;

/// Seconds the quantiles look back over.
pub const WAIT_WINDOW_SECONDS: u64 = 10;

/// Buckets per doubling of the wait: each bucket spans a factor of 2^(1/4) ≈ 1.19.
const PER_DOUBLING: f64 = 4.0;

/// Bucket 0 holds waits under 1 ms; bucket `i ≥ 1` holds `[2^((i-1)/4), 2^(i/4))` ms; the last
/// one is open-ended (from 2^20 ms, about 17 minutes, far beyond any request timeout).
const BUCKETS: usize = 1 + 20 * PER_DOUBLING as usize;

/// The histogram of one second.
#[derive(Debug, Clone, Copy)]
struct Second {
    at: u64,
    counts: [u32; BUCKETS],
}

/// Quantiles of the queue wait over the window; `null` when no request was granted in it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WaitQuantiles {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Granted requests in the window.
    pub count: u64,
}

/// The last `WAIT_WINDOW_SECONDS` of queue waits.
pub struct WaitWindow {
    seconds: [Second; WAIT_WINDOW_SECONDS as usize],
}

impl Default for WaitWindow {
    fn default() -> Self {
        WaitWindow::new()
    }
}

impl WaitWindow {
    pub fn new() -> Self {
        WaitWindow {
            seconds: [Second {
                at: 0,
                counts: [0; BUCKETS],
            }; WAIT_WINDOW_SECONDS as usize],
        }
    }

    /// A request waited `wait` and got its token in second `at`.
    pub fn record(&mut self, wait: Duration, at: u64) {
        let slot = &mut self.seconds[(at % WAIT_WINDOW_SECONDS) as usize];
        if slot.at != at {
            *slot = Second {
                at,
                counts: [0; BUCKETS],
            };
        }
        let bucket = bucket_of(wait.as_secs_f64() * 1000.0);
        slot.counts[bucket] = slot.counts[bucket].saturating_add(1);
    }

    /// The p50 and p99 over the seconds in `(now - WAIT_WINDOW_SECONDS, now]`.
    pub fn quantiles(&self, now: u64) -> WaitQuantiles {
        let mut merged = [0u64; BUCKETS];
        for s in &self.seconds {
            if s.at <= now && s.at + WAIT_WINDOW_SECONDS > now {
                for (m, c) in merged.iter_mut().zip(s.counts) {
                    *m += u64::from(c);
                }
            }
        }
        let count: u64 = merged.iter().sum();
        let quantile = |q: f64| -> Option<f64> {
            if count == 0 {
                return None;
            }
            // The smallest wait with at least q of the waits at or below it.
            let rank = ((q * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            merged.iter().enumerate().find_map(|(bucket, c)| {
                seen += c;
                (seen >= rank).then(|| representative(bucket))
            })
        };
        WaitQuantiles {
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
            count,
        }
    }
}

fn bucket_of(ms: f64) -> usize {
    if ms.is_nan() || ms < 1.0 {
        return 0;
    }
    let bucket = 1 + (ms.log2() * PER_DOUBLING).floor() as usize;
    bucket.min(BUCKETS - 1)
}

/// The wait a bucket stands for: 0 for the first, else the geometric middle of its bounds,
/// rounded to a hundredth of a millisecond.
fn representative(bucket: usize) -> f64 {
    if bucket == 0 {
        return 0.0;
    }
    let ms = 2f64.powf((bucket as f64 - 0.5) / PER_DOUBLING);
    (ms * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn near(value: Option<f64>, expected: f64) -> bool {
        value.is_some_and(|v| (v - expected).abs() <= expected * 0.1)
    }

    #[test]
    fn quantiles_are_within_ten_percent() {
        let mut window = WaitWindow::new();
        // 98 short waits, two long ones: the median is short, the p99 long.
        for i in 0..98 {
            window.record(ms(200 + i % 3), 5);
        }
        window.record(ms(9_000), 5);
        window.record(ms(9_000), 6);
        let q = window.quantiles(6);
        assert_eq!(q.count, 100);
        assert!(near(q.p50_ms, 200.0), "{q:?}");
        assert!(near(q.p99_ms, 9_000.0), "{q:?}");
        for wait in [1, 3, 17, 250, 1_234, 60_000, 299_000] {
            let mut w = WaitWindow::new();
            w.record(ms(wait), 0);
            assert!(near(w.quantiles(0).p50_ms, wait as f64), "{wait} ms");
        }
        let mut w = WaitWindow::new();
        w.record(Duration::from_micros(300), 0);
        assert_eq!(w.quantiles(0).p50_ms, Some(0.0));
        w.record(Duration::from_secs(100_000), 0);
        assert!(w.quantiles(0).p99_ms.is_some_and(|v| v > 900_000.0));
    }

    #[test]
    fn the_window_forgets_old_seconds_and_reuses_their_slots() {
        let mut window = WaitWindow::new();
        window.record(ms(50), 3);
        assert_eq!(window.quantiles(12).count, 1);
        assert_eq!(window.quantiles(13).count, 0);
        assert_eq!(window.quantiles(13).p50_ms, None);
        // Second 13 takes the slot of second 3.
        window.record(ms(70), 13);
        window.record(ms(70), 13);
        let q = window.quantiles(13);
        assert_eq!(q.count, 2);
        assert!(near(q.p99_ms, 70.0), "{q:?}");
        // A slot that still holds a second newer than `now` is not counted.
        assert_eq!(window.quantiles(12).count, 0);
    }
}
