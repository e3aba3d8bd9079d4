//! The soak: `SOAK_REQUESTS` (default 10 million) requests through one sidecar, half on a
//! passthrough route and half on a token route whose rate never queues, from two wrk processes
//! (`-t1 -c32` each) against a static nginx upstream, `log_level: warn`. The sidecar's resident
//! memory is sampled at every million requests; after the first million it must stay flat.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::overhead::Nginx;
use crate::rss_kib;
use crate::support::Sidecar;

pub async fn soak() {
    let total: f64 = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000.0);
    let upstream = Nginx::static_upstream();
    let sidecar = Sidecar::start(
        &format!("http://127.0.0.1:{}", upstream.port),
        "rate_rpm: 10000000\nbucket_capacity: 100000\nlog_level: warn\nroutes:\n  - {path_prefix: /v1/models, passthrough: true}\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let post = crate::overhead::post_script(dir.path());
    let wrk = |path: &str, script: Option<&std::path::Path>| {
        let mut command = Command::new("wrk");
        command.args(["-t1", "-c32", "-d3600s"]);
        if let Some(script) = script {
            command.arg("-s").arg(script);
        }
        command
            .arg(sidecar.url(path))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wrk runs (apt-get install wrk)")
    };
    let mut loads = [
        wrk("/v1/models", None),
        wrk("/v1/chat/completions", Some(&post)),
    ];
    let pid = sidecar.pid();
    let started = Instant::now();
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut next_million = 1_000_000.0;
    println!("| requests (millions) | resident memory (MiB) | elapsed (s) |");
    println!("|---|---|---|");
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let done = sidecar.metric("nvidia_sidecar_requests_total").await;
        if done >= next_million {
            let rss = rss_kib(pid) / 1024.0;
            samples.push((done / 1e6, rss));
            println!(
                "| {:.2} | {rss:.1} | {:.0} |",
                done / 1e6,
                started.elapsed().as_secs_f64()
            );
            next_million += 1_000_000.0;
        }
        if done >= total || started.elapsed() > Duration::from_secs(3600) {
            break;
        }
    }
    for load in &mut loads {
        let _ = load.kill();
        let _ = load.wait();
    }
    let errors = sidecar
        .metric("nvidia_sidecar_requests_total{outcome=\"upstream_error\"")
        .await;
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let per_million = (last.1 - first.1) / (last.0 - first.0).max(1e-9);
        println!(
            "\nafter the first million: {:+.2} MiB per million requests ({:.1} MiB at {:.2} M, {:.1} MiB at {:.2} M); upstream errors {errors}",
            per_million, first.1, first.0, last.1, last.0
        );
    }
}
