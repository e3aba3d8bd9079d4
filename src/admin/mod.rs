//! The admin plane: a Pingora background service running axum on `admin.listen_host:
//! metrics_port` — metrics, health, status, the live dashboard and its stream, and the config
//! API. Its listener is bound with `SO_REUSEPORT` so that a graceful upgrade (`-u`) can bind the
//! same port in the new process while the old one drains.

mod config_api;
mod dashboard;
mod routes;
mod status;

pub use status::{Snapshot, StatusBuilder};

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use crate::app::App;

/// Binds the admin listener (before the server starts, so a taken port fails start-up).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl AdminState {
    /// A snapshot of this instant, as JSON.
    pub fn snapshot_json(&self) -> String {
        let snapshot = self
            .builder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .build();
        serde_json::to_string(&snapshot).expect("snapshots serialise")
    }
}

/// State shared by the admin handlers.
pub(crate) struct AdminState {
    pub app: Arc<App>,
    /// Builds snapshots: once per second for the stream, and fresh for `/status` and scrapes.
    pub builder: std::sync::Mutex<StatusBuilder>,
    /// The latest snapshot as JSON, published once per second.
    pub status: watch::Receiver<Arc<str>>,
    /// Set when shutdown began: readiness turns 503.
    pub draining: AtomicBool,
}

/// The admin plane as a Pingora background service.
pub struct AdminService {
    app: Arc<App>,
    listener: std::sync::Mutex<Option<TcpListener>>,
}

impl AdminService {
    pub fn new(app: Arc<App>, listener: TcpListener) -> Self {
        AdminService {
            app,
            listener: std::sync::Mutex::new(Some(listener)),
        }
    }
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("admin plane cannot use its listener: {e}");
                return;
            }
        };
        let mut builder = StatusBuilder::new(self.app.clone());
        let first = serde_json::to_string(&builder.build()).expect("snapshots serialise");
        let (tx, rx) = watch::channel::<Arc<str>>(Arc::from(first));
        let state = Arc::new(AdminState {
            app: self.app.clone(),
            builder: std::sync::Mutex::new(builder),
            status: rx,
            draining: AtomicBool::new(false),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let sampler = tokio::spawn(status::run_sampler(state.clone(), tx, stop_rx));
        let router = routes::router(state.clone());
        if let Ok(addr) = listener.local_addr() {
            log::info!("admin plane listening on {addr}");
        }
        let drain_state = state.clone();
        let grace = self.app.settings().server.grace_period;
        let stop = async move {
            let _ = shutdown.changed().await;
            // Draining: readiness answers 503 and the dashboard streams end now; health and
            // metrics stay up through the grace period, while requests still finish.
            drain_state.draining.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
            tokio::time::sleep(grace).await;
        };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            log::error!("admin plane stopped: {e}");
        }
        let _ = sampler.await;
        log::info!("admin plane stopped");
    }
}
