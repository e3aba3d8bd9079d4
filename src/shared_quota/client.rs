//! The Redis side of the shared quota: one connection (re-established by the client crate when
//! Redis comes back, or found again through the Sentinels after a failed call), the lease
//! script, and its reply.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, Script, Value};
use tokio::sync::Mutex;

use crate::config::SharedQuotaSettings;
use crate::limiter::RetreatState;

/// How long a sidecar counts as alive after its last heartbeat (three heartbeats).
pub const ALIVE_WINDOW: Duration = Duration::from_secs(15);
/// How long the shared keys outlive the last sidecar that touched them.
const KEY_LIFETIME: Duration = Duration::from_secs(3600);

/// A change of the shared controller state this sidecar asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    None,
    /// A cut or a pause: applied at once.
    Slow,
    /// A recovery step: applied only if nobody changed the state since `seen_version`.
    Step,
}

/// One call of the lease script.
#[derive(Debug, Clone)]
pub struct LeaseRequest<'a> {
    pub route: &'a str,
    pub wanted: usize,
    pub own_rpm: f64,
    pub margin: f64,
    pub capacity: u32,
    pub horizon: Duration,
    pub change: Change,
    pub rate: f64,
    pub state: RetreatState,
    pub ceiling: f64,
    pub pause: Duration,
    pub seen_version: i64,
    /// Requests waiting at this sidecar: its weight when slots are scarce.
    pub waiting: usize,
    /// Slots this sidecar holds (open or ahead).
    pub held: usize,
    /// Set when this sidecar comes back from its local share: how long the shared schedule
    /// must wait for the others to come back too.
    pub rejoin_hold: Option<Duration>,
}

/// What Redis answered.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseReply {
    pub live: u32,
    /// The shared effective rate, if any sidecar has published one.
    pub rate: Option<f64>,
    pub state: RetreatState,
    pub pause: Duration,
    pub ceiling: f64,
    pub version: i64,
    /// Distance between slots at the rate Redis spaced them with.
    pub spacing: Duration,
    pub next_free: Duration,
    /// How far ahead slots were leased: the configured horizon, or more at low rates.
    pub horizon: Duration,
    /// Starts of the leased slots, from the moment the script ran.
    pub slots: Vec<Duration>,
}

/// Where the Redis holding the shared quota is.
enum Source {
    /// At a fixed address.
    Direct(redis::Client),
    /// Wherever the Sentinels say the primary is; asked again after every failed call.
    Sentinel(Mutex<SentinelClient>),
}

/// The connection to the Redis holding the shared quota.
pub struct RedisQuota {
    source: Source,
    connection: Mutex<Option<ConnectionManager>>,
    timeout: Duration,
    key: String,
    instance: String,
    script: Script,
    models_script: Script,
}

/// Why a call failed, for the log and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    Timeout,
    Redis(String),
}

impl From<redis::RedisError> for CallError {
    fn from(e: redis::RedisError) -> Self {
        // The client's own response timeout may fire before ours: the same thing.
        if e.is_timeout() {
            CallError::Timeout
        } else {
            CallError::Redis(e.to_string())
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout => f.write_str("no answer in time"),
            CallError::Redis(e) => f.write_str(e),
        }
    }
}

/// Why the client of the shared quota could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("shared_quota.url: {0}")]
    Url(redis::RedisError),
    #[error("shared_quota: {0}")]
    Client(redis::RedisError),
    #[error("shared_quota.sentinels: {0}")]
    Sentinels(redis::RedisError),
}

/// The client of a Redis at `settings.url`.
fn direct_client(settings: &SharedQuotaSettings) -> Result<redis::Client, SetupError> {
    let mut info = settings
        .url
        .as_str()
        .into_connection_info()
        .map_err(SetupError::Url)?;
    if let Some(user) = &settings.username {
        info.redis.username = Some(user.clone());
    }
    if let Some(password) = &settings.password {
        info.redis.password = Some(password.expose().to_string());
    }
    match &settings.ca_pem {
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
        None => redis::Client::open(info),
    }
    .map_err(SetupError::Client)
}

