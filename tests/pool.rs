//! Key pools, per-model limits, authenticated clients and client deadlines, through the real
//! sidecar against the mock upstream:
//!
//! - two upstream keys with a quota each give twice the goodput of one, without a violation;
//! - a key the upstream answers 401 leaves the pool (shown in `/status` and the metrics) while
//!   the other key keeps serving, and is never used again;
//! - a model at its concurrency limit does not slow requests for another model;
//! - clients are weighted (2:1 grants) and their `X-Priority` is capped by `max_priority`;
//! - a request without a configured client key is refused with 401 and never reaches the
//!   upstream, and a client key is never forwarded upstream;
//! - a client's `X-Request-Timeout` / `X-Stainless-Timeout` bounds its wait in the queue, and a
//!   request whose deadline passed is never sent;
//! - a queued stream gets its headers and keep-alive comments before the upstream is reached.
//!
//! A first test checks the mock's own per-key quotas, revoked keys and model limits.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use support::{client, fnv1a64, LimitStyle, MockUpstream, Quota, Sidecar};

/// The timing-sensitive tests run one at a time: on a 2-core machine two of them at once would
/// measure the machine, not the sidecar.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Upstream key values (what the mock sees as `Authorization: Bearer …`).
const KEY_A: &str = "nvapi-pool-secret-a-5e1f0c";
const KEY_B: &str = "nvapi-pool-secret-b-93d7a2";

/// Client keys (what clients send to the sidecar).
const ALICE_KEY: &str = "sk-client-alice-0b6e44";
const BOB_KEY: &str = "sk-client-bob-7c21f9";
const CAROL_KEY: &str = "sk-client-carol-d4a813";

/// The environment every sidecar here gets: both pool keys and the client keys.
const ENV: &[(&str, &str)] = &[
    ("POOL_KEY_A", KEY_A),
    ("POOL_KEY_B", KEY_B),
    ("ALICE_KEY", ALICE_KEY),
    ("BOB_KEY", BOB_KEY),
    ("CAROL_KEY", CAROL_KEY),
];

/// `upstream:` with a pool of key `a` (`POOL_KEY_A`).
const ONE_KEY: &str = "upstream:\n  keys:\n    - {name: a, key_env: POOL_KEY_A}\n";

/// `upstream:` with a pool of keys `a` and `b`.
const TWO_KEYS: &str =
    "upstream:\n  keys:\n    - {name: a, key_env: POOL_KEY_A}\n    - {name: b, key_env: POOL_KEY_B}\n";

fn chat_url(sidecar: &Sidecar) -> String {
    sidecar.url("/v1/chat/completions")
}

/// A chat body for `model` whose content is `tag`, so that its checksum names it upstream.
fn tagged_body(model: &str, tag: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": tag}],
    }))
    .unwrap()
}

