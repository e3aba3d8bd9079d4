//! The route table: the settings in force and, for each route, its upstream and its bucket.
//! A configuration change builds a new table that takes over the buckets and DNS caches of
//! the routes that remain, so a change never resets tokens, queue or retreat state.

use std::sync::Arc;

use crate::admission::AdmissionGate;
use crate::config::{RouteSettings, Settings};
use crate::metrics::RouteMetrics;
use crate::upstream::Upstream;

/// One route at run time.
pub struct Route {
    pub settings: RouteSettings,
    pub upstream: Arc<Upstream>,
    /// The bucket this route draws on; `None` for passthrough routes.
    pub gate: Option<Arc<AdmissionGate>>,
    /// The metric series this route's requests update.
    pub metrics: RouteMetrics,
}

impl Route {
    pub fn name(&self) -> &str {
        &self.settings.name
    }
}

/// The settings in force and the routes built from them.
pub struct RouteTable {
    pub settings: Arc<Settings>,
    pub default: Arc<Route>,
    /// Longest prefix first.
    pub routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the routes for `settings`, taking over buckets and DNS caches of `previous`
    /// where a route of the same name and upstream still exists.
    pub fn build(settings: Arc<Settings>, previous: Option<&RouteTable>) -> RouteTable {
        let make = |rs: &RouteSettings| -> Arc<Route> {
            let old = previous.and_then(|p| p.all().find(|r| r.name() == rs.name));
            let upstream = match old {
                Some(o) if o.settings.upstream == rs.upstream => o.upstream.clone(),
                _ => Arc::new(Upstream::new(rs.upstream.clone())),
            };
            let gate = rs
                .bucket
                .as_ref()
                .map(|bucket| match old.and_then(|o| o.gate.clone()) {
                    Some(gate) => {
                        gate.reconfigure(bucket);
                        gate
                    }
                    None => {
                        let gate = AdmissionGate::new(bucket.clone());
                        if settings.shared_quota.is_some() {
                            gate.share();
                        }
                        gate
                    }
                });
            Arc::new(Route {
                metrics: RouteMetrics::new(&rs.name, settings.upstream.keys.len()),
                settings: rs.clone(),
                upstream,
                gate,
            })
        };
        RouteTable {
            default: make(&settings.default_route),
            routes: settings.routes.iter().map(make).collect(),
            settings,
        }
    }

    /// The route for a request path: the longest matching prefix, else the default.
    pub fn route_for(&self, path: &str) -> &Arc<Route> {
        self.routes
            .iter()
            .find(|r| r.settings.matches(path))
            .unwrap_or(&self.default)
    }

    /// Every route, the default first.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Route>> {
        std::iter::once(&self.default).chain(self.routes.iter())
    }

    /// Whether an absolute-form request target names one of the configured upstreams.
    pub fn is_configured_upstream(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.all().any(|r| {
            let u = &r.settings.upstream;
            u.host.eq_ignore_ascii_case(host) && port.is_none_or(|p| p == u.port)
        })
    }
}
