//! When a connection's request head is on the clock: a pure state machine over the bytes the
//! connection reads and the answers it writes, with no timer and no I/O of its own
//! (`stream::FrontStream` keeps the timer).
//!
//! A head is on the clock from the connection's accept, and again from the first byte read
//! after a final answer, until the blank line that ends it. Blank lines before a request line
//! are skipped, as HTTP parsers (httparse, and so Pingora) skip them: they start the clock but
//! never end a head, so a client that sends `\r\n\r\n` first and then drips is still cut at the
//! deadline. Between a head's end and the head of the final answer the clock is off (a body
//! may take its time, an answer may stream for minutes); after a final answer it stays off
//! until the next request's first byte, and the idle connection is the keep-alive timeout's.

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadClock {
    /// Before the request line: only blank-line bytes so far (or none).
    Blank,
    /// Inside a head, after `tail`, its last three bytes read.
    Head { tail: [u8; 3] },
    /// The head is complete; its answer has not begun.
    Served,
    /// A final answer's head was written; nothing of the next request read yet.
    Answered,
}

/// What the bytes just read mean for the timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing changes.
    Same,
    /// A new head began after an answer: its deadline runs from now.
    Start,
}

impl HeadClock {
    /// A newly accepted connection: its first head is on the clock.
    pub fn accepted() -> HeadClock {
        HeadClock::Blank
    }

    /// Whether a head is being received, so that its deadline applies.
    pub fn on_the_clock(self) -> bool {
        matches!(self, HeadClock::Blank | HeadClock::Head { .. })
    }

    /// `bytes` were read from the client.
    pub fn read(&mut self, bytes: &[u8]) -> Tick {
        if bytes.is_empty() {
            return Tick::Same;
        }
        let mut tick = Tick::Same;
        if *self == HeadClock::Answered {
            *self = HeadClock::Blank;
            tick = Tick::Start;
        }
        let mut rest = bytes;
        if *self == HeadClock::Blank {
            let start = rest.iter().position(|b| !matches!(b, b'\r' | b'\n'));
            let Some(start) = start else {
                return tick;
            };
            rest = &rest[start..];
            *self = HeadClock::Head { tail: [0; 3] };
        }
        if let HeadClock::Head { tail } = self {
            if ends_head(tail, rest) {
                *self = HeadClock::Served;
            }
        }
        tick
    }

    /// `bytes` were written to the client.
    pub fn wrote(&mut self, bytes: &[u8]) {
        if *self == HeadClock::Served && final_answer_head(bytes) {
            *self = HeadClock::Answered;
        }
    }
}

/// Whether `read`, after the three bytes before it (`tail`, updated), ends a head: an empty
/// line, `\r\n\r\n` or, as the parser also takes it, with bare line feeds (`\n\n`, `\n\r\n`).
/// Looks at the seam between the reads, then at `read` itself, without copying it.
fn ends_head(tail: &mut [u8; 3], read: &[u8]) -> bool {
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

/// Whether a write is the head of a final answer: `HTTP/1.x NNN` with NNN ≥ 200.
fn final_answer_head(buf: &[u8]) -> bool {
    buf.len() >= 12
        && buf.starts_with(b"HTTP/1.")
        && buf[8] == b' '
        && (b'2'..=b'9').contains(&buf[9])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock after reading `reads` one after the other from a fresh connection.
    fn after(reads: &[&[u8]]) -> HeadClock {
        let mut clock = HeadClock::accepted();
        for read in reads {
            clock.read(read);
        }
        clock
    }

    /// The end of a head is found however the reads cut it, and only once it is complete.
    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\nHost: x\n\r\n",
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\n\nGET / HTTP/1.1\nHost: x\n\n",
        ] {
            found_once_however_cut(head);
        }
        assert!(after(&[b"GET / HTTP/1.1\r\nX: 1\r\n", b"\r"]).on_the_clock());
        assert_eq!(
            after(&[b"GET / HTTP/1.1\r\nX: 1\r\n", b"\r", b"\n"]),
            HeadClock::Served
        );
    }

    /// `head` is found complete exactly once, at its last byte, however reads cut it.
    fn found_once_however_cut(head: &[u8]) {
        let n = head.len();
        let cuts = [
            vec![n],
            vec![1; n],
            vec![n - 2, 2],
            vec![n - 3, 1, 2],
            vec![n - 1, 1],
            vec![2, n - 2],
            vec![4, n - 4],
        ];
        for cut in cuts {
            let mut clock = HeadClock::accepted();
            let mut at = 0;
            let ends: Vec<bool> = cut
                .iter()
                .map(|len| {
                    let was = clock.on_the_clock();
                    clock.read(&head[at..at + len]);
                    at += len;
                    was && !clock.on_the_clock()
                })
                .collect();
            let shown = String::from_utf8_lossy(head);
            assert_eq!(
                ends.iter().filter(|e| **e).count(),
                1,
                "{shown:?} cut {cut:?}: {ends:?}"
            );
            assert_eq!(ends.last(), Some(&true), "{shown:?} cut {cut:?}: {ends:?}");
        }
    }

    /// Blank lines first never end a head: the slowloris that sends `\r\n\r\n` and then drips
    /// is still on the clock.
    #[test]
    fn blank_lines_first_keep_the_head_on_the_clock() {
        for reads in [
            &[&b"\r\n\r\n"[..]][..],
            &[b"\n\n"],
            &[b"\r\n", b"\r\n", b"\r\n"],
            &[b"\r\n\r\n", b"G", b"E", b"T"],
            &[b"\n\nGET / HTTP/1.1\r\n", b"X-Slow: 1\r\n"],
        ] {
            assert!(after(reads).on_the_clock(), "{reads:?}");
        }
    }

    #[test]
    fn the_clock_is_off_from_the_end_of_a_head_to_the_next_requests_first_byte() {
        let mut clock = after(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"]);
        assert_eq!(clock.read(b"hello"), Tick::Same);
        assert!(!clock.on_the_clock(), "a body is never timed");
        clock.wrote(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(
            clock,
            HeadClock::Served,
            "an informational answer is not final"
        );
        clock.wrote(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(clock, HeadClock::Answered);
        clock.wrote(b"data: {}\n\n");
        assert_eq!(clock.read(b""), Tick::Same);
        assert!(!clock.on_the_clock(), "an idle kept-alive connection");
        assert_eq!(
            clock.read(b"\r\n"),
            Tick::Start,
            "the next head's first byte"
        );
        assert!(clock.on_the_clock());
        assert_eq!(clock.read(b"GET / HTTP/1.1\r\n\r\n"), Tick::Same);
        assert_eq!(clock, HeadClock::Served);
    }

    #[test]
    fn final_answer_heads_are_told_from_informational_ones_and_bodies() {
        assert!(final_answer_head(b"HTTP/1.1 200 OK\r\n"));
        assert!(final_answer_head(b"HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(!final_answer_head(b"HTTP/1.1 100 Continue\r\n"));
        assert!(!final_answer_head(b"data: {\"x\":1}\n\n"));
        assert!(!final_answer_head(b"1f\r\n"));
    }
}
