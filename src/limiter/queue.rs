//! The admission queue: who waits for a token, and who is next.
//!
//! Order is strict by priority class; within a class clients take turns (round-robin), and each
//! client's own requests are served first come, first served. Removal is lazy: a cancelled or
//! expired waiter leaves a stale id in its client's line that is skipped when reached, so every
//! operation stays O(log n) even with thousands of waiters. Stale entries never outlive the
//! waiters by much: a class whose waiters are all gone is emptied, and one whose stale entries
//! outnumber its live ones is compacted, so memory returns when waiters leave even while no
//! token is granted.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// Identifies one waiting request for as long as it waits.
pub type WaiterId = u64;

/// Priority class of a request (`X-Priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Low = 0,
    Normal = 1,
    High = 2,
}

impl Priority {
    /// Every class, highest first: the order in which the queue serves them.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(()),
        }
    }
}

/// What the queue knows about a waiting request.
#[derive(Debug, Clone)]
pub struct Waiter {
    pub client: Arc<str>,
    pub priority: Priority,
    /// When the waiter gives up (429 `queue_timeout`).
    pub deadline: Instant,
    pub enqueued: Instant,
}

/// One priority class: clients in turn order, each with its own line.
#[derive(Debug, Default)]
struct ClassQueue {
    turns: VecDeque<Arc<str>>,
    lines: HashMap<Arc<str>, VecDeque<WaiterId>>,
    live: usize,
}

impl ClassQueue {
    /// Drops stale ids and the clients left without waiters. Called when they outnumber the
    /// live waiters, so its cost is spread over the removals that made them stale.
    fn compact(&mut self, is_live: impl Fn(WaiterId) -> bool) {
        if self.live == 0 {
            // Fresh containers: `clear` would keep the allocations of the busiest moment.
            *self = ClassQueue::default();
            return;
        }
        self.lines.retain(|_, line| {
            line.retain(|id| is_live(*id));
            !line.is_empty()
        });
        let lines = &self.lines;
        self.turns.retain(|client| lines.contains_key(client));
        self.lines.shrink_to_fit();
        self.turns.shrink_to_fit();
    }

    /// Whether stale entries are worth clearing out.
    fn mostly_stale(&self) -> bool {
        self.live == 0 && !self.turns.is_empty() || self.turns.len() > 2 * self.live + 64
    }

    fn push(&mut self, client: &Arc<str>, id: WaiterId, at_front: bool) {
        match self.lines.get_mut(client) {
            Some(line) if at_front => {
                line.push_front(id);
                if let Some(pos) = self.turns.iter().position(|c| c == client) {
                    self.turns.remove(pos);
                }
                self.turns.push_front(client.clone());
            }
            Some(line) => line.push_back(id),
            None => {
                self.lines.insert(client.clone(), VecDeque::from([id]));
                if at_front {
                    self.turns.push_front(client.clone());
                } else {
                    self.turns.push_back(client.clone());
                }
            }
        }
        self.live += 1;
    }

    /// The next live waiter in turn order; `is_live` filters out stale ids.
    fn pop(&mut self, is_live: impl Fn(WaiterId) -> bool) -> Option<WaiterId> {
        while let Some(client) = self.turns.pop_front() {
            let line = self
                .lines
                .get_mut(&client)
                .expect("every client in turn order has a line");
            let mut found = None;
            while let Some(id) = line.pop_front() {
                if is_live(id) {
                    found = Some(id);
                    break;
                }
            }
            if line.is_empty() {
                self.lines.remove(&client);
            } else {
                self.turns.push_back(client);
            }
            if found.is_some() {
                self.live -= 1;
                return found;
            }
        }
        None
    }
}

/// The bounded set of requests waiting for a token.
#[derive(Debug, Default)]
pub struct AdmissionQueue {
    /// Indexed by `Priority as usize`.
    classes: [ClassQueue; 3],
    waiters: HashMap<WaiterId, Waiter>,
    deadlines: BTreeSet<(Instant, WaiterId)>,
}

impl AdmissionQueue {
    pub fn new() -> Self {
        AdmissionQueue::default()
    }

    /// Adds a waiter behind the others of its client.
    pub fn push_back(&mut self, id: WaiterId, waiter: Waiter) {
        self.insert(id, waiter, false);
    }

    /// Adds a waiter ahead of everyone in its class (a request coming back for a replay).
    pub fn push_front(&mut self, id: WaiterId, waiter: Waiter) {
        self.insert(id, waiter, true);
    }

    fn insert(&mut self, id: WaiterId, waiter: Waiter, at_front: bool) {
        self.classes[waiter.priority as usize].push(&waiter.client, id, at_front);
        self.deadlines.insert((waiter.deadline, id));
        self.waiters.insert(id, waiter);
    }

    /// Takes the next waiter to serve: highest class first, clients in turn.
    pub fn pop_next(&mut self) -> Option<(WaiterId, Waiter)> {
        for priority in Priority::ALL {
            let waiters = &self.waiters;
            if let Some(id) = self.classes[priority as usize].pop(|id| waiters.contains_key(&id)) {
                let waiter = self
                    .waiters
                    .remove(&id)
                    .expect("pop returns live waiters only");
                self.deadlines.remove(&(waiter.deadline, id));
                return Some((id, waiter));
            }
        }
        None
    }

