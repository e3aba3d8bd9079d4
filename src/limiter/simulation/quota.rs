//! One hidden quota of the simulated upstream: a sliding window, a fixed window or a token
//! bucket, counted on explicit instants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Kind;

/// One hidden quota (the key's, or a model's).
pub struct Quota {
    kind: Kind,
    pub limit: usize,
    window: Duration,
    started: Instant,
    accepted: VecDeque<Instant>,
    tokens: f64,
    refilled: Instant,
}

impl Quota {
    pub fn new(kind: Kind, limit: usize, window: Duration, started: Instant) -> Quota {
        Quota {
            kind,
            limit,
            window,
            started,
            accepted: VecDeque::new(),
            tokens: limit as f64,
            refilled: started,
        }
    }

    fn rate(&self) -> f64 {
        self.limit as f64 / self.window.as_secs_f64()
    }

    /// Whether a request at `at` fits; `Err(wait)` with the time until one would.
    pub fn check(&mut self, at: Instant) -> Result<(), Duration> {
        match self.kind {
            Kind::Sliding => {
                while self
                    .accepted
                    .front()
                    .is_some_and(|t| at.duration_since(*t) >= self.window)
                {
                    self.accepted.pop_front();
                }
                if self.accepted.len() < self.limit {
                    Ok(())
                } else {
                    let oldest = self.accepted[self.accepted.len() - self.limit];
                    Err(self.window - at.duration_since(oldest))
                }
            }
            Kind::Fixed => {
                let w = self.window.as_nanos();
                let index = |t: Instant| t.duration_since(self.started).as_nanos() / w;
                let now = index(at);
                let used = self.accepted.iter().filter(|t| index(**t) == now).count();
                if used < self.limit {
                    Ok(())
                } else {
                    let into = at.duration_since(self.started).as_nanos() % w;
                    Err(Duration::from_nanos((w - into) as u64))
                }
            }
            Kind::Bucket => {
                let earned = at.duration_since(self.refilled).as_secs_f64() * self.rate();
                self.tokens = (self.tokens + earned).min(self.limit as f64);
                self.refilled = at;
                if self.tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate()))
                }
            }
        }
    }

    pub fn take(&mut self, at: Instant) {
        if self.kind == Kind::Bucket {
            self.tokens -= 1.0;
        }
        self.accepted.push_back(at);
        if self.accepted.len() > 10_000 {
            self.accepted.pop_front();
        }
    }
}
