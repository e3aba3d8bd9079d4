//! From the file's structs to the settings the code runs on: every value checked, every
//! problem reported at once, secrets read from where the file points. The parts with a job of
//! their own are beside it: the key pool (`keys`), model limits (`models`), client keys
//! (`clients`) and the shared quota (`shared_quota`).

use std::path::PathBuf;

use http::header::{HeaderName, HeaderValue};

use super::checker::{Checker, MAX_RPM, MIN_RPM};
use super::defaults;
use super::file::{FileConfig, RouteSection};
use super::shared_quota::validate_shared_quota;
use super::{
    AccessSettings, AdminSettings, ConfigError, RateRpm, RouteSettings, ServerSettings, Settings,
    UpstreamOptions, UpstreamUrl,
};
use crate::limiter::{KeyRate, LimiterSettings, Priority, RetreatSettings};

/// Checks a parsed file and builds the settings; `env` looks up environment variables.
pub fn validate(
    file: &FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, Vec<ConfigError>> {
    let mut c = Checker { errors: Vec::new() };
    let listen_host = c.ip(
        "listen_host",
        file.listen_host.as_deref().unwrap_or(defaults::LISTEN_HOST),
    );
    let listen_port = file.listen_port.unwrap_or(defaults::LISTEN_PORT);
    let metrics_port = file.metrics_port.unwrap_or(defaults::METRICS_PORT);
    if listen_port == 0 {
        c.fail("listen_port", "must be a port number 1-65535, got 0");
    }
    if metrics_port == 0 {
        c.fail("metrics_port", "must be a port number 1-65535, got 0");
    }
    if listen_port == metrics_port && listen_port != 0 {
        c.fail(
            "metrics_port",
            format!("must differ from listen_port, both are {listen_port}"),
        );
    }

    let a = &file.adaptive;
    // The controller's own defaults are the defaults: one source (`RetreatSettings::default`).
    let d = RetreatSettings::default();
    let secs = |t: std::time::Duration| t.as_secs_f64();
    let retreat = RetreatSettings {
        window: c.duration("adaptive.window", a.window, secs(d.window), false),
        threshold: c.fraction(
            "adaptive.retreat_threshold",
            a.retreat_threshold.unwrap_or(d.threshold),
            true,
            false,
        ),
        decrease_factor: c.fraction(
            "adaptive.decrease_factor",
            a.decrease_factor.unwrap_or(d.decrease_factor),
            false,
            false,
        ),
        floor_fraction: c.fraction(
            "adaptive.floor_fraction",
            a.floor_fraction.unwrap_or(d.floor_fraction),
            false,
            true,
        ),
        quiet_period: c.duration(
            "adaptive.quiet_period",
            a.quiet_period,
            secs(d.quiet_period),
            true,
        ),
        recover_step: c.fraction(
            "adaptive.recover_step",
            a.recover_step.unwrap_or(d.recover_step),
            false,
            true,
        ),
        recover_interval: c.duration(
            "adaptive.recover_interval",
            a.recover_interval,
            secs(d.recover_interval),
            false,
        ),
        ceiling_headroom: c.fraction(
            "adaptive.ceiling_headroom",
            a.ceiling_headroom.unwrap_or(d.ceiling_headroom),
            true,
            false,
        ),
        probe_interval: c.duration(
            "adaptive.probe_interval",
            a.probe_interval,
            secs(d.probe_interval),
            false,
        ),
        safety_margin: c.fraction(
            "adaptive.safety_margin",
            a.safety_margin.unwrap_or(d.safety_margin),
            true,
            false,
        ),
    };
    let max_replays = a.max_replays.unwrap_or(defaults::MAX_REPLAYS);
    if max_replays > 10 {
        c.fail(
            "adaptive.max_replays",
            format!("must be at most 10, got {max_replays}"),
        );
    }
    let max_replay_body = a.max_replay_body.map_or(defaults::MAX_REPLAY_BODY, |b| b.0);
    let replay_body_budget = a
        .replay_body_budget
        .map_or(defaults::REPLAY_BODY_BUDGET, |b| b.0);
    // Above 1 GiB a single held body is more likely a mistake than a prompt.
    if max_replay_body > 1 << 30 {
        c.fail(
            "adaptive.max_replay_body",
            format!("must be at most 1GiB, got {max_replay_body} bytes"),
        );
    }
    if replay_body_budget > 64 << 30 {
        c.fail(
            "adaptive.replay_body_budget",
            format!("must be at most 64GiB, got {replay_body_budget} bytes"),
        );
    }

    let queue_max = file.queue_max_size.unwrap_or(defaults::QUEUE_MAX_SIZE);
    if queue_max == 0 || queue_max > 1_000_000 {
        c.fail(
            "queue_max_size",
            format!("must be between 1 and 1000000, got {queue_max}"),
        );
    }
    let capacity = file.bucket_capacity.unwrap_or(defaults::BUCKET_CAPACITY);
    if capacity == 0 || capacity > 100_000 {
        c.fail(
            "bucket_capacity",
            format!("must be between 1 and 100000, got {capacity}"),
        );
    }
    let u = &file.upstream;
    // The documented default holds wherever the config comes from: a file without an
    // `upstream:` section still reads the key from `NVIDIA_API_KEY`.
    let api_key = if u.keys.is_empty() {
        c.secret(
            "upstream.api_key_file",
            u.api_key_file.as_deref(),
            Some(u.api_key_env.as_deref().unwrap_or(defaults::API_KEY_ENV)),
            env,
        )
    } else {
        None
    };
    let single_source = if u.api_key_file.is_some() {
        "upstream.api_key_file"
    } else {
        "upstream.api_key_env"
    };
    let single = api_key
        .as_ref()
        .and_then(|key| super::keys::bearer(&mut c, single_source, key));
    let keys = super::keys::validate_keys(&mut c, u, single, env);
    let key_rates: Vec<KeyRate> = keys
        .iter()
        .map(|k| KeyRate {
            name: k.name.clone(),
            rpm: k.rate_rpm,
            tpm: k.tpm,
        })
        .collect();
    let models = super::models::validate_models(&mut c, &file.models);
    let clients = super::clients::validate_clients(&mut c, &file.clients, env);
    let client_caps = clients.caps();
    let bucket = |c: &mut Checker, key: &str, b: BucketSection| {
        let BucketSection {
            rate,
            capacity,
            tpm,
        } = b;
        let (rpm, auto) = match rate {
            RateRpm::Fixed(rpm) => (rpm, false),
            RateRpm::Auto => (defaults::AUTO_START_RPM, true),
        };
        let mut rpm = c.positive(key, rpm);
        if rpm > 0.0 && !(MIN_RPM..=MAX_RPM).contains(&rpm) {
            c.fail(
                key,
                format!("must be between {MIN_RPM} and {MAX_RPM} requests per minute, got {rpm:e}"),
            );
            rpm = defaults::RATE_RPM;
        }
        let tpm_key = format!("{}tpm", key.trim_end_matches("rate_rpm"));
        LimiterSettings {
            base_rpm: rpm,
            base_tpm: tpm.and_then(|t| c.tpm(&tpm_key, t)),
            capacity,
            queue_max,
            keys: key_rates.clone(),
            models: models.clone(),
            client_caps: client_caps.clone(),
            retreat: retreat.clone(),
            auto,
        }
    };
    let upstream_text = file
        .upstream_url
        .as_deref()
        .unwrap_or(defaults::UPSTREAM_URL);
    let default_upstream = UpstreamUrl::parse(upstream_text).unwrap_or_else(|e| {
        c.fail("upstream_url", e.to_string());
        UpstreamUrl::parse(defaults::UPSTREAM_URL).expect("the default upstream URL is valid")
    });
    let default_route = RouteSettings {
        name: "default".to_string(),
        path_prefix: "/".to_string(),
        upstream: default_upstream.clone(),
        bucket: Some(bucket(
            &mut c,
            "rate_rpm",
            BucketSection {
                rate: file.rate_rpm.unwrap_or(RateRpm::Fixed(defaults::RATE_RPM)),
                capacity,
                tpm: file.tpm,
            },
        )),
        keepalive_while_queued: false,
    };

    let mut routes = Vec::new();
    for (i, r) in file.routes.iter().enumerate() {
        if let Some(route) = validate_route(&mut c, i, r, &default_upstream, capacity, &bucket) {
            if routes
                .iter()
                .any(|o: &RouteSettings| o.path_prefix == route.path_prefix)
            {
                c.fail(
                    &format!("routes[{i}].path_prefix"),
                    format!("{:?} is listed twice", route.path_prefix),
                );
            }
            routes.push(route);
        }
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));

    let mut headers = Vec::new();
    for (name, value) in &u.headers {
        match (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            (Err(_), _) => c.fail(
                &format!("upstream.headers.{name}"),
                "is not a valid header name",
            ),
            (_, Err(_)) => c.fail(
                &format!("upstream.headers.{name}"),
                "is not a valid header value",
            ),
        }
    }
    if let Some(ca) = &u.ca_file {
        if std::fs::metadata(ca).is_err() {
            c.fail("upstream.ca_file", format!("cannot read {ca}"));
        }
    }
    let upstream = UpstreamOptions {
        authorization: keys.first().and_then(|k| k.authorization.clone()),
        api_key,
        keys,
        connect_timeout: c.duration(
            "upstream.connect_timeout",
            u.connect_timeout,
            defaults::CONNECT_TIMEOUT,
            false,
        ),
        read_timeout: c.duration(
            "upstream.read_timeout",
            u.read_timeout,
            defaults::READ_TIMEOUT,
            false,
        ),
        idle_timeout: c.duration(
            "upstream.idle_timeout",
            u.idle_timeout,
            defaults::IDLE_TIMEOUT,
            true,
        ),
        dns_ttl: c.duration("upstream.dns_ttl", u.dns_ttl, defaults::DNS_TTL, true),
        ca_file: u.ca_file.clone(),
        headers,
    };

    let admin = AdminSettings {
        listen_host: match &file.admin.listen_host {
            Some(h) => c.ip("admin.listen_host", h),
            None => listen_host,
        },
        token: c.secret(
            "admin.token_file",
            file.admin.token_file.as_deref(),
            file.admin.token_env.as_deref(),
            env,
        ),
    };

    let access = AccessSettings {
        allowed_hosts: file
            .access
            .allowed_hosts
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let name = h.trim().trim_end_matches('.').to_ascii_lowercase();
                let valid = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !valid {
                    c.fail(
                        &format!("access.allowed_hosts[{i}]"),
                        format!("must be a host name without port or scheme, got {h:?}"),
                    );
                }
                valid.then_some(name)
            })
            .collect(),
        max_priority: match &file.access.max_priority {
            Some(p) => c.priority("access.max_priority", p),
            None => Priority::High,
        },
        client_max_priority: file
            .access
            .client_max_priority
            .iter()
            .map(|(id, p)| {
                let key = format!("access.client_max_priority.{id}");
                (id.clone(), c.priority(&key, p))
            })
            .collect(),
    };

    if !admin.listen_host.is_loopback() && admin.token.is_none() {
        c.fail(
            "admin.listen_host",
            format!(
                "is {}, which is not loopback: set admin.token_env or admin.token_file, or the admin API would be open to the network",
                admin.listen_host
            ),
        );
    }

    let s = &file.server;
    let threads = s.threads.unwrap_or(defaults::THREADS);
    if threads == 0 || threads > 256 {
        c.fail(
            "server.threads",
            format!("must be between 1 and 256, got {threads}"),
        );
    }
    let max_connections = s.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
    if !(1..=1_000_000).contains(&max_connections) {
        c.fail(
            "server.max_connections",
            format!("must be between 1 and 1000000, got {max_connections}"),
        );
    }
    let server = ServerSettings {
        threads,
        max_connections,
        keepalive_timeout: c.duration(
            "server.keepalive_timeout",
            s.keepalive_timeout,
            defaults::KEEPALIVE_TIMEOUT,
            false,
        ),
        grace_period: c.duration(
            "server.grace_period",
            s.grace_period,
            defaults::GRACE_PERIOD,
            true,
        ),
        graceful_shutdown_timeout: c.duration(
            "server.graceful_shutdown_timeout",
            s.graceful_shutdown_timeout,
            defaults::GRACEFUL_SHUTDOWN_TIMEOUT,
            true,
        ),
        pid_file: s
            .pid_file
            .clone()
            .unwrap_or_else(|| defaults::PID_FILE.to_string()),
        upgrade_sock: s
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| defaults::UPGRADE_SOCK.to_string()),
    };

    let log_level = file.log_level.clone().unwrap_or_else(|| "info".to_string());
    if !matches!(
        log_level.as_str(),
        "error" | "warn" | "info" | "debug" | "trace" | "off"
    ) {
        c.fail(
            "log_level",
            format!("must be one of error, warn, info, debug, trace, off; got {log_level:?}"),
        );
    }
    let shared_quota = file
        .shared_quota
        .as_ref()
        .map(|section| validate_shared_quota(&mut c, section, env));

    let settings = Settings {
        listen_host,
        listen_port,
        metrics_port,
        default_route,
        routes,
        request_timeout: c.duration(
            "request_timeout",
            file.request_timeout,
            defaults::REQUEST_TIMEOUT,
            false,
        ),
        low_priority_timeout: c.duration(
            "low_priority_timeout",
            file.low_priority_timeout,
            defaults::LOW_PRIORITY_TIMEOUT,
            false,
        ),
        fallback_passthrough: file.fallback_enabled_passthrough.unwrap_or(false),
        max_replays,
        max_replay_body: usize::try_from(max_replay_body).unwrap_or(usize::MAX),
        replay_body_budget: usize::try_from(replay_body_budget).unwrap_or(usize::MAX),
        upstream,
        admin,
        access,
        server,
        state_dir: file.state_dir.as_ref().map(PathBuf::from),
        log_level,
        shared_quota,
        models,
        clients,
    };
    if c.errors.is_empty() {
        Ok(settings)
    } else {
        Err(c.errors)
    }
}

