//! What the sidecar learns of an upstream that limits each model on its own, against the mock
//! with per-(key, model) quotas, lockouts and capacity errors in several framings: a slow
//! model's 429s lower that model only, a locked model is answered at once while the others
//! flow, capacity answers lower a model's concurrency and never its key's rate, and the
//! learned state is visible and resettable. Time is scaled down (a 4 s window for NVIDIA's
//! minute) so that each test takes seconds.

#![allow(clippy::disallowed_methods)] // tests time real runs (see clippy.toml)

mod support;

use std::time::{Duration, Instant};

use support::{client, Framing, LimitStyle, MockUpstream, Quota, Sidecar};

/// The timing-sensitive tests run one at a time on this 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The controller's window at the scaled quota's (4 s), its steps scaled alike.
const SCALED: &str =
    "adaptive:\n  window: 4\n  quiet_period: 2\n  recover_interval: 0.5\n  probe_interval: 20";

/// Scaled further (a 2 s window) for the tests of stated limits, which climb window by window.
const SCALED_FAST: &str =
    "adaptive:\n  window: 2\n  quiet_period: 1\n  recover_interval: 0.25\n  probe_interval: 10";

fn body(model: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
    }))
    .unwrap()
}

/// One chat completion for `model` from `client_id`; its status, `Retry-After` and body.
async fn ask(sidecar: &Sidecar, client_id: &str, model: &str) -> (u16, Option<u64>, String) {
    ask_with(sidecar, client_id, model, None).await
}

async fn ask_with(
    sidecar: &Sidecar,
    client_id: &str,
    model: &str,
    timeout_s: Option<u64>,
) -> (u16, Option<u64>, String) {
    let mut request = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header("x-client-id", client_id)
        .header("content-type", "application/json")
        .body(body(model));
    if let Some(t) = timeout_s {
        request = request.header("x-request-timeout", t.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (status, retry_after, response.text().await.unwrap())
}

/// The lane of `model` on the first key in `/status`.
fn lane<'a>(status: &'a serde_json::Value, model: &str) -> Option<&'a serde_json::Value> {
    status["keys"][0]["models"]
        .as_array()?
        .iter()
        .find(|m| m["model"] == model)
}

/// A key quota of 20 per 4 s (300 rpm, NVIDIA's 40 per minute scaled 7.5×) and one model
/// at a quarter of it; four clients on each model for 20 s, nothing about models configured.
/// The slow model's 429s lower its lane only: the other model takes what it leaves, the
/// upstream sees a handful of 429s, no client sees one.
///
/// The mock's key quota is 22 per 4 s, a tenth above the sidecar's rate: on a loaded machine
/// requests paced exactly at the quota can reach the mock bunched, and a 429 the key then
/// meets is rightly the key's. With the headroom, a cut key can only mean that the slow
/// model's 429s were blamed on it.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_model_is_learned_and_the_other_model_takes_what_it_leaves() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let window = Duration::from_secs(4);
    let mock = MockUpstream::start_framed(
        Some(Quota::sliding(22, window)),
        LimitStyle::Nvidia,
        Framing::Split {
            delay: Duration::from_millis(20),
        },
    )
    .await;
    mock.state
        .set_model_quota("slow", Some(Quota::sliding(5, window)));
    let sidecar = Sidecar::start(
        &mock.url(),
        &format!("rate_rpm: 300\nrequest_timeout: 60\n{SCALED}"),
    )
    .await;
    let run = Duration::from_secs(20);
    let started = Instant::now();
    let url = sidecar.url("/v1/chat/completions");
    let (slow, fast) = tokio::join!(
        run_clients_at(url.clone(), "slow", 4, run),
        run_clients_at(url, "fast", 4, run)
    );
    let statuses: Vec<u16> = slow.into_iter().chain(fast).collect();
    let status = sidecar.status().await;
    let from = started + Duration::from_secs(8);
    let end = started + run;
    let accepted = mock.state.accepted_between(from, end);
    let slow = mock.state.accepted_of_model_between("slow", from, end);
    let grant = 20.0 * (end - from).as_secs_f64() / window.as_secs_f64();
    let upstream_429s = mock.state.violations();
    println!(
        "accepted {accepted} of {grant} in the last 12 s (slow {slow}); upstream 429s {upstream_429s} ({} by the model's quota); client statuses {:?}",
        mock.state.model_refusals("slow"),
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        accepted as f64 >= 0.85 * grant,
        "the key's quota went unused: {accepted} of {grant}"
    );
    assert!(upstream_429s <= 10, "{upstream_429s} upstream 429s");
    let key = &status["keys"][0];
    assert!(
        key["effective_rpm"].as_f64().unwrap() >= 250.0,
        "the key was cut for the model's 429s: {key}"
    );
    let slow_lane = lane(&status, "slow").expect("a lane for the slow model");
    assert_eq!(slow_lane["limiting"], true, "{slow_lane}");
    assert!(
        slow_lane["effective_rpm"].as_f64().unwrap() <= 80.0,
        "{slow_lane}"
    );
    assert!(slow_lane["last_429_seconds_ago"].is_number(), "{slow_lane}");
    // The same as gauges.
    let metrics = sidecar.metrics_text().await;
    assert!(
        metrics.contains(
            "nvidia_sidecar_lane_state{key=\"default\",model=\"slow\",route=\"default\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("nvidia_sidecar_learned_models{route=\"default\"} 2"));
    support::promtool_check(&metrics);
}

