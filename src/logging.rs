//! Logging: `RUST_LOG`-style filters (parsed by `env_filter`, as env_logger parses them), one
//! line per record in env_logger's layout (`[2026-11-26T18:41:05.981Z INFO  target] message`),
//! and a writer thread that takes the lines off the request path.
//!
//! A request thread formats its line into a buffer of its own and appends it to a shared batch;
//! the writer thread swaps the batch out and writes it to stderr in one call. A line that finds
//! the writer idle wakes it; the writer then gathers for `GATHER` before it writes, so under load
//! one wake-up and one system call carry hundreds of access lines, and a line is written at
//! most `GATHER` after it was logged. An idle sidecar wakes the writer never. Nothing is
//! dropped: a request thread waits only when a whole MiB is still unwritten (stderr blocked).
//! `log::logger().flush()` returns once everything logged so far is written; the process ends
//! through `exit` (or `main`'s return), which flushes first.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Modules whose debug and trace output carries request and response headers (the upstream
/// key, the admin token) or bodies (prompts), or Redis commands (its password).
const SECRET_BEARING_TARGETS: [&str; 12] = [
    "pingora",
    "pingora_core",
    "pingora_proxy",
    "pingora_http",
    "pingora_pool",
    "pingora_cache",
    "hyper",
    "hyper_util",
    "h2",
    "redis",
    "rustls",
    "tokio_rustls",
];

/// The environment variable that lifts the cap on those modules: set it to `yes` only where
/// the logs may hold secrets.
pub const LOG_SECRETS_ENV: &str = "NVIDIA_SIDECAR_LOG_SECRETS";

/// Unwritten bytes beyond which a logging thread waits for the writer.
const MAX_UNWRITTEN: usize = 1 << 20;
/// How long the writer gathers lines before it writes them.
const GATHER: Duration = Duration::from_millis(10);
/// Unwritten bytes that make the writer write at once.
const WRITE_AT: usize = 64 * 1024;

/// A client-controlled value as it goes into the access log: as it is when it is a plain
/// token, else quoted with `"` and `\` escaped, so that no value can add fields of its own
/// (`X-Client-Id: x route=admin status=200`).
pub fn log_value(value: &str) -> std::borrow::Cow<'_, str> {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
    if plain {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.push_str(&c.escape_default().to_string()),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    std::borrow::Cow::Owned(quoted)
}

/// The log filter for `level` (or `RUST_LOG`, which overrides it): as asked, except that the
/// modules that would log secrets stay at `info` unless `NVIDIA_SIDECAR_LOG_SECRETS=yes`.
/// Returns the filter and whether a cap was applied.
pub fn log_filter(level: &str, rust_log: Option<&str>, secrets_allowed: bool) -> (String, bool) {
    let spec = rust_log.unwrap_or(level).to_string();
    let verbose = spec.to_ascii_lowercase();
    if secrets_allowed || !(verbose.contains("debug") || verbose.contains("trace")) {
        return (spec, false);
    }
    let caps: Vec<String> = SECRET_BEARING_TARGETS
        .iter()
        .map(|t| format!("{t}=info"))
        .collect();
    (format!("{spec},{}", caps.join(",")), true)
}

/// Sets up logging to stderr at `level` unless `RUST_LOG` says otherwise (see `log_filter`),
/// through the writer thread when `writer_thread`, else written by each logging thread itself.
/// Only the first call in a process takes effect.
pub fn init_logging(level: &str, writer_thread: bool) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let secrets = std::env::var(LOG_SECRETS_ENV).is_ok_and(|v| v == "yes");
    let (mut spec, capped) = log_filter(level, rust_log.as_deref(), secrets);
    if rust_log.is_none() {
        // A kept-alive stream has its headers before the upstream answers, and Pingora warns
        // each time it then drops the upstream's (see `proxy::keepalive`).
        spec.push_str(",pingora_core::protocols::http::v1::server=error");
        // Pingora's connection pool logs an error when a pooled connection is still held by
        // its idle watcher at the moment it is reused; it then simply opens a new one. Nothing
        // failed, and an operator should not see an error for it.
        spec.push_str(",pingora_core::connectors=off");
    }
    let filter = env_filter::Builder::new().parse(&spec).build();
    let max_level = filter.filter();
    let logger = Logger {
        filter,
        batch: writer_thread.then(|| Batch::start(Box::new(std::io::stderr()))),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max_level);
    }
    if capped {
        log::warn!(
            "Pingora, HTTP, TLS and Redis modules log at info at most: their debug and trace output carries the API key, tokens and prompts; set {LOG_SECRETS_ENV}=yes to lift this"
        );
    }
}

