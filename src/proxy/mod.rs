//! The proxy: Pingora's `ProxyHttp` phases for one request — classify, admit, forward,
//! observe, stream, log. Each phase reads and moves the request's `Stage` (see `context`).
//!
//! - `classify`: client id, priority, and what is refused outright;
//! - `body`: holding request bodies for replay and for watching waiting clients;
//! - `replay`: sending a request again after an upstream 429, and where Pingora allows it;
//! - `respond`: the sidecar's own answers and error responses;
//! - `tenant`: client keys, client deadlines, the model of a body;
//! - `waiting`: waiting for a verdict while watching the client; `keepalive`: headers and
//!   comments for a waiting stream;
//! - `observe`: what the upstream's answers tell the limiter;
//! - `access_log`: the end of a request, its metrics and its access-log line;
//! - `front`: the connection door — the loop over a connection's requests, room for
//!   connections, parking, the header deadline.
//!
//! Replaying rides on Pingora's own retry loop: `upstream_response_filter` abandons an
//! attempt that met a 429 with an error marked retryable, `error_while_proxy` keeps it
//! retryable, and Pingora calls `upstream_peer` again, where the request waits for a new token
//! at the head of its class. Pingora's `max_retries` is set above `adaptive.max_replays`, so
//! our own bound is the one that counts.

mod access_log;
mod body;
mod classify;
mod context;
mod front;
mod keepalive;
mod observe;
mod replay;
mod respond;
mod tenant;
mod waiting;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora_core::modules::http::HttpModules;
use pingora_core::prelude::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};

use crate::admission::{now, Verdict};
use crate::app::App;
use crate::limiter::{model_index, StatedLimit};

pub use classify::{ambiguous_path, log_value};
pub use context::{RequestCtx, Stage};
pub(crate) use front::check_request_head;
pub use front::{ProxyApp, Slots};
pub use respond::error_body;

use body::{BodyBudget, BodyHold};
use context::{ModelSlot, RefusalBody};
use front::Parked;
use respond::Answer;
use waiting::{client_left, wait_for_token, wait_verdict, wait_watching_client};

