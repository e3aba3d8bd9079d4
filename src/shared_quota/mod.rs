//! One quota for several sidecars (`shared_quota:`, SPEC §9).
//!
//! Every route's bucket lives in Redis as a slot schedule (GCRA on Redis's clock) with the
//! shared controller state beside it. Each sidecar runs one link per route (`link`) that leases
//! slots for its waiting requests a little ahead of time, so Redis is not on every request's
//! path, and that publishes cuts and recovery steps of its own controller. When Redis cannot
//! be reached the route falls back to a local share of the rate, and rejoins on the first
//! answer. `client` holds the connection and the script.

/// Reads a script reply built from fuzz input (see `crate::fuzzing`).
#[doc(hidden)]
pub fn fuzz_reply(items: &[Result<i64, Vec<u8>>]) {
    client::fuzz_reply(items);
}

mod client;
mod link;
mod planner;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod planner_tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use client::{CallError, LeaseReply, LeaseRequest};

use crate::admission::AdmissionGate;
use crate::config::SharedQuotaSettings;
use crate::metrics::Metrics;
use crate::routes::RouteTable;
use client::RedisQuota;

/// What `/status` shows under `shared_quota`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SharedQuotaStatus {
    pub backend: &'static str,
    pub key: String,
    pub instance: String,
    /// `connecting` before the first answer, `connected`, or `degraded` while any route runs
    /// on its local share.
    pub state: &'static str,
    /// Sidecars last seen alive on this quota.
    pub instances: Option<u32>,
    /// Routes on their local share, with the share of the rate each takes.
    pub degraded_routes: BTreeMap<String, f64>,
    pub last_error: Option<String>,
    pub round_trips: u64,
    pub slots_leased: u64,
}

/// What the metrics do not already hold.
#[derive(Debug, Default)]
struct Tracking {
    /// Sidecars seen alive at the last answer; `None` until Redis first answers.
    live: Option<u32>,
    degraded: BTreeMap<String, f64>,
    last_error: Option<String>,
}

/// This sidecar's membership in a shared quota.
pub struct SharedQuota {
    settings: SharedQuotaSettings,
    redis: RedisQuota,
    tracking: Mutex<Tracking>,
    metrics: Arc<Metrics>,
}

impl SharedQuota {
    pub fn new(
        settings: SharedQuotaSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, client::SetupError> {
        let redis = RedisQuota::new(&settings, instance_id())?;
        Ok(SharedQuota {
            settings,
            redis,
            tracking: Mutex::new(Tracking::default()),
            metrics,
        })
    }

    fn track(&self) -> std::sync::MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One round trip of the lease script.
    async fn call(&self, request: &LeaseRequest<'_>) -> Result<LeaseReply, CallError> {
        self.counted(self.redis.lease(request)).await
    }

    /// One round trip of the model reports.
    async fn models(
        &self,
        route: &str,
        reports: &[client::ModelReport],
    ) -> Result<Vec<client::ModelReport>, CallError> {
        self.counted(self.redis.models(route, reports)).await
    }

    /// A round trip to Redis, counted (`redis_calls_total`) and timed.
    async fn counted<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .redis_duration
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "ok",
            Err(CallError::Timeout) => "timeout",
            Err(CallError::Redis(_)) => "error",
        };
        self.metrics.redis_calls.with_label_values(&[label]).inc();
        result
    }

    fn leased(&self, route: &str, slots: usize, live: u32) {
        self.track().live = Some(live);
        self.metrics.shared_instances.set(i64::from(live));
        self.metrics
            .shared_slots
            .with_label_values(&[route])
            .inc_by(slots as u64);
    }

    /// How many sidecars share the quota, for the fallback share: the configured number,
    /// else the number last seen alive; `None` if Redis was never reached.
    pub fn instances(&self) -> Option<u32> {
        self.settings.instances.or(self.track().live)
    }

    /// Logged once per route when it falls back, not per request.
    fn degraded(&self, route: &str, error: &CallError, share: f64) {
        let mut t = self.track();
        t.degraded.insert(route.to_string(), share);
        t.last_error = Some(error.to_string());
        drop(t);
        self.metrics
            .shared_degraded
            .with_label_values(&[route])
            .set(1);
        log::warn!(
            "shared quota: Redis at {} cannot be reached ({error}); route {route} runs on {:.1}% of the rate until it answers again",
            self.settings.url,
            share * 100.0
        );
    }

    /// A route's link ended (the route left the configuration): it is no longer degraded.
    fn forget(&self, route: &str) {
        if self.track().degraded.remove(route).is_some() {
            self.metrics
                .shared_degraded
                .with_label_values(&[route])
                .set(0);
        }
    }

    fn rejoined(&self, route: &str) {
        self.track().degraded.remove(route);
        self.metrics
            .shared_degraded
            .with_label_values(&[route])
            .set(0);
        log::info!("shared quota: Redis answers again; route {route} draws on the shared bucket");
    }

    pub fn status(&self) -> SharedQuotaStatus {
        let t = self.track();
        SharedQuotaStatus {
            backend: "redis",
            key: self.settings.key.clone(),
            instance: self.redis.instance().to_string(),
            state: if !t.degraded.is_empty() {
                "degraded"
            } else if t.live.is_some() {
                "connected"
            } else {
                "connecting"
            },
            instances: t.live,
            degraded_routes: t.degraded.clone(),
            last_error: t.last_error.clone(),
            round_trips: crate::metrics::total(&self.metrics.redis_calls),
            slots_leased: crate::metrics::total(&self.metrics.shared_slots),
        }
    }
}

