//! The shipped defaults across the simulated matrix (see `simulation`): windows short and
//! long, three quota kinds, with and without `Retry-After`, the rate set right, 50% too high,
//! the quota halved mid-run, models with limits of their own, an idle stretch before a burst,
//! and a model locked for hours. Every incident costs at most 3 upstream 429s, no 429 reaches
//! a client, and after convergence (the last third of the run) at least 95% of what the
//! upstream really grants is used; set right, nothing is violated.
//!
//! `SIM_VARIANT` (e.g. `decrease=0.7,headroom=0.02`), `SIM_ONLY=<part of a name>`,
//! `SIM_RUN=<seconds>` and `SIM_TRACE=1` are for trying other settings with `--nocapture`.

use std::time::Duration;

use super::simulation::{run, Kind, Outcome, Scenario, SimModel, Style};
use super::*;

const MINUTE: Duration = Duration::from_secs(60);

/// One model at a quarter of the key (NVIDIA's slow models), five clients on it and five on
/// another model.
const QUARTER: &[SimModel] = &[
    SimModel {
        name: "slow",
        clients: 5,
        quota: Some((10, MINUTE)),
        locked: None,
    },
    SimModel {
        name: "fast",
        clients: 5,
        quota: None,
        locked: None,
    },
];

/// Two models at half the key each.
const HALVES: &[SimModel] = &[
    SimModel {
        name: "a",
        clients: 5,
        quota: Some((20, MINUTE)),
        locked: None,
    },
    SimModel {
        name: "b",
        clients: 5,
        quota: Some((20, MINUTE)),
        locked: None,
    },
];

/// One model locked for five hours from 30 s on; another model beside it.
const LOCKED: &[SimModel] = &[
    SimModel {
        name: "locked",
        clients: 5,
        quota: None,
        locked: Some((Duration::from_secs(30), Duration::from_secs(30 + 5 * 3600))),
    },
    SimModel {
        name: "open",
        clients: 5,
        quota: None,
        locked: None,
    },
];

fn report(name: &str, s: &Scenario, o: &Outcome) {
    let end = s.run.as_secs_f64();
    println!(
        "{name}: violations {} incidents {:?} client 429s {} rejected {} goodput(last third) {:.3} final rpm {:.1} max after cut {:.1} grant rpm {:.1}",
        o.violations.len(),
        o.incidents(s.window.as_secs_f64()),
        o.client_429s,
        o.rejected,
        o.goodput(end * 2.0 / 3.0, end, s.grant_per_sec()),
        o.final_rpm,
        o.max_rpm_after_cut,
        s.grant_per_sec() * 60.0
    );
}

fn variant() -> RetreatSettings {
    let variant = std::env::var("SIM_VARIANT").unwrap_or_default();
    let mut d = RetreatSettings::default();
    for kv in variant.split(',').filter(|v| !v.is_empty()) {
        let (k, v) = kv.split_once('=').expect("key=value");
        let v: f64 = v.parse().expect("a number");
        match k {
            "decrease" => d.decrease_factor = v,
            "headroom" => d.ceiling_headroom = v,
            "window" => d.window = Duration::from_secs_f64(v),
            "quiet" => d.quiet_period = Duration::from_secs_f64(v),
            "probe" => d.probe_interval = Duration::from_secs_f64(v),
            "step" => d.recover_step = v,
            "margin" => d.safety_margin = v,
            other => panic!("unknown setting {other}"),
        }
    }
    d
}

