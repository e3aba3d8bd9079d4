//! Hostile input against the real binary: paths that would route a counted request through a
//! passthrough route, absurd durations in the config and in upstream headers, a client id per
//! request.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{LimitStyle, MockUpstream, Sidecar};

/// Sends raw request bytes (no client-side path normalisation) and returns the status code.
async fn raw_request(port: u16, request: &str) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        answer.extend_from_slice(&buf[..n]);
        if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&answer);
    head.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"))
}

fn post(path: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passthrough_route_cannot_be_used_to_reach_a_counted_endpoint() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token per minute on the counted route, already spent by the first request below.
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 1\nrequest_timeout: 1\nroutes:\n  - {path_prefix: /v1/models, passthrough: true}",
    )
    .await;
    assert_eq!(
        raw_request(sidecar.port, &post("/v1/chat/completions")).await,
        200
    );
    for path in [
        "/v1/models/../chat/completions",
        "/v1/models/..%2Fchat/completions",
        "/v1/models/%2e%2e/chat/completions",
        "/v1/models/%2E%2E/chat/completions",
        "/v1/models%2F..%2Fchat/completions",
        "/v1/models/./../chat/completions",
    ] {
        assert_eq!(raw_request(sidecar.port, &post(path)).await, 400, "{path}");
    }
    // Not on a segment boundary: the counted route, whose token is spent.
    assert_eq!(raw_request(sidecar.port, &post("/v1/modelsXYZ")).await, 429);
    assert_eq!(
        mock.state.arrivals().len(),
        1,
        "only the first request reached the upstream: {:?}",
        mock.state
            .arrivals()
            .iter()
            .map(|a| &a.path)
            .collect::<Vec<_>>()
    );
    // The passthrough route itself still works, on and below its prefix.
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_request(sidecar.port, &get("/v1/models")).await, 200);
    assert_eq!(
        raw_request(sidecar.port, &get("/v1/models/meta/llama-3.1-8b")).await,
        200
    );
}

