//! Token budgets against the mock with a token quota: it counts a request's prompt as its
//! body's bytes over 4, per key over a sliding 60 s, and reports `usage` in its JSON answers and,
//! when asked with `stream_options.include_usage`, in the last event of a stream. Clients send a
//! mix of 24 KiB prompts, tiny ones and streams.

#![allow(clippy::disallowed_methods)] // tests time real runs (see clippy.toml)

mod support;

use std::time::{Duration, Instant};

use support::{client, prompt_tokens, Framing, LimitStyle, MockUpstream, Quota, Sidecar};

/// The timing-sensitive tests run one at a time on this 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chat_body(model: &str, content_bytes: usize, stream: bool) -> Vec<u8> {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "x".repeat(content_bytes)}],
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
        body["chunks"] = 2.into();
        body["chunk_delay_ms"] = 20.into();
    }
    serde_json::to_vec(&body).unwrap()
}

/// What one client saw: the statuses of its answers, and whether each stream's body carried
/// the usage it asked for.
#[derive(Default)]
struct Seen {
    statuses: Vec<u16>,
    streams_with_usage: usize,
}

/// `n` clients named `name-i`, each sending `body` one request after another until `stop`; a
/// request still waiting at `stop` is given up (the client leaves), not counted.
async fn closed_loop(url: &str, name: &str, n: usize, body: Vec<u8>, stop: Instant) -> Seen {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (url, body, id) = (url.to_string(), body.clone(), format!("{name}-{i}"));
            tokio::spawn(async move {
                let mut seen = Seen::default();
                while Instant::now() < stop {
                    let send = client()
                        .post(&url)
                        .header("x-client-id", &id)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send();
                    let left = stop.saturating_duration_since(Instant::now());
                    let Ok(Ok(response)) = tokio::time::timeout(left, send).await else {
                        break;
                    };
                    let status = response.status().as_u16();
                    let Ok(Ok(text)) = tokio::time::timeout(left, response.text()).await else {
                        break;
                    };
                    seen.statuses.push(status);
                    seen.streams_with_usage += usize::from(text.contains("\"usage\":{"));
                }
                seen
            })
        })
        .collect();
    let mut all = Seen::default();
    for t in tasks {
        let seen = t.await.unwrap();
        all.statuses.extend(seen.statuses);
        all.streams_with_usage += seen.streams_with_usage;
    }
    all
}

/// The upstream allows 60k prompt tokens a minute per key (and requests enough); the sidecar
/// is told `tpm: 60000`. Two clients send 24 KiB prompts (about 6k tokens), four send tiny
/// ones, one streams and asks for usage. In 25 s the upstream refuses nothing, nearly the
/// whole budget is used, the tiny clients are served beside the big ones, and the tokens the
/// sidecar counts are the upstream's.
#[tokio::test(flavor = "multi_thread")]
async fn a_configured_token_budget_uses_the_quota_without_a_429() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(
        Some(Quota::sliding(1_000, Duration::from_secs(60))),
        LimitStyle::Nvidia,
    )
    .await;
    mock.state.set_token_quota(60_000, Duration::from_secs(60));
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\ntpm: 60000\nrequest_timeout: 60\n",
    )
    .await;
    let url = sidecar.url("/v1/chat/completions");
    let started = Instant::now();
    let stop = started + Duration::from_secs(25);
    let big_body = chat_body("m", 24 * 1024, false);
    let (big, small, streams) = tokio::join!(
        closed_loop(&url, "big", 2, big_body.clone(), stop),
        closed_loop(&url, "small", 4, chat_body("m", 100, false), stop),
        closed_loop(&url, "stream", 1, chat_body("m", 100, true), stop),
    );
    // Whatever was in flight at the stop ends first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = mock.state.tokens_accepted_between(started, Instant::now());
    let counted = sidecar
        .metric("nvidia_sidecar_tokens_total{key=\"default\",kind=\"prompt\",route=\"default\"}")
        .await;
    let ok = |s: &Seen| s.statuses.iter().filter(|c| **c == 200).count();
    println!(
        "prompt tokens accepted {accepted} of 60000; counted {counted}; 200s: big {}, small {}, streams {} ({} with usage); upstream 429s {} ({} by tokens)",
        ok(&big),
        ok(&small),
        ok(&streams),
        streams.streams_with_usage,
        mock.state.violations(),
        mock.state.token_violations()
    );
    assert_eq!(
        mock.state.token_violations(),
        0,
        "the token quota was overrun"
    );
    assert_eq!(mock.state.violations(), 0);
    for seen in [&big, &small, &streams] {
        assert!(
            seen.statuses.iter().all(|s| *s == 200),
            "{:?}",
            seen.statuses
        );
    }
    assert!(
        accepted as f64 >= 0.9 * 60_000.0,
        "the token budget went unused: {accepted} of 60000"
    );
    assert!(ok(&big) >= 6, "the big clients starved: {}", ok(&big));
    assert!(
        ok(&small) >= 4 * ok(&big) / 2,
        "the tiny clients waited behind the big ones: {} beside {}",
        ok(&small),
        ok(&big)
    );
    assert!(ok(&streams) >= 3 && streams.streams_with_usage == ok(&streams));
    assert!(
        counted <= accepted as f64 && counted >= 0.9 * accepted as f64,
        "the sidecar counted {counted} prompt tokens, the upstream {accepted}"
    );
    let budget = &sidecar.status().await["keys"][0]["token_budget"];
    assert_eq!(
        (budget["tpm"].as_u64(), budget["source"].as_str()),
        (Some(60_000), Some("config")),
        "{budget}"
    );
    let log = sidecar.access_log().await;
    assert!(
        log.iter().any(|l| l.contains(&format!(
            "prompt_tokens={} completion_tokens=2",
            prompt_tokens(big_body.len())
        ))),
        "no access line with the upstream's count"
    );
}

