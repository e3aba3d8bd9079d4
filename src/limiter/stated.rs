//! `rate_rpm: auto`: the upstream's stated limits set the rates. A limit stated on the answer
//! to a request of a model is that model's on its key; the key runs at the highest limit
//! stated on it, so that no model is held below its own. Until anything is stated, the
//! route's rate is 40 (NVIDIA's usual figure) and 429s teach the rest.
//!
//! Stated values are taken with care: what is no limit at all is dropped when it is read
//! (`StatedLimit::read`); a limit well below what the lane was seen to accept over its last
//! window contradicts it and is ignored; a limit above the rate now raises it to at most one
//! and a half times what the upstream accepted over the last window (this answer included),
//! so a huge or false value never lifts the rate far above what was accepted; and a ceiling
//! learned from 429s still caps recovery.

use std::time::Instant;

use super::{Grant, Limiter, StatedLimit, StatedTokens, TOKEN_WINDOW};

/// The lowest token budget a statement sets: less is more likely a hostile value than a limit.
const STATED_MIN_TPM: u64 = 1_000;

/// A stated limit below this share of what the lane accepted over its last window
/// contradicts what was seen, and is ignored.
const CONTRADICTS_BELOW: f64 = 0.9;

/// A stated limit raises the rate to at most this multiple of what the upstream accepted
/// over the last window. At twice, a false limit could double the rate into a full window,
/// and the usual halving would land just at the quota: more 429s than one incident should
/// cost.
const RAISE_AT_MOST: f64 = 1.5;

/// The lowest rate a statement sets (a model limited to less than this by a stated value is
/// more likely a hostile value than a limit).
const STATED_MIN_RPM: f64 = 1.0;

impl Limiter {
    /// Takes the limit the upstream stated on its answer to `grant` (with `rate_rpm: auto`).
    pub fn observe_stated(&mut self, grant: Grant, stated: StatedLimit, now: Instant) {
        if !self.auto {
            return;
        }
        self.advance(now);
        let k = grant.lane.min(self.lanes.len() - 1);
        let rpm = stated.rpm.max(STATED_MIN_RPM);
        if let Some(mg) = grant.learned {
            let key_rpm = self.lanes[k].controller.effective_rpm();
            if let Some(lane) = self
                .learned
                .lane_mut(mg.model, k, key_rpm, &self.retreat, now)
            {
                let accepted = lane.controller.accepted_rpm(now);
                if rpm >= CONTRADICTS_BELOW * accepted {
                    lane.stated = Some(rpm);
                }
            }
        }
        let key = &mut self.lanes[k];
        if key.own_rpm.is_some() {
            // The operator set this key's rate: that wins.
            return;
        }
        let highest = key.stated.map_or(rpm, |s| s.max(rpm));
        let stated_for_key = if grant.learned.is_none() {
            rpm
        } else {
            highest
        };
        let accepted = key.controller.accepted_rpm(now);
        if stated_for_key < CONTRADICTS_BELOW * accepted {
            return;
        }
        // What was accepted, counting the answer that states the limit (not recorded yet).
        let window = key.controller.settings().window.as_secs_f64().max(1e-3);
        let accepted = accepted + 60.0 / window;
        key.stated = Some(stated_for_key);
        let current = key.controller.base_rpm();
        let base = if stated_for_key > current {
            stated_for_key.min(current.max(RAISE_AT_MOST * accepted))
        } else {
            stated_for_key
        };
        if (base - current).abs() > 1e-9 {
            key.controller.set_base_rpm(base);
        }
    }
}

