//! The request path end to end: the real sidecar binary in front of a mock upstream.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::{chat_body, client, free_port, LimitStyle, MockUpstream, Sidecar};

async fn post_chat(url: &str, client_id: &str) -> reqwest::Response {
    client()
        .post(url)
        .header("x-client-id", client_id)
        .json(&chat_body())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn forwards_and_rewrites_host() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let response = post_chat(&sidecar.url("/v1/chat/completions"), "a").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "ok");
    let arrivals = mock.state.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(
        arrivals[0].host.as_deref(),
        Some(mock.addr.to_string().as_str())
    );
    let line = sidecar
        .wait_for_access_line(|l| {
            l.contains("client=a route=default method=POST path=/v1/chat/completions status=200")
                && l.contains("outcome=forwarded")
        })
        .await;
    assert!(line.is_some(), "{:?}", sidecar.access_log().await);
}

/// The injected key replaces the client's credential: named in the config, or, with no
/// `upstream:` section at all, from `NVIDIA_API_KEY`, the documented default. Only without any
/// key is the client's own credential forwarded.
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_key_replaces_the_clients_credential() {
    let injected = Some("Bearer nvapi-test-secret");
    for (extra, env, expected) in [
        (
            "rate_rpm: 600\nupstream:\n  api_key_env: TEST_UPSTREAM_KEY",
            Some("TEST_UPSTREAM_KEY"),
            injected,
        ),
        ("rate_rpm: 600", Some("NVIDIA_API_KEY"), injected),
        ("rate_rpm: 600", None, Some("Bearer client-own-key")),
    ] {
        let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
        let env: Vec<(&str, &str)> = env
            .map(|name| (name, "nvapi-test-secret"))
            .into_iter()
            .collect();
        let sidecar = Sidecar::start_with_env(&mock.url(), extra, &env).await;
        let response = client()
            .post(sidecar.url("/v1/chat/completions"))
            .bearer_auth("client-own-key")
            .json(&chat_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let seen = mock.state.arrivals()[0].authorization.clone();
        assert_eq!(seen.as_deref(), expected, "{env:?}");
        assert!(
            !sidecar.log_text().await.contains("nvapi-test-secret"),
            "the key must never be logged"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_with_retry_after_and_openai_json() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 10 s; two may wait, for at most 2 s.
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 6\nqueue_max_size: 2\nrequest_timeout: 2",
    )
    .await;
    let url = sidecar.url("/v1/chat/completions");
    assert_eq!(post_chat(&url, "a").await.status(), 200);
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { post_chat(&url, &format!("w{i}")).await })
        })
        .collect();
    // Wait until both are queued (they cannot be answered before their 2 s deadline).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let full = post_chat(&url, "late").await;
    assert_eq!(full.status(), 429);
    let retry_after: u64 = full.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "retry-after {retry_after}");
    let body: serde_json::Value = full.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["code"], "queue_full");
    assert!(body["error"]["param"].is_null());

    for w in waiting {
        let timed_out = w.await.unwrap();
        assert_eq!(timed_out.status(), 429);
        assert!(timed_out.headers().contains_key("retry-after"));
        let body: serde_json::Value = timed_out.json().await.unwrap();
        assert_eq!(body["error"]["code"], "queue_timeout");
    }
    assert_eq!(
        mock.state.arrivals().len(),
        1,
        "rejected requests never reach the upstream"
    );
}

