//! Benchmark 8, the adaptive matrix: the real sidecar, shipped adaptive defaults, against mock
//! upstreams that vary what the sidecar does not choose — the quota's window (10 s, NVIDIA's
//! minute), its kind (sliding, fixed, token bucket), how a 429 is said (NVIDIA's bare 429,
//! `Retry-After`, `x-ratelimit-*`), how the answer is framed (one write, header and body apart)
//! and how the rate is set (right, 50% too high, quota halved mid-run). One factor changes at a
//! time from a base cell; all cells of a repeat run at once (each is light), so a repeat takes
//! as long as its longest cell (11 minutes). `MATRIX_ONLY=<text>` runs only the cells whose name
//! contains the text.
//!
//! Reported per cell, median over `REPEATS`: upstream 429s in the worst incident (429s less
//! than one quota window apart belong to one incident), incidents, all upstream 429s,
//! client-visible 429s, and goodput after convergence (accepted requests over the quota in the
//! last third of the run).

use std::time::{Duration, Instant};

use super::loadgen::{self, ClientSpec, LoadSpec};
use super::support::{Framing, LimitStyle, MockUpstream, Quota, QuotaKind, Sidecar};
use super::{median, repeats};

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
}

#[derive(Debug, Default)]
struct Measured {
    worst_incident: f64,
    incidents: f64,
    upstream_429s: f64,
    client_429s: f64,
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
    };
    let minute = Cell {
        name: "minute (40/60 s), sliding, NVIDIA 429, split, +50% (NVIDIA-scale, 150 s)",
        limit: 40,
        window: Duration::from_secs(60),
        run: Duration::from_secs(150),
        ..base
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
    ]
}

async fn run_cell(cell: Cell) -> Measured {
    let quota = Quota {
        limit: cell.limit,
        window: cell.window,
        kind: cell.kind,
    };
    let mock = MockUpstream::start_framed(Some(quota), cell.style, cell.framing).await;
    let quota_rpm = cell.limit as f64 * 60.0 / cell.window.as_secs_f64();
    let sidecar = Sidecar::start(
        &mock.url(),
        &format!("rate_rpm: {}", quota_rpm * cell.rate_factor),
    )
    .await;
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
    let report = loadgen::run(LoadSpec {
        url: sidecar.url("/v1/chat/completions"),
        clients: (0..10).map(|i| ClientSpec::new(format!("c{i}"))).collect(),
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
    let from = start + cell.run * 2 / 3;
    let limit = if cell.halve_at.is_some() {
        cell.limit / 2
    } else {
        cell.limit
    };
    let allowed = end.duration_since(from).as_secs_f64() / cell.window.as_secs_f64() * limit as f64;
    Measured {
        worst_incident: incidents.iter().copied().max().unwrap_or(0) as f64,
        incidents: incidents.len() as f64,
        upstream_429s: violations.len() as f64,
        client_429s: report.samples.iter().filter(|s| s.status == 429).count() as f64,
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
    println!("| cell | worst incident (upstream 429s) | incidents | upstream 429s | client 429s | goodput after convergence |");
    println!("|---|---|---|---|---|---|");
    for (cell, measured) in cells.iter().zip(&runs) {
        let pick = |f: fn(&Measured) -> f64| median(measured.iter().map(f).collect());
        println!(
            "| {} | {} | {} | {} | {} | {:.3} (runs {:?}) |",
            cell.name,
            pick(|m| m.worst_incident),
            pick(|m| m.incidents),
            pick(|m| m.upstream_429s),
            pick(|m| m.client_429s),
            pick(|m| m.goodput),
            measured
                .iter()
                .map(|m| (m.goodput * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
        );
    }
}
