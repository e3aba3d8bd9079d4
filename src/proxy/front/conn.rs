//! One client connection on the proxy port: its room among the connections (`slots`), its
//! idle time, and the loop over its HTTP/1 requests.
//!
//! **What this copies from Pingora, and where it differs.** The loop is Pingora's own
//! (`ServerApp` for an `HttpServerApp`, pingora-core 0.9 `apps/mod.rs`): a session per request,
//! keep-alive settings carried from one to the next, the connection's first request set up as
//! Pingora sets it up. It is run here so that each request's first bytes are read by the
//! sidecar: a request that must queue is parked before Pingora builds its session (see
//! `park`), and an idle kept-alive connection holds no session either. Pingora then reads what
//! was read here as the start of the request: as its pipelined prefix (the first read of a
//! request that did not park), or from the stream again (`FrontStream::replay`). It parses
//! and serves every request as before. Where it differs:
//! - **HTTP/1 only.** Pingora's loop also speaks h2c (prior knowledge, when its
//!   `HttpServerOptions::h2c` is set) and HTTP/2 chosen by ALPN on TLS. The proxy port is
//!   plain TCP and the sidecar sets neither, so those branches never ran here: HTTP/2 is not
//!   supported on the proxy port, and a client that sends the h2 preface gets Pingora's
//!   answer to a malformed HTTP/1 request.
//! - **Idle time is bounded.** Pingora waits for a kept-alive connection's next request under
//!   its keep-alive timeout inside the session; here the wait is the loop's, bounded by
//!   `server.keepalive_timeout` (or the client's shorter `Keep-Alive: timeout=N`), and an idle
//!   connection is closed early when a new one needs its room (`slots`).
//! - **Every exit is counted** in `proxy_connections_closed_total{reason}` (`Closed`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora_core::protocols::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use super::park;
use super::slots::Slots;
use super::stream::{FrontStream, HEADER_DEADLINE};
use crate::app::App;
use crate::proxy::body::BodyBudget;

/// The first read of a request: what Pingora would read its header into.
const FIRST_READ: usize = 4096;

/// Why a connection was closed, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it, or it broke.
    Client,
    /// Pingora ended it after an answer (not kept alive, or an error answered).
    RequestEnd,
    /// Its request head did not arrive within the header deadline.
    HeaderDeadline,
    /// Idle longer than its keep-alive timeout.
    IdleTimeout,
    /// Idle, closed to make room for a new connection at `server.max_connections`.
    Evicted,
    /// Refused at accept: `server.max_connections` open and none idle.
    RefusedFull,
    /// The service stopped listening.
    Stopping,
    /// The stream came back from Pingora as something else than it was given: a fault.
    LostStream,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Client => "client",
            Closed::RequestEnd => "request_end",
            Closed::HeaderDeadline => "header_deadline",
            Closed::IdleTimeout => "idle_timeout",
            Closed::Evicted => "evicted",
            Closed::RefusedFull => "refused_full",
            Closed::Stopping => "stopping",
            Closed::LostStream => "lost_stream",
        }
    }
}

/// The proxy's listening application: Pingora's HTTP proxy, behind the connection slots, a
/// header deadline and request parking.
pub struct ProxyApp<A> {
    inner: Arc<A>,
    app: Arc<App>,
    bodies: BodyBudget,
    slots: Arc<Slots>,
    /// The service stopped listening: idle connections close instead of waiting.
    stopping: AtomicBool,
    stopped: Notify,
}

impl<A> ProxyApp<A> {
    /// `inner` behind `slots` (`server.max_connections`); parked bodies count against
    /// `bodies`.
    pub fn new(inner: A, app: Arc<App>, bodies: BodyBudget, slots: Arc<Slots>) -> Self {
        ProxyApp {
            inner: Arc::new(inner),
            app,
            bodies,
            slots,
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
        }
    }

