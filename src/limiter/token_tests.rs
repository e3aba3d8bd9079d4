//! Token budgets (`tpm`) in the limiter, at exact instants: admission never lets a window see
//! more than the budget, the unused part of a reservation comes back, small requests go past a
//! big one without putting it off, and a request larger than a budget is told at once.

use super::tests::{client, granted, ms, queued, settings};
use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

fn tokens(prompt: u32) -> Option<TokenAsk> {
    Some(TokenAsk {
        prompt,
        completion: Some(0),
        known: true,
    })
}

fn ask(who: &str, prompt: u32, deadline: Instant) -> Ask {
    Ask {
        tokens: tokens(prompt),
        ..Ask::new(client(who), Priority::Normal, deadline)
    }
}

/// One key at `rpm` with a budget of `tpm`.
fn budgeted(rpm: f64, tpm: u64, t0: Instant) -> Limiter {
    Limiter::new(
        LimiterSettings {
            base_tpm: Some(tpm),
            ..settings(rpm, 1, 10_000)
        },
        t0,
    )
}

/// The estimate and the limit of a request refused as larger than a whole budget.
fn too_large(admission: Admission) -> (u32, u64) {
    match admission {
        Admission::Rejected {
            why: Rejection::TooLarge { tokens, limit },
            ..
        } => (tokens, limit),
        other => panic!("expected request_too_large, got {other:?}"),
    }
}

fn usage(prompt: u64) -> Usage {
    Usage {
        prompt,
        completion: 0,
    }
}

#[test]
fn a_request_over_the_whole_budget_is_told_at_once() {
    let t0 = Instant::now();
    let mut l = budgeted(600.0, 10_000, t0);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        too_large(l.request_with(ask("a", 10_001, far), t0)),
        (10_001, 10_000)
    );
    assert_eq!(
        l.request_with(ask("a", 10_000, far), t0),
        Admission::Granted
    );
    // A guess (the body was not in hand) is held to the budget, never refused.
    let guess = Ask {
        tokens: Some(TokenAsk {
            prompt: 50_000,
            completion: None,
            known: false,
        }),
        ..Ask::new(client("b"), Priority::Normal, far)
    };
    assert!(matches!(l.request_with(guess, t0), Admission::Queued(_)));
}

#[test]
fn what_the_upstream_did_not_count_comes_back_at_once() {
    let t0 = Instant::now();
    let mut l = budgeted(600.0, 20_000, t0);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        l.request_with(ask("a", 15_000, far), t0),
        Admission::Granted
    );
    let grant = l.last_grant();
    let next = queued(l.request_with(ask("b", 10_000, far), t0 + ms(200)));
    assert!(granted(&l.poll(t0 + ms(500))).is_empty());
    l.settle_tokens(grant, usage(3_000), t0 + ms(600));
    assert_eq!(granted(&l.poll(t0 + ms(600))), vec![next]);
}

#[test]
fn small_requests_go_past_a_big_one_but_never_put_it_off() {
    let t0 = Instant::now();
    let mut l = budgeted(6_000.0, 20_000, t0);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        l.request_with(ask("a", 15_000, far), t0),
        Admission::Granted
    );
    let big = queued(l.request_with(ask("big", 12_000, far), t0 + ms(10)));
    let small = queued(l.request_with(ask("small", 500, far), t0 + ms(20)));
    let greedy = queued(l.request_with(ask("greedy", 8_500, far), t0 + ms(30)));
    let got = granted(&l.poll(t0 + ms(100)));
    assert_eq!(
        got,
        vec![small],
        "the small one fits beside the big one's turn"
    );
    assert!(l.is_waiting(big) && l.is_waiting(greedy));
    // The 15k leave the window 61 s after their slot began: the big one goes then, on time,
    // and the one that would have put it off goes only once there is room again.
    assert!(granted(&l.poll(t0 + ms(60_900))).is_empty());
    let got = granted(&l.poll(t0 + Duration::from_secs(61)));
    assert_eq!(got, vec![big]);
    assert!(l.is_waiting(greedy));
    assert!(
        granted(&l.poll(t0 + ms(121_900))).is_empty(),
        "the greedy one waits for the big one to leave"
    );
    assert_eq!(
        granted(&l.poll(t0 + Duration::from_secs(122))),
        vec![greedy]
    );
}

