//! The configuration file as operators write it: one YAML document, every field documented.
//!
//! These structs are the user-facing contract (their doc comments are the reference in the
//! README). They are only parsed here; `validate` turns them into the settings the code uses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::bytes::ByteSize;
use super::rate::RateRpm;
use super::seconds::Seconds;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Address the proxy listens on for client traffic.
    pub listen_host: Option<String>,
    /// Port of the proxy (client traffic only).
    pub listen_port: Option<u16>,
    /// Port of the admin plane: metrics, health, status, dashboard and config API.
    pub metrics_port: Option<u16>,
    /// Where admitted requests go, e.g. `https://integrate.api.nvidia.com`.
    pub upstream_url: Option<String>,
    /// Base token refill rate of the shared bucket, in requests per minute; or `auto`:
    /// start at 40 and take the upstream's stated limits (`x-ratelimit-limit-requests`,
    /// `anthropic-ratelimit-requests-limit`) per key and per model as they come.
    pub rate_rpm: Option<RateRpm>,
    /// Tokens per minute each key may use (prompt and completion, as the upstream counts
    /// them), beside its `rate_rpm`; unset: no token budget. A request goes once its cost
    /// fits in every budget that applies (key, model, client) over the last 60 s; one whose
    /// estimated cost is more than a whole budget is answered 400 `request_too_large`.
    pub tpm: Option<u64>,
    /// Burst size: tokens the bucket holds at most. 1 spaces every request evenly.
    pub bucket_capacity: Option<u32>,
    /// Seconds: the whole budget of a normal or high priority request (queue wait + upstream).
    pub request_timeout: Option<Seconds>,
    /// Requests that may wait for a token at once; beyond that the answer is 429 `queue_full`.
    pub queue_max_size: Option<usize>,
    /// Seconds a low priority request may wait for a token.
    pub low_priority_timeout: Option<Seconds>,
    /// Fail open: forward a request without a token instead of rejecting it when the limiter
    /// cannot admit it in time (counted as passthrough).
    pub fallback_enabled_passthrough: Option<bool>,
    /// Log level (`error`, `warn`, `info`, `debug`, `trace`); `RUST_LOG` overrides it.
    pub log_level: Option<String>,
    /// Tuning of the adaptive retreat and recovery.
    pub adaptive: AdaptiveSection,
    /// The upstream connection: API key source, timeouts, extra headers, trust.
    pub upstream: UpstreamSection,
    /// Path-prefix routes; the longest matching prefix wins, unmatched paths use the top level.
    pub routes: Vec<RouteSection>,
    /// The admin plane.
    pub admin: AdminSection,
    /// Who may address the proxy and the admin plane.
    pub access: AccessSection,
    /// Pingora's server knobs.
    pub server: ServerSection,
    /// Directory where runtime overrides and limiter state are kept; unset keeps nothing.
    pub state_dir: Option<String>,
    /// One quota shared by several sidecars through Redis; unset, each sidecar has its own.
    pub shared_quota: Option<SharedQuotaSection>,
    /// Limits per model id (the `model` of the JSON body), e.g.
    /// `{"meta/llama-3.1-8b-instruct": {max_concurrency: 4}, "mistralai/*": {rate_rpm: 20}}`.
    /// An exact id wins over a glob, a longer glob over a shorter one. Requests whose body is
    /// not JSON or names no listed model have no model limit.
    pub models: BTreeMap<String, ModelSection>,
    /// Client keys: when set, every request must carry `Authorization: Bearer <client key>`
    /// (401 without one), its client id comes from the key, and the key is never forwarded.
    pub clients: Vec<ClientSection>,
}

/// One entry of `upstream.keys`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KeySection {
    /// Name of the key in metrics, `/status` and the log (the key itself never appears there).
    pub name: String,
    /// Environment variable holding the key.
    pub key_env: Option<String>,
    /// File holding the key; use either this or `key_env`.
    pub key_file: Option<String>,
    /// This key's own quota in requests per minute (default: the route's `rate_rpm`).
    pub rate_rpm: Option<f64>,
    /// This key's own token budget in tokens per minute (default: the route's `tpm`).
    pub tpm: Option<u64>,
}

/// One entry of `models:`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Requests per minute for this model, on top of the key's rate.
    pub rate_rpm: Option<f64>,
    /// Tokens per minute for this model over every key, on top of the keys' budgets.
    pub tpm: Option<u64>,
    /// Requests of this model in flight at once at most. The upstream's "worker limit reached"
    /// answers lower it (halved), answers without them raise it back step by step.
    pub max_concurrency: Option<u32>,
}

