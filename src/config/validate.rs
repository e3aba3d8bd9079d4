//! From the file's structs to the settings the code runs on: every value checked, every
//! problem reported at once, secrets read from where the file points.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::Uri;

use super::checker::{Checker, MAX_RPM, MIN_RPM};
use super::clients::Clients;
use super::file::{FileConfig, RouteSection, SharedQuotaSection};
use super::keys::UpstreamKey;
use crate::limiter::{KeyRate, LimiterSettings, ModelSettings, Priority, RetreatSettings};

/// One problem with the configuration: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl ConfigError {
    /// The problem as one sentence, e.g. `rate_rpm must be > 0, got 0`.
    pub fn sentence(&self) -> String {
        let joins_as_sentence = ["must", "is ", "has ", "names "]
            .iter()
            .any(|w| self.reason.starts_with(w));
        if joins_as_sentence {
            format!("{} {}", self.key, self.reason)
        } else {
            format!("{}: {}", self.key, self.reason)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// A secret read from the environment or a file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub(super) fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a route's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The `Host` header value: the host, with the port when it is not the scheme's default.
    pub authority: String,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

impl UpstreamUrl {
    pub fn parse(text: &str) -> Result<UpstreamUrl, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("not a URL: {text:?} ({e})"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("must start with http:// or https://, got {text:?}")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("has no host: {text:?}"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "must be scheme://host[:port] without a path (clients send the path), got {text:?}"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        let authority = match uri.port_u16() {
            Some(p) if p != default_port => {
                uri.authority().map(|a| a.to_string()).unwrap_or_default()
            }
            _ => uri.host().unwrap_or_default().to_string(),
        };
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            authority,
        })
    }
}

/// One route: a path prefix, where it goes and which bucket it draws on.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSettings {
    /// Label in metrics and logs: `default` or the path prefix.
    pub name: String,
    pub path_prefix: String,
    pub upstream: UpstreamUrl,
    /// `None` for passthrough routes.
    pub bucket: Option<LimiterSettings>,
    /// Streaming requests that wait long get their headers and SSE comments while they wait.
    pub keepalive_while_queued: bool,
}

impl RouteSettings {
    pub fn is_passthrough(&self) -> bool {
        self.bucket.is_none()
    }

    /// Whether a request path falls under this route's prefix, on a segment boundary:
    /// `/v1/models` takes `/v1/models` and `/v1/models/x`, not `/v1/modelsXYZ`.
    pub fn matches(&self, path: &str) -> bool {
        let prefix = self.path_prefix.as_str();
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'))
    }
}

/// How the sidecar talks to upstreams.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamOptions {
    /// The single key (`api_key_env` / `api_key_file`); `None` with a pool.
    pub api_key: Option<Secret>,
    /// The first key's `Bearer <key>`, built once at load time and marked sensitive: what
    /// requests sent without a grant (passthrough, fail-open) carry.
    pub authorization: Option<HeaderValue>,
    /// The key pool, at least one entry; a grant's `lane` indexes it.
    pub keys: Vec<UpstreamKey>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub dns_ttl: Duration,
    pub ca_file: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    pub listen_host: IpAddr,
    pub token: Option<Secret>,
}

/// The names under which the sidecar may be addressed.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessSettings {
    /// Lower-case host names allowed besides IP addresses and `localhost`.
    pub allowed_hosts: Vec<String>,
    /// Highest priority a client not listed below may claim.
    pub max_priority: Priority,
    /// Highest priority per client id.
    pub client_max_priority: BTreeMap<String, Priority>,
}

impl Default for AccessSettings {
    fn default() -> Self {
        AccessSettings {
            allowed_hosts: Vec::new(),
            max_priority: Priority::High,
            client_max_priority: BTreeMap::new(),
        }
    }
}

impl AccessSettings {
    /// The priority a request gets: what it claims, at most what its client may claim.
    pub fn cap_priority(&self, client: &str, claimed: Priority) -> Priority {
        let max = self
            .client_max_priority
            .get(client)
            .copied()
            .unwrap_or(self.max_priority);
        claimed.min(max)
    }

    /// Whether a `Host` value (a name or address, with or without a port) may address the
    /// sidecar. IP addresses are always allowed: a page can only reach an address under that
    /// address as its own origin, so it cannot rebind it. Names must be `localhost`, under
    /// `.localhost`, or listed.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim();
        let name = match host.strip_prefix('[') {
            // [v6]:port
            Some(rest) => {
                return rest
                    .split(']')
                    .next()
                    .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
            }
            None => host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            }),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.allowed_hosts.contains(&name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub threads: usize,
    pub max_connections: usize,
    pub grace_period: Duration,
    pub graceful_shutdown_timeout: Duration,
    pub pid_file: String,
    pub upgrade_sock: String,
}