/// Clients sending 12k-token prompts and clients sending 200-token prompts against one key
/// with a budget of 100k a minute and room for 600 requests: every client keeps one request
/// waiting, and each is counted as estimated. No minute sees more than the budget, the budget
/// is used, and the fairness order holds (`fair_share: requests`): every client gets about
/// as many requests as the others, the big ones theirs on time, the small ones theirs and
/// what fits beside.
#[test]
fn a_budget_is_used_and_never_exceeded_in_any_window() {
    let t0 = Instant::now();
    let mut l = budgeted(600.0, 100_000, t0);
    let far = t0 + Duration::from_secs(3_600);
    let clients: Vec<(String, u32)> = (0..3)
        .map(|i| (format!("big{i}"), 12_000))
        .chain((0..6).map(|i| (format!("small{i}"), 200)))
        .collect();
    let mut waiting: HashMap<WaiterId, usize> = HashMap::new();
    let mut grants: Vec<(Instant, u64, usize)> = Vec::new();
    let arrive = |l: &mut Limiter, c: usize, now: Instant, grants: &mut Vec<_>| match l
        .request_with(ask(&clients[c].0, clients[c].1, far), now)
    {
        Admission::Granted => {
            grants.push((now, u64::from(clients[c].1), c));
            None
        }
        Admission::Queued(id) => Some(id),
        other => panic!("{other:?}"),
    };
    let mut again: Vec<(Instant, usize)> = Vec::new();
    for c in 0..clients.len() {
        if let Some(id) = arrive(&mut l, c, t0, &mut grants) {
            waiting.insert(id, c);
        } else {
            again.push((t0 + ms(500), c));
        }
    }
    let end = t0 + Duration::from_secs(600);
    let mut now = t0;
    while now < end {
        now += ms(100);
        for id in granted(&l.poll(now)) {
            let c = waiting.remove(&id).expect("a waiter of ours");
            grants.push((now, u64::from(clients[c].1), c));
            // Answered half a second later; the client comes back at once.
            again.push((now + ms(500), c));
        }
        let due: Vec<usize> = again
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, c)| *c)
            .collect();
        again.retain(|(at, _)| *at > now);
        for c in due {
            match arrive(&mut l, c, now, &mut grants) {
                Some(id) => {
                    waiting.insert(id, c);
                }
                None => again.push((now + ms(500), c)),
            }
        }
    }
    for (i, (at, _, _)) in grants.iter().enumerate() {
        let in_window: u64 = grants[..=i]
            .iter()
            .filter(|(t, _, _)| *at - *t < TOKEN_WINDOW)
            .map(|(_, n, _)| n)
            .sum();
        assert!(
            in_window <= 100_000,
            "{in_window} tokens in the 60 s to {at:?}"
        );
    }
    // The first and the last minute are partial.
    let from = t0 + Duration::from_secs(60);
    let to = t0 + Duration::from_secs(540);
    let used: u64 = grants
        .iter()
        .filter(|(t, _, _)| *t >= from && *t < to)
        .map(|(_, n, _)| n)
        .sum();
    let budget = 100_000.0 * 8.0;
    assert!(
        used as f64 >= 0.9 * budget,
        "{used} of {budget} tokens used"
    );
    let served = |prefix: &str| {
        grants
            .iter()
            .filter(|(_, _, c)| clients[*c].0.starts_with(prefix))
            .count()
    };
    let (big, small) = (served("big"), served("small"));
    println!("grants: big {big}, small {small}; {used} tokens of {budget}");
    // Requests shared equally: n each with 3 * 12000 n + 6 * 200 n tokens in about 10 minutes.
    let fair = 1_000_000.0 / (3.0 * 12_000.0 + 6.0 * 200.0);
    for (c, (name, _)) in clients.iter().enumerate() {
        let n = grants.iter().filter(|(_, _, g)| *g == c).count();
        assert!(
            n as f64 >= 0.8 * fair,
            "{name} starved: {n} grants, fair {fair:.0}"
        );
    }
    assert!(
        small / 6 >= big / 3,
        "the small ones lose nothing to the big ones"
    );
}

