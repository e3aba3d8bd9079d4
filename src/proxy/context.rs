//! The story of one request: what it is (its `Intake`: route, client, priority, deadline,
//! model), how its body is held, where it stands (`Stage`), its client's side (`Downstream`)
//! and its attempt at the upstream (`Attempt`), which every phase reads and `logging` turns
//! into the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora_core::{Error, ErrorSource};

use crate::admission::{now, AdmissionGate};
use crate::app::Route;
use crate::config::Settings;
use crate::limiter::{Ask, Grant, Priority, Rejection};
use crate::metrics::Outcome;

use super::attempt::Attempt;
use super::body::BodyHold;
use super::front::Parked;
use super::intake::{Arrival, Intake};
use super::keepalive::Downstream;
use super::respond::client_gone;

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    /// Classified; nothing decided yet.
    Arrived,
    /// Refused before admission (CONNECT, a foreign absolute-form target).
    Refused,
    /// On a passthrough route: forwarded without a token.
    Passthrough,
    /// Forwarded without a token because the limiter could not admit it in time, or the shared
    /// quota is out of reach, and the operator chose to fail open.
    FailOpen,
    /// Holds a token (or is a probe) for the attempt now under way.
    Admitted { grant: Grant },
    /// The upstream refused (429, or 503 after `backoff`); `upstream_peer` waits for a token
    /// to send it again.
    ReplayPending { backoff: Duration },
    /// The sidecar answered 429 itself; `after_upstream_429` when it gave up replaying.
    Rejected {
        why: Rejection,
        retry_after: Duration,
        after_upstream_429: bool,
    },
    /// The client went away before it was answered.
    ClientLeft,
}

/// Everything a request needs, owned by the request (Pingora's `CTX`), grouped by what it
/// is about.
pub struct RequestCtx {
    /// The settings in force when the request arrived; every phase reads these.
    pub settings: Arc<Settings>,
    pub started: Instant,
    /// Counted as arrived and in flight, from the door that took it in.
    pub arrival: Option<Arrival>,
    /// What the sidecar decided about it; `None` when it was refused at once.
    pub intake: Option<Intake>,
    pub body: BodyHold,
    pub stage: Stage,
    /// The client's side, as far as keeping a waiting stream alive goes.
    pub downstream: Downstream,
    /// The attempt at the upstream under way (or the last one).
    pub attempt: Attempt,
    /// When the request first got its token.
    pub admitted_at: Option<Instant>,
    /// Times the request was sent again after an upstream 429.
    pub replays: u32,
    /// Connections to the upstream that failed for this request (each to another address).
    pub connect_failures: u32,
    /// A request that waited before its session began (see `front::park`), until
    /// `request_filter` takes it.
    pub parked: Option<Box<Parked>>,
}

impl RequestCtx {
    pub fn new(settings: Arc<Settings>) -> Self {
        RequestCtx {
            settings,
            started: now(),
            arrival: None,
            intake: None,
            body: BodyHold::Unread,
            stage: Stage::Arrived,
            downstream: Downstream::Plain,
            attempt: Attempt::default(),
            admitted_at: None,
            replays: 0,
            connect_failures: 0,
            parked: None,
        }
    }

    /// What the request asks the limiter for.
    pub fn ask(&self) -> Ask {
        self.intake().ask()
    }

    /// The intake, once `request_filter` has taken the request in.
    pub fn intake(&self) -> &Intake {
        self.intake
            .as_ref()
            .expect("request_filter takes every request in")
    }

    pub fn route(&self) -> Option<&Arc<Route>> {
        self.intake.as_ref().map(|i| &i.route)
    }

    /// The route's bucket, on a rate-limited route.
    pub fn gate(&self) -> Option<&Arc<AdmissionGate>> {
        self.route().and_then(|r| r.gate.as_ref())
    }

    pub fn route_name(&self) -> &str {
        self.route().map_or("none", |r| r.name())
    }

    pub fn client(&self) -> &str {
        self.intake.as_ref().map_or("-", |i| &i.who.client)
    }

    pub fn priority(&self) -> Priority {
        self.intake
            .as_ref()
            .map_or(Priority::Normal, Intake::priority)
    }

    pub fn deadline(&self) -> Instant {
        self.intake
            .as_ref()
            .map_or(self.started, |i| i.who.deadline)
    }

    /// The model the request asks for (its body's `"model"`).
    pub fn model_id(&self) -> Option<&str> {
        self.intake
            .as_ref()
            .and_then(|i| i.asks().model_id.as_deref())
    }

    /// The grant of the attempt under way, if it was admitted with a token.
    pub fn grant(&self) -> Option<Grant> {
        match self.stage {
            Stage::Admitted { grant } => Some(grant),
            _ => None,
        }
    }

    /// How the request ended, for `requests_total` and the access log.
    pub fn outcome(&self, error: Option<&Error>) -> Outcome {
        match self.stage {
            Stage::Refused => return Outcome::Refused,
            Stage::Rejected { why, .. } => return rejected_outcome(why),
            Stage::ClientLeft => return Outcome::ClientClosed,
            _ => {}
        }
        match error {
            Some(e) if client_gone(e) => Outcome::ClientClosed,
            Some(e) if e.esource() == &ErrorSource::Downstream => Outcome::ClientError,
            Some(_) => Outcome::UpstreamError,
            None => match self.stage {
                Stage::Passthrough | Stage::FailOpen => Outcome::Passthrough,
                _ => Outcome::Forwarded,
            },
        }
    }
}

/// The outcome counted for a request the sidecar answered 429 itself.
fn rejected_outcome(why: Rejection) -> Outcome {
    match why {
        Rejection::QueueFull => Outcome::RejectedQueueFull,
        Rejection::QueueTimeout => Outcome::RejectedQueueTimeout,
        Rejection::ModelLocked => Outcome::RejectedModelLocked,
        Rejection::TooLarge { .. } => Outcome::RejectedTooLarge,
    }
}
