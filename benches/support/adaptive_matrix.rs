//! Benchmark 8, the adaptive matrix: the real sidecar, shipped adaptive defaults, against mock
//! upstreams that vary what the sidecar does not choose — the quota's window (10 s, NVIDIA's
//! minute), its kind (sliding, fixed, token bucket), how a 429 is said (NVIDIA's bare 429,
//! `Retry-After`, `x-ratelimit-*`), how the answer is framed (one write, header and body apart)
//! and how the rate is set (right, 50% too high, quota halved mid-run). One factor changes at a
//! time from a base cell; all cells of a repeat run at once (each is light), so a repeat takes
//! as long as its longest cell (11 minutes). `MATRIX_ONLY=<text>` runs only the cells whose name
//! contains the text.
//!
//! Cells with models put clients on models with limits of their own (NVIDIA's slow models),
//! nothing about them configured; an idle cell lets the sidecar sit idle before the load; and
//! the baseline cells run the same load through a proxy that learns nothing and only backs a
//! key off for 10 s after each 429 (`backoff_proxy`), so the table shows what learning buys.
//!
//! Reported per cell, median over `REPEATS`: upstream 429s in the worst incident (429s less
//! than one quota window apart belong to one incident), incidents, all upstream 429s,
//! client-visible 429s, requests served over all the run against what the upstream grants in
//! it, and goodput after convergence (accepted requests over what the upstream grants, in the
//! last third of the run, or the cell's own last span).

use std::time::{Duration, Instant};

use super::backoff_proxy::BackoffProxy;
use super::loadgen::{self, ClientSpec, LoadSpec};
use super::support::{Framing, LimitStyle, MockUpstream, Quota, QuotaKind, Sidecar};
use super::{median, repeats};

/// Clients asking for one model, and the model's own quota on the key.
#[derive(Debug, Clone, Copy)]
struct BenchModel {
    name: &'static str,
    clients: usize,
    quota: Option<(usize, Duration)>,
}

/// NVIDIA's slow model: 10 per minute on a key of 40, five clients on it and five on another.
const QUARTER: &[BenchModel] = &[
    BenchModel {
        name: "slow",
        clients: 5,
        quota: Some((10, Duration::from_secs(60))),
    },
    BenchModel {
        name: "fast",
        clients: 5,
        quota: None,
    },
];

/// What stands between the clients and the upstream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Proxy {
    Sidecar,
    /// The baseline: no learning, a fixed back-off of the key after each 429.
    Backoff(Duration),
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    name: &'static str,
    limit: usize,
    window: Duration,
    kind: QuotaKind,
    style: LimitStyle,
    framing: Framing,
    /// Configured rate over the quota's rate.
    rate_factor: f64,
    /// The quota is halved this long into the run.
    halve_at: Option<Duration>,
    run: Duration,
    /// Clients by model; empty: ten clients on one model.
    models: &'static [BenchModel],
    /// Clients when `models` is empty.
    clients: usize,
    /// The proxy sits idle this long before the load starts.
    idle: Duration,
    /// Goodput over this last part of the run (`None`: the last third).
    measure_last: Option<Duration>,
    proxy: Proxy,
    /// Each request's prompt, about this many bytes (`None`: a short one).
    body_bytes: Option<usize>,
}

#[derive(Debug, Default)]
struct Measured {
    worst_incident: f64,
    incidents: f64,
    upstream_429s: f64,
    client_429s: f64,
    /// Accepted over the whole run, and what the upstream would grant in it.
    served: f64,
    granted: f64,
    goodput: f64,
}

const SPLIT: Framing = Framing::Split {
    delay: Duration::from_millis(30),
};

