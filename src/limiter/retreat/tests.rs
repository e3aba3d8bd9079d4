//! The controller at exact instants: retreat, probing, recovery, ceilings, epochs, sharing.

use super::*;

const LIMITED: UpstreamSignal = UpstreamSignal::RateLimited { retry_after: None };
const OK: UpstreamSignal = UpstreamSignal::Accepted { pause: None };

fn settings() -> RetreatSettings {
    RetreatSettings {
        window: Duration::from_secs(10),
        quiet_period: Duration::from_secs(5),
        recover_interval: Duration::from_secs(1),
        recover_step: 0.1,
        ..RetreatSettings::default()
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Sends a probe at `now` (it must be due) and returns its stamp.
fn probe(c: &mut RetreatController, now: Instant) -> Grant {
    assert_eq!(c.admit(now), Admit::Probe, "a probe is due");
    let grant = c.grant();
    assert!(grant.probe);
    c.probe_sent(now);
    grant
}

/// `n` accepted answers one per `every` from `from`, with demand waiting all along.
fn accepted(c: &mut RetreatController, from: Instant, every: Duration, n: u32) {
    for i in 0..n {
        c.observe(&OK, from + every * i);
    }
    c.note_demand(from, from + every * n, true);
}

/// Demand waits from `from` to `to`.
fn busy(c: &mut RetreatController, from: Instant, to: Instant) {
    c.note_demand(from, to, true);
}

#[test]
fn a_429_without_retry_after_probes_with_growing_spacing_and_the_first_success_resumes() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    c.observe(&LIMITED, t0 + secs(1));
    assert_eq!(c.state(), RetreatState::Retreat);
    assert_eq!(c.effective_rpm(), 30.0);
    assert!(c.is_probing());
    // No tokens while probing; the first probe waits one interval of the cut rate (2 s).
    assert_eq!(c.admission_rate_per_sec(t0 + secs(1)), 0.0);
    assert_eq!(c.admit(t0 + ms(2999)), Admit::Closed);
    let first = probe(&mut c, t0 + secs(3));
    assert_eq!(c.admit(t0 + secs(4)), Admit::Closed, "one probe at a time");
    c.observe_answer(&LIMITED, first, t0 + secs(3));
    // Refused: three times the spacing.
    assert_eq!(c.next_probe_event(), Some(t0 + secs(9)));
    assert_eq!(c.admit(t0 + ms(8999)), Admit::Closed);
    let second = probe(&mut c, t0 + secs(9));
    c.observe_answer(&LIMITED, second, t0 + secs(9));
    assert_eq!(c.next_probe_event(), Some(t0 + secs(27)));
    let third = probe(&mut c, t0 + secs(27));
    c.observe_answer(&OK, third, t0 + secs(27));
    assert!(!c.is_probing());
    assert_eq!(c.admit(t0 + secs(27)), Admit::Open);
    assert_eq!(c.effective_rpm(), 30.0, "the cut rate resumes");
    assert!((c.admission_rate_per_sec(t0 + secs(27)) - 30.0 * 0.99 / 60.0).abs() < 1e-9);
}

#[test]
fn answers_to_grants_from_before_the_cut_neither_cut_again_nor_judge_a_probe() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    let before = c.grant();
    c.observe_answer(&LIMITED, before, t0);
    assert_eq!(c.effective_rpm(), 30.0);
    // More answers to requests that were already on their way.
    c.observe_answer(&LIMITED, before, t0 + ms(10));
    c.observe_answer(&OK, before, t0 + ms(20));
    assert_eq!(c.effective_rpm(), 30.0, "cut once");
    assert!(c.is_probing(), "an old success does not end probing");
    assert!((c.upstream_429_ratio(t0 + ms(20)) - 2.0 / 3.0).abs() < 1e-9);
    // A 429 on a grant of the new epoch that is no probe (the cut rate was still too
    // high) cuts again.
    let p = probe(&mut c, t0 + secs(2));
    c.observe_answer(&OK, p, t0 + secs(2));
    let after = c.grant();
    c.observe_answer(&LIMITED, after, t0 + secs(3));
    assert_eq!(c.effective_rpm(), 15.0);
    assert!(c.is_probing());
}

