//! Three real sidecars sharing one quota through a real `redis-server`, all in front of one
//! mock upstream with a strict hidden quota: the quota is used and never exceeded, a 429 storm
//! seen by one sidecar slows all three, and a Redis outage falls back to each sidecar's share
//! and rejoins when Redis returns.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::{
    chat_body, client, require_tool, LimitStyle, MockUpstream, Quota, RedisServer, Sentinels,
    Sidecar,
};

/// Load tests run one at a time (see tests/quota.rs).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The quota every test hides in the mock: 20 requests in any 2 s (600 per minute).
fn quota() -> Quota {
    Quota::sliding(20, Duration::from_secs(2))
}

/// A sidecar on the shared quota in `redis`; `extra` adds YAML at the top level.
async fn shared_sidecar(upstream: &str, redis: &RedisServer, key: &str, extra: &str) -> Sidecar {
    // A 2 s window needs a wider margin on this machine than NVIDIA's minute (tests/quota.rs).
    Sidecar::start(
        upstream,
        &format!(
            "rate_rpm: 600\nrequest_timeout: 30\nqueue_max_size: 500\n{extra}\nshared_quota:\n  url: {}\n  key: {key}\n  timeout: 0.3\n",
            redis.url()
        ),
    )
    .await
}

const MARGIN: &str = "adaptive:\n  safety_margin: 0.03";
/// The same, and the upstream's window told to the controller (it sizes the fallback share).
const MARGIN_AND_WINDOW: &str = "adaptive:\n  safety_margin: 0.03\n  window: 2";

/// Starts closed-loop clients on every sidecar, sending until `stop`; the task yields the
/// statuses per sidecar.
fn closed_loop(
    sidecars: &[&Sidecar],
    clients: usize,
    stop: Instant,
) -> tokio::task::JoinHandle<Vec<Vec<u16>>> {
    let urls: Vec<String> = sidecars
        .iter()
        .map(|s| s.url("/v1/chat/completions"))
        .collect();
    tokio::spawn(async move {
        let http = client();
        let mut tasks = Vec::new();
        for (s, url) in urls.iter().enumerate() {
            for c in 0..clients {
                let (url, http) = (url.clone(), http.clone());
                tasks.push((
                    s,
                    tokio::spawn(async move {
                        let mut statuses = Vec::new();
                        while Instant::now() < stop {
                            let response = http
                                .post(&url)
                                .header("x-mock-client", format!("s{s}-c{c}"))
                                .header("x-client-id", format!("c{c}"))
                                .json(&chat_body())
                                .send()
                                .await;
                            statuses.push(response.map_or(0, |r| r.status().as_u16()));
                        }
                        statuses
                    }),
                ));
            }
        }
        let mut by_sidecar = vec![Vec::new(); urls.len()];
        for (s, task) in tasks {
            by_sidecar[s].extend(task.await.unwrap());
        }
        by_sidecar
    })
}

fn failures(statuses: &[Vec<u16>]) -> usize {
    statuses.iter().flatten().filter(|s| **s != 200).count()
}

