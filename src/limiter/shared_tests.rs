//! Tests of a limiter on a shared quota (leased slots, the fallback share, adopted cuts) and
//! of its state across a restart, on explicit instants.

use super::tests::{client, granted, ms, queued, settings};
use super::*;

#[test]
fn a_restored_state_is_aged_but_never_bursts() {
    let t0 = Instant::now();
    let mut before = Limiter::new(settings(60.0, 5, 10), t0);
    let far = t0 + Duration::from_secs(600);
    for _ in 0..5 {
        assert_eq!(
            before.request(client("a"), Priority::Normal, far, t0),
            Admission::Granted
        );
    }
    before.observe(
        &UpstreamSignal::RateLimited {
            retry_after: Some(Duration::from_secs(10)),
        },
        t0,
    );
    let saved = before.export(t0 + Duration::from_secs(1));
    assert_eq!(saved.state, RetreatState::Retreat);
    assert_eq!(saved.effective_rpm, 30.0);
    assert_eq!(saved.pause_remaining, Some(Duration::from_secs(9)));

    // Restarted 4 s later: 5 s of pause left, no tokens, still in retreat.
    let t1 = Instant::now();
    let mut after = Limiter::new(settings(60.0, 5, 10), t1);
    after.restore(&saved, Duration::from_secs(4), t1);
    let s = after.snapshot(t1);
    assert_eq!((s.state, s.effective_rpm), (RetreatState::Retreat, 30.0));
    assert_eq!(s.paused_for, Some(Duration::from_secs(5)));
    assert_eq!(after.tokens(), 0.0);
    assert!(matches!(
        after.request(
            client("a"),
            Priority::Normal,
            t1 + far.duration_since(t0),
            t1
        ),
        Admission::Queued(_)
    ));

    // Restarted an hour later: the pause is over and the bucket is full, not overfull.
    let mut late = Limiter::new(settings(60.0, 5, 10), t1);
    late.restore(&saved, Duration::from_secs(3600), t1);
    assert_eq!(late.tokens(), 5.0);
    assert_eq!(late.snapshot(t1).paused_for, None);
}

#[test]
fn a_shared_bucket_grants_only_leased_slots_at_their_time() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    limiter.set_supply(0, Supply::Leased, t0, t0);
    let far = t0 + Duration::from_secs(60);
    let first = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    let second = queued(limiter.request(client("b"), Priority::Normal, far, t0));
    assert_eq!(limiter.slots_wanted(0, t0), 2);
    // Nothing refills locally: without a lease nobody is ever granted.
    assert!(granted(&limiter.poll(t0 + Duration::from_secs(5))).is_empty());

    let t1 = t0 + Duration::from_secs(5);
    limiter.add_slots(0, &[t1 + ms(100), t1 + ms(300)], ms(5), t1);
    assert_eq!(limiter.slots_wanted(0, t1), 0);
    assert_eq!(limiter.next_wakeup(t1), Some(t1 + ms(100)));
    assert!(granted(&limiter.poll(t1 + ms(99))).is_empty());
    assert_eq!(granted(&limiter.poll(t1 + ms(101))), vec![first]);
    assert_eq!(granted(&limiter.poll(t1 + ms(301))), vec![second]);
}

#[test]
fn an_unused_slot_lapses_and_is_never_banked() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 4, 10), t0);
    limiter.set_supply(0, Supply::Leased, t0, t0);
    limiter.add_slots(0, &[t0 + ms(100)], ms(5), t0);
    let far = t0 + Duration::from_secs(60);
    assert!(matches!(
        limiter.request(client("a"), Priority::Normal, far, t0 + ms(200)),
        Admission::Queued(_)
    ));
    assert_eq!(limiter.snapshot(t0 + ms(200)).tokens, 0.0);
}

#[test]
fn falling_back_from_leased_slots_starts_the_local_share_empty_and_late() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    limiter.set_supply(0, Supply::Leased, t0, t0);
    limiter.add_slots(0, &[t0 + ms(500)], ms(5), t0);
    // Other sidecars may hold slots up to a second ahead: the local share waits for that.
    let refill_from = t0 + Duration::from_secs(1);
    limiter.set_supply(0, Supply::Refill { share: 0.5 }, t0, refill_from);
    let far = t0 + Duration::from_secs(60);
    let held = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    let local = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    assert_eq!(granted(&limiter.poll(t0 + ms(501))), vec![held]);
    // At half of 60 rpm the first local token is due 2 s after the refill starts.
    assert_eq!(
        limiter.next_wakeup(t0 + ms(501)),
        Some(refill_from + ms(2000))
    );
    assert!(granted(&limiter.poll(refill_from + ms(1999))).is_empty());
    assert_eq!(granted(&limiter.poll(refill_from + ms(2000))), vec![local]);
}

#[test]
fn the_fallback_share_leaves_room_for_every_sidecar_s_first_token() {
    let t0 = Instant::now();
    // 60 rpm over a 10 s window: 10 requests per window.
    let limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let share = limiter.fallback_share(0, Some(2));
    // Two local buckets may each put one request more into a window than their rate says,
    // so together they get 9 per window at most, not 10: 2 x (4.5 + 1) = 11 = 10 + 1 as one.
    assert!((share - 0.45).abs() < 1e-9, "{share}");
    assert_eq!(limiter.fallback_share(0, Some(1)), 1.0);
    assert_eq!(limiter.fallback_share(0, None), 0.1, "unknown: the floor");
    assert!(limiter.fallback_share(0, Some(50)) >= 0.1 / 50.0);
    // A burst of 2 leaves room for two tokens per other sidecar.
    let bursty = Limiter::new(settings(60.0, 2, 10), t0);
    assert!((bursty.fallback_share(0, Some(2)) - 0.4).abs() < 1e-9);
}

#[test]
fn an_adopted_cut_applies_at_once_and_recovery_counts_from_the_adoption() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let cut = SharedControl {
        effective_rpm: 30.0,
        state: RetreatState::Retreat,
        ceiling_rpm: Some(57.0),
        pause_until: Some(t0 + Duration::from_secs(2)),
    };
    let t1 = t0 + Duration::from_secs(1);
    limiter.adopt_shared(0, &cut, t1);
    let seen = limiter.shared_control(0, t1);
    assert_eq!(seen.effective_rpm, 30.0);
    assert_eq!(seen.state, RetreatState::Retreat);
    assert_eq!(seen.pause_until, Some(t0 + Duration::from_secs(2)));
    assert!(cut.slows_down(&SharedControl {
        effective_rpm: 60.0,
        state: RetreatState::Normal,
        ceiling_rpm: None,
        pause_until: None,
    }));
    // Quiet period 5 s counts from the adoption, not from a 429 this sidecar never saw.
    assert_eq!(
        limiter.shared_control(0, t1 + ms(4900)).state,
        RetreatState::Retreat
    );
    assert_eq!(
        limiter.shared_control(0, t1 + ms(5100)).state,
        RetreatState::Recover
    );
}
