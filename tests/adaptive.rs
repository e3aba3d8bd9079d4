//! The adaptive core against upstreams framed and limited in ways this sidecar did not choose:
//! every upstream 429 on a replayable request is absorbed whatever the framing of its answer,
//! bodies far larger than Pingora's 64 KiB retry buffer are replayed byte for byte, a waiting
//! client with such a body that hangs up consumes no token, one incident costs a bounded number
//! of upstream 429s, and recovery never climbs above what the upstream accepted.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::time::{Duration, Instant};

use support::{
    chat_body, client, fnv1a64, long_prompt, Framing, LimitStyle, MockUpstream, Quota, QuotaKind,
    Sidecar,
};

/// The timing-sensitive tests run one at a time on this 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The rate the requests of the first key get now: the key's, or that of the lane of their
/// model when it holds them back (one model on a key that was not running full charges its
/// 429s to the model, see `limiter::blame`).
fn binding_rpm(status: &serde_json::Value) -> f64 {
    let key = &status["keys"][0];
    let key_rpm = key["effective_rpm"].as_f64().unwrap();
    key["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["limiting"].as_bool().unwrap())
        .map(|m| m["effective_rpm"].as_f64().unwrap())
        .fold(key_rpm, f64::min)
}

/// A mock whose answers come as header and body `delay_ms` apart.
async fn split_mock(delay_ms: u64) -> MockUpstream {
    let framing = Framing::Split {
        delay: Duration::from_millis(delay_ms),
    };
    MockUpstream::start_framed(None, LimitStyle::Nvidia, framing).await
}

/// One small chat completion through the sidecar.
async fn chat(sidecar: &Sidecar) -> reqwest::Response {
    let body = serde_json::to_vec(&chat_body()).unwrap();
    post(&sidecar.url("/v1/chat/completions"), "a", body).await
}

async fn post(url: &str, client_id: &str, body: Vec<u8>) -> reqwest::Response {
    client()
        .post(url)
        .header("x-client-id", client_id)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Each framing of the upstream's 429: header and body in one write, in two writes 150 ms
/// apart, a chunked body, and a body that never comes. Two 429s in a row, then a success:
/// the client sees only the success.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_429_is_absorbed_whatever_its_framing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let framings = [
        Framing::OneWrite,
        Framing::Split {
            delay: Duration::from_millis(150),
        },
        Framing::Chunked {
            delay: Duration::from_millis(150),
        },
        Framing::BodyNever,
    ];
    for framing in framings {
        let mock = MockUpstream::start_framed(None, LimitStyle::Nvidia, framing).await;
        let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600\nrequest_timeout: 30").await;
        mock.state.fail_next(2);
        let started = Instant::now();
        let response = chat(&sidecar).await;
        let status = response.status().as_u16();
        let replays = response
            .headers()
            .get("x-sidecar-replays")
            .map(|v| v.to_str().unwrap().to_string());
        let body = response.text().await.unwrap();
        println!(
            "{framing:?}: status {status} after {:?}, replays {replays:?}",
            started.elapsed()
        );
        assert_eq!(status, 200, "{framing:?}: {body}");
        assert!(body.contains("chat.completion"), "{framing:?}: {body}");
        let statuses: Vec<u16> = mock.state.arrivals().iter().map(|a| a.status).collect();
        assert_eq!(statuses, vec![429, 429, 200], "{framing:?}");
        assert_eq!(replays.as_deref(), Some("2"), "{framing:?}");
        assert_eq!(
            sidecar
                .metric("nvidia_sidecar_upstream_refusals_total{reason=\"rate_limit\",route=\"default\"}")
                .await,
            2.0,
            "{framing:?}"
        );
    }
}

/// A TLS upstream's 429 is absorbed the same way.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_429_over_tls_is_absorbed() {
    let identity = support::tls::TestIdentity::new();
    let mock = MockUpstream::start_tls(&identity).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &identity.ca_pem).unwrap();
    let sidecar = Sidecar::start(
        &format!("https://localhost:{}", mock.addr.port()),
        &format!("rate_rpm: 600\nupstream:\n  ca_file: {}", ca.display()),
    )
    .await;
    mock.state.fail_next(1);
    let response = chat(&sidecar).await;
    assert_eq!(response.status(), 200);
    let statuses: Vec<u16> = mock.state.arrivals().iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![429, 200]);
}

