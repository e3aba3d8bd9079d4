//! A token budget (`tpm`): at most `limit` tokens in any 60 s, counted the way a sliding-window
//! upstream counts them.
//!
//! **Why a window and not a bucket.** A bucket of capacity `C` refilling at `tpm / 60` lets
//! `C + tpm` through in the first minute: a burst of the whole budget followed by a full
//! refill, which a sliding-window upstream refuses. A bucket small enough not to do that
//! (`rate = (tpm - C) / 60`) loses `C` of every minute, and `C` must hold the largest prompt:
//! with 12k-token prompts under 100k tpm, an eighth of the budget. The window holds whatever
//! fits in the last 60 s, so one request may take the whole budget, and no minute ever sees
//! more than `limit`.
//!
//! Reservations are kept in one-second slots, so that the window's memory is bounded (at most
//! 62 slots) whatever the request rate. A reservation made anywhere in a slot counts until 61 s
//! after the slot began: never less than 60 s, at most 1 s more, which also absorbs a second of
//! delivery jitter between the sidecar's grant and the upstream's count.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// The window the budget is counted over.
pub const TOKEN_WINDOW: Duration = Duration::from_secs(60);

/// How long a reservation counts, from the start of its slot.
const HELD_FOR: u64 = TOKEN_WINDOW.as_secs() + 1;

/// What a request is expected to cost in tokens, before the upstream counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCost {
    /// Prompt and completion, as estimated.
    pub tokens: u32,
    /// The estimate comes from the body; false when the body was not in hand (streamed), so
    /// that it is only a guess: it is then reserved up to a budget's whole limit at most, never
    /// refused as too large.
    pub known: bool,
}

impl TokenCost {
    /// What a budget of `limit` reserves for it.
    pub fn reserved(self, limit: u64) -> u64 {
        let tokens = u64::from(self.tokens);
        if self.known {
            tokens
        } else {
            tokens.min(limit)
        }
    }
}

/// A request's reservation on the token budgets it was granted on, to be corrected to what the
/// upstream counted (`settle`) or given back (`refund`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenHold {
    pub at: Instant,
    pub cost: TokenCost,
    /// What the request told of its cost, to learn from its answer.
    pub ask: super::TokenAsk,
    /// The client budget it was taken from (see `ClientCaps`), if its client has one.
    pub client: Option<u32>,
}

/// Names a `TokenHold` kept by the limiter (`Holds`): a grant carries this, not the hold, so
/// that a grant stays small where waiting requests keep copies of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HoldId(NonZeroU64);

/// How long a hold is kept for its answer: longer than any budget counts it, so that a long
/// stream's `usage` still teaches the model's costs.
const HOLD_KEPT: Duration = Duration::from_secs(15 * 60);

/// The most holds kept: at a thousand requests a second, a minute's worth.
const HOLDS_MAX: usize = 65_536;

/// The reservations of granted requests whose answers have not been counted yet, oldest first.
#[derive(Debug)]
pub struct Holds {
    next: u64,
    held: VecDeque<(u64, TokenHold)>,
}

impl Default for Holds {
    fn default() -> Self {
        Holds {
            next: 1,
            held: VecDeque::new(),
        }
    }
}

impl Holds {
    /// Keeps `hold`; its id goes with the grant.
    pub fn add(&mut self, hold: TokenHold) -> HoldId {
        let id = self.next;
        self.next += 1;
        if self.held.len() >= HOLDS_MAX {
            self.held.pop_front();
        }
        self.held.push_back((id, hold));
        HoldId(NonZeroU64::new(id).expect("ids start at 1"))
    }

    /// The hold `id` names, taken out: settled or refunded once only.
    pub fn take(&mut self, id: HoldId) -> Option<TokenHold> {
        let id = id.0.get();
        let at = self.held.binary_search_by_key(&id, |(i, _)| *i).ok()?;
        self.held.remove(at).map(|(_, hold)| hold)
    }

    /// The hold `id` names, if it is still kept.
    pub fn get(&self, id: HoldId) -> Option<TokenHold> {
        let id = id.0.get();
        let at = self.held.binary_search_by_key(&id, |(i, _)| *i).ok()?;
        Some(self.held[at].1)
    }

