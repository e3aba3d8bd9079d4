//! The proxy: Pingora's `ProxyHttp` phases for one request — take in, admit, forward,
//! observe, stream, log. Each phase reads and moves the request's `Stage` (see `context`).
//!
//! - `intake`: each request decided once — refusal, route, client and priority, mode, body
//!   plan, and what its body asks for; `classify` and `tenant` are its parts (who asks, what
//!   is refused outright; client keys and client deadlines);
//! - `front`: the connection door — the loop over a connection's requests, room for
//!   connections, parking, the header deadline;
//! - `wait`: waiting while watching the client, at either door; `keepalive`: the client's side
//!   of a waiting stream (`Downstream`) and its headers and comments;
//! - `body`: holding request bodies for replay and for watching waiting clients;
//! - `attempt`: one attempt at the upstream, and what it holds;
//! - `credential`: the pool key a request goes out with;
//! - `replay`: sending a request again after an upstream 429, and where Pingora allows it;
//! - `observe`: what the upstream's answers tell the limiter;
//! - `respond`: the sidecar's own answers; `failure`: what a failed request's client is told;
//! - `context`: the request's state, every phase's; `access_log`: the end of a request, its
//!   metrics and its access-log line.
//!
//! Replaying rides on Pingora's own retry loop: `upstream_response_filter` abandons an
//! attempt that met a 429 with an error marked retryable, `error_while_proxy` keeps it
//! retryable, and Pingora calls `upstream_peer` again, where the request waits for a new token
//! at the head of its class. Pingora's `max_retries` is set above `adaptive.max_replays`, so
//! our own bound is the one that counts.

mod access_log;
mod attempt;
mod body;
mod classify;
mod context;
mod credential;
mod failure;
mod front;
mod intake;
mod keepalive;
mod observe;
mod prompt;
mod replay;
mod respond;
mod tenant;
mod usage;
mod wait;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora_core::modules::http::HttpModules;
use pingora_core::prelude::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};

use crate::admission::{now, Verdict};
use crate::app::{App, RouteTable};
use crate::limiter::{StatedLimit, StatedTokens};

pub use classify::ambiguous_path;
pub use context::{RequestCtx, Stage};
pub(crate) use front::check_request_head;
pub use front::{ProxyApp, Slots};

use attempt::{keep_error_body, Attempt, RefusalBody, ERROR_BODY_LIMIT};
use body::{BodyBudget, BodyHold};
use front::Parked;
use intake::{Arrival, Intake, Mode};
use keepalive::Downstream;
use respond::Answer;
use usage::UsageReader;

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

    /// Reads the request's body ahead when it can be held (`body`), and reads what it asks
    /// for (`Intake::read_body`), unless that was read already at the connection door. `held`
    /// is the share of the budget a parked body has already.
    async fn hold_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        held: Option<body::Reservation>,
    ) -> Result<()> {
        let settings = ctx.settings.clone();
        let (plan, deadline) = (ctx.intake().body, ctx.deadline());
        let limit = settings.replay_body_budget;
        ctx.body = body::hold(session, plan, deadline, &self.bodies, limit, held).await?;
        if let BodyHold::Streamed(why) = &ctx.body {
            self.app
                .metrics
                .replay_unavailable
                .with_label_values(&[ctx.route_name(), why.as_str()])
                .inc();
        }
        let intake = ctx.intake.as_mut().expect("taken in before its body");
        if intake.asks.is_none() {
            let body = body::held_body(session, &ctx.body);
            intake.read_body(body.as_deref(), &settings.models);
        }
        Ok(())
    }
}