#[test]
fn a_model_and_a_client_budget_hold_their_own_requests_only() {
    let t0 = Instant::now();
    let settings = LimiterSettings {
        models: vec![ModelSettings {
            pattern: "heavy".to_string(),
            rate_rpm: None,
            max_concurrency: None,
            tpm: Some(10_000),
        }],
        client_caps: vec![ClientCap {
            id: client("capped"),
            rate_rpm: None,
            tpm: Some(5_000),
        }],
        ..settings(6_000.0, 1, 100)
    };
    let mut l = Limiter::new(settings, t0);
    let far = t0 + Duration::from_secs(600);
    let heavy = |who: &str, prompt| Ask {
        model: Some(0),
        ..ask(who, prompt, far)
    };
    assert_eq!(l.request_with(heavy("a", 9_000), t0), Admission::Granted);
    let held = queued(l.request_with(heavy("b", 2_000), t0 + ms(1)));
    assert_eq!(
        l.request_with(ask("b", 2_000, far), t0 + ms(2)),
        Admission::Queued(held + 1),
        "behind a waiter of its class"
    );
    let got = granted(&l.poll(t0 + ms(10)));
    assert_eq!(
        got,
        vec![held + 1],
        "another model is not held by heavy's budget"
    );
    let first = queued(l.request_with(ask("capped", 4_000, far), t0 + ms(20)));
    assert_eq!(granted(&l.poll(t0 + ms(25))), vec![first]);
    let capped = queued(l.request_with(ask("capped", 2_000, far), t0 + ms(30)));
    let free = queued(l.request_with(ask("free", 2_000, far), t0 + ms(40)));
    assert_eq!(granted(&l.poll(t0 + ms(50))), vec![free]);
    assert!(l.is_waiting(capped) && l.is_waiting(held));
    let refused = l.request_with(ask("capped", 5_001, far), t0 + ms(60));
    assert_eq!(too_large(refused).1, 5_000);
}

#[test]
fn a_reload_changes_the_budget_and_keeps_what_was_reserved() {
    let t0 = Instant::now();
    let mut l = budgeted(600.0, 10_000, t0);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(l.request_with(ask("a", 8_000, far), t0), Admission::Granted);
    let next = queued(l.request_with(ask("b", 8_000, far), t0));
    let wider = LimiterSettings {
        base_tpm: Some(20_000),
        ..settings(600.0, 1, 10_000)
    };
    l.set_limits(&wider, t0 + ms(100));
    assert_eq!(granted(&l.poll(t0 + ms(100))), vec![next]);
    let none = settings(600.0, 1, 10_000);
    l.set_limits(&none, t0 + ms(200));
    assert_eq!(
        l.request_with(ask("c", 80_000, far), t0 + ms(200)),
        Admission::Granted
    );
}

#[test]
fn the_estimate_is_calibrated_by_what_the_upstream_counts() {
    let t0 = Instant::now();
    let mut l = budgeted(6_000.0, 1_000_000, t0);
    let far = t0 + Duration::from_secs(600);
    let model = |prompt| Ask {
        model_id: Some(Arc::from("m")),
        ..ask("a", prompt, far)
    };
    for i in 0..20u64 {
        let now = t0 + ms(100 * i);
        assert_eq!(l.request_with(model(1_000), now), Admission::Granted);
        // The upstream counts half as many prompt tokens as estimated.
        l.settle_tokens(l.last_grant(), usage(500), now);
    }
    let m = l.learned.intern(&Arc::from("m"), t0).unwrap();
    let factor = l.calibration_of(Some(m)).factor;
    assert!((factor - 0.5).abs() < 0.01, "{factor}");
    assert_eq!(
        l.calibration_of(None).factor,
        1.0,
        "another model's is its own"
    );
}

