//! The configuration in force as JSON: every default filled in, secrets masked. Shown by
//! `GET /api/admin/config` and used to tell which keys a change really changed.

use serde_json::{json, Value};

use super::{RouteSettings, Settings};

const MASK: &str = "***";

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// A bucket's rate as configured: its number, or `"auto"`.
fn rate_json(bucket: &crate::limiter::LimiterSettings) -> Value {
    if bucket.auto {
        json!("auto")
    } else {
        json!(bucket.base_rpm)
    }
}

fn route_json(r: &RouteSettings) -> Value {
    json!({
        "path_prefix": r.path_prefix,
        "upstream_url": r.upstream.to_string(),
        "passthrough": r.is_passthrough(),
        "rate_rpm": r.bucket.as_ref().map(rate_json),
        "bucket_capacity": r.bucket.as_ref().map(|b| b.capacity),
        "keepalive_while_queued": r.keepalive_while_queued,
    })
}

/// The configuration in force with every default filled in and secrets masked.
pub fn effective_view(settings: &Settings) -> Value {
    let bucket = settings
        .default_route
        .bucket
        .as_ref()
        .expect("the default route always has a bucket");
    let a = &bucket.retreat;
    let u = &settings.upstream;
    let s = &settings.server;
    json!({
        "listen_host": settings.listen_host.to_string(),
        "listen_port": settings.listen_port,
        "metrics_port": settings.metrics_port,
        "upstream_url": settings.default_route.upstream.to_string(),
        "rate_rpm": rate_json(bucket),
        "bucket_capacity": bucket.capacity,
        "request_timeout": secs(settings.request_timeout),
        "queue_max_size": bucket.queue_max,
        "low_priority_timeout": secs(settings.low_priority_timeout),
        "fallback_enabled_passthrough": settings.fallback_passthrough,
        "log_level": settings.log_level,
        "access": {
            "allowed_hosts": settings.access.allowed_hosts,
            "max_priority": settings.access.max_priority.as_str(),
            "client_max_priority": settings
                .access
                .client_max_priority
                .iter()
                .map(|(id, p)| (id.clone(), p.as_str()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        },
        "adaptive": {
            "window": secs(a.window),
            "retreat_threshold": a.threshold,
            "decrease_factor": a.decrease_factor,
            "floor_fraction": a.floor_fraction,
            "quiet_period": secs(a.quiet_period),
            "recover_step": a.recover_step,
            "recover_interval": secs(a.recover_interval),
            "ceiling_headroom": a.ceiling_headroom,
            "probe_interval": secs(a.probe_interval),
            "safety_margin": a.safety_margin,
            "max_replays": settings.max_replays,
            "max_replay_body": settings.max_replay_body,
            "replay_body_budget": settings.replay_body_budget,
        },
        "upstream": {
            "api_key": u.api_key.as_ref().map(|_| MASK),
            "connect_timeout": secs(u.connect_timeout),
            "read_timeout": secs(u.read_timeout),
            "idle_timeout": secs(u.idle_timeout),
            "dns_ttl": secs(u.dns_ttl),
            "ca_file": u.ca_file,
            "headers": u.headers.iter().map(|(k, _)| (k.to_string(), Value::from(MASK))).collect::<serde_json::Map<_, _>>(),
            "keys": u.keys.iter().map(|k| json!({
                "name": &*k.name,
                "key": k.authorization.as_ref().map(|_| MASK),
                "rate_rpm": k.rate_rpm,
            })).collect::<Vec<_>>(),
        },
        "models": settings.models.iter().map(|m| (m.pattern.clone(), json!({
            "rate_rpm": m.rate_rpm,
            "max_concurrency": m.max_concurrency,
        }))).collect::<serde_json::Map<_, _>>(),
        "clients": settings.clients.list.iter().map(|c| json!({
            "id": &*c.id,
            "key": MASK,
            "weight": c.weight,
            "max_priority": c.max_priority.as_str(),
            "rate_rpm": c.rate_rpm,
        })).collect::<Vec<_>>(),
        "routes": settings.routes.iter().map(route_json).collect::<Vec<_>>(),
        "admin": {
            "listen_host": settings.admin.listen_host.to_string(),
            "token": settings.admin.token.as_ref().map(|_| MASK),
        },
        "server": {
            "threads": s.threads,
            "max_connections": s.max_connections,
            "keepalive_timeout": secs(s.keepalive_timeout),
            "grace_period": secs(s.grace_period),
            "graceful_shutdown_timeout": secs(s.graceful_shutdown_timeout),
            "pid_file": s.pid_file,
            "upgrade_sock": s.upgrade_sock,
        },
        "state_dir": settings.state_dir.as_ref().map(|p| p.display().to_string()),
        "shared_quota": settings.shared_quota.as_ref().map(|q| json!({
            "backend": "redis",
            "url": q.url,
            "sentinels": q.sentinels,
            "sentinel_master": (!q.sentinels.is_empty()).then_some(&q.sentinel_master),
            "key": q.key,
            "username": q.username,
            "password": q.password.as_ref().map(|_| MASK),
            "ca_file": q.ca_file,
            "instances": q.instances,
            "lease_ahead": secs(q.lease_ahead),
            "max_lease": q.max_lease,
            "timeout": secs(q.timeout),
        })),
    })
}