/// Takes the request in by the routes of `table`: the intake it was parked with when `table`
/// is still the one that made it, else a new one. `Err` is the answer that refuses it.
fn take_in(
    session: &Session,
    started: std::time::Instant,
    table: &Arc<RouteTable>,
    parked: Option<&mut Parked>,
) -> std::result::Result<Intake, Answer> {
    if let Some(intake) = parked.and_then(|p| p.intake_for(table)) {
        return Ok(intake);
    }
    Intake::new(
        session.req_header(),
        classify::peer_ip(session),
        started,
        table,
    )
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
        // A request taken in at the connection door (see `front::park`) comes with its intake,
        // and, if it parked, its count and its verdict. It is taken here, so that every way out
        // of this phase gives back what it holds.
        let mut parked = ctx.parked.take();
        let table = self.app.table();
        // One snapshot for the whole request: a reload meanwhile applies to the next one.
        ctx.settings = table.settings.clone();
        let intake = match take_in(session, ctx.started, &table, parked.as_deref_mut()) {
            Ok(intake) => intake,
            Err(answer) => {
                ctx.stage = Stage::Refused;
                answer.send(session).await?;
                return Ok(true);
            }
        };
        let counted = parked.as_deref_mut().and_then(Parked::take_arrival);
        ctx.arrival = Some(
            counted.unwrap_or_else(|| Arrival::count(&self.app, &intake.who.client, ctx.started)),
        );
        ctx.intake = Some(intake);
        if parked.as_deref().is_some_and(Parked::client_left) {
            ctx.stage = Stage::ClientLeft;
            return client_left("client left while parked").map(|_| false);
        }
        let gate = match &ctx.intake().mode {
            Mode::Gated(gate) => gate.clone(),
            Mode::Passthrough => {
                ctx.stage = Stage::Passthrough;
                return Ok(false);
            }
            Mode::FailOpen => {
                ctx.stage = Stage::FailOpen;
                return Ok(false);
            }
        };
        let continues = ctx.intake().continues;

        // A client that sends `Expect: 100-continue` sends its body only once it is told to:
        // it is admitted first (not knowing its model), then told, then its body is read.
        if !continues {
            // A parked body keeps the share of the budget it had while it waited.
            let held = parked.as_deref_mut().and_then(Parked::take_body);
            self.hold_body(session, ctx, held).await?;
            ctx.downstream = Downstream::for_request(ctx.intake().keeps_alive());
        }
        // A request that waited before its session began (see `front::park`) has its verdict.
        let verdict = match parked.and_then(|mut p| p.verdict_from(&gate)) {
            Some(verdict) => Some(verdict),
            None => {
                let mut ticket = gate.admit_with(ctx.ask());
                let watch = !continues && ctx.body.is_complete();
                keepalive::verdict(session, &mut ticket, watch, &mut ctx.downstream).await?
            }
        };
        match verdict {
            Some(Verdict::Granted(grant)) => {
                ctx.attempt = Attempt::granted(&gate, grant);
                let at = now();
                ctx.admitted_at = Some(at);
                ctx.stage = Stage::Admitted { grant };
                let wait = at.saturating_duration_since(ctx.started);
                self.app
                    .activity
                    .granted(&ctx.intake().who.client, wait, at);
                if continues {
                    session.downstream_session.write_continue_response().await?;
                    // Met here: the upstream gets the body whole and has nothing to continue.
                    // (A passthrough route's request keeps it, and the upstream answers it.)
                    session
                        .req_header_mut()
                        .remove_header(&http::header::EXPECT);
                    self.hold_body(session, ctx, None).await?;
                }
                Ok(false)
            }
            Some(Verdict::Rejected { .. }) if ctx.settings.fallback_passthrough => {
                ctx.stage = Stage::FailOpen;
                Ok(false)
            }
            Some(Verdict::Rejected { why, retry_after }) => {
                ctx.stage = Stage::Rejected {
                    why,
                    retry_after,
                    after_upstream_429: false,
                };
                let answer = Answer::rejected(why, retry_after, false, ctx.model_id());
                if ctx.downstream.headers_sent() {
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
        let route = ctx.route().cloned().expect("request_filter sets the route");
        if let Stage::ReplayPending { backoff } = ctx.stage {
            let gate = route.gate.clone().expect("only rate-limited routes replay");
            if !backoff.is_zero()
                && wait::until(Some(&mut *session), tokio::time::sleep(backoff))
                    .await
                    .is_none()
            {
                ctx.stage = Stage::ClientLeft;
                return client_left("client left while waiting to replay");
            }
            let mut ticket = gate.admit_again_with(ctx.ask());
            match keepalive::verdict(session, &mut ticket, true, &mut ctx.downstream).await? {
                Some(Verdict::Granted(grant)) => {
                    ctx.attempt = Attempt::granted(&gate, grant);
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
        } else if ctx.attempt.is_sent() {
            // Pingora tries another address after a connection that failed: a new attempt on
            // the same grant.
            ctx.attempt = std::mem::take(&mut ctx.attempt).again();
        }
        let settings = ctx.settings.clone();
        let addr = route
            .upstream
            .resolve(settings.upstream.dns_ttl)
            .await
            .map_err(|e| Error::explain(ErrorType::ConnectError, e.to_string()).into_up())?;
        ctx.attempt.sent_at = Some(now());
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
        let route = ctx.route().cloned().expect("request_filter sets the route");
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
        let key = credential::put_upstream_key(request, &settings, lane)?;
        if let (Some(key), Some(_)) = (key, ctx.grant()) {
            route
                .metrics
                .key_request(&self.app.metrics, lane, &key.name);
            if settings.upstream.keys.len() > 1 {
                ctx.attempt.key = Some(key.name.clone());
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
        ctx.attempt.status = Some(status);
        let Some(route) = ctx.route() else {
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
        if let Some(grant) = ctx.grant() {
            let header = |name: &str| response.headers.get(name).and_then(|v| v.to_str().ok());
            if let Some(stated) = StatedTokens::read(header, SystemTime::now()) {
                gate.observe_stated_tokens(grant, stated);
            }
        }
        if let (401 | 403, Some(grant)) = (status, ctx.grant()) {
            if self.refused_key(ctx, &gate, grant, status)
                && ctx.body.is_complete()
                && ctx.replays < settings.max_replays
                && replay::nothing_of_the_answer_sent(ctx, session)
            {
                // The key was refused, not the request: it goes again on another key.
                ctx.attempt.observed = true;
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
        // A client that has its 200 already gets an error as an event at the end.
        ctx.downstream.upstream_answered(status);
        if matches!(status, 429 | 503) {
            // Passed on to the client: classify it once its body is read.
            ctx.attempt.refusal = Some(RefusalBody {
                status,
                from_headers: signal,
                body: Default::default(),
            });
            return Ok(());
        }
        if (200..300).contains(&status) && ctx.grant().is_some_and(|g| g.tokens.is_some()) {
            // What the upstream counts is read from the answer as it passes.
            ctx.attempt.usage = Some(UsageReader::default());
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
        if let Some(refusal) = ctx.attempt.refusal.as_mut() {
            if let Some(chunk) = body.as_ref() {
                keep_error_body(&mut refusal.body, chunk);
            }
            if end_of_stream || refusal.body.len() >= ERROR_BODY_LIMIT {
                self.settle_refusal(ctx);
            }
        }
        if !ctx.attempt.first_chunk_seen {
            if let Some(chunk) = body.as_ref().filter(|b| !b.is_empty()) {
                ctx.attempt.first_chunk_seen = true;
                self.capacity_error_in_a_success(ctx, chunk);
            }
        }
        if let Some(reader) = ctx.attempt.usage.as_mut() {
            if let Some(chunk) = body.as_ref() {
                reader.feed(chunk);
            }
            if end_of_stream {
                self.settle_usage(ctx);
            }
        }
        ctx.downstream.answer_body(body, end_of_stream);
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
        let Some(route) = ctx.route().cloned() else {
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
            error_code: failure::answer_failure(session, e, ctx).await,
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

/// The error that ends a request whose client left while it waited.
fn client_left(context: &'static str) -> Result<Box<HttpPeer>> {
    Error::e_explain(ErrorType::ConnectionClosed, context).map_err(|e| e.into_down())
}