    /// Forgets the holds whose answers never came.
    pub fn prune(&mut self, now: Instant) {
        while self
            .held
            .front()
            .is_some_and(|(_, h)| now.saturating_duration_since(h.at) >= HOLD_KEPT)
        {
            self.held.pop_front();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

/// One budget of tokens per minute.
#[derive(Debug, Clone)]
pub struct TokenWindow {
    limit: u64,
    origin: Instant,
    /// (slot, tokens reserved in it), oldest first.
    slots: VecDeque<(u64, u64)>,
}

impl TokenWindow {
    pub fn new(limit: u64, now: Instant) -> TokenWindow {
        TokenWindow {
            limit: limit.max(1),
            // A window back, so that tokens spent before the budget existed can be counted in
            // the slots they would have been in (`spent_until`).
            origin: now
                .checked_sub(Duration::from_secs(HELD_FOR))
                .unwrap_or(now),
            slots: VecDeque::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// A new limit; what was reserved stays reserved.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.max(1);
    }

    fn slot_of(&self, at: Instant) -> Option<u64> {
        at.checked_duration_since(self.origin).map(|d| d.as_secs())
    }

    /// When a reservation in `slot` stops counting.
    fn expiry(&self, slot: u64) -> Instant {
        self.origin + Duration::from_secs(slot + HELD_FOR)
    }

    fn live(&self, now: Instant) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots
            .iter()
            .copied()
            .filter(move |(slot, _)| self.expiry(*slot) > now)
    }

    /// Tokens that count at `now`.
    pub fn used(&self, now: Instant) -> u64 {
        self.live(now).map(|(_, t)| t).sum()
    }

    /// Drops the slots that no longer count.
    pub fn advance(&mut self, now: Instant) {
        while let Some(&(slot, _)) = self.slots.front() {
            if self.expiry(slot) > now {
                break;
            }
            self.slots.pop_front();
        }
    }

    /// Whether `cost` fits in the budget at `now`.
    pub fn fits(&self, cost: TokenCost, now: Instant) -> bool {
        self.used(now) + cost.reserved(self.limit) <= self.limit
    }

    /// Whether `cost` fits at `now` and still leaves room at `at` for `theirs`, a request that
    /// fits then (`at` is no later than a window from `now`, so `cost` still counts then).
    pub fn fits_beside(&self, cost: TokenCost, theirs: TokenCost, at: Instant) -> bool {
        let (cost, theirs) = (cost.reserved(self.limit), theirs.reserved(self.limit));
        self.used(at) + theirs + cost <= self.limit
    }

    /// Whether `cost` can ever fit: no more than the whole budget.
    pub fn can_fit(&self, cost: TokenCost) -> bool {
        cost.reserved(self.limit) <= self.limit
    }

    /// When `cost` fits, counting from `now`; `None` if it never will (more than the limit).
    pub fn fits_at(&self, cost: TokenCost, now: Instant) -> Option<Instant> {
        let cost = cost.reserved(self.limit);
        if cost > self.limit {
            return None;
        }
        let mut used = self.used(now);
        if used + cost <= self.limit {
            return Some(now);
        }
        for (slot, tokens) in self.live(now) {
            used -= tokens;
            if used + cost <= self.limit {
                return Some(self.expiry(slot));
            }
        }
        Some(now)
    }

    /// Reserves `cost` at `now`. Call only when it `fits`.
    pub fn take(&mut self, cost: TokenCost, now: Instant) {
        let tokens = cost.reserved(self.limit);
        let Some(slot) = self.slot_of(now) else {
            return;
        };
        match self.slots.back_mut() {
            Some((last, reserved)) if *last == slot => *reserved += tokens,
            _ => self.slots.push_back((slot, tokens)),
        }
    }

    /// Counts `tokens` the upstream says are spent (by this sidecar's requests it has not
    /// counted yet, or by others using the same key) until `until`: as a reservation in the
    /// slot that stops counting then, or in the current one if that is later than a window.
    pub fn spent_until(&mut self, tokens: u64, until: Instant, now: Instant) {
        let Some(current) = self.slot_of(now) else {
            return;
        };
        let ends = until
            .checked_duration_since(self.origin)
            .map_or(0, |d| d.as_secs_f64().ceil() as u64);
        let slot = ends.saturating_sub(HELD_FOR).min(current);
        let at = self.slots.partition_point(|(s, _)| *s < slot);
        match self.slots.get_mut(at) {
            Some((s, reserved)) if *s == slot => *reserved += tokens,
            _ => self.slots.insert(at, (slot, tokens)),
        }
    }

    /// Corrects a reservation to `actual` tokens: what the upstream counted. A reservation
    /// that no longer counts (or was made before this window) is left alone.
    pub fn settle(&mut self, hold: TokenHold, actual: u64) {
        let reserved = hold.cost.reserved(self.limit);
        let Some(slot) = self.slot_of(hold.at) else {
            return;
        };
        if let Some((_, tokens)) = self.slots.iter_mut().find(|(s, _)| *s == slot) {
            *tokens = (*tokens + actual).saturating_sub(reserved);
        }
    }

    /// Gives a reservation back: the request never went out.
    pub fn refund(&mut self, hold: TokenHold) {
        self.settle(hold, 0);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::*;

    fn cost(tokens: u32) -> TokenCost {
        TokenCost {
            tokens,
            known: true,
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_whole_budget_goes_at_once_and_then_nothing_for_a_window() {
        let t0 = Instant::now();
        let mut w = TokenWindow::new(100_000, t0);
        for _ in 0..8 {
            assert!(w.fits(cost(12_000), t0));
            w.take(cost(12_000), t0);
        }
        assert!(!w.fits(cost(12_000), t0), "96k used, 12k more is over");
        assert!(w.fits(cost(4_000), t0), "a small one still fits");
        assert!(!w.fits(cost(12_000), t0 + secs(60.5)));
        assert_eq!(w.fits_at(cost(12_000), t0), Some(t0 + secs(61.0)));
        assert!(w.fits(cost(12_000), t0 + secs(61.0)));
    }

    #[test]
    fn settling_returns_what_was_not_used_and_charges_what_was() {
        let t0 = Instant::now();
        let mut w = TokenWindow::new(10_000, t0);
        let hold = TokenHold {
            at: t0 + secs(0.5),
            cost: cost(8_000),
            client: None,
            ask: crate::limiter::TokenAsk {
                prompt: 0,
                completion: None,
                known: true,
            },
        };
        w.take(hold.cost, hold.at);
        assert!(!w.fits(cost(3_000), t0 + secs(1.0)));
        w.settle(hold, 2_000);
        assert_eq!(w.used(t0 + secs(1.0)), 2_000);
        assert!(w.fits(cost(8_000), t0 + secs(1.0)));
        let over = TokenHold {
            at: t0 + secs(2.0),
            cost: cost(1_000),
            client: None,
            ask: crate::limiter::TokenAsk {
                prompt: 0,
                completion: None,
                known: true,
            },
        };
        w.take(over.cost, over.at);
        w.settle(over, 5_000);
        assert_eq!(w.used(t0 + secs(2.0)), 7_000);
        let unsent = TokenHold {
            at: t0 + secs(2.5),
            ..over
        };
        w.take(unsent.cost, unsent.at);
        assert_eq!(w.used(t0 + secs(3.0)), 8_000);
        w.refund(unsent);
        assert_eq!(
            w.used(t0 + secs(3.0)),
            7_000,
            "a refund gives its reservation back"
        );
    }

    #[test]
    fn an_unknown_cost_is_reserved_up_to_the_limit_and_never_too_large() {
        let t0 = Instant::now();
        let w = TokenWindow::new(5_000, t0);
        let guess = TokenCost {
            tokens: 50_000,
            known: false,
        };
        assert!(w.can_fit(guess));
        assert!(w.fits(guess, t0));
        assert!(!w.can_fit(cost(50_000)));
        assert_eq!(w.fits_at(cost(50_000), t0), None);
    }

    #[test]
    fn holds_are_taken_once_and_forgotten_when_no_answer_comes() {
        let t0 = Instant::now();
        let mut holds = Holds::default();
        let hold = |at| TokenHold {
            at,
            cost: cost(10),
            client: None,
            ask: crate::limiter::TokenAsk {
                prompt: 10,
                completion: None,
                known: true,
            },
        };
        let a = holds.add(hold(t0));
        let b = holds.add(hold(t0 + secs(1.0)));
        assert_eq!(holds.take(a).map(|h| h.at), Some(t0));
        assert_eq!(holds.take(a), None, "settled once only");
        holds.prune(t0 + HOLD_KEPT + secs(0.5));
        assert!(holds.get(b).is_some());
        holds.prune(t0 + HOLD_KEPT + secs(1.0));
        assert_eq!((holds.get(b), holds.len()), (None, 0));
    }

    #[test]
    fn tokens_spent_elsewhere_count_until_the_upstream_says_they_are_back() {
        let t0 = Instant::now();
        let mut w = TokenWindow::new(10_000, t0);
        let now = t0 + secs(100.0);
        w.take(cost(1_000), t0 + secs(90.0));
        w.spent_until(6_000, now + secs(6.0), now);
        assert_eq!(w.used(now), 7_000);
        assert!(!w.fits(cost(4_000), now));
        assert_eq!(w.fits_at(cost(4_000), now), Some(now + secs(6.0)));
        w.spent_until(2_000, now + secs(600.0), now);
        assert_eq!(w.used(now + secs(60.0)), 2_000);
        assert_eq!(
            w.used(now + secs(62.0)),
            0,
            "no longer than a window from now"
        );
        let mut fresh = TokenWindow::new(10_000, now);
        fresh.spent_until(9_000, now + secs(5.0), now);
        assert!(!fresh.fits(cost(2_000), now + secs(4.0)));
        assert!(
            fresh.fits(cost(2_000), now + secs(6.0)),
            "a new budget counts it 5 s too"
        );
    }

    #[test]
    fn memory_stays_bounded_at_any_rate() {
        let t0 = Instant::now();
        let mut w = TokenWindow::new(u64::MAX / 4, t0);
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 3);
            w.advance(now);
            w.take(cost(10), now);
        }
        assert!(w.slots.len() <= 62, "{} slots", w.slots.len());
    }
}
