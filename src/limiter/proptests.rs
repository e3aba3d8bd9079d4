//! Invariants of the limiter under random operations (proptest): one key with its
//! controller, and several keys with model and client limits.

use super::*;
use proptest::prelude::*;
use std::collections::HashSet;

mod one_key {
    use super::super::tests::{client, settings};
    use super::*;

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
                        if let Admission::Queued(id) = limiter.request_again_with(Ask::new(client(&c.to_string()), Priority::Normal, now + Duration::from_secs(3)), now) {
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
}

mod several_resources {
    use super::super::pool_tests::{key, model, retreat};
    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Arrive {
            client: u8,
            model: u8,
            timeout_ms: u16,
        },
        Cancel {
            nth: u8,
        },
        Advance {
            ms: u16,
        },
        Finish {
            nth: u8,
        },
        Drop {
            nth: u8,
        },
        Answer429 {
            nth: u8,
        },
        Capacity {
            model: u8,
        },
        Revoke {
            lane: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 0u8..3, 0u16..5000).prop_map(|(client, model, timeout_ms)| Op::Arrive { client, model, timeout_ms }),
            1 => any::<u8>().prop_map(|nth| Op::Cancel { nth }),
            4 => (0u16..2000).prop_map(|ms| Op::Advance { ms }),
            3 => any::<u8>().prop_map(|nth| Op::Finish { nth }),
            1 => any::<u8>().prop_map(|nth| Op::Drop { nth }),
            1 => any::<u8>().prop_map(|nth| Op::Answer429 { nth }),
            1 => (0u8..2).prop_map(|model| Op::Capacity { model }),
            1 => (0u8..3).prop_map(|lane| Op::Revoke { lane }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// With three keys, two model limits and a capped client: no grant goes out without a
        /// key's token and its model's slot, a model never has more in flight than its limit, a
        /// revoked key grants nothing, every waiter is answered exactly once, and once every
        /// request is over every slot is free again (no slot is lost).
        #[test]
        fn no_grant_without_every_resource_and_nothing_lost(ops in proptest::collection::vec(op(), 1..200)) {
            let t0 = Instant::now();
            let settings = LimiterSettings {
                keys: vec![key("a", None), key("b", Some(30.0)), key("c", None)],
                models: vec![model("one", None, Some(1)), model("rated", Some(30.0), Some(3))],
                client_caps: vec![ClientCap::rate("0", 20.0)],
                ..LimiterSettings::single(60.0, 2, 20, retreat())
            };
            let mut l = Limiter::new(settings, t0);
            let mut now = t0;
            let mut waiting: Vec<WaiterId> = Vec::new();
            let mut answered: HashSet<WaiterId> = HashSet::new();
            let mut out: Vec<Grant> = Vec::new();
            let mut revoked: HashSet<usize> = HashSet::new();

            let settle = |resolutions: Vec<Resolution>, waiting: &mut Vec<WaiterId>, answered: &mut HashSet<WaiterId>, out: &mut Vec<Grant>, revoked: &HashSet<usize>| {
                for r in resolutions {
                    let id = match r {
                        Resolution::Granted(id, grant) => {
                            prop_assert!(!revoked.contains(&grant.lane), "granted on revoked key {}", grant.lane);
                            out.push(grant);
                            id
                        }
                        Resolution::Expired { id, .. } => id,
                    };
                    prop_assert!(answered.insert(id), "waiter {} answered twice", id);
                    let pos = waiting.iter().position(|w| *w == id);
                    prop_assert!(pos.is_some(), "waiter {} answered but was not waiting", id);
                    waiting.remove(pos.unwrap());
                }
                Ok(())
            };

            for op in ops {
                match op {
                    Op::Arrive { client, model, timeout_ms } => {
                        let a = Ask {
                            model: (model < 2).then_some(usize::from(model)),
                            weight: u32::from(client) + 1,
                            ..Ask::new(Arc::from(client.to_string()), Priority::Normal, now + Duration::from_millis(u64::from(timeout_ms)))
                        };
                        match l.request_with(a, now) {
                            Admission::Queued(id) => waiting.push(id),
                            Admission::Granted => {
                                let grant = l.last_grant();
                                prop_assert!(!revoked.contains(&grant.lane));
                                out.push(grant);
                            }
                            Admission::Rejected { .. } => {}
                        }
                    }
                    Op::Cancel { nth } => {
                        if !waiting.is_empty() {
                            let id = waiting[nth as usize % waiting.len()];
                            prop_assert!(l.cancel(id, now));
                            waiting.retain(|w| *w != id);
                            answered.insert(id);
                        }
                    }
                    Op::Advance { ms } => {
                        now += Duration::from_millis(u64::from(ms));
                        settle(l.poll(now), &mut waiting, &mut answered, &mut out, &revoked)?;
                    }
                    Op::Finish { nth } => {
                        if !out.is_empty() {
                            let grant = out.remove(nth as usize % out.len());
                            l.observe_answer(&UpstreamSignal::Accepted { pause: None }, grant, now);
                            l.observe_capacity(grant, false, now);
                            l.release(grant);
                        }
                    }
                    Op::Drop { nth } => {
                        if !out.is_empty() {
                            let grant = out.remove(nth as usize % out.len());
                            l.refund(grant, now);
                        }
                    }
                    Op::Answer429 { nth } => {
                        if !out.is_empty() {
                            let grant = out.remove(nth as usize % out.len());
                            l.observe_answer(&UpstreamSignal::RateLimited { retry_after: None }, grant, now);
                            l.release(grant);
                        }
                    }
                    Op::Capacity { model } => l.observe_capacity(Grant { model: Some(usize::from(model)), ..Grant::default() }, true, now),
                    Op::Revoke { lane } => {
                        if l.revoke(usize::from(lane)) {
                            revoked.insert(usize::from(lane));
                        }
                    }
                }
                settle(l.poll(now), &mut waiting, &mut answered, &mut out, &revoked)?;
                let s = l.snapshot(now);
                for (i, m) in s.models.iter().enumerate() {
                    let holding = out.iter().filter(|g| g.model == Some(i)).count();
                    prop_assert_eq!(m.in_flight as usize, holding, "model {} slots in use", i);
                    prop_assert!(m.in_flight <= m.max_concurrency.unwrap_or(u32::MAX));
                }
                for k in &s.keys {
                    prop_assert!(k.tokens >= 0.0 && k.tokens <= 2.0 + 1e-9, "tokens {}", k.tokens);
                }
                prop_assert!(s.keys.iter().any(|k| k.active), "a key is always left");
                prop_assert_eq!(l.queue_len(), waiting.len(), "lost or phantom waiters");
            }
            // Every request ends; far in the future everyone still waiting has been answered.
            for grant in out.drain(..) {
                l.release(grant);
            }
            now += Duration::from_secs(3600);
            settle(l.poll(now), &mut waiting, &mut answered, &mut out, &revoked)?;
            prop_assert!(waiting.is_empty(), "never answered: {:?}", waiting);
            prop_assert!(l.snapshot(now).models.iter().all(|m| m.in_flight == 0), "a slot was lost");
        }
    }
}