/// A coding agent's 1 MiB prompt, refused once with a split 429: the upstream receives the
/// whole body again, byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn a_one_mebibyte_body_is_replayed_byte_for_byte() {
    let mock = split_mock(100).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600\nrequest_timeout: 30").await;
    mock.state.fail_next(1);
    let body = long_prompt(1 << 20);
    let checksum = fnv1a64(&body);
    let response = post(&sidecar.url("/v1/chat/completions"), "agent", body.clone()).await;
    assert_eq!(response.status(), 200);
    let arrivals = mock.state.arrivals();
    assert_eq!(arrivals.len(), 2);
    for a in &arrivals {
        assert_eq!(a.body_len, body.len(), "status {}", a.status);
        assert_eq!(a.body_checksum, checksum, "status {}", a.status);
    }
    assert_eq!(
        sidecar
            .metric("nvidia_sidecar_replay_unavailable_total")
            .await,
        0.0
    );
    // Nothing stays held once the request is done.
    assert_eq!(sidecar.metric("nvidia_sidecar_held_body_bytes").await, 0.0);
}

/// A request that waits for its token is parked before Pingora reads it (the connection
/// loop reads it ahead, see `proxy::parking`); Pingora then reads it as sent, and a 1 MiB body
/// refused once with a split 429 reaches the upstream whole, twice, with the client's wait
/// counted from its arrival.
#[tokio::test(flavor = "multi_thread")]
async fn a_parked_request_is_forwarded_and_replayed_byte_for_byte() {
    let mock = split_mock(100).await;
    // One token every 2 s: the second request waits.
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 30\nrequest_timeout: 30").await;
    let url = sidecar.url("/v1/chat/completions");
    assert_eq!(post(&url, "first", long_prompt(1000)).await.status(), 200);
    mock.state.fail_next(1);
    let body = long_prompt(1 << 20);
    let checksum = fnv1a64(&body);
    let response = post(&url, "agent", body.clone()).await;
    assert_eq!(response.status(), 200);
    let waited: u64 = response.headers()["x-sidecar-queue-wait-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(waited >= 1000, "it waited for the next token: {waited} ms");
    let arrivals = mock.state.arrivals();
    assert_eq!(arrivals.len(), 3);
    for a in &arrivals[1..] {
        assert_eq!(a.body_len, body.len(), "status {}", a.status);
        assert_eq!(a.body_checksum, checksum, "status {}", a.status);
    }
    let line = sidecar
        .wait_for_access_line(|l| l.contains("client=agent"))
        .await
        .expect("an access line");
    assert!(
        line.contains("replays=1") && line.contains("outcome=forwarded"),
        "{line}"
    );
    assert_eq!(sidecar.metric("nvidia_sidecar_held_body_bytes").await, 0.0);
    assert_eq!(
        sidecar.metric("nvidia_sidecar_inflight_requests").await,
        0.0
    );
}

/// A body over `max_replay_body` (or beyond the budget) is forwarded when its turn comes, is
/// not replayable, and is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_is_forwarded_but_not_replayed() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\nadaptive:\n  max_replay_body: 256KiB\n  replay_body_budget: 1MiB",
    )
    .await;
    let url = sidecar.url("/v1/chat/completions");
    let large = long_prompt(300 << 10);
    let response = post(&url, "a", large.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(mock.state.arrivals()[0].body_checksum, fnv1a64(&large));
    assert_eq!(
        sidecar
            .metric("nvidia_sidecar_replay_unavailable_total{reason=\"body_too_large\",route=\"default\"}")
            .await,
        1.0
    );
    // Not replayable: the upstream's 429 reaches the client.
    mock.state.fail_next(1);
    let response = post(&url, "a", large).await;
    assert_eq!(response.status(), 429);
    assert_eq!(mock.state.arrivals().len(), 2);
}

/// Bodies held at once never exceed the budget: with room for one 200 KiB body, a second one
/// arriving while the first waits is not held (and counted), and both are answered.
#[tokio::test(flavor = "multi_thread")]
async fn held_bodies_stay_within_the_budget() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 2 s: the second request waits while the first one's body is held.
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 30\nadaptive:\n  replay_body_budget: 300KiB",
    )
    .await;
    let url = sidecar.url("/v1/chat/completions");
    assert_eq!(post(&url, "first", long_prompt(1000)).await.status(), 200);
    let waiting = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, "a", long_prompt(200 << 10)).await.status() })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let held = sidecar.metric("nvidia_sidecar_held_body_bytes").await;
    assert!(held > 200_000.0, "the waiting body is held: {held}");
    let second = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, "b", long_prompt(200 << 10)).await.status() })
    };
    assert_eq!(waiting.await.unwrap(), 200);
    assert_eq!(second.await.unwrap(), 200);
    assert_eq!(
        sidecar
            .metric(
                "nvidia_sidecar_replay_unavailable_total{reason=\"budget_full\",route=\"default\"}"
            )
            .await,
        1.0
    );
    assert_eq!(sidecar.metric("nvidia_sidecar_held_body_bytes").await, 0.0);
}