fn cells() -> Vec<Cell> {
    let base = Cell {
        name: "10 s, sliding, NVIDIA 429, split, +50%",
        limit: 30,
        window: Duration::from_secs(10),
        kind: QuotaKind::SlidingWindow,
        style: LimitStyle::Nvidia,
        framing: SPLIT,
        rate_factor: 1.5,
        halve_at: None,
        run: Duration::from_secs(300),
        models: &[],
        clients: 10,
        idle: Duration::ZERO,
        measure_last: None,
        proxy: Proxy::Sidecar,
        body_bytes: None,
    };
    let minute = Cell {
        name: "minute (40/60 s), sliding, NVIDIA 429, split, +50% (NVIDIA-scale, 150 s)",
        limit: 40,
        window: Duration::from_secs(60),
        run: Duration::from_secs(150),
        ..base
    };
    let models = Cell {
        name:
            "NVIDIA scale (40/60 s), one model at 10/60 s, 5+5 clients, nothing configured (150 s)",
        rate_factor: 1.0,
        models: QUARTER,
        ..minute
    };
    let idle = Cell {
        name: "idle 70 s then 6 loops, 20/30 s, sidecar at 60 rpm (6 min, last 3 measured)",
        limit: 20,
        window: Duration::from_secs(30),
        rate_factor: 1.5,
        clients: 6,
        idle: Duration::from_secs(70),
        run: Duration::from_secs(360),
        measure_last: Some(Duration::from_secs(180)),
        ..minute
    };
    vec![
        base,
        Cell {
            name: "10 s, sliding, NVIDIA 429, one write, +50%",
            framing: Framing::OneWrite,
            ..base
        },
        Cell {
            name: "10 s, fixed window, NVIDIA 429, split, +50%",
            kind: QuotaKind::FixedWindow,
            ..base
        },
        Cell {
            name: "10 s, token bucket, NVIDIA 429, split, +50%",
            kind: QuotaKind::TokenBucket,
            ..base
        },
        Cell {
            name: "10 s, sliding, Retry-After, split, +50%",
            style: LimitStyle::RetryAfter(2),
            ..base
        },
        Cell {
            name: "10 s, sliding, x-ratelimit-*, split, +50%",
            style: LimitStyle::RateLimitHeaders,
            ..base
        },
        Cell {
            name: "10 s, sliding, NVIDIA 429, split, right",
            rate_factor: 1.0,
            ..base
        },
        Cell {
            name: "10 s, sliding, NVIDIA 429, split, right then quota halved at 60 s",
            rate_factor: 1.0,
            halve_at: Some(Duration::from_secs(60)),
            run: Duration::from_secs(660),
            ..base
        },
        minute,
        Cell {
            name: "minute (40/60 s), sliding, NVIDIA 429, split, right (150 s)",
            rate_factor: 1.0,
            ..minute
        },
        Cell {
            name: "minute (40/60 s), sliding, NVIDIA 429, split, +50%, 200 KiB prompts (150 s)",
            body_bytes: Some(200 << 10),
            ..minute
        },
        Cell {
            name: "baseline (10 s back-off): minute (40/60 s), split, +50% (150 s)",
            proxy: Proxy::Backoff(BACKOFF),
            ..minute
        },
        models,
        Cell {
            name:
                "baseline (10 s back-off): NVIDIA scale, one model at 10/60 s, 5+5 clients (150 s)",
            proxy: Proxy::Backoff(BACKOFF),
            ..models
        },
        idle,
        Cell {
            name: "baseline (10 s back-off): idle 70 s then 6 loops, 20/30 s (6 min)",
            proxy: Proxy::Backoff(BACKOFF),
            ..idle
        },
    ]
}

/// How long the baseline backs a key off after each 429.
const BACKOFF: Duration = Duration::from_secs(10);

