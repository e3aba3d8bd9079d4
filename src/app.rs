//! The running sidecar's shared state: the live settings with their route table (each route
//! with its upstream and bucket), the metrics, and the start time. The proxy and the admin
//! plane both read it; configuration changes swap the route table atomically while keeping
//! every bucket that still exists, so a change never resets tokens, queue or retreat state.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::activity::Activity;
use crate::config::{self, ConfigError, ConfigLayers, Overrides, Settings};
use crate::metrics::Metrics;
pub use crate::routes::{Route, RouteTable};
use crate::shared_quota::SharedQuota;

/// Where a configuration change came from (the `source` label of `config_reloads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSource {
    Signal,
    AdminReload,
    AdminConfig,
}

impl ChangeSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeSource::Signal => "sighup",
            ChangeSource::AdminReload => "api_reload",
            ChangeSource::AdminConfig => "api_config",
        }
    }
}

/// What to change.
#[derive(Debug, Clone)]
pub enum ChangeRequest {
    /// Read the file again; the overrides stay on top.
    Reload,
    /// Lay these runtime overrides over the current ones.
    Patch(Overrides),
    /// Drop every runtime override: the file's values apply again.
    ClearOverrides,
}

/// The result of a successful change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeReport {
    /// Keys whose effective value changed and took effect.
    pub changed: Vec<String>,
    /// Keys that changed in the file but need a restart (new listeners); they keep their
    /// running values until then.
    pub restart_required: Vec<String>,
}

/// Shared state of the running sidecar.
pub struct App {
    table: ArcSwap<RouteTable>,
    /// Every new route table, for the background services that follow the routes.
    tables: watch::Sender<Arc<RouteTable>>,
    /// The file and overrides in force; the mutex serialises every configuration change.
    layers: Mutex<ConfigLayers>,
    pub(crate) metrics: Arc<Metrics>,
    /// Requests, grants and queue waits per client over the last minute (bounded).
    pub(crate) activity: Activity,
    /// Membership in a quota shared with other sidecars (`shared_quota`), fixed at start.
    pub(crate) shared: Option<Arc<SharedQuota>>,
    pub(crate) started: Instant,
}

