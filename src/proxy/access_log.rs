//! The end of a request: what is still owed to the controller and the model limit, the
//! request metrics, and one access-log line.

use pingora_core::Error;
use pingora_proxy::Session;

use super::context::{RequestCtx, Stage};
use super::SidecarProxy;
use crate::admission::now;
use crate::limiter::UpstreamSignal;
use crate::logging::log_value;

impl SidecarProxy {
    /// The request is over: its last answer goes to the controller, its slot back, and it is
    /// counted and written to the access log.
    pub(super) fn finish(&self, session: &Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let metrics = &self.app.metrics;
        if let Some(gate) = ctx.gate().cloned() {
            // A refusal whose body never completed is judged by its headers; an attempt that
            // got no answer at all frees its probe, if it was one.
            if let Some(refusal) = ctx.attempt.refusal.take() {
                self.observe(ctx, &gate, &refusal.from_headers);
            } else if matches!(ctx.stage, Stage::Admitted { .. }) && !ctx.attempt.observed {
                self.observe(ctx, &gate, &UpstreamSignal::NoAnswer);
            }
        }
        // The attempt is over: its model slot goes to the next waiter.
        ctx.attempt.slot = None;
        let outcome = ctx.outcome(error);
        let route = ctx.route().cloned();
        let route_name = route.as_ref().map_or("none", |r| r.name());
        let queue_wait = ctx
            .admitted_at
            .map(|at| at.saturating_duration_since(ctx.started));
        let upstream_time = ctx
            .attempt
            .sent_at
            .map(|at| now().saturating_duration_since(at));
        match route.as_ref() {
            Some(route) => {
                let series = &route.metrics;
                series.request(metrics, outcome);
                if let Some(wait) = queue_wait {
                    series.queue_wait(metrics, ctx.priority(), wait.as_secs_f64());
                }
                if let (Some(time), Some(_)) = (upstream_time, ctx.attempt.status) {
                    series.upstream_duration(metrics, time.as_secs_f64());
                }
            }
            // Refused before it had a route.
            None => metrics
                .requests
                .with_label_values(&[route_name, outcome.as_str()])
                .inc(),
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        log::info!(
            target: "access",
            "client={} route={} method={} path={} status={} priority={} queue_wait_ms={} upstream_ms={} replays={} outcome={}{}{}{}{}",
            log_value(ctx.client()),
            route_name,
            req.method,
            log_value(req.uri.path()),
            status,
            ctx.priority(),
            queue_wait.map_or(0, |w| w.as_millis()),
            upstream_time.map_or(0, |t| t.as_millis()),
            ctx.replays,
            outcome.as_str(),
            if ctx.stage == Stage::FailOpen { " fallback=fail_open" } else { "" },
            if ctx.attempt.key.is_some() { " key=" } else { "" },
            ctx.attempt.key.as_deref().unwrap_or(""),
            ctx.attempt.counted.map_or(String::new(), |u| format!(
                " prompt_tokens={} completion_tokens={}",
                u.prompt, u.completion
            )),
        );
    }
}
