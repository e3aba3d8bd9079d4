//! Many concurrent clients against an upstream with a hidden strict quota, through the real
//! sidecar: the quota is used but never violated, and a rate set too high is learned.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::time::{Duration, Instant};

use support::{chat_body, client, LimitStyle, MockUpstream, Quota, Sidecar};

/// The load tests run one at a time: each measures timing-sensitive behaviour on a 2-core
/// machine, and two hammering at once would measure the machine, not the sidecar.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the clients saw.
struct Load {
    statuses: Vec<u16>,
}

/// `clients` closed-loop clients sending chat requests as fast as they are answered for `run`.
async fn closed_loop(url: String, clients: usize, run: Duration) -> Load {
    let http = client();
    let stop = Instant::now() + run;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (url, http) = (url.clone(), http.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < stop {
                    let response = http
                        .post(&url)
                        .header("x-client-id", format!("client-{i}"))
                        .json(&chat_body())
                        .send()
                        .await;
                    statuses.push(response.map_or(0, |r| r.status().as_u16()));
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    Load { statuses }
}

/// Queue waits (ms) from the access log, sorted.
async fn queue_waits(sidecar: &Sidecar) -> Vec<u64> {
    let mut waits: Vec<u64> = sidecar
        .access_log()
        .await
        .iter()
        .filter_map(|l| {
            l.split("queue_wait_ms=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    waits.sort_unstable();
    waits
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_right_uses_the_quota_without_a_single_violation() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let quota = Quota::sliding(20, Duration::from_secs(2));
    let mock = MockUpstream::start(Some(quota), LimitStyle::Nvidia).await;
    // 20 per 2 s = 600 per minute. A 2 s window tolerates only 2 s x margin of jitter between
    // a grant and the upstream's clock; a debug build on a shared 2-core machine needs 3%
    // (the shipped 1% is sized for NVIDIA's minute window: 600 ms).
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\nrequest_timeout: 30\nadaptive:\n  safety_margin: 0.03",
    )
    .await;
    let start = Instant::now();
    let run = Duration::from_secs(8);
    let load = closed_loop(sidecar.url("/v1/chat/completions"), 30, run).await;

    let violations = mock.state.violations();
    let accepted = mock.state.accepted_between(start, start + run);
    let quota_in_run = run.as_secs_f64() / quota.window.as_secs_f64() * quota.limit as f64;
    let goodput = accepted as f64 / quota_in_run;
    let client_errors = load.statuses.iter().filter(|s| **s != 200).count();
    let waits = queue_waits(&sidecar).await;
    println!(
        "configured right: goodput/quota {goodput:.3} ({accepted} of {quota_in_run}), upstream violations {violations}, client errors {client_errors} of {}, queue wait p50 {} ms p99 {} ms",
        load.statuses.len(),
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
    );
    assert_eq!(violations, 0, "the upstream saw requests beyond its quota");
    assert!(
        goodput >= 0.9,
        "goodput {goodput:.3} below 90% of the quota"
    );
    assert_eq!(client_errors, 0, "statuses: {:?}", load.statuses);
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_too_high_the_sidecar_retreats_and_converges() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let quota = Quota::sliding(20, Duration::from_secs(2));
    let mock = MockUpstream::start(Some(quota), LimitStyle::Nvidia).await;
    // 50% above the hidden quota. The controller measures over the quota's window.
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 900\nrequest_timeout: 30\nadaptive:\n  window: 2\n  quiet_period: 1\n  recover_interval: 0.5\n  probe_interval: 120\n  max_replays: 10",
    )
    .await;
    let start = Instant::now();
    let run = Duration::from_secs(16);
    let load = closed_loop(sidecar.url("/v1/chat/completions"), 30, run).await;

    let settled = start + Duration::from_secs(8);
    // Requests still in flight when the clients stop keep arriving; count only the run.
    let late_violations = mock
        .state
        .violations_between(settled, Instant::now() + Duration::from_secs(60));
    let late_accepted = mock.state.accepted_between(settled, start + run);
    let late_quota = (run.as_secs_f64() - 8.0) / quota.window.as_secs_f64() * quota.limit as f64;
    let client_429s = load.statuses.iter().filter(|s| **s == 429).count();
    let waits = queue_waits(&sidecar).await;
    println!(
        "configured 50% high: violations total {} / after 8 s {late_violations}, goodput/quota after 8 s {:.3}, client 429s {client_429s} of {}, queue wait p50 {} ms p99 {} ms",
        mock.state.violations(),
        late_accepted as f64 / late_quota,
        load.statuses.len(),
        percentile(&waits, 0.5),
        percentile(&waits, 0.99),
    );
    assert!(
        mock.state.violations() > 0,
        "the too-high rate must have provoked 429s at first"
    );
    assert_eq!(
        late_violations, 0,
        "violations did not stop after the retreat"
    );
    assert_eq!(
        client_429s, 0,
        "upstream 429s reached clients whose deadline allowed a replay"
    );
    assert!(
        late_accepted as f64 / late_quota >= 0.8,
        "goodput after convergence too low"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_greedy_client_does_not_starve_a_polite_one() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(
        &mock.url(),
        "rate_rpm: 600\nrequest_timeout: 60\nqueue_max_size: 200",
    )
    .await;
    let url = sidecar.url("/v1/chat/completions");
    let http = client();
    // 40 parallel requests from one client fill the queue first.
    let greedy: Vec<_> = (0..40)
        .map(|_| {
            let (url, http) = (url.clone(), http.clone());
            tokio::spawn(async move {
                http.post(&url)
                    .header("x-client-id", "greedy")
                    .json(&chat_body())
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let polite_started = Instant::now();
    let polite = http
        .post(&url)
        .header("x-client-id", "polite")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    let polite_wait = polite_started.elapsed();
    assert_eq!(polite.status(), 200);
    let greedy_done_before = mock.state.arrivals().len() - 1;
    // Round robin: the polite request is served within two grants (plus the one in hand), not
    // after the greedy client's 40.
    assert!(
        greedy_done_before < 6,
        "{greedy_done_before} requests were served before the polite one"
    );
    println!("polite request waited {polite_wait:?} behind 40 greedy ones");
    for g in greedy {
        assert_eq!(g.await.unwrap(), 200);
    }
}