/// One entry of `clients:`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSection {
    /// The client's id in metrics, the log and the dashboard.
    pub id: String,
    /// Environment variable holding the client's key.
    pub key_env: Option<String>,
    /// File holding the client's key; use either this or `key_env`.
    pub key_file: Option<String>,
    /// Share of the grants while this client waits beside others of its priority class: a
    /// weight-2 client gets twice as many as a weight-1 client. Default 1.
    pub weight: Option<u32>,
    /// Highest `X-Priority` this client may claim; a higher one is lowered to it. Default
    /// `high`.
    pub max_priority: Option<String>,
    /// The most requests per minute this client may send, below the shared rate.
    pub rate_rpm: Option<f64>,
    /// The most tokens per minute this client's requests may cost, below the keys' budgets.
    pub tpm: Option<u64>,
}

/// `adaptive:` — how the bucket retreats on upstream 429s and recovers.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveSection {
    /// Seconds: sliding window over which the upstream 429 ratio and accepted rate are measured.
    pub window: Option<Seconds>,
    /// Upstream 429 ratio in the window above which the rate is cut; 0 cuts on the first 429.
    pub retreat_threshold: Option<f64>,
    /// Factor applied to the effective rate on a retreat (0 < factor < 1).
    pub decrease_factor: Option<f64>,
    /// Lowest effective rate, as a fraction of `rate_rpm`.
    pub floor_fraction: Option<f64>,
    /// Seconds without an upstream 429 before a retreat turns into recovery.
    pub quiet_period: Option<Seconds>,
    /// Fraction of `rate_rpm` added at every recovery step.
    pub recover_step: Option<f64>,
    /// Seconds between recovery steps.
    pub recover_interval: Option<Seconds>,
    /// Recovery stops this fraction below the rate the upstream was seen to accept.
    pub ceiling_headroom: Option<f64>,
    /// Seconds of quiet at that ceiling before recovery probes one step higher.
    pub probe_interval: Option<Seconds>,
    /// Tokens are issued this fraction below the effective rate, so that network jitter never
    /// puts two requests closer together than the upstream's window allows.
    pub safety_margin: Option<f64>,
    /// How many times one request is re-sent after an upstream 429 before the 429 reaches the
    /// client (at most 10). While the controller probes a full window, the request that met
    /// the 429 is the probe, so this also bounds how long it follows the probing.
    pub max_replays: Option<u32>,
    /// Largest request body kept in memory so that the request can be sent again after an
    /// upstream 429, and so that a waiting client that hangs up is noticed. Bytes, or a size
    /// such as `8MiB`. Larger bodies are forwarded when their turn comes but not replayed.
    pub max_replay_body: Option<ByteSize>,
    /// Memory all kept request bodies may take together. A body that does not fit is forwarded
    /// when its turn comes but is not replayable (counted in `replay_unavailable_total`).
    pub replay_body_budget: Option<ByteSize>,
}

/// `upstream:` — how the sidecar talks to the upstream API.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    /// Environment variable holding the upstream API key. When set and non-empty the key is
    /// sent as `Authorization: Bearer …` and the client's own credential is never forwarded.
    pub api_key_env: Option<String>,
    /// File holding the upstream API key (e.g. a systemd credential); takes precedence over
    /// `api_key_env`. A named file that cannot be read is an error.
    pub api_key_file: Option<String>,
    /// Seconds to establish a connection (TCP and TLS) to the upstream.
    pub connect_timeout: Option<Seconds>,
    /// Seconds the upstream may stay silent while a response is due (between chunks, too).
    pub read_timeout: Option<Seconds>,
    /// Seconds an idle pooled upstream connection is kept for reuse.
    pub idle_timeout: Option<Seconds>,
    /// Seconds a DNS answer for the upstream host is reused.
    pub dns_ttl: Option<Seconds>,
    /// PEM file of CA certificates to trust instead of the system store.
    pub ca_file: Option<String>,
    /// Extra headers added to every upstream request.
    pub headers: BTreeMap<String, String>,
    /// A pool of upstream keys, used in place of `api_key_env` / `api_key_file`, e.g.
    /// `[{name: team-a, key_env: KEY_A}, {name: team-b, key_file: /run/keys/b, rate_rpm: 30}]`.
    /// Each key has its own bucket and retreat, since the upstream counts per key; a request
    /// goes out on the key that can serve it soonest; a key the upstream refuses (a 401, or
    /// three 403s in a row) is taken out of the pool until a restart or a reload that changes
    /// its value. Key names are fixed until a restart.
    pub keys: Vec<KeySection>,
}

