//! What a request asks the limiter for (`Ask`), and the answers it gets: at once
//! (`Admission`), or later while it waits (`Resolution`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Grant, Priority, TokenAsk, WaiterId};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The queue already holds `queue_max_size` waiters.
    QueueFull,
    /// The deadline passed before a token was free, or it would pass before one could be:
    /// the request is told at once.
    QueueTimeout,
    /// The upstream locked the request's model (a `Retry-After` beyond the request's
    /// deadline); its other models keep flowing.
    ModelLocked,
    /// The request's estimated cost is more than a whole minute's token budget (`tpm`) of
    /// every key, or of its model or its client: it could never be sent, so it is told at once.
    TooLarge { tokens: u32, limit: u64 },
}

impl Rejection {
    /// The `code` of the OpenAI-style error body.
    pub fn code(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::ModelLocked => "model_locked",
            Rejection::TooLarge { .. } => "request_too_large",
        }
    }
}

/// The immediate answer to a request for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Granted,
    Queued(WaiterId),
    Rejected {
        why: Rejection,
        retry_after: Duration,
    },
}

/// What happened to a waiter while time passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Granted(WaiterId, Grant),
    /// The waiter's deadline passed, or would pass before it could be served.
    Expired {
        id: WaiterId,
        why: Rejection,
        retry_after: Duration,
    },
}

/// One request for admission.
#[derive(Debug, Clone)]
pub struct Ask {
    pub client: Arc<str>,
    pub priority: Priority,
    pub deadline: Instant,
    /// The client's weight among the waiters of its class.
    pub weight: u32,
    /// The configured model limit the request falls under.
    pub model: Option<usize>,
    /// The model the request asks for (the body's `"model"`), whose limits are learned.
    pub model_id: Option<Arc<str>>,
    /// What it is expected to cost in tokens, for the token budgets (`tpm`); `None` counts
    /// nothing.
    pub tokens: Option<TokenAsk>,
}

impl Ask {
    pub fn new(client: Arc<str>, priority: Priority, deadline: Instant) -> Ask {
        Ask {
            client,
            priority,
            deadline,
            weight: 1,
            model: None,
            model_id: None,
            tokens: None,
        }
    }
}
