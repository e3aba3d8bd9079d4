//! Starts the real `nvidia-sidecar` binary with a config written for the test, waits (without
//! blocking the runtime) until its proxy and admin ports answer, and stops it when dropped.
//!
//! `Sidecar::builder(upstream_url)` sets up a run; `.start().await` starts it. The config is a
//! YAML mapping: the harness's base (ports, upstream, `log_level: info`, and a `server:`
//! section with `threads: 2`, the grace period and private pid/upgrade-socket paths), with the
//! caller's `extra` YAML deep-merged over it (mappings merge key by key, anything else in
//! `extra` replaces what the base has), written out with `serde_yaml`.
//!
//! Ports come from [`free_port`], which never hands the same port out twice in a process; if
//! the sidecar still finds one taken (another process took it in between) and exits with
//! `cannot listen on`, the start is retried on new ports.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_yaml::{Mapping, Value};

/// The ports `free_port` hands out: below Linux's default ephemeral range (32768-60999), so
/// neither a `bind` to port 0 nor the source port of an outgoing connection lands in it.
const PORTS: std::ops::Range<u32> = 20_000..32_000;

/// How many ports this process has handed out (or skipped as taken) so far.
static PORTS_TAKEN: AtomicU32 = AtomicU32::new(0);

/// How many times `start` tries new ports when the sidecar cannot listen on the ones it got.
const START_ATTEMPTS: usize = 4;

/// A loopback port that nothing listens on now and that no other caller in this process gets.
///
/// Each process walks [`PORTS`] with an atomic counter from a starting point derived from its
/// pid (so that test processes running side by side start far apart), skipping ports that
/// cannot be bound on 127.0.0.1 and 0.0.0.0. Another process may still take the port before
/// it is used; `Sidecar` retries on new ports when that happens.
pub fn free_port() -> u16 {
    let len = PORTS.end - PORTS.start;
    let first = std::process::id().wrapping_mul(7919) % len;
    for _ in 0..len {
        let n = PORTS_TAKEN.fetch_add(1, Ordering::Relaxed);
        let port = (PORTS.start + (first + n) % len) as u16;
        let free = ["127.0.0.1", "0.0.0.0"]
            .iter()
            .all(|host| TcpListener::bind((*host, port)).is_ok());
        if free {
            return port;
        }
    }
    panic!("no free port left in {PORTS:?}");
}

/// Parses a piece of the test's YAML; empty text is an empty mapping.
fn parse_yaml(text: &str, what: &str) -> Value {
    match serde_yaml::from_str::<Value>(text) {
        Ok(Value::Null) => Value::Mapping(Mapping::new()),
        Ok(value @ Value::Mapping(_)) => value,
        Ok(other) => panic!("the {what} YAML is not a mapping: {other:?}\n{text}"),
        Err(e) => panic!("the {what} YAML does not parse: {e}\n{text}"),
    }
}

/// Merges `over` into `base`: a mapping into a mapping key by key (recursively), anything else
/// replaces what `base` has. An empty value (`key:` with nothing after it) changes nothing.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (_, Value::Null) => {}
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// How to start a sidecar; made by `Sidecar::builder`, run by `start`.
#[must_use = "a builder does nothing until `.start().await`"]
pub struct SidecarBuilder {
    upstream_url: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    grace_period: u64,
    server: Option<String>,
    threads: Option<usize>,
}

