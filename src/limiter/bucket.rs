//! The token bucket: tokens refill continuously at the effective rate and a grant takes one.
//!
//! The bucket never reads the clock; every call is given `now`.

use std::time::{Duration, Instant};

/// Tolerance for floating-point refill arithmetic: a bucket this close to a whole token has one.
const EPSILON: f64 = 1e-9;

/// A continuously refilling bucket of request tokens.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    capacity: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket holding `capacity` tokens at `now`.
    pub fn new(capacity: u32, now: Instant) -> Self {
        let capacity = f64::from(capacity.max(1));
        TokenBucket {
            tokens: capacity,
            capacity,
            updated: now,
        }
    }

    /// A bucket restored from saved state, clamped to `capacity`. It refills from `now` on,
    /// which may lie in the future (a bucket that must not earn anything before then).
    pub fn with_tokens(capacity: u32, tokens: f64, now: Instant) -> Self {
        let mut bucket = TokenBucket::new(capacity, now);
        bucket.tokens = tokens.clamp(0.0, bucket.capacity);
        bucket
    }

    /// Adds the tokens earned since the last update at `rate_per_sec`.
    ///
    /// `cap` is false while requests wait: a token that became due while a waiter was present
    /// was owed to that waiter at that instant, so a late wake-up must not lose it to the cap.
    pub fn refill(&mut self, now: Instant, rate_per_sec: f64, cap: bool) {
        if now > self.updated {
            let elapsed = (now - self.updated).as_secs_f64();
            self.tokens += elapsed * rate_per_sec.max(0.0);
            self.updated = now;
        }
        if cap {
            self.tokens = self.tokens.min(self.capacity);
        }
    }

    /// Moves the refill clock to `now` without earning anything (used while paused).
    pub fn hold(&mut self, now: Instant) {
        if now > self.updated {
            self.updated = now;
        }
    }

    /// Whether a whole token is there.
    pub fn has_token(&self) -> bool {
        self.tokens + EPSILON >= 1.0
    }

    /// Takes one token if a whole one is there.
    pub fn try_take(&mut self) -> bool {
        if self.tokens + EPSILON >= 1.0 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Gives back a token that was granted but never used (clamped to capacity).
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }

    /// Empties the bucket (an upstream asked us to pause).
    pub fn drain(&mut self) {
        self.tokens = 0.0;
    }

    /// How long until one whole token is there at `rate_per_sec`; `None` if it never will be.
    pub fn time_to_next_token(&self, rate_per_sec: f64) -> Option<Duration> {
        let missing = 1.0 - self.tokens;
        if missing <= EPSILON {
            return Some(Duration::ZERO);
        }
        if rate_per_sec <= 0.0 {
            return None;
        }
        // Round up to the next microsecond so a wake-up never comes a hair too early.
        let micros = (missing / rate_per_sec * 1e6).ceil();
        Some(Duration::from_micros(micros as u64))
    }

    /// When one whole token is there at `rate_per_sec`, counting from `now` or from a later
    /// start of refilling (see `with_tokens`); `None` if it never will be.
    pub fn next_token_at(&self, rate_per_sec: f64, now: Instant) -> Option<Instant> {
        let wait = self.time_to_next_token(rate_per_sec)?;
        Some(self.updated.max(now) + wait)
    }

    /// Changes the burst size without resetting the tokens (clamped to the new capacity).
    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = f64::from(capacity.max(1));
        self.tokens = self.tokens.min(self.capacity);
    }

    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::*;

    #[test]
    fn refills_at_rate_and_caps_at_capacity() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2, t0);
        assert!(bucket.try_take());
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        bucket.refill(t0 + Duration::from_millis(500), 1.0, true);
        assert!((bucket.tokens() - 0.5).abs() < 1e-9);
        assert!(!bucket.try_take());
        bucket.refill(t0 + Duration::from_secs(10), 1.0, true);
        assert_eq!(bucket.tokens(), 2.0);
    }

    #[test]
    fn uncapped_refill_keeps_tokens_owed_to_waiters() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1, t0);
        assert!(bucket.try_take());
        bucket.refill(t0 + Duration::from_millis(1500), 1.0, false);
        assert!((bucket.tokens() - 1.5).abs() < 1e-9);
        assert!(bucket.try_take());
        assert!((bucket.tokens() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn time_to_next_token_is_never_early() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1, t0);
        assert!(bucket.try_take());
        let rate = 40.0 / 60.0;
        let wait = bucket.time_to_next_token(rate).unwrap();
        assert!(wait >= Duration::from_millis(1500));
        assert!(wait <= Duration::from_millis(1501));
        bucket.refill(t0 + wait, rate, false);
        assert!(bucket.try_take());
        assert_eq!(bucket.time_to_next_token(0.0), None);
    }

    #[test]
    fn capacity_change_keeps_tokens_within_bounds() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(5, t0);
        bucket.set_capacity(2);
        assert_eq!(bucket.tokens(), 2.0);
        bucket.set_capacity(10);
        assert_eq!(bucket.tokens(), 2.0);
        bucket.refund();
        assert_eq!(bucket.tokens(), 3.0);
    }
}