#[test]
fn a_probe_without_an_answer_counts_as_accepted_after_the_timeout_and_a_lost_one_is_freed() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    c.observe(&LIMITED, t0);
    let lost = probe(&mut c, t0 + secs(2));
    // The client left before the upstream answered: the next probe may go at once.
    c.observe_answer(&UpstreamSignal::NoAnswer, lost, t0 + secs(2));
    let _slow = probe(&mut c, t0 + secs(2));
    c.tick(t0 + secs(2) + PROBE_ANSWER_TIMEOUT - ms(1));
    assert!(c.is_probing());
    assert_eq!(
        c.next_probe_event(),
        Some(t0 + secs(2) + PROBE_ANSWER_TIMEOUT)
    );
    c.tick(t0 + secs(2) + PROBE_ANSWER_TIMEOUT);
    assert!(
        !c.is_probing(),
        "no 429 came back: the upstream is working on it"
    );
}

#[test]
fn retry_after_pauses_then_one_probe_checks_the_upstream_s_word() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    c.observe(
        &UpstreamSignal::RateLimited {
            retry_after: Some(secs(20)),
        },
        t0,
    );
    assert!(c.is_paused(t0 + secs(19)));
    assert_eq!(c.admit(t0 + secs(19)), Admit::Closed);
    assert_eq!(c.admission_rate_per_sec(t0 + secs(19)), 0.0);
    c.tick(t0 + secs(19));
    assert_eq!(c.state(), RetreatState::Retreat, "no recovery while paused");
    // The window was still full when the pause ended (the upstream said too little):
    // the probe is refused, and the next one waits three times as long, no second cut.
    let p = probe(&mut c, t0 + secs(20));
    c.observe_answer(
        &UpstreamSignal::RateLimited {
            retry_after: Some(secs(2)),
        },
        p,
        t0 + secs(20),
    );
    assert_eq!(c.effective_rpm(), 30.0);
    assert_eq!(c.admit(t0 + secs(22)), Admit::Closed);
    let p = probe(&mut c, t0 + secs(26));
    c.observe_answer(&OK, p, t0 + secs(26));
    assert_eq!(c.admit(t0 + secs(26)), Admit::Open);
    c.tick(t0 + secs(26));
    assert_eq!(c.state(), RetreatState::Recover);
}

/// NVIDIA's numbers: 40 per rolling minute, the sidecar at 60 rpm. The first 429 comes
/// after 40 s, before a whole window was observed: no ceiling can be known then, and
/// scaling 40 s of history up to a minute would give 60 rpm. Recovery holds at the cut
/// rate until the window has passed, then climbs to what the upstream accepted in it.
#[test]
fn no_ceiling_is_learned_from_less_than_a_whole_window() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, RetreatSettings::default(), t0);
    accepted(&mut c, t0, secs(1), 40);
    busy(&mut c, t0 + secs(40), t0 + secs(300));
    c.observe(&LIMITED, t0 + secs(40));
    assert_eq!(c.effective_rpm(), 30.0);
    let p = probe(&mut c, t0 + secs(42));
    c.observe_answer(&LIMITED, p, t0 + secs(42));
    let p = probe(&mut c, t0 + secs(48));
    c.observe_answer(&LIMITED, p, t0 + secs(48));
    c.tick(t0 + secs(59));
    assert_eq!(c.ceiling_rpm(), Some(30.0), "held at the cut rate");
    c.tick(t0 + secs(60));
    let learned = 40.0 * 0.98;
    assert_eq!(
        c.ceiling_rpm(),
        Some(learned),
        "40 accepted in the first minute"
    );
    let p = probe(&mut c, t0 + secs(66));
    c.observe_answer(&OK, p, t0 + secs(66));
    let mut highest = 0.0f64;
    // (Until `probe_interval` after the last step, when recovery tries one step higher.)
    for s in 66..300 {
        c.tick(t0 + secs(s));
        highest = highest.max(c.effective_rpm());
    }
    assert_eq!(c.effective_rpm(), learned);
    assert!(highest <= learned, "climbed to {highest}");
    assert_eq!(c.state(), RetreatState::Recover);
}