/// A model the upstream locks for five hours, with `Retry-After`: the request that met it
/// gets the upstream's answer (no replay can help), every later request of that model gets
/// the sidecar's 429 at once (`model_locked`, the model and the time named, `Retry-After`
/// of about five hours), and the upstream sees no more of them; the other model flows, and
/// the key is not paused.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_locked_for_hours_is_answered_at_once_and_the_others_flow() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        &format!("rate_rpm: 600\nrequest_timeout: 60\n{SCALED}"),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(ask(&sidecar, "a", "open").await.0, 200);
    }
    let five_hours = Duration::from_secs(5 * 3600);
    mock.state.lock_model("locked", five_hours, true);
    let (status, retry_after, _) = ask(&sidecar, "b", "locked").await;
    assert_eq!(
        status, 429,
        "the upstream's own 429 for the one that met it"
    );
    assert!(retry_after.unwrap() > 4 * 3600);
    let hits = mock.state.model_refusals("locked");
    for i in 0..5 {
        let started = Instant::now();
        let (status, retry_after, body) = ask(&sidecar, &format!("l{i}"), "locked").await;
        assert_eq!(status, 429, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered at once"
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "model_locked", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("locked") && message.contains("GMT"),
            "{message}"
        );
        let retry_after = retry_after.expect("a Retry-After");
        assert!(
            (5 * 3600 - 60..=5 * 3600 + 60).contains(&retry_after),
            "{retry_after}"
        );
    }
    assert_eq!(
        mock.state.model_refusals("locked"),
        hits,
        "no more requests of the locked model went upstream"
    );
    for _ in 0..3 {
        assert_eq!(
            ask(&sidecar, "a", "open").await.0,
            200,
            "the other model flows"
        );
    }
    let status = sidecar.status().await;
    assert_eq!(status["keys"][0]["state"], "normal", "{status}");
    assert_eq!(status["keys"][0]["pause_remaining_seconds"], 0.0);
    let locked = lane(&status, "locked").expect("the locked model's lane");
    assert!(
        locked["pause_remaining_seconds"].as_f64().unwrap() > 4.0 * 3600.0,
        "{locked}"
    );
    assert_eq!(
        sidecar
            .metric("nvidia_sidecar_requests_total{outcome=\"rejected_model_locked\",route=\"default\"}")
            .await,
        5.0
    );
}

/// The same lockout said only in the body ("try again in 5 hours", no `Retry-After`): the
/// sidecar decides on a 429 from its headers, so it replays it at first; once a replay could
/// not come before the client's deadline, the 429 is passed on, its body is read, and the
/// model is locked from then on. Until then the lane probes at growing spacing: the upstream
/// sees 1 + ⌈log₃(deadline ÷ first spacing)⌉ of its requests (four here), then none.
#[tokio::test(flavor = "multi_thread")]
async fn a_lockout_said_only_in_the_body_is_learned_when_a_refusal_is_passed_on() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        &format!("rate_rpm: 600\nrequest_timeout: 60\n{SCALED}"),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(ask(&sidecar, "a", "open").await.0, 200);
    }
    mock.state
        .lock_model("locked", Duration::from_secs(5 * 3600), false);
    let (status, _, body) = ask_with(&sidecar, "b", "locked", Some(3)).await;
    assert_eq!(status, 429, "{body}");
    let hits = mock.state.model_refusals("locked");
    assert!(
        hits <= 4,
        "{hits} requests of the locked model went upstream"
    );
    let (status, retry_after, body) = ask(&sidecar, "c", "locked").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("model_locked"), "{body}");
    assert!(retry_after.unwrap() > 4 * 3600, "{retry_after:?}");
    assert_eq!(mock.state.model_refusals("locked"), hits);
    assert_eq!(ask(&sidecar, "a", "open").await.0, 200);
}