/// A request estimated at more than a whole token budget is answered 400 at once, naming the
/// limit, and never reaches the upstream: a long prompt, or a short one that allows a long
/// completion. One that fits goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_larger_than_the_budget_is_told_at_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start_with_env(
        &mock.url(),
        "rate_rpm: 600\nupstream:\n  keys:\n    - {name: a, key_env: TOKENS_KEY, tpm: 20000}\n",
        &[("TOKENS_KEY", "tokens-key-0001")],
    )
    .await;
    let url = sidecar.url("/v1/chat/completions");
    let post = |body: Vec<u8>| {
        client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let mut long_completion: serde_json::Value =
        serde_json::from_slice(&chat_body("m", 100, false)).unwrap();
    long_completion["max_tokens"] = 25_000.into();
    for body in [
        chat_body("m", 90_000, false),
        serde_json::to_vec(&long_completion).unwrap(),
    ] {
        let asked = Instant::now();
        let response = post(body).await.unwrap();
        let took = asked.elapsed();
        assert_eq!(response.status(), 400);
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "request_too_large", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("20000 tokens per minute"), "{message}");
        assert!(took < Duration::from_secs(2), "told after {took:?}");
    }
    assert!(mock.state.arrivals().is_empty(), "it reached the upstream");
    assert_eq!(
        post(chat_body("m", 1_000, false)).await.unwrap().status(),
        200
    );
    let refused = sidecar
        .metric("nvidia_sidecar_requests_total{outcome=\"rejected_too_large\",route=\"default\"}")
        .await;
    assert_eq!(refused, 2.0);
    let status = sidecar.status().await;
    assert_eq!(status["errors"]["too_large"], 2, "{}", status["errors"]);
}

/// What a run of `big_and_tiny` saw.
struct MixRun {
    big: Seen,
    small: Seen,
    /// Prompt tokens the upstream accepted.
    accepted: u64,
    /// `/status` at the end.
    status: serde_json::Value,
}

/// Two clients of 24 KiB prompts and three of tiny ones for 20 s, told nothing about tokens.
async fn big_and_tiny(sidecar: &Sidecar, mock: &MockUpstream) -> MixRun {
    let url = sidecar.url("/v1/chat/completions");
    let started = Instant::now();
    let stop = started + Duration::from_secs(20);
    let (big, small) = tokio::join!(
        closed_loop(&url, "big", 2, chat_body("m", 24 * 1024, false), stop),
        closed_loop(&url, "small", 3, chat_body("m", 100, false), stop),
    );
    // Whatever was in flight at the stop ends first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    MixRun {
        big,
        small,
        accepted: mock.state.tokens_accepted_between(started, Instant::now()),
        status: sidecar.status().await,
    }
}