/// One entry of `routes:`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RouteSection {
    /// Requests whose path starts with this prefix take this route.
    pub path_prefix: String,
    /// Forward without taking a token and without counting against the quota.
    pub passthrough: bool,
    /// Upstream of this route (default: the top-level `upstream_url`).
    pub upstream_url: Option<String>,
    /// Rate of this route's own bucket (a number or `auto`); required unless `passthrough`.
    pub rate_rpm: Option<RateRpm>,
    /// Burst size of this route's own bucket (default: the top-level `bucket_capacity`).
    pub bucket_capacity: Option<u32>,
    /// Token budget of each key on this route, in tokens per minute (unset: none).
    pub tpm: Option<u64>,
    /// A `"stream": true` request that waits longer than 3 s for its token gets its `200` and
    /// event-stream headers then, and an SSE comment line every 15 s while it waits, so that
    /// its client does not give up. A failure after that (deadline, upstream error) ends the
    /// stream with an OpenAI-style error event instead of an HTTP error status.
    pub keepalive_while_queued: bool,
}

/// `admin:` — the admin plane.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin plane (default: `listen_host`).
    pub listen_host: Option<String>,
    /// Environment variable holding the admin bearer token for mutating endpoints.
    pub token_env: Option<String>,
    /// File holding the admin bearer token; takes precedence over `token_env`.
    pub token_file: Option<String>,
}

/// `access:` — the names under which the sidecar may be addressed.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSection {
    /// Host names (without port) clients may put in `Host` to reach the proxy and the admin
    /// plane, besides IP addresses and `localhost`. Any other name is refused (403): a web page
    /// that rebinds its own name to this machine cannot use the key or change the config.
    pub allowed_hosts: Vec<String>,
    /// Highest `X-Priority` a client may claim (`high`, `normal`, `low`); a higher one is
    /// lowered to it. Clients listed in `client_max_priority` get theirs instead.
    pub max_priority: Option<String>,
    /// Highest priority per client id (`X-Client-Id`), e.g. `{ci-deploy: high}`, for when
    /// `max_priority` keeps everyone else lower.
    pub client_max_priority: BTreeMap<String, String>,
}

/// `server:` — Pingora's server knobs.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Worker threads of the proxy service.
    pub threads: Option<usize>,
    /// Proxy connections open at once at most (each waiting request holds one); beyond that the
    /// longest idle connection is closed to make room for a new one, or, when none is idle, the
    /// new one is closed at once. Default 16384; keep the file limit above it.
    pub max_connections: Option<usize>,
    /// Seconds a kept-alive connection may stay idle before its next request; a client's own
    /// shorter `Keep-Alive: timeout=N` wins. At `max_connections` the longest idle connection
    /// is closed sooner, to make room for a new one.
    pub keepalive_timeout: Option<Seconds>,
    /// Seconds in-flight and queued requests get to finish after SIGTERM.
    pub grace_period: Option<Seconds>,
    /// Seconds the runtimes get to stop after the grace period.
    pub graceful_shutdown_timeout: Option<Seconds>,
    /// PID file written in daemon mode.
    pub pid_file: Option<String>,
    /// Unix socket through which listeners are handed over on a graceful upgrade (`-u`).
    pub upgrade_sock: Option<String>,
}

/// `shared_quota:` — one quota for several sidecars, kept in Redis.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SharedQuotaSection {
    /// Where the shared bucket lives; `redis` (the default) is the only backend.
    pub backend: Option<String>,
    /// Required unless `sentinels` is given: `redis://host:port/db`, `rediss://…` for TLS, or
    /// `unix:///path`. No password here: use `password_env` or `password_file`.
    pub url: Option<String>,
    /// Redis Sentinel addresses (`host:port`), in place of `url`: the sidecar asks them for the
    /// primary of `sentinel_master`, and asks again after a failover.
    pub sentinels: Option<Vec<String>>,
    /// Name of the primary the Sentinels monitor. Default `mymaster`.
    pub sentinel_master: Option<String>,
    /// Name every sidecar sharing the quota uses; the Redis keys start with it. Default
    /// `nvidia-sidecar`.
    pub key: Option<String>,
    /// Environment variable holding the Redis password.
    pub password_env: Option<String>,
    /// File holding the Redis password; takes precedence over `password_env`.
    pub password_file: Option<String>,
    /// Redis user name (ACL), when the password belongs to one.
    pub username: Option<String>,
    /// PEM file of CA certificates to trust for `rediss://` instead of the public roots.
    pub ca_file: Option<String>,
    /// Sidecars sharing the quota, for the share each takes while Redis is unreachable.
    /// Default: the number last seen alive in Redis (the floor fraction if none was seen).
    pub instances: Option<u32>,
    /// Seconds ahead a sidecar may lease slots of the shared quota for its waiting requests.
    /// Default 1; at low rates the reach grows to one slot per live sidecar (15 s at most).
    pub lease_ahead: Option<Seconds>,
    /// Most slots one lease takes. Default 4.
    pub max_lease: Option<u32>,
    /// Seconds a Redis call may take before the sidecar falls back to its local share.
    /// Default 0.5.
    pub timeout: Option<Seconds>,
}
