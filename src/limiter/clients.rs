//! A client's own rate cap (`clients[].rate_rpm`): a bucket of one token per client, so that
//! one client cannot use more than its cap of the shared rate however long it waits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::TokenBucket;

/// A cap configured for one client id.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCap {
    pub id: Arc<str>,
    pub rate_rpm: f64,
}

#[derive(Debug)]
struct Capped {
    rate_per_sec: f64,
    bucket: TokenBucket,
}

/// Every capped client's bucket. Clients without a cap are not kept.
#[derive(Debug, Default)]
pub struct ClientCaps {
    caps: HashMap<Arc<str>, Capped>,
}

impl ClientCaps {
    pub fn new(caps: &[ClientCap], now: Instant) -> ClientCaps {
        let mut c = ClientCaps::default();
        c.reconfigure(caps, now);
        c
    }

    /// Takes over new caps; a client whose cap stays keeps its bucket.
    pub fn reconfigure(&mut self, caps: &[ClientCap], now: Instant) {
        let mut next = HashMap::new();
        for cap in caps {
            let bucket = match self.caps.remove(&cap.id) {
                Some(old) => old.bucket,
                None => TokenBucket::new(1, now),
            };
            next.insert(
                cap.id.clone(),
                Capped {
                    rate_per_sec: cap.rate_rpm / 60.0,
                    bucket,
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
            c.bucket.refill(now, c.rate_per_sec, true);
        }
    }

    /// Whether the client may send one more request now.
    pub fn ready(&self, client: &str) -> bool {
        self.caps.get(client).is_none_or(|c| c.bucket.has_token())
    }

    pub fn take(&mut self, client: &str) {
        if let Some(c) = self.caps.get_mut(client) {
            c.bucket.try_take();
        }
    }

    pub fn refund(&mut self, client: &str) {
        if let Some(c) = self.caps.get_mut(client) {
            c.bucket.refund();
        }
    }

    /// When the client's cap next lets a request go (`None`: uncapped).
    pub fn next_token_at(&self, client: &str, now: Instant) -> Option<Instant> {
        let c = self.caps.get(client)?;
        c.bucket.next_token_at(c.rate_per_sec, now)
    }
}