/// NVIDIA's worker-capacity error as a 503, as a 429 (replayed from its headers, so charged
/// as a rate limit: to the model, while another model is accepted beside it), and as the
/// first event of a 200 stream: each lowers the model's concurrency or its lane, never the
/// key's rate, and the other model's requests keep going at the key's rate.
#[tokio::test(flavor = "multi_thread")]
async fn capacity_answers_stay_with_their_model_whatever_their_framing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        &format!("rate_rpm: 600\nrequest_timeout: 60\n{SCALED}"),
    )
    .await;
    // Traffic of another model beside it all along.
    let stop = Instant::now() + Duration::from_secs(6);
    let other = {
        let url = sidecar.url("/v1/chat/completions");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while Instant::now() < stop {
                let response = client()
                    .post(&url)
                    .header("x-client-id", "other")
                    .header("content-type", "application/json")
                    .body(body("other"))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    mock.state.worker_503_next(1);
    assert_eq!(ask(&sidecar, "b", "busy").await.0, 200, "a 503 is replayed");
    mock.state.worker_busy_next(1);
    assert_eq!(ask(&sidecar, "b", "busy").await.0, 200, "so is a 429");
    // The capacity error inside a 200 stream reaches the client as it came.
    mock.state.worker_in_stream_next(1);
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header("x-client-id", "b")
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(&serde_json::json!({
                "model": "busy", "stream": true,
                "messages": [{"role": "user", "content": "hi"}],
            }))
            .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("ResourceExhausted"));
    let statuses = other.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let status = sidecar.status().await;
    let key = &status["keys"][0];
    assert_eq!(key["state"], "normal", "{status}");
    assert_eq!(key["effective_rpm"], 600.0, "{key}");
    let busy = status["learned_models"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "busy")
        .expect("the busy model is learned");
    assert!(busy["capacity_errors"].as_u64().unwrap() >= 2, "{busy}");
    assert!(busy["concurrency_limit"].is_number(), "{busy}");
    assert!(
        sidecar
            .metric("nvidia_sidecar_upstream_refusals_total{reason=\"worker_capacity\"")
            .await
            >= 1.0
    );
}

