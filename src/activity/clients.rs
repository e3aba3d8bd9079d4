//! Requests, grants and queue waits per client id over a sliding minute, in bounded memory.
//!
//! Client ids come from the clients (`X-Client-Id`), so a hostile or buggy client can send a
//! new one with every request. The table therefore tracks at most `TRACKED_CLIENTS_MAX` ids at
//! a time; a request from any other id is counted under "other", so totals and shares stay
//! right. An id with nothing in the last minute is forgotten when the table is read (once per
//! second), which makes room for new ones. Each tracked id costs one fixed array of
//! per-second counters (about 1.4 KiB), allocated when the id is first tracked; the map's room
//! is reserved up front and the id shares the request's own string, so a request from a
//! tracked id, or one counted as "other", allocates nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// Client ids tracked by name at a time; requests from others count as "other".
pub const TRACKED_CLIENTS_MAX: usize = 256;

/// Entries in each of the two top lists of the view.
pub const TOP_CLIENTS: usize = 10;

/// The sliding window, in seconds.
const WINDOW: usize = 60;

/// Counts of one second.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    /// The second these counts belong to (from the activity's origin).
    at: u64,
    requests: u32,
    grants: u32,
    wait_ms_sum: u64,
    wait_ms_max: u32,
}

/// Sums over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    requests: u64,
    grants: u64,
    wait_ms_sum: u64,
    wait_ms_max: u32,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.grants += other.grants;
        self.wait_ms_sum += other.wait_ms_sum;
        self.wait_ms_max = self.wait_ms_max.max(other.wait_ms_max);
    }

    fn is_empty(&self) -> bool {
        self.requests == 0 && self.grants == 0
    }
}

/// One sliding minute of per-second counts: slot `at % 60` holds second `at`.
#[derive(Debug, Clone)]
struct Minute {
    seconds: [Second; WINDOW],
}

impl Minute {
    fn new() -> Self {
        Minute {
            seconds: [Second::default(); WINDOW],
        }
    }

    /// The counters of second `at`, cleared first when they still hold an older second.
    fn slot(&mut self, at: u64) -> &mut Second {
        let slot = &mut self.seconds[(at % WINDOW as u64) as usize];
        if slot.at != at {
            *slot = Second {
                at,
                ..Second::default()
            };
        }
        slot
    }

    /// Sums over the seconds in `(now - 60, now]`.
    fn totals(&self, now: u64) -> Totals {
        let mut totals = Totals::default();
        for s in &self.seconds {
            if s.at <= now && s.at + (WINDOW as u64) > now {
                totals.add(&Totals {
                    requests: u64::from(s.requests),
                    grants: u64::from(s.grants),
                    wait_ms_sum: s.wait_ms_sum,
                    wait_ms_max: s.wait_ms_max,
                });
            }
        }
        totals
    }

    fn arrived(&mut self, at: u64) {
        let slot = self.slot(at);
        slot.requests = slot.requests.saturating_add(1);
    }

    fn granted(&mut self, wait_ms: u32, at: u64) {
        let slot = self.slot(at);
        slot.grants = slot.grants.saturating_add(1);
        slot.wait_ms_sum = slot.wait_ms_sum.saturating_add(u64::from(wait_ms));
        slot.wait_ms_max = slot.wait_ms_max.max(wait_ms);
    }
}

/// One client over the last minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientView {
    /// The client id (`X-Client-Id`, else the peer address).
    pub id: String,
    /// Requests that arrived in the last minute (every route, whatever became of them).
    pub requests_per_minute: u64,
    /// The same per second, over the part of the minute the sidecar has been running.
    pub requests_per_second: f64,
    /// Tokens granted in the last minute.
    pub grants_per_minute: u64,
    /// This client's part of all tokens granted in the last minute (0 to 1): its share of
    /// the quota.
    pub grant_share: f64,
    /// Mean queue wait of its granted requests, milliseconds (`null` without grants).
    pub queue_wait_mean_ms: Option<f64>,
    /// Longest queue wait of its granted requests, milliseconds (`null` without grants).
    pub queue_wait_max_ms: Option<u64>,
}