/// `shared_quota:`, checked: where the shared bucket lives and how this sidecar uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedQuotaSettings {
    /// The Redis URL as written (it holds no password); empty with Sentinels.
    pub url: String,
    /// `redis://host:port` of each Sentinel; empty without Sentinels.
    pub sentinels: Vec<String>,
    pub sentinel_master: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<String>,
    /// PEM of the CA certificates to trust for TLS, read at load time.
    pub ca_pem: Option<Vec<u8>>,
    pub key: String,
    /// Configured number of sidecars sharing the quota, for the fallback share.
    pub instances: Option<u32>,
    pub lease_ahead: Duration,
    pub max_lease: u32,
    pub timeout: Duration,
}

/// The validated configuration the sidecar runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen_host: IpAddr,
    pub listen_port: u16,
    pub metrics_port: u16,
    /// The top-level upstream and bucket, for paths no route matches.
    pub default_route: RouteSettings,
    /// Configured routes, longest prefix first.
    pub routes: Vec<RouteSettings>,
    pub request_timeout: Duration,
    pub low_priority_timeout: Duration,
    pub fallback_passthrough: bool,
    pub max_replays: u32,
    /// Largest request body kept for replay, bytes.
    pub max_replay_body: usize,
    /// Memory all kept request bodies may take together, bytes.
    pub replay_body_budget: usize,
    pub upstream: UpstreamOptions,
    pub admin: AdminSettings,
    pub access: AccessSettings,
    pub server: ServerSettings,
    pub state_dir: Option<PathBuf>,
    pub log_level: String,
    pub shared_quota: Option<SharedQuotaSettings>,
    /// Per-model limits, in match order.
    pub models: Vec<ModelSettings>,
    /// Client keys; empty when any local client may use the proxy.
    pub clients: Clients,
}

impl Settings {
    /// Where the proxy can be reached from this host (loopback when it listens on all
    /// addresses): for readiness probes.
    pub fn proxy_probe_addr(&self) -> std::net::SocketAddr {
        let host = if self.listen_host.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.listen_host
        };
        std::net::SocketAddr::new(host, self.listen_port)
    }

    /// The route for a request path: the longest matching prefix, else the default route.
    pub fn route_for(&self, path: &str) -> &RouteSettings {
        self.routes
            .iter()
            .find(|r| r.matches(path))
            .unwrap_or(&self.default_route)
    }
}

