//! A client's own caps: a rate (`clients[].rate_rpm`), a bucket of one token per client, so that
//! one client cannot use more than its cap of the shared rate however long it waits; and a
//! token budget (`clients[].tpm`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::{TokenBucket, TokenCost, TokenHold, TokenWindow};

/// A cap configured for one client id.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCap {
    pub id: Arc<str>,
    pub rate_rpm: Option<f64>,
    pub tpm: Option<u64>,
}

impl ClientCap {
    /// A cap of `rate_rpm` alone.
    pub fn rate(id: &str, rate_rpm: f64) -> ClientCap {
        ClientCap {
            id: Arc::from(id),
            rate_rpm: Some(rate_rpm),
            tpm: None,
        }
    }
}

#[derive(Debug)]
struct Capped {
    rate: Option<(f64, TokenBucket)>,
    tokens: Option<TokenWindow>,
    /// Names this client's budget in a `TokenHold`; never reused, so that a hold taken before
    /// a reload cannot settle on another client's budget.
    index: u32,
}

/// Every capped client's bucket and budget. Clients without a cap are not kept.
#[derive(Debug, Default)]
pub struct ClientCaps {
    caps: HashMap<Arc<str>, Capped>,
    next_index: u32,
}

impl ClientCaps {
    pub fn new(caps: &[ClientCap], now: Instant) -> ClientCaps {
        let mut c = ClientCaps::default();
        c.reconfigure(caps, now);
        c
    }

    /// Takes over new caps; a client whose cap stays keeps its bucket and its budget.
    pub fn reconfigure(&mut self, caps: &[ClientCap], now: Instant) {
        let mut next = HashMap::new();
        for cap in caps {
            let old = self.caps.remove(&cap.id);
            let (bucket, window, index) = match old {
                Some(old) => (old.rate.map(|(_, b)| b), old.tokens, old.index),
                None => {
                    self.next_index = self.next_index.wrapping_add(1);
                    (None, None, self.next_index)
                }
            };
            let rate = cap.rate_rpm.map(|rpm| {
                let bucket = bucket.unwrap_or_else(|| TokenBucket::new(1, now));
                (rpm / 60.0, bucket)
            });
            let tokens = cap.tpm.map(|tpm| match window {
                Some(mut window) => {
                    window.set_limit(tpm);
                    window
                }
                None => TokenWindow::new(tpm, now),
            });
            next.insert(
                cap.id.clone(),
                Capped {
                    rate,
                    tokens,
                    index,
                },
            );
        }
        self.caps = next;
    }

    pub fn is_empty(&self) -> bool {
        self.caps.is_empty()
    }

    pub fn advance(&mut self, now: Instant) {
        for c in self.caps.values_mut() {
            if let Some((rate, bucket)) = c.rate.as_mut() {
                bucket.refill(now, *rate, true);
            }
            if let Some(tokens) = c.tokens.as_mut() {
                tokens.advance(now);
            }
        }
    }

    /// Whether the client may send one more request costing `cost` now.
    pub fn ready(&self, client: &str, cost: Option<TokenCost>, now: Instant) -> bool {
        self.caps.get(client).is_none_or(|c| {
            c.rate.as_ref().is_none_or(|(_, b)| b.has_token())
                && match (&c.tokens, cost) {
                    (Some(window), Some(cost)) => window.fits(cost, now),
                    _ => true,
                }
        })
    }

    /// The client's token budget, if it has one.
    pub fn window(&self, client: &str) -> Option<&TokenWindow> {
        self.caps.get(client)?.tokens.as_ref()
    }

    /// The client's token budget, if it has one and `cost` can never fit in it.
    pub fn too_small_for(&self, client: &str, cost: TokenCost) -> Option<u64> {
        let window = self.caps.get(client)?.tokens.as_ref()?;
        (!window.can_fit(cost)).then(|| window.limit())
    }

    /// Takes the client's token and its cost of the client's budget; returns the budget's
    /// index for the request's `TokenHold`.
    pub fn take(&mut self, client: &str, cost: Option<TokenCost>, now: Instant) -> Option<u32> {
        let c = self.caps.get_mut(client)?;
        if let Some((_, bucket)) = c.rate.as_mut() {
            bucket.try_take();
        }
        match (c.tokens.as_mut(), cost) {
            (Some(window), Some(cost)) => {
                window.take(cost, now);
                Some(c.index)
            }
            _ => None,
        }
    }

    pub fn refund(&mut self, client: &str) {
        if let Some((_, bucket)) = self.caps.get_mut(client).and_then(|c| c.rate.as_mut()) {
            bucket.refund();
        }
    }

    /// The budget a hold was taken from.
    fn window_of(&mut self, hold: TokenHold) -> Option<&mut TokenWindow> {
        let index = hold.client?;
        self.caps
            .values_mut()
            .find(|c| c.index == index)?
            .tokens
            .as_mut()
    }

    /// Corrects a client's reservation to what the upstream counted.
    pub fn settle(&mut self, hold: TokenHold, actual: u64) {
        if let Some(window) = self.window_of(hold) {
            window.settle(hold, actual);
        }
    }

    /// Gives a client's reservation back.
    pub fn refund_tokens(&mut self, hold: TokenHold) {
        if let Some(window) = self.window_of(hold) {
            window.refund(hold);
        }
    }

    /// When the client's caps next let a request costing `cost` go (`None`: nothing holds it).
    pub fn next_ready_at(
        &self,
        client: &str,
        cost: Option<TokenCost>,
        now: Instant,
    ) -> Option<Instant> {
        let c = self.caps.get(client)?;
        let rate = c
            .rate
            .as_ref()
            .and_then(|(rate, bucket)| bucket.next_token_at(*rate, now));
        let tokens = c
            .tokens
            .as_ref()
            .zip(cost)
            .and_then(|(w, cost)| w.fits_at(cost, now));
        rate.max(tokens)
    }
}