/// Request headers meant for the sidecar (or for a proxy), never sent upstream.
static FOR_THE_SIDECAR_ONLY: [HeaderName; 4] = [
    HeaderName::from_static("x-client-id"),
    HeaderName::from_static("x-priority"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("proxy-connection"),
];

/// The sidecar's `ProxyHttp` implementation.
pub struct SidecarProxy {
    app: Arc<App>,
    bodies: BodyBudget,
}

impl SidecarProxy {
    pub fn new(app: Arc<App>) -> Self {
        let bodies = BodyBudget::new(app.metrics.held_body_bytes.clone());
        SidecarProxy { app, bodies }
    }

    /// The budget held bodies count against, shared with the connection loop's parking.
    pub fn bodies(&self) -> BodyBudget {
        self.bodies.clone()
    }

    /// Reads the request's body ahead when it can be held (`body`), and what the sidecar
    /// reads in it: the model (its limits are learned, and configured in `models`) and
    /// whether it asks for a stream (`keepalive_route`: one that keeps waiting streams alive).
    /// `held` is the share of the budget a parked body has already.
    async fn hold_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        held: Option<body::Reservation>,
        keepalive_route: bool,
    ) -> Result<()> {
        let settings = ctx.settings.clone();
        let limits = body::Limits {
            max_body: settings.max_replay_body,
            budget: settings.replay_body_budget,
        };
        ctx.body = body::hold(session, ctx.deadline, limits, &self.bodies, held).await?;
        if let BodyHold::Streamed(why) = &ctx.body {
            self.app
                .metrics
                .replay_unavailable
                .with_label_values(&[ctx.route_name(), why.as_str()])
                .inc();
        }
        let fields = tenant::held_body(session, &ctx.body)
            .map(|body| tenant::fields_of(&body))
            .unwrap_or_default();
        ctx.model = fields
            .model
            .as_deref()
            .and_then(|id| model_index(&settings.models, id));
        ctx.model_id = fields.model_id();
        ctx.keepalive = keepalive_route && fields.stream == Some(true);
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for SidecarProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.app.settings())
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        context: Box<dyn Any + Send + Sync>,
    ) {
        // A request parked by the connection loop: it waited from `started` on.
        if let Some(parked) = Parked::taken_from(context) {
            ctx.started = parked.started;
            ctx.parked = Some(parked);
        }
    }

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {
        // None: Pingora's default is a response compression module, switched off, that would
        // still be built and called for every request. Answers pass through as they came.
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A request parked by the connection loop (see `front::park`) has been counted since it
        // parked and has its verdict. It is taken here, so that every way out of this phase
        // gives back what it holds.
        let mut parked = ctx.parked.take();
        let counted = parked.as_mut().and_then(|p| p.inflight.take());
        ctx.inflight = counted.or_else(|| Some(context::Inflight::new(&self.app.metrics.inflight)));
        let table = self.app.table();
        // One snapshot for the whole request: a reload meanwhile applies to the next one.
        ctx.settings = table.settings.clone();
        if let Some(answer) = classify::refusal(session.req_header(), &table) {
            ctx.stage = Stage::Refused;
            answer.send(session).await?;
            return Ok(true);
        }
        let route = table.route_for(session.req_header().uri.path()).clone();
        let settings = &table.settings;
        let peer = classify::peer_ip(session);
        match classify::who_asks(session.req_header(), peer, settings, ctx.started) {
            Ok(asker) => {
                ctx.client = asker.client;
                ctx.weight = asker.weight;
                ctx.priority = asker.priority;
                ctx.deadline = asker.deadline;
            }
            Err(answer) => {
                ctx.stage = Stage::Refused;
                answer.send(session).await?;
                return Ok(true);
            }
        }
        match &parked {
            Some(p) if p.client_left() => {
                ctx.stage = Stage::ClientLeft;
                return client_left("client left while parked").map(|_| false);
            }
            // Its arrival was counted when it parked.
            Some(_) => {}
            None => self.app.activity.arrived(&ctx.client, ctx.started),
        }
        let gate = route.gate.clone();
        let keepalive_route = route.settings.keepalive_while_queued;
        ctx.route = Some(route);
        let Some(gate) = gate else {
            ctx.stage = Stage::Passthrough;
            return Ok(false);
        };
        if settings.fallback_passthrough && gate.is_degraded() {
            // The shared quota is out of reach and the operator chose to fail open.
            ctx.stage = Stage::FailOpen;
            return Ok(false);
        }

        // A client that sends `Expect: 100-continue` sends its body only once it is told to:
        // it is admitted first (not knowing its model), then told, then its body is read.
        let continues = classify::expects_continue(session.req_header());
        if !continues {
            // A parked body keeps the share of the budget it had while it waited.
            let held = parked.as_mut().and_then(Parked::take_body);
            self.hold_body(session, ctx, held, keepalive_route).await?;
        }
        // A request that waited before its session began (see `front::park`) has its verdict.
        let verdict = match parked.and_then(|mut p| p.verdict_from(&gate)) {
            Some(verdict) => Some(verdict),
            None => {
                let mut ticket = gate.admit_with(ctx.ask());
                let watch = !continues && ctx.body.is_complete();
                wait_verdict(session, &mut ticket, watch, ctx).await?
            }
        };
        match verdict {
            Some(Verdict::Granted(grant)) => {
                ctx.model_slot = ModelSlot::held(&gate, grant);
                let at = now();
                ctx.admitted_at = Some(at);
                ctx.stage = Stage::Admitted { grant };
                let wait = at.saturating_duration_since(ctx.started);
                self.app.activity.granted(&ctx.client, wait, at);
                if continues {
                    session.downstream_session.write_continue_response().await?;
                    // Met here: the upstream gets the body whole and has nothing to continue.
                    // (A passthrough route's request keeps it, and the upstream answers it.)
                    session
                        .req_header_mut()
                        .remove_header(&http::header::EXPECT);
                    self.hold_body(session, ctx, None, false).await?;
                }
                Ok(false)
            }
            Some(Verdict::Rejected { .. }) if settings.fallback_passthrough => {
                ctx.stage = Stage::FailOpen;
                Ok(false)
            }
            Some(Verdict::Rejected { why, retry_after }) => {
                ctx.stage = Stage::Rejected {
                    why,
                    retry_after,
                    after_upstream_429: false,
                };
                let answer = Answer::rejected(why, retry_after, false, ctx.model_id.as_deref());
                if ctx.keepalive_started {
                    keepalive::end_with_error(session, &answer.body).await?;
                } else {
                    answer.send(session).await?;
                }
                Ok(true)
            }
            None => {
                ctx.stage = Stage::ClientLeft;
                Error::e_explain(ErrorType::ConnectionClosed, "client left while queued")
                    .map_err(|e| e.into_down())
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx.route.clone().expect("request_filter sets the route");
        if let Stage::ReplayPending { backoff } = ctx.stage {
            let gate = route.gate.clone().expect("only rate-limited routes replay");
            if !backoff.is_zero() && !wait_watching_client(session, backoff).await {
                ctx.stage = Stage::ClientLeft;
                return client_left("client left while waiting to replay");
            }
            let mut ticket = gate.admit_again_with(ctx.ask());
            match wait_verdict(session, &mut ticket, true, ctx).await? {
                Some(Verdict::Granted(grant)) => {
                    ctx.model_slot = ModelSlot::held(&gate, grant);
                    ctx.stage = Stage::Admitted { grant };
                }
                Some(Verdict::Rejected { why, retry_after }) => {
                    ctx.stage = Stage::Rejected {
                        why,
                        retry_after,
                        after_upstream_429: true,
                    };
                    return Error::e_explain(
                        ErrorType::HTTPStatus(429),
                        "deadline passed while waiting to replay",
                    );
                }
                None => {
                    ctx.stage = Stage::ClientLeft;
                    return client_left("client left while waiting to replay");
                }
            }
        }
        ctx.answer_observed = false;
        ctx.first_chunk_seen = false;
        let settings = ctx.settings.clone();
        let addr = route
            .upstream
            .resolve(settings.upstream.dns_ttl)
            .await
            .map_err(|e| Error::explain(ErrorType::ConnectError, e.to_string()).into_up())?;
        ctx.upstream_sent_at = Some(now());
        Ok(Box::new(route.upstream.peer(addr, &settings.upstream)))
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A body we keep ourselves: Pingora hands over its retry buffer (the tail) at the
        // start of each attempt, and the whole body goes in its place (see `body`).
        if let (Some(kept), true) = (ctx.body.kept(), end_of_stream) {
            *body = Some(kept.clone());
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let route = ctx.route.clone().expect("request_filter sets the route");
        if request.uri.authority().is_some() || !request.raw_path().starts_with(b"/") {
            // Absolute-form target (client used us as HTTP_PROXY): send origin-form upstream.
            let origin_form = request
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            request.set_uri(
                origin_form.parse().map_err(|_| {
                    Error::explain(ErrorType::InvalidHTTPHeader, "bad request target")
                })?,
            );
        }
        request.insert_header(
            http::header::HOST,
            route.settings.upstream.authority.as_str(),
        )?;
        let settings = ctx.settings.clone();
        let lane = match (ctx.grant(), route.gate.as_ref()) {
            (Some(grant), _) => grant.lane,
            (None, Some(gate)) => gate.first_active_key(),
            (None, None) => self
                .app
                .table()
                .default
                .gate
                .as_ref()
                .map_or(0, |gate| gate.first_active_key()),
        };
        let key = tenant::put_upstream_key(request, &settings, lane)?;
        if let (Some(key), Some(_)) = (key, ctx.grant()) {
            route
                .metrics
                .key_request(&self.app.metrics, lane, &key.name);
            if settings.upstream.keys.len() > 1 {
                ctx.key = Some(key.name.clone());
            }
        }
        for name in &FOR_THE_SIDECAR_ONLY {
            request.remove_header(name);
        }
        for (name, value) in &settings.upstream.headers {
            request.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = response.status.as_u16();
        ctx.upstream_status = Some(status);
        let Some(route) = ctx.route.as_ref() else {
            return Ok(());
        };
        route.metrics.upstream_response(&self.app.metrics, status);
        let Some(gate) = route.gate.clone() else {
            return Ok(());
        };
        let signal = replay::read_header(response);
        let backoff = replay::backoff(response);
        let settings = ctx.settings.clone();
        if let (Some(grant), true) = (ctx.grant(), route.settings.is_auto()) {
            let header = |name: &str| response.headers.get(name).and_then(|v| v.to_str().ok());
            if let Some(stated) = StatedLimit::read(header) {
                gate.observe_stated(grant, stated);
            }
        }
        if let (401 | 403, Some(grant)) = (status, ctx.grant()) {
            if self.refused_key(ctx, &gate, grant, status)
                && ctx.body.is_complete()
                && ctx.replays < settings.max_replays
                && replay::nothing_of_the_answer_sent(ctx, session)
            {
                // The key was refused, not the request: it goes again on another key.
                ctx.answer_observed = true;
                return Err(self.send_again(ctx, Duration::ZERO));
            }
        }
        if let Some(backoff) =
            backoff.filter(|b| replay::may_replay(ctx, &settings, &gate, session, &signal, *b))
        {
            // Decided here, from the status line and headers, before anything of this answer
            // can reach the client (see `replay`).
            self.observe(ctx, &gate, &signal);
            return Err(self.send_again(ctx, backoff));
        }
        if ctx.keepalive_started && !(200..300).contains(&status) {
            // The client has its 200 already: the error goes out as an event at the end.
            ctx.stream_error = Some((status, Default::default()));
        }
        if matches!(status, 429 | 503) {
            // Passed on to the client: classify it once its body is read.
            ctx.refusal = Some(RefusalBody {
                status,
                from_headers: signal,
                body: Default::default(),
            });
            return Ok(());
        }
        self.observe(ctx, &gate, &signal);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Tell the client how long it queued and how often it was replayed.
        if let Some(admitted) = ctx.admitted_at {
            let wait = admitted.saturating_duration_since(ctx.started).as_millis();
            let wait = u64::try_from(wait).unwrap_or(u64::MAX);
            response.insert_header("x-sidecar-queue-wait-ms", HeaderValue::from(wait))?;
        }
        if ctx.replays > 0 {
            response.insert_header("x-sidecar-replays", HeaderValue::from(ctx.replays))?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(refusal) = ctx.refusal.as_mut() {
            if let Some(chunk) = body.as_ref() {
                let room = replay::REFUSAL_BODY_LIMIT.saturating_sub(refusal.body.len());
                refusal
                    .body
                    .extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if end_of_stream || refusal.body.len() >= replay::REFUSAL_BODY_LIMIT {
                self.settle_refusal(ctx);
            }
        }
        if !ctx.first_chunk_seen {
            if let Some(chunk) = body.as_ref().filter(|b| !b.is_empty()) {
                ctx.first_chunk_seen = true;
                self.capacity_error_in_a_success(ctx, chunk);
            }
        }
        self.stream_error_event(body, end_of_stream, ctx);
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the upstream: try the name's next address, once each.
        let Some(route) = ctx.route.as_ref() else {
            return e;
        };
        let Some(addr) = peer._address.as_inet().copied() else {
            return e;
        };
        ctx.connect_failures += 1;
        let upstream = &route.upstream;
        if upstream.unreachable(addr) && (ctx.connect_failures as usize) < upstream.address_count()
        {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if matches!(ctx.stage, Stage::ReplayPending { .. }) {
            // A 429 (or 503) means the upstream did not act on the request: safe to send again,
            // whatever the method.
            e.set_retry(true);
        } else if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
            || matches!(ctx.body, BodyHold::Streamed(_))
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        FailToProxy {
            error_code: respond::answer_failure(session, e, ctx).await,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        // Clients leaving or sending something broken, and the sidecar's own 429s, are counted
        // (`client_closed`, `client_error`, `rejected_*`), not logged as errors.
        matches!(ctx.stage, Stage::ClientLeft | Stage::Rejected { .. })
            || error.esource() == &pingora_core::ErrorSource::Downstream
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        _e: &Error,
        _c: ProxyWarnLogContext,
    ) -> bool {
        // A replay after an upstream 429 is routine; it is counted in replays_total.
        matches!(ctx.stage, Stage::ReplayPending { .. })
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        self.finish(session, error, ctx);
    }
}