/// The upstream states its token quota in OpenAI's headers (30k a minute per key) and the
/// sidecar is told nothing about tokens. The first answers teach it the budget and what is
/// spent: in 20 s of 24 KiB prompts and tiny ones it meets at most one token 429, uses the
/// budget, and never cuts the key's request rate for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stated_token_limit_is_learned_without_cutting_the_request_rate() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    mock.state.set_token_quota(30_000, Duration::from_secs(60));
    mock.state.state_tokens();
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600\nrequest_timeout: 60\n").await;
    let MixRun {
        big,
        small,
        accepted,
        status,
    } = big_and_tiny(&sidecar, &mock).await;
    let key = &status["keys"][0];
    println!(
        "prompt tokens accepted {accepted} of 30000; token 429s {}; 200s big {}, small {}; key {key}",
        mock.state.token_violations(),
        big.statuses.len(),
        small.statuses.len()
    );
    assert!(
        mock.state.token_violations() <= 1,
        "{} token 429s",
        mock.state.token_violations()
    );
    assert!(big
        .statuses
        .iter()
        .chain(&small.statuses)
        .all(|s| *s == 200));
    assert!(accepted as f64 >= 0.85 * 30_000.0, "{accepted} of 30000");
    assert!(
        key["effective_rpm"].as_f64().unwrap() >= 590.0,
        "the request rate was cut for a token limit: {key}"
    );
    assert!(small.statuses.len() >= 20, "{}", small.statuses.len());
    let budget = &key["token_budget"];
    assert_eq!(
        (budget["tpm"].as_u64(), budget["source"].as_str()),
        (Some(30_000), Some("header")),
        "{budget}"
    );
    assert!(budget["used"].as_u64().unwrap() >= 25_000, "{budget}");
}

/// NVIDIA's way: a token quota (30k prompt tokens a minute per key) that no header states, and
/// its bare 429. Told nothing about tokens, the sidecar learns a budget from the 429s that
/// come with 24 KiB prompts and not with tiny ones: a few upstream 429s, none reaching a
/// client, the key's request rate kept, the tiny clients served throughout.
#[tokio::test(flavor = "multi_thread")]
async fn an_unstated_token_limit_is_learned_from_its_429s() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    mock.state.set_token_quota(30_000, Duration::from_secs(60));
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600\nrequest_timeout: 60\n").await;
    let MixRun {
        big,
        small,
        accepted,
        status,
    } = big_and_tiny(&sidecar, &mock).await;
    let key = &status["keys"][0];
    let refused = mock.state.token_violations();
    println!(
        "prompt tokens accepted {accepted} of 30000; token 429s {refused}; 200s big {}, small {}; budget {}; rate {}",
        big.statuses.len(),
        small.statuses.len(),
        key["token_budget"],
        key["effective_rpm"]
    );
    assert!((1..=4).contains(&refused), "{refused} token 429s");
    assert!(big
        .statuses
        .iter()
        .chain(&small.statuses)
        .all(|s| *s == 200));
    assert!(accepted as f64 >= 0.8 * 30_000.0, "{accepted} of 30000");
    assert!(
        key["effective_rpm"].as_f64().unwrap() >= 590.0,
        "the request rate was cut for a token limit: {key}"
    );
    assert_eq!(key["token_budget"]["source"], "learned", "{key}");
    assert!(small.statuses.len() >= 20, "{}", small.statuses.len());
    let token_refusals = sidecar
        .metric("nvidia_sidecar_upstream_refusals_total{reason=\"token_limit\",route=\"default\"}")
        .await;
    assert!(
        token_refusals >= 1.0,
        "the 429s were not counted as the token limit's"
    );
}

/// The upstream's `usage` is read however its answer is framed: the head and the body in
/// separate writes, or a chunked body in one or two chunks. What the sidecar counts is what
/// the upstream counted, for prompts from a few bytes to 200 KiB.
#[tokio::test(flavor = "multi_thread")]
async fn usage_is_read_whatever_the_framing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    for framing in [
        Framing::Split {
            delay: Duration::from_millis(20),
        },
        Framing::Chunked {
            delay: Duration::from_millis(20),
        },
    ] {
        let mock = MockUpstream::start_framed(None, LimitStyle::Nvidia, framing).await;
        let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 6000\ntpm: 1000000\n").await;
        let url = sidecar.url("/v1/chat/completions");
        for size in [10, 3_000, 48 * 1024, 200 * 1024] {
            let response = client()
                .post(&url)
                .header("content-type", "application/json")
                .body(chat_body("m", size, false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{framing:?}");
            response.text().await.unwrap();
        }
        let accepted = mock
            .state
            .tokens_accepted_between(mock.state.started(), Instant::now());
        let mut counted = 0.0;
        for _ in 0..50 {
            counted = sidecar
                .metric("nvidia_sidecar_tokens_total{key=\"default\",kind=\"prompt\",route=\"default\"}")
                .await;
            if counted as u64 == accepted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(counted as u64, accepted, "{framing:?}");
        let budget = &sidecar.status().await["keys"][0]["token_budget"];
        assert_eq!(
            budget["used"].as_u64(),
            Some(accepted + 4 * 2),
            "{framing:?}: {budget}"
        );
    }
}