/// A tiny upstream that answers every request with a 429 carrying one header.
async fn hostile_upstream(header: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // Small test bodies: the whole request is in once the head is.
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        let body = r#"{"status":429,"title":"Too Many Requests"}"#;
                        let answer = format!(
                            "HTTP/1.1 429 Too Many Requests\r\n{header}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(answer.as_bytes()).await;
                        seen.clear();
                    }
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn absurd_upstream_durations_clamp_and_leave_no_request_stuck() {
    for header in [
        "Retry-After: 1e300",
        "retry-after-ms: 1e300",
        "x-ratelimit-reset-requests: 1e300",
        "Retry-After: inf",
        "RateLimit: remaining=0, reset=1e300",
    ] {
        let (port, upstream) = hostile_upstream(header).await;
        let sidecar = Sidecar::start(&format!("http://127.0.0.1:{port}"), "rate_rpm: 600").await;
        let status = raw_request(sidecar.port, &post("/v1/chat/completions")).await;
        // An hour-long pause is longer than the request's deadline: the upstream's 429 is
        // passed on rather than replayed.
        assert_eq!(status, 429, "{header}");
        let status = sidecar.status().await;
        assert!(
            status["retreat"]["state"] == "retreat",
            "{header}: {status}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let inflight = sidecar.metric("nvidia_sidecar_inflight_requests").await;
            if inflight == 0.0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{header}: inflight_requests stuck at {inflight}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !sidecar.log_text().await.contains("panicked"),
            "{header}:\n{}",
            sidecar.log_text().await
        );
        upstream.abort();
    }
}

#[test]
fn absurd_config_durations_are_errors_not_panics() {
    for value in [
        "\"1e300\"",
        "1e300",
        "\"99999999999999999999999h\"",
        "\"inf\"",
    ] {
        let (code, text) = check_config(&format!("request_timeout: {value}\n"));
        assert_eq!(code, Some(1), "{value}: {text}");
        assert!(text.contains("request_timeout"), "{value}: {text}");
        assert!(!text.contains("panicked"), "{value}: {text}");
    }
}

/// A web page that rebinds its own name to 127.0.0.1 sends that name as `Host`: the proxy
/// refuses it (no key injected for it) and so does the admin plane; IP addresses, `localhost`
/// and names the operator lists are served.
#[tokio::test(flavor = "multi_thread")]
async fn only_hosts_the_sidecar_serves_reach_it() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\naccess:\n  allowed_hosts: [sidecar.internal]",
    )
    .await;
    let chat = |host: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
    };
    for host in [
        "rebound.example.com",
        "rebound.example.com:9180",
        "evil.localhost.example",
    ] {
        assert_eq!(raw_request(sidecar.port, &chat(host)).await, 403, "{host}");
    }
    for host in [
        "127.0.0.1",
        "127.0.0.1:9180",
        "localhost:9180",
        "[::1]:9180",
        "sidecar.internal",
        "SIDECAR.internal:1",
    ] {
        assert_eq!(raw_request(sidecar.port, &chat(host)).await, 200, "{host}");
    }
    assert_eq!(mock.state.arrivals().len(), 6);

    let reload = |host: &str, origin: Option<&str>| {
        let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        format!(
            "POST /api/admin/reload HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let admin = sidecar.metrics_port;
    let own = format!("127.0.0.1:{admin}");
    assert_eq!(
        raw_request(admin, &reload("rebound.example.com", None)).await,
        403
    );
    assert_eq!(
        raw_request(admin, &reload(&own, Some("http://rebound.example.com"))).await,
        403
    );
    assert_eq!(raw_request(admin, &reload(&own, Some("null"))).await, 403);
    assert_eq!(
        raw_request(admin, &reload(&own, Some(&format!("http://{own}")))).await,
        200
    );
    assert_eq!(raw_request(admin, &reload(&own, None)).await, 200);
    let text_plain = format!(
        "POST /api/admin/config HTTP/1.1\r\nHost: {own}\r\nContent-Type: text/plain\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{{\"rate_rpm\": 1}}"
    );
    assert_eq!(raw_request(admin, &text_plain).await, 415);
    assert_eq!(sidecar.status().await["token_bucket"]["rate_rpm"], 600.0);
}

/// With its port taken, the sidecar does not pretend to run: it exits with an error and says
/// why, so that a service manager sees the failure.
#[test]
fn a_proxy_port_that_is_taken_ends_the_process_with_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let admin = support::free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(
        &path,
        format!(
            "listen_port: {port}\nmetrics_port: {admin}\nupstream_url: http://127.0.0.1:9\nserver:\n  pid_file: {pid}\n  upgrade_sock: {sock}\n",
            pid = dir.path().join("pid").display(),
            sock = dir.path().join("sock").display(),
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .arg("-c")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the sidecar kept running without its proxy port");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{text}"
    );
    drop(taken);
}

/// An admin plane off loopback keeps its address until a restart, so a reload that moves it to
/// loopback and drops its token is refused instead of leaving it open until then.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_cannot_remove_the_token_of_an_admin_plane_off_loopback() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        "rate_rpm: 60\nadmin:\n  listen_host: 0.0.0.0\n  token_env: SIDECAR_TEST_ADMIN_TOKEN",
        &[("SIDECAR_TEST_ADMIN_TOKEN", "s3cret-admin")],
    )
    .await;
    let path = sidecar.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let without_token: String = text
        .lines()
        .filter(|l| !l.contains("token_env"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace("rate_rpm: 60", "rate_rpm: 61")
        // Loopback without a token is valid on its own; but the address only changes on a
        // restart, and until then the plane stays on 0.0.0.0.
        .replace("listen_host: 0.0.0.0", "listen_host: 127.0.0.1");
    std::fs::write(&path, without_token).unwrap();
    sidecar.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sidecar
        .metric("nvidia_sidecar_config_reloads_total{result=\"error\",source=\"sighup\"}")
        .await
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            sidecar.log_text().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let denied = support::client()
        .post(sidecar.admin("/api/admin/config"))
        .json(&serde_json::json!({"rate_rpm": 99}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(sidecar.status().await["token_bucket"]["rate_rpm"], 60.0);
    assert!(sidecar.log_text().await.contains("a token is required"));
}

/// Runs `nvidia-sidecar -t` on `text`; its exit code and output.
fn check_config(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn a_config_nested_a_hundred_thousand_levels_deep_is_refused_with_a_reason() {
    let flow = format!("routes: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let (code, text) = check_config(&flow);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("nests deeper"), "{text}");
    let mut block = String::from("adaptive:\n");
    for level in 1..200 {
        block.push_str(&format!("{}k{level}:\n", "  ".repeat(level)));
    }
    let (code, text) = check_config(&block);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("nests deeper"), "{text}");
    // The shipped config is far from the limit.
    let shipped = std::fs::read_to_string("conf/sidecar.yaml").unwrap();
    assert_eq!(check_config(&shipped).0, Some(0));
}

#[test]
fn rates_outside_a_sane_range_are_errors() {
    for rate in ["1e308", "1e-300", "0.001", "20000000"] {
        let (code, text) = check_config(&format!("rate_rpm: {rate}\n"));
        assert_eq!(code, Some(1), "{rate}: {text}");
        assert!(text.contains("rate_rpm: must be between"), "{rate}: {text}");
    }
    assert_eq!(check_config("rate_rpm: 0.5\n").0, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_two_content_lengths_is_refused() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let request = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2, 2\r\nConnection: close\r\n\r\n{}";
    assert_eq!(raw_request(sidecar.port, request).await, 400);
    assert!(mock.state.arrivals().is_empty());
}

/// At `trace`, Pingora would log every upstream request header, the key among them; the
/// modules that do so stay at `info` unless the operator says secrets may be logged.
#[tokio::test(flavor = "multi_thread")]
async fn trace_logging_keeps_the_key_out_unless_told_otherwise() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let key = "nvapi-trace-secret-1234567890";
    for (secrets, expect_key) in [(None, false), (Some("yes"), true)] {
        let mut env = vec![("SIDECAR_TEST_KEY", key)];
        if let Some(v) = secrets {
            env.push((nvidia_sidecar::LOG_SECRETS_ENV, v));
        }
        let sidecar = Sidecar::start_with_env(
            &mock.url(),
            "rate_rpm: 600\nlog_level: trace\nupstream:\n  api_key_env: SIDECAR_TEST_KEY",
            &env,
        )
        .await;
        assert_eq!(
            raw_request(sidecar.port, &post("/v1/chat/completions")).await,
            200
        );
        sidecar
            .wait_for_access_line(|l| l.contains("status=200"))
            .await;
        let log = sidecar.log_text().await;
        assert_eq!(log.contains(key), expect_key, "secrets flag {secrets:?}");
        if !expect_key {
            assert!(
                log.contains(nvidia_sidecar::LOG_SECRETS_ENV),
                "the cap is announced"
            );
        }
    }
}

/// A client that sends a broken chunked body is a client error: counted as such, answered
/// 400, and not logged as an upstream failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_broken_request_body_is_a_client_error() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let request = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let mut stream = TcpStream::connect(("127.0.0.1", sidecar.port))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    sidecar
        .wait_for_access_line(|l| l.contains("outcome="))
        .await;
    let counted = sidecar
        .metric("nvidia_sidecar_requests_total{outcome=\"client_error\",route=\"default\"}")
        .await;
    assert_eq!(counted, 1.0, "{}", sidecar.log_text().await);
    assert_eq!(
        sidecar
            .metric("nvidia_sidecar_requests_total{outcome=\"upstream_error\"")
            .await,
        0.0
    );
    assert!(
        !sidecar.log_text().await.contains(" ERROR "),
        "{}",
        sidecar.log_text().await
    );
}

/// `X-Priority` is capped by what the operator allows each client.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_cannot_claim_more_priority_than_the_operator_allows() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\naccess:\n  max_priority: normal\n  client_max_priority: {ci-deploy: high}",
    )
    .await;
    for client in ["agent", "ci-deploy"] {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: {client}\r\nX-Priority: high\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        assert_eq!(raw_request(sidecar.port, &request).await, 200);
    }
    let agent = sidecar
        .wait_for_access_line(|l| l.contains("client=agent "))
        .await;
    assert!(
        agent
            .as_deref()
            .is_some_and(|l| l.contains("priority=normal")),
        "{agent:?}"
    );
    let ci = sidecar
        .wait_for_access_line(|l| l.contains("client=ci-deploy "))
        .await;
    assert!(
        ci.as_deref().is_some_and(|l| l.contains("priority=high")),
        "{ci:?}"
    );
}

/// Admin connections cannot be held open: an idle one and one that sends its header a line at
/// a time are both closed once the header deadline (10 s) has passed.
#[tokio::test(flavor = "multi_thread")]
async fn idle_and_slow_admin_connections_are_closed() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 60").await;
    let admin = sidecar.metrics_port;
    let idle = TcpStream::connect(("127.0.0.1", admin)).await.unwrap();
    let mut slow = TcpStream::connect(("127.0.0.1", admin)).await.unwrap();
    let started = std::time::Instant::now();
    let drip = async {
        for line in ["GET /status HTTP/1.1\r\n", "Host: 127.0.0.1\r\n"]
            .into_iter()
            .chain(std::iter::repeat("X-Slow: 1\r\n"))
            .take(40)
        {
            if slow.write_all(line.as_bytes()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut buf = [0u8; 64];
        let _ = slow.read(&mut buf).await;
    };
    let wait_closed = async {
        let mut idle = idle;
        let mut buf = [0u8; 64];
        // A closed connection reads 0 bytes (or fails).
        matches!(idle.read(&mut buf).await, Ok(0) | Err(_))
    };
    let (closed, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(wait_closed, drip)
    })
    .await
    .expect("both connections are closed within 30 s");
    assert!(closed, "the idle connection was closed");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(25), "closed after {took:?}");
    // The admin plane still answers.
    assert_eq!(sidecar.status().await["token_bucket"]["rate_rpm"], 60.0);
}

