//! What a waiting request costs in memory: the sidecar runs in this test's process, under an
//! allocator that counts the bytes of live allocations and the live allocations of 32 KiB or
//! more. Requests with small bodies queue: none may hold such a buffer (Pingora's
//! per-connection 64 KiB read buffer used to be most of a waiter's cost), and each must cost
//! less than 16 KiB; a request with a large body, its body and less than 16 KiB more
//! (BENCHMARKS.md, scenario 6).

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

/// Bytes of every live allocation.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting the large allocations that are alive.
struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        if layout.size() >= LARGE {
            LARGE_LIVE.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        if layout.size() >= LARGE {
            LARGE_LIVE.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        if layout.size() >= LARGE {
            LARGE_LIVE.fetch_sub(1, Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was = isize::from(layout.size() >= LARGE);
        let is = isize::from(new_size >= LARGE);
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        LARGE_LIVE.fetch_add(is - was, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const WAITERS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_with_a_small_body_holds_no_large_buffer() {
    let upstream = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(
        &path,
        format!(
            "listen_port: {port}\nmetrics_port: {admin_port}\nupstream_url: {}\nrate_rpm: 0.5\nrequest_timeout: 7200\nlog_level: warn\nserver:\n  threads: 1\n  grace_period: 1\n  pid_file: {d}/sidecar.pid\n  upgrade_sock: {d}/upgrade.sock\n",
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

    // The first request takes the bucket's one token; every later one waits (the deadline is
    // long enough for all of them, or those it could not serve would be told so at once).
    let small = waiters_cost(port, 1000, WAITERS, WAITERS - 1, &queued).await;
    println!(
        "1 KiB bodies: {:.2} live allocations of 32 KiB or more and {:.1} KiB allocated per waiter (debug build)",
        small.large,
        small.bytes / 1024.0
    );
    assert!(
        small.large < 0.1,
        "each waiting request holds a buffer of 32 KiB or more: {:.2} per waiter",
        small.large
    );
    // Parked before Pingora builds its session (about 39 KiB a waiter when it waited in
    // `request_filter`, with the same debug build).
    assert!(
        small.bytes < 16.0 * 1024.0,
        "a waiting request with a 1 KiB body costs {:.1} KiB",
        small.bytes / 1024.0
    );
    let body = 200 * 1024;
    let large = waiters_cost(port, body, 10, 10, &queued).await;
    println!(
        "200 KiB bodies: {:.1} KiB allocated per waiter",
        large.bytes / 1024.0
    );
    assert!(
        large.bytes < (body + 16 * 1024) as f64,
        "a waiting request with a 200 KiB body costs {:.1} KiB: more than its body and 16 KiB",
        large.bytes / 1024.0
    );
}

/// What one waiter costs, on average.
struct Cost {
    /// Live allocations of `LARGE` bytes or more.
    large: f64,
    /// Bytes allocated.
    bytes: f64,
}

/// Opens `n` connections to the proxy on `port`, each sending a request with a body of about
/// `body_len` bytes, waits until `queued` reports `expect_queued` waiting, and measures what
/// they hold; then closes them and waits until the queue is empty again.
async fn waiters_cost<F, Fut>(
    port: u16,
    body_len: usize,
    n: usize,
    expect_queued: usize,
    queued: &F,
) -> Cost
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<u64>>,
{
    // The test's own copy of the body is there before and while they wait.
    let body = String::from_utf8(support::long_prompt(body_len - 60)).unwrap();
    let large_before = LARGE_LIVE.load(Ordering::Relaxed);
    let bytes_before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut waiting = Vec::new();
    for i in 0..n {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Client-Id: w{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            i % 4,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        waiting.push(stream);
    }
    let started = Instant::now();
    while queued().await != Some(expect_queued as u64) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "queued: {:?}, expected {expect_queued}",
            queued().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cost = Cost {
        large: (LARGE_LIVE.load(Ordering::Relaxed) - large_before) as f64 / n as f64,
        bytes: (LIVE_BYTES.load(Ordering::Relaxed) - bytes_before) as f64 / n as f64,
    };
    drop(waiting);
    let started = Instant::now();
    while queued().await != Some(0) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the waiters did not leave"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cost
}