impl Limiter {
    /// Takes the token limit the upstream stated on its answer to `grant`, whatever
    /// `rate_rpm` is: a key without a `tpm` of its own (or the route's) gets that budget, and
    /// what the upstream says is spent beyond what this sidecar counted (its own requests not
    /// settled yet, other users of the key) counts as spent until the upstream says it is back.
    pub fn observe_stated_tokens(&mut self, grant: Grant, stated: StatedTokens, now: Instant) {
        self.advance(now);
        let k = grant.lane.min(self.lanes.len() - 1);
        let base_tpm = self.base_tpm;
        let lane = &mut self.lanes[k];
        if lane.own_tpm.or(base_tpm).is_none() {
            let tpm = stated.limit.max(STATED_MIN_TPM);
            lane.stated_tpm = Some(tpm);
            lane.adopt_tpm(tpm);
        }
        let (Some(window), Some(remaining)) = (lane.tokens.as_mut(), stated.remaining) else {
            return;
        };
        // What remains is the upstream's word, whatever budget this sidecar has: no more than
        // that goes until the reset.
        let spent = window.limit().saturating_sub(remaining);
        let counted = window.used(now);
        if spent > counted {
            let until = now + stated.reset.unwrap_or(TOKEN_WINDOW).min(TOKEN_WINDOW);
            window.spent_until(spent - counted, until, now);
        }
        // Tokens spent may hold waiters that fit later: the clock looks again.
        self.stalled = false;
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::super::tests::{client, ms};
    use super::super::*;
    use std::time::Duration;

    fn auto(window_s: u64) -> LimiterSettings {
        LimiterSettings {
            auto: true,
            ..LimiterSettings::single(
                40.0,
                1,
                100,
                RetreatSettings {
                    window: Duration::from_secs(window_s),
                    ..RetreatSettings::default()
                },
            )
        }
    }

    /// Closed-loop demand for `secs`, every answer accepted and stating `limit`: the base
    /// rate after each second.
    fn climb(limit: f64, window_s: u64, secs: u64) -> Vec<f64> {
        let t0 = Instant::now();
        let mut l = Limiter::new(auto(window_s), t0);
        let stated = StatedLimit {
            rpm: limit,
            remaining: None,
        };
        let far = t0 + Duration::from_secs(3600);
        let mut bases = Vec::new();
        let mut now = t0;
        for _ in 0..4 {
            if l.request(client("c"), Priority::Normal, far, now) == Admission::Granted {
                let g = l.last_grant();
                l.observe_stated(g, stated, now);
                l.observe_answer(&UpstreamSignal::Accepted { pause: None }, g, now);
            }
        }
        while now < t0 + Duration::from_secs(secs) {
            now += ms(10);
            for r in l.poll(now) {
                if let Resolution::Granted(_, g) = r {
                    l.observe_stated(g, stated, now);
                    l.observe_answer(&UpstreamSignal::Accepted { pause: None }, g, now);
                    let _ = l.request(client("c"), Priority::Normal, far, now);
                }
            }
            if now.duration_since(t0).as_millis().is_multiple_of(1000) {
                bases.push(l.controller().base_rpm());
            }
        }
        bases
    }

    #[test]
    fn a_stated_limit_is_climbed_to_within_a_few_windows() {
        let bases = climb(450.0, 2, 12);
        println!("{bases:?}");
        assert_eq!(*bases.last().unwrap(), 450.0, "{bases:?}");
        assert!(bases[0] < 450.0, "not at once: {bases:?}");
    }

    /// 10¹² stated by an upstream that (here) accepts everything: at every moment the rate is
    /// at most 1.5 times what the last window accepted (with one answer more), never the stated
    /// value at once.
    #[test]
    fn a_huge_statement_lifts_the_rate_no_faster_than_acceptance_grows() {
        let t0 = Instant::now();
        let mut l = Limiter::new(auto(2), t0);
        let stated = StatedLimit {
            rpm: 1e12,
            remaining: None,
        };
        let far = t0 + Duration::from_secs(3600);
        let mut now = t0;
        for _ in 0..4 {
            let _ = l.request(client("c"), Priority::Normal, far, now);
        }
        let g = l.last_grant();
        l.observe_stated(g, stated, now);
        l.observe_answer(&UpstreamSignal::Accepted { pause: None }, g, now);
        while now < t0 + Duration::from_secs(6) {
            now += ms(10);
            for r in l.poll(now) {
                if let Resolution::Granted(_, g) = r {
                    let accepted = l.controller().accepted_rpm(now);
                    l.observe_stated(g, stated, now);
                    let base = l.controller().base_rpm();
                    assert!(
                        base <= (1.5 * (accepted + 30.0)).max(40.0) + 1e-9,
                        "base {base} with {accepted} accepted"
                    );
                    l.observe_answer(&UpstreamSignal::Accepted { pause: None }, g, now);
                    let _ = l.request(client("c"), Priority::Normal, far, now);
                }
            }
        }
        assert!(l.controller().base_rpm() < 1e6);
    }
}
