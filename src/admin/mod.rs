//! The admin plane: metrics, health, status, the live dashboard and its stream, and the config
//! API, served by axum.
//!
//! Its listener belongs to a Pingora listening service (`AdminApp`), exactly like the proxy's:
//! Pingora accepts the connections and axum serves them. On a graceful upgrade (`-u` and
//! SIGQUIT) Pingora hands this listening socket to the new process together with the proxy's,
//! so not one admin connection is refused or reset. (A separate socket bound with
//! `SO_REUSEPORT` in each process was tried first: when the old process closed its socket, the
//! connections waiting in that socket's accept queue were reset — one or two per upgrade under
//! load.) A small background service, `StatusSampler`, publishes the status snapshot once per
//! second and marks the start of draining.

mod config_api;
mod dashboard;
mod guard;
mod history;
mod lanes;
mod limits_api;
mod routes;
mod status;

pub use status::{Snapshot, StatusBuilder};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use crate::app::App;
use crate::proxy::Slots;

/// State shared by the admin handlers.
pub(crate) struct AdminState {
    pub app: Arc<App>,
    /// Builds snapshots: once per second for the stream, and fresh for `/status` and scrapes.
    pub builder: Mutex<StatusBuilder>,
    /// The latest snapshot as JSON, published once per second.
    pub status: watch::Receiver<Arc<str>>,
    /// Set when shutdown began: readiness turns 503.
    pub draining: AtomicBool,
    /// The proxy port's connections: readiness turns 503 while a new one would be refused.
    pub proxy_slots: Arc<Slots>,
}

impl AdminState {
    /// A snapshot of this instant (building one also refreshes the gauges of `/metrics`).
    pub fn snapshot(&self) -> Snapshot {
        self.lock_builder().build()
    }

    /// A snapshot of this instant, as JSON.
    pub fn snapshot_json(&self) -> String {
        serde_json::to_string(&self.snapshot()).expect("snapshots serialise")
    }

    /// The sampler's step, as JSON: a snapshot whose history sample joins the ring.
    pub fn tick_json(&self) -> String {
        let snapshot = self.lock_builder().tick();
        serde_json::to_string(&snapshot).expect("snapshots serialise")
    }

    /// The five-minute history as JSON.
    pub fn history_json(&self) -> String {
        serde_json::to_string(&self.lock_builder().history().view()).expect("history serialises")
    }

    fn lock_builder(&self) -> std::sync::MutexGuard<'_, StatusBuilder> {
        self.builder.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds the two halves of the admin plane: the connection handler for Pingora's listening
/// service and the sampler background service.
pub fn admin_plane(app: Arc<App>, proxy_slots: Arc<Slots>) -> (AdminApp, StatusSampler) {
    let mut builder = StatusBuilder::new(app.clone());
    let first = serde_json::to_string(&builder.build()).expect("snapshots serialise");
    let (tx, rx) = watch::channel::<Arc<str>>(Arc::from(first));
    let state = Arc::new(AdminState {
        app,
        builder: Mutex::new(builder),
        status: rx,
        draining: AtomicBool::new(false),
        proxy_slots,
    });
    let router = routes::router(state.clone());
    let grace = state.app.settings().server.grace_period;
    let drain = grace.saturating_sub(Duration::from_millis(250).min(grace / 2));
    (
        AdminApp {
            router,
            drain,
            connections: Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX)),
        },
        StatusSampler {
            state,
            publish: Mutex::new(Some(tx)),
        },
    )
}

/// Time an admin client has to send a whole request header, and that an idle kept-alive
/// admin connection stays open.
pub const ADMIN_HEADER_DEADLINE: Duration = Duration::from_secs(10);

/// Admin connections open at once at most.
pub const ADMIN_CONNECTIONS_MAX: usize = 128;

/// Serves admin connections accepted by Pingora.
pub struct AdminApp {
    router: axum::Router,
    connections: Arc<tokio::sync::Semaphore>,
    /// How long an open admin connection keeps serving once shutdown began: most of the grace
    /// period, so that it closes cleanly before the runtime stops.
    drain: Duration,
}

#[async_trait]
impl ServerApp for AdminApp {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A bounded number of admin connections: a flood of idle or slow ones must not take
        // the file descriptors the proxy needs.
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            log::warn!("admin plane: {ADMIN_CONNECTIONS_MAX} connections open, refusing another");
            return None;
        };
        let io = hyper_util::rt::TokioIo::new(session);
        let service = hyper_util::service::TowerToHyperService::new(self.router.clone());
        // The whole request header must arrive within the deadline, and a kept-alive
        // connection that sends no next request is closed after as long.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(ADMIN_HEADER_DEADLINE)
            .serve_connection(io, service);
        tokio::pin!(connection);
        let mut shutdown = shutdown.clone();
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    log::debug!("admin connection ended: {e}");
                }
                return None;
            }
            _ = shutdown.changed() => {}
        }
        // Draining: keep answering on this connection (readiness says 503) until just before
        // the grace period ends, then finish the request in hand and close cleanly.
        let _ = tokio::time::timeout(self.drain, connection.as_mut()).await;
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
        None
    }
}

/// Publishes the status snapshot every second; on shutdown marks draining and ends every
/// dashboard stream.
pub struct StatusSampler {
    state: Arc<AdminState>,
    publish: Mutex<Option<watch::Sender<Arc<str>>>>,
}

#[async_trait]
impl BackgroundService for StatusSampler {
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(tx) = self
            .publish
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        crate::supervise::supervise(
            "status sampler",
            status::run_sampler(self.state.clone(), tx, shutdown),
        )
        .await;
        self.state.draining.store(true, Ordering::SeqCst);
    }
}
