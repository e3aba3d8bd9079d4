//! The story of one request: what it is (route, client, priority, deadline), how its body is
//! held, and where it stands (`Stage`), which every phase reads and `logging` turns into the
//! outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pingora_core::{Error, ErrorSource};
use prometheus::IntGauge;

use crate::admission::{now, AdmissionGate};
use crate::app::Route;
use crate::config::Settings;
use crate::limiter::{Ask, Grant, Priority, Rejection, UpstreamSignal};
use crate::metrics::Outcome;

use super::body::BodyHold;
use super::front::Parked;
use super::respond::{client_gone, rejected_outcome};

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

/// An upstream refusal that is passed on to the client, read up to its first few KiB so that
/// a billing or capacity error can be told from a rate limit.
#[derive(Debug)]
pub struct RefusalBody {
    pub status: u16,
    /// The reading from the status and headers alone.
    pub from_headers: UpstreamSignal,
    pub body: BytesMut,
}

/// Counts the request in `inflight_requests` for as long as it lives: the count goes down when
/// the request's context is dropped, whichever way the request ended (a phase that fails, a
/// task that panics), so the gauge cannot stick.
pub struct Inflight(IntGauge);

impl Inflight {
    pub fn new(gauge: &IntGauge) -> Inflight {
        gauge.inc();
        Inflight(gauge.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A model slot held by the attempt under way; dropping it frees the slot for the next
/// waiter of that model, however the attempt ended.
pub struct ModelSlot {
    gate: Arc<AdmissionGate>,
    grant: Grant,
}

impl ModelSlot {
    /// The slot of `grant`, when it holds one.
    pub fn held(gate: &Arc<AdmissionGate>, grant: Grant) -> Option<ModelSlot> {
        (grant.model.is_some() || grant.learned.is_some()).then(|| ModelSlot {
            gate: gate.clone(),
            grant,
        })
    }
}

impl Drop for ModelSlot {
    fn drop(&mut self) {
        self.gate.release(self.grant);
    }
}

/// Everything a request needs, owned by the request (Pingora's `CTX`).
pub struct RequestCtx {
    pub inflight: Option<Inflight>,
    /// The settings in force when the request arrived; every phase reads these.
    pub settings: Arc<Settings>,
    pub started: Instant,
    pub route: Option<Arc<Route>>,
    pub client: Arc<str>,
    pub priority: Priority,
    /// The client's weight among the waiters of its class.
    pub weight: u32,
    /// The configured model limit the request falls under.
    pub model: Option<usize>,
    /// The model the request asks for (its body's `"model"`).
    pub model_id: Option<Arc<str>>,
    /// The model slot of the attempt under way.
    pub model_slot: Option<ModelSlot>,
    /// The name of the pool key the last attempt went out on (pools of two or more).
    pub key: Option<Arc<str>>,
    /// A streaming request on a `keepalive_while_queued` route.
    pub keepalive: bool,
    /// Its `200` and event-stream headers went out while it waited (see `keepalive`).
    pub keepalive_started: bool,
    /// Bytes of a successful upstream answer have reached the client.
    pub streaming: bool,
    /// An upstream error answer on a kept-alive stream: its status and the start of its body,
    /// turned into an error event at its end.
    pub stream_error: Option<(u16, BytesMut)>,
    pub deadline: Instant,
    pub body: BodyHold,
    pub stage: Stage,
    /// When the request first got its token.
    pub admitted_at: Option<Instant>,
    /// Times the request was sent again after an upstream 429.
    pub replays: u32,
    /// Connections to the upstream that failed for this request (each to another address).
    pub connect_failures: u32,
    /// When the current attempt was handed to the upstream connection.
    pub upstream_sent_at: Option<Instant>,
    /// The status of the upstream's last answer.
    pub upstream_status: Option<u16>,
    /// The controller has been told the outcome of the current attempt.
    pub answer_observed: bool,
    /// The first chunk of the current attempt's answer body has been looked at (for an
    /// error event in a 200, see `observe`).
    pub first_chunk_seen: bool,
    /// An upstream refusal on its way to the client, classified once its body is read.
    pub refusal: Option<RefusalBody>,
    /// The verdict of a request that waited before its session began (see `front::park`).
    pub parked: Option<Parked>,
}

impl RequestCtx {
    pub fn new(settings: Arc<Settings>) -> Self {
        let started = now();
        RequestCtx {
            inflight: None,
            settings,
            started,
            route: None,
            client: Arc::from("-"),
            priority: Priority::Normal,
            weight: 1,
            model: None,
            model_id: None,
            model_slot: None,
            key: None,
            keepalive: false,
            keepalive_started: false,
            streaming: false,
            stream_error: None,
            deadline: started,
            body: BodyHold::Unread,
            stage: Stage::Arrived,
            admitted_at: None,
            replays: 0,
            connect_failures: 0,
            upstream_sent_at: None,
            upstream_status: None,
            answer_observed: false,
            first_chunk_seen: false,
            refusal: None,
            parked: None,
        }
    }

    /// What the request asks the limiter for.
    pub fn ask(&self) -> Ask {
        Ask {
            client: self.client.clone(),
            priority: self.priority,
            deadline: self.deadline,
            weight: self.weight,
            model: self.model,
            model_id: self.model_id.clone(),
        }
    }

    /// The grant of the attempt under way, if it was admitted with a token.
    pub fn grant(&self) -> Option<Grant> {
        match self.stage {
            Stage::Admitted { grant } => Some(grant),
            _ => None,
        }
    }

    pub fn route_name(&self) -> &str {
        self.route.as_ref().map_or("none", |r| r.name())
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
