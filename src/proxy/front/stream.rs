//! The stream of a front-door connection, with its two jobs:
//!
//! - **the header deadline.** Pingora times out each read of a request header (60 s), not the
//!   header as a whole: a client that sends one header line every 20 s would keep its
//!   connection, and a file descriptor, for ever. Pingora offers no hook before it reads the
//!   header, so the deadline sits one layer down, in the stream: a read that is still waiting
//!   for the end of a head when the deadline has passed fails. When a head is on the clock is
//!   `head_clock`'s to say; this keeps the timer.
//! - **the replayed bytes.** Bytes the connection loop read ahead (a parked request, or more
//!   than a first read) are read again from here before the socket's, so that Pingora parses
//!   the request as it came.
//!
//! `conn::ProxyApp` puts every accepted connection in a `FrontStream`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::head_clock::{HeadClock, Tick};

/// Time a client has to send a whole request head.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(15);

/// An accepted connection: its request heads must arrive within a deadline, and bytes read
/// ahead are read again first.
pub struct FrontStream {
    inner: Stream,
    deadline: Duration,
    /// Fires at the deadline of the head on the clock; one timer for the whole connection,
    /// set again for each head.
    timer: Pin<Box<Sleep>>,
    clock: HeadClock,
    /// Bytes read from the client already (a parked request), to be read again before the
    /// socket's.
    replay: BytesMut,
    /// Once the replay is read, read nothing more from the socket: the next request is behind
    /// this one and waits there until this one is answered.
    held_back: bool,
}

impl FrontStream {
    pub fn new(inner: Stream, deadline: Duration) -> FrontStream {
        FrontStream {
            inner,
            deadline,
            timer: Box::pin(tokio::time::sleep(deadline)),
            clock: HeadClock::accepted(),
            replay: BytesMut::new(),
            held_back: false,
        }
    }

    /// The connection's `FrontStream`, as Pingora gives back the stream it was given.
    ///
    /// Pingora hands a finished session's stream back erased (`Stream` is a boxed
    /// `dyn IO`), and offers no typed way to get the concrete stream back: this is the one
    /// place where it is recovered. `None` only if Pingora gave back another stream than
    /// it was given.
    pub fn regain(stream: Stream) -> Option<Box<FrontStream>> {
        stream.into_any().downcast::<FrontStream>().ok()
    }

    /// Whether reads stop at the end of the replay (see `held_back`).
    pub fn hold_back(&mut self, held: bool) {
        self.held_back = held;
    }

    /// Has `bytes`, read through this stream already, read again before anything else: before
    /// what is left of an earlier replay too, which they were read from.
    pub fn replay(&mut self, mut bytes: BytesMut) {
        bytes.extend_from_slice(&self.replay);
        self.replay = bytes;
    }
}

impl AsyncRead for FrontStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            // Seen by the clock already, when they were first read.
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            if this.replay.is_empty() {
                this.replay = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        if this.held_back {
            // Nothing is read, and no waker kept: whoever polls moves on (Pingora watches the
            // upstream meanwhile), and the connection loop lifts the hold before it reads again.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.clock.read(&buf.filled()[before..]) == Tick::Start {
                    let deadline = tokio::time::Instant::now() + this.deadline;
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = this.clock.on_the_clock() && this.timer.as_mut().poll(cx).is_ready();
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "request header not complete within the deadline",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for FrontStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.clock.wrote(buf);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for FrontStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for FrontStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for FrontStream {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for FrontStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for FrontStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for FrontStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for FrontStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for FrontStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrontStream")
            .field("inner", &self.inner)
            .field("clock", &self.clock)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection over an in-memory pipe, its far end for the test to play the client.
    fn connection() -> (Box<FrontStream>, tokio::net::UnixStream) {
        let (near, far) = tokio::net::UnixStream::pair().unwrap();
        let stream: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(near));
        (Box::new(FrontStream::new(stream, HEADER_DEADLINE)), far)
    }

    #[tokio::test]
    async fn the_stream_given_to_pingora_is_regained_with_what_it_held() {
        let (mut stream, mut client) = connection();
        stream.replay(BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]));
        let erased: Stream = stream;
        let mut regained = FrontStream::regain(erased).expect("it is the front stream");
        let mut head = [0u8; 18];
        regained.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET / HTTP/1.1\r\n\r\n");
        client.write_all(b"x").await.unwrap();
        assert_eq!(regained.read_u8().await.unwrap(), b'x');

        let (near, _far) = tokio::net::UnixStream::pair().unwrap();
        let other: Stream = Box::new(pingora_core::protocols::l4::stream::Stream::from(near));
        assert!(FrontStream::regain(other).is_none());
    }

    #[tokio::test]
    async fn a_held_back_stream_reads_its_replay_and_leaves_the_socket_alone() {
        let (mut stream, mut client) = connection();
        client.write_all(b"next").await.unwrap();
        stream.replay(BytesMut::from(&b"this"[..]));
        stream.hold_back(true);
        let mut this = [0u8; 4];
        stream.read_exact(&mut this).await.unwrap();
        assert_eq!(&this, b"this");
        let more = tokio::time::timeout(Duration::from_millis(50), stream.read_u8()).await;
        assert!(more.is_err(), "read past the replay: {more:?}");
        stream.hold_back(false);
        let mut next = [0u8; 4];
        stream.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next");
    }
}
