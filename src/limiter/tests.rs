//! Limiter tests on explicit instants: no sleeping, no clock.

use super::*;
use proptest::prelude::*;
use std::collections::HashSet;

fn settings(rpm: f64, capacity: u32, queue_max: usize) -> LimiterSettings {
    LimiterSettings {
        base_rpm: rpm,
        capacity,
        queue_max,
        keys: Vec::new(),
        models: Vec::new(),
        client_caps: Vec::new(),
        retreat: RetreatSettings {
            safety_margin: 0.0,
            window: Duration::from_secs(10),
            quiet_period: Duration::from_secs(5),
            recover_interval: Duration::from_secs(1),
            ..RetreatSettings::default()
        },
    }
}

fn client(name: &str) -> Arc<str> {
    Arc::from(name)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn queued(admission: Admission) -> WaiterId {
    match admission {
        Admission::Queued(id) => id,
        other => panic!("expected to queue, got {other:?}"),
    }
}

fn granted(resolutions: &[Resolution]) -> Vec<WaiterId> {
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
        Resolution::Expired { id, retry_after } => {
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
    let replay = queued(limiter.request_again(client("a"), Priority::Normal, far, t0));
    assert_eq!(granted(&limiter.poll(t0 + ms(1000))), vec![replay]);
    assert_eq!(granted(&limiter.poll(t0 + ms(2000))), vec![first]);
}

#[derive(Debug, Clone)]
enum Op {
    Arrive {
        client: u8,
        priority: u8,
        timeout_ms: u16,
    },
    Replay {
        client: u8,
    },
    Cancel {
        nth: u8,
    },
    Advance {
        ms: u16,
    },
    Upstream429 {
        retry_after_ms: Option<u16>,
    },
    UpstreamOk,
    /// The upstream answers the last grant (a probe while probing).
    AnswerLast {
        ok: bool,
    },
    SetRate {
        rpm: u16,
    },
    SetCapacity {
        capacity: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..5, 0u8..3, 0u16..5000).prop_map(|(client, priority, timeout_ms)| Op::Arrive { client, priority, timeout_ms }),
        1 => (0u8..5).prop_map(|client| Op::Replay { client }),
        1 => any::<u8>().prop_map(|nth| Op::Cancel { nth }),
        4 => (0u16..3000).prop_map(|ms| Op::Advance { ms }),
        1 => proptest::option::of(0u16..4000).prop_map(|retry_after_ms| Op::Upstream429 { retry_after_ms }),
        2 => Just(Op::UpstreamOk),
        2 => any::<bool>().prop_map(|ok| Op::AnswerLast { ok }),
        1 => (1u16..600).prop_map(|rpm| Op::SetRate { rpm }),
        1 => (1u8..6).prop_map(|capacity| Op::SetCapacity { capacity }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens, tokens stay in [0, capacity], the effective rate in [floor, base], and
    /// every request is answered exactly once: granted, rejected, expired or cancelled.
    #[test]
    fn invariants_hold_under_random_operations(ops in proptest::collection::vec(op(), 1..200)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut limiter = Limiter::new(settings(60.0, 2, 20), t0);
        let mut waiting: Vec<WaiterId> = Vec::new();
        let mut answered: HashSet<WaiterId> = HashSet::new();
        let mut base = 60.0;
        let mut capacity = 2.0;

        let settle = |resolutions: Vec<Resolution>, waiting: &mut Vec<WaiterId>, answered: &mut HashSet<WaiterId>| {
            for r in resolutions {
                let id = match r { Resolution::Granted(id, _) => id, Resolution::Expired { id, .. } => id };
                prop_assert!(answered.insert(id), "waiter {} answered twice", id);
                let pos = waiting.iter().position(|w| *w == id);
                prop_assert!(pos.is_some(), "waiter {} answered but was not waiting", id);
                waiting.remove(pos.unwrap());
            }
            Ok(())
        };

        for op in ops {
            match op {
                Op::Arrive { client: c, priority, timeout_ms } => {
                    let priority = Priority::ALL[priority as usize];
                    let deadline = now + Duration::from_millis(u64::from(timeout_ms));
                    if let Admission::Queued(id) = limiter.request(client(&c.to_string()), priority, deadline, now) {
                        waiting.push(id);
                    }
                }
                Op::Replay { client: c } => {
                    if let Admission::Queued(id) = limiter.request_again(client(&c.to_string()), Priority::Normal, now + Duration::from_secs(3), now) {
                        waiting.push(id);
                    }
                }
                Op::Cancel { nth } => {
                    if !waiting.is_empty() {
                        let id = waiting[nth as usize % waiting.len()];
                        prop_assert!(limiter.cancel(id, now));
                        waiting.retain(|w| *w != id);
                        answered.insert(id);
                    }
                }
                Op::Advance { ms } => {
                    now += Duration::from_millis(u64::from(ms));
                    settle(limiter.poll(now), &mut waiting, &mut answered)?;
                }
                Op::Upstream429 { retry_after_ms } => limiter.observe(
                    &UpstreamSignal::RateLimited { retry_after: retry_after_ms.map(|ms| Duration::from_millis(u64::from(ms))) },
                    now,
                ),
                Op::UpstreamOk => limiter.observe(&UpstreamSignal::Accepted { pause: None }, now),
                Op::AnswerLast { ok } => {
                    let signal = if ok {
                        UpstreamSignal::Accepted { pause: None }
                    } else {
                        UpstreamSignal::RateLimited { retry_after: None }
                    };
                    let grant = limiter.last_grant();
                    limiter.observe_answer(&signal, grant, now);
                }
                Op::SetRate { rpm } => {
                    base = f64::from(rpm);
                    limiter.set_base_rpm(base, now);
                }
                Op::SetCapacity { capacity: c } => {
                    capacity = f64::from(c);
                    limiter.set_capacity(u32::from(c), now);
                }
            }
            let probing = limiter.controller().is_probing();
            let resolutions = limiter.poll(now);
            let grants = resolutions.iter().filter(|r| matches!(r, Resolution::Granted(..))).count();
            prop_assert!(!probing || grants <= 1, "{} grants at once while probing", grants);
            if grants > 0 && limiter.last_grant().probe {
                prop_assert!(limiter.controller().admit(now) != Admit::Probe, "a second probe is due while one is out");
            }
            settle(resolutions, &mut waiting, &mut answered)?;
            let s = limiter.snapshot(now);
            prop_assert!(limiter.tokens() >= 0.0 && limiter.tokens() <= capacity + 1e-9, "tokens {}", limiter.tokens());
            prop_assert!(s.effective_rpm <= base + 1e-9 && s.effective_rpm >= base * 0.1 - 1e-9, "rate {} base {}", s.effective_rpm, base);
            prop_assert_eq!(limiter.queue_len(), waiting.len(), "lost or phantom waiters");
            for id in &waiting {
                prop_assert!(limiter.is_waiting(*id));
            }
        }
        // Far in the future everyone still waiting has been answered.
        now += Duration::from_secs(3600);
        settle(limiter.poll(now), &mut waiting, &mut answered)?;
        prop_assert!(waiting.is_empty(), "never answered: {:?}", waiting);
    }
}

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
    assert_eq!(limiter.slots_wanted(0), 2);
    // Nothing refills locally: without a lease nobody is ever granted.
    assert!(granted(&limiter.poll(t0 + Duration::from_secs(5))).is_empty());

    let t1 = t0 + Duration::from_secs(5);
    limiter.add_slots(0, &[t1 + ms(100), t1 + ms(300)], ms(5), t1);
    assert_eq!(limiter.slots_wanted(0), 0);
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

mod simulated {
    use super::super::simulation::{run, Kind, Scenario, Style};
    use super::*;

    fn scenario(kind: Kind, limit: usize, window_s: u64, rate_rpm: f64, run_s: u64) -> Scenario {
        Scenario {
            kind,
            limit,
            window: Duration::from_secs(window_s),
            style: Style::Bare,
            rate_rpm,
            clients: 10,
            run: Duration::from_secs(run_s),
            limit_change: None,
        }
    }

    fn report(name: &str, s: &Scenario, o: &super::super::simulation::Outcome) {
        let limit = s.limit_change.map_or(s.limit, |(_, l)| l);
        let per_sec = limit as f64 / s.window.as_secs_f64();
        let end = s.run.as_secs_f64();
        println!(
            "{name}: violations {} incidents {:?} client 429s {} goodput(last third) {:.3} final rpm {:.1} max after cut {:.1} quota rpm {:.1}",
            o.violations.len(),
            o.incidents(s.window.as_secs_f64()),
            o.client_429s,
            o.goodput(end * 2.0 / 3.0, end, per_sec),
            o.final_rpm,
            o.max_rpm_after_cut,
            per_sec * 60.0
        );
    }

    /// The targets of the adaptive core with the shipped defaults, over windows short and
    /// long, three quota kinds, with and without `Retry-After`, set right, 50% too high, and
    /// with the quota halved mid-run: every incident costs at most 3 upstream 429s, no 429
    /// reaches a client, and after convergence (the last third of a 10-minute run) at least
    /// 90% of the quota is used; set right, none is violated and 99% is used. `SIM_VARIANT`
    /// (e.g. `decrease=0.7,headroom=0.02`) and `SIM_ONLY=name` are for trying other settings
    /// with `--nocapture`.
    #[test]
    fn the_shipped_defaults_meet_the_targets_across_the_matrix() {
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
                other => panic!("unknown setting {other}"),
            }
        }
        let run_s = std::env::var("SIM_RUN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600);
        let high = |kind, limit, window_s, rpm| scenario(kind, limit, window_s, rpm, run_s);
        let retry_after = |s: Scenario| Scenario {
            style: Style::RetryAfter,
            ..s
        };
        let halved = |s: Scenario| Scenario {
            limit_change: Some((Duration::from_secs(120), s.limit / 2)),
            run: Duration::from_secs(900),
            ..s
        };
        let cases = [
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
                Scenario {
                    style: Style::RetryAfterFixed(2),
                    ..high(Kind::Sliding, 30, 10, 270.0)
                },
                false,
            ),
            (
                "minute Retry-After 2 s always +50%",
                Scenario {
                    style: Style::RetryAfterFixed(2),
                    ..high(Kind::Sliding, 40, 60, 60.0)
                },
                false,
            ),
            (
                "10 s sliding halved",
                halved(high(Kind::Sliding, 30, 10, 180.0)),
                false,
            ),
            ("2 s sliding +50%", high(Kind::Sliding, 20, 2, 900.0), false),
            ("2 s sliding right", high(Kind::Sliding, 20, 2, 600.0), true),
        ];
        let only = std::env::var("SIM_ONLY").ok();
        for (name, s, right) in cases {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let o = run(s, d.clone(), 6);
            report(name, &s, &o);
            let limit = s.limit_change.map_or(s.limit, |(_, l)| l);
            let per_sec = limit as f64 / s.window.as_secs_f64();
            let end = s.run.as_secs_f64();
            let goodput = o.goodput(end * 2.0 / 3.0, end, per_sec);
            let worst = o.incidents(s.window.as_secs_f64()).into_iter().max();
            assert!(
                worst.unwrap_or(0) <= 3,
                "{name}: an incident cost {worst:?} 429s"
            );
            assert_eq!(o.client_429s, 0, "{name}: 429s reached clients");
            if right {
                assert!(o.violations.is_empty(), "{name}: {:?}", o.violations);
                assert!(goodput >= 0.985, "{name}: goodput {goodput:.3}");
            } else {
                assert!(goodput >= 0.9, "{name}: goodput {goodput:.3}");
            }
        }
    }

    /// NVIDIA's own numbers, as a user met them: 40 per rolling minute, no `Retry-After`, the
    /// sidecar at 60 rpm, 10 clients for 150 s. At most 4 upstream 429s in all, and recovery
    /// never climbs above the 40 per minute the upstream accepts.
    #[test]
    fn nvidia_s_minute_with_the_rate_set_50_percent_too_high() {
        let s = scenario(Kind::Sliding, 40, 60, 60.0, 150);
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
}
