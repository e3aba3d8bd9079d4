//! The link's decisions at exact instants: leasing, pacing, a full schedule, a slow answer,
//! an outage and the rejoin, and which controller changes are published or adopted.

use super::client::{Change, LeaseReply};
use super::planner::*;
use crate::admission::LeasePlan;
use crate::limiter::{RetreatState, SharedControl};
use std::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);

fn control(rpm: f64) -> SharedControl {
    SharedControl {
        effective_rpm: rpm,
        state: RetreatState::Normal,
        ceiling_rpm: None,
        pause_until: None,
    }
}

fn plan(wanted: usize, held: usize, rpm: f64) -> LeasePlan {
    LeasePlan {
        wanted,
        held,
        waiting: wanted + held,
        own_rpm: rpm,
        margin: 0.02,
        window: Duration::from_secs(60),
        capacity: 1,
        control: control(rpm),
    }
}

fn reply(slots: &[u64], next_free_ms: u64, version: i64, rate: Option<f64>) -> LeaseReply {
    LeaseReply {
        live: 2,
        rate,
        state: RetreatState::Normal,
        pause: Duration::ZERO,
        ceiling: 0.0,
        version,
        spacing: Duration::from_millis(100),
        next_free: Duration::from_millis(next_free_ms),
        horizon: SECOND,
        slots: slots.iter().map(|ms| Duration::from_millis(*ms)).collect(),
    }
}

fn planner(t0: Instant) -> Planner {
    Planner::new(SECOND, 4, Duration::from_millis(500), t0)
}

/// One round trip at `t` that Redis answers at once: the call the planner asks for, and its
/// answer taken in.
fn round(
    p: &mut Planner,
    plan: LeasePlan,
    reply: LeaseReply,
    local: SharedControl,
    t: Instant,
) -> Answered {
    let c = call(p.next(&plan, t));
    p.answered(&c, &plan, &reply, local, t, t)
}

fn call(next: Next) -> Call {
    match next {
        Next::Call(call) => call,
        Next::Sleep(at) => panic!("expected a call, got a sleep until {at:?}"),
    }
}

#[test]
fn waiters_without_slots_lease_at_once_and_at_most_max_lease() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    // The first round is the heartbeat that introduces this sidecar.
    let first = call(p.next(&plan(0, 0, 60.0), t0));
    assert_eq!((first.wanted, first.change), (0, Change::None));
    p.answered(
        &first,
        &plan(0, 0, 60.0),
        &reply(&[], 0, 1, Some(60.0)),
        control(60.0),
        t0,
        t0,
    );
    p.agree(control(60.0));
    assert_eq!(p.next(&plan(0, 0, 60.0), t0), Next::Sleep(t0 + HEARTBEAT));
    let c = call(p.next(&plan(9, 0, 60.0), t0));
    assert_eq!(c.wanted, 4, "capped at max_lease");
    assert_eq!(c.rejoin_hold, None);
}

#[test]
fn with_slots_in_hand_the_next_lease_waits_half_the_reach() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    let a = round(
        &mut p,
        plan(2, 0, 60.0),
        reply(&[0, 100], 0, 1, Some(60.0)),
        control(60.0),
        t0,
    );
    p.agree(control(60.0));
    assert_eq!(a.slots, vec![t0, t0 + Duration::from_millis(100)]);
    // min(window * margin / 2 = 0.6 s, spacing / 2 = 50 ms)
    assert_eq!(a.grace, Duration::from_millis(50));
    let t1 = t0 + Duration::from_millis(200);
    assert_eq!(
        p.next(&plan(3, 2, 60.0), t1),
        Next::Sleep(t0 + SECOND / 2),
        "waiters gather while slots are in hand"
    );
    assert_eq!(
        call(p.next(&plan(3, 0, 60.0), t1)).wanted,
        3,
        "none in hand: at once"
    );
}

#[test]
fn a_full_schedule_is_asked_again_when_half_the_reach_is_free() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    let c = call(p.next(&plan(4, 0, 60.0), t0));
    // One slot of four, and the next free slot 3 s ahead (beyond the 1 s reach).
    p.answered(
        &c,
        &plan(4, 0, 60.0),
        &reply(&[0], 3000, 1, Some(60.0)),
        control(60.0),
        t0,
        t0,
    );
    p.agree(control(60.0));
    assert_eq!(
        p.next(&plan(3, 0, 60.0), t0),
        Next::Sleep(t0 + Duration::from_millis(2500))
    );
    assert_eq!(
        call(p.next(&plan(3, 0, 60.0), t0 + Duration::from_millis(2500))).wanted,
        3
    );
}