/// The tokens that count at `now` by the test's own ledger: every grant of the last 60 s, as
/// last settled.
fn live(charged: &[(Instant, u64)], now: Instant) -> u64 {
    charged
        .iter()
        .filter(|(t, _)| now - *t < TOKEN_WINDOW)
        .map(|(_, n)| n)
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// No grant without a request token and room in the token budget: over any run of
    /// arrivals, polls and settlements (above and below the estimate), each grant fits in what
    /// the last 60 s hold as settled so far, and no more requests go than the rate allows.
    #[test]
    fn no_grant_without_both_budgets(
        ops in proptest::collection::vec((0u8..4, 1u32..6_000, 0u16..3_000, 0u8..4), 1..120)
    ) {
        let t0 = Instant::now();
        let (rpm, tpm) = (120.0, 10_000u64);
        let mut l = budgeted(rpm, tpm, t0);
        let far = t0 + Duration::from_secs(3_600);
        let mut now = t0;
        // (when, tokens as last settled) of every grant.
        let mut charged: Vec<(Instant, u64)> = Vec::new();
        let mut pending: HashMap<WaiterId, u32> = HashMap::new();
        let mut open: Vec<(Grant, usize)> = Vec::new();
        for (kind, prompt, step, settle) in ops {
            now += ms(u64::from(step));
            let mut grant = |grant: Grant, hold: Option<TokenHold>, prompt: u32, charged: &mut Vec<(Instant, u64)>| {
                // What the limiter reserved: the prompt as calibrated by the settlements so far.
                let hold = hold.expect("a grant of a request with a cost holds tokens");
                prop_assert_eq!(hold.ask.prompt, prompt);
                let cost = u64::from(hold.cost.tokens);
                prop_assert!(
                    live(charged, now) + cost <= tpm,
                    "granted {cost} with {} counting", live(charged, now)
                );
                open.push((grant, charged.len()));
                charged.push((now, cost));
                Ok(())
            };
            match kind {
                0 | 1 => {
                    let who = format!("c{}", prompt % 4);
                    match l.request_with(ask(&who, prompt, far), now) {
                        Admission::Granted => {
                            let g = l.last_grant();
                            grant(g, l.token_hold(g), prompt, &mut charged)?
                        }
                        Admission::Queued(id) => {
                            pending.insert(id, prompt);
                        }
                        Admission::Rejected { .. } => {}
                    }
                }
                2 => {
                    for r in l.poll(now) {
                        if let Resolution::Granted(id, g) = r {
                            let prompt = pending.remove(&id).unwrap();
                            grant(g, l.token_hold(g), prompt, &mut charged)?;
                        }
                    }
                }
                _ => {
                    if let Some((g, i)) = open.pop() {
                        // The upstream counted less, or more, than estimated.
                        let actual = charged[i].1 * u64::from(settle) / 2;
                        l.settle_tokens(g, usage(actual), now);
                        charged[i].1 = actual;
                    }
                }
            }
        }
        let run = (now - t0).as_secs_f64();
        prop_assert!(
            charged.len() as f64 <= 1.0 + rpm / 60.0 * run + 1e-6,
            "{} grants in {run} s", charged.len()
        );
    }
}

#[test]
fn a_stated_token_limit_becomes_the_key_s_budget_and_what_is_spent_waits_for_its_reset() {
    let t0 = Instant::now();
    let mut l = Limiter::new(settings(600.0, 1, 100), t0);
    let far = t0 + Duration::from_secs(600);
    assert_eq!(
        l.request_with(ask("a", 30_000, far), t0),
        Admission::Granted
    );
    let grant = l.last_grant();
    // The answer says: 40k a minute, 2k left (other users of the key spent the rest), back in 5 s.
    l.observe_stated_tokens(
        grant,
        StatedTokens {
            limit: 40_000,
            remaining: Some(2_000),
            reset: Some(Duration::from_secs(5)),
        },
        t0 + ms(100),
    );
    l.settle_tokens(grant, usage(30_000), t0 + ms(100));
    let refused = l.request_with(ask("b", 40_001, far), t0 + ms(200));
    assert_eq!(
        too_large(refused).1,
        40_000,
        "the stated limit is the budget"
    );
    let next = queued(l.request_with(ask("b", 5_000, far), t0 + ms(300)));
    // 38k spent until about 5 s (the reset rounded up to the next second).
    assert!(
        granted(&l.poll(t0 + ms(4_900))).is_empty(),
        "what is spent counts until its reset"
    );
    assert_eq!(granted(&l.poll(t0 + ms(6_200))), vec![next]);
    // A configured budget wins over a stated one; what the upstream says remains still counts.
    let mut configured = budgeted(600.0, 100_000, t0);
    assert_eq!(
        configured.request_with(ask("a", 1_000, far), t0),
        Admission::Granted
    );
    let g = configured.last_grant();
    configured.observe_stated_tokens(
        g,
        StatedTokens {
            limit: 10_000,
            remaining: Some(0),
            reset: None,
        },
        t0,
    );
    assert!(matches!(
        configured.request_with(ask("b", 20_000, far), t0 + ms(100)),
        Admission::Queued(_)
    ));
}