impl RedisQuota {
    /// Prepares the client; nothing connects until the first call.
    pub fn new(settings: &SharedQuotaSettings, instance: String) -> Result<Self, SetupError> {
        let source = if settings.sentinels.is_empty() {
            Source::Direct(direct_client(settings)?)
        } else {
            let primary = SentinelNodeConnectionInfo {
                tls_mode: None,
                redis_connection_info: Some(redis::RedisConnectionInfo {
                    username: settings.username.clone(),
                    password: settings.password.as_ref().map(|p| p.expose().to_string()),
                    ..Default::default()
                }),
            };
            let client = SentinelClient::build(
                settings.sentinels.clone(),
                settings.sentinel_master.clone(),
                Some(primary),
                SentinelServerType::Master,
            )
            .map_err(SetupError::Sentinels)?;
            Source::Sentinel(Mutex::new(client))
        };
        Ok(RedisQuota {
            source,
            connection: Mutex::new(None),
            timeout: settings.timeout,
            key: settings.key.clone(),
            instance,
            script: Script::new(include_str!("lease.lua")),
            models_script: Script::new(include_str!("models.lua")),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Keys of one route's bucket; the braces keep them in one Redis Cluster slot.
    fn keys(&self, route: &str) -> [String; 4] {
        let base = &self.key;
        [
            format!("{{{base}}}:{route}:schedule"),
            format!("{{{base}}}:{route}:control"),
            format!("{{{base}}}:instances"),
            format!("{{{base}}}:{route}:waiting"),
        ]
    }

    async fn connection(&self) -> Result<ConnectionManager, CallError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(0)
            .set_max_delay(self.timeout.as_millis() as u64);
        let client = match &self.source {
            Source::Direct(client) => client.clone(),
            Source::Sentinel(sentinels) => sentinels.lock().await.async_get_client().await?,
        };
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(CallError::from)?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Runs the lease script, bounded by the configured timeout.
    pub async fn lease(&self, request: &LeaseRequest<'_>) -> Result<LeaseReply, CallError> {
        let call = async {
            let mut connection = self.connection().await?;
            let [schedule, control, instances, waiting] = self.keys(request.route);
            let mut invocation = self.script.prepare_invoke();
            invocation
                .key(schedule)
                .key(control)
                .key(instances)
                .key(waiting)
                .arg(&self.instance);
            for (_, value) in lease_arguments(request).into_iter().skip(1) {
                invocation.arg(value);
            }
            let reply: Vec<Value> = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(CallError::from)?;
            parse_reply(&reply).map_err(CallError::Redis)
        };
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout),
        };
        if result.is_err() && matches!(self.source, Source::Sentinel(_)) {
            // The primary may have moved (or been demoted: READONLY): ask the Sentinels again.
            *self.connection.lock().await = None;
        }
        result
    }
}

/// What one sidecar reports of a model's lane on one key, and what it reads back: the most
/// careful report of all (`models.lua`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelReport {
    pub model: String,
    pub rate: f64,
    pub state: RetreatState,
    /// 0 when none is known.
    pub ceiling: f64,
    pub pause: Duration,
}

/// How long a model report counts after it was written (three heartbeats).
const MODEL_REPORT_FRESH: Duration = Duration::from_secs(15);

impl RedisQuota {
    /// Reports this sidecar's model lanes of `route` (a route and key, as for `lease`) and
    /// reads back what all sidecars sharing it report, bounded by the configured timeout.
    pub async fn models(
        &self,
        route: &str,
        reports: &[ModelReport],
    ) -> Result<Vec<ModelReport>, CallError> {
        let call = async {
            let mut connection = self.connection().await?;
            let mut invocation = self.models_script.prepare_invoke();
            invocation
                .key(format!("{{{}}}:{route}:models", self.key))
                .arg(&self.instance)
                .arg((MODEL_REPORT_FRESH.as_micros() as u64).to_string())
                .arg((KEY_LIFETIME.as_millis() as u64).to_string())
                .arg(reports.len().to_string());
            for r in reports {
                invocation
                    .arg(&r.model)
                    .arg(r.rate.to_string())
                    .arg(encode_state(r.state).to_string())
                    .arg(r.ceiling.to_string())
                    .arg((r.pause.as_micros() as u64).to_string());
            }
            let reply: Vec<Value> = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(CallError::from)?;
            parse_models(&reply).map_err(CallError::Redis)
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout),
        }
    }
}

