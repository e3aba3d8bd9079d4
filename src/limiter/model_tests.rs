//! What the limiter learns per model, at exact instants: who a 429 is charged to, lanes that
//! hold one model back while others pass, lockouts answered at once, learned concurrency.

use super::tests::{client, ms, settings};
use super::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ask(client_id: &str, model: &str, deadline: Instant) -> Ask {
    Ask {
        model_id: Some(Arc::from(model)),
        ..Ask::new(client(client_id), Priority::Normal, deadline)
    }
}

const OK: UpstreamSignal = UpstreamSignal::Accepted { pause: None };
const LIMITED: UpstreamSignal = UpstreamSignal::RateLimited { retry_after: None };

/// Grants everything due up to `until`, one poll per 100 ms; returns the grants with their
/// model.
fn run_until(
    l: &mut Limiter,
    from: Instant,
    until: Instant,
    models: &HashMap<WaiterId, &'static str>,
) -> Vec<(Instant, &'static str, Grant)> {
    let mut out = Vec::new();
    let mut now = from;
    while now <= until {
        for r in l.poll(now) {
            if let Resolution::Granted(id, grant) = r {
                out.push((now, models[&id], grant));
            }
        }
        now += ms(100);
    }
    out
}

use std::collections::HashMap;

/// One token a second; a request of the slow model holds the token, and three clients of
/// each model wait: the limiter, its start, the slow model's grant and the waiters' models.
fn slow_granted_others_waiting() -> (Limiter, Instant, Grant, HashMap<WaiterId, &'static str>) {
    let t0 = Instant::now();
    let mut l = Limiter::new(settings(60.0, 1, 100), t0);
    let far = t0 + secs(600);
    assert_eq!(
        l.request_with(ask("a", "slow", far), t0),
        Admission::Granted
    );
    let slow = l.last_grant();
    let mut models = HashMap::new();
    for i in 0..3 {
        models.insert(
            queued(l.request_with(ask(&format!("f{i}"), "fast", far), t0)),
            "fast",
        );
        models.insert(
            queued(l.request_with(ask(&format!("s{i}"), "slow", far), t0)),
            "slow",
        );
    }
    (l, t0, slow, models)
}

#[test]
fn a_429_on_one_model_while_another_is_accepted_lowers_that_model_only() {
    let (mut l, t0, slow, models) = slow_granted_others_waiting();
    // The slow model's request meets a 429 while the fast model's requests wait: the slow
    // model is charged for now, and the key is judged by the next fast request.
    l.observe_answer(&LIMITED, slow, t0 + ms(100));
    l.release(slow);
    let s = l.snapshot(t0 + ms(100));
    assert_eq!(s.keys[0].state, RetreatState::Normal, "the key is not cut");
    let granted = run_until(&mut l, t0 + ms(100), t0 + secs(1), &models);
    let (_, model, test) = granted[0];
    assert_eq!(model, "fast", "the slow model's lane holds it: {granted:?}");
    assert!(test.test, "the first fast request tests the key");
    l.observe_answer(&OK, test, t0 + secs(1));
    // The test was accepted: the key had room. Fast requests go at the key's rate (one a
    // second); of the slow model, only its lane's probe.
    let granted = run_until(&mut l, t0 + secs(1), t0 + secs(4), &models);
    assert_eq!(granted.len(), 3, "{granted:?}");
    let slow: Vec<Grant> = granted
        .iter()
        .filter(|(_, m, _)| *m == "slow")
        .map(|(_, _, g)| *g)
        .collect();
    assert!(slow.len() <= 1, "{granted:?}");
    assert!(slow.iter().all(|g| g.learned.unwrap().probe), "{slow:?}");
    assert_eq!(l.snapshot(t0 + secs(4)).keys[0].effective_rpm, 60.0);
    let lane = l.learned.lane(l.learned.find("slow").unwrap(), 0).unwrap();
    assert_eq!(lane.controller.state(), RetreatState::Retreat);
    assert!(lane.controller.is_probing());
}

