//! The series one route's requests update, resolved once per route.

use std::sync::OnceLock;

use prometheus::{Histogram, IntCounter};

use super::{Metrics, Outcome};
use crate::limiter::Priority;

/// The series one route's requests update, each looked up by its labels once, on its first
/// use, instead of on every request (a lookup hashes the labels under a lock). A series
/// appears in `/metrics` only once it has been used, as with a lookup.
pub struct RouteMetrics {
    route: String,
    requests: [OnceLock<IntCounter>; Outcome::ALL.len()],
    /// By status code, 100 to 599.
    upstream_responses: Box<[OnceLock<IntCounter>]>,
    upstream_duration: OnceLock<Histogram>,
    /// By key lane.
    key_requests: Box<[OnceLock<IntCounter>]>,
    queue_wait: [OnceLock<Histogram>; Priority::ALL.len()],
}

impl RouteMetrics {
    pub fn new(route: &str, keys: usize) -> RouteMetrics {
        RouteMetrics {
            route: route.to_string(),
            requests: Default::default(),
            upstream_responses: (100..600).map(|_| OnceLock::new()).collect(),
            upstream_duration: OnceLock::new(),
            key_requests: (0..keys).map(|_| OnceLock::new()).collect(),
            queue_wait: Default::default(),
        }
    }

    /// `requests_total{route, outcome}`.
    pub fn request(&self, m: &Metrics, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[i]
            .get_or_init(|| {
                m.requests
                    .with_label_values(&[self.route.as_str(), outcome.as_str()])
            })
            .inc();
    }

    /// `upstream_responses_total{route, code}`.
    pub fn upstream_response(&self, m: &Metrics, status: u16) {
        let make = || {
            m.upstream_responses
                .with_label_values(&[self.route.as_str(), status.to_string().as_str()])
        };
        match self
            .upstream_responses
            .get(usize::from(status).wrapping_sub(100))
        {
            Some(cell) => cell.get_or_init(make).inc(),
            None => make().inc(),
        }
    }

    /// `upstream_duration_seconds{route}`.
    pub fn upstream_duration(&self, m: &Metrics, seconds: f64) {
        self.upstream_duration
            .get_or_init(|| {
                m.upstream_duration
                    .with_label_values(&[self.route.as_str()])
            })
            .observe(seconds);
    }

    /// `key_requests_total{route, key}` for the key of `lane`, named `name`.
    pub fn key_request(&self, m: &Metrics, lane: usize, name: &str) {
        let make = || {
            m.key_requests
                .with_label_values(&[self.route.as_str(), name])
        };
        match self.key_requests.get(lane) {
            Some(cell) => cell.get_or_init(make).inc(),
            None => make().inc(),
        }
    }

    /// `queue_wait_seconds{priority}` (not by route: the histogram has no route label).
    pub fn queue_wait(&self, m: &Metrics, priority: Priority, seconds: f64) {
        self.queue_wait[priority as usize]
            .get_or_init(|| m.queue_wait.with_label_values(&[priority.as_str()]))
            .observe(seconds);
    }
}
