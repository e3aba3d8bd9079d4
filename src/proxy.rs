//! The proxy: Pingora's `ProxyHttp` phases for one request — classify, admit, forward,
//! observe, stream, log. Everything a request needs lives in its `RequestCtx`.
//!
//! Replaying after an upstream 429 rides on Pingora's own retry loop: the request body (up to
//! Pingora's 64 KiB retry buffer) is read before admission with retry buffering on; when the
//! upstream's 429 has been read (header and body, before anything reached the client),
//! `upstream_response_body_filter` returns an error marked retryable; `error_while_proxy`
//! keeps it retryable; Pingora then calls `upstream_peer` again, where the request waits for a
//! new token at the head of its class, and re-sends the buffered body. Pingora's
//! `max_retries` is set above `adaptive.max_replays` so our own bound is the one that counts.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora_core::prelude::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};

use crate::admission::{now, Ticket, Verdict};
use crate::app::{App, Route};
use crate::limiter::{Priority, Rejection, UpstreamSignal};
use crate::metrics::Outcome;

/// Bodies up to this size are read before admission, which lets the sidecar notice a client
/// that leaves the queue and replay the request after an upstream 429. It is the size of
/// Pingora's retry buffer; larger bodies stream straight through and are not replayed.
pub const REPLAY_BODY_LIMIT: usize = 64 * 1024;

/// How much of an upstream 429 body is kept to tell rate limits from billing or concurrency.
const HELD_429_BODY_LIMIT: usize = 4096;

/// Longest client id kept from `X-Client-Id`.
const CLIENT_ID_MAX: usize = 64;

/// The error that sends a request back to the queue after an upstream 429.
const REPLAY_ERROR: ErrorType = ErrorType::Custom("upstream rate limited, replaying");

/// An upstream 429 whose body is still arriving.
struct Held429 {
    headers: Vec<(String, String)>,
    body: BytesMut,
}

/// The story of one request.
pub struct RequestCtx {
    started: Instant,
    route: Option<Arc<Route>>,
    client: Arc<str>,
    priority: Priority,
    deadline: Instant,
    /// The body was read before admission and sits in Pingora's retry buffer.
    body_buffered: bool,
    admitted_at: Option<Instant>,
    replays: u32,
    replay_pending: bool,
    held_429: Option<Held429>,
    upstream_sent_at: Option<Instant>,
    upstream_status: Option<u16>,
    /// Set when the sidecar itself answered (or gave up) before the upstream could.
    outcome: Option<Outcome>,
    rejection: Option<(Rejection, Duration)>,
    fallback: bool,
}

impl RequestCtx {
    fn new() -> Self {
        let started = now();
        RequestCtx {
            started,
            route: None,
            client: Arc::from("-"),
            priority: Priority::Normal,
            deadline: started,
            body_buffered: false,
            admitted_at: None,
            replays: 0,
            replay_pending: false,
            held_429: None,
            upstream_sent_at: None,
            upstream_status: None,
            outcome: None,
            rejection: None,
            fallback: false,
        }
    }

    fn route_name(&self) -> &str {
        self.route.as_ref().map_or("none", |r| r.name())
    }
}

/// The sidecar's `ProxyHttp` implementation.
pub struct SidecarProxy {
    app: Arc<App>,
}

impl SidecarProxy {
    pub fn new(app: Arc<App>) -> Self {
        SidecarProxy { app }
    }
}

/// An OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, code: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "code": code, "param": null}
    });
    Bytes::from(body.to_string())
}

