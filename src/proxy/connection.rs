//! One client connection on the proxy port: the cap on connections, the header deadline, and
//! the loop over its HTTP/1 requests.
//!
//! The loop is Pingora's own (`ServerApp` for an `HttpServerApp`), run here so that the next
//! request's first bytes are read by the sidecar: a request that must queue is parked before
//! Pingora builds its session (see `parking`), and an idle kept-alive connection holds no
//! session either. Pingora then reads what was read here as the start of the request: as its
//! pipelined prefix (the first read of a request that did not park), or from the stream
//! again (a parked request, or more than a first read, see `HeaderDeadline::replay`). It
//! parses and serves every request as before.

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

use super::body::BodyBudget;
use super::header_deadline::{HeaderDeadline, HEADER_DEADLINE};
use super::parking;
use crate::app::App;

/// The keep-alive time a connection's first request starts with (Pingora's default); the
/// request's own `Connection` and `Keep-Alive` headers then decide.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// The first read of a request: what Pingora would read its header into.
const FIRST_READ: usize = 4096;

/// The proxy's listening application: Pingora's HTTP proxy, behind a connection cap, a header
/// deadline and request parking.
pub struct ProxyApp<A> {
    inner: Arc<A>,
    app: Arc<App>,
    bodies: BodyBudget,
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
    /// The service stopped listening: idle connections close instead of waiting.
    stopping: AtomicBool,
    stopped: Notify,
}

impl<A> ProxyApp<A> {
    /// `inner` behind a cap of `max_connections` (`server.max_connections`); parked bodies
    /// count against `bodies`.
    pub fn new(inner: A, app: Arc<App>, bodies: BodyBudget, max_connections: usize) -> Self {
        ProxyApp {
            inner: Arc::new(inner),
            app,
            bodies,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            max_connections,
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
        }
    }

    /// Reads the first bytes of the connection's next request into `buf`; false when the
    /// connection is to close (the client closed it, its header deadline passed, or the
    /// service is stopping).
    async fn next_request(&self, stream: &mut Stream, buf: &mut BytesMut) -> bool {
        let stopped = self.stopped.notified();
        if self.stopping.load(Ordering::Acquire) {
            return false;
        }
        // No time limit, as in Pingora's loop: a new connection's first header has the header
        // deadline, and HTTP/1.1 connections are kept alive as long as the client keeps them.
        tokio::select! {
            biased;
            read = stream.read_buf(buf) => matches!(read, Ok(n) if n > 0),
            _ = stopped => false,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for ProxyApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            log::warn!(
                "proxy: {} connections open (server.max_connections), refusing another",
                self.max_connections
            );
            return None;
        };
        let peer: Option<IpAddr> = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut stream: Stream = Box::new(HeaderDeadline::new(stream, HEADER_DEADLINE));
        let mut first = true;
        let mut persisted: Option<HttpPersistentSettings> = None;
        loop {
            let mut buf = BytesMut::with_capacity(FIRST_READ);
            if !self.next_request(&mut stream, &mut buf).await {
                return None;
            }
            let parked = parking::park(&self.app, &self.bodies, &mut stream, &mut buf, peer).await;
            if parked.is_some() || buf.len() > FIRST_READ {
                // Pingora reads a parked request (or one whose body was read ahead before it
                // turned out not to park) from the stream as it came, in reads of its own
                // size: a large body arrives in the pieces Pingora keeps the tail of, and
                // never as one header read larger than Pingora allows.
                let Ok(mut deadline) = stream.into_any().downcast::<HeaderDeadline>() else {
                    log::error!("proxy: a connection lost its header deadline; closing it");
                    return None;
                };
                deadline.replay(std::mem::take(&mut buf));
                stream = deadline;
            }
            let mut session = ServerSession::new_http1(stream);
            if first {
                // As Pingora sets up a connection's first request.
                session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_IDLE.as_secs()));
                session.set_keepalive_reuses_remaining(
                    self.inner
                        .server_options()
                        .and_then(|o| o.keepalive_request_limit),
                );
                first = false;
            } else if let Some(settings) = persisted.take() {
                settings.apply_to_session(&mut session);
            }
            if !buf.is_empty() {
                session.set_pipelined_prefix(buf);
            }
            if let Some(parked) = parked {
                session.set_connection_user_context(Some(Box::new(parked)));
            }
            let reused = self.inner.process_new_http(session, shutdown).await?;
            (stream, persisted) = reused.consume();
        }
    }

    async fn cleanup(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.notify_waiters();
        self.inner.cleanup().await
    }
}
