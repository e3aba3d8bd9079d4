//! Default values, in one place: validation fills in every key the file leaves out from
//! here, and a test checks that `conf/sidecar.yaml` (the embedded default) says the same. The
//! adaptive defaults are `RetreatSettings::default()`, which validation takes as they are.

/// `shared_quota.sentinel_master`: Redis Sentinel's own example name.
pub const SENTINEL_MASTER: &str = "mymaster";
pub const LISTEN_HOST: &str = "127.0.0.1";
pub const LISTEN_PORT: u16 = 9180;
pub const METRICS_PORT: u16 = 9191;
pub const UPSTREAM_URL: &str = "https://integrate.api.nvidia.com";
/// Where the upstream key is read from when the config names no source.
pub const API_KEY_ENV: &str = "NVIDIA_API_KEY";
pub const RATE_RPM: f64 = 40.0;
/// Where `rate_rpm: auto` starts before the upstream states a limit (NVIDIA's usual figure).
pub const AUTO_START_RPM: f64 = 40.0;
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
/// As Pingora's own, between nginx's 75 s and Envoy's one hour of idle time.
pub const KEEPALIVE_TIMEOUT: f64 = 60.0;
pub const GRACE_PERIOD: f64 = 30.0;
pub const GRACEFUL_SHUTDOWN_TIMEOUT: f64 = 5.0;
pub const PID_FILE: &str = "/tmp/nvidia-sidecar.pid";
pub const UPGRADE_SOCK: &str = "/tmp/nvidia-sidecar-upgrade.sock";
pub const SHARED_QUOTA_KEY: &str = "nvidia-sidecar";
pub const LEASE_AHEAD: f64 = 1.0;
pub const MAX_LEASE: u32 = 4;
pub const REDIS_TIMEOUT: f64 = 0.5;