/// The `clients` field of `/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientsView {
    /// Seconds the counts cover: 60, or less while the sidecar is younger than a minute.
    pub window_seconds: u64,
    /// Requests from every client in the window.
    pub requests: u64,
    /// Tokens granted to every client in the window.
    pub grants: u64,
    /// Client ids tracked by name now, and at most.
    pub tracked: usize,
    pub tracked_max: usize,
    /// The top clients by requests in the window, busiest first.
    pub by_rate: Vec<ClientView>,
    /// The top clients by mean queue wait in the window (clients with grants), longest first.
    pub by_wait: Vec<ClientView>,
    /// Everything from ids that were not tracked by name (the table was full); absent when
    /// there was none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other: Option<ClientView>,
}

/// Per-client counters over a sliding minute, for at most `capacity` ids at a time.
pub struct ClientTable {
    tracked: HashMap<Arc<str>, Box<Minute>>,
    capacity: usize,
    other: Minute,
    grants_total: u64,
}

impl ClientTable {
    pub fn new(capacity: usize) -> Self {
        ClientTable {
            tracked: HashMap::with_capacity(capacity),
            capacity,
            other: Minute::new(),
            grants_total: 0,
        }
    }

    /// The counters for `client`: its own, a fresh entry while there is room, else "other".
    fn entry(&mut self, client: &Arc<str>) -> &mut Minute {
        if !self.tracked.contains_key(&**client) {
            if self.tracked.len() >= self.capacity {
                return &mut self.other;
            }
            self.tracked.insert(client.clone(), Box::new(Minute::new()));
        }
        self.tracked
            .get_mut(&**client)
            .expect("the entry was just found or added")
    }

    /// A request from `client` arrived in second `at`.
    pub fn arrived(&mut self, client: &Arc<str>, at: u64) {
        self.entry(client).arrived(at);
    }

    /// A request from `client` got its token in second `at` after waiting `wait`.
    pub fn granted(&mut self, client: &Arc<str>, wait: Duration, at: u64) {
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        self.entry(client).granted(wait_ms, at);
        self.grants_total += 1;
    }

    /// Grants recorded since the table was made.
    pub fn grants_total(&self) -> u64 {
        self.grants_total
    }