    /// Removes a waiter (cancelled or expired); `None` if it no longer waits.
    pub fn remove(&mut self, id: WaiterId) -> Option<Waiter> {
        let waiter = self.waiters.remove(&id)?;
        self.deadlines.remove(&(waiter.deadline, id));
        let class = &mut self.classes[waiter.priority as usize];
        class.live -= 1;
        if class.mostly_stale() {
            let waiters = &self.waiters;
            class.compact(|id| waiters.contains_key(&id));
        }
        if self.waiters.is_empty() && self.waiters.capacity() > 1024 {
            self.waiters = HashMap::new();
        }
        Some(waiter)
    }

    /// Entries kept for clients in turn order, live or stale (for tests of memory use).
    pub fn turn_entries(&self) -> usize {
        self.classes.iter().map(|c| c.turns.len()).sum()
    }

    /// Removes and returns every waiter whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(WaiterId, Waiter)> {
        let mut expired = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            let waiter = self
                .remove(id)
                .expect("deadline entries belong to live waiters");
            expired.push((id, waiter));
        }
        expired
    }

    /// The earliest deadline of anyone waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// Waiters of `priority` or higher: the ones a new request of that class would queue behind.
    pub fn waiting_at_or_above(&self, priority: Priority) -> usize {
        Priority::ALL
            .iter()
            .filter(|p| **p >= priority)
            .map(|p| self.classes[*p as usize].live)
            .sum()
    }

    pub fn depth(&self, priority: Priority) -> usize {
        self.classes[priority as usize].live
    }

    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    pub fn contains(&self, id: WaiterId) -> bool {
        self.waiters.contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn waiter(client: &str, priority: Priority, t0: Instant, timeout_s: u64) -> Waiter {
        Waiter {
            client: Arc::from(client),
            priority,
            deadline: t0 + Duration::from_secs(timeout_s),
            enqueued: t0,
        }
    }

    #[test]
    fn strict_priority_then_fifo() {
        let t0 = Instant::now();
        let mut q = AdmissionQueue::new();
        q.push_back(1, waiter("a", Priority::Low, t0, 10));
        q.push_back(2, waiter("a", Priority::Normal, t0, 10));
        q.push_back(3, waiter("a", Priority::High, t0, 10));
        q.push_back(4, waiter("a", Priority::Normal, t0, 10));
        let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(id, _)| id)).collect();
        assert_eq!(order, vec![3, 2, 4, 1]);
    }

    #[test]
    fn a_single_request_is_served_within_two_grants_beside_a_greedy_client() {
        let t0 = Instant::now();
        let mut q = AdmissionQueue::new();
        for id in 0..50 {
            q.push_back(id, waiter("greedy", Priority::Normal, t0, 10));
        }
        q.push_back(100, waiter("polite", Priority::Normal, t0, 10));
        let first_two: Vec<_> = (0..2).map(|_| q.pop_next().unwrap().0).collect();
        assert!(first_two.contains(&100), "served: {first_two:?}");
        assert_eq!(q.len(), 49);
    }

    #[test]
    fn clients_take_turns() {
        let t0 = Instant::now();
        let mut q = AdmissionQueue::new();
        for id in 0..3 {
            q.push_back(id, waiter("a", Priority::Normal, t0, 10));
            q.push_back(10 + id, waiter("b", Priority::Normal, t0, 10));
        }
        let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(id, _)| id)).collect();
        assert_eq!(order, vec![0, 10, 1, 11, 2, 12]);
    }

    #[test]
    fn removed_and_expired_waiters_are_skipped() {
        let t0 = Instant::now();
        let mut q = AdmissionQueue::new();
        q.push_back(1, waiter("a", Priority::Normal, t0, 5));
        q.push_back(2, waiter("a", Priority::Normal, t0, 1));
        q.push_back(3, waiter("a", Priority::Normal, t0, 5));
        assert!(q.remove(1).is_some());
        assert!(q.remove(1).is_none());
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let expired = q.expire(t0 + Duration::from_secs(1));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, 2);
        assert_eq!(q.depth(Priority::Normal), 1);
        assert_eq!(q.pop_next().unwrap().0, 3);
        assert!(q.pop_next().is_none());
        assert!(q.is_empty());
    }

    #[test]
    fn push_front_goes_ahead_of_its_class_only() {
        let t0 = Instant::now();
        let mut q = AdmissionQueue::new();
        q.push_back(1, waiter("a", Priority::High, t0, 5));
        q.push_back(2, waiter("b", Priority::Normal, t0, 5));
        q.push_front(3, waiter("c", Priority::Normal, t0, 5));
        let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(id, _)| id)).collect();
        assert_eq!(order, vec![1, 3, 2]);
        assert_eq!(q.waiting_at_or_above(Priority::Low), 0);
    }

    #[test]
    fn priorities_parse_leniently() {
        assert_eq!("HIGH".parse(), Ok(Priority::High));
        assert_eq!(" low ".parse(), Ok(Priority::Low));
        assert!("urgent".parse::<Priority>().is_err());
    }
}
