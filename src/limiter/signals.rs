//! What an upstream answer tells the limiter: accepted, rate limited (and for how long), or a
//! 429 that is not about the request rate at all.
//!
//! Formats understood: `Retry-After` (seconds or HTTP date), `retry-after-ms`, OpenAI's
//! `x-ratelimit-remaining-requests` / `x-ratelimit-reset-requests` (duration strings such as
//! `1s`, `6m0s`, `20ms`), and the IETF draft's `RateLimit` header (`remaining=0, reset=5` or
//! the structured `r=0;t=5`). Bodies matter only for 429s: OpenAI's `insufficient_quota` is a
//! billing state and NVIDIA's "Worker local total request limit reached" is a per-model
//! concurrency limit; neither says anything about our request rate.

use std::time::{Duration, SystemTime};

/// Longest pause an upstream header can impose; protects against absurd or hostile values.
/// A model may be locked for hours (NVIDIA's "try again in 5 hours"); a key's pause is capped
/// at an hour by its controller (`KEY_MAX_PAUSE`).
const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// A number of seconds from outside as a duration: `None` when negative or not a number,
/// saturating (never panicking) when too large to represent.
pub fn seconds(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// The limiter's reading of one upstream response.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamSignal {
    /// Not a 429. `pause` is set when the upstream says the quota is used up until then.
    Accepted { pause: Option<Duration> },
    /// A 429 about the request rate; `retry_after` when the upstream said how long to wait.
    RateLimited { retry_after: Option<Duration> },
    /// A 429 that retreating cannot help (billing, per-model concurrency).
    NotRateLimit(NonRateLimitReason),
    /// The request got no answer from the upstream (connect failure, the client left first).
    NoAnswer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonRateLimitReason {
    /// OpenAI's `insufficient_quota`: the account is out of credit.
    InsufficientQuota,
    /// NVIDIA's "Worker local total request limit reached" / "ResourceExhausted": a per-model
    /// concurrency limit.
    WorkerConcurrency,
    /// A 503: the upstream cannot take the request right now (overloaded, no free worker).
    Unavailable,
}

impl UpstreamSignal {
    /// Reads a response from its status, a header lookup and (for 429s) the start of its body.
    pub fn read<'a>(
        status: u16,
        header: impl Fn(&str) -> Option<&'a str>,
        body: &[u8],
        now: SystemTime,
    ) -> UpstreamSignal {
        if status == 503 {
            return UpstreamSignal::NotRateLimit(NonRateLimitReason::Unavailable);
        }
        if status != 429 {
            let exhausted = header("x-ratelimit-remaining-requests")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|remaining| remaining <= 0.0);
            let pause = if exhausted {
                header("x-ratelimit-reset-requests").and_then(parse_go_duration)
            } else {
                ietf_reset_when_exhausted(&header)
            };
            return UpstreamSignal::Accepted {
                pause: pause.map(|p| p.min(MAX_PAUSE)),
            };
        }
        if let Some(reason) = non_rate_limit_reason(body) {
            return UpstreamSignal::NotRateLimit(reason);
        }
        UpstreamSignal::RateLimited {
            retry_after: retry_after(&header, now).map(|p| p.min(MAX_PAUSE)),
        }
    }
}

impl UpstreamSignal {
    /// Refines a reading taken from the status and headers with the start of the body, once it
    /// is known: a 429 about billing or capacity is no rate limit, and a 503 with NVIDIA's
    /// capacity text is a capacity limit.
    pub fn with_body(self, status: u16, body: &[u8]) -> UpstreamSignal {
        match (status, non_rate_limit_reason(body)) {
            (429, Some(reason)) => UpstreamSignal::NotRateLimit(reason),
            (503, Some(NonRateLimitReason::WorkerConcurrency)) => {
                UpstreamSignal::NotRateLimit(NonRateLimitReason::WorkerConcurrency)
            }
            (429, None) => match self {
                // "try again in 5 hours": the body's word when the headers said nothing.
                UpstreamSignal::RateLimited { retry_after: None } => UpstreamSignal::RateLimited {
                    retry_after: retry_hint(body).map(|p| p.min(MAX_PAUSE)),
                },
                other => other,
            },
            _ => self,
        }
    }