/// The models script's reply, five fields a model; a field that does not read is an error
/// (the whole reply is then ignored).
fn parse_models(reply: &[Value]) -> Result<Vec<ModelReport>, String> {
    reply
        .chunks(5)
        .map(|c| {
            let number = |i: usize, what: &str| -> Result<f64, String> {
                text(c.get(i), what)?
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| format!("models: {what} is not a rate"))
            };
            Ok(ModelReport {
                model: text(c.first(), "model")?,
                rate: number(1, "rate")?,
                state: decode_state(text(c.get(2), "state")?.parse().unwrap_or(1)),
                ceiling: number(3, "ceiling")?,
                pause: micros(int(c.get(4), "pause")?),
            })
        })
        .collect()
}

/// The retreat state as the lease script stores it. Written apart from the metrics gauge, so
/// that the two can change independently; the codes must stay as they are while sidecars of
/// different versions may share one Redis.
fn encode_state(state: RetreatState) -> i64 {
    match state {
        RetreatState::Normal => 0,
        RetreatState::Retreat => 1,
        RetreatState::Recover => 2,
    }
}

/// The retreat state from the lease script; an unknown code (a newer sidecar) reads as a
/// retreat, the careful side.
fn decode_state(code: i64) -> RetreatState {
    match code {
        0 => RetreatState::Normal,
        2 => RetreatState::Recover,
        _ => RetreatState::Retreat,
    }
}

/// The lease script's arguments in `ARGV` order, each with the name the script gives it
/// (`lease.lua`); the first, the instance id, is filled in by `lease`.
fn lease_arguments(request: &LeaseRequest<'_>) -> Vec<(&'static str, String)> {
    let micros = |d: Duration| (d.as_micros() as u64).to_string();
    let change = match request.change {
        Change::None => "none",
        Change::Slow => "slow",
        Change::Step => "step",
    };
    vec![
        ("id", String::new()),
        ("wanted", request.wanted.to_string()),
        ("own_rpm", request.own_rpm.to_string()),
        ("margin", request.margin.to_string()),
        ("capacity", request.capacity.to_string()),
        ("horizon", micros(request.horizon)),
        ("kind", change.to_string()),
        ("rate", request.rate.to_string()),
        ("state", encode_state(request.state).to_string()),
        ("ceiling", request.ceiling.to_string()),
        ("pause", micros(request.pause)),
        ("seen", request.seen_version.to_string()),
        ("alive", micros(ALIVE_WINDOW)),
        ("keep_ms", (KEY_LIFETIME.as_millis() as u64).to_string()),
        ("waiting", request.waiting.to_string()),
        (
            "rejoin_hold",
            request
                .rejoin_hold
                .map_or(0, |d| d.as_micros() as u64)
                .to_string(),
        ),
        ("held", request.held.to_string()),
    ]
}

fn int(value: Option<&Value>, what: &str) -> Result<i64, String> {
    match value {
        Some(Value::Int(n)) => Ok(*n),
        other => Err(format!("lease script: {what} is {other:?}, not an integer")),
    }
}

fn text(value: Option<&Value>, what: &str) -> Result<String, String> {
    match value {
        Some(Value::BulkString(bytes)) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        other => Err(format!("lease script: {what} is {other:?}, not a string")),
    }
}

fn micros(n: i64) -> Duration {
    Duration::from_micros(n.max(0) as u64)
}

/// Reads a script reply built from fuzz input (see `crate::fuzzing`).
pub(super) fn fuzz_reply(items: &[Result<i64, Vec<u8>>]) {
    let reply: Vec<Value> = items
        .iter()
        .map(|item| match item {
            Ok(n) => Value::Int(*n),
            Err(bytes) => Value::BulkString(bytes.clone()),
        })
        .collect();
    let _ = parse_reply(&reply);
}