/// What a route's bucket is configured with, at the top level or in `routes[]`.
struct BucketSection {
    rate: RateRpm,
    capacity: u32,
    tpm: Option<u64>,
}

fn validate_route(
    c: &mut Checker,
    i: usize,
    r: &RouteSection,
    default_upstream: &UpstreamUrl,
    default_capacity: u32,
    bucket: &dyn Fn(&mut Checker, &str, BucketSection) -> LimiterSettings,
) -> Option<RouteSettings> {
    let key = |field: &str| format!("routes[{i}].{field}");
    if !r.path_prefix.starts_with('/') {
        c.fail(
            &key("path_prefix"),
            format!("must start with '/', got {:?}", r.path_prefix),
        );
        return None;
    }
    let upstream = match &r.upstream_url {
        Some(text) => match UpstreamUrl::parse(text) {
            Ok(u) => u,
            Err(e) => {
                c.fail(&key("upstream_url"), e.to_string());
                return None;
            }
        },
        None => default_upstream.clone(),
    };
    if r.passthrough && r.tpm.is_some() {
        c.fail(
            &key("tpm"),
            "a passthrough route takes no token, so it has no token budget",
        );
        return None;
    }
    let bucket = match (r.passthrough, r.rate_rpm) {
        (true, Some(_)) => {
            c.fail(
                &key("rate_rpm"),
                "a passthrough route takes no token, so it has no rate",
            );
            return None;
        }
        (true, None) => None,
        (false, None) => {
            c.fail(
                &key("rate_rpm"),
                "is required unless the route is passthrough: true",
            );
            return None;
        }
        (false, Some(rpm)) => Some(bucket(
            c,
            &key("rate_rpm"),
            BucketSection {
                rate: rpm,
                capacity: r.bucket_capacity.unwrap_or(default_capacity),
                tpm: r.tpm,
            },
        )),
    };
    Some(RouteSettings {
        name: r.path_prefix.clone(),
        path_prefix: r.path_prefix.clone(),
        upstream,
        bucket,
        keepalive_while_queued: r.keepalive_while_queued,
    })
}