/// A client that sends its request header a line every 2 s is cut off at the header deadline
/// (15 s) instead of holding its connection for ever; a request sent at once on a kept-alive
/// connection afterwards, and a response streamed for longer than the deadline, are not.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_header_on_the_proxy_is_cut_off_at_the_deadline() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let mut slow = TcpStream::connect(("127.0.0.1", sidecar.port))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let lines = ["GET /v1/models HTTP/1.1\r\n", "Host: 127.0.0.1\r\n"]
        .into_iter()
        .chain(std::iter::repeat("X-Slow: 1\r\n"))
        .take(30);
    let mut cut = false;
    for line in lines {
        if slow.write_all(line.as_bytes()).await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(2), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) => {
                cut = true; // an error answer, then the close
                break;
            }
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    assert!(cut, "the slow header was still accepted after {took:?}");
    assert!(took < Duration::from_secs(30), "cut off after {took:?}");
    assert!(
        took >= Duration::from_secs(10),
        "cut off too early, after {took:?}"
    );

    // A stream that lasts longer than the deadline, the client silent meanwhile.
    let response = support::client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&serde_json::json!({"model": "mock", "stream": true, "chunks": 9, "chunk_delay_ms": 2000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("[DONE]"), "the stream was cut: {text}");
}

/// Connections beyond `server.max_connections` are closed at once while every one is busy;
/// once the busy ones leave, new ones are served again. (Idle ones make room instead:
/// `tests/front_door.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_are_closed_and_room_comes_back() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::builder(&mock.url())
        .extra("rate_rpm: 600")
        .server("max_connections: 3")
        .start()
        .await;
    // Three connections whose head is half sent: busy, not idle.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", sidecar.port))
            .await
            .unwrap();
        stream
            .write_all(b"GET /v1/models HTTP/1.1\r\n")
            .await
            .unwrap();
        open.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(("127.0.0.1", sidecar.port))
        .await
        .unwrap();
    let _ = extra
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a fourth connection was served: {read:?}"
    );
    assert!(sidecar
        .log_text()
        .await
        .contains("3 connections open (server.max_connections), none idle"));
    // One of the three is served, and once two leave, new ones are served again.
    let status = raw_request_on(&mut open[0], "Host: 127.0.0.1\r\n\r\n").await;
    assert_eq!(status, 200);
    open.truncate(1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = support::client()
        .get(sidecar.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}

/// Sends `request` on `stream` and reads the status of the answer.
async fn raw_request_on(stream: &mut TcpStream, request: &str) -> u16 {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The file that once killed the lifecycle task on SIGHUP: the reload is refused with the
/// reason, and the next reload (of a good file) still works.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_of_an_absurd_duration_is_refused_and_reloads_go_on() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 60").await;
    let path = sidecar.config_path();
    let good = std::fs::read_to_string(&path).unwrap();
    let wait_for = |result: &'static str, count: f64| {
        let sidecar = &sidecar;
        async move {
            let name = format!(
                "nvidia_sidecar_config_reloads_total{{result=\"{result}\",source=\"sighup\"}}"
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while sidecar.metric(&name).await < count {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{}",
                    sidecar.log_text().await
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    std::fs::write(&path, format!("{good}request_timeout: \"1e300\"\n")).unwrap();
    sidecar.signal("HUP");
    wait_for("error", 1.0).await;
    assert!(sidecar.log_text().await.contains("request_timeout"));
    std::fs::write(&path, good.replace("rate_rpm: 60", "rate_rpm: 75")).unwrap();
    sidecar.signal("HUP");
    wait_for("ok", 1.0).await;
    assert_eq!(sidecar.status().await["token_bucket"]["rate_rpm"], 75.0);
    assert!(!sidecar.log_text().await.contains("panicked"));
}

/// A client that sends a new `X-Client-Id` with every request cannot grow the per-client table
/// of `/status`: 256 ids are tracked by name, the rest count under `other`, and the totals
/// stay whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_client_id_per_request_is_folded_into_other_beyond_the_cap() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 60000\nbucket_capacity: 50").await;
    let http = support::client();
    let url = sidecar.url("/v1/models");
    for batch in 0..15 {
        let sends = (0..20).map(|i| {
            http.get(&url)
                .header("x-client-id", format!("hostile-{batch}-{i}"))
                .send()
        });
        for answer in futures_util::future::join_all(sends).await {
            assert_eq!(answer.unwrap().status(), 200);
        }
    }
    let status = sidecar.status().await;
    let clients = &status["clients"];
    assert_eq!(clients["tracked"], 256, "{clients}");
    assert_eq!(clients["requests"], 300, "{clients}");
    assert_eq!(
        clients["other"]["requests_per_minute"],
        300 - 256,
        "{clients}"
    );
    assert_eq!(clients["by_rate"].as_array().unwrap().len(), 10);
}

/// A request whose body stalls is answered 408 when its deadline passes (3 s from its
/// arrival), whether it arrived
/// when a token was in hand or while the bucket was congested (when the sidecar reads a
/// waiting request ahead, see `proxy::parking`: 1.5 MB of a 2 MB body read before the stall
/// still reach Pingora as the request's body, not as an oversized header), and nothing of it
/// goes upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_is_answered_408_whether_or_not_the_bucket_is_congested() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 2 s.
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 30").await;
    let stalled = |port: u16| async move {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Timeout: 3\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n";
        let sent = std::time::Instant::now();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b'a'; 1_500_000]).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&answer).to_string();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no status line in {head:?}"));
        (status, sent.elapsed())
    };
    assert_eq!(stalled(sidecar.port).await.0, 408, "a token was in hand");
    // Take the next token: the bucket is congested when the stalled request arrives.
    let taken = raw_request(sidecar.port, &post("/v1/chat/completions")).await;
    assert_eq!(taken, 200);
    let arrived = mock.state.arrivals().len();
    let (status, after) = stalled(sidecar.port).await;
    assert_eq!(status, 408, "the bucket was congested");
    // Its 3 s count from its arrival, not again from when Pingora took it over.
    assert!(after < Duration::from_secs(5), "answered after {after:?}");
    assert_eq!(
        mock.state.arrivals().len(),
        arrived,
        "nothing of it went upstream"
    );
}