    /// Whether the start of a successful answer's body is in fact NVIDIA's capacity error
    /// (an error event in the first chunk of an event stream, or a JSON error object).
    pub fn capacity_error_in(body: &[u8]) -> bool {
        let start = &body[..body.len().min(2048)];
        let text = String::from_utf8_lossy(start);
        text.contains("\"error\"")
            && non_rate_limit_reason(start) == Some(NonRateLimitReason::WorkerConcurrency)
    }

    /// The `reason` label of `upstream_refusals_total`, for a refusal.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            UpstreamSignal::RateLimited { .. } => Some("rate_limit"),
            UpstreamSignal::NotRateLimit(NonRateLimitReason::WorkerConcurrency) => {
                Some("worker_capacity")
            }
            UpstreamSignal::NotRateLimit(NonRateLimitReason::InsufficientQuota) => {
                Some("insufficient_quota")
            }
            UpstreamSignal::NotRateLimit(NonRateLimitReason::Unavailable) => Some("unavailable"),
            UpstreamSignal::Accepted { .. } | UpstreamSignal::NoAnswer => None,
        }
    }
}

/// The upstream's own word on how long to wait (after a 429 or a 503), most precise header
/// first, at most an hour.
pub fn retry_after_header<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    now: SystemTime,
) -> Option<Duration> {
    retry_after(&header, now).map(|p| p.min(MAX_PAUSE))
}

/// The upstream's own word on how long to wait after a 429, most precise header first.
fn retry_after<'a>(header: &impl Fn(&str) -> Option<&'a str>, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        if let Some(wait) = seconds(ms / 1000.0) {
            return Some(wait);
        }
    }
    if let Some(value) = header("retry-after") {
        let value = value.trim();
        if let Ok(secs) = value.parse::<f64>() {
            if let Some(wait) = seconds(secs) {
                return Some(wait);
            }
        } else if let Ok(when) = httpdate::parse_http_date(value) {
            return Some(when.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    if let Some(reset) = header("x-ratelimit-reset-requests").and_then(parse_go_duration) {
        return Some(reset);
    }
    ietf_reset_when_exhausted(header)
}

/// The IETF draft `RateLimit` header's reset time, when it says nothing remains.
fn ietf_reset_when_exhausted<'a>(header: &impl Fn(&str) -> Option<&'a str>) -> Option<Duration> {
    let value = header("ratelimit")?;
    let mut remaining = None;
    let mut reset = None;
    for part in value.split([',', ';']) {
        let Some((key, val)) = part.split_once('=') else {
            continue;
        };
        let val = val.trim().trim_matches('"');
        match key.trim() {
            "remaining" | "r" => remaining = val.parse::<f64>().ok(),
            "reset" | "t" => reset = val.parse::<f64>().ok(),
            _ => {}
        }
    }
    match (remaining, reset) {
        (Some(r), Some(t)) if r <= 0.0 => seconds(t),
        _ => None,
    }
}

/// Parses Go-style duration strings as OpenAI sends them: `1s`, `6m0s`, `20ms`, `1h2m3.5s`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<f64>() {
        return seconds(secs);
    }
    let mut total = 0.0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    seconds(total)
}

/// A wait said in words in a refusal's body: "try again in 5 hours", "retry after 30
/// seconds", "please wait 2 minutes" (the number may be a decimal; units from seconds to
/// days, singular or plural, or abbreviated). `None` when the body says no such thing.
pub fn retry_hint(body: &[u8]) -> Option<Duration> {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).to_ascii_lowercase();
    for cue in ["try again in ", "retry after ", "retry in ", "wait "] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(cue) {
            rest = &rest[at + cue.len()..];
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let Ok(number) = rest[..number_len].parse::<f64>() else {
                continue;
            };
            let unit: String = rest[number_len..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            let scale = match unit.as_str() {
                "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
                "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
                "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
                "d" | "day" | "days" => 86_400.0,
                "ms" | "millisecond" | "milliseconds" => 1e-3,
                _ => continue,
            };
            if let Some(wait) = seconds(number * scale) {
                return Some(wait);
            }
        }
    }
    None
}