impl SidecarBuilder {
    /// YAML merged over the base config. `{dir}` stands for the sidecar's private directory
    /// (e.g. `state_dir: {dir}/state`). Called again, the next YAML is merged over this one.
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra.push(yaml.to_string());
        self
    }

    /// Environment variables for the process (added to those set before).
    pub fn env(mut self, env: &[(&str, &str)]) -> Self {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// `server.grace_period` in seconds (1 unless set).
    pub fn grace_period(mut self, seconds: u64) -> Self {
        self.grace_period = seconds;
        self
    }

    /// YAML lines of the `server:` section (e.g. `max_connections: 3`) in place of the default
    /// `threads: 2`.
    pub fn server(mut self, yaml_lines: &str) -> Self {
        self.server = Some(yaml_lines.to_string());
        self
    }

    /// `server.threads` (2 unless set, or unless `server` sets the section).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// The config for a sidecar in `dir` on the ports given.
    fn config(&self, dir: &Path, port: u16, metrics_port: u16) -> Mapping {
        let in_dir = |text: &str| text.replace("{dir}", &dir.display().to_string());
        let path = |name: &str| Value::from(dir.join(name).display().to_string());

        let mut server = Mapping::new();
        server.insert("grace_period".into(), self.grace_period.into());
        server.insert("graceful_shutdown_timeout".into(), 1.into());
        server.insert("pid_file".into(), path("sidecar.pid"));
        server.insert("upgrade_sock".into(), path("upgrade.sock"));
        let mut base = Mapping::new();
        base.insert("listen_port".into(), port.into());
        base.insert("metrics_port".into(), metrics_port.into());
        base.insert("upstream_url".into(), self.upstream_url.as_str().into());
        base.insert("log_level".into(), "info".into());
        base.insert("server".into(), Value::Mapping(server));
        let mut config = Value::Mapping(base);

        let mut server_layer = match &self.server {
            Some(lines) => parse_yaml(&in_dir(lines), "server"),
            None if self.threads.is_none() => parse_yaml("threads: 2", "server"),
            None => Value::Mapping(Mapping::new()),
        };
        if let (Some(threads), Value::Mapping(section)) = (self.threads, &mut server_layer) {
            section.insert("threads".into(), threads.into());
        }
        let mut layer = Mapping::new();
        layer.insert("server".into(), server_layer);
        merge(&mut config, Value::Mapping(layer));
        for extra in &self.extra {
            merge(&mut config, parse_yaml(&in_dir(extra), "extra"));
        }
        match config {
            Value::Mapping(config) => config,
            _ => unreachable!("the base is a mapping"),
        }
    }

    /// Writes the config and starts the process; returns once both ports answer. When the
    /// sidecar exits because it cannot listen on a port (another process took it), starts it
    /// again on new ports, up to `START_ATTEMPTS` times. Panics if it does not come up.
    pub async fn start(self) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let conf_path = dir.path().join("sidecar.yaml");
        let log = dir.path().join("sidecar.log");
        for attempt in 1..=START_ATTEMPTS {
            let config = self.config(dir.path(), free_port(), free_port());
            // The ports as written (`extra` may set them itself).
            let port_of = |key: &str| {
                config
                    .get(key)
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or_else(|| panic!("{key} is not a port in the config: {config:?}"))
            };
            let (port, metrics_port) = (port_of("listen_port"), port_of("metrics_port"));
            std::fs::write(&conf_path, serde_yaml::to_string(&config).unwrap()).unwrap();
            let _ = std::fs::remove_file(&log);
            let mut child = spawn(&conf_path, &log, &self.env, false);
            match wait_ready(&mut child, port, metrics_port).await {
                Ok(()) => {
                    return Sidecar {
                        child,
                        port,
                        metrics_port,
                        dir,
                        log,
                        env: self.env,
                    };
                }
                Err(not_ready) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = read_log(&log).await;
                    let exited = matches!(not_ready, NotReady::Exited(_));
                    if exited && attempt < START_ATTEMPTS && text.contains("cannot listen on") {
                        eprintln!(
                            "sidecar could not listen on {port}/{metrics_port} (attempt {attempt}), trying other ports:\n{text}"
                        );
                        continue;
                    }
                    panic!("{not_ready}:\n{text}");
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }
}

/// Starts the binary on `conf`, its output appended to `log`; `upgrade` adds `-u`.
fn spawn(conf: &Path, log: &Path, env: &[(String, String)], upgrade: bool) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    // SIDECAR_BIN runs another build (benchmarks compare before and after with it).
    let binary = std::env::var("SIDECAR_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_nvidia-sidecar").to_string());
    let mut command = Command::new(binary);
    command
        .arg("-c")
        .arg(conf)
        .env_remove("RUST_LOG")
        .env_remove("NVIDIA_API_KEY")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    if upgrade {
        command.arg("-u");
    }
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("the sidecar binary starts")
}

/// Why a sidecar did not come up.
enum NotReady {
    Exited(ExitStatus),
    Silent,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Exited(status) => write!(f, "sidecar exited early ({status})"),
            NotReady::Silent => write!(f, "sidecar did not listen within 20 s"),
        }
    }
}

/// Waits (up to 20 s) until both ports answer.
async fn wait_ready(child: &mut Child, port: u16, metrics_port: u16) -> Result<(), NotReady> {
    let up = |port| tokio::net::TcpStream::connect(("127.0.0.1", port));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady::Exited(status));
        }
        if up(port).await.is_ok() && up(metrics_port).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(NotReady::Silent)
}

