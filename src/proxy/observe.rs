//! What the upstream's answers tell the limiter: the key's controller, the model's
//! concurrency, a key the upstream refused, the tokens it counted.

use super::context::{RequestCtx, Stage};
use super::SidecarProxy;
use crate::admission::AdmissionGate;
use crate::limiter::{Grant, UpstreamSignal, Usage};

impl SidecarProxy {
    /// Feeds the current attempt's answer to the route's controller, once.
    pub(super) fn observe(
        &self,
        ctx: &mut RequestCtx,
        gate: &AdmissionGate,
        signal: &UpstreamSignal,
    ) {
        let route = ctx.route().cloned();
        let count = |signal: &UpstreamSignal| {
            if let Some(reason) = signal.refusal_reason() {
                let name = route.as_ref().map_or("none", |r| r.name());
                self.app
                    .metrics
                    .upstream_refusals
                    .with_label_values(&[name, reason])
                    .inc();
            }
        };
        if ctx.attempt.observed {
            count(signal);
            return;
        }
        ctx.attempt.observed = true;
        let grant = match ctx.stage {
            Stage::Admitted { grant } => grant,
            // Answers to requests sent without a token still tell about the quota.
            _ => gate.current_grant(),
        };
        // The model's concurrency hears it too (`Limiter::observe_answer`); a 429 it finds to
        // be about tokens is counted as such.
        let judged = gate.observe(signal, grant);
        count(&judged);
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

    /// The answer is over: what its `usage` said the upstream counted settles the request's
    /// token reservations (see `Limiter::settle_tokens`). An answer without `usage` leaves
    /// the estimate standing.
    pub(super) fn settle_usage(&self, ctx: &mut RequestCtx) {
        let Some(reader) = ctx.attempt.usage.take() else {
            return;
        };
        let (Some(usage), Some(grant), Some(gate)) =
            (reader.usage(), ctx.grant(), ctx.gate().cloned())
        else {
            return;
        };
        ctx.attempt.counted = Some(usage);
        gate.settle_tokens(grant, usage);
        self.count_tokens(ctx, grant, usage);
    }

    /// `tokens_total`, `client_tokens_total`, `model_tokens_total`.
    fn count_tokens(&self, ctx: &RequestCtx, grant: Grant, usage: Usage) {
        let m = &self.app.metrics;
        let route = ctx.route_name();
        let key = ctx
            .settings
            .upstream
            .keys
            .get(grant.lane)
            .map_or_else(|| "default".into(), |k| k.name.clone());
        let client = m.token_clients.label(ctx.client());
        let model = m.token_models.label(ctx.model_id().unwrap_or("none"));
        for (kind, tokens) in [("prompt", usage.prompt), ("completion", usage.completion)] {
            m.key_tokens
                .with_label_values(&[route, &key, kind])
                .inc_by(tokens);
            m.client_tokens
                .with_label_values(&[route, &client, kind])
                .inc_by(tokens);
            m.model_tokens
                .with_label_values(&[route, &model, kind])
                .inc_by(tokens);
        }
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
