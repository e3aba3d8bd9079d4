//! A token limit no header states, learned per key from the 429s: NVIDIA refuses big prompts
//! at a pace it accepts small ones, and says nothing about tokens.
//!
//! Every key counts the tokens its requests cost over the last window (`observed`, settled
//! from `usage` like any budget) and the costs and prompts of the answers it accepted. A
//! rate-limit 429 on a request whose prompt is at least `EVIDENCE_RATIO` times the accepted
//! ones' average is taken as a token limit: the upstream accepted what the window holds and
//! refused more. The key gets a token budget from it and keeps its request rate; the 429 is the
//! budget's (`NonRateLimitReason::TokenBudget`). Prompts are compared, not costs: a completion
//! allowance is no part of what the upstream counts before it answers. A 429 on a request of
//! ordinary size is a request limit as before; one on a small request while the window held
//! well under the learned budget says the budget was a mistake, and it is forgotten.
//!
//! The limit lies between what a window held when the upstream accepted (`lo`, the most seen)
//! and what it would have held with a refused request (`hi`, the least seen): the budget is set
//! half-way between, and each 429 or acceptance at a new level halves the gap, so that it
//! closes on the limit within a few 429s; once the gap is under `CLOSE_ENOUGH` the budget is
//! `lo`. A window that passes without another such 429 raises both by `RAISE_STEP`, so that a
//! limit that grew is found again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{HoldId, TokenCost, TokenHold, TokenWindow, TOKEN_WINDOW};

/// What a window held is measured a second short of the upstream's minute when it proves what
/// the upstream took (`lo`), and a second over when it bounds what it refused (`hi`), so that
/// the sidecar's clock and the upstream's never make either bound wrong.
const SHORT_WINDOW: Duration = Duration::from_secs(TOKEN_WINDOW.as_secs() - 1);
const LONG_WINDOW: Duration = Duration::from_secs(TOKEN_WINDOW.as_secs() + 1);

/// A refused request this many times the accepted ones' average cost is evidence of a token
/// limit.
const EVIDENCE_RATIO: f64 = 2.0;

/// Accepted answers needed before a 429 can be told to be about tokens.
const EVIDENCE_ANSWERS: usize = 2;

/// How much a learned budget climbs per quiet window.
const RAISE_STEP: f64 = 0.05;

/// A gap between `lo` and `hi` under this share of `lo` is closed: the budget is `lo`.
const CLOSE_ENOUGH: f64 = 0.02;

/// The lowest budget learned: below, the evidence is more likely noise.
const LEARNED_MIN_TPM: u64 = 1_000;

/// Accepted costs remembered, at most.
const ACCEPTED_MAX: usize = 1_024;

/// What a key learns of its token limit.
#[derive(Debug)]
pub struct TokenLearning {
    /// The tokens of the key's requests over the last window, as settled.
    observed: TokenWindow,
    /// (when, which, cost, prompt) of the answers accepted over the last window; the cost as
    /// the upstream counted it once its `usage` came, the prompt as estimated.
    accepted: VecDeque<(Instant, HoldId, u64, u32)>,
    /// The budget learned, and when it last moved.
    learned: Option<(u64, Instant)>,
    /// The most tokens a window held when the upstream accepted, and the least it would have
    /// held with a request it refused for tokens.
    lo: u64,
    hi: Option<u64>,
}

impl TokenLearning {
    pub fn new(now: Instant) -> TokenLearning {
        TokenLearning {
            observed: TokenWindow::new(u64::MAX / 4, now),
            accepted: VecDeque::new(),
            learned: None,
            lo: 0,
            hi: None,
        }
    }

    /// A budget of `tpm` that starts with what the key's requests cost over the last window,
    /// so that a budget learned or stated now counts what went before it.
    pub fn budget(&self, tpm: u64) -> TokenWindow {
        let mut window = self.observed.clone();
        window.set_limit(tpm);
        window
    }

    /// The budget learned, if any.
    pub fn learned_tpm(&self) -> Option<u64> {
        self.learned.map(|(tpm, _)| tpm)
    }

    /// A request costing `cost` went out on the key.
    pub fn granted(&mut self, cost: TokenCost, now: Instant) {
        self.observed.take(cost, now);
    }

    pub fn settle(&mut self, id: HoldId, hold: TokenHold, actual: u64) {
        self.observed.settle(hold, actual);
        if let Some(entry) = self.accepted.iter_mut().rev().find(|e| e.1 == id) {
            entry.2 = actual;
        }
    }

    /// Tokens of the answers accepted within `within` of `now`.
    fn accepted_within(&self, within: Duration, now: Instant) -> u64 {
        self.accepted
            .iter()
            .filter(|e| now.saturating_duration_since(e.0) < within)
            .map(|e| e.2)
            .sum()
    }