/// Names this sidecar among those sharing the quota: host, process and start time.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".to_string());
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    format!("{host}:{}:{started}", std::process::id())
}

/// Keeps a link running for every route's gate and each of its keys, also for routes a
/// reload adds, and starts it again should it ever end while its gate lives. It follows the
/// route table through a watch: a change starts the links of new routes, a link whose route
/// left ends by itself.
pub struct SharedQuotaService {
    tables: watch::Receiver<Arc<RouteTable>>,
    shared: Arc<SharedQuota>,
}

impl SharedQuotaService {
    pub fn new(tables: watch::Receiver<Arc<RouteTable>>, shared: Arc<SharedQuota>) -> Self {
        SharedQuotaService { tables, shared }
    }

    fn start_links(
        &self,
        table: &RouteTable,
        linked: &mut HashMap<String, Weak<AdmissionGate>>,
        tasks: &mut JoinSet<()>,
        names: &mut HashMap<tokio::task::Id, (String, Weak<AdmissionGate>)>,
    ) {
        let keys = &table.settings.upstream.keys;
        for route in table.all() {
            let Some(gate) = &route.gate else { continue };
            if !gate.is_shared() {
                continue;
            }
            for lane in 0..gate.key_count() {
                // One bucket in Redis per route and key; a single key keeps the route's name.
                let name = match keys.get(lane) {
                    Some(key) if keys.len() > 1 => format!("{}@{}", route.name(), key.name),
                    _ => route.name().to_string(),
                };
                let running = linked
                    .get(&name)
                    .and_then(Weak::upgrade)
                    .is_some_and(|g| Arc::ptr_eq(&g, gate));
                if running {
                    continue;
                }
                let handle = tasks.spawn(link::run(
                    self.shared.clone(),
                    name.clone(),
                    Arc::downgrade(gate),
                    lane,
                    gate.lease(lane).link_wake(),
                ));
                names.insert(handle.id(), (name.clone(), Arc::downgrade(gate)));
                linked.insert(name, Arc::downgrade(gate));
            }
        }
    }
}

#[async_trait]
impl BackgroundService for SharedQuotaService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        crate::supervise::supervise("shared quota", async {
            let mut tables = self.tables.clone();
            let mut linked = HashMap::new();
            let mut names = HashMap::new();
            let mut tasks = JoinSet::new();
            loop {
                let table = tables.borrow_and_update().clone();
                self.start_links(&table, &mut linked, &mut tasks, &mut names);
                tokio::select! {
                    changed = tables.changed() => if changed.is_err() { break },
                    Some(ended) = tasks.join_next_with_id() => {
                        // Its route left (the link ended by itself) or it failed: forget it,
                        // and start it again if its gate still lives.
                        let id = match ended {
                            Ok((id, ())) => id,
                            Err(e) => e.id(),
                        };
                        // Only its own entry: a link started since for a new gate of the same
                        // name keeps running.
                        if let Some((name, gate)) = names.remove(&id) {
                            if linked.get(&name).is_some_and(|g| g.ptr_eq(&gate)) {
                                linked.remove(&name);
                            }
                        }
                    }
                    _ = shutdown.changed() => break,
                }
            }
        })
        .await
    }
}
