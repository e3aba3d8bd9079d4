//! Tests of the limiter with several resources: a key pool, model limits, client weights and
//! caps. Explicit instants, no clock.

use super::*;
use std::collections::HashMap;

pub(super) fn retreat() -> RetreatSettings {
    RetreatSettings {
        safety_margin: 0.0,
        window: Duration::from_secs(10),
        quiet_period: Duration::from_secs(5),
        recover_interval: Duration::from_secs(1),
        ..RetreatSettings::default()
    }
}

pub(super) fn key(name: &str, rpm: Option<f64>) -> KeyRate {
    KeyRate {
        name: Arc::from(name),
        rpm,
        tpm: None,
    }
}

pub(super) fn model(
    pattern: &str,
    rate_rpm: Option<f64>,
    max_concurrency: Option<u32>,
) -> ModelSettings {
    ModelSettings {
        pattern: pattern.to_string(),
        rate_rpm,
        max_concurrency,
        tpm: None,
    }
}

fn limiter(rpm: f64, keys: Vec<KeyRate>, models: Vec<ModelSettings>) -> (Limiter, Instant) {
    let t0 = Instant::now();
    let settings = LimiterSettings {
        keys,
        models,
        ..LimiterSettings::single(rpm, 1, 1000, retreat())
    };
    (Limiter::new(settings, t0), t0)
}

fn ask(client: &str, deadline: Instant) -> Ask {
    Ask::new(Arc::from(client), Priority::Normal, deadline)
}

fn ask_model(client: &str, model: usize, deadline: Instant) -> Ask {
    Ask {
        model: Some(model),
        ..ask(client, deadline)
    }
}

fn grants(resolutions: &[Resolution]) -> Vec<(WaiterId, Grant)> {
    resolutions
        .iter()
        .filter_map(|r| match r {
            Resolution::Granted(id, grant) => Some((*id, *grant)),
            _ => None,
        })
        .collect()
}

/// Grants over `seconds` of backlog, polled every 100 ms.
fn grants_over(limiter: &mut Limiter, t0: Instant, seconds: u64) -> Vec<Grant> {
    let mut all = Vec::new();
    for step in 1..=seconds * 10 {
        let now = t0 + Duration::from_millis(step * 100);
        all.extend(grants(&limiter.poll(now)).into_iter().map(|(_, g)| g));
    }
    all
}

#[test]
fn two_keys_grant_twice_the_rate_of_one_and_each_key_at_its_own_rate() {
    let (mut l, t0) = limiter(60.0, vec![key("a", None), key("b", Some(120.0))], vec![]);
    let far = t0 + Duration::from_secs(600);
    for i in 0..100 {
        let _ = l.request_with(ask(&format!("c{i}"), far), t0);
    }
    let granted = grants_over(&mut l, t0, 10);
    let on = |lane| granted.iter().filter(|g| g.lane == lane).count();
    // 60 rpm and 120 rpm for 10 s: 10 and 20 grants (the first token of each was taken at t0).
    assert_eq!((on(0), on(1)), (10, 20), "grants per key");
}

#[test]
fn a_429_on_one_key_cuts_that_key_only() {
    let (mut l, t0) = limiter(60.0, vec![key("a", None), key("b", None)], vec![]);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(l.request_with(ask("x", far), t0), Admission::Granted);
    let first = l.last_grant();
    l.observe_answer(
        &UpstreamSignal::RateLimited { retry_after: None },
        first,
        t0,
    );
    let s = l.snapshot(t0);
    let cut = &s.keys[first.lane];
    let other = &s.keys[1 - first.lane];
    assert!(
        cut.effective_rpm < 60.0,
        "the refused key retreats: {cut:?}"
    );
    assert_eq!(other.effective_rpm, 60.0, "the other key keeps its rate");
    // The other key still grants at once.
    assert_eq!(l.request_with(ask("y", far), t0), Admission::Granted);
    assert_eq!(l.last_grant().lane, 1 - first.lane);
}

/// A request sent without a token goes out on the first key still in the pool, and its
/// answer is that key's: a 429 on it cuts the key it was sent with, not a revoked one.
#[test]
fn an_answer_to_a_request_without_a_token_reaches_the_key_it_went_out_on() {
    let (mut l, t0) = limiter(60.0, vec![key("a", None), key("b", None)], vec![]);
    assert_eq!(l.untokened_grant().lane, 0);
    assert!(l.revoke(0));
    let stamp = l.untokened_grant();
    assert_eq!((stamp.lane, stamp.probe), (1, false));
    l.observe_answer(
        &UpstreamSignal::RateLimited { retry_after: None },
        stamp,
        t0,
    );
    let s = l.snapshot(t0);
    assert!(s.keys[1].effective_rpm < 60.0, "{:?}", s.keys[1]);
    assert_eq!(s.keys[0].effective_rpm, 60.0, "{:?}", s.keys[0]);
}