#[test]
fn a_429_on_the_test_request_lowers_the_key_and_gives_the_model_back_its_lane() {
    let (mut l, t0, slow, models) = slow_granted_others_waiting();
    l.observe_answer(&LIMITED, slow, t0 + ms(100));
    let granted = run_until(&mut l, t0 + ms(100), t0 + secs(1), &models);
    let (_, _, test) = granted[0];
    assert!(test.test);
    // The fast model meets a 429 too: the key is full.
    l.observe_answer(&LIMITED, test, t0 + secs(1));
    let s = l.snapshot(t0 + secs(1));
    assert_eq!(s.keys[0].state, RetreatState::Retreat, "the key is cut");
    assert!(s.keys[0].probing);
    let lane = l.learned.lane(l.learned.find("slow").unwrap(), 0).unwrap();
    assert_eq!(
        lane.controller.state(),
        RetreatState::Normal,
        "the slow model was not the limit: its lane is as before"
    );
    assert!(!lane.limiting(t0 + secs(1)));
}

#[test]
fn one_model_alone_at_the_key_s_full_rate_lowers_the_key() {
    let t0 = Instant::now();
    let mut l = Limiter::new(settings(60.0, 1, 100), t0);
    let far = t0 + secs(600);
    let mut models = HashMap::new();
    // One model, ten clients: the key runs full (one a second) for a whole window (10 s).
    for i in 0..10 {
        if let Admission::Queued(id) = l.request_with(ask(&format!("c{i}"), "only", far), t0) {
            models.insert(id, "only");
        } else {
            l.observe_answer(&OK, l.last_grant(), t0);
        }
    }
    let mut last = None;
    let mut now = t0;
    while now <= t0 + secs(12) {
        for r in l.poll(now) {
            if let Resolution::Granted(_, grant) = r {
                l.observe_answer(&OK, grant, now);
                l.release(grant);
                let id = queued(l.request_with(ask("again", "only", far), now));
                models.insert(id, "only");
                last = Some(grant);
            }
        }
        now += ms(100);
    }
    let grant = last.unwrap();
    l.observe_answer(&LIMITED, grant, now);
    assert_eq!(
        l.snapshot(now).keys[0].state,
        RetreatState::Retreat,
        "a model alone that ran the key full met the key's limit"
    );
}