/// Extra request headers.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// Posts `body` as a chat completion, with `client_key` as bearer (if any) and `headers`.
async fn post(
    url: &str,
    client_key: Option<&str>,
    headers: Headers<'_>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(key) = client_key {
        request = request.bearer_auth(key);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// A small chat completion for model `mock`; its status.
async fn chat(url: &str, client_key: Option<&str>) -> u16 {
    post(url, client_key, &[], tagged_body("mock", "hi"))
        .await
        .status()
        .as_u16()
}

/// When each 200 of a closed loop arrived.
type Completions = Vec<Instant>;

/// `concurrency` closed-loop senders as `client_key`, each sending the next request as soon as
/// the last is answered, until `stop`. Returns the completion times of the 200s and every
/// other status.
async fn closed_loop(
    url: &str,
    client_key: Option<&str>,
    concurrency: usize,
    stop: Instant,
) -> (Completions, Vec<u16>) {
    let senders: Vec<_> = (0..concurrency)
        .map(|_| {
            let url = url.to_string();
            let key = client_key.map(str::to_string);
            tokio::spawn(async move {
                let (mut ok, mut other) = (Vec::new(), Vec::new());
                while Instant::now() < stop {
                    match chat(&url, key.as_deref()).await {
                        200 => ok.push(Instant::now()),
                        status => other.push(status),
                    }
                }
                (ok, other)
            })
        })
        .collect();
    let (mut ok, mut other) = (Vec::new(), Vec::new());
    for sender in senders {
        let (o, e) = sender.await.unwrap();
        ok.extend(o);
        other.extend(e);
    }
    (ok, other)
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the metric line named `name` carrying all of `labels` (in any order).
fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            let label_set = l.split('}').next().unwrap_or_default();
            labels
                .iter()
                .all(|(k, v)| label_set.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A pool key's metric on the default route.
async fn key_metric(sidecar: &Sidecar, name: &str, key: &str) -> Option<f64> {
    let text = sidecar.metrics_text().await;
    metric_value(&text, name, &[("route", "default"), ("key", key)])
}

/// The entry of `/status` `keys` named `name`.
async fn key_status(sidecar: &Sidecar, name: &str) -> Option<serde_json::Value> {
    let status = sidecar.status().await;
    status["keys"]
        .as_array()?
        .iter()
        .find(|k| k["name"] == name)
        .cloned()
}

/// The OpenAI error `code` of an answer's body.
async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The mock itself, without the sidecar: per-key quotas are counted per key, a revoked key
/// gets 401, and a limited model's excess gets the worker-capacity 429 (not a violation).
#[tokio::test(flavor = "multi_thread")]
async fn the_mock_keeps_quotas_per_key_revokes_keys_and_limits_models() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let url = format!("{}/v1/chat/completions", mock.url());
    mock.state
        .set_key_quota(KEY_A, Some(Quota::sliding(2, Duration::from_secs(60))));
    let send = |key: &'static str, model: &'static str| {
        let url = url.clone();
        async move {
            client()
                .post(&url)
                .bearer_auth(key)
                .json(&serde_json::json!({"model": model, "messages": []}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let a: Vec<u16> = [
        send(KEY_A, "m").await,
        send(KEY_A, "m").await,
        send(KEY_A, "m").await,
    ]
    .into();
    assert_eq!(a, [200, 200, 429], "key a has a quota of 2");
    assert_eq!(
        send(KEY_B, "m").await,
        200,
        "key b is under the (absent) global quota"
    );
    assert_eq!(mock.state.accepted_for_key(KEY_A), 2);
    assert_eq!(mock.state.violations_for_key(KEY_A), 1);
    assert_eq!(mock.state.violations_for_key(KEY_B), 0);

    mock.state.revoke_key(KEY_B);
    assert_eq!(send(KEY_B, "m").await, 401);
    assert_eq!(mock.state.violations(), 1, "a 401 is not a violation");

    mock.state
        .set_model_limit("slow", 1, Duration::from_millis(600));
    let started = Instant::now();
    let (first, second) = tokio::join!(send(CAROL_KEY, "slow"), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(CAROL_KEY, "slow").await
    });
    assert_eq!((first, second), (200, 429));
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(mock.state.worker_rejections(), 1);
    assert_eq!(mock.state.model_peak_in_flight("slow"), 1);
    assert_eq!(mock.state.model_in_flight("slow"), 0);
    assert_eq!(
        send(CAROL_KEY, "slow").await,
        200,
        "the place is free again"
    );
    let last = mock.state.arrivals().pop().unwrap();
    assert_eq!(last.model.as_deref(), Some("slow"));
    assert_eq!(last.key(), Some(CAROL_KEY));
}

/// Two keys with a hidden quota of 4 per 2 s each: the pool delivers about twice one key's
/// quota, and neither key is ever pushed past its own quota.
#[tokio::test(flavor = "multi_thread")]
async fn two_keys_give_twice_the_goodput_without_a_violation() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let quota = Quota::sliding(4, Duration::from_secs(2));
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    mock.state.set_key_quota(KEY_A, Some(quota));
    mock.state.set_key_quota(KEY_B, Some(quota));
    // Each key's rate is the top-level 120 per minute: exactly its quota, issued 5% below it
    // so that 2 s windows tolerate a noisy machine's jitter.
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!(
            "rate_rpm: 120\nrequest_timeout: 30\nadaptive:\n  window: 2\n  safety_margin: 0.05\n{TWO_KEYS}"
        ),
        ENV,
    )
    .await;
    let start = Instant::now();
    let run = Duration::from_secs(8);
    let (_, errors) = closed_loop(&chat_url(&sidecar), None, 8, start + run).await;

    let in_run = |key: &str| {
        mock.state
            .arrivals_for_key(key)
            .iter()
            .filter(|a| a.status == 200 && a.at < start + run)
            .count()
    };
    let (a, b) = (in_run(KEY_A), in_run(KEY_B));
    let one_key_quota = run.as_secs_f64() / quota.window.as_secs_f64() * quota.limit as f64;
    let goodput = (a + b) as f64 / (2.0 * one_key_quota);
    println!(
        "two keys: accepted a {a} + b {b} of 2 x {one_key_quota}, goodput {goodput:.3}, violations a {} b {}, client errors {errors:?}",
        mock.state.violations_for_key(KEY_A),
        mock.state.violations_for_key(KEY_B),
    );
    assert_eq!(
        mock.state.violations_for_key(KEY_A),
        0,
        "key a over its quota"
    );
    assert_eq!(
        mock.state.violations_for_key(KEY_B),
        0,
        "key b over its quota"
    );
    assert_eq!(mock.state.violations(), 0, "violations upstream");
    assert!(
        goodput >= 0.85,
        "the pool delivered {goodput:.3} of two keys' quota ({a} + {b}); one key alone could give 0.5"
    );
    for (name, accepted) in [("a", a), ("b", b)] {
        assert!(
            accepted as f64 >= 0.8 * one_key_quota,
            "key {name} carried only {accepted} of its {one_key_quota}"
        );
    }
    assert!(errors.is_empty(), "clients saw {errors:?}");
    assert!(
        mock.state.arrivals().iter().all(|a| a.key().is_some()),
        "every upstream request carries a pool key"
    );
    // The per-key counter counts what each key sent.
    for (name, value) in [("a", KEY_A), ("b", KEY_B)] {
        let sent = mock.state.arrivals_for_key(value).len() as f64;
        let counted = eventually(Duration::from_secs(3), || async {
            let counted = key_metric(&sidecar, "nvidia_sidecar_key_requests_total", name).await;
            counted.filter(|c| *c == sent)
        })
        .await;
        assert_eq!(
            counted,
            Some(sent),
            "key_requests_total for key {name} vs {sent} arrivals upstream:\n{}",
            sidecar.metrics_text().await
        );
    }
}

/// The upstream starts answering 401 to key a: at most the request that found out gets the
/// 401, key a leaves the pool (`/status`, `key_active`), key b serves everything after, and
/// key a is never tried again. No key value shows in `/status`, `/metrics` or the log.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_leaves_the_pool_and_the_other_keeps_serving() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // Each key one request per 500 ms: back-to-back requests alternate between the keys.
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!("rate_rpm: 120\nrequest_timeout: 30\n{TWO_KEYS}"),
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    for i in 0..4 {
        assert_eq!(
            chat(&url, None).await,
            200,
            "request {i} before the revocation"
        );
    }
    for key in [KEY_A, KEY_B] {
        assert!(
            !mock.state.arrivals_for_key(key).is_empty(),
            "back-to-back requests use both keys; the mock saw {:?}",
            mock.state
                .arrivals()
                .iter()
                .map(|a| a.key())
                .collect::<Vec<_>>()
        );
    }

    mock.state.revoke_key(KEY_A);
    let revoked_at = Instant::now();
    let mut statuses = Vec::new();
    let mut replays = Vec::new();
    for _ in 0..6 {
        let response = post(&url, None, &[], tagged_body("mock", "hi")).await;
        let replayed = response
            .headers()
            .get("x-sidecar-replays")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        statuses.push(response.status().as_u16());
        replays.push(replayed);
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "the key was refused, not the request: the request that found out goes again on the \
         other key, and every client gets 200: {statuses:?}"
    );
    assert_eq!(
        replays.iter().filter(|r| r.as_deref() == Some("1")).count(),
        1,
        "exactly the request that found the revoked key was sent again: {replays:?}"
    );
    assert!(
        sidecar
            .wait_for_access_line(|l| l.contains("replays=1") && l.contains("key=b"))
            .await
            .is_some(),
        "the access log names the key the replay went out on"
    );
    assert_eq!(
        sidecar
            .log_text()
            .await
            .matches("upstream key a was refused with 401")
            .count(),
        1,
        "the revocation is logged once"
    );

    let a = eventually(Duration::from_secs(5), || async {
        key_status(&sidecar, "a")
            .await
            .filter(|a| a["active"] == false)
    })
    .await;
    assert!(
        a.is_some(),
        "/status keys does not show a inactive: {}",
        sidecar.status().await["keys"]
    );
    let b = key_status(&sidecar, "b").await.expect("key b in /status");
    assert_eq!(b["active"], true, "{b}");
    for field in ["effective_rpm", "tokens", "state"] {
        assert!(!b[field].is_null(), "/status keys entry lacks {field}: {b}");
    }

    for i in 0..3 {
        assert_eq!(
            chat(&url, None).await,
            200,
            "request {i} after the pool shrank"
        );
    }
    let after: Vec<_> = mock
        .state
        .arrivals()
        .into_iter()
        .filter(|a| a.at >= revoked_at)
        .collect();
    let on_a = after.iter().filter(|a| a.key() == Some(KEY_A)).count();
    assert_eq!(
        on_a, 1,
        "exactly one request (the one that found out) went out on key a after its revocation"
    );
    assert_eq!(
        after.iter().filter(|a| a.status == 401).count(),
        1,
        "the one 401 the upstream gave was not passed on"
    );
    assert!(
        after
            .iter()
            .filter(|a| a.status == 200)
            .all(|a| a.key() == Some(KEY_B)),
        "the other requests went out on key b"
    );
    assert_eq!(
        after.iter().filter(|a| a.status == 200).count(),
        6 + 3,
        "every request after the revocation was served on key b"
    );

    let active = eventually(Duration::from_secs(3), || async {
        let a = key_metric(&sidecar, "nvidia_sidecar_key_active", "a").await;
        let b = key_metric(&sidecar, "nvidia_sidecar_key_active", "b").await;
        (a == Some(0.0) && b == Some(1.0)).then_some(())
    })
    .await;
    assert!(
        active.is_some(),
        "key_active should be a 0, b 1:\n{}",
        sidecar.metrics_text().await
    );

    let status = sidecar.admin_text("/status").await;
    let metrics = sidecar.metrics_text().await;
    let log = sidecar.log_text().await;
    for secret in [KEY_A, KEY_B] {
        assert!(!status.contains(secret), "a key value in /status");
        assert!(!metrics.contains(secret), "a key value in /metrics");
        assert!(!log.contains(secret), "a key value in the log");
    }
}

/// "slow-model" may have 2 requests in flight and takes 3 s each: of 6 sent at once, 4 wait
/// in the sidecar, and meanwhile "fast-model" requests pass them, each in under a second. The
/// upstream never sees a third slow-model request in flight.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_at_its_concurrency_limit_does_not_slow_another_model() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    mock.state
        .set_model_limit("slow-model", 2, Duration::from_secs(3));
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        "rate_rpm: 600\nrequest_timeout: 30\nmodels:\n  \"slow-model\": {max_concurrency: 2}\n",
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    let start = Instant::now();
    let slow: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = tagged_body("slow-model", &format!("slow {i}"));
                let status = post(&url, None, &[], body).await.status().as_u16();
                (status, start.elapsed())
            })
        })
        .collect();
    let slow_arrivals = || {
        mock.state
            .arrivals()
            .iter()
            .filter(|a| a.model.as_deref() == Some("slow-model"))
            .count()
    };
    let two_in = eventually(Duration::from_secs(5), || async {
        (slow_arrivals() >= 2).then_some(())
    })
    .await;
    assert!(
        two_in.is_some(),
        "the first two slow-model requests never went out"
    );

    for i in 0..5 {
        let sent = Instant::now();
        let response = post(
            &url,
            None,
            &[],
            tagged_body("fast-model", &format!("fast {i}")),
        )
        .await;
        let took = sent.elapsed();
        assert_eq!(response.status(), 200, "fast request {i}");
        assert!(
            took < Duration::from_secs(1),
            "fast-model request {i} took {took:?} while slow-model was at its limit"
        );
    }
    assert_eq!(
        slow_arrivals(),
        2,
        "slow-model requests beyond its limit wait in the sidecar while fast ones pass"
    );

    let mut finished = Vec::new();
    for s in slow {
        let (status, at) = s.await.unwrap();
        assert_eq!(status, 200, "a slow-model request failed");
        finished.push(at);
    }
    let last = finished.iter().max().unwrap();
    println!(
        "slow-model: finished at {finished:?}, peak in flight upstream {}",
        mock.state.model_peak_in_flight("slow-model")
    );
    assert_eq!(
        mock.state.model_peak_in_flight("slow-model"),
        2,
        "the upstream saw more than max_concurrency slow-model requests at once"
    );
    assert_eq!(
        mock.state.worker_rejections(),
        0,
        "worker-capacity 429s upstream"
    );
    assert_eq!(slow_arrivals(), 6);
    // Three rounds of two: a freed place is used again at once.
    assert!(
        *last < Duration::from_secs(13),
        "6 slow-model requests, 2 at a time, 3 s each, took {last:?}"
    );
}

