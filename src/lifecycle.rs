//! The sidecar's life as a service: readiness notification to systemd, SIGHUP reloads, and
//! keeping the limiter state in `state_dir` (every few seconds, when shutdown begins, and when
//! the last queued or in-flight request is done, at the latest at the end of the grace period,
//! which a sidecar with nothing left to do does not wait out).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::app::{App, ChangeRequest, ChangeSource};
use crate::state;
use crate::supervise::supervise;

/// How often a stopping sidecar looks whether anything is still queued or in flight.
const IDLE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// How long the proxy may take to accept connections after start before the process gives up.
const LISTEN_WITHIN: Duration = Duration::from_secs(20);

/// How often the limiter state is saved while running (a crash loses at most this much).
const SAVE_EVERY: Duration = Duration::from_secs(10);

pub struct LifecycleService {
    app: Arc<App>,
}

impl LifecycleService {
    pub fn new(app: Arc<App>) -> Self {
        LifecycleService { app }
    }

    fn save_state(&self) {
        if let Some(dir) = &self.app.settings().state_dir {
            if let Err(e) = state::save_limiters(dir, &self.app.table()) {
                log::warn!("cannot save the limiter state in {}: {e}", dir.display());
            }
        }
    }

    /// Waits until the proxy listener accepts connections, then tells systemd we are ready.
    /// A proxy that does not listen within `LISTEN_WITHIN` ends the process with an error, so
    /// that the service manager sees a failure (and restarts it) instead of a sidecar without
    /// a proxy.
    async fn notify_ready(&self) {
        let proxy = self.app.settings().proxy_probe_addr();
        let deadline = tokio::time::Instant::now() + LISTEN_WITHIN;
        while tokio::net::TcpStream::connect(proxy).await.is_err() {
            if tokio::time::Instant::now() >= deadline {
                log::error!(
                    "the proxy does not accept connections on {proxy} after {} s; stopping",
                    LISTEN_WITHIN.as_secs()
                );
                crate::logging::exit(1);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sd_notify("READY=1");
        log::info!("nvidia-sidecar ready");
    }
}

#[async_trait]
impl BackgroundService for LifecycleService {
    async fn start(&self, shutdown: ShutdownWatch) {
        supervise("lifecycle", self.run(shutdown)).await
    }
}

impl LifecycleService {
    async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot listen for SIGHUP, reloads only through the admin API: {e}");
                None
            }
        };
        // Readiness is told as soon as the proxy listens; meanwhile signals and saves go on.
        let ready = self.notify_ready();
        tokio::pin!(ready);
        let mut told_ready = false;
        let mut save = tokio::time::interval(SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                    log::info!("SIGHUP: reloading the configuration");
                    let _ = self.app.change(ChangeSource::Signal, ChangeRequest::Reload);
                }
                () = &mut ready, if !told_ready => told_ready = true,
                _ = save.tick() => self.save_state(),
                _ = shutdown.changed() => break,
            }
        }
        sd_notify("STOPPING=1");
        self.save_state();
        // Queued and in-flight requests keep running through the grace period; once none is
        // left the process ends at once instead of waiting the period out.
        let grace = self.app.settings().server.grace_period;
        let until = tokio::time::Instant::now() + grace.saturating_sub(Duration::from_millis(200));
        let mut idle_checks = 0;
        while tokio::time::Instant::now() < until {
            if self.app.metrics.inflight.get() == 0 {
                idle_checks += 1;
                // Twice, 50 ms apart: a request that had just arrived is counted by then.
                if idle_checks >= 2 {
                    self.save_state();
                    log::info!("nothing queued or in flight: stopping now");
                    crate::logging::exit(0);
                }
            } else {
                idle_checks = 0;
            }
            tokio::time::sleep(IDLE_CHECK_EVERY).await;
        }
        self.save_state();
    }
}

/// Sends a state line to systemd when it started us with `Type=notify`.
fn sd_notify(message: &str) {
    if let Some(target) = std::env::var_os("NOTIFY_SOCKET") {
        notify_socket(&target.to_string_lossy(), message);
    }
}

/// Sends `message` to the notification socket `target` (a path, or `@name` for an abstract
/// socket).
fn notify_socket(target: &str, message: &str) {
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot notify systemd: {e}");
            return;
        }
    };
    let sent = if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), target)
    };
    if let Err(e) = sent {
        log::warn!("cannot notify systemd at {target}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket_systemd_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify_socket(&path.to_string_lossy(), "READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
