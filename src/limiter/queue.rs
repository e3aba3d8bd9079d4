//! The admission queue: who waits for a token, and who is next.
//!
//! Order is strict by priority class; within a class clients take turns in proportion to their
//! weights (stride scheduling: equal weights make it round-robin), and each client's own
//! requests are served first come, first served. Requests coming back for a replay go ahead
//! of their class. A waiter whose other limits (its model's, its client's) hold it back keeps
//! its place while the ones behind it go. Removal is lazy: a cancelled or
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
    /// The client's share while it waits beside others of its class (1 unless configured).
    pub weight: u32,
    /// The configured model limit the request also needs (an index into `models`).
    pub model: Option<usize>,
    /// The learned model the request asks for.
    pub learned: Option<super::ModelRef>,
    /// What it told of its cost in tokens, and what that comes to.
    pub priced: Option<super::Priced>,
}

impl Waiter {
    /// What it is expected to cost in tokens.
    pub fn cost(&self) -> Option<super::TokenCost> {
        self.priced.map(|p| p.cost)
    }
}

/// The pass a client's waiter advances by when served, for weight 1; a client of weight `w`
/// advances by `STRIDE / w`, so that while both wait it is served `w` times as often.
const STRIDE: u64 = 1 << 20;

/// Most clients whose pass is remembered after their line ran empty.
const LEFT_AT_MAX: usize = 4096;

/// One priority class: replays first, then clients in order of their pass (stride scheduling,
/// a form of weighted fair queueing), each client with its own first-come line.
#[derive(Debug, Default)]
struct ClassQueue {
    /// Waiters coming back for a replay: ahead of everyone in the class.
    front: VecDeque<WaiterId>,
    /// Clients with a line, by (pass, arrival order at that pass).
    order: BTreeSet<(u64, u64, Arc<str>)>,
    lines: HashMap<Arc<str>, ClientLine>,
    /// The pass of the client served last: where a client that starts waiting joins.
    pass: u64,
    /// The pass a client reached when its line ran empty: a client that comes straight back
    /// with its next request (one request at a time) resumes from there, so that its weight
    /// still counts. Entries at or below `pass` say nothing more and are dropped.
    left_at: HashMap<Arc<str>, u64>,
    sequence: u64,
    live: usize,
}

#[derive(Debug)]
struct ClientLine {
    ids: VecDeque<WaiterId>,
    /// This client's key in `order`.
    pass: u64,
    sequence: u64,
}

impl ClassQueue {
    /// Drops stale ids and the clients left without waiters. Called when they outnumber the
    /// live waiters, so its cost is spread over the removals that made them stale.
    fn compact(&mut self, is_live: impl Fn(WaiterId) -> bool) {
        if self.live == 0 {
            // Fresh containers: `clear` would keep the allocations of the busiest moment.
            let pass = self.pass;
            *self = ClassQueue::default();
            self.pass = pass;
            return;
        }
        self.front.retain(|id| is_live(*id));
        let order = &mut self.order;
        self.lines.retain(|client, line| {
            line.ids.retain(|id| is_live(*id));
            if line.ids.is_empty() {
                order.remove(&(line.pass, line.sequence, client.clone()));
            }
            !line.ids.is_empty()
        });
        self.lines.shrink_to_fit();
        self.front.shrink_to_fit();
    }

    /// Entries kept, live or stale.
    fn entries(&self) -> usize {
        self.front.len() + self.lines.values().map(|l| l.ids.len()).sum::<usize>()
    }

    /// Whether stale entries are worth clearing out.
    fn mostly_stale(&self) -> bool {
        self.live == 0 && (!self.lines.is_empty() || !self.front.is_empty())
            || self.lines.len() > 2 * self.live + 64
    }