/// A request queues when someone waits or when no key can serve it now: tokens are counted
/// as earned by `now`, not as they were at the last grant.
#[test]
fn a_request_would_queue_only_when_nothing_can_serve_it() {
    let (mut l, t0) = limiter(60.0, vec![key("a", None)], vec![]);
    let far = t0 + Duration::from_secs(600);
    assert!(!l.would_queue(t0));
    while l.request_with(ask("x", far), t0) == Admission::Granted {}
    assert!(l.would_queue(t0), "a waiter, and no token");
    let _ = grants_over(&mut l, t0, 5);
    let later = t0 + Duration::from_secs(30);
    assert!(!l.would_queue(later), "tokens earned since, nobody waiting");
}

#[test]
fn a_revoked_key_gets_no_more_requests_and_the_last_key_is_never_revoked() {
    let (mut l, t0) = limiter(60.0, vec![key("a", None), key("b", None)], vec![]);
    assert!(l.revoke(0));
    assert!(!l.revoke(0), "already out");
    assert!(!l.revoke(1), "the last key stays");
    let far = t0 + Duration::from_secs(600);
    for i in 0..20 {
        let _ = l.request_with(ask(&format!("c{i}"), far), t0);
    }
    let granted = grants_over(&mut l, t0, 10);
    assert!(!granted.is_empty());
    assert!(granted.iter().all(|g| g.lane == 1), "{granted:?}");
    let s = l.snapshot(t0 + Duration::from_secs(10));
    assert!(!s.keys[0].active && s.keys[1].active);
    assert_eq!(s.effective_rpm, 60.0, "the rate of the active keys only");
}

#[test]
fn a_full_model_is_passed_over_and_served_first_once_a_slot_frees() {
    let (mut l, t0) = limiter(
        600.0,
        vec![],
        vec![model("a", None, Some(1)), model("b", None, None)],
    );
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        l.request_with(ask_model("x", 0, far), t0),
        Admission::Granted
    );
    let held = l.last_grant();
    assert_eq!(held.model, Some(0));
    let Admission::Queued(waits_for_a) = l.request_with(ask_model("x", 0, far), t0) else {
        panic!("the model's one slot is taken, and no token is free");
    };
    let Admission::Queued(for_b) = l.request_with(ask_model("y", 1, far), t0) else {
        panic!("no token is free");
    };
    let t1 = t0 + Duration::from_millis(100);
    let g = grants(&l.poll(t1));
    assert_eq!(g.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![for_b]);
    assert!(l.is_waiting(waits_for_a));
    // Tokens are there but only model a's waiter is left: no busy wake-up.
    let t2 = t0 + Duration::from_millis(300);
    assert!(grants(&l.poll(t2)).is_empty());
    assert_eq!(
        l.next_wakeup(t2),
        Some(far),
        "waits for the slot, not for a token"
    );
    l.release(held);
    let g = grants(&l.poll(t2));
    assert_eq!(
        g.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![waits_for_a]
    );
    assert_eq!(l.snapshot(t2).models[0].in_flight, 1);
}

#[test]
fn a_refunded_grant_gives_back_its_model_slot() {
    let (mut l, t0) = limiter(600.0, vec![], vec![model("a", None, Some(1))]);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        l.request_with(ask_model("x", 0, far), t0),
        Admission::Granted
    );
    let grant = l.last_grant();
    l.refund(grant, t0);
    assert_eq!(l.snapshot(t0).models[0].in_flight, 0);
    assert_eq!(
        l.request_with(ask_model("x", 0, far), t0),
        Admission::Granted,
        "slot and token are back"
    );
}

#[test]
fn a_model_rate_paces_its_requests_while_other_models_use_the_key() {
    let (mut l, t0) = limiter(600.0, vec![], vec![model("slow", Some(60.0), None)]);
    let far = t0 + Duration::from_secs(600);
    for i in 0..60 {
        let _ = l.request_with(ask_model(&format!("s{i}"), 0, far), t0);
        let _ = l.request_with(ask(&format!("o{i}"), far), t0);
    }
    let granted = grants_over(&mut l, t0, 5);
    let slow = granted.iter().filter(|g| g.model == Some(0)).count();
    let other = granted.len() - slow;
    assert!((4..=6).contains(&slow), "60 rpm for 5 s: {slow}");
    assert!(other >= 40, "the key's rate goes to the others: {other}");
}

