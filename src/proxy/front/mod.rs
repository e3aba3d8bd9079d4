//! The connection door of the proxy port: what happens on a connection before Pingora's
//! session for a request exists.
//!
//! - `conn`: the loop over a connection's requests (a fork of Pingora's, its differences
//!   in its header), its idle time, and why each connection closed;
//! - `slots`: room for connections at `server.max_connections`, made by closing the longest
//!   idle one;
//! - `park`: a request that must queue waits here, holding only its bytes;
//! - `stream`: the connection's stream, with the header deadline and the replayed bytes;
//! - `head_clock`: when a request head is on the header deadline's clock, as a pure state
//!   machine.

mod conn;
mod head_clock;
mod park;
mod slots;
mod stream;

pub use conn::ProxyApp;
pub use park::Parked;
pub use slots::Slots;

/// For the `request_head` fuzz target (`fuzzing::request_head`): `bytes`, read in pieces of
/// the lengths `cuts` gives (cycled; the rest in one), go through the head parser the
/// connection loop uses and the header deadline's clock. Panics when the clock lets a head
/// off that the parser still waits for: that head could drip for ever.
pub(crate) fn check_request_head(bytes: &[u8], cuts: &[usize]) {
    let mut clock = head_clock::HeadClock::accepted();
    let mut at = 0;
    let mut cut = cuts.iter().filter(|c| **c > 0).cycle();
    while at < bytes.len() {
        let len = cut
            .next()
            .map_or(bytes.len() - at, |c| (*c).min(bytes.len() - at));
        clock.read(&bytes[at..at + len]);
        at += len;
        if !clock.on_the_clock() {
            let seen = &bytes[..at];
            assert!(
                !matches!(park::parse_head(seen), Ok(None)),
                "the clock stopped on a head the parser still waits for: {:?}",
                String::from_utf8_lossy(seen)
            );
            break;
        }
    }
    let _ = park::client_keepalive(bytes);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// Pieces heads are made of, hostile ones among them.
    fn piece() -> impl Strategy<Value = &'static [u8]> {
        prop::sample::select(vec![
            &b"GET / HTTP/1.1"[..],
            b"POST /v1/chat/completions HTTP/1.1",
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"Host: a",
            b"X: 1",
            b"Content-Length: 5",
            b"Keep-Alive: timeout=3",
            b":",
            b"\t",
            b"\0",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The header deadline's clock never stops on a head the parser still waits for,
        /// however the head is made and cut into reads.
        #[test]
        fn the_clock_never_lets_a_head_off_early(
            pieces in prop::collection::vec(piece(), 0..24),
            cuts in prop::collection::vec(0usize..12, 0..6),
        ) {
            let bytes = pieces.concat();
            super::check_request_head(&bytes, &cuts);
        }
    }
}