    fn push(&mut self, client: &Arc<str>, id: WaiterId, at_front: bool) {
        self.live += 1;
        if at_front {
            self.front.push_front(id);
            return;
        }
        if let Some(line) = self.lines.get_mut(client) {
            line.ids.push_back(id);
            return;
        }
        let resume = self.left_at.remove(client).unwrap_or(0);
        let line = ClientLine {
            ids: VecDeque::from([id]),
            pass: self.pass.max(resume),
            sequence: self.next_sequence(),
        };
        self.order
            .insert((line.pass, line.sequence, client.clone()));
        self.lines.insert(client.clone(), line);
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    /// The next live waiter that `ready` accepts: replays first, then the client with the
    /// lowest pass whose line holds one (the first such in its line). A waiter `ready` turns
    /// down keeps its place. `is_live` filters out stale ids.
    fn pop(
        &mut self,
        is_live: impl Fn(WaiterId) -> bool,
        ready: impl Fn(WaiterId) -> bool,
        weight: impl Fn(WaiterId) -> u32,
    ) -> Option<WaiterId> {
        self.front.retain(|id| is_live(*id));
        if let Some(index) = self.front.iter().position(|id| ready(*id)) {
            self.live -= 1;
            return self.front.remove(index);
        }
        let mut emptied = Vec::new();
        let mut found = None;
        for (pass, sequence, client) in &self.order {
            let line = self
                .lines
                .get_mut(client)
                .expect("every client in the order has a line");
            while line.ids.front().is_some_and(|id| !is_live(*id)) {
                line.ids.pop_front();
            }
            let index = line.ids.iter().position(|id| is_live(*id) && ready(*id));
            if let Some(index) = index {
                let id = line.ids.remove(index).expect("index is in the line");
                found = Some((id, *pass, *sequence, client.clone()));
                break;
            }
            if line.ids.is_empty() {
                emptied.push((*pass, *sequence, client.clone()));
            }
        }
        for key in emptied {
            self.lines.remove(&key.2);
            self.order.remove(&key);
        }
        let (id, pass, sequence, client) = found?;
        self.live -= 1;
        self.order.remove(&(pass, sequence, client.clone()));
        self.pass = pass;
        let next = pass + STRIDE / u64::from(weight(id).max(1));
        let line_left = self
            .lines
            .get(&client)
            .is_some_and(|line| !line.ids.is_empty());
        if line_left {
            let sequence = self.next_sequence();
            let line = self.lines.get_mut(&client).expect("checked above");
            line.pass = next;
            line.sequence = sequence;
            self.order.insert((next, sequence, client));
        } else {
            self.lines.remove(&client);
            self.left_at.insert(client, next);
            if self.left_at.len() > 2 * self.lines.len() + 64 {
                let pass = self.pass;
                self.left_at.retain(|_, at| *at > pass);
                if self.left_at.len() > LEFT_AT_MAX {
                    // Many clients that came once: their credit is not worth the memory.
                    self.left_at = HashMap::new();
                }
            }
        }
        Some(id)
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

    /// Takes the next waiter to serve: highest class first, clients by their weighted turns.
    pub fn pop_next(&mut self) -> Option<(WaiterId, Waiter)> {
        self.pop_next_ready(|_| true)
    }

    /// Takes the next waiter to serve among those `ready` accepts (those whose other limits,
    /// a model's or a client's, let them go now); the others keep their places.
    pub fn pop_next_ready(
        &mut self,
        ready: impl Fn(&Waiter) -> bool,
    ) -> Option<(WaiterId, Waiter)> {
        for priority in Priority::ALL {
            let waiters = &self.waiters;
            let popped = self.classes[priority as usize].pop(
                |id| waiters.contains_key(&id),
                |id| waiters.get(&id).is_some_and(&ready),
                |id| waiters.get(&id).map_or(1, |w| w.weight),
            );
            if let Some(id) = popped {
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

    /// The waiters, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Waiter> {
        self.waiters.values()
    }

    /// The waiters with their ids, in no particular order.
    pub fn iter_with_ids(&self) -> impl Iterator<Item = (WaiterId, &Waiter)> {
        self.waiters.iter().map(|(id, w)| (*id, w))
    }

    /// How many waiters surely go before a new request of `client` in class `priority`: the
    /// higher classes, and unless the request is a replay (which goes ahead of its class) the
    /// replays of its class and the client's own earlier requests.
    pub fn surely_ahead(&self, client: &str, priority: Priority, replay: bool) -> usize {
        let higher: usize = Priority::ALL
            .iter()
            .filter(|p| **p > priority)
            .map(|p| self.classes[*p as usize].live)
            .sum();
        if replay {
            return higher;
        }
        let class = &self.classes[priority as usize];
        let live = |id: &&WaiterId| self.waiters.contains_key(id);
        let replays = class.front.iter().filter(live).count();
        let own = class
            .lines
            .get(client)
            .map_or(0, |line| line.ids.iter().filter(live).count());
        higher + replays + own
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

    /// Entries kept in the clients' lines, live or stale (for tests of memory use).
    pub fn turn_entries(&self) -> usize {
        self.classes.iter().map(ClassQueue::entries).sum()
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
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests;