/// Every cell: its name, scenario, and whether the rate is set right (no violation at all).
fn cells() -> Vec<(String, Scenario, bool)> {
    let run_s = std::env::var("SIM_RUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let high = |kind, limit, window_s, rpm| Scenario::new(kind, limit, window_s, rpm, run_s);
    let retry_after = |s: Scenario| Scenario {
        style: Style::RetryAfter,
        ..s
    };
    let halved = |s: Scenario| Scenario {
        limit_change: Some((Duration::from_secs(120), s.limit / 2)),
        run: Duration::from_secs(900),
        ..s
    };
    let fixed_retry = |s: Scenario| Scenario {
        style: Style::RetryAfterFixed(2),
        ..s
    };
    let models = |s: Scenario, models: &'static [SimModel]| Scenario { models, ..s };
    let stated = |s: Scenario, text: &'static str| Scenario {
        stated: Some(text),
        ..s
    };
    let idle = |s: Scenario| Scenario {
        idle: Duration::from_secs(70),
        clients: 6,
        ..s
    };
    let cells = vec![
        (
            "minute sliding +50%",
            high(Kind::Sliding, 40, 60, 60.0),
            false,
        ),
        ("minute fixed +50%", high(Kind::Fixed, 40, 60, 60.0), false),
        (
            "minute bucket +50%",
            high(Kind::Bucket, 40, 60, 60.0),
            false,
        ),
        (
            "minute sliding right",
            high(Kind::Sliding, 40, 60, 40.0),
            true,
        ),
        (
            "minute Retry-After +50%",
            retry_after(high(Kind::Sliding, 40, 60, 60.0)),
            false,
        ),
        (
            "minute sliding halved",
            halved(high(Kind::Sliding, 40, 60, 40.0)),
            false,
        ),
        (
            "10 s sliding +50%",
            high(Kind::Sliding, 30, 10, 270.0),
            false,
        ),
        ("10 s fixed +50%", high(Kind::Fixed, 30, 10, 270.0), false),
        ("10 s bucket +50%", high(Kind::Bucket, 30, 10, 270.0), false),
        (
            "10 s sliding right",
            high(Kind::Sliding, 30, 10, 180.0),
            true,
        ),
        (
            "10 s Retry-After +50%",
            retry_after(high(Kind::Sliding, 30, 10, 270.0)),
            false,
        ),
        (
            "10 s Retry-After 2 s always +50%",
            fixed_retry(high(Kind::Sliding, 30, 10, 270.0)),
            false,
        ),
        (
            "minute Retry-After 2 s always +50%",
            fixed_retry(high(Kind::Sliding, 40, 60, 60.0)),
            false,
        ),
        (
            "10 s sliding halved",
            halved(high(Kind::Sliding, 30, 10, 180.0)),
            false,
        ),
        ("2 s sliding +50%", high(Kind::Sliding, 20, 2, 900.0), false),
        ("2 s sliding right", high(Kind::Sliding, 20, 2, 600.0), true),
        (
            "minute, one model at 1/4, right",
            models(high(Kind::Sliding, 40, 60, 40.0), QUARTER),
            false,
        ),
        (
            "minute, one model at 1/4, +50%",
            models(high(Kind::Sliding, 40, 60, 60.0), QUARTER),
            false,
        ),
        (
            "minute, two models at 1/2, right",
            models(high(Kind::Sliding, 40, 60, 40.0), HALVES),
            true,
        ),
        (
            "minute, two models at 1/2, +50%",
            models(high(Kind::Sliding, 40, 60, 60.0), HALVES),
            false,
        ),
        (
            "idle 70 s then burst, 30 s window (20/30 s), sidecar at 60 rpm",
            idle(high(Kind::Sliding, 20, 30, 60.0)),
            false,
        ),
        (
            "idle 70 s then burst, minute window (40/60 s), sidecar at 60 rpm",
            idle(high(Kind::Sliding, 40, 60, 60.0)),
            false,
        ),
        (
            "minute, one model locked for 5 hours, right",
            models(high(Kind::Sliding, 40, 60, 40.0), LOCKED),
            false,
        ),
        (
            "auto, 60/60 s stated truthfully (starts at 40)",
            stated(high(Kind::Sliding, 60, 60, 40.0), "truth"),
            true,
        ),
        (
            "auto, 40/60 s stating 1e12",
            stated(high(Kind::Sliding, 40, 60, 40.0), "1e12"),
            false,
        ),
        (
            "auto, 40/60 s stating 1000 (contradicted by 429s)",
            stated(high(Kind::Sliding, 40, 60, 40.0), "1000"),
            false,
        ),
        (
            "auto, 40/60 s stating 0",
            stated(high(Kind::Sliding, 40, 60, 40.0), "0"),
            true,
        ),
        (
            "auto, 40/60 s stating -5",
            stated(high(Kind::Sliding, 40, 60, 40.0), "-5"),
            true,
        ),
        (
            "auto, 40/60 s stating NaN",
            stated(high(Kind::Sliding, 40, 60, 40.0), "NaN"),
            true,
        ),
        (
            "auto, 10 s window (30/10 s) stated truthfully (starts at 40)",
            stated(high(Kind::Sliding, 30, 10, 40.0), "truth"),
            true,
        ),
    ];
    cells
        .into_iter()
        .map(|(name, s, right)| (name.to_string(), s, right))
        .collect()
}