/// Alice (weight 2) and Bob (weight 1) both keep 4 requests waiting: while both are
/// backlogged Alice gets twice Bob's grants, within 10%.
#[tokio::test(flavor = "multi_thread")]
async fn client_weights_share_the_grants_two_to_one() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!(
            "rate_rpm: 600\nrequest_timeout: 30\n{ONE_KEY}clients:\n  - {{id: alice, key_env: ALICE_KEY, weight: 2}}\n  - {{id: bob, key_env: BOB_KEY}}\n"
        ),
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    let start = Instant::now();
    let stop = start + Duration::from_secs(12);
    let (alice, bob) = tokio::join!(
        closed_loop(&url, Some(ALICE_KEY), 4, stop),
        closed_loop(&url, Some(BOB_KEY), 4, stop),
    );
    assert!(alice.1.is_empty(), "alice saw {:?}", alice.1);
    assert!(bob.1.is_empty(), "bob saw {:?}", bob.1);
    // Both are backlogged from the start to the stop; leave 2 s for the queue to fill.
    let from = start + Duration::from_secs(2);
    let count = |done: &Completions| done.iter().filter(|t| **t >= from && **t < stop).count();
    let (a, b) = (count(&alice.0), count(&bob.0));
    let ratio = a as f64 / b.max(1) as f64;
    println!("weights 2:1: alice {a}, bob {b}, ratio {ratio:.3}");
    assert!(
        a + b >= 60,
        "only {} grants in 10 s at 10 per second",
        a + b
    );
    assert!(
        (1.8..=2.2).contains(&ratio),
        "alice (weight 2) got {a} grants, bob (weight 1) {b}: ratio {ratio:.3}, want 2 ± 10%"
    );
}