#[test]
fn a_whole_window_before_the_cut_gives_the_ceiling_at_once() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    // Accepted at 2 per second (120 rpm): more than we send, so the ceiling is our own rate.
    accepted(&mut c, t0 + ms(500), ms(500), 20);
    c.observe(&LIMITED, t0 + secs(11));
    assert!((c.ceiling_rpm().unwrap() - 58.8).abs() < 1e-9);

    let mut c = RetreatController::new(60.0, settings(), t0);
    // Demand waited all along, and the upstream accepted 7 of it.
    busy(&mut c, t0, t0 + secs(4));
    accepted(&mut c, t0 + secs(4), secs(1), 7);
    c.observe(&LIMITED, t0 + secs(11));
    // 7 accepted within the last 10 s -> 42 rpm, less the 5% headroom.
    let ceiling = c.ceiling_rpm().unwrap();
    assert!((ceiling - 42.0 * 0.98).abs() < 1e-9, "ceiling {ceiling}");
    assert_eq!(c.effective_rpm(), 30.0);
}

#[test]
fn a_window_spent_at_the_cut_rate_is_verified_one_step_per_window() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    c.observe(&LIMITED, t0 + secs(1));
    let p = probe(&mut c, t0 + secs(3));
    c.observe_answer(&OK, p, t0 + secs(3));
    // 30 rpm for the rest of the first window: it proves the cut rate, nothing more.
    accepted(&mut c, t0 + secs(4), secs(2), 4);
    c.tick(t0 + secs(10));
    assert_eq!(c.ceiling_rpm(), Some(30.0));
    // Recovery tries one step (6 rpm) above it per whole window (10 s) of quiet.
    c.tick(t0 + secs(19));
    assert_eq!(c.effective_rpm(), 30.0);
    c.tick(t0 + secs(20));
    assert_eq!(c.effective_rpm(), 36.0);
    c.tick(t0 + secs(30));
    assert_eq!(c.effective_rpm(), 42.0);
    // The rates that ran a whole window without a 429 are proven: a cut never sets the
    // ceiling below them.
    c.tick(t0 + secs(40));
    let before = c.grant();
    c.observe_answer(&LIMITED, before, t0 + secs(40));
    assert!(
        c.ceiling_rpm().unwrap() >= 42.0 - 1e-9,
        "{:?}",
        c.ceiling_rpm()
    );
}

#[test]
fn above_a_learned_ceiling_recovery_probes_only_after_the_probe_interval() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    accepted(&mut c, t0 + ms(500), ms(500), 20);
    c.observe(
        &UpstreamSignal::RateLimited {
            retry_after: Some(secs(1)),
        },
        t0 + secs(11),
    );
    // The pause ends at 12 s; the first probe waits one interval of the cut rate (2 s).
    let p = probe(&mut c, t0 + secs(13));
    c.observe_answer(&OK, p, t0 + secs(13));
    c.tick(t0 + secs(16));
    assert_eq!(c.state(), RetreatState::Recover);
    c.tick(t0 + secs(60));
    assert!(
        (c.effective_rpm() - 58.8).abs() < 1e-9,
        "holds at the ceiling"
    );
    // Recovery began at 16 s; the last climbing step, to 58.8, was at 21 s.
    c.tick(t0 + secs(21 + 299));
    assert!((c.effective_rpm() - 58.8).abs() < 1e-9);
    c.tick(t0 + secs(21 + 300));
    assert_eq!(c.state(), RetreatState::Normal);
    assert_eq!(c.effective_rpm(), 60.0);
}

#[test]
fn threshold_ignores_rare_429s() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(
        60.0,
        RetreatSettings {
            threshold: 0.2,
            ..settings()
        },
        t0,
    );
    for i in 0..9 {
        c.observe(&OK, t0 + Duration::from_millis(i));
    }
    c.observe(&LIMITED, t0 + secs(1));
    assert_eq!(c.state(), RetreatState::Normal);
    c.observe(&LIMITED, t0 + secs(1));
    c.observe(&LIMITED, t0 + secs(1));
    assert_eq!(c.state(), RetreatState::Retreat);
    assert!((c.upstream_429_ratio(t0 + secs(1)) - 0.25).abs() < 1e-9);
}

#[test]
fn base_rate_change_keeps_state() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    c.observe(&LIMITED, t0);
    c.set_base_rpm(120.0);
    assert_eq!(c.state(), RetreatState::Retreat);
    assert_eq!(c.effective_rpm(), 30.0);
    c.set_base_rpm(20.0);
    assert_eq!(c.effective_rpm(), 20.0);
    let mut n = RetreatController::new(60.0, settings(), t0);
    n.set_base_rpm(90.0);
    assert_eq!(n.effective_rpm(), 90.0);
    assert_eq!(n.state(), RetreatState::Normal);
}

