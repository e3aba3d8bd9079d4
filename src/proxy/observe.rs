//! What the upstream's answers tell the limiter: the key's controller, the model's
//! concurrency, a key the upstream refused.

use super::context::{RequestCtx, Stage};
use super::SidecarProxy;
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
        if ctx.attempt.observed {
            return;
        }
        ctx.attempt.observed = true;
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
        let (Some(200), Some(grant)) = (ctx.attempt.status, ctx.grant()) else {
            return;
        };
        if grant.model.is_none() && grant.learned.is_none() {
            return;
        }
        if !UpstreamSignal::capacity_error_in(chunk) {
            return;
        }
        let Some(gate) = ctx.gate().cloned() else {
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

    /// Classifies a passed-on refusal once its body (or its first KiB) is in.
    pub(super) fn settle_refusal(&self, ctx: &mut RequestCtx) {
        let Some(refusal) = ctx.attempt.refusal.take() else {
            return;
        };
        let Some(gate) = ctx.gate().cloned() else {
            return;
        };
        let signal = refusal
            .from_headers
            .clone()
            .with_body(refusal.status, &refusal.body);
        self.observe(ctx, &gate, &signal);
    }
}