async fn run_cell(cell: Cell) -> Measured {
    let quota = Quota {
        limit: cell.limit,
        window: cell.window,
        kind: cell.kind,
    };
    let mock = MockUpstream::start_framed(Some(quota), cell.style, cell.framing).await;
    for m in cell.models {
        if let Some((limit, window)) = m.quota {
            mock.state
                .set_model_quota(m.name, Some(Quota::sliding(limit, window)));
        }
    }
    let quota_rpm = cell.limit as f64 * 60.0 / cell.window.as_secs_f64();
    let (sidecar, baseline) = match cell.proxy {
        Proxy::Sidecar => {
            let config = format!("rate_rpm: {}", quota_rpm * cell.rate_factor);
            (Some(Sidecar::start(&mock.url(), &config).await), None)
        }
        Proxy::Backoff(backoff) => (None, Some(BackoffProxy::start(&mock.url(), backoff).await)),
    };
    let url = match (&sidecar, &baseline) {
        (Some(s), _) => s.url("/v1/chat/completions"),
        (_, Some(b)) => b.url("/v1/chat/completions"),
        _ => unreachable!("one of them runs"),
    };
    tokio::time::sleep(cell.idle).await;
    let start = Instant::now();
    if let Some(at) = cell.halve_at {
        let state = mock.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            state.set_quota(Some(Quota {
                limit: quota.limit / 2,
                ..quota
            }));
        });
    }
    let clients: Vec<ClientSpec> = if cell.models.is_empty() {
        (0..cell.clients)
            .map(|i| ClientSpec {
                body_bytes: cell.body_bytes,
                ..ClientSpec::new(format!("c{i}"))
            })
            .collect()
    } else {
        cell.models
            .iter()
            .flat_map(|m| {
                (0..m.clients)
                    .map(move |i| ClientSpec::new(format!("{}-{i}", m.name)).model(m.name))
            })
            .collect()
    };
    let report = loadgen::run(LoadSpec {
        url,
        clients,
        duration: cell.run,
        think: Duration::ZERO,
        retry_429: false,
        give_up_after: Duration::from_secs(300),
    })
    .await;
    let end = start + cell.run;
    let violations: Vec<Instant> = mock
        .state
        .arrivals()
        .iter()
        .filter(|a| a.status == 429 && a.at < end)
        .map(|a| a.at)
        .collect();
    let mut incidents: Vec<usize> = Vec::new();
    let mut last: Option<Instant> = None;
    for t in &violations {
        if last.is_none_or(|l| t.duration_since(l) > cell.window) {
            incidents.push(0);
        }
        *incidents.last_mut().expect("pushed above") += 1;
        last = Some(*t);
    }
    let from = match cell.measure_last {
        Some(last) => end - last,
        None => start + cell.run * 2 / 3,
    };
    let limit = if cell.halve_at.is_some() {
        cell.limit / 2
    } else {
        cell.limit
    };
    // What the upstream grants per second: the key's rate, or less when every model has a
    // quota of its own below it.
    let key_rate = limit as f64 / cell.window.as_secs_f64();
    let models_rate: f64 = cell
        .models
        .iter()
        .map(|m| {
            m.quota
                .map_or(f64::INFINITY, |(l, w)| l as f64 / w.as_secs_f64())
        })
        .sum();
    let rate = if cell.models.is_empty() {
        key_rate
    } else {
        key_rate.min(models_rate)
    };
    let allowed = end.duration_since(from).as_secs_f64() * rate;
    Measured {
        worst_incident: incidents.iter().copied().max().unwrap_or(0) as f64,
        incidents: incidents.len() as f64,
        upstream_429s: violations.len() as f64,
        client_429s: report.samples.iter().filter(|s| s.status == 429).count() as f64,
        served: mock.state.accepted_between(start, end) as f64,
        granted: cell.run.as_secs_f64() * rate,
        goodput: mock.state.accepted_between(from, end) as f64 / allowed,
    }
}

pub async fn adaptive_matrix() {
    // `MATRIX_ONLY=halved` runs only the cells whose name contains that text.
    let only = std::env::var("MATRIX_ONLY").ok();
    let cells: Vec<Cell> = cells()
        .into_iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.name.contains(o)))
        .collect();
    let mut runs: Vec<Vec<Measured>> = (0..cells.len()).map(|_| Vec::new()).collect();
    for repeat in 0..repeats() {
        let started = Instant::now();
        let tasks: Vec<_> = cells.iter().map(|c| tokio::spawn(run_cell(*c))).collect();
        for (i, task) in tasks.into_iter().enumerate() {
            runs[i].push(task.await.expect("a cell runs to its end"));
        }
        eprintln!(
            "repeat {} of {} done in {:.0} s",
            repeat + 1,
            repeats(),
            started.elapsed().as_secs_f64()
        );
    }
    println!("| cell | worst incident (upstream 429s) | incidents | upstream 429s | client 429s | served / granted over the run | goodput after convergence |");
    println!("|---|---|---|---|---|---|---|");
    for (cell, measured) in cells.iter().zip(&runs) {
        let pick = |f: fn(&Measured) -> f64| median(measured.iter().map(f).collect());
        println!(
            "| {} | {} | {} | {} | {} | {} / {:.0} | {:.3} (runs {:?}) |",
            cell.name,
            pick(|m| m.worst_incident),
            pick(|m| m.incidents),
            pick(|m| m.upstream_429s),
            pick(|m| m.client_429s),
            pick(|m| m.served),
            pick(|m| m.granted),
            pick(|m| m.goodput),
            measured
                .iter()
                .map(|m| (m.goodput * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
        );
    }
}
