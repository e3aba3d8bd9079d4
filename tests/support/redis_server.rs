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
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            tls_options: Vec::new(),
        };
        server.start_again();
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