    /// The accepted answers' average prompt over the last window, and how many there were.
    fn accepted_prompts(&self, now: Instant) -> (f64, usize) {
        let prompts: Vec<u32> = self
            .accepted
            .iter()
            .filter(|e| now.saturating_duration_since(e.0) < TOKEN_WINDOW)
            .map(|e| e.3)
            .collect();
        let n = prompts.len();
        let mean = prompts.iter().map(|p| f64::from(*p)).sum::<f64>() / n.max(1) as f64;
        (mean, n)
    }

    pub fn refund(&mut self, hold: TokenHold) {
        self.observed.refund(hold);
    }

    /// The upstream accepted the request `id`, estimated at `cost`. Returns the budget when
    /// it moved.
    pub fn accepted(&mut self, id: HoldId, hold: TokenHold, now: Instant) -> Option<u64> {
        if self.accepted.len() >= ACCEPTED_MAX {
            self.accepted.pop_front();
        }
        self.accepted
            .push_back((now, id, u64::from(hold.cost.tokens), hold.ask.prompt));
        let held = self.accepted_within(SHORT_WINDOW, now);
        if held <= self.lo {
            return None;
        }
        self.lo = held;
        if self.hi.is_some_and(|hi| hi <= held) {
            // The upstream took more than it refused before: that bound no longer holds.
            self.hi = None;
        }
        self.learned.is_some().then(|| self.settle_budget(now))
    }

    /// Drops what was learned: the key has no learned budget any more.
    fn forget(&mut self) {
        self.learned = None;
        self.lo = 0;
        self.hi = None;
    }

    /// The budget between what is known: half-way between `lo` and `hi`, or `lo` when they
    /// are close.
    fn settle_budget(&mut self, now: Instant) -> u64 {
        let tpm = match self.hi {
            Some(hi) if hi.saturating_sub(self.lo) as f64 > CLOSE_ENOUGH * self.lo as f64 => {
                self.lo + (hi - self.lo) / 2
            }
            Some(_) => self.lo,
            // No refusal stands: what was accepted, or the budget already climbed to.
            None => self.lo.max(self.learned_tpm().unwrap_or(0)),
        }
        .max(LEARNED_MIN_TPM);
        self.learned = Some((tpm, now));
        tpm
    }