/// An upstream that allows `rpm` requests and `tpm` prompt tokens in any 60 s, and says
/// nothing about tokens (NVIDIA's), against clients that each keep one request going.
struct HiddenTokenQuota {
    rpm: usize,
    tpm: u64,
    accepted: Vec<(Instant, u64)>,
    refused: usize,
}

impl HiddenTokenQuota {
    fn answer(&mut self, tokens: u64, now: Instant) -> bool {
        let live: Vec<&(Instant, u64)> = self
            .accepted
            .iter()
            .filter(|(t, _)| now - *t < TOKEN_WINDOW)
            .collect();
        let used: u64 = live.iter().map(|(_, n)| n).sum();
        let ok = live.len() < self.rpm && used + tokens <= self.tpm;
        if ok {
            self.accepted.push((now, tokens));
        } else {
            self.refused += 1;
        }
        ok
    }
}

/// What the run served: the answers accepted to the big and the small clients, the upstream's
/// 429s, the key's rate at the end, and its token budget. `priced` false asks as before token
/// budgets: no request has a cost.
fn run_hidden(seconds: u64, priced: bool) -> (usize, usize, usize, f64, Option<u64>) {
    run_against(seconds, priced, 40, 100_000)
}

/// `run_hidden` against an upstream of `rpm` requests and `tpm` tokens a minute.
fn run_against(
    seconds: u64,
    priced: bool,
    rpm: usize,
    tpm: u64,
) -> (usize, usize, usize, f64, Option<u64>) {
    let t0 = Instant::now();
    let mut l = Limiter::new(settings(40.0, 1, 100), t0);
    let mut upstream = HiddenTokenQuota {
        rpm,
        tpm,
        accepted: Vec::new(),
        refused: 0,
    };
    let far = t0 + Duration::from_secs(3_600);
    // Three clients of 12k-token prompts, six of 100-token ones; an answer takes a second.
    let clients: Vec<(String, u32)> = (0..3)
        .map(|i| (format!("big{i}"), 12_000))
        .chain((0..6).map(|i| (format!("small{i}"), 100)))
        .collect();
    let mut waiting: HashMap<WaiterId, usize> = HashMap::new();
    // Requests granted now, to go out; answers that end later (when, client, grant).
    let mut sent: Vec<(usize, Grant)> = Vec::new();
    let mut ending: Vec<(Instant, usize, Grant)> = Vec::new();
    let mut served = [0usize; 2];
    let queue = |l: &mut Limiter,
                 c: usize,
                 again: bool,
                 now: Instant,
                 waiting: &mut HashMap<WaiterId, usize>,
                 sent: &mut Vec<(usize, Grant)>| {
        let a = ask(&clients[c].0, clients[c].1, far);
        let a = if priced { a } else { Ask { tokens: None, ..a } };
        let admission = if again {
            l.request_again_with(a, now)
        } else {
            l.request_with(a, now)
        };
        match admission {
            Admission::Granted => sent.push((c, l.last_grant())),
            Admission::Queued(id) => {
                waiting.insert(id, c);
            }
            other => panic!("{other:?}"),
        }
    };
    let mut now = t0;
    for c in 0..clients.len() {
        queue(&mut l, c, false, now, &mut waiting, &mut sent);
    }
    let end = t0 + Duration::from_secs(seconds);
    while now < end {
        now += ms(50);
        let done: Vec<(Instant, usize, Grant)> =
            ending.iter().copied().filter(|e| e.0 <= now).collect();
        ending.retain(|e| e.0 > now);
        for (_, c, grant) in done {
            let tokens = u64::from(clients[c].1);
            l.settle_tokens(grant, usage(tokens), now);
            queue(&mut l, c, false, now, &mut waiting, &mut sent);
        }
        for r in l.poll(now) {
            if let Resolution::Granted(id, grant) = r {
                let c = waiting.remove(&id).unwrap();
                sent.push((c, grant));
            }
        }
        // The upstream counts a request when it arrives, and answers a 429 at once.
        while !sent.is_empty() {
            for (c, grant) in std::mem::take(&mut sent) {
                let tokens = u64::from(clients[c].1);
                if upstream.answer(tokens, now) {
                    l.observe_answer(&UpstreamSignal::Accepted { pause: None }, grant, now);
                    served[usize::from(c >= 3)] += 1;
                    ending.push((now + Duration::from_secs(1), c, grant));
                } else {
                    l.observe_answer(
                        &UpstreamSignal::RateLimited { retry_after: None },
                        grant,
                        now,
                    );

                    queue(&mut l, c, true, now, &mut waiting, &mut sent);
                }
            }
        }
    }
    let budget = l.snapshot(now).keys[0].token_budget.as_ref().map(|b| b.tpm);
    (
        served[0],
        served[1],
        upstream.refused,
        l.controller().effective_rpm(),
        budget,
    )
}