/// Ends the process with `code` once everything logged so far is written.
pub fn exit(code: i32) -> ! {
    log::logger().flush();
    std::process::exit(code)
}

struct Logger {
    filter: env_filter::Filter,
    /// None: each line is written to stderr at once, by the thread that logs it.
    batch: Option<Arc<Batch>>,
}

impl Logger {
    fn emit(&self, line: &[u8]) {
        match &self.batch {
            Some(batch) => batch.push(line),
            None => {
                let _ = std::io::stderr().write_all(line);
            }
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        thread_local! {
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let now = SystemTime::now();
        let written = LINE.try_with(|line| match line.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                format_line(&mut line, record, now);
                self.emit(&line);
                true
            }
            Err(_) => false,
        });
        if written != Ok(true) {
            // Logging from inside a message's formatting, or while the thread ends.
            let mut line = Vec::new();
            format_line(&mut line, record, now);
            self.emit(&line);
        }
    }

    fn flush(&self) {
        if let Some(batch) = &self.batch {
            batch.drain();
        }
    }
}

/// `[2026-11-26T18:41:05.981Z INFO  target] message\n`
fn format_line(line: &mut Vec<u8>, record: &log::Record<'_>, now: SystemTime) {
    line.push(b'[');
    write_timestamp(line, now);
    line.push(b' ');
    let level = record.level().as_str();
    line.extend_from_slice(level.as_bytes());
    line.resize(line.len() + 5usize.saturating_sub(level.len()), b' ');
    line.push(b' ');
    line.extend_from_slice(record.target().as_bytes());
    line.extend_from_slice(b"] ");
    match record.args().as_str() {
        Some(text) => line.extend_from_slice(text.as_bytes()),
        None => {
            let _ = write!(line, "{}", record.args());
        }
    }
    line.push(b'\n');
}

/// RFC 3339 in UTC with milliseconds, written digit by digit (a line is written for every
/// request, and `write!` with widths costs more than the rest of the line).
fn write_timestamp(line: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    push_padded(line, year.max(0) as u64, 4);
    line.push(b'-');
    push_padded(line, u64::from(month), 2);
    line.push(b'-');
    push_padded(line, u64::from(day), 2);
    line.push(b'T');
    push_padded(line, of_day / 3600, 2);
    line.push(b':');
    push_padded(line, of_day / 60 % 60, 2);
    line.push(b':');
    push_padded(line, of_day % 60, 2);
    line.push(b'.');
    push_padded(line, u64::from(since.subsec_millis()), 3);
    line.push(b'Z');
}

/// `value` in decimal, with leading zeros up to `width` digits.
fn push_padded(line: &mut Vec<u8>, mut value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    let start = start.min(digits.len().saturating_sub(width));
    line.extend_from_slice(&digits[start..]);
}

/// The proleptic Gregorian date of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to eras of 400 years that start on 0000-03-01, so that the leap day ends a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Lines waiting for the writer thread.
struct Batch {
    state: Mutex<BatchState>,
    /// Wakes the writer: there are lines.
    filled: Condvar,
    /// Wakes logging threads and `drain`: the writer took a batch or finished one.
    emptied: Condvar,
}

#[derive(Default)]
struct BatchState {
    lines: Vec<u8>,
    /// The writer waits for a first line, and must be woken by it.
    idle: bool,
    /// Someone waits in `drain`: write without gathering.
    drain_wanted: bool,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
}

