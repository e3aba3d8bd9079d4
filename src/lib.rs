//! nvidia-sidecar: an egress proxy that lets many clients share one quota-limited upstream API.
//!
//! Layout: `config` (file format and validation), `limiter` (bucket, queue and adaptive
//! controller: pure logic), `admission` (waiting for tokens), `upstream` (where requests go),
//! `proxy` (the request path), `app` (shared state), `metrics`, `activity` (per-client counts
//! and queue waits for the dashboard), `server` (Pingora wiring),
//! `cli` (command line), `logging` (filters and the log writer thread), `state` (what survives a restart), `lifecycle` (signals,
//! readiness, state saving), `supervise` (background tasks that end the process if they panic), `admin` (the admin plane: metrics, health, status, dashboard,
//! config API), `shared_quota` (one quota for several sidecars, kept in Redis).
#![forbid(unsafe_code)]
// Every module but `limiter` may read the clock (see clippy.toml); `limiter` denies it.
#![allow(clippy::disallowed_methods)]

pub(crate) mod activity;
pub(crate) mod admin;
pub(crate) mod admission;
pub(crate) mod app;
pub mod cli;
pub mod config;
pub mod file_limit;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod lifecycle;
pub mod limiter;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod proxy;
pub(crate) mod routes;
pub mod server;
pub(crate) mod shared_quota;
pub(crate) mod state;
pub(crate) mod supervise;
pub(crate) mod upstream;

pub use app::App;

pub use logging::{init_logging, log_filter, LOG_SECRETS_ENV};