    /// Forgets what left the window; a learned budget climbs after a quiet window. Returns the
    /// budget when it moved.
    pub fn advance(&mut self, now: Instant) -> Option<u64> {
        self.observed.advance(now);
        while self
            .accepted
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.0) >= LONG_WINDOW)
        {
            self.accepted.pop_front();
        }
        let (tpm, since) = self.learned?;
        if now.saturating_duration_since(since) < TOKEN_WINDOW {
            return None;
        }
        // The refusal fades; without one the budget itself climbs, so that an acceptance at
        // the new level can raise `lo`.
        let raise = |t: u64| ((t as f64) * (1.0 + RAISE_STEP)).ceil() as u64;
        match self.hi {
            Some(hi) => self.hi = Some(raise(hi)),
            None => self.learned = Some((raise(tpm), now)),
        }
        Some(self.settle_budget(now))
    }

    /// A rate-limit 429 on `hold`'s request: the budget to learn when it was about tokens
    /// (see the module doc), `None` when it was about requests.
    ///
    /// The first time, it takes a request that costs well above the accepted ones to tell a
    /// token limit from a request limit. Once a budget is learned, any 429 that comes with the
    /// window fuller than the upstream ever took is the token limit's, whatever its size (a
    /// small request meets the limit too when the window is at the brim); one that comes with
    /// the window below that was about requests.
    pub fn refused(&mut self, hold: TokenHold, now: Instant) -> Option<u64> {
        let cost = u64::from(hold.cost.tokens);
        let held = self.accepted_within(LONG_WINDOW, now);
        let refused_at = held + cost;
        let (mean, answers) = self.accepted_prompts(now);
        let prompt = f64::from(hold.ask.prompt);
        match self.learned {
            Some((tpm, _)) => {
                if prompt <= mean && held < tpm / 10 * 9 {
                    // A small request refused with the budget far from full: the 429s are
                    // about requests, and the budget was learned from a mistake.
                    self.forget();
                    return None;
                }
                if refused_at <= self.lo {
                    return None;
                }
            }
            None => {
                if answers < EVIDENCE_ANSWERS || prompt < EVIDENCE_RATIO * mean {
                    return None;
                }
                self.lo = self.accepted_within(SHORT_WINDOW, now);
            }
        }
        self.observed.refund(hold);
        self.hi = Some(self.hi.map_or(refused_at, |hi| hi.min(refused_at)));
        Some(self.settle_budget(now))
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::*;
    use crate::limiter::{Holds, TokenAsk};

    fn hold(tokens: u32, at: Instant) -> TokenHold {
        TokenHold {
            at,
            cost: TokenCost {
                tokens,
                known: true,
            },
            ask: TokenAsk {
                prompt: tokens,
                completion: Some(0),
                known: true,
            },
            client: None,
        }
    }

    #[test]
    fn a_big_request_refused_beside_small_ones_teaches_a_budget() {
        let t0 = Instant::now();
        let mut l = TokenLearning::new(t0);
        let mut holds = Holds::default();
        for (i, cost) in [12_000, 100, 100, 12_000, 100].into_iter().enumerate() {
            let at = t0 + Duration::from_secs(i as u64);
            l.granted(hold(cost, at).cost, at);
            l.accepted(holds.add(hold(cost, at)), hold(cost, at), at);
        }
        let refused = hold(12_000, t0 + Duration::from_secs(10));
        l.granted(refused.cost, refused.at);
        // 24.3k were taken, 36.3k were not: half-way.
        assert_eq!(l.refused(refused, refused.at), Some(30_300));
        assert_eq!(l.learned_tpm(), Some(30_300));
        // A quiet window later the refusal fades by a step: 24.3k to 38.115k.
        assert_eq!(l.advance(refused.at + Duration::from_secs(59)), None);
        assert_eq!(
            l.advance(refused.at + Duration::from_secs(60)),
            Some(31_207)
        );
    }

    #[test]
    fn the_gap_closes_on_the_limit_within_a_few_429s() {
        // A true limit of 100k; requests of 12k and 100 tokens, as many as it takes.
        let t0 = Instant::now();
        let mut l = TokenLearning::new(t0);
        let mut holds = Holds::default();
        let limit = 100_000u64;
        // The upstream's own count: what it took in the last 60 s.
        let mut taken: Vec<(Instant, u64)> = Vec::new();
        let mut refusals = 0;
        let mut at = t0;
        let mut learned = None;
        for i in 0..1_200u64 {
            at += Duration::from_millis(150);
            if let Some(tpm) = l.advance(at) {
                learned = Some(tpm);
            }
            let cost = if i % 3 == 0 { 12_000 } else { 100 };
            let budget = learned.map(|tpm| l.budget(tpm));
            if let Some(w) = &budget {
                if !w.fits(hold(cost, at).cost, at) {
                    continue;
                }
            }
            let h = hold(cost, at);
            l.granted(h.cost, at);
            let upstream: u64 = taken
                .iter()
                .filter(|(t, _)| at - *t < TOKEN_WINDOW)
                .map(|(_, c)| c)
                .sum();
            if upstream + u64::from(cost) <= limit {
                taken.push((at, u64::from(cost)));
                if let Some(tpm) = l.accepted(holds.add(h), h, at) {
                    learned = Some(tpm);
                }
            } else if let Some(tpm) = l.refused(h, at) {
                refusals += 1;
                learned = Some(tpm);
            }
        }
        let learned = learned.unwrap();
        println!("learned {learned} of {limit} with {refusals} refusals in 180 s");
        assert!(refusals <= 8, "{refusals} refusals");
        assert!(
            (95_000..=102_000).contains(&learned),
            "learned {learned} of {limit}"
        );
    }

    #[test]
    fn a_budget_learned_by_mistake_is_forgotten_at_the_first_small_refusal() {
        let t0 = Instant::now();
        let mut l = TokenLearning::new(t0);
        let mut holds = Holds::default();
        // A request limit met by a big prompt first: it looks like a token limit.
        for (i, cost) in [1_000, 1_000, 1_000, 5_000].into_iter().enumerate() {
            let at = t0 + Duration::from_secs(i as u64);
            l.granted(hold(cost, at).cost, at);
            l.accepted(holds.add(hold(cost, at)), hold(cost, at), at);
        }
        let big = hold(20_000, t0 + Duration::from_secs(5));
        assert!(l.refused(big, big.at).is_some());
        // Then a small one is refused with the budget far from full.
        let small = hold(500, t0 + Duration::from_secs(6));
        assert_eq!(l.refused(small, small.at), None);
        assert_eq!(l.learned_tpm(), None, "forgotten");
    }

    #[test]
    fn a_refused_request_of_ordinary_cost_is_a_request_limit() {
        let t0 = Instant::now();
        let mut l = TokenLearning::new(t0);
        let mut holds = Holds::default();
        for i in 0..5 {
            let at = t0 + Duration::from_secs(i);
            l.granted(hold(1_000, at).cost, at);
            l.accepted(holds.add(hold(1_000, at)), hold(1_000, at), at);
        }
        let refused = hold(1_500, t0 + Duration::from_secs(6));
        assert_eq!(l.refused(refused, refused.at), None);
        assert_eq!(l.learned_tpm(), None);
        let first = TokenLearning::new(t0).refused(hold(50_000, t0), t0);
        assert_eq!(first, None, "no evidence before answers were accepted");
    }
}
