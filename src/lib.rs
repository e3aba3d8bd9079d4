//! nvidia-sidecar: an egress proxy that lets many clients share one quota-limited upstream API.
//!
//! Layout: `config` (file format and validation), `limiter` (bucket, queue and adaptive
//! controller: pure logic), `admission` (waiting for tokens), `upstream` (where requests go),
//! `proxy` (the request path), `app` (shared state), `metrics`, `server` (Pingora wiring),
//! `cli` (command line), `state` (what survives a restart), `lifecycle` (signals,
//! readiness, state saving), `admin` (the admin plane: metrics, health, status, dashboard,
//! config API), `shared_quota` (one quota for several sidecars, kept in Redis).
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod app;
pub mod cli;
pub mod config;
pub mod lifecycle;
pub mod limiter;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod shared_quota;
pub mod state;
pub mod upstream;

pub use app::App;

/// Sets up logging at `level` unless `RUST_LOG` says otherwise.
pub fn init_logging(level: &str) {
    let env = env_logger::Env::default().default_filter_or(level);
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}