/// Requests that arrive while the bucket is congested, which the sidecar reads ahead and
/// parks before Pingora sees them (see `proxy::parking`), in the shapes clients send: a head
/// cut mid-line across writes, a body sent in pieces with pauses, bare line feeds, a head
/// larger than the first read, a chunked body, `Expect: 100-continue`, and two
/// `Content-Length`s. Each is answered as when nothing queues, and the upstream receives each
/// body whole.
#[tokio::test(flavor = "multi_thread")]
async fn requests_read_ahead_while_congested_arrive_as_sent() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 2 s, each spent before the next request arrives: every request waits.
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 30\nrequest_timeout: 30").await;
    let port = sidecar.port;
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hello there"}]}"#;
    let len = body.len();
    let pad = "x".repeat(8 * 1024);
    let head = |extra: &str, eol: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1{eol}Host: 127.0.0.1{eol}Content-Type: application/json{eol}Connection: close{eol}{extra}{eol}"
        )
    };
    // What is sent, in writes 100 ms apart; the status expected; the body length forwarded.
    type Case = (&'static str, Vec<Vec<u8>>, u16, Option<usize>);
    let cases: Vec<Case> = vec![
        (
            "a head cut mid-line, the body in pieces",
            {
                let h = head(&format!("Content-Length: {len}\r\n"), "\r\n").into_bytes();
                vec![
                    h[..20].to_vec(),
                    h[20..].to_vec(),
                    body[..10].to_vec(),
                    body[10..].to_vec(),
                ]
            },
            200,
            Some(len),
        ),
        (
            "bare line feeds",
            vec![[
                head(&format!("Content-Length: {len}\n"), "\n").into_bytes(),
                body.to_vec(),
            ]
            .concat()],
            200,
            Some(len),
        ),
        (
            "a head of 8 KiB",
            vec![[
                head(
                    &format!("X-Pad: {pad}\r\nContent-Length: {len}\r\n"),
                    "\r\n",
                )
                .into_bytes(),
                body.to_vec(),
            ]
            .concat()],
            200,
            Some(len),
        ),
        (
            "a chunked body",
            vec![
                head("Transfer-Encoding: chunked\r\n", "\r\n").into_bytes(),
                [
                    format!("{len:x}\r\n").into_bytes(),
                    body.to_vec(),
                    b"\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
            ],
            200,
            Some(len),
        ),
        (
            "Expect: 100-continue",
            vec![[
                head(
                    &format!("Expect: 100-continue\r\nContent-Length: {len}\r\n"),
                    "\r\n",
                )
                .into_bytes(),
                body.to_vec(),
            ]
            .concat()],
            200,
            Some(len),
        ),
        (
            "two Content-Lengths",
            vec![[
                head(
                    &format!("Content-Length: {len}\r\nContent-Length: {len}\r\n"),
                    "\r\n",
                )
                .into_bytes(),
                body.to_vec(),
            ]
            .concat()],
            400,
            None,
        ),
    ];
    for (name, parts, expected, forwarded) in cases {
        // Spend the token: the next request finds the bucket congested.
        assert_eq!(
            raw_request(port, &post("/v1/chat/completions")).await,
            200,
            "{name}"
        );
        let before = mock.state.arrivals().len();
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        for part in &parts {
            stream.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer within 15 s"))
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        // A 100 Continue may come first; the final status is the last status line.
        let status: u16 = text
            .match_indices("HTTP/1.1 ")
            .last()
            .and_then(|(at, _)| text[at + 9..at + 12].parse().ok())
            .unwrap_or_else(|| panic!("{name}: no status line in {text:?}"));
        assert_eq!(status, expected, "{name}: {text}");
        let arrivals = mock.state.arrivals();
        match forwarded {
            Some(len) => {
                assert_eq!(arrivals.len(), before + 1, "{name}");
                let arrival = arrivals.last().unwrap();
                assert_eq!(arrival.body_len, len, "{name}");
                assert_eq!(arrival.body_checksum, support::fnv1a64(body), "{name}");
            }
            None => assert_eq!(arrivals.len(), before, "{name}: nothing goes upstream"),
        }
    }
}
