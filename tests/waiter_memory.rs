//! What a waiting request costs in memory, probed by allocation size: the sidecar runs in this
//! test's process, under an allocator that counts the live allocations of 32 KiB or more.
//! Requests with small bodies queue, and none of them may hold such a buffer (Pingora's
//! per-connection 64 KiB read buffer used to be most of a waiter's cost: BENCHMARKS.md,
//! scenario 6).

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use nvidia_sidecar::{config, server, App};
use support::{free_port, LimitStyle, MockUpstream};
use tokio::io::AsyncWriteExt;

/// Allocations at least this large are counted while they live.
const LARGE: usize = 32 * 1024;

static LARGE_LIVE: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting the large allocations that are alive.
struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE {
            LARGE_LIVE.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE {
            LARGE_LIVE.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= LARGE {
            LARGE_LIVE.fetch_sub(1, Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was = isize::from(layout.size() >= LARGE);
        let is = isize::from(new_size >= LARGE);
        LARGE_LIVE.fetch_add(is - was, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const WAITERS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_with_a_small_body_holds_no_large_buffer() {
    let upstream = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(
        &path,
        format!(
            "listen_port: {port}\nmetrics_port: {admin_port}\nupstream_url: {}\nrate_rpm: 0.5\nrequest_timeout: 120\nlog_level: warn\nserver:\n  threads: 1\n  grace_period: 1\n  pid_file: {d}/sidecar.pid\n  upgrade_sock: {d}/upgrade.sock\n",
            upstream.url(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let path = path.display().to_string();
    let file = config::read_file(Some(&path)).unwrap();
    let app = App::start(config::ConfigLayers {
        path: Some(path),
        file,
        overrides: config::Overrides::default(),
    })
    .unwrap();
    let mode = server::RunMode {
        upgrade: false,
        daemon: false,
    };
    // The server runs until the test process ends.
    std::thread::spawn(move || server::build(app, mode).run(Default::default()));
    let status_url = format!("http://127.0.0.1:{admin_port}/status");
    let http = support::client();
    let queued = || async {
        let status: serde_json::Value =
            http.get(&status_url).send().await.ok()?.json().await.ok()?;
        status["token_bucket"]["queue_size"].as_u64()
    };
    let started = Instant::now();
    while queued().await.is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "no sidecar");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let before = LARGE_LIVE.load(Ordering::Relaxed);
    let body = String::from_utf8(support::long_prompt(1000)).unwrap();
    let mut waiting = Vec::new();
    for i in 0..WAITERS {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Client-Id: w{i}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        waiting.push(stream);
    }
    // The first takes the bucket's one token; the others wait.
    let started = Instant::now();
    while queued().await != Some(WAITERS as u64 - 1) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "queued: {:?}",
            queued().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = LARGE_LIVE.load(Ordering::Relaxed);
    let per_waiter = (during - before) as f64 / WAITERS as f64;
    println!(
        "live allocations of 32 KiB or more: {before} before, {during} with {WAITERS} requests of 1 KiB bodies connected ({} waiting)",
        WAITERS - 1
    );
    assert!(
        per_waiter < 0.1,
        "each waiting request holds a buffer of 32 KiB or more: {before} large allocations before, {during} with {WAITERS} waiters"
    );
    drop(waiting);
}