/// `X-Priority: high` from Alice, whose `max_priority` is normal, waits as normal: it stays
/// behind Alice's own earlier normal request. The same header from Bob (no cap) jumps ahead of
/// everything waiting.
#[tokio::test(flavor = "multi_thread")]
async fn a_capped_clients_high_priority_waits_as_normal() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 2 s: the four queued requests go out 2 s apart, in grant order.
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!(
            "rate_rpm: 30\nrequest_timeout: 30\n{ONE_KEY}clients:\n  - {{id: alice, key_env: ALICE_KEY, max_priority: normal}}\n  - {{id: bob, key_env: BOB_KEY}}\n  - {{id: carol, key_env: CAROL_KEY}}\n"
        ),
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    // Carol takes the token in the bucket; everything after waits.
    assert_eq!(chat(&url, Some(CAROL_KEY)).await, 200);

    let queued = [
        ("alice-normal", ALICE_KEY, "normal"),
        ("alice-high", ALICE_KEY, "high"),
        ("bob-normal", BOB_KEY, "normal"),
        ("bob-high", BOB_KEY, "high"),
    ];
    let mut waiting = Vec::new();
    for (tag, key, priority) in queued {
        let url = url.clone();
        waiting.push(tokio::spawn(async move {
            let body = tagged_body("mock", tag);
            let response = post(&url, Some(key), &[("x-priority", priority)], body).await;
            (tag, response.status().as_u16())
        }));
        // The queue gauges are sampled once a second, too coarse to poll: space the arrivals
        // so that each is queued before the next (all four well within the 2 s to the token).
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for w in waiting {
        let (tag, status) = w.await.unwrap();
        assert_eq!(status, 200, "{tag}");
    }

    let order: Vec<&str> = mock
        .state
        .arrivals()
        .iter()
        .skip(1)
        .map(|a| {
            queued
                .iter()
                .find(|(tag, _, _)| fnv1a64(&tagged_body("mock", tag)) == a.body_checksum)
                .map_or("?", |(tag, _, _)| *tag)
        })
        .collect();
    println!("grant order after carol: {order:?}");
    assert!(
        !order.contains(&"?"),
        "unknown requests upstream: {order:?}"
    );
    let position = |tag: &str| order.iter().position(|t| *t == tag);
    assert_eq!(order.len(), 4, "{order:?}");
    assert_eq!(
        position("bob-high"),
        Some(0),
        "bob's high request jumps the queue: {order:?}"
    );
    assert!(
        position("alice-normal") < position("alice-high"),
        "alice's capped high request waited as normal, behind her earlier normal one: {order:?}"
    );
    let alice_lines: Vec<String> = sidecar
        .access_log()
        .await
        .into_iter()
        .filter(|l| l.contains("client=alice "))
        .collect();
    assert_eq!(alice_lines.len(), 2, "{alice_lines:?}");
    assert!(
        alice_lines.iter().all(|l| l.contains("priority=normal")),
        "{alice_lines:?}"
    );
}