/// Everything logged to `log` so far. The sidecar's writer thread writes a line at most 10 ms
/// after it was logged; the wait covers that.
async fn read_log(log: &Path) -> String {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    text
}

pub struct Sidecar {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    log: PathBuf,
    env: Vec<(String, String)>,
}

impl Sidecar {
    /// A sidecar in front of `upstream_url`, to be set up further and then started
    /// (`.start().await`).
    pub fn builder(upstream_url: &str) -> SidecarBuilder {
        SidecarBuilder {
            upstream_url: upstream_url.to_string(),
            extra: Vec::new(),
            env: Vec::new(),
            grace_period: 1,
            server: None,
            threads: None,
        }
    }

    /// Starts the sidecar with `extra` YAML merged over the base config that sets the ports,
    /// the upstream and private pid/upgrade-socket paths.
    pub async fn start(upstream_url: &str, extra: &str) -> Sidecar {
        Self::builder(upstream_url).extra(extra).start().await
    }

    /// Like `start`, with environment variables for the process.
    pub async fn start_with_env(upstream_url: &str, extra: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::builder(upstream_url)
            .extra(extra)
            .env(env)
            .start()
            .await
    }

    /// The path of the config file the sidecar runs on (tests may rewrite it and reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sidecar.yaml")
    }

    /// Starts a second process on the same config with `-u`: it takes over the listeners when
    /// this one gets SIGQUIT. Returns the new process; `adopt` makes it the one this handle owns.
    pub fn start_upgrade(&self) -> Child {
        spawn(&self.config_path(), &self.log, &self.env, true)
    }

    /// Makes `child` (started by `start_upgrade`) the process this handle stops on drop; returns
    /// the old one.
    pub fn adopt(&mut self, child: Child) -> Child {
        std::mem::replace(&mut self.child, child)
    }

    /// Starts the process again after it exited, on the same config and ports.
    pub async fn start_again(&mut self) {
        self.child = spawn(&self.config_path(), &self.log, &self.env, false);
        self.wait_ready().await;
    }

    /// Stops the process (SIGKILL) and starts it again on the same config and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }

    /// Stops the process hard, leaving it stopped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until both ports answer; panics with the log if the process exits first.
    async fn wait_ready(&mut self) {
        if let Err(not_ready) = wait_ready(&mut self.child, self.port, self.metrics_port).await {
            panic!("{not_ready}:\n{}", self.log_text().await);
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The admin plane's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.admin_text("/metrics").await
    }

    /// The sum of the metric lines that start with `line_start` (a name, or a name with the
    /// start of its labels); 0 when there is none.
    pub async fn metric(&self, line_start: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with(line_start))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The body of an admin plane GET, as text.
    pub async fn admin_text(&self, path: &str) -> String {
        self.admin_get(path).await.text().await.unwrap()
    }

    /// The body of an admin plane GET, as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        self.admin_get(path).await.json().await.unwrap()
    }

    async fn admin_get(&self, path: &str) -> reqwest::Response {
        super::client().get(self.admin(path)).send().await.unwrap()
    }

    /// The admin plane's `/status` snapshot.
    pub async fn status(&self) -> serde_json::Value {
        self.admin_json("/status").await
    }

    /// Sends one small chat completion through the proxy; its status.
    pub async fn chat(&self) -> reqwest::StatusCode {
        super::client()
            .post(self.url("/v1/chat/completions"))
            .json(&super::chat_body())
            .send()
            .await
            .unwrap()
            .status()
    }

    /// A URL on the admin plane.
    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the sidecar process (`kill -s NAME`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits (up to `limit`) for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Everything the sidecar logged so far. Its writer thread writes a line at most 10 ms
    /// after it was logged; the wait covers that.
    pub async fn log_text(&self) -> String {
        read_log(&self.log).await
    }

    /// Waits (up to 10 s) for an access-log line that satisfies `matches`; the line is written
    /// just after the client got its answer, so it may lag a moment behind.
    pub async fn wait_for_access_line(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.access_log().await.into_iter().find(|l| matches(l)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Access-log lines written so far.
    pub async fn access_log(&self) -> Vec<String> {
        self.log_text()
            .await
            .lines()
            .filter(|l| l.contains(" access]"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}