/// A waiting client that hangs up leaves the queue without consuming a token, with a small
/// body and with a coding agent's 1 MiB prompt alike (both are read while it waits).
#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_that_disconnects_consumes_no_token() {
    for body in [
        serde_json::to_vec(&support::chat_body()).unwrap(),
        support::long_prompt(1 << 20),
    ] {
        let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
        // One token every 2 s.
        let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 30").await;
        let url = sidecar.url("/v1/chat/completions");
        let start = Instant::now();
        assert_eq!(post_chat(&url, "a").await.status(), 200);
        // B queues for the token due at 2 s, then gives up after 600 ms.
        let impatient = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(600))
            .build()
            .unwrap();
        let gave_up = impatient
            .post(&url)
            .header("x-client-id", "b")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let size = body.len();
        assert!(
            gave_up.is_err(),
            "{size} B: the impatient client times out while queued"
        );
        // C queues behind nobody: it gets the token due at 2 s, not the one at 4 s.
        let c = post_chat(&url, "c").await;
        assert_eq!(c.status(), 200);
        let waited = start.elapsed();
        assert!(
            waited < Duration::from_millis(3500),
            "{size} B: C waited {waited:?}: B's abandoned place took a token"
        );
        assert_eq!(
            mock.state.arrivals().len(),
            2,
            "{size} B: B never reached the upstream"
        );
        let line = sidecar
            .wait_for_access_line(|l| l.contains("client=b") && l.contains("outcome=client_closed"))
            .await;
        assert!(line.is_some(), "{size} B: {:?}", sidecar.access_log().await);
        // Whichever door it waited at (a small body parks, a large one waits in Pingora's
        // session), it is counted once, under its route.
        let line = line.unwrap_or_default();
        assert!(
            line.contains(" route=default "),
            "{size} B: counted under its route: {line}"
        );
        assert!(
            !sidecar.log_text().await.contains(" ERROR "),
            "a client leaving is not an error:\n{}",
            sidecar.log_text().await
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_streams_arrive_chunk_by_chunk() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let body =
        serde_json::json!({"model": "mock", "stream": true, "chunks": 5, "chunk_delay_ms": 200});
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chunk0"));
    assert_eq!(
        mock.state
            .streams_finished
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the first chunk reached the client before the upstream finished its stream"
    );
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("chunk4") && rest.contains("data: [DONE]"),
        "{rest}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_hanging_up_mid_stream_is_counted_not_logged_as_an_error() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let body =
        serde_json::json!({"model": "mock", "stream": true, "chunks": 20, "chunk_delay_ms": 100});
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header("x-client-id", "leaver")
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let line = sidecar
        .wait_for_access_line(|l| l.contains("client=leaver"))
        .await;
    assert!(
        line.is_some_and(|l| l.contains("outcome=client_closed")),
        "{:?}",
        sidecar.access_log().await
    );
    assert!(
        !sidecar.log_text().await.contains(" ERROR "),
        "{}",
        sidecar.log_text().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_is_a_502_and_a_timeout_a_504_in_the_same_json_shape() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let sidecar = Sidecar::start(&closed, "rate_rpm: 600").await;
    let response = post_chat(&sidecar.url("/v1/chat/completions"), "a").await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "upstream_error");
    assert_eq!(body["error"]["code"], "upstream_unreachable");

    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar =
        Sidecar::start(&mock.url(), "rate_rpm: 600\nupstream:\n  read_timeout: 0.5").await;
    let response = client()
        .get(sidecar.url("/slow?ms=3000"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "upstream_error");
    assert_eq!(body["error"]["code"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unresolvable_upstream_is_a_502_not_a_crash() {
    let sidecar = Sidecar::start("http://no-such-upstream.invalid", "rate_rpm: 600").await;
    let response = post_chat(&sidecar.url("/v1/chat/completions"), "a").await;
    assert_eq!(response.status(), 502);
    // Still serving afterwards.
    let again = post_chat(&sidecar.url("/v1/chat/completions"), "a").await;
    assert_eq!(again.status(), 502);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_and_foreign_targets_are_refused() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let raw = |request: String| {
        let port = sidecar.port;
        async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).to_string()
        }
    };
    let connect =
        raw("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".into()).await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    let foreign = raw("GET http://example.com/v1/models HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n".into()).await;
    assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
    let own = raw(format!(
        "GET http://{addr}/v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        addr = mock.addr
    ))
    .await;
    assert!(own.starts_with("HTTP/1.1 200"), "{own}");
    assert_eq!(
        mock.state.arrivals().len(),
        1,
        "only the configured upstream was reached"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn passthrough_routes_take_no_token() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 1\nrequest_timeout: 1\nroutes:\n  - {path_prefix: /v1/models, passthrough: true}",
    )
    .await;
    for _ in 0..5 {
        let response = client()
            .get(sidecar.url("/v1/models"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // The counted route has one token per minute: the first passes, the second times out.
    assert_eq!(
        post_chat(&sidecar.url("/v1/chat/completions"), "a")
            .await
            .status(),
        200
    );
    assert_eq!(
        post_chat(&sidecar.url("/v1/chat/completions"), "a")
            .await
            .status(),
        429
    );
    sidecar
        .wait_for_access_line(|l| l.contains("status=429"))
        .await;
    let log = sidecar.access_log().await;
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("outcome=passthrough"))
            .count(),
        5,
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_open_forwards_instead_of_rejecting() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 1\nrequest_timeout: 0.5\nfallback_enabled_passthrough: true",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            post_chat(&sidecar.url("/v1/chat/completions"), "a")
                .await
                .status(),
            200
        );
    }
    assert_eq!(mock.state.arrivals().len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sidecar.access_log().await.len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = sidecar.access_log().await;
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("fallback=fail_open"))
            .count(),
        2,
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_429_is_replayed_not_passed_on() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\nadaptive:\n  quiet_period: 0.2\n  recover_interval: 0.1",
    )
    .await;
    mock.state.fail_next(2);
    let response = post_chat(&sidecar.url("/v1/chat/completions"), "a").await;
    assert_eq!(response.status(), 200, "two upstream 429s were absorbed");
    let statuses: Vec<_> = mock.state.arrivals().iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![429, 429, 200]);
    let bodies: Vec<_> = mock.state.arrivals().iter().map(|a| a.body_len).collect();
    assert!(
        bodies.iter().all(|len| *len == bodies[0] && *len > 0),
        "the body was re-sent each time: {bodies:?}"
    );
    let line = sidecar
        .wait_for_access_line(|l| l.contains("replays=2") && l.contains("status=200"))
        .await;
    assert!(line.is_some(), "{:?}", sidecar.access_log().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn replays_are_bounded_then_the_upstream_429_reaches_the_client() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\nadaptive:\n  max_replays: 2\n  quiet_period: 0.1\n  recover_interval: 0.1",
    )
    .await;
    mock.state.fail_next(10);
    let response = post_chat(&sidecar.url("/v1/chat/completions"), "a").await;
    assert_eq!(response.status(), 429);
    let body = response.text().await.unwrap();
    assert!(
        body.contains("Too Many Requests"),
        "the upstream's own 429: {body}"
    );
    assert_eq!(mock.state.arrivals().len(), 3, "one try and two replays");
}

