//! One attempt at the upstream: made when the request is granted (or, for a request sent
//! without a token, when it goes out), dropped when the attempt ends. A replay or a retried
//! connection is a new attempt; nothing of the last one is reset by hand.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::usage::UsageReader;
use crate::admission::AdmissionGate;
use crate::limiter::{Grant, UpstreamSignal, Usage};

/// How much of an upstream error's body is kept: to classify a refusal passed on to the
/// client, or to put into the error event that ends a kept-alive stream.
pub const ERROR_BODY_LIMIT: usize = 4096;

/// What one attempt holds and has seen.
#[derive(Default)]
pub struct Attempt {
    /// The model slot its grant holds; dropping it frees the slot for the next waiter of that
    /// model, however the attempt ended.
    pub slot: Option<ModelSlot>,
    /// When it was handed to the upstream connection.
    pub sent_at: Option<Instant>,
    /// The name of the pool key it went out on (pools of two or more).
    pub key: Option<Arc<str>>,
    /// The status of the upstream's answer.
    pub status: Option<u16>,
    /// The controller has been told its outcome.
    pub observed: bool,
    /// The first chunk of its answer body has been looked at (for an error event in a 200,
    /// see `observe`).
    pub first_chunk_seen: bool,
    /// An upstream refusal on its way to the client, classified once its body is read.
    pub refusal: Option<RefusalBody>,
    /// Reads what the upstream counted from a successful answer as it passes.
    pub usage: Option<UsageReader>,
    /// What the upstream counted, once its answer ended.
    pub counted: Option<Usage>,
}

impl Attempt {
    /// The attempt `grant` allows on `gate`.
    pub fn granted(gate: &Arc<AdmissionGate>, grant: Grant) -> Attempt {
        Attempt {
            slot: ModelSlot::held(gate, grant),
            ..Attempt::default()
        }
    }

    /// The next attempt on the same grant, after a connection that failed before anything
    /// was sent: the slot carries over, everything else starts again.
    pub fn again(self) -> Attempt {
        Attempt {
            slot: self.slot,
            ..Attempt::default()
        }
    }

    /// Whether it went out already.
    pub fn is_sent(&self) -> bool {
        self.sent_at.is_some()
    }
}

/// A model slot held by an attempt.
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

/// An upstream refusal that is passed on to the client, read up to its first few KiB so that
/// a billing or capacity error can be told from a rate limit.
#[derive(Debug)]
pub struct RefusalBody {
    pub status: u16,
    /// The reading from the status and headers alone.
    pub from_headers: UpstreamSignal,
    pub body: BytesMut,
}

/// Appends what of `chunk` fits under `ERROR_BODY_LIMIT` to `kept`.
pub fn keep_error_body(kept: &mut BytesMut, chunk: &[u8]) {
    let room = ERROR_BODY_LIMIT.saturating_sub(kept.len());
    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
}
