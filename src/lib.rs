//! nvidia-sidecar: an egress proxy that lets many clients share one quota-limited upstream API.
//!
//! Layout: `config` (file format and validation), `limiter` (bucket, queue and adaptive
//! controller: pure logic), `admission` (waiting for tokens), `upstream` (where requests go),
//! `proxy` (the request path), `app` (shared state), `metrics`, `activity` (per-client counts
//! and queue waits for the dashboard), `server` (Pingora wiring),
//! `cli` (command line), `logging` (filters and the log writer thread), `state` (what survives a restart), `lifecycle` (signals,
//! readiness, state saving), `admin` (the admin plane: metrics, health, status, dashboard,
//! config API), `shared_quota` (one quota for several sidecars, kept in Redis).
#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod admission;
pub mod app;
pub mod cli;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod shared_quota;
pub mod state;
pub mod upstream;

pub use app::App;

pub use logging::{init_logging, log_filter, LOG_SECRETS_ENV};