/// The idle stretch of the issue: 70 s idle, then a burst at 60 rpm meets a 429 after 20
/// accepted. The window that ends at the 429 was mostly idle: it teaches no ceiling (it used to
/// give 20 rpm, less the headroom). Recovery holds at the cut rate until a whole busy window
/// has passed, and that one, spent mostly at the cut rate, proves only a floor: recovery then
/// steps up once per window, not once per `probe_interval`.
#[test]
fn an_idle_window_teaches_no_ceiling() {
    let d = RetreatSettings::default();
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, d.clone(), t0);
    let burst = t0 + secs(70);
    accepted(&mut c, burst, secs(1), 20);
    c.observe(&LIMITED, burst + secs(20));
    assert!(
        matches!(c.learned(), Learned::Pending { .. }),
        "{:?}",
        c.learned()
    );
    assert_eq!(c.effective_rpm(), 30.0);
    busy(&mut c, burst + secs(20), burst + secs(600));
    let p = probe(&mut c, burst + secs(22));
    c.observe_answer(&LIMITED, p, burst + secs(22));
    // The window filled from empty: it frees when its oldest request leaves (70 + 60 s),
    // before three times the spacing would have it.
    let p = probe(&mut c, burst + secs(28));
    c.observe_answer(&LIMITED, p, burst + secs(28));
    assert_eq!(c.next_probe_event(), Some(burst + secs(46)));
    let p = probe(&mut c, burst + secs(46));
    c.observe_answer(&OK, p, burst + secs(46));
    // 30 rpm from then on.
    for i in 0..20 {
        c.observe(&OK, burst + secs(48 + 2 * i));
    }
    c.tick(burst + secs(54));
    assert_eq!(c.learned(), Learned::Floor(30.0), "mostly the cut rate");
    // One step (3 rpm) per whole busy window once at the floor, not one per 300 s.
    let mut stepped = None;
    for s in 54..200 {
        c.tick(burst + secs(s));
        if stepped.is_none() && c.effective_rpm() > 30.0 {
            stepped = Some(s);
        }
    }
    let stepped = stepped.expect("recovery stepped above the floor");
    assert!(stepped <= 54 + 60 + 15, "stepped at {stepped} s");
    assert!(c.effective_rpm() >= 33.0, "{}", c.effective_rpm());
}

/// With no demand after a cut, no window can teach: after a whole window the cut rate is a
/// floor, and recovery goes on from there instead of holding for ever.
#[test]
fn a_cut_followed_by_silence_recovers_from_a_floor() {
    let t0 = Instant::now();
    let mut c = RetreatController::new(60.0, settings(), t0);
    c.observe(&LIMITED, t0);
    let p = probe(&mut c, t0 + secs(2));
    c.observe_answer(&OK, p, t0 + secs(2));
    c.tick(t0 + secs(9));
    assert!(matches!(c.learned(), Learned::Pending { .. }));
    c.tick(t0 + secs(10));
    assert_eq!(c.learned(), Learned::Floor(30.0));
    for s in 10..400 {
        c.tick(t0 + secs(s));
    }
    assert_eq!(c.state(), RetreatState::Normal);
}

/// A rate is proven only by a whole window in which demand waited: a quiet window at a rate
/// says nothing about it.
#[test]
fn only_a_busy_window_proves_a_rate() {
    let t0 = Instant::now();
    for demand in [false, true] {
        let mut c = RetreatController::new(60.0, settings(), t0);
        accepted(&mut c, t0, ms(500), 20);
        c.observe(&LIMITED, t0 + secs(10));
        let p = probe(&mut c, t0 + secs(12));
        c.observe_answer(&OK, p, t0 + secs(12));
        if demand {
            busy(&mut c, t0 + secs(12), t0 + secs(40));
            for i in 0..28 {
                c.observe(&OK, t0 + secs(12 + i));
            }
        }
        for s in 12..40 {
            c.tick(t0 + secs(s));
        }
        assert!((c.effective_rpm() - 58.8).abs() < 1e-9);
        if demand {
            assert_eq!(c.proven_rpm, Some(58.8), "a busy window at 58.8 rpm");
        } else {
            assert_eq!(c.proven_rpm, None, "nobody asked");
        }
    }
}
