//! Upstream endpoints: where a route's requests go, resolved without blocking.
//!
//! Pingora's `HttpPeer::new` with a host name resolves DNS on the calling thread on every call
//! and panics when resolution fails. Here names are resolved with tokio's resolver, cached for
//! `dns_ttl`, and a failure becomes a clear error (a 502 for the client) instead of a panic. A
//! stale answer is used when a refresh fails, so a DNS hiccup does not take the sidecar down.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pingora_core::upstreams::peer::{HttpPeer, ALPN};

use crate::config::{UpstreamOptions, UpstreamUrl};

/// An upstream with its cached address.
pub struct Upstream {
    pub url: UpstreamUrl,
    cache: Mutex<Option<(SocketAddr, Instant)>>,
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
        let cached = *self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((addr, at)) = cached {
            if at.elapsed() < ttl {
                return Ok(addr);
            }
        }
        let lookup = tokio::net::lookup_host((self.url.host.as_str(), self.url.port)).await;
        let fresh = match lookup {
            Ok(mut addrs) => addrs.next().ok_or_else(|| "no addresses".to_string()),
            Err(e) => Err(e.to_string()),
        };
        match (fresh, cached) {
            (Ok(addr), _) => {
                *self.cache.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((addr, Instant::now()));
                Ok(addr)
            }
            (Err(reason), Some((stale, _))) => {
                log::warn!(
                    "DNS refresh for {} failed ({reason}); using {stale} until it recovers",
                    self.url.host
                );
                Ok(stale)
            }
            (Err(reason), None) => Err(ResolveError {
                host: self.url.host.clone(),
                reason,
            }),
        }
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
}
