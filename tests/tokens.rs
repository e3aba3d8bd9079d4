//! Token budgets against the mock with a token quota: it counts a request's prompt as its
//! body's bytes over 4, per key over a sliding 60 s, and reports `usage` in its JSON answers and,
//! when asked with `stream_options.include_usage`, in the last event of a stream. Clients send a
//! mix of 24 KiB prompts, tiny ones and streams.

#![allow(clippy::disallowed_methods)] // tests time real runs (see clippy.toml)

mod support;

use std::time::{Duration, Instant};

use support::{client, prompt_tokens, LimitStyle, MockUpstream, Quota, Sidecar};

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
