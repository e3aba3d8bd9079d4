//! Scenario 5: the sidecar against nginx as a reverse proxy, on the same cores, in the same run.
//!
//! - Upstream: nginx serving a small JSON answer itself (one worker, keep-alive), so that the
//!   upstream is the same fast static server for both proxies.
//! - Proxies: the sidecar with 1 and 2 threads (`server.threads`), its access log on at
//!   `info`; a bare Pingora proxy with no filters (`examples/bare_pingora.rs`, built here in
//!   release) with 1 and 2 threads, the anchor the sidecar's own cost is read against; nginx
//!   with 1 and 2 workers, upstream keep-alive, its access log on.
//! - Routes: a passthrough route (`GET /v1/models`) and a token route with a rate too high to
//!   ever queue (`POST /v1/chat/completions` with a small JSON body).
//! - Load: `wrk -t1 -c32 -d8s --latency`, after a 2 s warm-up; each cell is run `REPEATS`
//!   times, interleaved, and reported as the median. CPU seconds per 10k requests are the
//!   proxy's own (nginx: master and workers), read from `/proc` around each run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, Sidecar};
use crate::{cpu_ticks, median};

/// One wrk run's figures.
#[derive(Clone, Copy, Default)]
pub struct WrkRun {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: f64,
}

/// wrk against `url` with `args` (and a Lua `script`, if any).
pub fn wrk(url: &str, args: &[&str], script: Option<&std::path::Path>) -> WrkRun {
    let mut command = Command::new("wrk");
    command.args(args).arg("--latency");
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let out = command
        .arg(url)
        .output()
        .expect("wrk runs (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |line: &str| -> f64 {
        let value = line.split_whitespace().nth(1).unwrap_or("0");
        let (number, unit) = value.split_at(
            value
                .find(|c: char| c.is_alphabetic())
                .unwrap_or(value.len()),
        );
        let n: f64 = number.parse().unwrap_or(0.0);
        match unit {
            "us" => n / 1000.0,
            "s" => n * 1000.0,
            _ => n,
        }
    };
    let line = |start: &str| text.lines().find(|l| l.trim_start().starts_with(start));
    let non_2xx = line("Non-2xx").is_some() || line("Socket errors").is_some();
    assert!(!non_2xx, "wrk saw errors against {url}:\n{text}");
    WrkRun {
        rps: line("Requests/sec:")
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0),
        p50_ms: line("50%").map_or(0.0, ms),
        p99_ms: line("99%").map_or(0.0, ms),
        requests: text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0),
    }
}