/// A billing 429 (`insufficient_quota`) looks like any 429 at its header, where the replay is
/// decided; once one has been passed on and read, the route's 429s reach the client at once,
/// without replay and without a cut.
#[tokio::test(flavor = "multi_thread")]
async fn insufficient_quota_reaches_the_client_and_then_stops_the_replays() {
    let mock = MockUpstream::start(None, LimitStyle::InsufficientQuota).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600\nadaptive:\n  max_replays: 1").await;
    mock.state.fail_next(10);
    let url = sidecar.url("/v1/chat/completions");
    let response = post_chat(&url, "a").await;
    assert_eq!(response.status(), 429);
    let body = response.text().await.unwrap();
    assert!(body.contains("insufficient_quota"), "{body}");
    assert_eq!(mock.state.arrivals().len(), 2, "one try, one replay");
    let response = post_chat(&url, "a").await;
    assert_eq!(response.status(), 429);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("insufficient_quota"));
    assert_eq!(
        mock.state.arrivals().len(),
        3,
        "no replay of a billing error"
    );
    let metrics = sidecar.metrics_text().await;
    assert!(
        metrics
            .contains("upstream_refusals_total{reason=\"insufficient_quota\",route=\"default\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_upstream_with_a_test_ca() {
    let identity = support::tls::TestIdentity::new();
    let mock = MockUpstream::start_tls(&identity).await;
    let ca_path = std::env::temp_dir().join(format!("sidecar-test-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_path, &identity.ca_pem).unwrap();
    let url = format!("https://localhost:{}", mock.addr.port());
    let sidecar = Sidecar::start(
        &url,
        &format!("rate_rpm: 600\nupstream:\n  ca_file: {}", ca_path.display()),
    )
    .await;
    let response = post_chat(&sidecar.url("/v1/chat/completions"), "a").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        mock.state.arrivals()[0].host.as_deref(),
        Some(format!("localhost:{}", mock.addr.port()).as_str())
    );

    // Without our CA the certificate is not trusted: no connection, a 502.
    let untrusting = Sidecar::start(&url, "rate_rpm: 600").await;
    let response = post_chat(&untrusting.url("/v1/chat/completions"), "a").await;
    assert_eq!(response.status(), 502);
    assert_eq!(mock.state.arrivals().len(), 1);
    let _ = std::fs::remove_file(ca_path);
}