fn validate_shared_quota(
    c: &mut Checker,
    section: &SharedQuotaSection,
    env: &dyn Fn(&str) -> Option<String>,
) -> SharedQuotaSettings {
    let backend = section.backend.as_deref().unwrap_or("redis");
    if backend != "redis" {
        c.fail(
            "shared_quota.backend",
            format!("must be redis, got {backend:?}"),
        );
    }
    let sentinels = validate_sentinels(c, section);
    let url = match (&section.url, sentinels.is_empty()) {
        (Some(_), false) => {
            c.fail(
                "shared_quota.url",
                "cannot be used with shared_quota.sentinels: the Sentinels name the primary",
            );
            String::new()
        }
        (url, _) => url.clone().unwrap_or_default(),
    };
    if url.is_empty() && section.sentinels.is_none() {
        c.fail(
            "shared_quota.url",
            "is required (or shared_quota.sentinels), e.g. redis://127.0.0.1:6379",
        );
    } else if !url.is_empty() {
        use redis::IntoConnectionInfo;
        match url.as_str().into_connection_info() {
            Ok(info) if info.redis.password.is_some() => c.fail(
                "shared_quota.url",
                "has a password in it: put the password in the file named by shared_quota.password_file or the variable named by shared_quota.password_env",
            ),
            Ok(info) => {
                if let Err(e) = redis::Client::open(info) {
                    c.fail("shared_quota.url", format!("cannot be used: {e}"));
                }
            }
            Err(e) => c.fail(
                "shared_quota.url",
                format!("is not a Redis URL (redis://, rediss:// or unix://): {e}"),
            ),
        }
    }
    let key = section
        .key
        .clone()
        .unwrap_or_else(|| defaults::SHARED_QUOTA_KEY.to_string());
    if key.is_empty()
        || key
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control() || ch == '{' || ch == '}')
    {
        c.fail(
            "shared_quota.key",
            format!("must be a non-empty name without spaces or braces, got {key:?}"),
        );
    }
    if section.instances == Some(0) {
        c.fail("shared_quota.instances", "must be at least 1, got 0");
    }
    let max_lease = section.max_lease.unwrap_or(defaults::MAX_LEASE);
    if !(1..=1000).contains(&max_lease) {
        c.fail(
            "shared_quota.max_lease",
            format!("must be between 1 and 1000, got {max_lease}"),
        );
    }
    let lease_ahead = c.duration(
        "shared_quota.lease_ahead",
        section.lease_ahead,
        defaults::LEASE_AHEAD,
        false,
    );
    if lease_ahead > Duration::from_secs(60) {
        c.fail(
            "shared_quota.lease_ahead",
            format!(
                "must be at most 60 seconds, got {}",
                lease_ahead.as_secs_f64()
            ),
        );
    }
    let ca_pem = section
        .ca_file
        .as_deref()
        .and_then(|path| match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                c.fail("shared_quota.ca_file", format!("cannot read {path}: {e}"));
                None
            }
        });
    if let Some(pem) = &ca_pem {
        use redis::IntoConnectionInfo;
        if !url.starts_with("rediss://") {
            c.fail(
                "shared_quota.ca_file",
                "is only used with a rediss:// url (TLS)",
            );
        } else if let Ok(info) = url.as_str().into_connection_info() {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            };
            if let Err(e) = redis::Client::build_with_tls(info, certs) {
                c.fail(
                    "shared_quota.ca_file",
                    format!("holds no usable CA certificate: {e}"),
                );
            }
        }
    }
    if section.ca_file.is_some() && !sentinels.is_empty() {
        c.fail(
            "shared_quota.ca_file",
            "is not supported with shared_quota.sentinels (TLS to Sentinels is not implemented)",
        );
    }
    SharedQuotaSettings {
        url,
        sentinels,
        sentinel_master: section
            .sentinel_master
            .clone()
            .unwrap_or_else(|| defaults::SENTINEL_MASTER.to_string()),
        ca_file: section.ca_file.clone(),
        ca_pem,
        username: section.username.clone(),
        password: c.secret(
            "shared_quota.password_file",
            section.password_file.as_deref(),
            section.password_env.as_deref(),
            env,
        ),
        key,
        instances: section.instances,
        lease_ahead,
        max_lease,
        timeout: c.duration(
            "shared_quota.timeout",
            section.timeout,
            defaults::REDIS_TIMEOUT,
            false,
        ),
    }
}

/// `shared_quota.sentinels` as `redis://host:port` URLs, and a sensible `sentinel_master`.
fn validate_sentinels(c: &mut Checker, section: &SharedQuotaSection) -> Vec<String> {
    let Some(addresses) = &section.sentinels else {
        if section.sentinel_master.is_some() {
            c.fail(
                "shared_quota.sentinel_master",
                "is only used with shared_quota.sentinels",
            );
        }
        return Vec::new();
    };
    if addresses.is_empty() {
        c.fail("shared_quota.sentinels", "must list at least one host:port");
    }
    if let Some(name) = &section.sentinel_master {
        if name.is_empty() || name.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            c.fail(
                "shared_quota.sentinel_master",
                format!("must be a name without spaces, got {name:?}"),
            );
        }
    }
    let mut urls = Vec::new();
    for address in addresses {
        let parsed = address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty() && !host.contains(['/', '@', ' ']))
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok().filter(|p| *p > 0)?)));
        match parsed {
            Some((host, port)) => urls.push(format!("redis://{host}:{port}")),
            None => c.fail(
                "shared_quota.sentinels",
                format!("must be host:port entries, got {address:?}"),
            ),
        }
    }
    urls
}