/// Waits (at most 10 s) until `what` listens on `port`.
fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An nginx process tree started from `conf` (with `{dir}` standing for its private directory);
/// stopped on drop.
pub struct Nginx {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The workers leave when their master is gone; give them a moment.
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Nginx {
    fn start(workers: usize, port: u16, http: &str) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            "worker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  keepalive_requests 1000000;\n{}\n}}\n",
            http.replace("{dir}", &d.to_string())
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .args([
                "-p",
                &d.to_string(),
                "-c",
                path.to_str().unwrap(),
                "-g",
                "daemon off;",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts (apt-get install nginx)");
        wait_listening(port, "nginx");
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    /// A static upstream: a small JSON answer to every request, one worker.
    pub fn static_upstream() -> Nginx {
        let port = free_port();
        Nginx::start(
            1,
            port,
            &format!(
                "  access_log off;\n  server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; return 200 '{{\"object\":\"list\",\"data\":[]}}'; }} }}"
            ),
        )
    }

    /// A reverse proxy to `upstream` with `workers` workers, upstream keep-alive and an access
    /// log.
    pub fn reverse_proxy(workers: usize, upstream: u16) -> Nginx {
        let port = free_port();
        Nginx::start(
            workers,
            port,
            &format!(
                "  access_log {{dir}}/access.log;\n  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 1000000; }}\n  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }}"
            ),
        )
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }
}

/// The bare Pingora proxy (`examples/bare_pingora.rs`) on a free port, in front of
/// `upstream`, with `threads` threads; killed when dropped.
struct BarePingora {
    child: std::process::Child,
    port: u16,
}

impl BarePingora {
    /// Builds the example in release (once; cargo knows when it is up to date).
    fn build() -> std::path::PathBuf {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "--example", "bare_pingora"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "the bare Pingora proxy builds");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        target.join("release/examples/bare_pingora")
    }

    fn start(binary: &std::path::Path, upstream: u16, threads: usize) -> BarePingora {
        let port = free_port();
        let child = Command::new(binary)
            .args([port.to_string(), upstream.to_string(), threads.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the bare Pingora proxy starts");
        wait_listening(port, "the bare Pingora proxy");
        BarePingora { child, port }
    }
}

impl Drop for BarePingora {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A wrk script (in `dir`) that POSTs a small chat completion request.
pub fn post_script(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("post.lua");
    std::fs::write(
        &path,
        "wrk.method = \"POST\"\nwrk.body = '{\"model\":\"mock\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
    )
    .unwrap();
    path
}

/// A proxy under test: its name, worker count, base URL and process ids.
struct Proxy {
    name: &'static str,
    workers: usize,
    url: String,
    pids: Vec<u32>,
}

#[derive(Default)]
struct Cell {
    runs: Vec<WrkRun>,
    cpu_per_10k: Vec<f64>,
}

pub async fn overhead(repeats: usize) {
    let upstream = Nginx::static_upstream();
    let upstream_url = format!("http://127.0.0.1:{}", upstream.port);
    let config = "rate_rpm: 10000000\nbucket_capacity: 100000\nqueue_max_size: 100000\nroutes:\n  - {path_prefix: /v1/models, passthrough: true}\n";
    let mut sidecars: Vec<Sidecar> = Vec::new();
    for threads in [1, 2] {
        sidecars.push(
            Sidecar::builder(&upstream_url)
                .extra(config)
                .threads(threads)
                .start()
                .await,
        );
    }
    let nginxes: Vec<Nginx> = [1, 2]
        .map(|workers| Nginx::reverse_proxy(workers, upstream.port))
        .into();
    let bare_binary = BarePingora::build();
    let bares: Vec<BarePingora> = [1, 2]
        .map(|threads| BarePingora::start(&bare_binary, upstream.port, threads))
        .into();
    let mut proxies = vec![Proxy {
        name: "direct (no proxy)",
        workers: 0,
        url: upstream_url.clone(),
        pids: Vec::new(),
    }];
    for (workers, sidecar) in [1, 2].into_iter().zip(&sidecars) {
        proxies.push(Proxy {
            name: "sidecar",
            workers,
            url: format!("http://127.0.0.1:{}", sidecar.port),
            pids: vec![sidecar.pid()],
        });
    }
    for (workers, bare) in [1, 2].into_iter().zip(&bares) {
        proxies.push(Proxy {
            name: "bare Pingora",
            workers,
            url: format!("http://127.0.0.1:{}", bare.port),
            pids: vec![bare.child.id()],
        });
    }
    for (workers, nginx) in [1, 2].into_iter().zip(&nginxes) {
        proxies.push(Proxy {
            name: "nginx",
            workers,
            url: format!("http://127.0.0.1:{}", nginx.port),
            pids: nginx.pids(),
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let post = post_script(dir.path());
    let routes: [(&str, &str, Option<&std::path::Path>); 2] = [
        ("passthrough GET /v1/models", "/v1/models", None),
        (
            "token route POST /v1/chat/completions",
            "/v1/chat/completions",
            Some(&post),
        ),
    ];
    let load = ["-t1", "-c32", "-d8s"];
    let mut cells: Vec<Vec<Cell>> = proxies
        .iter()
        .map(|_| routes.iter().map(|_| Cell::default()).collect())
        .collect();
    for proxy in &proxies {
        for (_, path, script) in &routes {
            let _ = wrk(
                &format!("{}{path}", proxy.url),
                &["-t1", "-c32", "-d2s"],
                *script,
            );
        }
    }
    for _ in 0..repeats {
        for (p, proxy) in proxies.iter().enumerate() {
            for (r, (_, path, script)) in routes.iter().enumerate() {
                let cpu =
                    |pids: &[u32]| pids.iter().map(|pid| cpu_ticks(*pid) / 100.0).sum::<f64>();
                let before = cpu(&proxy.pids);
                let run = wrk(&format!("{}{path}", proxy.url), &load, *script);
                let used = cpu(&proxy.pids) - before;
                cells[p][r].runs.push(run);
                cells[p][r]
                    .cpu_per_10k
                    .push(used / run.requests.max(1.0) * 10_000.0);
            }
        }
    }
    println!("| route | proxy | workers | requests/s | vs nginx | vs bare Pingora | p50 (ms) | p99 (ms) | CPU s per 10k requests | vs nginx | vs bare Pingora | runs (req/s) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (r, (route, _, _)) in routes.iter().enumerate() {
        for (p, proxy) in proxies.iter().enumerate() {
            let cell = &cells[p][r];
            let rps = median(cell.runs.iter().map(|x| x.rps).collect());
            let cpu = median(cell.cpu_per_10k.clone());
            let of = |name: &str| {
                proxies
                    .iter()
                    .position(|q| q.name == name && q.workers == proxy.workers)
                    .map(|q| {
                        let c = &cells[q][r];
                        (
                            median(c.runs.iter().map(|x| x.rps).collect()),
                            median(c.cpu_per_10k.clone()),
                        )
                    })
            };
            let versus = |name: &str| match (proxy.name, of(name)) {
                ("sidecar" | "bare Pingora", Some(_)) if proxy.name == name => {
                    ("".to_string(), "".to_string())
                }
                ("sidecar" | "bare Pingora", Some((o_rps, o_cpu))) => {
                    (format!("{:.2}", rps / o_rps), format!("{:.2}", cpu / o_cpu))
                }
                _ => ("".to_string(), "".to_string()),
            };
            let (vs_rps, vs_cpu) = versus("nginx");
            let (vs_bare_rps, vs_bare_cpu) = match proxy.name {
                "sidecar" => versus("bare Pingora"),
                _ => ("".to_string(), "".to_string()),
            };
            let workers = if proxy.workers == 0 {
                "—".to_string()
            } else {
                proxy.workers.to_string()
            };
            let cpu_text = if proxy.pids.is_empty() {
                "—".to_string()
            } else {
                format!("{cpu:.3}")
            };
            println!(
                "| {route} | {} | {workers} | {rps:.0} | {vs_rps} | {vs_bare_rps} | {:.2} | {:.2} | {cpu_text} | {vs_cpu} | {vs_bare_cpu} | {:?} |",
                proxy.name,
                median(cell.runs.iter().map(|x| x.p50_ms).collect()),
                median(cell.runs.iter().map(|x| x.p99_ms).collect()),
                cell.runs.iter().map(|x| x.rps.round()).collect::<Vec<_>>()
            );
        }
    }
}