/// Writes a complete JSON answer of the sidecar's own.
async fn respond_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    retry_after: Option<Duration>,
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(wait) = retry_after {
        header.insert_header(
            http::header::RETRY_AFTER,
            retry_after_secs(wait).to_string(),
        )?;
    }
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// The outcome counted for a request the sidecar answered 429 itself.
fn rejected(why: Rejection) -> Outcome {
    match why {
        Rejection::QueueFull => Outcome::RejectedQueueFull,
        Rejection::QueueTimeout => Outcome::RejectedQueueTimeout,
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

/// Waits for a ticket's verdict while watching the client; `None` means the client left.
/// `watch_client` is only safe once the request body has been read completely.
async fn wait_for_token(
    session: &mut Session,
    ticket: &mut Ticket,
    watch_client: bool,
) -> Option<Verdict> {
    if let Some(verdict) = ticket.immediate() {
        return Some(verdict);
    }
    if !watch_client {
        return Some(ticket.verdict().await);
    }
    tokio::select! {
        verdict = ticket.verdict() => Some(verdict),
        read = session.downstream_session.read_body_or_idle(true) => match read {
            Err(e) if matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError) => None,
            // Anything else (pipelined bytes): stop watching, keep waiting.
            _ => Some(ticket.verdict().await),
        },
    }
}

fn client_id(session: &Session) -> Arc<str> {
    let header = session
        .req_header()
        .headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    match header {
        Some(id) => Arc::from(
            id.chars()
                .filter(|c| !c.is_control())
                .take(CLIENT_ID_MAX)
                .collect::<String>(),
        ),
        None => match session.client_addr().and_then(|a| a.as_inet()) {
            Some(inet) => Arc::from(inet.ip().to_string()),
            None => Arc::from("unknown"),
        },
    }
}

fn priority(session: &Session) -> Priority {
    session
        .req_header()
        .headers
        .get("x-priority")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(Priority::Normal)
}

impl SidecarProxy {
    /// Refuses what an egress proxy for configured upstreams must not do.
    async fn refuse_foreign(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        if req.method == Method::CONNECT {
            ctx.outcome = Some(Outcome::Refused);
            let body = error_body(
                "CONNECT is not supported: this is not an open proxy",
                "invalid_request_error",
                "method_not_allowed",
            );
            respond_json(session, 405, body, None).await?;
            return Ok(true);
        }
        // Pingora normalises the parsed URI; the raw target shows an absolute-form request.
        // Origin-form targets (the usual case) start with '/' and need no parsing.
        let absolute = if req.raw_path().starts_with(b"/") {
            None
        } else {
            String::from_utf8_lossy(req.raw_path())
                .parse::<http::Uri>()
                .ok()
                .filter(|uri| uri.scheme().is_some() && uri.host().is_some())
        };
        if let Some(uri) = absolute {
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().or(match uri.scheme_str() {
                Some("https") => Some(443),
                Some("http") => Some(80),
                _ => None,
            });
            if !self.app.table().is_configured_upstream(host, port) {
                ctx.outcome = Some(Outcome::Refused);
                let message =
                    format!("{host} is not a configured upstream: this is not an open proxy");
                respond_json(
                    session,
                    403,
                    error_body(&message, "invalid_request_error", "forbidden_target"),
                    None,
                )
                .await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads a small request body into Pingora's retry buffer before admission.
    async fn buffer_small_body(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        if session.downstream_session.is_body_empty() {
            ctx.body_buffered = true;
            return Ok(());
        }
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        if declared.is_none_or(|len| len > REPLAY_BODY_LIMIT) {
            return Ok(());
        }
        session.downstream_session.enable_retry_buffering();
        let deadline = tokio::time::Instant::from_std(ctx.deadline);
        let read_all = async {
            while session
                .downstream_session
                .read_request_body()
                .await?
                .is_some()
            {}
            Ok::<(), Box<Error>>(())
        };
        match tokio::time::timeout_at(deadline, read_all).await {
            Ok(result) => result?,
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ReadTimedout,
                    "request body not received before the deadline",
                )
                .map_err(|e| e.into_down())
            }
        }
        ctx.body_buffered = !session.downstream_session.retry_buffer_truncated();
        Ok(())
    }

    /// Answers with the sidecar's own 429 (queue full or deadline passed).
    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        why: Rejection,
        retry_after: Duration,
    ) -> Result<()> {
        ctx.outcome = Some(rejected(why));
        let message = match why {
            Rejection::QueueFull => "the sidecar's queue is full; retry later",
            Rejection::QueueTimeout => "no request token became free before the request's deadline",
        };
        respond_json(
            session,
            429,
            error_body(message, "rate_limit_exceeded", why.code()),
            Some(retry_after),
        )
        .await
    }

    /// Decides what to do with an upstream 429 once its body is known: `true` to replay.
    fn settle_429(&self, session: &Session, ctx: &mut RequestCtx, held: Held429) -> bool {
        let Some(gate) = ctx.route.as_ref().and_then(|r| r.gate.clone()) else {
            return false;
        };
        let lookup = |name: &str| {
            held.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let signal = UpstreamSignal::read(429, lookup, &held.body, SystemTime::now());
        gate.observe(&signal);
        if !matches!(signal, UpstreamSignal::RateLimited { .. }) {
            return false;
        }
        let settings = self.app.settings();
        let remaining = ctx.deadline.saturating_duration_since(now());
        let replay = ctx.body_buffered
            && !ctx.fallback
            && ctx.replays < settings.max_replays
            && session.response_written().is_none()
            && gate.estimated_wait(ctx.priority) < remaining;
        if replay {
            ctx.replays += 1;
            ctx.replay_pending = true;
            self.app
                .metrics
                .replays
                .with_label_values(&[ctx.route_name()])
                .inc();
        }
        replay
    }
}

#[async_trait]
impl ProxyHttp for SidecarProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        self.app.metrics.inflight.inc();
        if self.refuse_foreign(session, ctx).await? {
            return Ok(true);
        }
        let table = self.app.table();
        let route = table.route_for(session.req_header().uri.path()).clone();
        let settings = &table.settings;
        ctx.client = client_id(session);
        ctx.priority = priority(session);
        let budget = match ctx.priority {
            Priority::Low => settings.low_priority_timeout,
            _ => settings.request_timeout,
        };
        ctx.deadline = ctx.started + budget;
        let gate = route.gate.clone();
        ctx.route = Some(route);
        let Some(gate) = gate else {
            return Ok(false); // passthrough route: no token
        };

        if settings.fallback_passthrough && gate.is_degraded() {
            // The shared quota is out of reach and the operator chose to fail open.
            ctx.fallback = true;
            return Ok(false);
        }
        self.buffer_small_body(session, ctx).await?;
        let mut ticket = gate.admit(ctx.client.clone(), ctx.priority, ctx.deadline);
        match wait_for_token(session, &mut ticket, ctx.body_buffered).await {
            Some(Verdict::Granted) => {
                ctx.admitted_at = Some(now());
                Ok(false)
            }
            Some(Verdict::Rejected { .. }) if settings.fallback_passthrough => {
                ctx.fallback = true;
                Ok(false)
            }
            Some(Verdict::Rejected { why, retry_after }) => {
                self.reject(session, ctx, why, retry_after).await?;
                Ok(true)
            }
            None => {
                ctx.outcome = Some(Outcome::ClientClosed);
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
        if ctx.replay_pending {
            ctx.replay_pending = false;
            let gate = route.gate.clone().expect("only rate-limited routes replay");
            let mut ticket = gate.admit_again(ctx.client.clone(), ctx.priority, ctx.deadline);
            match wait_for_token(session, &mut ticket, true).await {
                Some(Verdict::Granted) => {}
                Some(Verdict::Rejected { why, retry_after }) => {
                    ctx.rejection = Some((why, retry_after));
                    return Error::e_explain(
                        ErrorType::HTTPStatus(429),
                        "deadline passed while waiting to replay",
                    );
                }
                None => {
                    ctx.outcome = Some(Outcome::ClientClosed);
                    return Error::e_explain(
                        ErrorType::ConnectionClosed,
                        "client left while waiting to replay",
                    )
                    .map_err(|e| e.into_down());
                }
            }
        }
        let settings = self.app.settings();
        let addr = route
            .upstream
            .resolve(settings.upstream.dns_ttl)
            .await
            .map_err(|e| Error::explain(ErrorType::ConnectError, e.to_string()).into_up())?;
        ctx.upstream_sent_at = Some(now());
        Ok(Box::new(route.upstream.peer(addr, &settings.upstream)))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
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
        let settings = self.app.settings();
        if let Some(authorization) = &settings.upstream.authorization {
            request.insert_header(http::header::AUTHORIZATION, authorization.clone())?;
        }
        for name in [
            "x-client-id",
            "x-priority",
            "proxy-authorization",
            "proxy-connection",
        ] {
            request.remove_header(name);
        }
        for (name, value) in &settings.upstream.headers {
            request.insert_header(name.clone(), value.clone())?;
        }
        let _ = session;
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
        self.app
            .metrics
            .upstream_responses
            .with_label_values(&[ctx.route_name(), status.to_string().as_str()])
            .inc();
        let Some(gate) = ctx.route.as_ref().and_then(|r| r.gate.clone()) else {
            return Ok(());
        };
        if status == StatusCode::TOO_MANY_REQUESTS.as_u16() {
            let headers = response
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let held = Held429 {
                headers,
                body: BytesMut::new(),
            };
            let empty_body = response
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
            if empty_body {
                // No body task will follow: decide now.
                if self.settle_429(session, ctx, held) {
                    return Err(replay_error());
                }
            } else {
                ctx.held_429 = Some(held);
            }
            return Ok(());
        }
        let signal = UpstreamSignal::read(
            status,
            |name| response.headers.get(name).and_then(|v| v.to_str().ok()),
            &[],
            SystemTime::now(),
        );
        gate.observe(&signal);
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
            response.insert_header("x-sidecar-queue-wait-ms", wait.to_string())?;
        }
        if ctx.replays > 0 {
            response.insert_header("x-sidecar-replays", ctx.replays.to_string())?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(held) = ctx.held_429.as_mut() {
            if let Some(chunk) = body.as_ref() {
                let room = HELD_429_BODY_LIMIT.saturating_sub(held.body.len());
                held.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if end_of_stream || held.body.len() >= HELD_429_BODY_LIMIT {
                let held = ctx.held_429.take().expect("checked above");
                if self.settle_429(session, ctx, held) {
                    return Err(replay_error());
                }
            }
        }
        Ok(None)
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
        if ctx.replay_pending {
            // A 429 means the upstream did not act on the request: safe to send again,
            // whatever the method.
            e.set_retry(true);
        } else if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
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
        let client_gone = ctx.outcome == Some(Outcome::ClientClosed)
            || (e.esource() == &ErrorSource::Downstream
                && matches!(
                    e.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                ));
        let answer = if client_gone || session.response_written().is_some() {
            None
        } else if let Some((why, retry_after)) = ctx.rejection {
            ctx.outcome = Some(rejected(why));
            let message = "the upstream kept answering 429 and no token became free again before the deadline";
            Some((
                429,
                error_body(message, "rate_limit_exceeded", why.code()),
                Some(retry_after),
            ))
        } else {
            let (status, code) = if e.esource() == &ErrorSource::Downstream {
                match e.etype() {
                    ErrorType::ReadTimedout => (408, "request_timeout"),
                    _ => (400, "bad_request"),
                }
            } else {
                match e.etype() {
                    ErrorType::ConnectTimedout
                    | ErrorType::ReadTimedout
                    | ErrorType::WriteTimedout => (504, "upstream_timeout"),
                    ErrorType::HTTPStatus(status) => (*status, "upstream_error"),
                    _ => (502, "upstream_unreachable"),
                }
            };
            let route = ctx
                .route
                .as_ref()
                .map_or("?".to_string(), |r| r.settings.upstream.to_string());
            let message = format!("upstream {route} failed: {}", e.etype().as_str());
            Some((status, error_body(&message, "upstream_error", code), None))
        };
        let code = match answer {
            Some((status, body, retry_after)) => {
                match respond_json(session, status, body, retry_after).await {
                    Ok(()) => status,
                    Err(_) => 0,
                }
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, error: &Error) -> bool {
        // Clients leaving and the sidecar's own 429s are counted, not errors.
        ctx.outcome == Some(Outcome::ClientClosed)
            || ctx.rejection.is_some()
            || (error.esource() == &ErrorSource::Downstream
                && matches!(
                    error.etype(),
                    ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
                ))
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &RequestCtx,
        _e: &Error,
        _c: ProxyWarnLogContext,
    ) -> bool {
        // A replay after an upstream 429 is routine; it is counted in replays_total.
        ctx.replay_pending
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let metrics = &self.app.metrics;
        metrics.inflight.dec();
        let outcome = ctx.outcome.unwrap_or_else(|| match error {
            Some(e)
                if e.esource() == &ErrorSource::Downstream
                    && matches!(
                        e.etype(),
                        ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
                    ) =>
            {
                Outcome::ClientClosed
            }
            Some(_) => Outcome::UpstreamError,
            None if ctx.admitted_at.is_some() => Outcome::Forwarded,
            None => Outcome::Passthrough,
        });
        let route = ctx.route_name().to_string();
        metrics
            .requests
            .with_label_values(&[route.as_str(), outcome.as_str()])
            .inc();
        let queue_wait = ctx
            .admitted_at
            .map(|at| at.saturating_duration_since(ctx.started));
        if let Some(wait) = queue_wait {
            metrics
                .queue_wait
                .with_label_values(&[ctx.priority.as_str()])
                .observe(wait.as_secs_f64());
        }
        let upstream_time = ctx
            .upstream_sent_at
            .map(|at| now().saturating_duration_since(at));
        if let (Some(time), Some(_)) = (upstream_time, ctx.upstream_status) {
            metrics
                .upstream_duration
                .with_label_values(&[route.as_str()])
                .observe(time.as_secs_f64());
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        log::info!(
            target: "access",
            "client={} route={} method={} path={} status={} priority={} queue_wait_ms={} upstream_ms={} replays={} outcome={}{}",
            ctx.client,
            route,
            req.method,
            req.uri.path(),
            status,
            ctx.priority,
            queue_wait.map_or(0, |w| w.as_millis()),
            upstream_time.map_or(0, |t| t.as_millis()),
            ctx.replays,
            outcome.as_str(),
            if ctx.fallback { " fallback=fail_open" } else { "" },
        );
    }
}

fn replay_error() -> Box<Error> {
    let mut e = Error::explain(
        REPLAY_ERROR,
        "the upstream answered 429; the request goes back to the queue",
    );
    e.set_retry(true);
    e.into_up()
}
