//! Slots leased from a bucket shared with other instances: each slot is the permission for one
//! request to go at or after its start time, and it lapses a little later. A slot nobody used
//! simply lapses; it is never handed back, so the instances together can only under-use the
//! shared quota, never exceed it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    at: Instant,
    lapses: Instant,
}

/// Leased slots in start order.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    queue: VecDeque<Slot>,
}

impl Slots {
    /// Adds a slot usable from `at` for `grace`.
    pub fn add(&mut self, at: Instant, grace: Duration) {
        let slot = Slot {
            at,
            lapses: at + grace,
        };
        let index = self.queue.partition_point(|s| s.at <= at);
        self.queue.insert(index, slot);
    }

    /// Drops the slots that lapsed unused.
    pub fn prune(&mut self, now: Instant) {
        self.queue.retain(|s| s.lapses > now);
    }

    /// Uses the earliest slot that is open at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        match self
            .queue
            .iter()
            .position(|s| s.at <= now && s.lapses > now)
        {
            Some(index) => {
                self.queue.remove(index);
                true
            }
            None => false,
        }
    }

    /// Slots held that have not lapsed, open or still ahead.
    pub fn held(&self) -> usize {
        self.queue.len()
    }

    /// Slots open at `now`.
    pub fn open(&self, now: Instant) -> usize {
        self.queue
            .iter()
            .filter(|s| s.at <= now && s.lapses > now)
            .count()
    }

    /// When the next slot opens (`now` if one is open already).
    pub fn next_open(&self, now: Instant) -> Option<Instant> {
        self.queue
            .iter()
            .find(|s| s.lapses > now)
            .map(|s| s.at.max(now))
    }

    /// The start of the last slot held.
    pub fn last_start(&self) -> Option<Instant> {
        self.queue.back().map(|s| s.at)
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::*;

    #[test]
    fn a_slot_opens_at_its_time_and_lapses_after_its_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_millis(100);
        let mut slots = Slots::default();
        slots.add(t0 + Duration::from_secs(1), grace);
        assert!(!slots.try_take(t0));
        assert_eq!(slots.next_open(t0), Some(t0 + Duration::from_secs(1)));
        assert!(slots.try_take(t0 + Duration::from_millis(1050)));
        assert_eq!(slots.held(), 0);

        slots.add(t0 + Duration::from_secs(2), grace);
        let late = t0 + Duration::from_millis(2100);
        slots.prune(late);
        assert!(!slots.try_take(late), "a lapsed slot is gone");
        assert_eq!(slots.held(), 0);
    }

    #[test]
    fn slots_are_used_in_start_order_whatever_order_they_came_in() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut slots = Slots::default();
        slots.add(t0 + Duration::from_secs(3), grace);
        slots.add(t0 + Duration::from_secs(1), grace);
        slots.add(t0 + Duration::from_secs(2), grace);
        assert_eq!(slots.last_start(), Some(t0 + Duration::from_secs(3)));
        let at = t0 + Duration::from_millis(2500);
        assert_eq!(slots.open(at), 2);
        assert!(slots.try_take(at));
        assert!(slots.try_take(at));
        assert!(!slots.try_take(at), "the third slot is not open yet");
        assert_eq!(slots.next_open(at), Some(t0 + Duration::from_secs(3)));
    }
}
