//! The proxy port's connections against the real binary, tried as a client that misbehaves
//! (or merely does what HTTP allows) would: idle kept-alive connections, a flood of them at
//! `server.max_connections`, heads that start with blank lines, malformed lengths while the
//! bucket is congested, requests pipelined behind a parked one, `Expect: 100-continue`.

#![allow(clippy::disallowed_methods)] // tests time real runs (see clippy.toml)

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{LimitStyle, MockUpstream, Sidecar};

const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hello there"}]}"#;

/// A POST of `BODY` to the chat route, kept alive, with `extra` header lines.
fn chat(extra: &str) -> Vec<u8> {
    chat_with(extra, BODY)
}

/// A POST of `body` to the chat route, kept alive, with `extra` header lines.
fn chat_with(extra: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// A chat body that says `word`.
fn saying(word: &str) -> Vec<u8> {
    format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{word}"}}]}}"#).into_bytes()
}

const MODELS: &[u8] = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// One answer read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
}

/// Reads the next whole answer on `stream` (`Content-Length` or chunked), `pending` holding
/// bytes read past the previous one; `None` when the connection closes first or nothing whole
/// comes within `limit`.
async fn next_answer(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    limit: Duration,
) -> Option<Answer> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        if let Some((answer, used)) = whole_answer(pending) {
            pending.drain(..used);
            if answer.status >= 200 {
                return Some(answer);
            }
            continue;
        }
        let mut buf = [0u8; 8192];
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// The answer at the start of `bytes` and its length, once it is all there.
fn whole_answer(bytes: &[u8]) -> Option<(Answer, usize)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..end]).to_string();
    let status = head.get(9..12)?.parse().ok()?;
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let used = if status < 200 {
        end
    } else if let Some(length) = length {
        if bytes.len() < end + length {
            return None;
        }
        end + length
    } else if lower.contains("transfer-encoding: chunked") {
        end + bytes[end..].windows(5).position(|w| w == b"0\r\n\r\n")? + 5
    } else {
        end
    };
    Some((Answer { status, head }, used))
}

/// Whether the sidecar closes `stream` within `limit` (reading and dropping what comes).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let until = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Connections the sidecar closed for `reason`, as counted.
async fn closes(sidecar: &Sidecar, reason: &str) -> f64 {
    let series = format!("nvidia_sidecar_proxy_connections_closed_total{{reason=\"{reason}\"}}");
    sidecar.metric(&series).await
}

/// The sidecar's readiness answer.
async fn ready(sidecar: &Sidecar) -> reqwest::Response {
    support::client()
        .get(sidecar.admin("/health/ready"))
        .send()
        .await
        .unwrap()
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.unwrap()
}

/// An idle kept-alive connection is closed at `server.keepalive_timeout`, or at the client's
/// own shorter `Keep-Alive: timeout`; one that keeps sending is not.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_alive_connection_is_closed_at_the_timeout() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::builder(&mock.url())
        .extra("rate_rpm: 600")
        .server("threads: 2\nkeepalive_timeout: 3")
        .start()
        .await;
    let port = sidecar.port;

    let mut idle = connect(port).await;
    let mut pending = Vec::new();
    idle.write_all(MODELS).await.unwrap();
    let answer = next_answer(&mut idle, &mut pending, Duration::from_secs(10)).await;
    assert_eq!(answer.map(|a| a.status), Some(200));
    let since = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(10)).await,
        "an idle kept-alive connection was still open after 10 s"
    );
    let after = since.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "closed after {after:?}, before the timeout"
    );

    // The client's own shorter timeout.
    let mut short = connect(port).await;
    let asked = [
        &MODELS[..MODELS.len() - 2],
        b"Keep-Alive: timeout=1\r\n\r\n",
    ]
    .concat();
    short.write_all(&asked).await.unwrap();
    let answer = next_answer(&mut short, &mut Vec::new(), Duration::from_secs(10)).await;
    assert_eq!(answer.map(|a| a.status), Some(200));
    let since = Instant::now();
    assert!(closed_within(&mut short, Duration::from_secs(10)).await);
    let after = since.elapsed();
    assert!(
        after < Duration::from_millis(2500),
        "closed after {after:?}, not at the client's 1 s"
    );

    // A connection that sends a request every second stays open past the timeout.
    let mut busy = connect(port).await;
    let mut pending = Vec::new();
    for _ in 0..5 {
        busy.write_all(MODELS).await.unwrap();
        let answer = next_answer(&mut busy, &mut pending, Duration::from_secs(10)).await;
        assert_eq!(answer.map(|a| a.status), Some(200));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let closed = closes(&sidecar, "idle_timeout").await;
    assert_eq!(closed, 2.0);
}

