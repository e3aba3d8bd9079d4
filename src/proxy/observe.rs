//! What the upstream's answers tell the limiter: the key's controller, the model's
//! concurrency, a key the upstream refused; and the error event that ends a kept-alive stream.

use bytes::Bytes;

use super::{error_body, keepalive, replay, RequestCtx, SidecarProxy, Stage};
use crate::admission::AdmissionGate;
use crate::limiter::{Grant, UpstreamSignal};

impl SidecarProxy {
    /// Feeds the current attempt's answer to the route's controller, once.
    pub(super) fn observe(
        &self,
        ctx: &mut RequestCtx,
        gate: &AdmissionGate,
        signal: &UpstreamSignal,
    ) {
        if let Some(reason) = signal.refusal_reason() {
            self.app
                .metrics
                .upstream_refusals
                .with_label_values(&[ctx.route_name(), reason])
                .inc();
        }
        if ctx.answer_observed {
            return;
        }
        ctx.answer_observed = true;
        let grant = match ctx.stage {
            Stage::Admitted { grant } => grant,
            // Answers to requests sent without a token still tell about the quota.
            _ => gate.current_grant(),
        };
        // The model's concurrency hears it too (`Limiter::observe_answer`).
        gate.observe(signal, grant);
    }

    /// NVIDIA's capacity error as the first event of a 200 (the status said success, the
    /// stream says the model's workers are full): the model's concurrency is lowered, never
    /// the key's rate. The client already has the 200, so the answer goes through as it is.
    pub(super) fn capacity_error_in_a_success(&self, ctx: &RequestCtx, chunk: &[u8]) {
        let (Some(200), Some(grant)) = (ctx.upstream_status, ctx.grant()) else {
            return;
        };
        if grant.model.is_none() && grant.learned.is_none() {
            return;
        }
        if !UpstreamSignal::capacity_error_in(chunk) {
            return;
        }
        let Some(gate) = ctx.route.as_ref().and_then(|r| r.gate.clone()) else {
            return;
        };
        self.app
            .metrics
            .upstream_refusals
            .with_label_values(&[ctx.route_name(), "worker_capacity"])
            .inc();
        gate.observe_capacity(grant, true);
    }

    /// An upstream 401 (or repeated 403s) on a key of a pool: the key is taken out (logged
    /// once). True when the key is out of the pool now, so that the request may go again on
    /// another.
    pub(super) fn refused_key(
        &self,
        ctx: &RequestCtx,
        gate: &AdmissionGate,
        grant: Grant,
        status: u16,
    ) -> bool {
        if gate.key_count() < 2 {
            return false;
        }
        let settings = ctx.settings.clone();
        let name = settings
            .upstream
            .keys
            .get(grant.lane)
            .map_or("?", |k| &*k.name);
        if gate.key_refused(grant.lane, status == 401) {
            log::warn!(
                "upstream key {name} was refused with {status} on route {}: it is out of the pool until a restart or a reload that changes its value",
                ctx.route_name()
            );
        }
        !gate.is_key_active(grant.lane)
    }

    /// On a kept-alive stream: marks the upstream's events as started, or swallows an error
    /// answer's body and puts an error event in its place at its end.
    pub(super) fn stream_error_event(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) {
        if !ctx.keepalive_started {
            return;
        }
        let Some((status, kept)) = ctx.stream_error.as_mut() else {
            ctx.streaming |= body.as_ref().is_some_and(|b| !b.is_empty());
            return;
        };
        if let Some(chunk) = body.take() {
            let room = replay::REFUSAL_BODY_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if end_of_stream {
            let text = String::from_utf8_lossy(kept);
            let message = format!(
                "the upstream answered {status}: {}",
                text.trim().chars().take(512).collect::<String>()
            );
            let event = error_body(&message, "upstream_error", &format!("upstream_{status}"));
            *body = Some(keepalive::error_event(&event));
        }
    }

    /// Classifies a passed-on refusal once its body (or its first KiB) is in.
    pub(super) fn settle_refusal(&self, ctx: &mut RequestCtx) {
        let Some(refusal) = ctx.refusal.take() else {
            return;
        };
        let Some(gate) = ctx.route.as_ref().and_then(|r| r.gate.clone()) else {
            return;
        };
        let signal = refusal
            .from_headers
            .clone()
            .with_body(refusal.status, &refusal.body);
        self.observe(ctx, &gate, &signal);
    }

    /// Abandons the attempt under way: the request gives back its model slot and waits
    /// `backoff`, then for a new token (see `replay`). Returns the error that does it.
    pub(super) fn send_again(
        &self,
        ctx: &mut RequestCtx,
        backoff: std::time::Duration,
    ) -> Box<pingora_core::Error> {
        ctx.model_slot = None;
        ctx.replays += 1;
        ctx.stage = Stage::ReplayPending { backoff };
        self.app
            .metrics
            .replays
            .with_label_values(&[ctx.route_name()])
            .inc();
        replay::replay_error()
    }
}