#[test]
fn a_model_locked_for_hours_is_answered_at_once_and_the_others_flow() {
    let t0 = Instant::now();
    let mut l = Limiter::new(settings(60.0, 1, 100), t0);
    let deadline = t0 + secs(300);
    assert_eq!(
        l.request_with(ask("a", "locked", deadline), t0),
        Admission::Granted
    );
    let locked = l.last_grant();
    let waiting_locked = queued(l.request_with(ask("b", "locked", deadline), t0));
    let waiting_other = queued(l.request_with(ask("c", "other", deadline), t0));
    let five_hours = secs(5 * 3600);
    l.observe_answer(
        &UpstreamSignal::RateLimited {
            retry_after: Some(five_hours),
        },
        locked,
        t0 + ms(100),
    );
    // The waiter of the locked model is answered at once, with a Retry-After of about five
    // hours; the other model's waiter gets its token when the key's next is due.
    let resolved = l.poll(t0 + ms(100));
    let locked_out = resolved.iter().find_map(|r| match r {
        Resolution::Expired {
            id,
            why,
            retry_after,
        } if *id == waiting_locked => Some((*why, *retry_after)),
        _ => None,
    });
    let (why, retry_after) = locked_out.expect("the locked model's waiter is answered");
    assert_eq!(why, Rejection::ModelLocked);
    assert!(retry_after >= five_hours - secs(1), "{retry_after:?}");
    assert!(
        retry_after <= five_hours + secs(31),
        "spread by at most 30 s"
    );
    let granted: Vec<WaiterId> = (1..=10)
        .flat_map(|i| l.poll(t0 + ms(100 * i)))
        .filter_map(|r| match r {
            Resolution::Granted(id, _) => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(granted, vec![waiting_other]);
    // A new request of the locked model is refused at once too; one of another model is not.
    match l.request_with(ask("d", "locked", t0 + secs(600)), t0 + secs(2)) {
        Admission::Rejected { why, .. } => assert_eq!(why, Rejection::ModelLocked),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!matches!(
        l.request_with(ask("e", "other", t0 + secs(600)), t0 + secs(2)),
        Admission::Rejected { .. }
    ));
    assert!(l.snapshot(t0 + secs(2)).keys[0].paused_for.is_none());
}

#[test]
fn a_request_the_queue_cannot_serve_before_its_deadline_is_told_at_once() {
    let t0 = Instant::now();
    // One token a second; 30 waiters of higher priority go first.
    let mut l = Limiter::new(settings(60.0, 1, 100), t0);
    let far = t0 + secs(600);
    assert_eq!(
        l.request(client("x"), Priority::High, far, t0),
        Admission::Granted
    );
    for i in 0..30 {
        queued(l.request(client(&format!("h{i}")), Priority::High, far, t0));
    }
    match l.request(client("n"), Priority::Normal, t0 + secs(10), t0) {
        Admission::Rejected { why, retry_after } => {
            assert_eq!(why, Rejection::QueueTimeout);
            assert!(retry_after >= secs(30), "{retry_after:?}");
        }
        other => panic!("expected to be told at once, got {other:?}"),
    }
    // With time enough it waits.
    queued(l.request(client("n"), Priority::Normal, t0 + secs(60), t0));
}

#[test]
fn worker_capacity_answers_lower_a_learned_model_s_concurrency_only() {
    let t0 = Instant::now();
    let mut l = Limiter::new(settings(600.0, 10, 100), t0);
    let far = t0 + secs(600);
    let mut out = Vec::new();
    for i in 0..4 {
        assert_eq!(
            l.request_with(ask(&format!("c{i}"), "busy", far), t0),
            Admission::Granted
        );
        out.push(l.last_grant());
    }
    l.observe_capacity(out[0], true, t0);
    l.release(out[0]);
    // Three in flight, the learned limit is two: the next one waits; another model does not.
    assert!(matches!(
        l.request_with(ask("d", "busy", far), t0),
        Admission::Queued(_)
    ));
    let m = l.learned.get(l.learned.find("busy").unwrap()).unwrap();
    assert_eq!(m.concurrency.concurrency_limit(), Some(2));
    assert_eq!(l.snapshot(t0).keys[0].effective_rpm, 600.0);
    assert_eq!(
        l.request_with(ask("e", "calm", far), t0 + secs(1)),
        Admission::Queued(1),
        "it queues behind the waiter of its class, and is served at the next poll"
    );
    let granted = l.poll(t0 + secs(1));
    assert_eq!(granted.len(), 1, "{granted:?}");
}

fn queued(admission: Admission) -> WaiterId {
    super::tests::queued(admission)
}

/// One model alone on its key: its 429 cuts the key, as with any single-model client. The
/// first request of another model shows that the key may not have been the limit: the
/// retreat goes to the first model's lane, and the key starts again from its base rate.
#[test]
fn a_retreat_learned_from_one_model_alone_goes_to_that_model_when_another_comes() {
    let t0 = Instant::now();
    let mut l = Limiter::new(settings(60.0, 1, 100), t0);
    let far = t0 + secs(600);
    assert_eq!(
        l.request_with(ask("a", "slow", far), t0),
        Admission::Granted
    );
    let slow = l.last_grant();
    l.observe_answer(&LIMITED, slow, t0 + ms(100));
    l.release(slow);
    assert_eq!(
        l.snapshot(t0 + ms(100)).keys[0].state,
        RetreatState::Retreat
    );
    queued(l.request_with(ask("b", "fast", far), t0 + secs(1)));
    let s = l.snapshot(t0 + secs(1));
    assert_eq!(s.keys[0].state, RetreatState::Normal, "{s:?}");
    assert_eq!(s.keys[0].effective_rpm, 60.0);
    let lane = &s.keys[0]
        .models
        .iter()
        .find(|m| &*m.model == "slow")
        .unwrap();
    assert!(lane.limiting, "{lane:?}");
    assert_eq!(lane.state, RetreatState::Retreat);
    // The fast model goes at the key's rate; the slow one only as its lane's probe.
    let granted: Vec<Grant> = (10..40)
        .flat_map(|i| l.poll(t0 + ms(100 * i)))
        .filter_map(|r| match r {
            Resolution::Granted(_, g) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(granted.len(), 1, "{granted:?}");
}

/// A model `models:` gives a rate shows that rate as its lane's ceiling, from `config`, while
/// nothing was learned of it.
#[test]
fn a_configured_model_rate_shows_as_the_lane_s_ceiling() {
    let t0 = Instant::now();
    let settings = LimiterSettings {
        models: vec![ModelSettings {
            pattern: "meta/*".to_string(),
            rate_rpm: Some(12.0),
            max_concurrency: None,
            tpm: None,
        }],
        ..settings(60.0, 1, 100)
    };
    let mut l = Limiter::new(settings, t0);
    let request = Ask {
        model: Some(0),
        ..ask("a", "meta/llama", t0 + secs(60))
    };
    assert_eq!(l.request_with(request, t0), Admission::Granted);
    let s = l.snapshot(t0);
    let lane = &s.keys[0].models[0];
    assert_eq!(lane.learning.ceiling_rpm, Some(12.0));
    assert_eq!(lane.learning.ceiling_source, Some("config"));
}

/// The fast model keeps the key full for a whole window while the slow model's lane holds it
/// below the key; then a slow request meets a 429 at an instant when no fast request happens
/// to wait. The key is full of what the upstream accepts, and no fast request met a 429: the
/// 429 is the slow model's, and the key keeps its rate.
#[test]
fn a_limited_model_s_429_on_a_key_the_others_fill_is_the_model_s() {
    let (mut l, t0, slow, mut models) = slow_granted_others_waiting();
    let far = t0 + secs(600);
    l.observe_answer(&LIMITED, slow, t0 + ms(100));
    l.release(slow);
    let mut now = t0 + ms(100);
    let mut n = 0;
    let mut last_slow = None;
    while now < t0 + secs(15) {
        now += ms(100);
        for r in l.poll(now) {
            if let Resolution::Granted(id, grant) = r {
                let model = models[&id];
                l.observe_answer(&OK, grant, now);
                l.release(grant);
                if model == "slow" {
                    last_slow = Some(now);
                }
                n += 1;
                let next = queued(l.request_with(ask(&format!("{model}{n}"), model, far), now));
                models.insert(next, model);
            }
        }
    }
    assert!(last_slow.is_some(), "the slow lane lets some through");
    assert_eq!(l.snapshot(now).keys[0].state, RetreatState::Normal);
    // Nobody of the fast model waits at this instant; the next slow grant meets a 429.
    let fast: Vec<WaiterId> = models
        .iter()
        .filter(|(id, m)| **m == "fast" && l.is_waiting(**id))
        .map(|(id, _)| *id)
        .collect();
    for id in fast {
        l.cancel(id, now);
    }
    let mut slow_grant = None;
    while slow_grant.is_none() && now < t0 + secs(60) {
        now += ms(100);
        for r in l.poll(now) {
            if let Resolution::Granted(_, grant) = r {
                slow_grant = Some(grant);
            }
        }
    }
    let slow_grant = slow_grant.expect("a slow request is granted");
    l.observe_answer(&LIMITED, slow_grant, now);
    let key = &l.snapshot(now).keys[0];
    assert_eq!(
        key.state,
        RetreatState::Normal,
        "the key was cut for the model's 429"
    );
    assert_eq!(key.effective_rpm, 60.0);
}