/// With `server.max_connections` connections open and idle — kept-alive ones and new ones
/// that sent nothing — a new client is served: the longest idle one is closed for it. When
/// every connection is busy, a new one is refused and readiness says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_client_is_served_while_max_connections_idle_connections_are_open() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::builder(&mock.url())
        .extra("rate_rpm: 600")
        .server("threads: 2\nmax_connections: 4")
        .start()
        .await;
    let port = sidecar.port;
    // Two kept alive after a request, two that never sent anything; the first is the oldest.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(port).await;
        stream.write_all(MODELS).await.unwrap();
        let answer = next_answer(&mut stream, &mut Vec::new(), Duration::from_secs(10)).await;
        assert_eq!(answer.map(|a| a.status), Some(200));
        idle.push(stream);
        // Apart enough that each is idle before the next: their order is the test's.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..2 {
        idle.push(connect(port).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let readiness = ready(&sidecar).await;
    assert_eq!(readiness.status(), 200, "idle connections can make room");

    // Three new clients that stay connected, each served.
    let mut newcomers = Vec::new();
    for round in 0..3 {
        let mut stream = connect(port).await;
        stream.write_all(MODELS).await.unwrap();
        let answer = next_answer(&mut stream, &mut Vec::new(), Duration::from_secs(10)).await;
        assert_eq!(answer.map(|a| a.status), Some(200), "new client {round}");
        newcomers.push(stream);
    }
    // The three oldest made room, oldest first; the newest idle one is still open.
    for (i, stream) in idle.iter_mut().enumerate() {
        let closed = closed_within(stream, Duration::from_millis(300)).await;
        assert_eq!(closed, i < 3, "idle connection {i}");
    }
    let evicted = closes(&sidecar, "evicted").await;
    assert_eq!(evicted, 3.0);
    drop((idle, newcomers));

    // Four busy connections (answers that stream for 3 s): a fifth is refused, and the
    // sidecar is not ready meanwhile.
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let url = sidecar.url("/v1/chat/completions");
            tokio::spawn(async move {
                let response = support::client()
                    .post(url)
                    .header("connection", "close")
                    .json(&serde_json::json!({"model": "m", "stream": true, "chunks": 6, "chunk_delay_ms": 500}))
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                (status, response.text().await.unwrap())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let readiness = ready(&sidecar).await;
    assert_eq!(readiness.status(), 503);
    assert!(readiness.text().await.unwrap().contains("none idle"));
    let mut fifth = connect(port).await;
    let _ = fifth.write_all(MODELS).await;
    assert!(
        closed_within(&mut fifth, Duration::from_secs(5)).await,
        "a fifth connection was served while four were busy"
    );
    for stream in streams {
        let (status, text) = stream.await.unwrap();
        assert_eq!(status, 200);
        assert!(text.contains("[DONE]"), "a busy connection was cut: {text}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let readiness = ready(&sidecar).await;
    assert_eq!(readiness.status(), 200);
    let refused = closes(&sidecar, "refused_full").await;
    assert_eq!(refused, 1.0);
}

/// A head that starts with blank lines, then drips, is cut at the header deadline (15 s), as
/// one that drips from its first byte is.
#[tokio::test(flavor = "multi_thread")]
async fn a_blank_line_first_dripping_head_is_cut_at_the_header_deadline() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 600").await;
    let mut drips = Vec::new();
    for start in ["\r\n\r\n", "\n\n"] {
        let mut stream = connect(sidecar.port).await;
        stream.write_all(start.as_bytes()).await.unwrap();
        drips.push(stream);
    }
    let started = Instant::now();
    let lines = ["GET /v1/models HTTP/1.1\r\n", "Host: 127.0.0.1\r\n"]
        .into_iter()
        .chain(std::iter::repeat("X-Slow: 1\r\n"))
        .take(30);
    let mut cut = [None, None];
    for line in lines {
        for (i, stream) in drips.iter_mut().enumerate() {
            if cut[i].is_some() {
                continue;
            }
            let write = stream.write_all(line.as_bytes()).await;
            let mut buf = [0u8; 256];
            let read =
                tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
            if write.is_err() || matches!(read, Ok(Ok(_)) | Ok(Err(_))) {
                cut[i] = Some(started.elapsed());
            }
        }
        if cut.iter().all(Option::is_some) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (start, cut) in ["\\r\\n\\r\\n", "\\n\\n"].iter().zip(cut) {
        let took = cut.unwrap_or_else(|| panic!("{start} first: still open after 30 lines"));
        assert!(
            (Duration::from_secs(10)..Duration::from_secs(25)).contains(&took),
            "{start} first: cut after {took:?}"
        );
    }
    // A request with a blank line first is still served.
    let mut stream = connect(sidecar.port).await;
    stream.write_all(&[b"\r\n", MODELS].concat()).await.unwrap();
    let answer = next_answer(&mut stream, &mut Vec::new(), Duration::from_secs(10)).await;
    assert_eq!(answer.map(|a| a.status), Some(200));
}

/// A malformed `Content-Length` is refused with 400 at once, while the bucket is congested,
/// and nothing goes upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_content_length_is_refused_before_it_queues() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 30 s: after the first request, everyone waits.
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 2\nrequest_timeout: 60").await;
    let port = sidecar.port;
    let mut first = connect(port).await;
    first.write_all(&chat("")).await.unwrap();
    let answer = next_answer(&mut first, &mut Vec::new(), Duration::from_secs(10)).await;
    assert_eq!(answer.map(|a| a.status), Some(200));
    // Someone waits: the bucket is congested.
    let mut waiting = connect(port).await;
    waiting.write_all(&chat("")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = mock.state.arrivals().len();
    let len = BODY.len();
    for value in [
        format!("+{len}"),
        format!("{len} {len}"),
        format!("0x{len:x}"),
        "-1".to_string(),
    ] {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {value}\r\nConnection: close\r\n\r\n"
        );
        let mut stream = connect(port).await;
        stream
            .write_all(&[head.as_bytes(), BODY].concat())
            .await
            .unwrap();
        let asked = Instant::now();
        let answer = next_answer(&mut stream, &mut Vec::new(), Duration::from_secs(3)).await;
        let took = asked.elapsed();
        let answer =
            answer.unwrap_or_else(|| panic!("Content-Length: {value}: no answer within 3 s"));
        assert_eq!(answer.status, 400, "Content-Length: {value}: {answer:?}");
        assert!(
            took < Duration::from_secs(2),
            "Content-Length: {value}: after {took:?}"
        );
    }
    assert_eq!(mock.state.arrivals().len(), before, "nothing went upstream");
}

/// Requests pipelined behind a parked one are served in order, each whole: the upstream sees
/// each request with its own body, and the client gets each answer.
#[tokio::test(flavor = "multi_thread")]
async fn requests_pipelined_behind_a_parked_one_are_served_in_order() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    // One token every 2 s: every request of this test waits.
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 30\nrequest_timeout: 30").await;
    let port = sidecar.port;
    let mut first = connect(port).await;
    first.write_all(&chat("")).await.unwrap();
    assert!(
        next_answer(&mut first, &mut Vec::new(), Duration::from_secs(10))
            .await
            .is_some()
    );

    let before = mock.state.arrivals().len();
    let mut stream = connect(port).await;
    // One write with two requests; then a third while they wait.
    let bodies = ["first", "second, longer", "third"].map(saying);
    stream
        .write_all(&[chat_with("", &bodies[0]), chat_with("", &bodies[1])].concat())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(&chat_with("", &bodies[2])).await.unwrap();
    let mut pending = Vec::new();
    for name in ["a", "b", "c"] {
        let answer = next_answer(&mut stream, &mut pending, Duration::from_secs(20)).await;
        let answer = answer.unwrap_or_else(|| panic!("request {name}: no answer"));
        assert_eq!(answer.status, 200, "request {name}: {answer:?}");
        assert!(
            answer
                .head
                .to_ascii_lowercase()
                .contains("x-sidecar-queue-wait-ms"),
            "request {name} was admitted: {answer:?}"
        );
    }
    let arrivals = mock.state.arrivals();
    let sent: Vec<_> = arrivals[before..]
        .iter()
        .map(|a| (a.body_len, a.body_checksum))
        .collect();
    let expected: Vec<_> = bodies
        .iter()
        .map(|b| (b.len(), support::fnv1a64(b)))
        .collect();
    assert_eq!(
        sent, expected,
        "each request went upstream once, in order, with its body"
    );
}

/// `Expect: 100-continue` is answered with `100 Continue` once the request is admitted, and
/// its body then goes upstream whole; one that would wait past its deadline is told so
/// without `100 Continue`.
#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_once_the_request_is_admitted() {
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 30\nrequest_timeout: 30").await;
    let port = sidecar.port;
    for congested in [false, true] {
        if congested {
            let mut first = connect(port).await;
            first.write_all(&chat("")).await.unwrap();
            assert!(
                next_answer(&mut first, &mut Vec::new(), Duration::from_secs(10))
                    .await
                    .is_some()
            );
        }
        let before = mock.state.arrivals().len();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            BODY.len()
        );
        let mut stream = connect(port).await;
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 256];
            match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                other => panic!("congested {congested}: no 100 Continue: {other:?}"),
            }
        }
        let text = String::from_utf8_lossy(&seen).to_string();
        assert!(
            text.starts_with("HTTP/1.1 100 Continue\r\n"),
            "congested {congested}: {text}"
        );
        assert_eq!(
            mock.state.arrivals().len(),
            before,
            "nothing upstream before the body"
        );
        stream.write_all(BODY).await.unwrap();
        let mut pending = seen[text.find("\r\n\r\n").unwrap() + 4..].to_vec();
        let answer = next_answer(&mut stream, &mut pending, Duration::from_secs(10)).await;
        assert_eq!(answer.map(|a| a.status), Some(200), "congested {congested}");
        let arrival = mock.state.arrivals().last().cloned().unwrap();
        assert_eq!(arrival.body_checksum, support::fnv1a64(BODY));
    }
}

/// `-t` warns when the open-file limit cannot hold `server.max_connections` connections.
#[test]
fn the_config_check_warns_of_a_file_limit_below_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(&path, "server:\n  max_connections: 16384\n").unwrap();
    let check = |limit: u32| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {limit} && exec \"$0\" -t -c \"$1\""))
            .arg(env!("CARGO_BIN_EXE_nvidia-sidecar"))
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let low = check(4096);
    assert!(
        low.contains("warning") && low.contains("LimitNOFILE"),
        "{low}"
    );
    let hard = hard_open_files();
    if hard.is_none_or(|h| h >= 20_000) {
        assert!(!check(20_000).contains("warning"));
    }
}

/// This process's hard open-file limit, read from `/proc` (`None`: unlimited).
fn hard_open_files() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}
