//! The Debian package under real systemd: a minimal Debian (debootstrapped once, cached under
//! `target/systemd-boot/`) gets the `.deb` that `cargo xtask deb` builds from this build's binary,
//! and is booted with `systemd-nspawn --boot`. The container shares the host's network, so the
//! sidecar inside reaches a mock upstream on the host's loopback, and the test reaches the sidecar.
//!
//! Needs root, `debootstrap`, `systemd-nspawn` (package `systemd-container`) and `dpkg-deb`. Run
//! by hand without them it skips with the reason; under `CI=true` it fails.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{chat_body, client, free_port, require_tool, MockUpstream};

const KEY: &str = "sk-boot-test-7f3a9c1e5d";
const UNIT: &str = "nvidia-sidecar.service";

/// `target/`, the parent of the directory holding the binary under test.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .parent()
        .and_then(Path::parent)
        .expect("the binary lives in target/<profile>/")
        .to_path_buf()
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    succeeded(&format!("{program} {args:?}"), run(program, args))
}

/// The standard output of a command that must have succeeded (`what` names it).
fn succeeded(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cached minimal Debian with systemd, procps and curl; made on first use by
/// `.ci/debian-rootfs`, which `.ci/from-zero` shares.
fn cached_rootfs() -> PathBuf {
    let rootfs = target_dir().join("systemd-boot/rootfs");
    must(
        "bash",
        &[
            concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/debian-rootfs"),
            rootfs.to_str().unwrap(),
        ],
    );
    rootfs
}

/// The package built by the xtask from the binary under test (uncompressed: it is only copied).
fn build_deb(out: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let stdout = must(
        &cargo,
        &[
            "xtask",
            "deb",
            "--binary",
            env!("CARGO_BIN_EXE_nvidia-sidecar"),
            "--out",
            out.to_str().unwrap(),
            "--compression",
            "none",
        ],
    );
    PathBuf::from(stdout.trim())
}

/// A booted container. Dropping it powers it off and removes its root.
struct Machine {
    root: PathBuf,
    nspawn: Child,
    leader: u32,
}

impl Machine {
    /// A copy of the cached root, with the package installed (not booted: the maintainer scripts
    /// see no running systemd, as in an image build).
    fn prepare(deb: &Path) -> PathBuf {
        let root = target_dir()
            .join("systemd-boot")
            .join(format!("run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        must(
            "cp",
            &[
                "-a",
                cached_rootfs().to_str().unwrap(),
                root.to_str().unwrap(),
            ],
        );
        std::fs::copy(deb, root.join("var/tmp/nvidia-sidecar.deb")).unwrap();
        let out = nspawn_run(&root, &["dpkg", "-i", "/var/tmp/nvidia-sidecar.deb"]);
        assert!(out.contains("enabled, not started"), "{out}");
        root
    }

    fn boot(root: PathBuf) -> Machine {
        let log = std::fs::File::create(root.with_extension("console.log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .args(["--quiet", "--register=no", "--keep-unit", "--boot", "-D"])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        let leader = loop {
            let children = std::fs::read_dir(format!("/proc/{}/task", nspawn.id()))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
                .find_map(|c| c.split_whitespace().next().map(str::to_string));
            if let Some(pid) = children.and_then(|p| p.parse().ok()) {
                break pid;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no container");
            std::thread::sleep(Duration::from_millis(50));
        };
        let machine = Machine {
            root,
            nspawn,
            leader,
        };
        // Until systemd listens, systemctl fails at once; then it waits for the boot to finish.
        let up = Instant::now();
        loop {
            let out = machine.exec(&["systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&out.stdout);
            if matches!(state.trim(), "running" | "degraded") {
                break;
            }
            assert!(
                up.elapsed() < Duration::from_secs(60),
                "systemd did not come up: {state}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        machine
    }

    /// Runs a command inside the booted container.
    fn exec(&self, args: &[&str]) -> Output {
        exec_in(self.leader, args)
    }

    fn exec_ok(&self, args: &[&str]) -> String {
        succeeded(&format!("{args:?} in the container"), self.exec(args))
    }

    fn unit_state(&self) -> String {
        let out = self.exec(&["systemctl", "is-active", UNIT]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn journal(&self) -> String {
        self.exec_ok(&["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"])
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to shut the container down cleanly; SIGKILL if it hangs.
        let _ = run("kill", &["-TERM", &self.nspawn.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Runs a command inside the container whose init is `leader`.
fn exec_in(leader: u32, args: &[&str]) -> Output {
    let leader = leader.to_string();
    let mut all = vec!["-t", &leader, "-m", "-u", "-i", "-n", "-p", "--"];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

/// Runs one command in the root without booting it.
fn nspawn_run(root: &Path, args: &[&str]) -> String {
    let mut all = vec![
        "--quiet",
        "--register=no",
        "--keep-unit",
        "-D",
        root.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let out = run("systemd-nspawn", &all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "nspawn {args:?}: {text}");
    text
}

fn is_root() -> bool {
    run("id", &["-u"]).stdout.trim_ascii() == b"0"
}

/// The shipped conffile, pointed at the mock upstream and at free ports; the rest as shipped.
fn point_config(path: &Path, upstream: &str, proxy_port: u16, admin_port: u16, rate: &str) {
    let shipped = std::fs::read_to_string(path).unwrap();
    let mut text = String::new();
    for line in shipped.lines() {
        let line = match line.split(':').next().unwrap_or_default() {
            "upstream_url" => format!("upstream_url: {upstream}"),
            "listen_port" => format!("listen_port: {proxy_port}"),
            "metrics_port" => format!("metrics_port: {admin_port}"),
            "rate_rpm" => format!("rate_rpm: {rate}\nbucket_capacity: 1"),
            _ => line.to_string(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    assert!(
        text.contains("bucket_capacity"),
        "the shipped config sets rate_rpm"
    );
    std::fs::write(path, text).unwrap();
}

async fn base_rpm(admin: &str) -> f64 {
    let config: serde_json::Value = client()
        .get(format!("{admin}/api/admin/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    config["base_rpm"].as_f64().unwrap()
}

async fn poll_base_rpm(admin: &str, want: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if base_rpm(admin).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_boots_under_real_systemd() {
    let tools = ["debootstrap", "systemd-nspawn", "dpkg-deb", "nsenter"];
    if !tools.iter().all(|t| require_tool(t)) {
        return;
    }
    if !is_root() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "booting a container needs root under CI=true"
        );
        eprintln!("skipping: systemd-nspawn needs root");
        return;
    }
    let upstream = MockUpstream::start(None, support::LimitStyle::Nvidia).await;
    let (proxy_port, admin_port) = (free_port(), free_port());
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let admin = format!("http://127.0.0.1:{admin_port}");

    let debs = tempfile::tempdir().unwrap();
    let deb = tokio::task::spawn_blocking({
        let out = debs.path().to_path_buf();
        move || build_deb(&out)
    })
    .await
    .unwrap();
    let root = Machine::prepare(&deb);
    let installed = root.join("etc/nvidia-sidecar/sidecar.yaml");
    assert!(root.join("usr/bin/nvidia-sidecar").exists());
    assert!(
        !root.join("etc/nvidia-sidecar/api-key").exists(),
        "the package holds no key"
    );
    let wants = root
        .join("etc/systemd/system/multi-user.target.wants")
        .join(UNIT);
    assert!(
        wants.symlink_metadata().is_ok(),
        "installing enables the unit"
    );

    // Booted without a key: enabled, but left stopped.
    point_config(&installed, &upstream.url(), proxy_port, admin_port, "60");
    let machine = Machine::boot(root);
    assert_eq!(
        machine.unit_state(),
        "inactive",
        "no key: the unit stays stopped"
    );

    // The key in place: `systemctl start` (Type=notify) returns once the sidecar is ready,
    // and ready means the proxy listens.
    let key_file = machine.root.join("etc/nvidia-sidecar/api-key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    must("chmod", &["0600", key_file.to_str().unwrap()]);
    machine.exec_ok(&["systemctl", "start", UNIT]);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", proxy_port)).is_ok(),
        "ready was reported before the proxy listened"
    );
    let restarted = std::time::Instant::now();
    machine.exec_ok(&["systemctl", "restart", UNIT]);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", proxy_port)).is_ok(),
        "ready was reported before the proxy listened (after {:?})",
        restarted.elapsed()
    );

    // A request goes through with the key from the credential.
    let answer = client()
        .post(format!("{proxy}/v1/chat/completions"))
        .header("X-Client-Id", "boot-test")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let seen = upstream.state.arrivals();
    assert_eq!(
        seen.last().unwrap().authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );

    // `systemctl reload` applies a changed rate; a bad file on reload keeps the running one.
    assert_eq!(base_rpm(&admin).await, 60.0);
    let good = std::fs::read_to_string(&installed).unwrap();
    std::fs::write(&installed, good.replace("rate_rpm: 60", "rate_rpm: 90")).unwrap();
    machine.exec_ok(&["systemctl", "reload", UNIT]);
    assert!(poll_base_rpm(&admin, 90.0).await, "reload did not apply");
    std::fs::write(&installed, "rate_rpm: [unclosed\n").unwrap();
    machine.exec_ok(&["systemctl", "reload", UNIT]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(machine.unit_state(), "active");
    assert_eq!(
        base_rpm(&admin).await,
        90.0,
        "a bad file replaced the running config"
    );
    std::fs::write(&installed, &good).unwrap();
    machine.exec_ok(&["systemctl", "reload", UNIT]);
    assert!(poll_base_rpm(&admin, 60.0).await);

    // `systemctl restart` under load: every queued request that fits the grace period is
    // answered by the old process while it drains (1 token per second, 6 requests).
    let before = upstream.state.arrivals().len();
    let waiting: Vec<_> = (0..6)
        .map(|i| {
            let url = format!("{proxy}/v1/chat/completions");
            tokio::spawn(async move {
                client()
                    .post(url)
                    .header("X-Client-Id", format!("queued-{i}"))
                    .json(&chat_body())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restart = tokio::task::spawn_blocking({
        let leader = machine.leader;
        move || {
            let started = Instant::now();
            let out = exec_in(leader, &["systemctl", "restart", UNIT]);
            eprintln!(
                "systemctl restart with 6 queued requests took {:?}",
                started.elapsed()
            );
            out
        }
    });
    for (i, answer) in futures_util::future::join_all(waiting)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            answer.unwrap().ok(),
            Some(200),
            "queued request {i} was lost"
        );
    }
    assert!(restart.await.unwrap().status.success());
    assert_eq!(upstream.state.arrivals().len() - before, 6);
    assert_eq!(machine.unit_state(), "active");

    // The limiter state is written to the state directory.
    let state = machine.exec_ok(&["cat", "/var/lib/nvidia-sidecar/limiter-state.json"]);
    assert!(state.contains("\"effective_rpm\": 60.0"), "{state}");

    // An idle `systemctl stop` is quick.
    let stopping = Instant::now();
    machine.exec_ok(&["systemctl", "stop", UNIT]);
    let stop_time = stopping.elapsed();
    eprintln!("idle systemctl stop took {stop_time:?}");
    assert!(
        stop_time < Duration::from_secs(2),
        "idle stop took {stop_time:?}"
    );

    // The journal has the access lines and never the key.
    let journal = machine.journal();
    assert!(journal.contains("boot-test"), "no access line:\n{journal}");
    assert!(journal.contains("queued-5"), "no access line:\n{journal}");
    assert!(!journal.contains(KEY), "the key is in the journal");
    assert!(journal.contains("nvidia-sidecar ready"));

    // Removing the package stops the unit; purging removes the state.
    machine.exec_ok(&["systemctl", "start", UNIT]);
    machine.exec_ok(&["dpkg", "-r", "nvidia-sidecar"]);
    assert_ne!(
        machine.unit_state(),
        "active",
        "removing left the unit running"
    );
    assert!(machine
        .exec(&["test", "-e", "/var/lib/nvidia-sidecar/limiter-state.json"])
        .status
        .success());
    machine.exec_ok(&["dpkg", "-P", "nvidia-sidecar"]);
    assert!(!machine
        .exec(&["test", "-e", "/var/lib/nvidia-sidecar"])
        .status
        .success());
    assert!(!machine
        .exec(&["test", "-e", "/var/lib/private/nvidia-sidecar"])
        .status
        .success());
    assert!(!machine
        .exec(&["test", "-e", "/etc/nvidia-sidecar/sidecar.yaml"])
        .status
        .success());
}
