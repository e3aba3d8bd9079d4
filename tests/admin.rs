//! The admin plane against the real server: endpoints and their JSON, the config API and its
//! validation, authentication, metrics (checked with promtool) and the dashboard stream.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{chat_body, client, LimitStyle, MockUpstream, Sidecar};

async fn get_json(url: &str) -> (u16, Value) {
    let response = client().get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn post_config(sidecar: &Sidecar, body: Value) -> (u16, Value) {
    let response = client()
        .post(sidecar.admin("/api/admin/config"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn health_status_and_config_answer_in_the_documented_shape() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        "rate_rpm: 40\nupstream:\n  api_key_env: ADMIN_TEST_KEY",
        &[("ADMIN_TEST_KEY", "nvapi-very-secret")],
    )
    .await;
    assert_eq!(
        get_json(&sidecar.admin("/health")).await,
        (200, json!({"status": "ok"}))
    );
    let (status, ready) = get_json(&sidecar.admin("/health/ready")).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));

    let (status, s) = get_json(&sidecar.admin("/status")).await;
    assert_eq!(status, 200);
    assert!(s["timestamp"].as_f64().unwrap() > 1.7e9);
    assert!(s["uptime_seconds"].is_u64());
    let bucket = &s["token_bucket"];
    for field in [
        "tokens",
        "capacity",
        "rate_rpm",
        "queue_size",
        "queue_max_size",
    ] {
        assert!(
            bucket[field].is_number(),
            "token_bucket.{field} missing: {s}"
        );
    }
    assert_eq!(bucket["rate_rpm"], 40.0);
    assert_eq!(bucket["queue_max_size"], 100);
    let retreat = &s["retreat"];
    assert_eq!(retreat["state"], "normal");
    for field in ["effective_rpm", "base_rpm", "upstream_429_rate"] {
        assert!(retreat[field].is_number(), "retreat.{field} missing: {s}");
    }
    for field in ["total", "nvidia", "passthrough", "ratelimited"] {
        assert!(
            s["requests"][field].is_u64(),
            "requests.{field} missing: {s}"
        );
    }
    for field in ["queue_full_rejects", "upstream_errors"] {
        assert!(s["errors"][field].is_u64(), "errors.{field} missing: {s}");
    }

    let (status, config) = get_json(&sidecar.admin("/api/admin/config")).await;
    assert_eq!(status, 200);
    assert_eq!(config["config"]["rate_rpm"], 40.0);
    assert_eq!(config["config"]["upstream"]["api_key"], "***");
    assert_eq!(config["override_fields"], json!([]));
    let text = config.to_string();
    assert!(
        !text.contains("nvapi-very-secret"),
        "a secret leaked: {text}"
    );

    let page = client().get(sidecar.admin("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/api/dashboard/stream"));
    let chart = client()
        .get(sidecar.admin("/static/vendor/uplot/uPlot.iife.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(chart.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_patches_are_rejected_and_change_nothing() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 40").await;
    for (body, needle) in [
        (json!({"rate_rpm": 0}), "rate_rpm must be > 0"),
        (json!({"rate_rpm": -5}), "rate_rpm must be > 0, got -5"),
        (json!({"rate_rpm": "abc"}), "rate_rpm: not a rate"),
        (
            json!({"colour": "red"}),
            "colour is not a live-changeable field",
        ),
        (
            json!({"queue_max_size": 0}),
            "queue_max_size must be between 1",
        ),
        (json!([1, 2]), "must be a JSON object"),
    ] {
        let (status, answer) = post_config(&sidecar, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        let detail = answer["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(needle),
            "{body}: {detail:?} lacks {needle:?}"
        );
    }
    let huge = format!("{{\"rate_rpm\": 10, \"pad\": \"{}\"}}", "x".repeat(200_000));
    let response = client()
        .post(sidecar.admin("/api/admin/config"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    let (_, s) = get_json(&sidecar.admin("/status")).await;
    assert_eq!(s["token_bucket"]["rate_rpm"], 40.0, "nothing changed");
    let (_, config) = get_json(&sidecar.admin("/api/admin/config")).await;
    assert_eq!(config["override_fields"], json!([]));
    let metrics = sidecar.metrics_text().await;
    assert!(
        metrics.contains(
            "nvidia_sidecar_config_reloads_total{result=\"error\",source=\"api_config\"} 3"
        ),
        "the three patches that parsed but failed validation are counted:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_patch_changes_the_rate_for_the_very_next_admission() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 10 s.
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 6\nrequest_timeout: 30").await;
    let url = sidecar.url("/v1/chat/completions");
    let http = client();
    assert_eq!(sidecar.chat().await, 200);
    let waiting = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let status = http
                .post(&url)
                .json(&chat_body())
                .send()
                .await
                .unwrap()
                .status();
            (status, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) =
        post_config(&sidecar, json!({"rate_rpm": 600, "queue_max_size": 50})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "ok");
    let mut changed: Vec<String> = serde_json::from_value(answer["changed"].clone()).unwrap();
    changed.sort();
    assert_eq!(changed, vec!["queue_max_size", "rate_rpm"]);
    let (status, waited) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        waited < Duration::from_secs(5),
        "the waiter still waited {waited:?} for the old 10 s token"
    );

    let (_, s) = get_json(&sidecar.admin("/status")).await;
    assert_eq!(s["token_bucket"]["rate_rpm"], 600.0);
    assert_eq!(s["retreat"]["base_rpm"], 600.0);
    assert_eq!(s["token_bucket"]["queue_max_size"], 50);
    let (_, config) = get_json(&sidecar.admin("/api/admin/config")).await;
    assert_eq!(
        config["override_fields"],
        json!(["rate_rpm", "queue_max_size"])
    );
    assert_eq!(config["overrides"]["rate_rpm"], 600.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn mutations_need_the_admin_token_when_one_is_configured() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        "rate_rpm: 40\nadmin:\n  token_env: ADMIN_TEST_TOKEN",
        &[("ADMIN_TEST_TOKEN", "let-me-in")],
    )
    .await;
    let http = client();
    let patch = json!({"rate_rpm": 20});
    let anonymous = http
        .post(sidecar.admin("/api/admin/config"))
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = http
        .post(sidecar.admin("/api/admin/config"))
        .bearer_auth("guess")
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let reload = http
        .post(sidecar.admin("/api/admin/reload"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 401);
    let (_, s) = get_json(&sidecar.admin("/status")).await;
    assert_eq!(s["token_bucket"]["rate_rpm"], 40.0);
    let right = http
        .post(sidecar.admin("/api/admin/config"))
        .bearer_auth("let-me-in")
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    let (_, s) = get_json(&sidecar.admin("/status")).await;
    assert_eq!(s["token_bucket"]["rate_rpm"], 20.0);
    // Reading stays open.
    assert_eq!(get_json(&sidecar.admin("/api/admin/config")).await.0, 200);
}

#[test]
fn the_admin_plane_refuses_a_public_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("public.yaml");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "admin:\n  listen_host: 0.0.0.0").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .args(["-c", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("admin.listen_host: is 0.0.0.0, which is not loopback"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool_and_cover_the_spec() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let http = client();
    for _ in 0..3 {
        http.post(sidecar.url("/v1/chat/completions"))
            .json(&chat_body())
            .send()
            .await
            .unwrap();
    }
    sidecar
        .wait_for_access_line(|l| l.contains("outcome=forwarded"))
        .await;
    let metrics = sidecar.metrics_text().await;
    for name in [
        "nvidia_sidecar_requests_total{outcome=\"forwarded\",route=\"default\"}",
        "nvidia_sidecar_upstream_responses_total{code=\"200\",route=\"default\"}",
        "nvidia_sidecar_queue_depth{priority=\"normal\"}",
        "nvidia_sidecar_queue_wait_seconds_bucket{priority=\"normal\"",
        "nvidia_sidecar_tokens_available{route=\"default\"}",
        "nvidia_sidecar_rate_effective_rpm{route=\"default\"} 600",
        "nvidia_sidecar_rate_base_rpm{route=\"default\"} 600",
        "nvidia_sidecar_retreat_state{route=\"default\"} 0",
        "nvidia_sidecar_upstream_429_ratio{route=\"default\"}",
        "nvidia_sidecar_upstream_duration_seconds_bucket{route=\"default\"",
        "nvidia_sidecar_inflight_requests",
        "nvidia_sidecar_build_info{version=",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    // Counters of config reloads appear once a reload happened.
    let reload = http
        .post(sidecar.admin("/api/admin/reload"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let metrics = sidecar.metrics_text().await;
    assert!(metrics
        .contains("nvidia_sidecar_config_reloads_total{result=\"ok\",source=\"api_reload\"} 1"));

    support::promtool_check(&metrics);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_stream_sends_a_snapshot_every_second_and_counters_move() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let response = client()
        .get(sidecar.admin("/api/dashboard/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events: Vec<Value> = Vec::new();
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while events.len() < 4 && Instant::now() < deadline {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
        if events.len() >= 2 && !sent {
            for _ in 0..3 {
                client()
                    .post(sidecar.url("/v1/chat/completions"))
                    .json(&chat_body())
                    .send()
                    .await
                    .unwrap();
            }
            sent = true;
        }
    }
    assert!(events.len() >= 4, "got {} events", events.len());
    let stamps: Vec<f64> = events
        .iter()
        .map(|e| e["timestamp"].as_f64().unwrap())
        .collect();
    for pair in stamps[1..].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (0.5..2.0).contains(&gap),
            "events should be about a second apart: {stamps:?}"
        );
    }
    assert_eq!(events[0]["requests"]["total"], 0);
    assert_eq!(
        events.last().unwrap()["requests"]["total"],
        3,
        "{:?}",
        events.last()
    );
    assert_eq!(events.last().unwrap()["requests"]["nvidia"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_turns_503_while_draining_and_streams_end() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let mut sidecar = Sidecar::builder(&mock.url())
        .extra("rate_rpm: 600")
        .grace_period(3)
        .start()
        .await;
    // A monitor with a kept-alive connection, as a load balancer's health checker has.
    let monitor = client();
    assert_eq!(
        monitor
            .get(sidecar.admin("/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let stream = client()
        .get(sidecar.admin("/api/dashboard/stream"))
        .send()
        .await
        .unwrap();
    let mut stream = stream.bytes_stream();
    stream.next().await.unwrap().unwrap();
    sidecar.signal("TERM");
    // The stream ends cleanly.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(
        ended,
        Ok(true),
        "the dashboard stream ends cleanly on shutdown"
    );
    // Within the grace period readiness answers 503 on the open connection.
    let response = monitor
        .get(sidecar.admin("/health/ready"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!((status, body["reason"].as_str()), (503, Some("draining")));
    // (That no new connection is accepted is checked in tests/operations.rs, where no other
    // sidecar can start on the port meanwhile.)
    assert_eq!(sidecar.wait_exit(Duration::from_secs(15)).await, Some(0));
}

/// Scripts written for the earlier Python service read `GET /api/admin/config` flat:
/// `.rate_rpm` is the rate in force after any retreat. Those keys stay at the top level, beside
/// the full effective config, the base rate and the overrides.
#[tokio::test(flavor = "multi_thread")]
async fn the_config_answer_keeps_the_python_service_s_flat_keys() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 60\nbucket_capacity: 2").await;
    let python_fields = [
        "listen_host",
        "listen_port",
        "metrics_port",
        "upstream_url",
        "rate_rpm",
        "bucket_capacity",
        "request_timeout",
        "queue_max_size",
        "low_priority_timeout",
        "fallback_enabled_passthrough",
        "log_level",
    ];
    let answer = sidecar.admin_json("/api/admin/config").await;
    for field in python_fields {
        assert!(
            !answer[field].is_null(),
            "{field} missing at the top level: {answer}"
        );
    }
    assert_eq!(answer["rate_rpm"], 60.0);
    assert_eq!(answer["base_rpm"], 60.0);
    assert_eq!(answer["bucket_capacity"], 2);
    assert_eq!(answer["listen_port"], sidecar.port);
    assert!(answer["config"]["adaptive"].is_object(), "{answer}");
    // After an upstream 429 the rate in force is cut; `rate_rpm` says so, `base_rpm` keeps 60.
    mock.state.fail_next(1);
    assert_eq!(sidecar.chat().await, 200);
    let answer = sidecar.admin_json("/api/admin/config").await;
    assert_eq!(answer["rate_rpm"], 30.0, "{answer}");
    assert_eq!(answer["base_rpm"], 60.0);
    assert_eq!(answer["config"]["rate_rpm"], 60.0);
}

/// One chat request from `client_id`; its status.
async fn chat_as(sidecar: &Sidecar, client_id: &str) -> u16 {
    client()
        .post(sidecar.url("/v1/chat/completions"))
        .header("x-client-id", client_id)
        .json(&chat_body())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Reads `count` server-sent events: (event name, data).
async fn read_events(response: reqwest::Response, count: usize) -> Vec<(Option<String>, String)> {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event within 5 s")
            .expect("the stream stays open")
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .map(str::to_string);
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push((name, data.to_string()));
            }
        }
    }
    events
}

/// Two clients that sent 30 and 10 requests: `/status` lists them busiest first with their
/// shares of the tokens granted (75 % and 25 %) and their queue waits.
#[tokio::test(flavor = "multi_thread")]
async fn status_lists_the_clients_with_their_shares_of_the_quota() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 6000").await;
    for (id, count) in [("light", 10), ("heavy", 30)] {
        for _ in 0..count {
            assert_eq!(chat_as(&sidecar, id).await, 200);
        }
    }
    let status = sidecar.status().await;
    let clients = &status["clients"];
    assert_eq!(clients["requests"], 40, "{clients}");
    assert_eq!(clients["grants"], 40, "{clients}");
    assert_eq!(clients["tracked"], 2);
    assert_eq!(clients["tracked_max"], 256);
    assert!(clients.get("other").is_none(), "{clients}");
    let by_rate = clients["by_rate"].as_array().unwrap();
    let ids: Vec<&str> = by_rate.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["heavy", "light"], "{clients}");
    for (client, requests, share) in [(&by_rate[0], 30, 0.75), (&by_rate[1], 10, 0.25)] {
        assert_eq!(client["requests_per_minute"], requests, "{client}");
        assert_eq!(client["grants_per_minute"], requests, "{client}");
        let got = client["grant_share"].as_f64().unwrap();
        assert!((got - share).abs() < 0.02, "share {got}, expected {share}");
        assert!(client["requests_per_second"].as_f64().unwrap() > 0.0);
        assert!(client["queue_wait_mean_ms"].is_number(), "{client}");
        assert!(client["queue_wait_max_ms"].is_u64(), "{client}");
    }
    assert_eq!(clients["by_wait"].as_array().unwrap().len(), 2);
}

/// The dashboard's history: one sample a second from the sampler (not one per `/status`
/// request), at most 300, served by `GET /api/dashboard/history` and, when asked for, as the
/// first event of the stream; the plain stream stays as it was.
#[tokio::test(flavor = "multi_thread")]
async fn the_history_is_served_on_connect_one_sample_a_second() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 6000").await;
    let history = |sidecar: &Sidecar| {
        let url = sidecar.admin("/api/dashboard/history");
        async move { get_json(&url).await.1 }
    };
    let samples = |h: &Value| h["samples"].as_array().unwrap().clone();
    // Wait for a first sample, then send requests and ask for /status many times.
    let deadline = Instant::now() + Duration::from_secs(10);
    while samples(&history(&sidecar).await).is_empty() {
        assert!(Instant::now() < deadline, "no history sample within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = samples(&history(&sidecar).await).len();
    for _ in 0..5 {
        assert_eq!(chat_as(&sidecar, "agent").await, 200);
    }
    for _ in 0..30 {
        sidecar.status().await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let h = loop {
        let h = history(&sidecar).await;
        if samples(&h).len() >= before + 3 {
            break h;
        }
        assert!(Instant::now() < deadline, "the history does not grow: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(h["capacity"], 300);
    assert_eq!(h["interval_seconds"], 1);
    let list = samples(&h);
    assert!(list.len() <= 300);
    for pair in list.windows(2) {
        let gap = pair[1]["t"].as_f64().unwrap() - pair[0]["t"].as_f64().unwrap();
        assert!(
            (0.5..2.0).contains(&gap),
            "samples should be a second apart, whatever /status does: {h}"
        );
    }
    let granted: u64 = list.iter().map(|s| s["granted"].as_u64().unwrap()).sum();
    assert_eq!(
        granted, 5,
        "the grants of the samples add up to the requests: {h}"
    );
    let last = list.last().unwrap();
    assert_eq!(last["state"], "normal");
    assert_eq!(last["base_rpm"], 6000.0);
    for field in [
        "effective_rpm",
        "queue_depth",
        "requests_per_second",
        "upstream_429",
        "rejected",
    ] {
        assert!(last[field].is_number(), "{field} missing: {last}");
    }
    assert!(
        list.iter().any(|s| s["queue_wait_p50_ms"].is_number()),
        "{h}"
    );

    // With ?history=1 the stream starts with the history, then snapshots that carry the
    // newest sample.
    let response = client()
        .get(sidecar.admin("/api/dashboard/stream?history=1"))
        .send()
        .await
        .unwrap();
    let events = read_events(response, 3).await;
    assert_eq!(events[0].0.as_deref(), Some("history"));
    let first: Value = serde_json::from_str(&events[0].1).unwrap();
    let first = samples(&first);
    assert!(first.len() >= list.len() && first.len() <= 300);
    let newest = first.last().unwrap()["t"].as_f64().unwrap();
    for (name, data) in &events[1..] {
        assert_eq!(name, &None);
        let snapshot: Value = serde_json::from_str(data).unwrap();
        let t = snapshot["history_sample"]["t"].as_f64().unwrap();
        assert!(
            t >= newest,
            "a snapshot's sample is not older than the history"
        );
    }
    // Without it, the first event is a plain snapshot, as the Python service sent.
    let response = client()
        .get(sidecar.admin("/api/dashboard/stream"))
        .send()
        .await
        .unwrap();
    let events = read_events(response, 1).await;
    assert_eq!(events[0].0, None);
    let snapshot: Value = serde_json::from_str(&events[0].1).unwrap();
    assert!(snapshot["token_bucket"].is_object(), "{snapshot}");
}