/// The rate set 50% too high against a strict 4 s window, NVIDIA's 429 without
/// `Retry-After`, header and body in separate writes, shipped adaptive defaults: the first
/// incident costs at most 3 upstream 429s (one more may be in flight when it starts), no client
/// sees a 429, and once the controller has learned the quota the rate never climbs above what
/// the upstream accepted.
#[tokio::test(flavor = "multi_thread")]
async fn one_incident_is_bounded_and_recovery_stays_below_what_was_accepted() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let quota = Quota {
        limit: 20,
        window: Duration::from_secs(4),
        kind: QuotaKind::SlidingWindow,
    };
    let mock = MockUpstream::start_framed(
        Some(quota),
        LimitStyle::Nvidia,
        Framing::Split {
            delay: Duration::from_millis(30),
        },
    )
    .await;
    // 450 rpm against 300; the controller's window set to the quota's, so that the ceiling is
    // learned within the test's time (the shipped minute is for NVIDIA's window).
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 450\nrequest_timeout: 60\nadaptive:\n  window: 4\n  quiet_period: 2\n  recover_interval: 0.5",
    )
    .await;
    let url = sidecar.url("/v1/chat/completions");
    let run = Duration::from_secs(16);
    let stop = Instant::now() + run;
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < stop {
                    let body = serde_json::to_vec(&chat_body()).unwrap();
                    statuses.push(post(&url, &format!("c{i}"), body).await.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    // Watch the effective rate once the quota has been learned.
    let mut highest_after_learning = 0.0f64;
    let learn_by = Instant::now() + Duration::from_secs(9);
    while Instant::now() < stop {
        if Instant::now() > learn_by {
            let status = sidecar.status().await;
            highest_after_learning = highest_after_learning.max(binding_rpm(&status));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.unwrap());
    }
    let violations: Vec<u128> = mock
        .state
        .arrivals()
        .iter()
        .filter(|a| a.status == 429)
        .map(|a| a.at.duration_since(mock.state.started()).as_millis())
        .collect();
    let first = *violations.first().expect("the too-high rate met the quota");
    let incident: Vec<u128> = violations
        .iter()
        .copied()
        .filter(|t| *t < first + quota.window.as_millis())
        .collect();
    let client_429s = statuses.iter().filter(|s| **s == 429).count();
    println!(
        "violations at {violations:?} ms; first incident {incident:?}; client 429s {client_429s} of {}; highest rate after learning {highest_after_learning:.1} rpm",
        statuses.len()
    );
    assert!(incident.len() <= 4, "the first incident cost {incident:?}");
    assert_eq!(client_429s, 0, "statuses: {statuses:?}");
    assert!(
        highest_after_learning <= 300.0,
        "recovery climbed to {highest_after_learning} rpm above the 300 rpm the upstream accepts"
    );
    assert!(highest_after_learning > 0.0);
}

/// NVIDIA's worker-capacity error on a request that cannot be replayed (no replays left):
/// passed on, counted as `worker_capacity`, and the key's rate is not cut, whether its body
/// comes with the header, 300 ms after it, or chunked.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_capacity_error_is_counted_apart_and_does_not_cut_the_rate() {
    let late = Duration::from_millis(300);
    for framing in [
        Framing::OneWrite,
        Framing::Split { delay: late },
        Framing::Chunked { delay: late },
    ] {
        let mock = MockUpstream::start_framed(None, LimitStyle::Nvidia, framing).await;
        let sidecar =
            Sidecar::start(&mock.url(), "rate_rpm: 600\nadaptive:\n  max_replays: 0").await;
        mock.state.worker_busy_next(1);
        let response = chat(&sidecar).await;
        assert_eq!(response.status(), 429, "{framing:?}");
        let body = response.text().await.unwrap();
        assert!(
            body.contains("Worker local total request limit reached"),
            "{framing:?}: {body}"
        );
        let count = sidecar
            .metric(
                "nvidia_sidecar_upstream_refusals_total{reason=\"worker_capacity\",route=\"default\"}",
            )
            .await;
        assert_eq!(count, 1.0, "{framing:?}");
        let status = sidecar.status().await;
        assert_eq!(
            status["retreat"]["state"], "normal",
            "{framing:?}: {status}"
        );
        assert_eq!(status["retreat"]["effective_rpm"], 600.0);
    }
}

/// A 503 "all workers are busy" (NVIDIA's ResourceExhausted as a 503): replayed after a short
/// back-off, counted apart, and the key's rate is not cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_worker_503_is_replayed_after_a_back_off_without_a_cut() {
    let mock = split_mock(50).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600\nrequest_timeout: 30").await;
    mock.state.unavailable_next(2);
    let response = chat(&sidecar).await;
    assert_eq!(response.status(), 200);
    let arrivals = mock.state.arrivals();
    let statuses: Vec<u16> = arrivals.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    for pair in arrivals.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(900), "replayed after {gap:?}");
    }
    let count = sidecar
        .metric("nvidia_sidecar_upstream_refusals_total{reason=\"unavailable\",route=\"default\"}")
        .await;
    assert_eq!(count, 2.0);
    let status = sidecar.status().await;
    assert_eq!(status["retreat"]["state"], "normal", "{status}");
}