/// Upstream arrivals accepted in `[from, to)`, by sidecar (`s0`, `s1`, …).
fn accepted_by_sidecar(mock: &MockUpstream, from: Instant, to: Instant) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for a in mock.state.arrivals() {
        if a.status == 200 && a.at >= from && a.at < to {
            let sidecar = a
                .client
                .as_deref()
                .and_then(|c| c.split('-').next())
                .unwrap_or("?")
                .to_string();
            *counts.entry(sidecar).or_insert(0) += 1;
        }
    }
    counts
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn unique_key(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// A Redis, a mock with the hidden quota, and three sidecars sharing it that have seen each
/// other; the mock has forgotten everything before the test's load.
async fn three_on_one_quota(test: &str, extra: &str) -> (RedisServer, MockUpstream, Vec<Sidecar>) {
    let redis = RedisServer::start();
    let mock = MockUpstream::start(Some(quota()), LimitStyle::Nvidia).await;
    let key = unique_key(test);
    let mut sidecars = Vec::new();
    for _ in 0..3 {
        sidecars.push(shared_sidecar(&mock.url(), &redis, &key, extra).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mock.state.reset();
    (redis, mock, sidecars)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_sidecars_share_one_quota_without_a_violation() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_redis, mock, sidecars) = three_on_one_quota("share", MARGIN).await;
    let quota = quota();
    let all: Vec<&Sidecar> = sidecars.iter().collect();

    let start = Instant::now();
    let run = Duration::from_secs(10);
    let statuses = closed_loop(&all, 8, start + run).await.unwrap();

    let violations = mock.state.violations();
    let accepted = mock.state.accepted_between(start, start + run);
    let quota_in_run = run.as_secs_f64() / quota.window.as_secs_f64() * quota.limit as f64;
    let goodput = accepted as f64 / quota_in_run;
    let shares = accepted_by_sidecar(&mock, start, start + run);
    let client_errors = failures(&statuses);
    let mut round_trips = 0.0;
    let mut admitted = 0.0;
    for s in &sidecars {
        let text = s.metrics_text().await;
        round_trips += metric(&text, "nvidia_sidecar_redis_calls_total");
        admitted += metric(&text, "nvidia_sidecar_requests_total{outcome=\"forwarded\"");
    }
    let status = sidecars[0].status().await;
    println!(
        "three sidecars, one quota: goodput/quota {goodput:.3} ({accepted} of {quota_in_run}), violations {violations}, client errors {client_errors}, accepted by sidecar {shares:?}, Redis round trips per admitted request {:.2} ({round_trips} / {admitted}), status {}",
        round_trips / admitted.max(1.0),
        status["shared_quota"]
    );
    assert_eq!(status["shared_quota"]["state"], "connected");
    assert_eq!(status["shared_quota"]["instances"], 3);
    assert_eq!(violations, 0, "the upstream saw requests beyond its quota");
    assert!(
        goodput >= 0.9,
        "goodput {goodput:.3} below 90% of the quota"
    );
    assert_eq!(client_errors, 0, "statuses: {statuses:?}");
    for s in ["s0", "s1", "s2"] {
        let got = shares.get(s).copied().unwrap_or(0);
        assert!(
            got as f64 >= accepted as f64 / 3.0 * 0.5,
            "sidecar {s} got {got} of {accepted}: {shares:?}"
        );
    }
}

/// Polls every sidecar's `/status` until `pred` holds for all of them; the time it took.
async fn until_all(
    sidecars: &[&Sidecar],
    limit: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let mut all = true;
        for s in sidecars {
            all &= pred(&s.status().await);
        }
        if all {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_storm_seen_by_one_sidecar_slows_all_three() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    // Only the first sidecar's upstream answers 429s; the other two never see one.
    let stormy = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let calm = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let key = unique_key("storm");
    let adaptive = "adaptive:\n  window: 2\n  quiet_period: 4\n  recover_interval: 1\n  recover_step: 0.25\n  max_replays: 10";
    let first = shared_sidecar(&stormy.url(), &redis, &key, adaptive).await;
    let mut others: Vec<Sidecar> = Vec::new();
    for _ in 0..2 {
        others.push(shared_sidecar(&calm.url(), &redis, &key, adaptive).await);
    }
    let all = [&first, &others[0], &others[1]];
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let start = Instant::now();
    let storm_at = start + Duration::from_secs(3);
    let end = start + Duration::from_secs(12);
    let load = closed_loop(&all, 4, end);
    tokio::time::sleep_until(storm_at.into()).await;
    stormy.state.fail_next(4);
    let slowed = until_all(&all[1..], Duration::from_secs(3), |s| {
        s["retreat"]["state"] == "retreat"
            && s["retreat"]["effective_rpm"]
                .as_f64()
                .is_some_and(|r| r < 600.0)
    })
    .await;
    let calm_status = others[0].status().await;
    // Recovery climbs back to the ceiling learned at the cut (the rate that drew the 429s,
    // less the headroom), one shared step at a time.
    let recovered = until_all(&all, Duration::from_secs(15), |s| {
        s["retreat"]["state"] != "retreat" && s["retreat"]["effective_rpm"].as_f64() >= Some(560.0)
    })
    .await;
    let failed = failures(&load.await.unwrap());
    // The recovery went through the shared state: a cut and steps, each a new version.
    let (shared_rate, version): (Option<f64>, Option<i64>) =
        redis::from_redis_value(&redis.command(&[
            "HMGET",
            &format!("{{{key}}}:default:control"),
            "rate",
            "version",
        ]))
        .unwrap();

    let rate = |from: Instant, to: Instant| {
        calm.state.accepted_between(from, to) as f64 / (to - from).as_secs_f64()
    };
    let before = rate(start + Duration::from_secs(1), storm_at);
    // After the slots leased before the cut (up to 1 s ahead), inside the 4 s quiet period.
    let after = rate(
        storm_at + Duration::from_millis(1500),
        storm_at + Duration::from_millis(3500),
    );
    println!(
        "429 storm at one sidecar: the other two in retreat after {slowed:?} (rate {} rpm), their upstream rate {before:.1}/s before and {after:.1}/s after, all recovered to the ceiling after {recovered:?}; shared rate in Redis {shared_rate:?} at version {version:?}; failed client requests {failed}; 429s seen by the calm upstream {}",
        calm_status["retreat"]["effective_rpm"],
        calm.state.violations()
    );
    assert!(
        stormy.state.violations() > 0,
        "the storm reached the first sidecar"
    );
    assert_eq!(
        calm.state.violations(),
        0,
        "the calm upstream never says 429"
    );
    slowed.expect("the two sidecars that saw no 429 did not retreat within 3 s");
    assert!(
        after < before * 0.8,
        "the calm sidecars' upstream rate did not drop: {before:.1}/s -> {after:.1}/s"
    );
    assert!(recovered.is_some(), "recovery is shared too");
    assert!(shared_rate.is_some_and(|r| r >= 560.0), "{shared_rate:?}");
    assert!(
        version.is_some_and(|v| v >= 3),
        "a cut and at least two recovery steps went through Redis: {version:?}"
    );
    assert_eq!(failed, 0, "the storm's 429s were replayed, not passed on");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_falls_back_to_the_local_share_and_rejoins() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let (mut redis, mock, sidecars) = three_on_one_quota("outage", MARGIN_AND_WINDOW).await;
    let all: Vec<&Sidecar> = sidecars.iter().collect();

    let start = Instant::now();
    let kill_at = start + Duration::from_secs(4);
    let restart_at = kill_at + Duration::from_secs(8);
    let end = restart_at + Duration::from_secs(6);
    let load = closed_loop(&all, 6, end);

    tokio::time::sleep_until(kill_at.into()).await;
    redis.kill();
    let degraded = until_all(&all, Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "degraded"
    })
    .await;
    let during = sidecars[0].status().await;
    let during_metrics = sidecars[0].metrics_text().await;
    tokio::time::sleep_until(restart_at.into()).await;
    redis.start_again();
    let rejoined = until_all(&all, Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "connected"
    })
    .await;
    let statuses = load.await.unwrap();
    let failed = failures(&statuses);

    // The share: a little under a third of the rate each (three were seen alive).
    let share = during["shared_quota"]["degraded_routes"]["default"]
        .as_f64()
        .unwrap_or(0.0);
    let outage_from = kill_at + Duration::from_secs(2);
    let outage = restart_at - outage_from;
    let per_sidecar = accepted_by_sidecar(&mock, outage_from, restart_at);
    let share_limit = outage.as_secs_f64() * 600.0 * share / 60.0;
    let outage_violations = mock.state.violations_between(outage_from, restart_at);
    let phases = [
        ("connected", start, kill_at),
        ("switching to the share", kill_at, outage_from),
        ("outage", outage_from, restart_at),
        ("rejoining", restart_at, restart_at + Duration::from_secs(2)),
        ("rejoined", restart_at + Duration::from_secs(2), end),
    ]
    .map(|(name, from, to)| format!("{name} {}", mock.state.violations_between(from, to)));
    println!("upstream 429s by phase: {}", phases.join(", "));
    let after_from = restart_at + Duration::from_secs(2);
    let after_violations = mock.state.violations_between(after_from, end);
    let after_accepted = mock.state.accepted_between(after_from, end);
    let after_quota = (end - after_from).as_secs_f64() / 2.0 * 20.0;
    let mut warnings: Vec<usize> = Vec::new();
    for s in &sidecars {
        warnings.push(s.log_text().await.matches("cannot be reached").count());
    }
    println!(
        "Redis outage: all three degraded after {degraded:?}, status {}; accepted per sidecar over {:.0} s of outage {per_sidecar:?} (share {share:.3} of the rate: {share_limit:.1} each), upstream 429s during the outage {outage_violations}; rejoined {rejoined:?} after the restart, then 429s {after_violations}, goodput/quota {:.3}; failed client requests {failed} of {}; fallback warnings per sidecar {warnings:?}",
        during["shared_quota"],
        outage.as_secs_f64(),
        after_accepted as f64 / after_quota,
        statuses.iter().flatten().count(),
    );
    assert!(degraded.is_some(), "the outage was not reported");
    assert!(share > 0.25 && share < 1.0 / 3.0, "share {share}");
    assert!(
        during_metrics.contains("nvidia_sidecar_shared_quota_degraded{route=\"default\"} 1"),
        "the outage shows in the metrics"
    );
    for s in ["s0", "s1", "s2"] {
        let got = per_sidecar.get(s).copied().unwrap_or(0) as f64;
        assert!(
            got <= share_limit + 1.0,
            "sidecar {s} took {got} in the outage, beyond its share of {share_limit:.1}"
        );
        assert!(got >= share_limit * 0.7, "sidecar {s} starved: {got}");
    }
    assert_eq!(failed, 0, "no request fails because of Redis");
    assert!(rejoined.is_some(), "the sidecars did not rejoin");
    assert_eq!(
        mock.state.violations(),
        0,
        "the upstream saw requests beyond its quota: {phases:?}"
    );
    assert!(after_accepted as f64 / after_quota >= 0.85);
    assert_eq!(
        warnings,
        vec![1, 1, 1],
        "one warning per outage, not per request"
    );
}

/// Sends `n` requests one after the other; their statuses and the slowest answer.
async fn sequential(sidecar: &Sidecar, n: usize) -> (Vec<u16>, Duration) {
    let http = client();
    let mut statuses = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let sent = Instant::now();
        let r = http
            .post(sidecar.url("/v1/chat/completions"))
            .json(&chat_body())
            .send()
            .await;
        slowest = slowest.max(sent.elapsed());
        statuses.push(r.map_or(0, |r| r.status().as_u16()));
    }
    (statuses, slowest)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_stops_answering_is_left_after_the_timeout_and_rejoined() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let key = unique_key("frozen");
    let sidecar = shared_sidecar(&mock.url(), &redis, &key, "").await;
    let (statuses, _) = sequential(&sidecar, 5).await;
    assert_eq!(statuses, vec![200; 5]);

    // Frozen: the connection stays open and nothing answers, so only the timeout tells.
    redis.signal("STOP");
    let load = tokio::spawn({
        let url = sidecar.url("/v1/chat/completions");
        async move {
            let http = client();
            let mut statuses = Vec::new();
            let mut slowest = Duration::ZERO;
            for _ in 0..10 {
                let sent = Instant::now();
                let r = http.post(&url).json(&chat_body()).send().await;
                slowest = slowest.max(sent.elapsed());
                statuses.push(r.map_or(0, |r| r.status().as_u16()));
            }
            (statuses, slowest)
        }
    });
    let degraded = until_all(&[&sidecar], Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "degraded"
    })
    .await;
    let (statuses, slowest) = load.await.unwrap();
    redis.signal("CONT");
    let rejoined = until_all(&[&sidecar], Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "connected"
    })
    .await;
    let metrics = sidecar.metrics_text().await;
    println!(
        "frozen Redis: degraded {degraded:?} after the freeze, slowest request meanwhile {slowest:?}, rejoined {rejoined:?} after it thawed; redis calls that timed out: {}",
        metric(&metrics, "nvidia_sidecar_redis_calls_total{result=\"timeout\"}")
    );
    assert_eq!(statuses, vec![200; 10], "no request fails because of Redis");
    assert!(degraded.is_some_and(|d| d < Duration::from_secs(3)));
    assert!(
        slowest < Duration::from_secs(3),
        "a request waited {slowest:?} for a frozen Redis"
    );
    assert!(rejoined.is_some());
    assert!(
        metric(
            &metrics,
            "nvidia_sidecar_redis_calls_total{result=\"timeout\"}"
        ) >= 1.0
    );
    assert!(metrics.contains("nvidia_sidecar_shared_quota_degraded{route=\"default\"} 0"));

    // Killed this time (every attempt is refused at once), and an upstream 429 moves the
    // controller meanwhile: what it would publish waits for Redis; the link does not call
    // Redis in a loop, it retries every 250 ms.
    let mut redis = redis;
    redis.kill();
    let before = metric(
        &sidecar.metrics_text().await,
        "nvidia_sidecar_redis_calls_total",
    );
    let started = Instant::now();
    mock.state.fail_next(1);
    let (statuses, _) = sequential(&sidecar, 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let took = started.elapsed();
    let calls = metric(
        &sidecar.metrics_text().await,
        "nvidia_sidecar_redis_calls_total",
    ) - before;
    let status = sidecar.status().await;
    println!(
        "killed Redis and a cut meanwhile: {calls} Redis calls in {took:?}, retreat state {}",
        status["retreat"]["state"]
    );
    assert_eq!(statuses, vec![200; 3]);
    assert_eq!(status["retreat"]["state"], "retreat", "the 429 was seen");
    assert!(
        calls <= took.as_secs_f64() * 4.0 + 4.0,
        "{calls} Redis calls in {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_from_the_start_a_sidecar_serves_on_its_share_or_fails_open() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    // A port nobody listens on.
    let url = format!("redis://127.0.0.1:{}", support::free_port());
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let on_share = Sidecar::start(
        &mock.url(),
        &format!("rate_rpm: 600\nshared_quota:\n  url: {url}\n  instances: 4\n  timeout: 0.2\n"),
    )
    .await;
    let fail_open = Sidecar::start(
        &mock.url(),
        &format!(
            "rate_rpm: 6\nfallback_enabled_passthrough: true\nshared_quota:\n  url: {url}\n  timeout: 0.2\n"
        ),
    )
    .await;
    let degraded = until_all(&[&on_share, &fail_open], Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "degraded"
    })
    .await;
    assert!(degraded.is_some(), "{}", on_share.status().await);

    // A quarter of 600 rpm (four sidecars configured) is 2.5 per second.
    let started = Instant::now();
    let (statuses, _) = sequential(&on_share, 6).await;
    let took = started.elapsed();
    let share = on_share.status().await["shared_quota"]["degraded_routes"]["default"].clone();
    // 6 rpm with fail-open: forwarded at once instead of one every 10 s.
    let started = Instant::now();
    let (open_statuses, _) = sequential(&fail_open, 5).await;
    let open_took = started.elapsed();
    let passthrough = fail_open.status().await["requests"]["passthrough"].clone();
    println!(
        "Redis down from the start: share {share}, 6 requests in {took:?}; fail-open: 5 requests in {open_took:?}, counted as passthrough {passthrough}"
    );
    assert_eq!(statuses, vec![200; 6]);
    assert_eq!(open_statuses, vec![200; 5]);
    assert!(
        share.as_f64().is_some_and(|s| s > 0.2 && s <= 0.25),
        "{share}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "6 requests at 2.5/s took only {took:?}"
    );
    assert!(open_took < Duration::from_secs(3), "{open_took:?}");
    assert_eq!(passthrough, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_behind_tls_with_a_password_from_the_environment() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    const PASSWORD: &str = "pw-4f1c9e2b";
    let identity = support::tls::TestIdentity::new();
    let redis = RedisServer::start_tls(&identity, PASSWORD);
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let config = |password_env: &str| {
        format!(
            "rate_rpm: 600\nshared_quota:\n  url: rediss://localhost:{}\n  ca_file: {{dir}}/ca.pem\n  password_env: {password_env}\n  key: {}\n",
            redis.port,
            unique_key("tls")
        )
    };
    let start = async |password_env: &str, password: &str| {
        // The CA file lives in the sidecar's own directory, written before it starts.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &identity.ca_pem).unwrap();
        let text = config(password_env).replace("{dir}", &dir.path().display().to_string());
        (
            Sidecar::start_with_env(&mock.url(), &text, &[(password_env, password)]).await,
            dir,
        )
    };
    let (right, _ca) = start("REDIS_PASSWORD", PASSWORD).await;
    let (wrong, _ca2) = start("REDIS_PASSWORD", "not-the-password").await;

    let connected = until_all(&[&right], Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "connected"
    })
    .await;
    let refused = until_all(&[&wrong], Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "degraded"
    })
    .await;
    let (statuses, _) = sequential(&right, 3).await;
    let status = right.status().await;
    let wrong_status = wrong.status().await;
    let view = right.admin_text("/api/admin/config").await;
    println!(
        "TLS and a password: {}; with a wrong password: {}",
        status["shared_quota"], wrong_status["shared_quota"]
    );
    assert!(connected.is_some(), "{}", right.log_text().await);
    assert_eq!(statuses, vec![200; 3]);
    assert!(status["shared_quota"]["slots_leased"].as_u64() >= Some(3));
    assert!(
        refused.is_some(),
        "a wrong password must not count as connected"
    );
    let reason = wrong_status["shared_quota"]["last_error"].to_string();
    assert!(
        reason.contains("authentication failed") || reason.contains("WRONGPASS"),
        "the operator is told why: {reason}"
    );
    for text in [
        right.log_text().await,
        wrong.log_text().await,
        status.to_string(),
        wrong_status.to_string(),
        view.clone(),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "the Redis password leaked: {text}"
        );
    }
    assert!(view.contains(r#""password":"***""#), "{view}");
}

/// Redis as teams run it: a primary, one replica and three Sentinels. The primary is killed
/// under load; the Sentinels promote the replica, and the sidecars, which asked the Sentinels
/// where the primary is, ride out the failover on their local shares and follow the new one.
#[tokio::test(flavor = "multi_thread")]
async fn a_sentinel_failover_under_load_loses_nothing_and_breaks_no_quota() {
    if !require_tool("redis-server") || !require_tool("redis-sentinel") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let sentinels = Sentinels::start(3, &primary);
    assert_eq!(sentinels.primary_port(), Some(primary.port));

    let mock = MockUpstream::start(Some(quota()), LimitStyle::Nvidia).await;
    let key = unique_key("sentinel");
    let mut sidecars: Vec<Sidecar> = Vec::new();
    for _ in 0..2 {
        sidecars.push(
            Sidecar::start(
                &mock.url(),
                &format!(
                    "rate_rpm: 600\nrequest_timeout: 30\nqueue_max_size: 500\n{MARGIN_AND_WINDOW}\nshared_quota:\n  sentinels:{}\n  key: {key}\n  timeout: 0.3\n",
                    sentinels.yaml_list()
                ),
            )
            .await,
        );
    }
    let all: Vec<&Sidecar> = sidecars.iter().collect();
    let joined = until_all(&all, Duration::from_secs(5), |s| {
        s["shared_quota"]["state"] == "connected" && s["shared_quota"]["instances"] == 2
    })
    .await;
    assert!(
        joined.is_some(),
        "the sidecars did not connect through the Sentinels"
    );
    mock.state.reset();

    let start = Instant::now();
    let kill_at = start + Duration::from_secs(4);
    let end = kill_at + Duration::from_secs(16);
    let load = closed_loop(&all, 6, end);
    tokio::time::sleep_until(kill_at.into()).await;
    primary.kill();
    let mut promoted = None;
    while Instant::now() < kill_at + Duration::from_secs(12) {
        if sentinels.primary_port() == Some(replica.port) {
            promoted = Some(kill_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let followed = until_all(&all, Duration::from_secs(8), |s| {
        s["shared_quota"]["state"] == "connected"
    })
    .await
    .map(|_| kill_at.elapsed());
    let statuses = load.await.unwrap();
    let failed = failures(&statuses);
    let violations = mock.state.violations();
    let after_from = kill_at + Duration::from_secs(12);
    let after_quota = (end - after_from).as_secs_f64() / 2.0 * 20.0;
    let after_goodput = mock.state.accepted_between(after_from, end) as f64 / after_quota;
    let instances_on_new_primary = replica.command(&["ZCARD", &format!("{{{key}}}:instances")]);
    let mut degraded_warnings: Vec<usize> = Vec::new();
    for s in &sidecars {
        degraded_warnings.push(s.log_text().await.matches("cannot be reached").count());
    }
    println!(
        "Sentinel failover: replica promoted {promoted:?} after the primary was killed, sidecars connected to it {followed:?} after; upstream 429s {violations}; failed client requests {failed} of {}; goodput/quota after the failover {after_goodput:.3}; fallback warnings per sidecar {degraded_warnings:?}",
        statuses.iter().flatten().count()
    );
    assert!(
        promoted.is_some(),
        "the Sentinels did not promote the replica"
    );
    assert!(
        followed.is_some(),
        "the sidecars did not follow the new primary"
    );
    assert_eq!(
        instances_on_new_primary,
        redis::Value::Int(2),
        "both sidecars lease from the new primary"
    );
    assert_eq!(violations, 0, "the upstream saw requests beyond its quota");
    assert_eq!(failed, 0, "client requests failed through the failover");
    assert!(
        after_goodput >= 0.8,
        "goodput after the failover {after_goodput:.3}"
    );
}

/// Two sidecars with the same pool of two keys, each key with its own quota at the upstream:
/// each key's bucket is shared through Redis, so together they use both quotas and break
/// neither.
#[tokio::test(flavor = "multi_thread")]
async fn two_sidecars_share_a_pool_of_two_keys_without_a_violation() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let (key_a, key_b) = ("nvapi-shared-pool-a", "nvapi-shared-pool-b");
    for key in [key_a, key_b] {
        mock.state.set_key_quota(key, Some(quota()));
    }
    let env = [("SHARED_POOL_A", key_a), ("SHARED_POOL_B", key_b)];
    let name = unique_key("pool");
    let mut sidecars: Vec<Sidecar> = Vec::new();
    for _ in 0..2 {
        sidecars.push(
            Sidecar::start_with_env(
                &mock.url(),
                &format!(
                    "rate_rpm: 600\nrequest_timeout: 30\nqueue_max_size: 500\n{MARGIN}\nupstream:\n  keys:\n    - {{name: a, key_env: SHARED_POOL_A}}\n    - {{name: b, key_env: SHARED_POOL_B}}\nshared_quota:\n  url: {}\n  key: {name}\n  timeout: 0.3\n",
                    redis.url()
                ),
                &env,
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mock.state.reset();
    let all: Vec<&Sidecar> = sidecars.iter().collect();
    let start = Instant::now();
    let run = Duration::from_secs(10);
    let statuses = closed_loop(&all, 8, start + run).await.unwrap();

    let quota = quota();
    let per_key = run.as_secs_f64() / quota.window.as_secs_f64() * quota.limit as f64;
    let accepted = mock.state.accepted_between(start, start + run);
    let by_key: Vec<usize> = [key_a, key_b]
        .iter()
        .map(|k| mock.state.accepted_for_key(k))
        .collect();
    let violations: Vec<usize> = [key_a, key_b]
        .iter()
        .map(|k| mock.state.violations_for_key(k))
        .collect();
    println!(
        "two sidecars, a pool of two keys: accepted {accepted} of {} ({:.3}), by key {by_key:?}, violations {violations:?}",
        2.0 * per_key,
        accepted as f64 / (2.0 * per_key)
    );
    assert_eq!(violations, [0, 0], "a key's quota was exceeded");
    assert_eq!(failures(&statuses), 0, "statuses: {statuses:?}");
    assert!(
        accepted as f64 >= 0.85 * 2.0 * per_key,
        "goodput {accepted} below 85% of two keys' quota {}",
        2.0 * per_key
    );
    for (key, got) in ["a", "b"].iter().zip(&by_key) {
        assert!(
            *got as f64 >= 0.8 * per_key,
            "key {key} served {got} of its {per_key}"
        );
    }
    let status = sidecars[0].status().await;
    assert_eq!(
        status["shared_quota"]["state"], "connected",
        "{}",
        status["shared_quota"]
    );
}

/// What one sidecar learns of a model reaches the others sharing its key: the upstream locks
/// a model for an hour at the first sidecar's upstream only; within a few lease round trips
/// the second sidecar answers that model's requests at once (`model_locked`) without sending
/// any upstream, while its other model flows and its key is not paused.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_locked_at_one_sidecar_is_locked_at_the_other() {
    if !require_tool("redis-server") {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let locking = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let calm = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let key = unique_key("model-lock");
    let first = shared_sidecar(&locking.url(), &redis, &key, MARGIN).await;
    let second = shared_sidecar(&calm.url(), &redis, &key, MARGIN).await;
    let ask = |sidecar: &Sidecar, model: &str| {
        let url = sidecar.url("/v1/chat/completions");
        let body =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        async move {
            let response = client()
                .post(url)
                .header("x-client-id", "c")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    for sidecar in [&first, &second] {
        assert_eq!(ask(sidecar, "open").await.0, 200);
    }
    locking
        .state
        .lock_model("locked", Duration::from_secs(3600), true);
    assert_eq!(ask(&first, "locked").await.0, 429);
    // Leases run about every heartbeat (5 s) while idle; keep the second sidecar busy so it
    // leases, and wait for the lock to reach it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        assert_eq!(ask(&second, "open").await.0, 200);
        let status = second.status().await;
        let locked = status["keys"][0]["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == "locked")
            .is_some_and(|m| m["pause_remaining_seconds"].as_f64() > Some(3000.0));
        if locked {
            break ask(&second, "locked").await;
        }
        assert!(
            Instant::now() < deadline,
            "the lock never reached the second sidecar: {status}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(answer.0, 429, "{}", answer.1);
    assert!(answer.1.contains("model_locked"), "{}", answer.1);
    assert_eq!(
        calm.state.model_refusals("locked"),
        0,
        "the second sidecar's upstream saw none"
    );
    assert!(
        calm.state
            .arrivals()
            .iter()
            .all(|a| a.model.as_deref() != Some("locked")),
        "nothing of the locked model went out from the second sidecar"
    );
    let status = second.status().await;
    assert_eq!(
        status["keys"][0]["pause_remaining_seconds"], 0.0,
        "{status}"
    );
    assert_eq!(ask(&second, "open").await.0, 200);
}