impl Batch {
    /// The batch, and the thread that writes it to `out`.
    fn start(out: Box<dyn Write + Send>) -> Arc<Batch> {
        let batch = Arc::new(Batch {
            state: Mutex::new(BatchState::default()),
            filled: Condvar::new(),
            emptied: Condvar::new(),
        });
        let writer = batch.clone();
        std::thread::Builder::new()
            .name("log writer".to_string())
            .spawn(move || writer.write_forever(out))
            .expect("the log writer thread starts");
        batch
    }

    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: &[u8]) {
        let mut state = self.lock();
        while state.lines.len() >= MAX_UNWRITTEN {
            state = self.emptied.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.lines.extend_from_slice(line);
        let wake = std::mem::take(&mut state.idle) || state.lines.len() >= WRITE_AT;
        drop(state);
        if wake {
            self.filled.notify_one();
        }
    }

    /// Returns once every line pushed before the call is written.
    fn drain(&self) {
        let mut state = self.lock();
        while !state.lines.is_empty() || state.writing {
            state.drain_wanted = true;
            state.idle = false;
            self.filled.notify_one();
            state = self.emptied.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn write_forever(&self, mut out: Box<dyn Write + Send>) {
        let mut taken = Vec::new();
        loop {
            let mut state = self.lock();
            state.writing = false;
            self.emptied.notify_all();
            while state.lines.is_empty() {
                state.idle = true;
                state = self.filled.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.idle = false;
            // Gather more lines, unless there are many already or someone waits.
            let until = Instant::now() + GATHER;
            while state.lines.len() < WRITE_AT && !state.drain_wanted {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .filled
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            state.drain_wanted = false;
            std::mem::swap(&mut taken, &mut state.lines);
            state.writing = true;
            drop(state);
            self.emptied.notify_all();
            // Nowhere to report a failed write to: the lines are lost, the sidecar goes on.
            let _ = out.write_all(&taken).and_then(|()| out.flush());
            taken.clear();
            if taken.capacity() > MAX_UNWRITTEN {
                taken.shrink_to(MAX_UNWRITTEN);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_values_cannot_forge_log_fields() {
        assert_eq!(log_value("agent-7"), "agent-7");
        assert_eq!(log_value("10.0.0.1"), "10.0.0.1");
        assert_eq!(
            log_value("x route=admin status=200"),
            "\"x route=admin status=200\""
        );
        assert_eq!(log_value("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(log_value(""), "\"\"");
    }

    #[test]
    fn verbose_levels_keep_secret_bearing_modules_at_info() {
        let (filter, capped) = log_filter("trace", None, false);
        assert!(capped);
        assert!(filter.starts_with("trace,"));
        assert!(filter.contains("pingora_proxy=info") && filter.contains("hyper=info"));
        let (filter, capped) = log_filter("info", Some("pingora_core=debug"), false);
        assert!(capped);
        assert!(filter.starts_with("pingora_core=debug,"));
        assert!(filter.ends_with("tokio_rustls=info"));
        assert_eq!(log_filter("info", None, false), ("info".to_string(), false));
        assert_eq!(
            log_filter("debug", None, true),
            ("debug".to_string(), false)
        );
    }

    #[test]
    fn dates_are_the_gregorian_calendar_in_utc() {
        let at = |secs: u64, millis: u64| {
            let mut line = Vec::new();
            write_timestamp(
                &mut line,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis),
            );
            String::from_utf8(line).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_795_718_465, 981), "2026-11-26T18:41:05.981Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        // Every day of four centuries against a count kept by hand.
        let mut days = 0;
        for year in 1970..2370 {
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let lengths = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            for (month, length) in lengths.iter().enumerate() {
                for day in 1..=*length {
                    assert_eq!(civil_from_days(days), (year, month as u32 + 1, day));
                    days += 1;
                }
            }
        }
    }

    #[test]
    fn a_line_has_env_loggers_layout() {
        let mut line = Vec::new();
        format_line(
            &mut line,
            &log::Record::builder()
                .level(log::Level::Info)
                .target("access")
                .args(format_args!("client=a status=200"))
                .build(),
            UNIX_EPOCH + Duration::from_millis(1_795_718_465_981),
        );
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "[2026-11-26T18:41:05.981Z INFO  access] client=a status=200\n"
        );
        // A message with values, and the widest level.
        let (mut line, status) = (Vec::new(), 503);
        format_line(
            &mut line,
            &log::Record::builder()
                .level(log::Level::Error)
                .target("nvidia_sidecar::proxy")
                .args(format_args!("status={status} of {}", "route"))
                .build(),
            UNIX_EPOCH + Duration::from_millis(7),
        );
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "[1970-01-01T00:00:00.007Z ERROR nvidia_sidecar::proxy] status=503 of route\n"
        );
    }

    /// A writer that is slow, and records what reached it and in how many writes.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(2));
            let mut seen = self.0.lock().unwrap();
            seen.0.extend_from_slice(buf);
            seen.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_whole_in_order_and_in_batches() {
        let recorder = Recorder::default();
        let batch = Batch::start(Box::new(recorder.clone()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let batch = batch.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        batch.push(format!("thread {t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        batch.drain();
        let (text, writes) = recorder.0.lock().unwrap().clone();
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.lines().count(), 8000, "lines lost or torn");
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..2000).collect::<Vec<_>>(), "thread {t}'s lines");
        }
        assert!(
            writes < 8000 / 10,
            "{writes} writes for 8000 lines: the writer does not batch"
        );
    }

    #[test]
    fn drain_waits_for_the_batch_being_written() {
        let recorder = Recorder::default();
        let batch = Batch::start(Box::new(recorder.clone()));
        batch.push(b"one\n");
        batch.drain();
        assert_eq!(recorder.0.lock().unwrap().0, b"one\n");
        batch.drain();
    }
}