/// Default values, shared by validation and the documentation.
pub mod defaults {
    /// `shared_quota.sentinel_master`: Redis Sentinel's own example name.
    pub const SENTINEL_MASTER: &str = "mymaster";
    pub const LISTEN_HOST: &str = "127.0.0.1";
    pub const LISTEN_PORT: u16 = 9180;
    pub const METRICS_PORT: u16 = 9191;
    pub const UPSTREAM_URL: &str = "https://integrate.api.nvidia.com";
    /// Where the upstream key is read from when the config names no source.
    pub const API_KEY_ENV: &str = "NVIDIA_API_KEY";
    pub const RATE_RPM: f64 = 40.0;
    pub const BUCKET_CAPACITY: u32 = 1;
    pub const REQUEST_TIMEOUT: f64 = 300.0;
    pub const QUEUE_MAX_SIZE: usize = 100;
    pub const LOW_PRIORITY_TIMEOUT: f64 = 30.0;
    pub const MAX_REPLAYS: u32 = 6;
    /// Coding agents send prompts of 100 KiB to 1 MiB; 8 MiB leaves room for long contexts.
    pub const MAX_REPLAY_BODY: u64 = 8 << 20;
    /// Enough for 32 bodies of the largest replayable size at once.
    pub const REPLAY_BODY_BUDGET: u64 = 256 << 20;
    pub const CONNECT_TIMEOUT: f64 = 10.0;
    pub const READ_TIMEOUT: f64 = 300.0;
    pub const IDLE_TIMEOUT: f64 = 60.0;
    pub const DNS_TTL: f64 = 60.0;
    pub const THREADS: usize = 2;
    pub const MAX_CONNECTIONS: usize = 16_384;
    pub const GRACE_PERIOD: f64 = 30.0;
    pub const GRACEFUL_SHUTDOWN_TIMEOUT: f64 = 5.0;
    pub const PID_FILE: &str = "/tmp/nvidia-sidecar.pid";
    pub const UPGRADE_SOCK: &str = "/tmp/nvidia-sidecar-upgrade.sock";
    pub const SHARED_QUOTA_KEY: &str = "nvidia-sidecar";
    pub const LEASE_AHEAD: f64 = 1.0;
    pub const MAX_LEASE: u32 = 4;
    pub const REDIS_TIMEOUT: f64 = 0.5;
}

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
    let retreat = RetreatSettings {
        window: c.duration("adaptive.window", a.window, 60.0, false),
        threshold: c.fraction(
            "adaptive.retreat_threshold",
            a.retreat_threshold.unwrap_or(0.0),
            true,
            false,
        ),
        decrease_factor: c.fraction(
            "adaptive.decrease_factor",
            a.decrease_factor.unwrap_or(0.5),
            false,
            false,
        ),
        floor_fraction: c.fraction(
            "adaptive.floor_fraction",
            a.floor_fraction.unwrap_or(0.1),
            false,
            true,
        ),
        quiet_period: c.duration("adaptive.quiet_period", a.quiet_period, 15.0, true),
        recover_step: c.fraction(
            "adaptive.recover_step",
            a.recover_step.unwrap_or(0.05),
            false,
            true,
        ),
        recover_interval: c.duration("adaptive.recover_interval", a.recover_interval, 5.0, false),
        ceiling_headroom: c.fraction(
            "adaptive.ceiling_headroom",
            a.ceiling_headroom.unwrap_or(0.05),
            true,
            false,
        ),
        probe_interval: c.duration("adaptive.probe_interval", a.probe_interval, 300.0, false),
        safety_margin: c.fraction(
            "adaptive.safety_margin",
            a.safety_margin.unwrap_or(0.01),
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
        })
        .collect();
    let models = super::models::validate_models(&mut c, &file.models);
    let clients = super::clients::validate_clients(&mut c, &file.clients, env);
    let client_caps = clients.caps();
    let bucket = |c: &mut Checker, key: &str, rpm: f64, capacity: u32| {
        let mut rpm = c.positive(key, rpm);
        if rpm > 0.0 && !(MIN_RPM..=MAX_RPM).contains(&rpm) {
            c.fail(
                key,
                format!("must be between {MIN_RPM} and {MAX_RPM} requests per minute, got {rpm:e}"),
            );
            rpm = defaults::RATE_RPM;
        }
        LimiterSettings {
            base_rpm: rpm,
            capacity,
            queue_max,
            keys: key_rates.clone(),
            models: models.clone(),
            client_caps: client_caps.clone(),
            retreat: retreat.clone(),
        }
    };
    let upstream_text = file
        .upstream_url
        .as_deref()
        .unwrap_or(defaults::UPSTREAM_URL);
    let default_upstream = UpstreamUrl::parse(upstream_text).unwrap_or_else(|e| {
        c.fail("upstream_url", e);
        UpstreamUrl::parse(defaults::UPSTREAM_URL).expect("the default upstream URL is valid")
    });
    let default_route = RouteSettings {
        name: "default".to_string(),
        path_prefix: "/".to_string(),
        upstream: default_upstream.clone(),
        bucket: Some(bucket(
            &mut c,
            "rate_rpm",
            file.rate_rpm.unwrap_or(defaults::RATE_RPM),
            capacity,
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

fn validate_route(
    c: &mut Checker,
    i: usize,
    r: &RouteSection,
    default_upstream: &UpstreamUrl,
    default_capacity: u32,
    bucket: &dyn Fn(&mut Checker, &str, f64, u32) -> LimiterSettings,
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
                c.fail(&key("upstream_url"), e);
                return None;
            }
        },
        None => default_upstream.clone(),
    };
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
            rpm,
            r.bucket_capacity.unwrap_or(default_capacity),
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
