//! A real `redis-server` on a free loopback port, private to one test: no persistence, stopped
//! when dropped, and restartable on the same port to test rejoining.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::sidecar::free_port;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// The TLS and password options of a TLS server (empty: plain, no password).
    tls_options: Vec<String>,
    /// Further options (a replica's `--replicaof`).
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            tls_options: Vec::new(),
            extra: Vec::new(),
        };
        server.start_again();
        server
    }

    /// A replica of `primary`, once its replication link is up.
    pub fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            tls_options: Vec::new(),
            extra: vec![
                "--replicaof".to_string(),
                "127.0.0.1".to_string(),
                primary.port.to_string(),
            ],
        };
        server.start_again();
        let started = Instant::now();
        let synced = |server: &RedisServer| {
            redis::from_redis_value::<String>(&server.command(&["INFO", "replication"]))
                .is_ok_and(|info| info.contains("master_link_status:up"))
        };
        while !synced(&server) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the replica never synced"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// A server that speaks only TLS (with the certificate of `identity`) and wants
    /// `password`.
    pub fn start_tls(identity: &super::tls::TestIdentity, password: &str) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let port = free_port();
        let tls_options = vec![
            "--port".to_string(),
            "0".to_string(),
            "--tls-port".to_string(),
            port.to_string(),
            "--tls-cert-file".to_string(),
            file("redis.crt", &identity.server_cert_pem),
            "--tls-key-file".to_string(),
            file("redis.key", &identity.server_key_pem),
            "--tls-ca-cert-file".to_string(),
            file("ca.crt", &identity.ca_pem),
            "--tls-auth-clients".to_string(),
            "no".to_string(),
            "--requirepass".to_string(),
            password.to_string(),
        ];
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            tls_options,
            extra: Vec::new(),
        };
        server.start_again();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    pub fn start_again(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let mut command = Command::new("redis-server");
        if self.tls_options.is_empty() {
            command.args(["--port", &self.port.to_string()]);
        } else {
            command.args(&self.tls_options);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server did not answer on port {} within 10 s",
            self.port
        );
    }

    fn ping(&self) -> bool {
        if !self.tls_options.is_empty() {
            return std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_millis(200))
        else {
            return false;
        };
        redis::cmd("PING")
            .query::<String>(&mut connection)
            .is_ok_and(|r| r == "PONG")
    }

    /// Runs one command (for inspecting keys).
    pub fn command(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut connection).unwrap()
    }

    /// Sends a signal to the server (`STOP` freezes it: connections stay open, nothing answers).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("the server runs").id();
        let status = Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kills the server hard (everything in it is lost).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-s", "CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis Sentinels on free loopback ports, watching one primary as `mymaster` with a quorum of
/// two and a 1 s down-after: a killed primary is failed over in a few seconds.
pub struct Sentinels {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    pub fn start(count: usize, primary: &RedisServer) -> Sentinels {
        let dir = tempfile::tempdir().unwrap();
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for i in 0..count {
            let port = free_port();
            let config = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor mymaster 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 10000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir.path().display(),
                    primary.port
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("sentinel-{i}.log"))).unwrap();
            children.push(
                Command::new("redis-sentinel")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("redis-sentinel starts"),
            );
            ports.push(port);
        }
        let sentinels = Sentinels {
            children,
            ports,
            _dir: dir,
        };
        // Ready when every Sentinel knows the others and the replica: only then can they agree
        // on a failover.
        let started = Instant::now();
        loop {
            let ready = sentinels.ports.iter().all(|port| {
                let others = sentinels.query(*port, &["SENTINEL", "SENTINELS", "mymaster"]);
                let replicas = sentinels.query(*port, &["SENTINEL", "REPLICAS", "mymaster"]);
                matches!(others, Some(redis::Value::Array(ref a)) if a.len() + 1 == count)
                    && matches!(replicas, Some(redis::Value::Array(ref a)) if !a.is_empty())
            });
            if ready {
                return sentinels;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the Sentinels did not find each other"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn query(&self, port: u16, args: &[&str]) -> Option<redis::Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let mut connection = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut connection).ok()
    }

    /// The port of the primary, as the first Sentinel that answers names it.
    pub fn primary_port(&self) -> Option<u16> {
        self.ports.iter().find_map(|port| {
            let (_host, primary): (String, u16) = redis::from_redis_value(
                &self.query(*port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"])?,
            )
            .ok()?;
            Some(primary)
        })
    }

    /// `host:port` of every Sentinel, as YAML list items.
    pub fn yaml_list(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("\n    - 127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
