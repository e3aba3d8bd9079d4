//! What a request will cost in tokens, learned from what the upstream counted.
//!
//! The proxy measures a request's prompt from its body (`TokenAsk::prompt`, a raw estimate from
//! the text's size), and passes on the completion the client allowed (`max_tokens`). The
//! upstream's `usage` then says what it really counted. Per model (and once for requests that
//! name none) two figures are learned from it: the factor between the raw estimate and the
//! counted prompt, and the completion a request produces when its client set no limit. Each
//! moves a fifth of the way to every new answer, so a steady model converges within a dozen
//! answers and a changed one follows.

use super::TokenCost;

/// How far each answer moves what is learned.
const LEARNING_RATE: f64 = 0.2;

/// The factor stays within these: an answer further off is taken as this far off.
const FACTOR_RANGE: (f64, f64) = (0.1, 10.0);

/// The completion reserved for a request without `max_tokens`, before any answer was counted.
pub const DEFAULT_COMPLETION: u32 = 512;

/// What a request tells the limiter about its cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenAsk {
    /// The prompt's raw estimate, from the body's size.
    pub prompt: u32,
    /// The completion the client allowed (`max_tokens`, `max_completion_tokens`), if any.
    pub completion: Option<u32>,
    /// The estimate comes from the body in hand (see `TokenCost::known`).
    pub known: bool,
}

/// A request's cost as the limiter reckons it: what it asked, and what that comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priced {
    pub ask: TokenAsk,
    pub cost: TokenCost,
}

/// What the upstream counted for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// What is learned of one model's costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Counted prompt tokens per estimated one.
    pub factor: f64,
    /// The completion of a request without a limit of its own.
    pub completion: f64,
    /// Answers learned from.
    pub answers: u64,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            factor: 1.0,
            completion: f64::from(DEFAULT_COMPLETION),
            answers: 0,
        }
    }
}

impl Calibration {
    /// The cost reserved for `ask`: its prompt as calibrated, and its completion.
    pub fn cost(&self, ask: TokenAsk) -> TokenCost {
        let prompt = (f64::from(ask.prompt) * self.factor).ceil();
        let completion = ask.completion.map_or(self.completion.ceil(), f64::from);
        TokenCost {
            tokens: (prompt + completion).min(f64::from(u32::MAX)) as u32,
            known: ask.known,
        }
    }

    /// Learns from an answer to a request whose prompt was estimated at `raw_prompt` and
    /// whose client set `limit` on its completion.
    pub fn learn(&mut self, ask: TokenAsk, usage: Usage) {
        if ask.known && ask.prompt > 0 && usage.prompt > 0 {
            let ratio =
                (usage.prompt as f64 / f64::from(ask.prompt)).clamp(FACTOR_RANGE.0, FACTOR_RANGE.1);
            self.factor += LEARNING_RATE * (ratio - self.factor);
        }
        if ask.completion.is_none() {
            self.completion += LEARNING_RATE * (usage.completion as f64 - self.completion);
        }
        self.answers += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(prompt: u32, completion: Option<u32>) -> TokenAsk {
        TokenAsk {
            prompt,
            completion,
            known: true,
        }
    }

    #[test]
    fn the_factor_converges_to_what_the_upstream_counts() {
        let mut c = Calibration::default();
        // The upstream counts 1.3 tokens for every one estimated.
        for _ in 0..20 {
            c.learn(
                ask(10_000, Some(100)),
                Usage {
                    prompt: 13_000,
                    completion: 40,
                },
            );
        }
        assert!((c.factor - 1.3).abs() < 0.01, "{}", c.factor);
        assert_eq!(
            c.completion,
            f64::from(DEFAULT_COMPLETION),
            "max_tokens was set"
        );
        let cost = c.cost(ask(1_000, Some(50)));
        assert!((1_345..=1_360).contains(&cost.tokens), "{cost:?}");
    }

    #[test]
    fn the_completion_of_unlimited_requests_is_learned() {
        let mut c = Calibration::default();
        for _ in 0..30 {
            c.learn(
                ask(100, None),
                Usage {
                    prompt: 100,
                    completion: 20,
                },
            );
        }
        assert!((c.completion - 20.0).abs() < 1.0, "{}", c.completion);
        assert!(c.cost(ask(100, None)).tokens <= 121);
    }

    #[test]
    fn a_wild_answer_moves_the_factor_only_so_far() {
        let mut c = Calibration::default();
        c.learn(
            ask(1, None),
            Usage {
                prompt: 1_000_000,
                completion: 0,
            },
        );
        assert!(c.factor <= 1.0 + LEARNING_RATE * 9.0 + 1e-9);
        let guess = TokenAsk {
            known: false,
            ..ask(1_000, None)
        };
        let before = c.factor;
        c.learn(
            guess,
            Usage {
                prompt: 1,
                completion: 0,
            },
        );
        assert_eq!(c.factor, before, "a guessed prompt teaches nothing");
    }
}