    /// Waits, idle, until `buf` holds the first bytes of the connection's next request (at
    /// once when it holds some already); `Err` when the connection is to close instead.
    async fn next_request(
        &self,
        stream: &mut FrontStream,
        buf: &mut BytesMut,
        idle_for: Duration,
    ) -> Result<(), Closed> {
        if !buf.is_empty() {
            return Ok(());
        }
        let stopped = self.stopped.notified();
        if self.stopping.load(Ordering::Acquire) {
            return Err(Closed::Stopping);
        }
        let mark = self.slots.idle_mark();
        tokio::select! {
            biased;
            read = stream.read_buf(buf) => match read {
                Ok(n) if n > 0 => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(Closed::HeaderDeadline),
                _ => Err(Closed::Client),
            },
            _ = stopped => Err(Closed::Stopping),
            _ = mark.closed() => Err(Closed::Evicted),
            _ = tokio::time::sleep(idle_for) => Err(Closed::IdleTimeout),
        }
    }

    /// The connection's requests, one after the other, until it closes; why it did.
    async fn serve(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Closed
    where
        A: HttpServerApp + Send + Sync + 'static,
    {
        let peer: Option<IpAddr> = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut stream = Box::new(FrontStream::new(stream, HEADER_DEADLINE));
        let mut persisted: Option<HttpPersistentSettings> = None;
        let mut first = true;
        let mut idle_for = self.app.settings().server.keepalive_timeout;
        let mut buf = BytesMut::with_capacity(FIRST_READ);
        loop {
            if let Err(closed) = self.next_request(&mut stream, &mut buf, idle_for).await {
                return closed;
            }
            let parking = park::park(&self.app, &self.bodies, &mut stream, &mut buf, peer).await;
            let (parked, ahead) = match parking {
                Some((parked, ahead)) => (Some(parked), ahead),
                None => (None, BytesMut::new()),
            };
            idle_for = keepalive_for(&buf, self.app.settings().server.keepalive_timeout);
            if parked.is_some() || buf.len() > FIRST_READ {
                // Pingora reads a parked request (or one whose body was read ahead before it
                // turned out not to park) from the stream as it came, in reads of its own
                // size: a large body arrives in the pieces Pingora keeps the tail of, and
                // never as one header read larger than Pingora allows.
                stream.replay(std::mem::take(&mut buf));
            }
            // What came behind a parked request is the start of the next one: it waits, and
            // what is still unread waits in the socket, until this one is answered.
            stream.hold_back(!ahead.is_empty());
            let mut session = ServerSession::new_http1(stream);
            if first {
                // As Pingora sets up a connection's first request.
                session.set_keepalive((!*shutdown.borrow()).then_some(idle_for.as_secs().max(1)));
                session.set_keepalive_reuses_remaining(
                    self.inner
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
            } else if let Some(settings) = persisted.take() {
                settings.apply_to_session(&mut session);
            }
            if !buf.is_empty() {
                session.set_pipelined_prefix(std::mem::take(&mut buf));
            }
            if let Some(parked) = parked {
                park::hand_over(&mut session, parked);
            }
            let Some(reused) = self.inner.process_new_http(session, shutdown).await else {
                return Closed::RequestEnd;
            };
            let (again, settings) = reused.consume();
            let Some(again) = FrontStream::regain(again) else {
                log::error!("proxy: a connection came back without its front stream; closing it");
                return Closed::LostStream;
            };
            stream = again;
            stream.hold_back(false);
            (first, persisted) = (false, settings);
            buf = ahead;
            if buf.capacity() < FIRST_READ {
                buf.reserve(FIRST_READ - buf.len());
            }
        }
    }
}

/// How long the connection may stay idle after the request that starts `buf`: `server` (the
/// configured `server.keepalive_timeout`), or the client's own shorter `Keep-Alive: timeout=N`
/// when the head in `buf` asks for it.
fn keepalive_for(buf: &[u8], server: Duration) -> Duration {
    let asked = park::client_keepalive(buf);
    asked.map_or(server, |asked| asked.min(server))
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ProxyApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let metrics = &self.app.metrics;
        let Ok(_permit) = self.slots.admit().await else {
            log::warn!(
                "proxy: {} connections open (server.max_connections), none idle; refusing another",
                self.slots.max()
            );
            metrics
                .connections_closed
                .with_label_values(&[Closed::RefusedFull.as_str()])
                .inc();
            return None;
        };
        let closed = self.serve(stream, shutdown).await;
        metrics
            .connections_closed
            .with_label_values(&[closed.as_str()])
            .inc();
        None
    }

    async fn cleanup(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.notify_waiters();
        self.inner.cleanup().await
    }
}