/// A client's `rate_rpm` holds it below the shared rate, while another client still gets the
/// rest of the shared rate.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_rate_caps_that_client_below_the_shared_rate() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!(
            "rate_rpm: 600\nrequest_timeout: 30\n{ONE_KEY}clients:\n  - {{id: alice, key_env: ALICE_KEY, rate_rpm: 60}}\n  - {{id: bob, key_env: BOB_KEY}}\n"
        ),
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    let start = Instant::now();
    let run = Duration::from_secs(6);
    let (alice, bob) = tokio::join!(
        closed_loop(&url, Some(ALICE_KEY), 3, start + run),
        closed_loop(&url, Some(BOB_KEY), 3, start + run),
    );
    let within = |done: &Completions| done.iter().filter(|t| **t < start + run).count();
    let (a, b) = (within(&alice.0), within(&bob.0));
    println!("client rate: alice (60 rpm) {a}, bob {b} in {run:?} at 600 rpm shared");
    assert!(alice.1.is_empty(), "alice saw {:?}", alice.1);
    assert!(bob.1.is_empty(), "bob saw {:?}", bob.1);
    // 60 per minute for 6 s: 6, plus the first token and one of slack.
    assert!(
        (3..=8).contains(&a),
        "alice, capped at 60 per minute, got {a} in 6 s"
    );
    assert!(
        b >= 25,
        "bob got only {b} in 6 s of a 600 per minute rate alice cannot use"
    );
}

/// Without a configured client's key, or with a wrong one, the answer is 401
/// `invalid_client_key` and nothing reaches the upstream; `X-Client-Id` does not stand in
/// for a key.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_wrong_client_key_gets_401_and_nothing_goes_upstream() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!("rate_rpm: 600\n{ONE_KEY}clients:\n  - {{id: alice, key_env: ALICE_KEY}}\n"),
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    let attempts: [(&str, Option<&str>, Headers); 4] = [
        ("no key", None, &[]),
        (
            "no key, X-Client-Id: alice",
            None,
            &[("x-client-id", "alice")],
        ),
        ("a wrong key", Some("sk-not-a-client"), &[]),
        ("the upstream key", Some(KEY_A), &[]),
    ];
    for (what, key, headers) in attempts {
        let response = post(&url, key, headers, tagged_body("mock", "hi")).await;
        assert_eq!(response.status(), 401, "{what}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "invalid_client_key",
            "{what}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "{what}: {body}");
        assert!(body["error"]["type"].is_string(), "{what}: {body}");
    }
    assert!(
        mock.state.arrivals().is_empty(),
        "refused requests reached the upstream: {:?}",
        mock.state.arrivals()
    );
    // The right key passes.
    assert_eq!(chat(&url, Some(ALICE_KEY)).await, 200);
    assert_eq!(mock.state.arrivals().len(), 1);
}

