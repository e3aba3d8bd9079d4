//! nvidia-sidecar: an egress proxy that lets many clients share one quota-limited upstream API.
//!
//! Layout: `config` (file format and validation), `limiter` (bucket, queue and adaptive
//! controller: pure logic), `admission` (waiting for tokens), `upstream` (where requests go),
//! `proxy` (the request path), `app` (shared state), `metrics`, `activity` (per-client counts
//! and queue waits for the dashboard), `server` (Pingora wiring),
//! `cli` (command line), `state` (what survives a restart), `lifecycle` (signals,
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
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod shared_quota;
pub mod state;
pub mod upstream;

pub use app::App;

/// Modules whose debug and trace output carries request and response headers (the upstream
/// key, the admin token) or bodies (prompts), or Redis commands (its password).
const SECRET_BEARING_TARGETS: [&str; 12] = [
    "pingora",
    "pingora_core",
    "pingora_proxy",
    "pingora_http",
    "pingora_pool",
    "pingora_cache",
    "hyper",
    "hyper_util",
    "h2",
    "redis",
    "rustls",
    "tokio_rustls",
];

/// The environment variable that lifts the cap on those modules: set it to `yes` only where
/// the logs may hold secrets.
pub const LOG_SECRETS_ENV: &str = "NVIDIA_SIDECAR_LOG_SECRETS";

/// The log filter for `level` (or `RUST_LOG`, which overrides it): as asked, except that the
/// modules that would log secrets stay at `info` unless `NVIDIA_SIDECAR_LOG_SECRETS=yes`.
/// Returns the filter and whether a cap was applied.
pub fn log_filter(level: &str, rust_log: Option<&str>, secrets_allowed: bool) -> (String, bool) {
    let spec = rust_log.unwrap_or(level).to_string();
    let verbose = spec.to_ascii_lowercase();
    if secrets_allowed || !(verbose.contains("debug") || verbose.contains("trace")) {
        return (spec, false);
    }
    let caps: Vec<String> = SECRET_BEARING_TARGETS
        .iter()
        .map(|t| format!("{t}=info"))
        .collect();
    (format!("{spec},{}", caps.join(",")), true)
}

/// Sets up logging at `level` unless `RUST_LOG` says otherwise (see `log_filter`).
pub fn init_logging(level: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let secrets = std::env::var(LOG_SECRETS_ENV).is_ok_and(|v| v == "yes");
    let (filter, capped) = log_filter(level, rust_log.as_deref(), secrets);
    let _ = env_logger::Builder::new()
        .parse_filters(&filter)
        .format_timestamp_millis()
        .try_init();
    if capped {
        log::warn!(
            "Pingora, HTTP, TLS and Redis modules log at info at most: their debug and trace output carries the API key, tokens and prompts; set {LOG_SECRETS_ENV}=yes to lift this"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn verbose_levels_keep_secret_bearing_modules_at_info() {
        let (filter, capped) = log_filter("trace", None, false);
        assert!(capped);
        assert!(filter.starts_with("trace,"));
        assert!(filter.contains("pingora_proxy=info") && filter.contains("hyper=info"));
        let (filter, capped) = log_filter("info", Some("pingora_core=debug"), false);
        assert!(capped);
        assert!(filter.ends_with("tokio_rustls=info"));
        assert_eq!(log_filter("info", None, false), ("info".to_string(), false));
        assert_eq!(
            log_filter("trace", None, true),
            ("trace".to_string(), false)
        );
    }
}