    /// The view as of second `now`; ids with nothing in the window are forgotten.
    pub fn view(&mut self, now: u64) -> ClientsView {
        let window_seconds = (now + 1).min(WINDOW as u64);
        self.tracked
            .retain(|_, minute| !minute.totals(now).is_empty());
        let mut rows: Vec<(&str, Totals)> = self
            .tracked
            .iter()
            .map(|(id, minute)| (&**id, minute.totals(now)))
            .collect();
        let other = self.other.totals(now);
        let mut all = other;
        for (_, t) in &rows {
            all.add(t);
        }
        let view = |id: &str, t: &Totals| ClientView {
            id: id.to_string(),
            requests_per_minute: t.requests,
            requests_per_second: round3(t.requests as f64 / window_seconds as f64),
            grants_per_minute: t.grants,
            grant_share: if all.grants == 0 {
                0.0
            } else {
                round3(t.grants as f64 / all.grants as f64)
            },
            queue_wait_mean_ms: (t.grants > 0)
                .then(|| round3(t.wait_ms_sum as f64 / t.grants as f64)),
            queue_wait_max_ms: (t.grants > 0).then_some(u64::from(t.wait_ms_max)),
        };
        // Ties are broken by id, so the lists do not flicker between two equal clients.
        rows.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(b.0)));
        let by_rate = rows
            .iter()
            .take(TOP_CLIENTS)
            .map(|(id, t)| view(id, t))
            .collect();
        let mean_wait = |t: &Totals| t.wait_ms_sum as f64 / t.grants.max(1) as f64;
        rows.retain(|(_, t)| t.grants > 0);
        rows.sort_by(|a, b| {
            mean_wait(&b.1)
                .total_cmp(&mean_wait(&a.1))
                .then(a.0.cmp(b.0))
        });
        let by_wait = rows
            .iter()
            .take(TOP_CLIENTS)
            .map(|(id, t)| view(id, t))
            .collect();
        ClientsView {
            window_seconds,
            requests: all.requests,
            grants: all.grants,
            tracked: self.tracked.len(),
            tracked_max: self.capacity,
            by_rate,
            by_wait,
            other: (!other.is_empty()).then(|| view("other", &other)),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn id(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn shares_rates_and_waits_over_the_minute() {
        let mut table = ClientTable::new(8);
        for i in 0..30 {
            table.arrived(&id("heavy"), i);
            table.granted(&id("heavy"), ms(100), i);
        }
        for i in 0..10 {
            table.arrived(&id("light"), i * 3);
            table.granted(&id("light"), ms(400 + i), i * 3);
        }
        table.arrived(&id("refused"), 5);
        let view = table.view(59);
        assert_eq!(view.window_seconds, 60);
        assert_eq!((view.requests, view.grants), (41, 40));
        let ids: Vec<&str> = view.by_rate.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["heavy", "light", "refused"]);
        let heavy = &view.by_rate[0];
        assert_eq!(heavy.requests_per_minute, 30);
        assert_eq!(heavy.requests_per_second, 0.5);
        assert_eq!(heavy.grant_share, 0.75);
        assert_eq!(heavy.queue_wait_mean_ms, Some(100.0));
        assert_eq!(view.by_rate[1].grant_share, 0.25);
        assert_eq!(view.by_rate[1].queue_wait_max_ms, Some(409));
        assert_eq!(view.by_rate[2].queue_wait_mean_ms, None);
        // By wait: only clients with grants, longest first.
        let ids: Vec<&str> = view.by_wait.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["light", "heavy"]);
        assert!(view.other.is_none());
    }

    #[test]
    fn the_window_slides_and_idle_clients_are_forgotten() {
        let mut table = ClientTable::new(8);
        table.arrived(&id("early"), 0);
        table.arrived(&id("late"), 30);
        let view = table.view(59);
        assert_eq!(view.requests, 2);
        // At 60 the second 0 has left the window: "early" is gone from the counts and the
        // table alike.
        let view = table.view(60);
        assert_eq!(view.requests, 1);
        assert_eq!(view.tracked, 1);
        assert_eq!(view.by_rate[0].id, "late");
        // A young sidecar divides by the seconds it has run.
        let mut young = ClientTable::new(8);
        young.arrived(&id("a"), 0);
        young.arrived(&id("a"), 1);
        assert_eq!(young.view(1).by_rate[0].requests_per_second, 1.0);
    }

    #[test]
    fn ids_beyond_the_cap_are_folded_into_other_and_shares_stay_whole() {
        let cap = 16;
        let mut table = ClientTable::new(cap);
        // A hostile client: a new id with every request.
        for i in 0..1000 {
            let name: Arc<str> = Arc::from(format!("id-{i}"));
            table.arrived(&name, 10);
            table.granted(&name, ms(5), 10);
        }
        let view = table.view(10);
        assert_eq!(view.tracked, cap);
        assert_eq!(view.tracked_max, cap);
        assert_eq!(view.by_rate.len(), TOP_CLIENTS);
        let other = view.other.as_ref().expect("the rest is folded");
        assert_eq!(other.requests_per_minute, 1000 - cap as u64);
        assert_eq!(other.grants_per_minute, 1000 - cap as u64);
        assert_eq!((view.requests, view.grants), (1000, 1000));
        let tracked_share: f64 = table
            .tracked
            .values()
            .map(|m| m.totals(10).grants as f64 / 1000.0)
            .sum();
        assert!((tracked_share + other.grant_share - 1.0).abs() < 0.01);
        // The map never grew beyond the room reserved at the start.
        assert!(table.tracked.capacity() >= cap && table.tracked.len() == cap);

        // An id idle for a minute gives its place to the next one.
        let mut table = ClientTable::new(1);
        table.arrived(&id("first"), 0);
        table.arrived(&id("second"), 0);
        assert_eq!(table.view(0).other.map(|o| o.requests_per_minute), Some(1));
        assert_eq!(table.view(61).tracked, 0);
        table.granted(&id("second"), ms(1), 61);
        let view = table.view(61);
        assert_eq!(view.tracked, 1);
        assert_eq!(view.by_rate[0].id, "second");
        assert_eq!(view.by_rate[0].grants_per_minute, 1);
        assert!(view.other.is_none());
    }
}