/// NVIDIA's hidden limit: 40 requests and 100k prompt tokens a minute per key, nothing said
/// about tokens. Three clients send 12k-token prompts, six send 100-token ones, for 150 s.
/// Told nothing, the sidecar learns a token budget from the first 429s on big prompts and keeps
/// its request rate: it serves nearly all the 100 requests the rate allows, with a handful of
/// 429s. Without the estimate (no request has a cost, as before token budgets) the rate is cut
/// for the token limit's 429s.
#[test]
fn a_hidden_token_limit_is_learned_and_the_request_rate_kept() {
    let (big, small, refused, rpm, budget) = run_hidden(150, true);
    let (big_before, small_before, refused_before, rpm_before, _) = run_hidden(150, false);
    println!(
        "learning: big {big}, small {small}, upstream 429s {refused}, key rate {rpm:.1}, budget {budget:?}; \
         without: big {big_before}, small {small_before}, 429s {refused_before}, rate {rpm_before:.1}"
    );
    assert!(big + small >= 90, "{} served of about 100", big + small);
    assert!(refused <= 6, "{refused} upstream 429s");
    assert!(rpm >= 39.0, "the request rate was cut: {rpm}");
    assert!(
        budget.is_some_and(|b| (80_000..=110_000).contains(&b)),
        "{budget:?}"
    );
    assert!(big >= 15, "the big clients starved: {big}");
    assert!(
        big + small > big_before + small_before,
        "learning gained nothing"
    );
    // A request limit (20 a minute against the sidecar's 40) with the same mix and no token
    // limit: learning tokens costs no more 429s than not, and the rate is cut as before.
    let (big, small, refused, rpm, budget) = run_against(150, true, 20, u64::MAX);
    let (big_before, small_before, refused_before, rpm_before, _) =
        run_against(150, false, 20, u64::MAX);
    println!(
        "request limit: served {} ({} without learning), upstream 429s {refused} ({refused_before}), rate {rpm:.1} ({rpm_before:.1}), budget {budget:?}",
        big + small,
        big_before + small_before
    );
    assert!(
        refused <= refused_before + 2,
        "{refused} 429s against {refused_before}"
    );
    assert!(big + small + 3 >= big_before + small_before);
    assert_eq!(budget, None, "a token budget learned from a request limit");
    // Ten minutes: the budget keeps finding the limit, a 429 now and then.
    let (big, small, refused, rpm, budget) = run_hidden(600, true);
    println!("ten minutes: big {big}, small {small}, upstream 429s {refused}, key rate {rpm:.1}, budget {budget:?}");
    assert!(big + small >= 360, "{} served of about 400", big + small);
    assert!(refused <= 12, "{refused} upstream 429s in ten minutes");
}