#[test]
fn capacity_answers_lower_the_model_limit_and_leave_the_key_rate_alone() {
    let (mut l, t0) = limiter(60.0, vec![], vec![model("a", None, Some(4))]);
    let on_a = Grant {
        model: Some(0),
        ..Grant::default()
    };
    l.observe_capacity(on_a, true, t0);
    let s = l.snapshot(t0);
    assert_eq!(s.models[0].concurrency_limit, Some(2));
    assert_eq!(s.effective_rpm, 60.0);
    for _ in 0..10 {
        l.observe_capacity(on_a, false, t0);
    }
    assert_eq!(l.snapshot(t0).models[0].concurrency_limit, Some(4));
}

#[test]
fn weights_share_the_grants_in_their_ratio() {
    let (mut l, t0) = limiter(600.0, vec![], vec![]);
    let far = t0 + Duration::from_secs(600);
    let _ = l.request_with(ask("first", far), t0);
    let mut who = HashMap::new();
    for _ in 0..60 {
        for (client, weight) in [("heavy", 2), ("light", 1)] {
            if let Admission::Queued(id) = l.request_with(
                Ask {
                    weight,
                    ..ask(client, far)
                },
                t0,
            ) {
                who.insert(id, client);
            }
        }
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut now = t0;
    while count.values().sum::<usize>() < 60 {
        now += Duration::from_millis(100);
        for (id, _) in grants(&l.poll(now)) {
            *count.entry(who[&id]).or_default() += 1;
        }
    }
    assert_eq!((count["heavy"], count["light"]), (40, 20), "{count:?}");
}

#[test]
fn a_client_cap_holds_one_client_below_the_shared_rate() {
    let t0 = Instant::now();
    let settings = LimiterSettings {
        client_caps: vec![ClientCap::rate("capped", 60.0)],
        ..LimiterSettings::single(600.0, 1, 1000, retreat())
    };
    let mut l = Limiter::new(settings, t0);
    let far = t0 + Duration::from_secs(600);
    let mut who = HashMap::new();
    for i in 0..100 {
        for client in ["capped", "free"] {
            if let Admission::Queued(id) = l.request_with(ask(client, far), t0) {
                who.insert(id, client);
            }
        }
        let _ = i;
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for step in 1..=50 {
        let now = t0 + Duration::from_millis(step * 100);
        for (id, _) in grants(&l.poll(now)) {
            *count.entry(who[&id]).or_default() += 1;
        }
    }
    // 5 s: the cap allows ~5 (60 rpm), the key ~50 (600 rpm), the rest goes to `free`.
    assert!(count["capped"] <= 6, "{count:?}");
    assert!(count["free"] >= 40, "{count:?}");
}

#[test]
fn weights_count_for_clients_that_send_one_request_at_a_time() {
    let (mut l, t0) = limiter(600.0, vec![], vec![]);
    let far = t0 + Duration::from_secs(600);
    let weight_of = |c: &str| if c == "heavy" { 3 } else { 1 };
    let ask_for = |c: &'static str| Ask {
        weight: weight_of(c),
        ..ask(c, far)
    };
    let _ = l.request_with(ask("first", far), t0);
    let mut who: HashMap<WaiterId, &'static str> = HashMap::new();
    for c in ["heavy", "light"] {
        if let Admission::Queued(id) = l.request_with(ask_for(c), t0) {
            who.insert(id, c);
        }
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut now = t0;
    while count.values().sum::<usize>() < 400 {
        now += Duration::from_millis(100);
        for (id, _) in grants(&l.poll(now)) {
            let c = who[&id];
            *count.entry(c).or_default() += 1;
            // Answered at once, the client sends its next request.
            match l.request_with(ask_for(c), now) {
                Admission::Queued(next) => {
                    who.insert(next, c);
                }
                other => panic!("{other:?}"),
            }
        }
    }
    let ratio = count["heavy"] as f64 / count["light"] as f64;
    assert!((2.9..=3.1).contains(&ratio), "{count:?}");
}

#[test]
fn a_shared_pool_asks_each_key_for_its_part_of_the_waiters() {
    let (mut l, t0) = limiter(60.0, vec![key("a", None), key("b", None)], vec![]);
    l.set_supply(0, Supply::Leased, t0, t0);
    l.set_supply(1, Supply::Leased, t0, t0);
    let far = t0 + Duration::from_secs(600);
    for i in 0..5 {
        let _ = l.request_with(ask(&format!("c{i}"), far), t0);
    }
    assert_eq!((l.slots_wanted(0, t0), l.slots_wanted(1, t0)), (3, 3));
    l.add_slots(
        1,
        &[t0 + Duration::from_secs(1)],
        Duration::from_secs(1),
        t0,
    );
    assert_eq!(
        (l.slots_wanted(0, t0), l.slots_wanted(1, t0)),
        (2, 2),
        "held slots of any key count"
    );
    assert!(l.revoke(1));
    assert_eq!(
        (l.slots_wanted(0, t0), l.slots_wanted(1, t0)),
        (5, 0),
        "a revoked key leases nothing"
    );
    let g = grants(&l.poll(t0 + Duration::from_millis(1500)));
    assert!(g.is_empty(), "slots of a revoked key are not used: {g:?}");
}

#[test]
fn tokens_saved_while_every_waiter_is_held_by_its_model_do_not_burst_out() {
    let (mut l, t0) = limiter(60.0, vec![], vec![model("busy", None, Some(1))]);
    let far = t0 + Duration::from_secs(3600);
    assert_eq!(
        l.request_with(ask_model("x", 0, far), t0),
        Admission::Granted
    );
    for i in 0..50 {
        let _ = l.request_with(ask_model(&format!("b{i}"), 0, far), t0);
    }
    // Ten minutes with every waiter held by the busy model: 600 tokens' worth of time.
    let mut now = t0;
    for _ in 0..600 {
        now += Duration::from_secs(1);
        assert!(grants(&l.poll(now)).is_empty());
    }
    for i in 0..20 {
        let _ = l.request_with(ask(&format!("other{i}"), far), now);
    }
    let burst = grants(&l.poll(now + Duration::from_millis(1))).len();
    assert!(
        burst <= 1,
        "{burst} grants at once after the stall (capacity 1)"
    );
}

#[test]
fn a_shared_key_that_probes_without_a_slot_does_not_wake_the_clock_in_a_loop() {
    let (mut l, t0) = limiter(60.0, vec![], vec![]);
    l.set_supply(0, Supply::Leased, t0, t0);
    l.add_slots(0, &[t0], Duration::from_secs(1), t0);
    assert_eq!(
        l.request_with(ask("x", t0 + Duration::from_secs(600)), t0),
        Admission::Granted
    );
    let grant = l.last_grant();
    l.observe_answer(
        &UpstreamSignal::RateLimited { retry_after: None },
        grant,
        t0,
    );
    assert!(l.controller().is_probing());
    let deadline = t0 + Duration::from_secs(120);
    let _ = l.request_with(ask("y", deadline), t0);
    let late = t0 + Duration::from_secs(30);
    assert!(grants(&l.poll(late)).is_empty(), "no slot: no probe");
    let wake = l.next_wakeup(late).unwrap();
    assert!(wake > late, "woken again at once: {:?}", wake - late);
    l.add_slots(
        0,
        &[late + Duration::from_secs(1)],
        Duration::from_secs(1),
        late,
    );
    assert_eq!(l.next_wakeup(late), Some(late + Duration::from_secs(1)));
}

#[test]
fn a_401_takes_a_key_out_at_once_and_403s_only_in_a_row() {
    let (mut l, t0) = limiter(
        60.0,
        vec![key("a", None), key("b", None), key("c", None)],
        vec![],
    );
    assert!(l.key_refused(0, true), "401: the key itself is refused");
    // A 403 may be about the model asked for: one, or two with an accepted answer between,
    // leave the key in the pool.
    assert!(!l.key_refused(1, false));
    let accepted = Grant {
        lane: 1,
        ..Grant::default()
    };
    l.observe_answer(&UpstreamSignal::Accepted { pause: None }, accepted, t0);
    assert!(!l.key_refused(1, false));
    assert!(!l.key_refused(1, false));
    assert!(l.key_active(1));
    assert!(l.key_refused(1, false), "the third in a row takes it out");
    assert!(!l.key_active(1));
    assert!(!l.key_refused(2, true), "the last key stays");
    l.reinstate(0);
    assert!(l.key_active(0), "a new value brings it back");
}