fn parse_reply(reply: &[Value]) -> Result<LeaseReply, String> {
    let rate = text(reply.get(1), "the rate")?;
    let ceiling = text(reply.get(4), "the ceiling")?;
    Ok(LeaseReply {
        live: int(reply.first(), "the live count")?.clamp(0, i64::from(u32::MAX)) as u32,
        rate: if rate.is_empty() {
            None
        } else {
            Some(
                rate.parse()
                    .map_err(|_| format!("lease script: rate {rate:?}"))?,
            )
        },
        state: decode_state(int(reply.get(2), "the state")?),
        pause: micros(int(reply.get(3), "the pause")?),
        ceiling: ceiling.parse().unwrap_or(0.0),
        version: int(reply.get(5), "the version")?,
        spacing: micros(int(reply.get(6), "the spacing")?),
        next_free: micros(int(reply.get(7), "the next free slot")?),
        horizon: micros(int(reply.get(8), "the horizon")?),
        slots: reply
            .iter()
            .skip(9)
            .map(|v| int(Some(v), "a slot").map(micros))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `ARGV[n]` the script reads, with the names it gives the value (`local x =
    /// tonumber(ARGV[n])`, `x = ARGV[n]`).
    fn script_arguments() -> std::collections::BTreeMap<usize, Vec<String>> {
        let mut found: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
        for line in include_str!("lease.lua").lines() {
            let Some(at) = line.find("ARGV[") else {
                continue;
            };
            let n: usize = line[at + 5..].split(']').next().unwrap().parse().unwrap();
            let name = line
                .split('=')
                .next()
                .unwrap()
                .trim()
                .trim_start_matches("local ")
                .trim()
                .trim_start_matches("new_")
                .to_string();
            found.entry(n).or_default().push(name);
        }
        found
    }

    #[test]
    fn rust_and_the_lease_script_agree_on_every_argument() {
        let request = LeaseRequest {
            route: "r",
            wanted: 1,
            own_rpm: 40.0,
            margin: 0.01,
            capacity: 1,
            horizon: Duration::from_secs(1),
            change: Change::None,
            rate: 40.0,
            state: RetreatState::Normal,
            ceiling: 0.0,
            pause: Duration::ZERO,
            seen_version: 0,
            waiting: 1,
            held: 0,
            rejoin_hold: None,
        };
        let ours = lease_arguments(&request);
        let script = script_arguments();
        assert_eq!(ours.len(), 17);
        assert_eq!(
            script.keys().copied().collect::<Vec<_>>(),
            (1..=ours.len()).collect::<Vec<_>>(),
            "the script reads ARGV[1..={}] and nothing else",
            ours.len()
        );
        for (i, (name, _)) in ours.iter().enumerate() {
            let names = &script[&(i + 1)];
            assert!(
                names.iter().all(|n| n == name),
                "ARGV[{}] is {name} here and {names:?} in lease.lua",
                i + 1
            );
        }
    }

    #[test]
    fn the_wire_code_of_every_state_reads_back() {
        for state in [
            RetreatState::Normal,
            RetreatState::Retreat,
            RetreatState::Recover,
        ] {
            assert_eq!(decode_state(encode_state(state)), state);
        }
        assert_eq!(
            decode_state(7),
            RetreatState::Retreat,
            "unknown: the careful side"
        );
    }

    #[test]
    fn a_reply_is_read_field_by_field() {
        let reply = vec![
            Value::Int(3),
            Value::BulkString(b"20".to_vec()),
            Value::Int(1),
            Value::Int(0),
            Value::BulkString(b"28.5".to_vec()),
            Value::Int(7),
            Value::Int(3_030_303),
            Value::Int(4_000_000),
            Value::Int(9_090_909),
            Value::Int(0),
            Value::Int(3_030_303),
        ];
        let parsed = parse_reply(&reply).unwrap();
        assert_eq!(parsed.live, 3);
        assert_eq!(parsed.rate, Some(20.0));
        assert_eq!(parsed.ceiling, 28.5);
        assert_eq!(parsed.version, 7);
        assert_eq!(parsed.horizon, Duration::from_micros(9_090_909));
        assert_eq!(
            parsed.slots,
            vec![Duration::ZERO, Duration::from_micros(3_030_303)]
        );

        let mut unshared = reply.clone();
        unshared[1] = Value::BulkString(Vec::new());
        assert_eq!(parse_reply(&unshared).unwrap().rate, None);
        assert!(parse_reply(&reply[..3]).is_err());
    }
}