/// A client's key identifies it (its `X-Client-Id` is ignored) and is never forwarded: the
/// upstream sees the pool key.
#[tokio::test(flavor = "multi_thread")]
async fn the_client_key_is_never_forwarded_upstream() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!(
            "rate_rpm: 600\n{ONE_KEY}clients:\n  - {{id: alice, key_env: ALICE_KEY}}\n  - {{id: bob, key_env: BOB_KEY}}\n"
        ),
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    let response = post(
        &url,
        Some(ALICE_KEY),
        &[("x-client-id", "mallory")],
        tagged_body("mock", "hi"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(chat(&url, Some(BOB_KEY)).await, 200);

    let arrivals = mock.state.arrivals();
    assert_eq!(arrivals.len(), 2);
    for a in &arrivals {
        assert_eq!(
            a.authorization.as_deref(),
            Some(format!("Bearer {KEY_A}").as_str()),
            "the upstream sees the pool key, not the client's"
        );
    }
    let alice = sidecar
        .wait_for_access_line(|l| l.contains("client=alice "))
        .await;
    assert!(alice.is_some(), "{:?}", sidecar.access_log().await);
    let bob = sidecar
        .wait_for_access_line(|l| l.contains("client=bob "))
        .await;
    assert!(bob.is_some(), "{:?}", sidecar.access_log().await);
    assert!(
        !sidecar
            .access_log()
            .await
            .iter()
            .any(|l| l.contains("client=mallory")),
        "X-Client-Id overrode the client key: {:?}",
        sidecar.access_log().await
    );
    let log = sidecar.log_text().await;
    for secret in [ALICE_KEY, BOB_KEY, KEY_A] {
        assert!(!log.contains(secret), "a key value in the log");
    }
}

/// One token every 5 s. The first request takes it; the second carries a client deadline of
/// `value` seconds in `header`, gives up with 429 `queue_timeout` long before the next token,
/// and is never sent: a third request gets that token, and the upstream sees two requests.
async fn a_client_deadline_bounds_the_wait(header: &str, value: &str) {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 12\nrequest_timeout: 30").await;
    let url = chat_url(&sidecar);
    let start = Instant::now();
    assert_eq!(chat(&url, None).await, 200);

    let sent = Instant::now();
    let response = post(
        &url,
        None,
        &[(header, value)],
        tagged_body("mock", "deadline"),
    )
    .await;
    let waited = sent.elapsed();
    assert_eq!(response.status(), 429, "{header}: {value}");
    assert_eq!(
        error_code(response).await,
        "queue_timeout",
        "{header}: {value}"
    );
    // Up to the client's deadline (an early answer, once the wait is known to be longer, is
    // fine too), but not the configured 30 s and not the next token's 5 s.
    assert!(
        waited < Duration::from_millis(3500),
        "{header}: {value} answered after {waited:?}"
    );

    assert_eq!(chat(&url, None).await, 200);
    let third = start.elapsed();
    let arrivals = mock.state.arrivals();
    assert_eq!(
        arrivals.len(),
        2,
        "{header}: the expired request reached the upstream"
    );
    let expired = fnv1a64(&tagged_body("mock", "deadline"));
    assert!(arrivals.iter().all(|a| a.body_checksum != expired));
    assert!(
        third < Duration::from_secs(8),
        "{header}: the third request got the second token at {third:?}: the expired one took it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn x_request_timeout_bounds_the_wait_and_an_expired_request_is_never_sent() {
    a_client_deadline_bounds_the_wait("x-request-timeout", "1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn x_stainless_timeout_bounds_the_wait_and_an_expired_request_is_never_sent() {
    a_client_deadline_bounds_the_wait("x-stainless-timeout", "1.5").await;
}

/// A client deadline longer than `request_timeout` is cut to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_deadline_longer_than_request_timeout_is_cut_to_it() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 10 s; the configured budget is 2 s.
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 6\nrequest_timeout: 2").await;
    let url = chat_url(&sidecar);
    assert_eq!(chat(&url, None).await, 200);
    let sent = Instant::now();
    let response = post(
        &url,
        None,
        &[("x-request-timeout", "60")],
        tagged_body("mock", "hi"),
    )
    .await;
    let waited = sent.elapsed();
    assert_eq!(response.status(), 429);
    assert_eq!(error_code(response).await, "queue_timeout");
    assert!(
        waited < Duration::from_secs(5),
        "a 60 s client deadline was not cut to the 2 s request_timeout: {waited:?}"
    );
    assert_eq!(mock.state.arrivals().len(), 1);
}

/// A stream that waits more than 3 s for its token gets `200 text/event-stream` headers
/// before the upstream is reached, then the upstream's events.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_stream_gets_its_headers_before_the_upstream_is_reached() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 5 s on the route.
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 12\nrequest_timeout: 30\nroutes:\n  - {path_prefix: /v1/chat, rate_rpm: 12, keepalive_while_queued: true}\n",
    )
    .await;
    let url = chat_url(&sidecar);
    let stream_body = || {
        serde_json::to_vec(&serde_json::json!({
            "model": "mock", "stream": true, "chunks": 3, "chunk_delay_ms": 50,
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .unwrap()
    };
    let first = post(&url, None, &[], stream_body()).await;
    assert_eq!(first.status(), 200);
    first.text().await.unwrap();

    let sent = Instant::now();
    let queued = post(&url, None, &[], stream_body()).await;
    let headers_after = sent.elapsed();
    let arrivals_at_headers = mock.state.arrivals().len();
    assert_eq!(queued.status(), 200);
    assert_eq!(
        queued.headers()["content-type"]
            .to_str()
            .unwrap()
            .split(';')
            .next(),
        Some("text/event-stream")
    );
    assert_eq!(
        arrivals_at_headers, 1,
        "the headers came only once the upstream was reached ({headers_after:?})"
    );
    assert!(
        headers_after >= Duration::from_millis(1500) && headers_after < Duration::from_millis(4500),
        "headers after {headers_after:?}: want about 2 s, before the token at 5 s"
    );
    let body = queued.text().await.unwrap();
    for token in ["chunk0", "chunk1", "chunk2", "[DONE]"] {
        assert!(body.contains(token), "{token} missing from {body:?}");
    }
    for line in body.lines().filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with(':') || line.starts_with("data: "),
            "not an SSE comment or event: {line:?}"
        );
    }
    assert_eq!(mock.state.arrivals().len(), 2);
}

/// A stream request body for the mock: three chunks 50 ms apart.
fn stream_body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "mock", "stream": true, "chunks": 3, "chunk_delay_ms": 50,
        "messages": [{"role": "user", "content": "hi"}],
    }))
    .unwrap()
}