impl App {
    /// Starts on the file at `path` (the embedded default when `None`), with the runtime
    /// overrides saved in its state directory laid over it, through the same layering and
    /// validation as every later change (`ConfigLayers::settings`). Saved overrides that no
    /// longer validate are left out, with an error line, rather than stop the start.
    pub fn start(layers: ConfigLayers) -> Result<Arc<App>, Vec<ConfigError>> {
        let mut layers = layers;
        let mut settings = layers.settings()?;
        if let Some(dir) = settings.state_dir.clone() {
            match crate::state::load_overrides(&dir) {
                Ok(overrides) if !overrides.is_empty() => {
                    let with = ConfigLayers {
                        overrides,
                        ..layers.clone()
                    };
                    match with.settings() {
                        Ok(layered) => {
                            log::info!(
                                "runtime overrides from {}: {}",
                                dir.display(),
                                with.overrides.names().join(", ")
                            );
                            (layers, settings) = (with, layered);
                        }
                        Err(errors) => {
                            let list: Vec<String> =
                                errors.iter().map(ToString::to_string).collect();
                            log::error!(
                                "ignoring the saved overrides, they no longer validate: {}",
                                list.join("; ")
                            );
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => log::error!("ignoring unreadable overrides {e}"),
            }
        }
        let app = App::new(layers, settings);
        if let Some(dir) = app.settings().state_dir.clone() {
            crate::state::restore_limiters(&dir, &app.table());
        }
        Ok(app)
    }

    fn new(layers: ConfigLayers, settings: Settings) -> Arc<App> {
        let metrics = Arc::new(Metrics::new());
        let shared = settings.shared_quota.clone().map(|q| {
            Arc::new(
                SharedQuota::new(q, metrics.clone())
                    .expect("validation accepted only Redis URLs the client opens"),
            )
        });
        let table = Arc::new(RouteTable::build(Arc::new(settings), None));
        Arc::new(App {
            table: ArcSwap::new(table.clone()),
            tables: watch::Sender::new(table),
            layers: Mutex::new(layers),
            metrics,
            activity: Activity::new(crate::admission::now()),
            shared,
            started: Instant::now(),
        })
    }

    /// An app on already validated settings with no file behind them (tests, benchmarks).
    pub fn from_settings(settings: Settings) -> Arc<App> {
        let layers = ConfigLayers {
            path: None,
            file: config::FileConfig::default(),
            overrides: Overrides::default(),
        };
        App::new(layers, settings)
    }

    /// The route table in force.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Follows the route table: the one in force, and every one a change puts in force.
    pub fn tables(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.tables.subscribe()
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.table.load().settings.clone()
    }

    /// The file and overrides in force.
    pub fn layers(&self) -> ConfigLayers {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The one path every configuration change takes: build the new layers, validate the
    /// result as a whole, keep restart-only settings at their running values, swap the route
    /// table (buckets, queues and retreat state carry over), count the outcome. A change that
    /// does not validate changes nothing.
    pub fn change(
        &self,
        source: ChangeSource,
        request: ChangeRequest,
    ) -> Result<ChangeReport, Vec<ConfigError>> {
        let result = self.try_change(request);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .with_label_values(&[source.as_str(), outcome])
            .inc();
        match &result {
            Ok(report) => log::info!(
                "configuration change from {} applied; changed: [{}]{}",
                source.as_str(),
                report.changed.join(", "),
                if report.restart_required.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; restart required for: [{}]",
                        report.restart_required.join(", ")
                    )
                }
            ),
            Err(errors) => {
                let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                log::warn!(
                    "configuration change from {} rejected, running configuration kept: {}",
                    source.as_str(),
                    list.join("; ")
                );
            }
        }
        result
    }

    fn try_change(&self, request: ChangeRequest) -> Result<ChangeReport, Vec<ConfigError>> {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = layers.clone();
        match request {
            ChangeRequest::Reload => next.file = config::read_file(next.path.as_deref())?,
            ChangeRequest::Patch(patch) => next.overrides = next.overrides.merged(&patch),
            ChangeRequest::ClearOverrides => next.overrides = Overrides::default(),
        }
        let mut settings = next.settings()?;
        let current = self.settings();
        let restart_required = keep_restart_only(&current, &mut settings);
        // The rule "an admin plane off loopback needs a token" holds for the settings that
        // will run: the admin address stays what it is until a restart.
        if !settings.admin.listen_host.is_loopback() && settings.admin.token.is_none() {
            return Err(vec![ConfigError::new(
                "admin.token_env",
                format!(
                    "the admin plane listens on {} (not loopback) until a restart: a token is required",
                    settings.admin.listen_host
                ),
            )]);
        }
        if next.overrides != layers.overrides {
            if let Some(dir) = &current.state_dir {
                // Persist first: an override that would be lost on restart is not applied.
                crate::state::save_overrides(dir, &next.overrides).map_err(|e| {
                    vec![ConfigError::new(
                        "state_dir",
                        format!("cannot save the overrides in {}: {e}", dir.display()),
                    )]
                })?;
            }
        }
        let changed = changed_keys(
            &config::effective_view(&current),
            &config::effective_view(&settings),
        )
        .into_iter()
        .filter(|k| !restart_required.contains(k))
        .collect();
        let rotated = rotated_keys(&current, &settings);
        self.apply(settings);
        for route in self.table().all() {
            for lane in &rotated {
                if let Some(gate) = &route.gate {
                    gate.reinstate(*lane);
                }
            }
        }
        *layers = next;
        Ok(ChangeReport {
            changed,
            restart_required,
        })
    }

    /// Puts new settings in force, keeping the buckets of routes that remain.
    fn apply(&self, settings: Settings) {
        let current = self.table.load_full();
        let next = Arc::new(RouteTable::build(Arc::new(settings), Some(&current)));
        self.table.store(next.clone());
        self.tables.send_replace(next);
    }
}

/// Copies settings that only a restart can change from `running` into `next`; returns the
/// config keys whose new value therefore waits for a restart.
fn keep_restart_only(running: &Settings, next: &mut Settings) -> Vec<String> {
    let mut keys = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:tt)+) => {
            if running.$($field)+ != next.$($field)+ {
                keys.push($key.to_string());
                next.$($field)+ = running.$($field)+.clone();
            }
        };
    }
    keep!("listen_host", listen_host);
    keep!("listen_port", listen_port);
    keep!("metrics_port", metrics_port);
    keep!("admin.listen_host", admin.listen_host);
    keep!("server.threads", server.threads);
    keep!("server.grace_period", server.grace_period);
    keep!(
        "server.graceful_shutdown_timeout",
        server.graceful_shutdown_timeout
    );
    keep!("server.pid_file", server.pid_file);
    keep!("server.upgrade_sock", server.upgrade_sock);
    keep!("upstream.ca_file", upstream.ca_file);
    keep!("state_dir", state_dir);
    keep!("shared_quota", shared_quota);
    // Keys and models are matched to the limiter's lanes and model limits by position (grants
    // in flight carry those positions): their names and order wait for a restart. Their
    // values do not: a rotated key, a new rate or concurrency apply at once.
    let names = |s: &Settings| -> Vec<std::sync::Arc<str>> {
        s.upstream.keys.iter().map(|k| k.name.clone()).collect()
    };
    if names(running) != names(next) {
        keys.push("upstream.keys".to_string());
        next.upstream.keys = running.upstream.keys.clone();
        next.upstream.authorization = running.upstream.authorization.clone();
    }
    let patterns =
        |s: &Settings| -> Vec<String> { s.models.iter().map(|m| m.pattern.clone()).collect() };
    if patterns(running) != patterns(next) {
        keys.push("models".to_string());
        next.models = running.models.clone();
    }
    // Every route's limiter takes the key pool and the model list in force.
    let key_rates: Vec<crate::limiter::KeyRate> = next
        .upstream
        .keys
        .iter()
        .map(|k| crate::limiter::KeyRate {
            name: k.name.clone(),
            rpm: k.rate_rpm,
            tpm: k.tpm,
        })
        .collect();
    let routes = std::iter::once(&mut next.default_route).chain(next.routes.iter_mut());
    for bucket in routes.filter_map(|r| r.bucket.as_mut()) {
        bucket.keys = key_rates.clone();
        bucket.models = next.models.clone();
    }
    keys
}

/// The keys (by position) whose value a change replaces: a rotated key comes back into the
/// pool if the upstream had refused the old one.
fn rotated_keys(running: &Settings, next: &Settings) -> Vec<usize> {
    running
        .upstream
        .keys
        .iter()
        .zip(&next.upstream.keys)
        .enumerate()
        .filter(|(_, (old, new))| old.name == new.name && old.authorization != new.authorization)
        .map(|(lane, _)| lane)
        .collect()
}

/// Keys (`rate_rpm`, `adaptive.window`, …) whose value differs between two configurations.
fn changed_keys(before: &serde_json::Value, after: &serde_json::Value) -> Vec<String> {
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (before, after) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for (key, new) in b {
        let old = a.get(key).unwrap_or(&serde_json::Value::Null);
        match (old, new) {
            (serde_json::Value::Object(o), serde_json::Value::Object(n)) => {
                for (field, value) in n {
                    if o.get(field) != Some(value) {
                        keys.push(format!("{key}.{field}"));
                    }
                }
            }
            _ if old != new => keys.push(key.clone()),
            _ => {}
        }
    }
    keys
}
