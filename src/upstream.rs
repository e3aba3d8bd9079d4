//! Upstream endpoints: where a route's requests go, resolved without blocking.
//!
//! Pingora's `HttpPeer::new` with a host name resolves DNS on the calling thread on every call
//! and panics when resolution fails. Here names are resolved with tokio's resolver, cached for
//! `dns_ttl`, and a failure becomes a clear error (a 502 for the client) instead of a panic. A
//! stale answer is used when a refresh fails, so a DNS hiccup does not take the sidecar down.
//!
//! A name may resolve to several addresses, and the first is not always reachable: `localhost`
//! is `::1` before `127.0.0.1` on a stock Debian, and a host without an IPv6 route still gets
//! AAAA answers. Every address is kept; the one in use moves on to the next when a connection to
//! it fails (`unreachable`), and the proxy retries the request there.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora_core::upstreams::peer::{HttpPeer, ALPN};

use crate::config::{UpstreamOptions, UpstreamUrl};

/// An upstream with its cached addresses.
pub struct Upstream {
    pub url: UpstreamUrl,
    cache: Mutex<Option<Resolved>>,
}

/// A name's addresses, the one in use, and when they were looked up.
#[derive(Clone)]
struct Resolved {
    addrs: Vec<SocketAddr>,
    current: usize,
    at: Instant,
}

impl Resolved {
    fn current(&self) -> SocketAddr {
        self.addrs[self.current]
    }
}

/// Why an upstream could not be reached before a connection was tried.
#[derive(Debug, Clone)]
pub struct ResolveError {
    pub host: String,
    pub reason: String,
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot resolve {}: {}", self.host, self.reason)
    }
}

impl Upstream {
    pub fn new(url: UpstreamUrl) -> Self {
        Upstream {
            url,
            cache: Mutex::new(None),
        }
    }

    /// The address to connect to, from the cache while it is fresh.
    pub async fn resolve(&self, ttl: Duration) -> Result<SocketAddr, ResolveError> {
        if let Ok(ip) = self.url.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.url.port));
        }
        let cached = self.lock().clone();
        if let Some(resolved) = &cached {
            if resolved.at.elapsed() < ttl {
                return Ok(resolved.current());
            }
        }
        let lookup = tokio::net::lookup_host((self.url.host.as_str(), self.url.port)).await;
        let fresh = match lookup.map(Iterator::collect::<Vec<_>>) {
            Ok(addrs) if addrs.is_empty() => Err("no addresses".to_string()),
            Ok(addrs) => Ok(addrs),
            Err(e) => Err(e.to_string()),
        };
        match (fresh, cached) {
            (Ok(addrs), previous) => Ok(self.store(addrs, previous.map(|p| p.current()))),
            (Err(reason), Some(stale)) => {
                log::warn!(
                    "DNS refresh for {} failed ({reason}); using {} until it recovers",
                    self.url.host,
                    stale.current()
                );
                Ok(stale.current())
            }
            (Err(reason), None) => Err(ResolveError {
                host: self.url.host.clone(),
                reason,
            }),
        }
    }

    /// Keeps a fresh answer, staying on the address in use if it is still among them.
    fn store(&self, addrs: Vec<SocketAddr>, in_use: Option<SocketAddr>) -> SocketAddr {
        let current = in_use
            .and_then(|a| addrs.iter().position(|b| *b == a))
            .unwrap_or(0);
        let resolved = Resolved {
            addrs,
            current,
            at: Instant::now(),
        };
        let addr = resolved.current();
        *self.lock() = Some(resolved);
        addr
    }

    /// A connection to `addr` failed: the next address is used from now on. True when the
    /// name has another address to try.
    pub fn unreachable(&self, addr: SocketAddr) -> bool {
        let mut cache = self.lock();
        let Some(resolved) = cache.as_mut() else {
            return false;
        };
        if resolved.addrs.len() < 2 {
            return false;
        }
        if resolved.current() == addr {
            resolved.current = (resolved.current + 1) % resolved.addrs.len();
            log::warn!(
                "cannot connect to {} at {addr}; trying {} next",
                self.url.host,
                resolved.current()
            );
        }
        true
    }

    /// How many addresses the name has (1 for an address literal or before the first lookup).
    pub fn address_count(&self) -> usize {
        self.lock().as_ref().map_or(1, |r| r.addrs.len())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Resolved>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A peer for `addr` with verification on: TLS upstreams always get their host name as SNI
    /// (an empty SNI would turn certificate verification off).
    pub fn peer(&self, addr: SocketAddr, options: &UpstreamOptions) -> HttpPeer {
        let sni = if self.url.tls {
            self.url.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, self.url.tls, sni);
        let o = &mut peer.options;
        o.connection_timeout = Some(options.connect_timeout);
        o.total_connection_timeout = Some(options.connect_timeout);
        o.read_timeout = Some(options.read_timeout);
        o.write_timeout = Some(options.read_timeout);
        o.idle_timeout = Some(options.idle_timeout);
        o.verify_cert = true;
        o.verify_hostname = true;
        o.alpn = ALPN::H1;
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literals_need_no_lookup_and_bad_names_fail_without_panicking() {
        let literal = Upstream::new(UpstreamUrl::parse("http://127.0.0.1:8080").unwrap());
        assert_eq!(
            literal
                .resolve(Duration::from_secs(60))
                .await
                .unwrap()
                .port(),
            8080
        );
        let bad = Upstream::new(UpstreamUrl::parse("https://no-such-host.invalid").unwrap());
        let err = bad.resolve(Duration::from_secs(60)).await.unwrap_err();
        assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
    }

    #[tokio::test]
    async fn names_are_resolved_and_cached() {
        let local = Upstream::new(UpstreamUrl::parse("http://localhost:9").unwrap());
        let addr = local.resolve(Duration::from_secs(60)).await.unwrap();
        assert!(addr.ip().is_loopback());
        assert!(local.cache.lock().unwrap().is_some());
    }

    #[tokio::test]
    async fn an_unreachable_address_hands_over_to_the_next() {
        let name = Upstream::new(UpstreamUrl::parse("http://api.example:8080").unwrap());
        let v6: SocketAddr = "[::1]:8080".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        name.store(vec![v6, v4], None);
        assert_eq!(name.resolve(Duration::from_secs(60)).await.unwrap(), v6);
        assert_eq!(name.address_count(), 2);
        assert!(name.unreachable(v6));
        assert_eq!(name.resolve(Duration::from_secs(60)).await.unwrap(), v4);
        // A late failure report for the old address does not move it on again.
        assert!(name.unreachable(v6));
        assert_eq!(name.resolve(Duration::from_secs(60)).await.unwrap(), v4);
        assert!(name.unreachable(v4));
        assert_eq!(name.resolve(Duration::from_secs(60)).await.unwrap(), v6);
        // A fresh answer keeps the address in use when it is still there.
        name.store(vec![v6, v4], Some(v4));
        assert_eq!(name.resolve(Duration::from_secs(60)).await.unwrap(), v4);
        name.store(vec![v6], Some(v4));
        assert_eq!(name.resolve(Duration::from_secs(60)).await.unwrap(), v6);
        // One address: nothing else to try.
        assert!(!name.unreachable(v6));
        let literal = Upstream::new(UpstreamUrl::parse("http://127.0.0.1:9").unwrap());
        assert!(!literal.unreachable("127.0.0.1:9".parse().unwrap()));
    }
}