#[test]
fn an_answer_slower_than_the_margin_allows_brings_no_slots() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    let c = call(p.next(&plan(2, 0, 60.0), t0));
    // Budget: max(60 s * 0.02 / 2, 20 ms) = 0.6 s.
    let late = t0 + Duration::from_millis(700);
    let a = p.answered(
        &c,
        &plan(2, 0, 60.0),
        &reply(&[0, 100], 0, 1, None),
        control(60.0),
        t0,
        late,
    );
    assert!(a.slots.is_empty());
}

#[test]
fn an_outage_falls_back_once_retries_and_rejoins_with_a_hold() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    assert_eq!(
        p.failed(t0),
        Some(t0 + SECOND),
        "the local share starts a reach later"
    );
    assert!(p.is_degraded());
    assert_eq!(p.failed(t0 + RETRY), None, "one fallback per outage");
    // While degraded only the retry timer calls, however many wait.
    let t1 = t0 + RETRY + Duration::from_millis(10);
    assert_eq!(p.next(&plan(5, 0, 60.0), t1), Next::Sleep(t0 + RETRY * 2));
    let before_local = call(p.next(&plan(5, 0, 60.0), t0 + RETRY * 2));
    assert_eq!(
        before_local.rejoin_hold, None,
        "the local share has not earned yet"
    );
    let t2 = t0 + Duration::from_secs(2);
    let c = call(p.next(&plan(5, 0, 60.0), t2));
    // max(reach 1 s, 250 ms + 2 * 500 ms)
    assert_eq!(c.rejoin_hold, Some(Duration::from_millis(1250)));
    let a = p.answered(
        &c,
        &plan(5, 0, 60.0),
        &reply(&[0], 0, 1, None),
        control(60.0),
        t2,
        t2,
    );
    assert!(a.rejoined);
    assert!(!p.is_degraded());
}

#[test]
fn local_cuts_are_published_as_slow_and_steps_as_step() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    let a = round(
        &mut p,
        plan(0, 0, 60.0),
        reply(&[], 0, 1, Some(60.0)),
        control(60.0),
        t0,
    );
    assert_eq!(
        a.adopt,
        Some(control(60.0)),
        "first contact takes the shared state"
    );
    assert!(a.agree_local);
    p.agree(control(60.0));
    let t1 = t0 + SECOND;
    assert!(
        matches!(p.next(&plan(0, 0, 60.0), t1), Next::Sleep(_)),
        "nothing to say"
    );
    assert_eq!(call(p.next(&plan(0, 0, 30.0), t1)).change, Change::Slow);
    assert_eq!(call(p.next(&plan(0, 0, 90.0), t1)).change, Change::Step);
}

#[test]
fn a_slower_local_state_at_first_contact_is_published_not_dropped() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    let a = round(
        &mut p,
        plan(0, 0, 30.0),
        reply(&[], 0, 1, Some(60.0)),
        control(30.0),
        t0,
    );
    assert_eq!(a.adopt, None, "the restored retreat is kept");
    assert_eq!(call(p.next(&plan(0, 0, 30.0), t0)).change, Change::Slow);
}

#[test]
fn a_local_change_during_the_call_is_not_overwritten_by_the_answer() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    let c = call(p.next(&plan(0, 0, 60.0), t0));
    // A 429 cut the local rate to 30 while the call was under way.
    let a = p.answered(
        &c,
        &plan(0, 0, 60.0),
        &reply(&[], 0, 1, Some(60.0)),
        control(30.0),
        t0,
        t0,
    );
    assert_eq!(a.adopt, None);
    assert!(!a.agree_local);
    assert_eq!(
        call(p.next(&plan(0, 0, 30.0), t0)).change,
        Change::Slow,
        "the cut goes out next"
    );
}

#[test]
fn news_from_the_others_is_adopted_and_no_news_is_not() {
    let t0 = Instant::now();
    let mut p = planner(t0);
    round(
        &mut p,
        plan(0, 0, 60.0),
        reply(&[], 0, 1, Some(60.0)),
        control(60.0),
        t0,
    );
    p.agree(control(60.0));
    let t1 = t0 + HEARTBEAT;
    let same = round(
        &mut p,
        plan(0, 0, 60.0),
        reply(&[], 0, 1, Some(60.0)),
        control(60.0),
        t1,
    );
    assert_eq!(same.adopt, None, "version 1 again: nothing new");
    let t2 = t1 + HEARTBEAT;
    let cut = round(
        &mut p,
        plan(0, 0, 60.0),
        reply(&[], 0, 2, Some(30.0)),
        control(60.0),
        t2,
    );
    assert_eq!(
        cut.adopt.map(|c| c.effective_rpm),
        Some(30.0),
        "another sidecar's cut"
    );
}
