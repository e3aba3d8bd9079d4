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
// Every module but `limiter` may read the clock (see clippy.toml).

#[allow(clippy::disallowed_methods)]
pub(crate) mod activity;
#[allow(clippy::disallowed_methods)]
pub(crate) mod admin;
#[allow(clippy::disallowed_methods)]
pub(crate) mod admission;
#[allow(clippy::disallowed_methods)]
pub(crate) mod app;
#[allow(clippy::disallowed_methods)]
pub mod cli;
#[allow(clippy::disallowed_methods)]
pub mod config;
#[allow(clippy::disallowed_methods)]
#[doc(hidden)]
pub mod fuzzing;
#[allow(clippy::disallowed_methods)]
pub(crate) mod lifecycle;
pub mod limiter;
#[allow(clippy::disallowed_methods)]
pub(crate) mod logging;
#[allow(clippy::disallowed_methods)]
pub(crate) mod metrics;
#[allow(clippy::disallowed_methods)]
pub(crate) mod proxy;
#[allow(clippy::disallowed_methods)]
pub(crate) mod routes;
#[allow(clippy::disallowed_methods)]
pub mod server;
#[allow(clippy::disallowed_methods)]
pub(crate) mod shared_quota;
#[allow(clippy::disallowed_methods)]
pub(crate) mod state;
#[allow(clippy::disallowed_methods)]
pub(crate) mod upstream;

pub use app::App;

pub use logging::{init_logging, log_filter, LOG_SECRETS_ENV};
