//! Limiter tests on explicit instants: no sleeping, no clock.

use super::*;

pub(super) fn settings(rpm: f64, capacity: u32, queue_max: usize) -> LimiterSettings {
    LimiterSettings {
        base_rpm: rpm,
        base_tpm: None,
        capacity,
        queue_max,
        keys: Vec::new(),
        models: Vec::new(),
        client_caps: Vec::new(),
        auto: false,
        retreat: RetreatSettings {
            safety_margin: 0.0,
            window: Duration::from_secs(10),
            quiet_period: Duration::from_secs(5),
            recover_interval: Duration::from_secs(1),
            ..RetreatSettings::default()
        },
    }
}

pub(super) fn client(name: &str) -> Arc<str> {
    Arc::from(name)
}

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn queued(admission: Admission) -> WaiterId {
    match admission {
        Admission::Queued(id) => id,
        other => panic!("expected to queue, got {other:?}"),
    }
}

pub(super) fn granted(resolutions: &[Resolution]) -> Vec<WaiterId> {
    resolutions
        .iter()
        .filter_map(|r| match r {
            Resolution::Granted(id, _) => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn grants_at_the_refill_rate_and_never_early() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    let id = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    assert_eq!(limiter.next_wakeup(t0), Some(t0 + Duration::from_secs(1)));
    assert!(limiter.poll(t0 + ms(999)).is_empty());
    assert_eq!(granted(&limiter.poll(t0 + ms(1000))), vec![id]);
    assert_eq!(limiter.next_wakeup(t0 + ms(1000)), None);
}

#[test]
fn capacity_bounds_the_burst() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 3, 10), t0);
    let far = t0 + Duration::from_secs(60);
    let admitted = (0..5)
        .filter(|_| {
            limiter.request(
                client("a"),
                Priority::Normal,
                far,
                t0 + Duration::from_secs(100),
            ) == Admission::Granted
        })
        .count();
    assert_eq!(admitted, 3);
}

#[test]
fn a_late_wakeup_does_not_lose_the_token_owed_to_a_waiter() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    let a = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    let b = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    // The clock wakes 300 ms late: the first waiter gets its token, the second is due 700 ms later.
    assert_eq!(granted(&limiter.poll(t0 + ms(1300))), vec![a]);
    assert!(limiter.poll(t0 + ms(1999)).is_empty());
    assert_eq!(granted(&limiter.poll(t0 + ms(2000))), vec![b]);
}

#[test]
fn priority_classes_are_strict() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    let low = queued(limiter.request(client("a"), Priority::Low, far, t0));
    let normal = queued(limiter.request(client("b"), Priority::Normal, far, t0));
    let high = queued(limiter.request(client("c"), Priority::High, far, t0));
    let order: Vec<_> = (1..=3)
        .flat_map(|s| granted(&limiter.poll(t0 + Duration::from_secs(s))))
        .collect();
    assert_eq!(order, vec![high, normal, low]);
}

#[test]
fn a_new_request_waits_behind_equal_priority_but_not_behind_lower() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 2, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    let _low = queued(limiter.request(client("a"), Priority::Low, far, t0));
    // One token has refilled but the low waiter has not been polled yet: a normal request
    // does not queue behind a lower class.
    assert_eq!(
        limiter.request(client("b"), Priority::Normal, far, t0 + ms(1000)),
        Admission::Granted
    );
    let _normal = queued(limiter.request(client("b"), Priority::Normal, far, t0 + ms(1000)));
    assert!(matches!(
        limiter.request(client("c"), Priority::Normal, far, t0 + ms(2500)),
        Admission::Queued(_)
    ));
}

#[test]
fn round_robin_serves_a_single_client_within_two_grants() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 100), t0);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        limiter.request(client("greedy"), Priority::Normal, far, t0),
        Admission::Granted
    );
    for _ in 0..50 {
        queued(limiter.request(client("greedy"), Priority::Normal, far, t0));
    }
    let polite = queued(limiter.request(client("polite"), Priority::Normal, far, t0));
    let first_two: Vec<_> = (1..=2)
        .flat_map(|s| granted(&limiter.poll(t0 + Duration::from_secs(s))))
        .collect();
    assert!(first_two.contains(&polite), "granted {first_two:?}");
}

