//! Limits of one model (or a glob of models): a rate of its own, and a number of requests in
//! flight at once. The upstream serves each model from its own workers, and NVIDIA answers
//! "Worker local total request limit reached" when one model's workers are full: that is a
//! concurrency limit of the model, not a rate limit of the key. The concurrency limit moves by
//! AIMD: halved when the upstream says the model's workers are full, raised by one over a
//! limit's worth of successful answers, never above `max_concurrency`.

use std::time::{Duration, Instant};

use super::{TokenBucket, TokenCost, TokenWindow};

/// What the operator configured for a model id, or for a glob of ids (`*` matches any run of
/// characters).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub pattern: String,
    pub rate_rpm: Option<f64>,
    pub max_concurrency: Option<u32>,
    /// Tokens per minute for the model, over every key.
    pub tpm: Option<u64>,
}

/// A limit learned without a configured ceiling is dropped once it has grown this far.
const UNBOUNDED_AGAIN: f64 = 1024.0;

/// Cuts closer together than this are one overload, answered by one cut.
const CUT_SPACING: Duration = Duration::from_secs(1);

/// Which configured model a request's model id falls under: an exact id first, then the first
/// glob that matches, in the order configured.
pub fn model_index(models: &[ModelSettings], id: &str) -> Option<usize> {
    models
        .iter()
        .position(|m| m.pattern == id)
        .or_else(|| models.iter().position(|m| glob_matches(&m.pattern, id)))
}

fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[derive(Debug)]
pub struct ModelLimit {
    pub settings: ModelSettings,
    bucket: Option<TokenBucket>,
    /// The model's token budget (`tpm`).
    pub tokens: Option<TokenWindow>,
    /// The concurrency allowed now (AIMD); infinite while unlimited.
    limit: f64,
    pub in_flight: u32,
    last_cut: Option<Instant>,
    /// Capacity errors seen, for status.
    pub capacity_errors: u64,
}

impl ModelLimit {
    pub fn new(settings: ModelSettings, now: Instant) -> ModelLimit {
        ModelLimit {
            bucket: settings.rate_rpm.map(|_| TokenBucket::new(1, now)),
            tokens: settings.tpm.map(|t| TokenWindow::new(t, now)),
            limit: settings.max_concurrency.map_or(f64::INFINITY, f64::from),
            settings,
            in_flight: 0,
            last_cut: None,
            capacity_errors: 0,
        }
    }

    /// Takes over new settings, keeping what is in flight and what was learned below them.
    pub fn reconfigure(&mut self, settings: ModelSettings, now: Instant) {
        if settings.rate_rpm.is_some() != self.bucket.is_some() {
            self.bucket = settings.rate_rpm.map(|_| TokenBucket::new(1, now));
        }
        match (self.tokens.as_mut(), settings.tpm) {
            (Some(window), Some(tpm)) => window.set_limit(tpm),
            (_, tpm) => self.tokens = tpm.map(|t| TokenWindow::new(t, now)),
        }
        self.limit = match settings.max_concurrency {
            Some(max) => self.limit.min(f64::from(max)),
            None if self.settings.max_concurrency.is_some() => f64::INFINITY,
            None => self.limit,
        };
        self.settings = settings;
    }

    pub fn advance(&mut self, now: Instant) {
        if let (Some(bucket), Some(rpm)) = (self.bucket.as_mut(), self.settings.rate_rpm) {
            bucket.refill(now, rpm / 60.0, true);
        }
        if let Some(tokens) = self.tokens.as_mut() {
            tokens.advance(now);
        }
    }

    /// Requests of this model allowed in flight now.
    pub fn allowed(&self) -> u32 {
        if self.limit.is_finite() {
            self.limit.max(1.0) as u32
        } else {
            u32::MAX
        }
    }

    /// Whether a request of this model costing `cost` may go now (a slot free and, with a
    /// rate, a token; with a token budget, room for its cost).
    pub fn ready(&self, cost: Option<TokenCost>, now: Instant) -> bool {
        self.in_flight < self.allowed()
            && self.bucket.as_ref().is_none_or(|b| b.has_token())
            && match (&self.tokens, cost) {
                (Some(window), Some(cost)) => window.fits(cost, now),
                _ => true,
            }
    }

    /// Takes a slot (and a token, and its cost of the token budget). Call only when `ready`.
    pub fn take(&mut self, cost: Option<TokenCost>, now: Instant) {
        self.in_flight += 1;
        if let Some(bucket) = self.bucket.as_mut() {
            bucket.try_take();
        }
        if let (Some(window), Some(cost)) = (self.tokens.as_mut(), cost) {
            window.take(cost, now);
        }
    }

    /// The request is over: its slot is free.
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A slot and token taken but never used.
    pub fn refund(&mut self) {
        self.release();
        if let Some(bucket) = self.bucket.as_mut() {
            bucket.refund();
        }
    }

    /// When the model's rate lets the next request go (`None`: no rate, or now).
    pub fn next_token_at(&self, now: Instant) -> Option<Instant> {
        let rpm = self.settings.rate_rpm?;
        self.bucket.as_ref()?.next_token_at(rpm / 60.0, now)
    }

