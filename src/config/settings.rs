//! The validated configuration the sidecar runs on (`Settings`) and its parts: what
//! `validate` builds from the file, and what the rest of the code reads.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::Uri;

use super::clients::Clients;
use super::keys::UpstreamKey;
use super::Secret;
use crate::limiter::{LimiterSettings, ModelSettings, Priority};

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

/// Why a text is not an upstream URL; each says it of the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("is not a URL: {text:?} ({reason})")]
    NotAUrl { text: String, reason: String },
    #[error("must start with http:// or https://, got {0:?}")]
    Scheme(String),
    #[error("has no host: {0:?}")]
    NoHost(String),
    #[error("must be scheme://host[:port] without a path (clients send the path), got {0:?}")]
    HasPath(String),
}

impl UpstreamUrl {
    pub fn parse(text: &str) -> Result<UpstreamUrl, UrlError> {
        let uri: Uri = text
            .parse()
            .map_err(|e: http::uri::InvalidUri| UrlError::NotAUrl {
                text: text.to_string(),
                reason: e.to_string(),
            })?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(UrlError::Scheme(text.to_string())),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| UrlError::NoHost(text.to_string()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(UrlError::HasPath(text.to_string()));
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

    /// `rate_rpm: auto`: the upstream's stated limits set the rates.
    pub fn is_auto(&self) -> bool {
        self.bucket.as_ref().is_some_and(|b| b.auto)
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
    pub keepalive_timeout: Duration,
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
