//! Builds the Pingora server from the settings: server knobs, the proxy service on
//! `listen_host:listen_port`.

use std::sync::Arc;

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};

use crate::app::App;
use crate::proxy::{ProxyApp, SidecarProxy, Slots};

/// The longest timeout, in seconds, that Pingora's coarse timer keeps (see `server_conf`).
pub const FAST_TIMEOUT_LIMIT_SECS: u64 = 10;

/// How the process was asked to run (from the command line).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunMode {
    /// Take over the listeners of a running instance (graceful upgrade).
    pub upgrade: bool,
    /// Detach and run in the background.
    pub daemon: bool,
}

/// Pingora's own configuration, derived from ours.
pub fn server_conf(app: &App, mode: RunMode) -> ServerConf {
    let settings = app.settings();
    let s = &settings.server;
    ServerConf {
        threads: s.threads,
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout.as_secs()),
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        daemon: mode.daemon,
        ca_file: settings.upstream.ca_file.clone(),
        // Our replay bound (at most 10, see validation) must be the one that counts, with room
        // for Pingora's own retries of stale pooled connections.
        max_retries: 16,
        // One runtime per thread, as nginx has one event loop per worker: measured, the same
        // throughput with a third lower p99 at two threads (BENCHMARKS.md, scenario 5).
        work_stealing: false,
        // Pingora's own timer keeps every timeout it registers until the timeout's deadline,
        // even when the read it guarded ended long before: with `upstream.read_timeout` at
        // 300 s, that is 100 entries a second per thread for five minutes, memory that grows
        // with uptime under load (BENCHMARKS.md, soak). Longer timeouts go to tokio's timer,
        // which forgets a timeout when it is dropped.
        fast_timeout_to_tokio_threshold_seconds: Some(FAST_TIMEOUT_LIMIT_SECS),
        ..ServerConf::default()
    }
}

/// The whole server, ready for `run`: the proxy and the admin plane as listening
/// services (Pingora binds both and hands both over on a graceful upgrade), the status sampler
/// and the lifecycle as background services.
pub fn build(app: Arc<App>, mode: RunMode) -> Server {
    let settings = app.settings();
    let opt = Opt {
        upgrade: mode.upgrade,
        daemon: mode.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf(&app, mode));
    server.bootstrap();
    let sidecar = SidecarProxy::new(app.clone());
    let slots = Arc::new(Slots::new(settings.server.max_connections));
    let bodies = sidecar.bodies();
    let proxy = pingora::proxy::http_proxy(&server.configuration, sidecar);
    let mut proxy = pingora::services::listening::Service::new(
        "nvidia-sidecar proxy".to_string(),
        ProxyApp::new(proxy, app.clone(), bodies, slots.clone()),
    );
    // No read buffer in front of the socket: Pingora's HTTP parser reads into buffers of its
    // own, sized to the header and to Content-Length, and a 64 KiB one per connection would be
    // most of what a waiting request costs (BENCHMARKS.md, scenario 6).
    proxy.add_listener(
        ListenerConfig::tcp(format!(
            "{}:{}",
            format_host(settings.listen_host),
            settings.listen_port
        ))
        .l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE)),
    );
    server.add_service(proxy);

    let (admin, sampler) = crate::admin::admin_plane(app.clone(), slots);
    let mut admin =
        pingora::services::listening::Service::new("nvidia-sidecar admin".to_string(), admin);
    admin.add_tcp(&format!(
        "{}:{}",
        format_host(settings.admin.listen_host),
        settings.metrics_port
    ));
    server.add_service(admin);
    server.add_service(pingora::services::background::background_service(
        "status sampler",
        sampler,
    ));
    if let Some(shared) = app.shared.clone() {
        server.add_service(pingora::services::background::background_service(
            "shared quota",
            crate::shared_quota::SharedQuotaService::new(app.tables(), shared),
        ));
    }
    server.add_service(pingora::services::background::background_service(
        "lifecycle",
        crate::lifecycle::LifecycleService::new(app),
    ));
    server
}

/// An address the sidecar cannot listen on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for the {what}: {source}")]
pub struct ListenError {
    pub addr: std::net::SocketAddr,
    pub what: &'static str,
    pub source: std::io::Error,
}

/// Checks that the proxy and admin addresses can be listened on (nobody else holds them, the
/// process may bind them), by binding and releasing each. Not for upgrades, where the running
/// instance holds them and hands them over.
pub fn check_listen_addresses(settings: &crate::config::Settings) -> Result<(), ListenError> {
    let addresses = [
        ("proxy", settings.listen_host, settings.listen_port),
        (
            "admin plane",
            settings.admin.listen_host,
            settings.metrics_port,
        ),
    ];
    for (what, host, port) in addresses {
        let addr = std::net::SocketAddr::new(host, port);
        if let Err(source) = std::net::TcpListener::bind(addr) {
            return Err(ListenError { addr, what, source });
        }
    }
    Ok(())
}

/// An IP address as it goes before `:port` (IPv6 in brackets).
pub fn format_host(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        std::net::IpAddr::V4(v4) => v4.to_string(),
    }
}