fn non_rate_limit_reason(body: &[u8]) -> Option<NonRateLimitReason> {
    let body = String::from_utf8_lossy(body);
    if body.contains("insufficient_quota") {
        Some(NonRateLimitReason::InsufficientQuota)
    } else if body.contains("Worker local total request limit reached")
        || body.contains("ResourceExhausted")
    {
        Some(NonRateLimitReason::WorkerConcurrency)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(status: u16, headers: &[(&str, &str)], body: &str) -> UpstreamSignal {
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        UpstreamSignal::read(status, lookup, body.as_bytes(), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn hostile_values_clamp_instead_of_panicking() {
        for (name, value) in [
            ("Retry-After", "1e300"),
            ("retry-after-ms", "1e300"),
            ("x-ratelimit-reset-requests", "1e300"),
            ("Retry-After", "inf"),
            ("x-ratelimit-reset-requests", "99999999999999999999999h"),
            ("RateLimit", "remaining=0, reset=1e300"),
        ] {
            assert_eq!(
                read(429, &[(name, value)], ""),
                UpstreamSignal::RateLimited {
                    retry_after: Some(MAX_PAUSE)
                },
                "{name}: {value}"
            );
        }
        let used_up = read(
            200,
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1e300"),
            ],
            "",
        );
        assert_eq!(
            used_up,
            UpstreamSignal::Accepted {
                pause: Some(MAX_PAUSE)
            }
        );
        assert_eq!(parse_go_duration("NaN"), None);
        assert_eq!(parse_go_duration("-5s"), None);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_go_duration("2.5"), Some(Duration::from_secs_f64(2.5)));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn nvidia_429_without_headers_is_a_rate_limit() {
        let signal = read(429, &[], r#"{"status":429,"title":"Too Many Requests"}"#);
        assert_eq!(signal, UpstreamSignal::RateLimited { retry_after: None });
    }

    #[test]
    fn retry_after_formats() {
        let secs = read(429, &[("Retry-After", "7")], "");
        assert_eq!(
            secs,
            UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let ms = read(429, &[("retry-after-ms", "250"), ("Retry-After", "7")], "");
        assert_eq!(
            ms,
            UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_millis(250))
            }
        );
        let date = read(429, &[("Retry-After", "Thu, 01 Jan 1970 00:00:30 GMT")], "");
        assert_eq!(
            date,
            UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(30))
            }
        );
        let openai = read(429, &[("x-ratelimit-reset-requests", "6m0s")], "");
        assert_eq!(
            openai,
            UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(360))
            }
        );
        let ietf = read(429, &[("RateLimit", "limit=10, remaining=0, reset=4")], "");
        assert_eq!(
            ietf,
            UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(4))
            }
        );
        let huge = read(429, &[("Retry-After", "99999999")], "");
        assert_eq!(
            huge,
            UpstreamSignal::RateLimited {
                retry_after: Some(MAX_PAUSE)
            }
        );
    }

    #[test]
    fn billing_and_worker_limits_are_not_rate_limits() {
        let billing = read(429, &[], r#"{"error":{"code":"insufficient_quota"}}"#);
        assert_eq!(
            billing,
            UpstreamSignal::NotRateLimit(NonRateLimitReason::InsufficientQuota)
        );
        let worker = read(
            429,
            &[],
            r#"{"detail":"Worker local total request limit reached"}"#,
        );
        assert_eq!(
            worker,
            UpstreamSignal::NotRateLimit(NonRateLimitReason::WorkerConcurrency)
        );
    }

    #[test]
    fn a_503_is_no_rate_limit_and_its_body_can_name_the_worker_limit() {
        let busy = read(503, &[("Retry-After", "2")], "");
        assert_eq!(
            busy,
            UpstreamSignal::NotRateLimit(NonRateLimitReason::Unavailable)
        );
        let body = r#"{"message":"ResourceExhausted: All workers are busy, please retry later"}"#;
        assert_eq!(
            busy.with_body(503, body.as_bytes()).refusal_reason(),
            Some("worker_capacity")
        );
        let limited = read(429, &[], "");
        let worker =
            r#"{"detail":"ResourceExhausted: Worker local total request limit reached (33/32)"}"#;
        assert_eq!(
            limited.with_body(429, worker.as_bytes()),
            UpstreamSignal::NotRateLimit(NonRateLimitReason::WorkerConcurrency)
        );
        assert_eq!(
            read(429, &[], "").with_body(429, b"{}"),
            UpstreamSignal::RateLimited { retry_after: None }
        );
    }

    #[test]
    fn a_wait_said_in_words_in_the_body_is_read() {
        let hours = r#"{"status":429,"title":"Too Many Requests","detail":"Rate limit exceeded for this model, try again in 5 hours"}"#;
        assert_eq!(
            retry_hint(hours.as_bytes()),
            Some(Duration::from_secs(5 * 3600))
        );
        assert_eq!(
            read(429, &[], "").with_body(429, hours.as_bytes()),
            UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(5 * 3600))
            }
        );
        assert_eq!(
            retry_hint(b"Please retry after 1.5 minutes."),
            Some(Duration::from_secs(90))
        );
        assert_eq!(retry_hint(b"wait 20s"), Some(Duration::from_secs(20)));
        assert_eq!(
            retry_hint(b"try again in 2 days"),
            Some(Duration::from_secs(172_800))
        );
        assert_eq!(retry_hint(b"try again later"), None);
        assert_eq!(
            retry_hint(b"wait for it, try again in 3 hours"),
            Some(Duration::from_secs(10_800))
        );
        assert_eq!(retry_hint(b"try again in 3 fortnights"), None);
        // Hostile: capped by the signal, never a panic.
        let huge = read(429, &[], "").with_body(429, b"try again in 1e308 days");
        assert!(matches!(
            huge,
            UpstreamSignal::RateLimited {
                retry_after: None | Some(_)
            }
        ));
        assert_eq!(
            read(429, &[], "").with_body(429, b"try again in 99999999 days"),
            UpstreamSignal::RateLimited {
                retry_after: Some(MAX_PAUSE)
            }
        );
        // A header's word wins over the body's.
        assert_eq!(
            read(429, &[("Retry-After", "7")], "").with_body(429, hours.as_bytes()),
            UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn a_capacity_error_in_the_first_chunk_of_a_stream_is_found() {
        let event = b"data: {\"error\":{\"message\":\"ResourceExhausted: Worker local total request limit reached (33/32)\"}}\n\n";
        assert!(UpstreamSignal::capacity_error_in(event));
        assert!(!UpstreamSignal::capacity_error_in(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"ResourceExhausted is a word\"}}]}\n\n"
        ));
        assert!(!UpstreamSignal::capacity_error_in(
            b"data: {\"choices\":[]}\n\n"
        ));
    }

    #[test]
    fn exhausted_quota_on_a_success_pauses() {
        let used_up = read(
            200,
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2s"),
            ],
            "",
        );
        assert_eq!(
            used_up,
            UpstreamSignal::Accepted {
                pause: Some(Duration::from_secs(2))
            }
        );
        let fine = read(
            200,
            &[
                ("x-ratelimit-remaining-requests", "3"),
                ("x-ratelimit-reset-requests", "2s"),
            ],
            "",
        );
        assert_eq!(fine, UpstreamSignal::Accepted { pause: None });
        let ietf = read(200, &[("RateLimit", "\"default\";r=0;t=3")], "");
        assert_eq!(
            ietf,
            UpstreamSignal::Accepted {
                pause: Some(Duration::from_secs(3))
            }
        );
    }
}