#[test]
fn deadlines_expire_with_an_honest_retry_after() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, t0 + ms(10), t0),
        Admission::Granted
    );
    let short = queued(limiter.request(client("a"), Priority::Normal, t0 + ms(500), t0));
    let long = queued(limiter.request(
        client("b"),
        Priority::Normal,
        t0 + Duration::from_secs(5),
        t0,
    ));
    assert_eq!(limiter.next_wakeup(t0), Some(t0 + ms(500)));
    let resolved = limiter.poll(t0 + ms(500));
    assert_eq!(resolved.len(), 1);
    match resolved[0] {
        Resolution::Expired {
            id, retry_after, ..
        } => {
            assert_eq!(id, short);
            // One waiter ahead, half a token in hand, 1 token/s: about 1.5 s.
            assert!(
                retry_after >= ms(1400) && retry_after <= ms(1600),
                "{retry_after:?}"
            );
        }
        other => panic!("expected expiry, got {other:?}"),
    }
    assert_eq!(granted(&limiter.poll(t0 + ms(1000))), vec![long]);
}

#[test]
fn a_full_queue_rejects_at_once() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 2), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    queued(limiter.request(client("a"), Priority::Normal, far, t0));
    queued(limiter.request(client("a"), Priority::Normal, far, t0));
    match limiter.request(client("a"), Priority::High, far, t0) {
        Admission::Rejected {
            why: Rejection::QueueFull,
            retry_after,
        } => {
            assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}")
        }
        other => panic!("expected queue_full, got {other:?}"),
    }
}

#[test]
fn cancellation_consumes_nothing() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    let gone = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    let stays = queued(limiter.request(client("b"), Priority::Normal, far, t0));
    assert!(limiter.cancel(gone, t0 + ms(100)));
    assert!(!limiter.cancel(gone, t0 + ms(100)));
    assert_eq!(granted(&limiter.poll(t0 + ms(1000))), vec![stays]);
    // With the queue empty the token that refills next is free for a newcomer right away.
    assert_eq!(
        limiter.request(client("c"), Priority::Normal, far, t0 + ms(2000)),
        Admission::Granted
    );
}

#[test]
fn waiters_that_leave_take_their_memory_with_them_even_while_no_token_is_granted() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 100_000), t0);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        limiter.request(client("first"), Priority::Normal, far, t0),
        Admission::Granted
    );
    // 60,000 distinct clients queue and hang up before any token comes.
    for i in 0..60_000 {
        let id = queued(limiter.request(client(&format!("c{i}")), Priority::Normal, far, t0));
        assert!(limiter.cancel(id, t0));
    }
    assert_eq!(limiter.queue_len(), 0);
    assert_eq!(
        limiter.queue.turn_entries(),
        0,
        "turn entries of departed clients"
    );
    // Half of them still waiting: the stale half is dropped well before a token is granted.
    let ids: Vec<_> = (0..10_000)
        .map(|i| queued(limiter.request(client(&format!("d{i}")), Priority::Normal, far, t0)))
        .collect();
    for id in ids.iter().step_by(2) {
        assert!(limiter.cancel(*id, t0));
    }
    assert_eq!(limiter.queue_len(), 5_000);
    assert!(
        limiter.queue.turn_entries() <= 2 * 5_000 + 64,
        "{} entries for 5,000 waiters",
        limiter.queue.turn_entries()
    );
}

#[test]
fn a_refund_returns_the_token() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    let grant = limiter.last_grant();
    limiter.refund(grant, t0 + ms(1));
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0 + ms(2)),
        Admission::Granted
    );
}

#[test]
fn upstream_429_halves_the_grant_rate() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    limiter.observe(&UpstreamSignal::RateLimited { retry_after: None }, t0);
    assert_eq!(limiter.controller().state(), RetreatState::Retreat);
    let id = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    assert!(
        limiter.poll(t0 + ms(1999)).is_empty(),
        "30 rpm: one token every 2 s"
    );
    assert_eq!(granted(&limiter.poll(t0 + ms(2000))), vec![id]);
}