/// The lines of a response body with the time each arrived after `sent`.
async fn timed_lines(response: reqwest::Response, sent: Instant) -> Vec<(Duration, String)> {
    use futures_util::StreamExt;
    let mut lines = Vec::new();
    let mut pending = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let line = line.trim_end().to_string();
            if !line.is_empty() {
                lines.push((sent.elapsed(), line));
            }
        }
    }
    lines
}

/// A stream that waits about 20 s gets a comment line at once and another 15 s later, then
/// the upstream's events, all on one stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_stream_gets_comments_every_15_s_while_it_waits_then_the_tokens() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 20 s.
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 3\nrequest_timeout: 60\nroutes:\n  - {path_prefix: /v1/chat, rate_rpm: 3, keepalive_while_queued: true}\n",
    )
    .await;
    let url = chat_url(&sidecar);
    assert_eq!(post(&url, None, &[], stream_body()).await.status(), 200);
    let sent = Instant::now();
    let queued = post(&url, None, &[], stream_body()).await;
    assert_eq!(queued.status(), 200);
    let lines = timed_lines(queued, sent).await;
    let comments: Vec<Duration> = lines
        .iter()
        .filter(|(_, l)| l.starts_with(':'))
        .map(|(at, _)| *at)
        .collect();
    let first_data = lines
        .iter()
        .find(|(_, l)| l.starts_with("data: "))
        .map(|(at, _)| *at)
        .expect("the upstream's events arrived");
    assert!(
        comments.len() >= 2,
        "a comment at the headers and one 15 s later: {lines:?}"
    );
    assert!(
        comments[1] - comments[0] >= Duration::from_secs(14)
            && comments[1] - comments[0] <= Duration::from_secs(17),
        "comments 15 s apart: {comments:?}"
    );
    assert!(
        comments.iter().all(|c| *c < first_data),
        "comments only while waiting: {lines:?}"
    );
    let text: String = lines.iter().map(|(_, l)| l.as_str()).collect();
    for token in ["chunk0", "chunk1", "chunk2", "[DONE]"] {
        assert!(text.contains(token), "{token} missing from {lines:?}");
    }
    assert_eq!(mock.state.arrivals().len(), 2);
}