#[test]
fn the_shipped_defaults_meet_the_targets_across_the_matrix() {
    let d = variant();
    let only = std::env::var("SIM_ONLY").ok();
    let mut failures = Vec::new();
    for (name, s, right) in cells() {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let o = run(s, d.clone(), 6);
        report(&name, &s, &o);
        let end = s.run.as_secs_f64();
        let goodput = o.goodput(end * 2.0 / 3.0, end, s.grant_per_sec());
        let worst = o.incidents(s.window.as_secs_f64()).into_iter().max();
        if worst.unwrap_or(0) > 3 {
            failures.push(format!("{name}: an incident cost {worst:?} 429s"));
        }
        if o.client_429s > 0 {
            failures.push(format!("{name}: {} 429s reached clients", o.client_429s));
        }
        if right && !o.violations.is_empty() {
            failures.push(format!("{name}: violations {:?}", o.violations));
        }
        if goodput < 0.95 {
            failures.push(format!("{name}: goodput {goodput:.3}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// NVIDIA's own numbers, as a user met them: 40 per rolling minute, no `Retry-After`, the
/// sidecar at 60 rpm, 10 clients for 150 s. At most 4 upstream 429s in all, and recovery
/// never climbs above the 40 per minute the upstream accepts.
#[test]
fn nvidia_s_minute_with_the_rate_set_50_percent_too_high() {
    let s = Scenario::new(Kind::Sliding, 40, 60, 60.0, 150);
    let o = run(s, RetreatSettings::default(), 6);
    report("nvidia 150 s", &s, &o);
    assert!(o.violations.len() <= 4, "{:?}", o.violations);
    assert_eq!(o.client_429s, 0);
    assert!(
        o.max_rpm_after_cut <= 40.0,
        "recovery climbed to {}",
        o.max_rpm_after_cut
    );
}

/// The first cell: 40 per rolling minute per key, one model also at 10 per minute,
/// five clients on it and five on another, nothing configured, 150 s: the upstream grants
/// about 100; the slow model's 429s lower that model only, so the other model takes what it
/// leaves.
#[test]
fn a_slow_model_does_not_drag_the_others_down() {
    let s = Scenario {
        models: QUARTER,
        ..Scenario::new(Kind::Sliding, 40, 60, 40.0, 150)
    };
    let o = run(s, RetreatSettings::default(), 6);
    report("quarter 150 s", &s, &o);
    let served = o.accepted.len();
    let slow = o.accepted_of("slow", 0.0, 150.0);
    assert!(served >= 90, "served {served} of about 100");
    assert!(slow <= 10 + 10 + 5, "the slow model got {slow}");
    assert!(o.violations.len() <= 6, "{:?}", o.violations);
    assert_eq!(o.client_429s, 0);
    assert_eq!(
        o.final_rpm, 40.0,
        "the key's rate stays: the 429s were the model's"
    );
}

/// How fast an incident after an idle stretch is over: the share of the upstream's grant used
/// in each upstream window after the first 429. At NVIDIA's minute (40 per 60 s, the sidecar
/// at 60 rpm) the second window after the incident is at 95%; with a 30 s window (20 per
/// 30 s) the sidecar's own minute window paces the steps above the proven floor, and 90% is
/// held from the sixth window (180 s) on, not the third (see BENCHMARKS.md).
#[test]
fn windows_after_an_incident_that_follows_an_idle_stretch() {
    for (limit, window, within, at_least) in [(40usize, 60u64, 2usize, 0.9), (20, 30, 6, 0.9)] {
        let s = Scenario {
            idle: Duration::from_secs(70),
            clients: 6,
            ..Scenario::new(Kind::Sliding, limit, window, 60.0, 600)
        };
        let o = run(s, RetreatSettings::default(), 6);
        let first = o.violations[0].0;
        let w = window as f64;
        let per_sec = limit as f64 / w;
        let by_window: Vec<f64> = (0..8)
            .map(|i| o.goodput(first + i as f64 * w, first + (i + 1) as f64 * w, per_sec))
            .collect();
        println!("{limit}/{window} s: first 429 at {first:.1} s, goodput by window after it {by_window:.2?}");
        assert!(
            by_window[within - 1..].iter().all(|g| *g >= at_least),
            "{limit}/{window} s: {by_window:.2?}"
        );
        assert!(o.incidents(w).into_iter().all(|n| n <= 3));
    }
}