#[test]
fn no_token_before_retry_after_passes() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(600.0, 5, 10), t0);
    let far = t0 + Duration::from_secs(60);
    limiter.observe(
        &UpstreamSignal::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
        },
        t0,
    );
    let id = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    assert_eq!(limiter.next_wakeup(t0), Some(t0 + Duration::from_secs(3)));
    assert!(limiter.poll(t0 + ms(2999)).is_empty());
    // When the pause ends one request goes, as a probe of the upstream's word.
    assert_eq!(granted(&limiter.poll(t0 + ms(3000))), vec![id]);
    assert!(limiter.last_grant().probe);
    let next = queued(limiter.request(client("a"), Priority::Normal, far, t0 + ms(3000)));
    assert!(
        limiter.poll(t0 + ms(3500)).is_empty(),
        "one probe at a time"
    );
    let probe = limiter.last_grant();
    limiter.observe_answer(
        &UpstreamSignal::Accepted { pause: None },
        probe,
        t0 + ms(3500),
    );
    // Accepted: the cut rate (300 rpm) resumes from an empty bucket.
    assert!(limiter.poll(t0 + ms(3699)).is_empty());
    assert_eq!(granted(&limiter.poll(t0 + ms(3700))), vec![next]);
}

#[test]
fn recovery_returns_to_the_base_rate() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 10), t0);
    limiter.observe(
        &UpstreamSignal::RateLimited {
            retry_after: Some(Duration::from_secs(1)),
        },
        t0,
    );
    let far = t0 + Duration::from_secs(60);
    queued(limiter.request(client("a"), Priority::Normal, far, t0));
    // The probe goes one interval of the cut rate (2 s) after the 429, the pause being over.
    assert_eq!(granted(&limiter.poll(t0 + Duration::from_secs(2))).len(), 1);
    let probe = limiter.last_grant();
    limiter.observe_answer(
        &UpstreamSignal::Accepted { pause: None },
        probe,
        t0 + Duration::from_secs(2),
    );
    let s = limiter.snapshot(t0 + Duration::from_secs(6));
    assert_eq!(s.state, RetreatState::Recover);
    let s = limiter.snapshot(t0 + Duration::from_secs(400));
    assert_eq!(s.state, RetreatState::Normal);
    assert_eq!(s.effective_rpm, 60.0);
}

#[test]
fn a_rate_change_keeps_tokens_and_state() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 4, 10), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    limiter.set_base_rpm(120.0, t0);
    assert_eq!(limiter.tokens(), 3.0);
    let s = limiter.snapshot(t0);
    assert_eq!(
        (s.base_rpm, s.effective_rpm, s.state),
        (120.0, 120.0, RetreatState::Normal)
    );
    for _ in 0..3 {
        assert_eq!(
            limiter.request(client("a"), Priority::Normal, far, t0),
            Admission::Granted
        );
    }
    let id = queued(limiter.request(client("a"), Priority::Normal, far, t0));
    assert_eq!(
        granted(&limiter.poll(t0 + ms(500))),
        vec![id],
        "120 rpm: a token every 500 ms"
    );
}

#[test]
fn a_replay_goes_ahead_of_its_class() {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(settings(60.0, 1, 1), t0);
    let far = t0 + Duration::from_secs(60);
    assert_eq!(
        limiter.request(client("a"), Priority::Normal, far, t0),
        Admission::Granted
    );
    let first = queued(limiter.request(client("b"), Priority::Normal, far, t0));
    // The queue is full, yet a replay is not refused, and it is served first.
    let replay =
        queued(limiter.request_again_with(Ask::new(client("a"), Priority::Normal, far), t0));
    assert_eq!(granted(&limiter.poll(t0 + ms(1000))), vec![replay]);
    assert_eq!(granted(&limiter.poll(t0 + ms(2000))), vec![first]);
}