/// What a lane learned can be reset through the admin API (same guard as every mutating
/// endpoint): the model's lane is back at its key's rate. Unknown names are a 404.
#[tokio::test(flavor = "multi_thread")]
async fn a_learned_lane_is_reset_through_the_admin_api() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        &format!("rate_rpm: 600\nrequest_timeout: 60\n{SCALED}"),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(ask(&sidecar, "a", "open").await.0, 200);
    }
    mock.state
        .lock_model("locked", Duration::from_secs(3600), true);
    assert_eq!(ask(&sidecar, "b", "locked").await.0, 429);
    let status = sidecar.status().await;
    assert!(
        lane(&status, "locked").unwrap()["limiting"] == true,
        "{status}"
    );

    let reset = |body: serde_json::Value, json: bool| {
        let url = sidecar.admin("/api/admin/limits/reset");
        async move {
            let request = client().post(url);
            let request = if json {
                request.json(&body)
            } else {
                request.body(body.to_string())
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (code, _) = reset(serde_json::json!({"model": "locked"}), false).await;
    assert_eq!(code, 415, "a body not declared JSON is refused");
    let (code, answer) = reset(serde_json::json!({"model": "nope"}), true).await;
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = reset(serde_json::json!({"key": "nope"}), true).await;
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = reset(serde_json::json!({"route": "nope"}), true).await;
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = reset(serde_json::json!({"model": "locked"}), true).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(
        answer["reset"][0], "model locked on key default",
        "{answer}"
    );
    let status = sidecar.status().await;
    let locked = lane(&status, "locked").unwrap();
    assert_eq!(locked["limiting"], false, "{locked}");
    assert_eq!(locked["state"], "normal");
}

/// `rate_rpm: auto` against an upstream that states its quota, in OpenAI's headers and in
/// Anthropic's: the route starts at 40 rpm and climbs to the stated limit (at most 1.5 times
/// what was accepted per window), no client sees a 429.
#[tokio::test(flavor = "multi_thread")]
async fn auto_takes_the_limit_the_upstream_states_in_either_style() {
    let _serial = ONE_AT_A_TIME.lock().await;
    for stating in [support::Stating::OpenAi, support::Stating::Anthropic] {
        let mock = MockUpstream::start(
            Some(Quota::sliding(15, Duration::from_secs(2))),
            LimitStyle::Nvidia,
        )
        .await;
        mock.state.state_limits(Some(stating), None);
        let sidecar = Sidecar::start(
            &mock.url(),
            &format!("rate_rpm: auto\nrequest_timeout: 60\n{SCALED_FAST}"),
        )
        .await;
        let config = sidecar.admin_json("/api/admin/config").await;
        assert_eq!(config["config"]["rate_rpm"], "auto", "{config}");
        let statuses = run_clients(&sidecar, "m", 4, Duration::from_secs(10)).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{stating:?}: {statuses:?}"
        );
        let status = sidecar.status().await;
        let key = &status["keys"][0];
        println!("{stating:?}: {key}");
        assert_eq!(key["stated_rpm"], 450.0, "{stating:?}: {key}");
        assert_eq!(key["ceiling_source"], "header", "{stating:?}: {key}");
        let base = key["base_rpm"].as_f64().unwrap();
        assert!(base > 160.0 && base <= 450.0, "{stating:?}: base {base}");
        assert!(
            mock.state.violations() <= 3,
            "{stating:?}: {}",
            mock.state.violations()
        );
    }
}

/// Hostile statements: a limit of 10¹² on an upstream that grants 300 rpm never lifts the
/// rate above 1.5 times what was accepted (one answer more counted); a zero changes nothing (negative and unreadable values
/// are dropped where they are read: `limiter::signals` tests them).
#[tokio::test(flavor = "multi_thread")]
async fn hostile_stated_limits_never_lift_the_rate_far_above_what_was_accepted() {
    let _serial = ONE_AT_A_TIME.lock().await;
    for value in ["1e12", "0"] {
        let mock = MockUpstream::start(
            Some(Quota::sliding(10, Duration::from_secs(2))),
            LimitStyle::Nvidia,
        )
        .await;
        mock.state
            .state_limits(Some(support::Stating::OpenAi), Some(value));
        let sidecar = Sidecar::start(
            &mock.url(),
            &format!("rate_rpm: auto\nrequest_timeout: 60\n{SCALED_FAST}"),
        )
        .await;
        let mut highest = 0.0f64;
        let stop = Instant::now() + Duration::from_secs(7);
        let clients = tokio::spawn({
            let url = sidecar.url("/v1/chat/completions");
            async move { run_clients_at(url, "m", 4, Duration::from_secs(7)).await }
        });
        while Instant::now() < stop {
            let status = sidecar.status().await;
            highest = highest.max(status["keys"][0]["effective_rpm"].as_f64().unwrap());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let statuses = clients.await.unwrap();
        println!("{value}: highest effective rate {highest}");
        assert!(statuses.iter().all(|s| *s == 200), "{value}: {statuses:?}");
        if value == "1e12" {
            assert!(
                highest <= 1.5 * (300.0 + 30.0) + 1.0,
                "{value}: climbed to {highest}"
            );
        } else {
            assert_eq!(highest, 40.0, "{value}: the statement changed the rate");
        }
    }
}

/// `n` closed-loop clients asking for `model` through `sidecar` for `run`; their statuses.
async fn run_clients(sidecar: &Sidecar, model: &str, n: usize, run: Duration) -> Vec<u16> {
    run_clients_at(sidecar.url("/v1/chat/completions"), model, n, run).await
}

async fn run_clients_at(url: String, model: &str, n: usize, run: Duration) -> Vec<u16> {
    let stop = Instant::now() + run;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (url, model) = (url.clone(), model.to_string());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < stop {
                    let response = client()
                        .post(&url)
                        .header("x-client-id", format!("{model}-{i}"))
                        .header("content-type", "application/json")
                        .body(body(&model))
                        .send()
                        .await
                        .unwrap();
                    statuses.push(response.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    statuses
}
