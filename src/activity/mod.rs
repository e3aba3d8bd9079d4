//! What the clients did lately, for the dashboard and `/status`: requests and grants per client
//! over the last minute (`clients`), and the queue waits of the last seconds (`waits`).
//!
//! The proxy records into it at two points of a request — when the request is classified
//! (`arrived`) and when it gets its token (`granted`) — and the admin plane reads it once per
//! second. Memory is bounded whatever the clients send: a fixed number of client ids is tracked
//! at a time and the rest are folded into "other". Time is
//! passed in, as in the limiter, so the tables are tested at exact instants.

mod clients;
mod waits;

pub use clients::{ClientTable, ClientsView, TRACKED_CLIENTS_MAX};
pub use waits::{WaitQuantiles, WaitWindow};

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Per-client counts and queue waits, shared by the proxy (writer) and the admin plane (reader).
pub struct Activity {
    origin: Instant,
    clients: Mutex<ClientTable>,
    waits: Mutex<WaitWindow>,
}

impl Activity {
    /// Empty tables whose seconds count from `origin`.
    pub fn new(origin: Instant) -> Self {
        Activity {
            origin,
            clients: Mutex::new(ClientTable::new(TRACKED_CLIENTS_MAX)),
            waits: Mutex::new(WaitWindow::new()),
        }
    }

    /// A request from `client` was classified at `now`.
    pub fn arrived(&self, client: &Arc<str>, now: Instant) {
        let second = self.second(now);
        lock(&self.clients).arrived(client, second);
    }

    /// A request from `client` got its token at `now` after waiting `wait` in the queue.
    pub fn granted(&self, client: &Arc<str>, wait: Duration, now: Instant) {
        let second = self.second(now);
        lock(&self.clients).granted(client, wait, second);
        lock(&self.waits).record(wait, second);
    }

    /// The top clients of the last minute as of `now` (also forgets clients idle for a
    /// minute, which frees their places).
    pub fn clients(&self, now: Instant) -> ClientsView {
        let second = self.second(now);
        lock(&self.clients).view(second)
    }

    /// Grants recorded since the start, for per-second deltas.
    pub fn grants_total(&self) -> u64 {
        lock(&self.clients).grants_total()
    }

    /// Queue wait quantiles over the last `WAIT_WINDOW_SECONDS` as of `now`.
    pub fn waits(&self, now: Instant) -> WaitQuantiles {
        let second = self.second(now);
        lock(&self.waits).quantiles(second)
    }

    /// Whole seconds from the origin to `now` (0 for an instant before it).
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters only: a panic elsewhere while holding the lock leaves usable numbers behind.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_count_from_the_origin_and_feed_both_tables() {
        let origin = Instant::now();
        let activity = Activity::new(origin);
        let a: Arc<str> = Arc::from("a");
        activity.arrived(&a, origin + Duration::from_millis(500));
        activity.granted(
            &a,
            Duration::from_millis(40),
            origin + Duration::from_millis(900),
        );
        let view = activity.clients(origin + Duration::from_secs(2));
        assert_eq!(view.by_rate[0].id, "a");
        assert_eq!(view.by_rate[0].requests_per_minute, 1);
        assert_eq!(view.by_rate[0].grants_per_minute, 1);
        assert_eq!(activity.grants_total(), 1);
        let waits = activity.waits(origin + Duration::from_secs(2));
        assert_eq!(waits.count, 1);
        let p50 = waits.p50_ms.expect("one wait recorded");
        assert!((36.0..44.0).contains(&p50), "{p50}");
        // An instant before the origin counts as its first second instead of panicking.
        activity.arrived(&a, origin - Duration::from_secs(5));
    }
}