/// Once a kept-alive stream has its 200, a failure ends it with an OpenAI-style error event:
/// the sidecar's own deadline, and an upstream error answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_stream_that_fails_ends_with_an_error_event() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 12\nrequest_timeout: 60\nadaptive: {max_replays: 0}\nroutes:\n  - {path_prefix: /v1/chat, rate_rpm: 12, keepalive_while_queued: true}\n",
    )
    .await;
    let url = chat_url(&sidecar);
    assert_eq!(post(&url, None, &[], stream_body()).await.status(), 200);

    // The client's deadline passes at 4 s, after the headers at 3 s, before the token at 5 s.
    let sent = Instant::now();
    let late = post(&url, None, &[("x-request-timeout", "4")], stream_body()).await;
    assert_eq!(late.status(), 200);
    let lines = timed_lines(late, sent).await;
    let last = &lines.last().expect("a body").1;
    assert!(lines.iter().any(|(_, l)| l.starts_with(':')), "{lines:?}");
    assert!(
        last.starts_with("data: ") && last.contains("\"code\":\"queue_timeout\""),
        "the stream ends with the queue timeout as an event: {lines:?}"
    );
    let error: serde_json::Value = serde_json::from_str(&last["data: ".len()..]).unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_exceeded");
    assert_eq!(
        mock.state.arrivals().len(),
        1,
        "the late request never went out"
    );

    // The next token (5 s) goes to a plain request; the stream waits for the one after (10 s)
    // and the upstream answers it with a 503 (not replayed: max_replays 0).
    assert_eq!(chat(&url, None).await, 200);
    mock.state.unavailable_next(1);
    let sent = Instant::now();
    let failed = post(&url, None, &[], stream_body()).await;
    assert_eq!(failed.status(), 200);
    let lines = timed_lines(failed, sent).await;
    let last = &lines.last().expect("a body").1;
    assert!(
        last.starts_with("data: ") && last.contains("upstream_503"),
        "the upstream's 503 arrives as an error event: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|(_, l)| l.starts_with(':') || l.starts_with("data: ")),
        "only SSE lines: {lines:?}"
    );
    assert!(
        lines.iter().any(|(_, l)| l.starts_with(':')),
        "it waited long enough for the headers: {lines:?}"
    );
    assert_eq!(mock.state.arrivals().len(), 3);
}

/// A key the upstream refused comes back into the pool when a reload gives it a new value
/// (a rotated key in its file), and passthrough requests meanwhile use a key still in the pool.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_key_comes_back_on_reload_and_passthrough_avoids_a_refused_key() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key-a");
    std::fs::write(&key_file, KEY_A).unwrap();
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        &format!(
            "rate_rpm: 600\nrequest_timeout: 30\nroutes:\n  - {{path_prefix: /v1/models, passthrough: true}}\nupstream:\n  keys:\n    - {{name: a, key_file: {}}}\n    - {{name: b, key_env: POOL_KEY_B}}\n",
            key_file.display()
        ),
        ENV,
    )
    .await;
    let url = chat_url(&sidecar);
    mock.state.revoke_key(KEY_A);
    // Requests until key a has been met (and refused) once.
    for _ in 0..4 {
        assert_eq!(chat(&url, None).await, 200);
    }
    let out = eventually(Duration::from_secs(5), || async {
        key_status(&sidecar, "a")
            .await
            .filter(|a| a["active"] == false)
    })
    .await;
    assert!(out.is_some(), "key a is out after its 401");
    // A passthrough request goes out on key b, the first key left.
    let models = client()
        .get(sidecar.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let last = mock.state.arrivals().last().cloned().unwrap();
    assert_eq!(last.key(), Some(KEY_B), "passthrough used a refused key");

    // The key is rotated in its file and the config reloaded.
    const NEW_KEY_A: &str = "nvapi-pool-secret-a-rotated-77aa";
    std::fs::write(&key_file, NEW_KEY_A).unwrap();
    sidecar.signal("HUP");
    let back = eventually(Duration::from_secs(5), || async {
        key_status(&sidecar, "a")
            .await
            .filter(|a| a["active"] == true)
    })
    .await;
    assert!(back.is_some(), "key a did not come back after the reload");
    for _ in 0..4 {
        assert_eq!(chat(&url, None).await, 200);
    }
    assert!(
        !mock.state.arrivals_for_key(NEW_KEY_A).is_empty(),
        "the rotated key a serves again"
    );
}

/// NVIDIA's "workers are busy" answer for a model lowers that model's concurrency limit and
/// leaves the key's rate alone: the model is full, the quota is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_model_lowers_its_concurrency_and_never_the_keys_rate() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\nrequest_timeout: 30\nadaptive: {max_replays: 0}\nmodels:\n  busy-model: {max_concurrency: 4}\n",
    )
    .await;
    let url = chat_url(&sidecar);
    mock.state.unavailable_next(1);
    let refused = post(&url, None, &[], tagged_body("busy-model", "1")).await;
    assert_eq!(refused.status(), 503, "passed on (max_replays: 0)");
    let _ = refused.text().await;
    let status = eventually(Duration::from_secs(5), || async {
        let status = sidecar.status().await;
        (status["models"][0]["capacity_errors"] == 1).then_some(status)
    })
    .await
    .expect("/status counts the model's capacity error");
    assert_eq!(status["models"][0]["pattern"], "busy-model");
    assert_eq!(status["models"][0]["concurrency_limit"], 2, "4 halved");
    assert_eq!(
        status["keys"][0]["effective_rpm"], 600.0,
        "the key's rate is not cut"
    );
    assert_eq!(status["retreat"]["state"], "normal");
    // The model keeps serving, within its lowered limit.
    assert_eq!(
        post(&url, None, &[], tagged_body("busy-model", "2"))
            .await
            .status(),
        200
    );
}