    /// When the model's rate and token budget let a request costing `cost` go (`None`:
    /// neither holds it).
    pub fn next_ready_at(&self, cost: Option<TokenCost>, now: Instant) -> Option<Instant> {
        let tokens = self
            .tokens
            .as_ref()
            .zip(cost)
            .and_then(|(w, c)| w.fits_at(c, now));
        self.next_token_at(now).max(tokens)
    }

    /// The upstream said the model's workers are full: halve the concurrency (a model without
    /// a limit yet starts from what was in flight), once per overload.
    pub fn capacity_error(&mut self, now: Instant) {
        self.capacity_errors += 1;
        if self
            .last_cut
            .is_some_and(|at| now.saturating_duration_since(at) < CUT_SPACING)
        {
            return;
        }
        self.last_cut = Some(now);
        let base = if self.limit.is_finite() {
            self.limit
        } else {
            f64::from(self.in_flight.max(1))
        };
        self.limit = (base / 2.0).max(1.0);
    }

    /// A request of this model was answered: the limit grows by one per limit's worth.
    pub fn answered(&mut self) {
        if !self.limit.is_finite() {
            return;
        }
        self.limit += 1.0 / self.limit.max(1.0);
        match self.settings.max_concurrency {
            Some(max) => self.limit = self.limit.min(f64::from(max)),
            None if self.limit >= UNBOUNDED_AGAIN => self.limit = f64::INFINITY,
            None => {}
        }
    }

    /// The concurrency allowed now, for status (`None`: unlimited).
    pub fn concurrency_limit(&self) -> Option<u32> {
        self.limit.is_finite().then(|| self.allowed())
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick their own instants
mod tests {
    use super::*;

    fn model(pattern: &str, rpm: Option<f64>, max: Option<u32>) -> ModelSettings {
        ModelSettings {
            pattern: pattern.to_string(),
            rate_rpm: rpm,
            max_concurrency: max,
            tpm: None,
        }
    }

    #[test]
    fn exact_ids_win_over_globs_and_globs_match_in_order() {
        let models = [
            model("meta/*", None, Some(2)),
            model("meta/llama-3.1-8b-instruct", None, Some(4)),
            model("*-instruct", None, None),
            model("a*b*c", None, None),
        ];
        assert_eq!(model_index(&models, "meta/llama-3.1-8b-instruct"), Some(1));
        assert_eq!(model_index(&models, "meta/other"), Some(0));
        assert_eq!(model_index(&models, "mistral/x-instruct"), Some(2));
        assert_eq!(model_index(&models, "axxbyyc"), Some(3));
        assert_eq!(model_index(&models, "abc"), Some(3));
        assert_eq!(model_index(&models, "acb"), None);
        assert_eq!(model_index(&models, "google/gemma"), None);
    }

    #[test]
    fn capacity_errors_halve_once_per_overload_and_answers_climb_back_to_the_ceiling() {
        let t0 = Instant::now();
        let mut m = ModelLimit::new(model("m", None, Some(8)), t0);
        for _ in 0..8 {
            assert!(m.ready(None, t0));
            m.take(None, t0);
        }
        assert!(!m.ready(None, t0), "eight in flight is the limit");
        m.capacity_error(t0);
        m.capacity_error(t0 + Duration::from_millis(500));
        assert_eq!(m.allowed(), 4, "one cut per overload");
        for _ in 0..8 {
            m.release();
        }
        m.capacity_error(t0 + Duration::from_secs(2));
        assert_eq!(m.allowed(), 2, "a second overload cuts again");
        for _ in 0..200 {
            m.answered();
        }
        assert_eq!(m.allowed(), 8, "never above max_concurrency");
    }

    #[test]
    fn a_model_without_a_ceiling_learns_one_from_its_first_overload() {
        let t0 = Instant::now();
        let mut m = ModelLimit::new(model("m", None, None), t0);
        assert_eq!(m.concurrency_limit(), None);
        for _ in 0..10 {
            m.take(None, t0);
        }
        m.capacity_error(t0);
        assert_eq!(m.concurrency_limit(), Some(5));
        assert!(!m.ready(None, t0));
        for _ in 0..1_000_000 {
            m.answered();
            if m.concurrency_limit().is_none() {
                break;
            }
        }
        assert_eq!(
            m.concurrency_limit(),
            None,
            "unlimited again after long health"
        );
    }

    #[test]
    fn a_model_rate_paces_its_requests() {
        let t0 = Instant::now();
        let mut m = ModelLimit::new(model("m", Some(60.0), None), t0);
        assert!(m.ready(None, t0));
        m.take(None, t0);
        m.release();
        assert!(!m.ready(None, t0), "the model's token is spent");
        assert_eq!(m.next_token_at(t0), Some(t0 + Duration::from_secs(1)));
        m.advance(t0 + Duration::from_secs(1));
        assert!(m.ready(None, t0));
    }

    #[test]
    fn a_model_token_budget_holds_big_requests_and_lets_small_ones_by() {
        let t0 = Instant::now();
        let settings = ModelSettings {
            tpm: Some(20_000),
            ..model("m", None, None)
        };
        let mut m = ModelLimit::new(settings, t0);
        let cost = |tokens| {
            Some(TokenCost {
                tokens,
                known: true,
            })
        };
        m.take(cost(12_000), t0);
        assert!(!m.ready(cost(12_000), t0));
        assert!(m.ready(cost(500), t0));
        assert_eq!(
            m.next_ready_at(cost(12_000), t0),
            Some(t0 + Duration::from_secs(61))
        );
    }
}
