//! A deadline for every request header on the proxy port.
//!
//! Pingora times out each read of a request header (60 s), not the header as a whole: a client
//! that sends one header line every 20 s keeps its connection, and a file descriptor, for
//! ever. Pingora offers no hook before it reads the header, so the deadline sits one layer
//! down, in the stream: `HeaderDeadline` wraps each accepted connection and fails a read that
//! is still waiting for the end of a request header (`\r\n\r\n`) when the deadline has passed.
//! The first header's deadline runs from the moment the connection is accepted. Once the head of
//! a final response (`HTTP/1.x` with a status of 200 or more) has been written, the next
//! header's deadline runs from its first byte: a kept-alive connection that sends nothing is
//! left to Pingora's keep-alive timeout, and a response that streams for minutes while the
//! client sends nothing is never cut. Reads of a request body are never limited.
//!
//! `connection::ProxyApp` puts every accepted connection in a `HeaderDeadline`.

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

/// Time a client has to send a whole request header, and that a kept-alive connection may
/// stay idle before its next request.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(15);

/// An accepted connection whose request headers must arrive within a deadline.
pub struct HeaderDeadline {
    inner: Stream,
    deadline: Duration,
    /// Fires at the deadline of the request header being received, when `armed`; one timer
    /// for the whole connection, set again for each header.
    timer: Pin<Box<Sleep>>,
    /// A request header is being received.
    armed: bool,
    /// The last three bytes read, to find `\r\n\r\n` across reads.
    tail: [u8; 3],
    /// A final response head was written since the last header ended: the next bytes read
    /// begin the next request's header.
    answered: bool,
    /// Bytes read from the client already (a parked request), to be read again before the
    /// socket's.
    replay: BytesMut,
}

impl HeaderDeadline {
    pub fn new(inner: Stream, deadline: Duration) -> HeaderDeadline {
        HeaderDeadline {
            inner,
            deadline,
            timer: Box::pin(tokio::time::sleep(deadline)),
            armed: true,
            tail: [0; 3],
            answered: false,
            replay: BytesMut::new(),
        }
    }

    /// Has `bytes`, read through this stream already, read again before anything else: before
    /// what is left of an earlier replay too, which they were read from.
    pub fn replay(&mut self, mut bytes: BytesMut) {
        bytes.extend_from_slice(&self.replay);
        self.replay = bytes;
    }
}

/// Whether `read`, following the last three bytes read before it (`tail`, updated), completes a
/// request header: an empty line, `\r\n\r\n` or, as the HTTP parser also takes it, with bare
/// line feeds (`\n\n`, `\n\r\n`). Looks at the seam between the reads, then at `read`
/// itself, without copying it.
fn ends_header(tail: &mut [u8; 3], read: &[u8]) -> bool {
    let empty_line = |bytes: &[u8]| {
        memchr::memmem::find(bytes, b"\n\n").is_some()
            || memchr::memmem::find(bytes, b"\n\r\n").is_some()
    };
    let head = read.len().min(3);
    let mut seam = [0u8; 6];
    seam[..3].copy_from_slice(tail);
    seam[3..3 + head].copy_from_slice(&read[..head]);
    let seam = &seam[..3 + head];
    let found = empty_line(seam) || empty_line(read);
    let last = if read.len() >= 3 { read } else { seam };
    tail.copy_from_slice(&last[last.len() - 3..]);
    found
}

/// Whether a write is the head of a final response: `HTTP/1.x NNN` with NNN ≥ 200.
fn final_response_head(buf: &[u8]) -> bool {
    buf.len() >= 12
        && buf.starts_with(b"HTTP/1.")
        && buf[8] == b' '
        && (b'2'..=b'9').contains(&buf[9])
}

impl AsyncRead for HeaderDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            // Seen by the deadline already, when they were first read.
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            if this.replay.is_empty() {
                this.replay = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if this.answered && !read.is_empty() {
                    // The first bytes of the next request: its header's deadline starts now.
                    this.answered = false;
                    this.tail = [0; 3];
                    let deadline = tokio::time::Instant::now() + this.deadline;
                    this.timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                if this.armed && ends_header(&mut this.tail, read) {
                    this.armed = false;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = this.armed && this.timer.as_mut().poll(cx).is_ready();
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

impl AsyncWrite for HeaderDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if !self.armed && final_response_head(buf) {
            self.answered = true;
        }
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
impl Shutdown for HeaderDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeaderDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadline {
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadline {
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

impl GetProxyDigest for HeaderDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeaderDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeaderDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for HeaderDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeadline")
            .field("inner", &self.inner)
            .field("awaiting_header", &self.armed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of a header is found however the reads cut it, and only once it is complete.
    #[test]
    fn the_end_of_a_header_is_found_across_reads() {
        for header in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\nHost: x\n\r\n",
        ] {
            found_once_however_cut(header);
        }
        let mut tail = [0u8; 3];
        assert!(!ends_header(&mut tail, b"GET / HTTP/1.1\r\nX: 1\r\n"));
        assert!(!ends_header(&mut tail, b"\r"));
        assert!(ends_header(&mut tail, b"\n"));
    }

    /// `header` is found complete exactly once, at its last byte, however reads cut it.
    fn found_once_however_cut(header: &[u8]) {
        let n = header.len();
        let cuts = [
            vec![n],
            vec![1; n],
            vec![n - 2, 2],
            vec![n - 3, 1, 2],
            vec![n - 1, 1],
        ];
        for cut in cuts {
            let mut tail = [0u8; 3];
            let mut at = 0;
            let ends: Vec<bool> = cut
                .iter()
                .map(|len| {
                    let end = ends_header(&mut tail, &header[at..at + len]);
                    at += len;
                    end
                })
                .collect();
            assert_eq!(
                ends.iter().filter(|e| **e).count(),
                1,
                "cut {cut:?}: {ends:?}"
            );
            assert_eq!(ends.last(), Some(&true), "cut {cut:?}: {ends:?}");
        }
    }

    #[test]
    fn final_response_heads_are_told_from_informational_ones_and_bodies() {
        assert!(final_response_head(b"HTTP/1.1 200 OK\r\n"));
        assert!(final_response_head(b"HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(!final_response_head(b"HTTP/1.1 100 Continue\r\n"));
        assert!(!final_response_head(b"data: {\"x\":1}\n\n"));
        assert!(!final_response_head(b"1f\r\n"));
    }
}
