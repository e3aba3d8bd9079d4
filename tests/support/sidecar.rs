//! Starts the real `nvidia-sidecar` binary with a config written for the test, waits until
//! its proxy port answers, and stops it when dropped.

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, read and released; the sidecar binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    /// Starts the sidecar with `extra` YAML appended to a base config that sets the ports,
    /// the upstream and private pid/upgrade-socket paths.
    pub fn start(upstream_url: &str, extra: &str) -> Sidecar {
        Self::start_with_env(upstream_url, extra, &[])
    }

    pub fn start_with_env(upstream_url: &str, extra: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::start_full(upstream_url, extra, env, 1)
    }

    /// Like `start_with_env`, with the grace period given; `{dir}` in `extra` stands for the
    /// sidecar's private directory (e.g. `state_dir: {dir}/state`).
    pub fn start_full(
        upstream_url: &str,
        extra: &str,
        env: &[(&str, &str)],
        grace_period: u64,
    ) -> Sidecar {
        Self::launch(upstream_url, extra, env, grace_period, "threads: 2")
    }

    /// Like `start`, with `threads` proxy threads (`server.threads`) instead of 2.
    pub fn start_with_threads(upstream_url: &str, extra: &str, threads: usize) -> Sidecar {
        Self::launch(upstream_url, extra, &[], 1, &format!("threads: {threads}"))
    }

    /// Like `start`, with `server` (YAML lines of the `server:` section, e.g.
    /// `max_connections: 3`) in place of `threads: 2`.
    pub fn start_with_server(upstream_url: &str, extra: &str, server: &str) -> Sidecar {
        Self::launch(upstream_url, extra, &[], 1, server)
    }

    fn launch(
        upstream_url: &str,
        extra: &str,
        env: &[(&str, &str)],
        grace_period: u64,
        server: &str,
    ) -> Sidecar {
        let server: String = server.lines().map(|l| format!("  {l}\n")).collect();
        let dir = tempfile::tempdir().unwrap();
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        let port = free_port();
        let metrics_port = free_port();
        let log_level = if extra.contains("log_level:") {
            ""
        } else {
            "log_level: info\n"
        };
        let config = format!(
            "listen_port: {port}\nmetrics_port: {metrics_port}\nupstream_url: {upstream_url}\n{log_level}{extra}\nserver:\n{server}  grace_period: {grace_period}\n  graceful_shutdown_timeout: 1\n  pid_file: {pid}\n  upgrade_sock: {sock}\n",
            pid = dir.path().join("sidecar.pid").display(),
            sock = dir.path().join("upgrade.sock").display(),
        );
        let conf_path = dir.path().join("sidecar.yaml");
        std::fs::write(&conf_path, config).unwrap();
        let log = dir.path().join("sidecar.log");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::spawn(&conf_path, &log, &env, false);
        let mut sidecar = Sidecar {
            child,
            port,
            metrics_port,
            dir,
            log,
            env,
        };
        sidecar.wait_ready();
        sidecar
    }

    fn spawn(
        conf: &std::path::Path,
        log: &std::path::Path,
        env: &[(String, String)],
        upgrade: bool,
    ) -> Child {
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

    /// The path of the config file the sidecar runs on (tests may rewrite it and reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sidecar.yaml")
    }

    /// Starts a second process on the same config with `-u`: it takes over the listeners when
    /// this one gets SIGQUIT. Returns the new process; `adopt` makes it the one this handle owns.
    pub fn start_upgrade(&self) -> Child {
        Self::spawn(&self.config_path(), &self.log, &self.env, true)
    }

    /// Makes `child` (started by `start_upgrade`) the process this handle stops on drop; returns
    /// the old one.
    pub fn adopt(&mut self, child: Child) -> Child {
        std::mem::replace(&mut self.child, child)
    }

    /// Starts the process again after it exited, on the same config and ports.
    pub fn start_again(&mut self) {
        self.child = Self::spawn(&self.config_path(), &self.log, &self.env, false);
        self.wait_ready();
    }

    /// Stops the process (SIGKILL) and starts it again on the same config and ports.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.config_path(), &self.log, &self.env, false);
        self.wait_ready();
    }

    /// Stops the process hard, leaving it stopped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sidecar exited early ({status}):\n{}", self.log_text());
            }
            let up = |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up(self.port) && up(self.metrics_port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("sidecar did not listen within 20 s:\n{}", self.log_text());
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
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the sidecar logged so far. Its writer thread writes a line at most 10 ms
    /// after it was logged; the wait covers that.
    pub fn log_text(&self) -> String {
        std::thread::sleep(Duration::from_millis(50));
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits (up to 10 s) for an access-log line that satisfies `matches`; the line is written
    /// just after the client got its answer, so it may lag a moment behind.
    pub fn wait_for_access_line(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.access_log().into_iter().find(|l| matches(l)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Access-log lines written so far.
    pub fn access_log(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(" access]"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
