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
    /// A 429 whose headers say the key's tokens are spent while its requests are not: the
    /// key's token budget, which the limiter learns from those headers (`StatedTokens`),
    /// not its request rate.
    TokenBudget,
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
                    .or_else(|| anthropic_reset_when_exhausted(&header, now))
            };
            return UpstreamSignal::Accepted {
                pause: pause.map(|p| p.min(MAX_PAUSE)),
            };
        }
        if let Some(reason) = non_rate_limit_reason(body) {
            return UpstreamSignal::NotRateLimit(reason);
        }
        if tokens_spent_not_requests(&header) {
            return UpstreamSignal::NotRateLimit(NonRateLimitReason::TokenBudget);
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
            UpstreamSignal::NotRateLimit(NonRateLimitReason::TokenBudget) => Some("token_limit"),
            UpstreamSignal::Accepted { .. } | UpstreamSignal::NoAnswer => None,
        }
    }
}

/// The request limit an upstream states in its headers: OpenAI's
/// `x-ratelimit-limit-requests` / `-remaining-requests` and Anthropic's
/// `anthropic-ratelimit-requests-limit` / `-remaining`, taken as requests per minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatedLimit {
    pub rpm: f64,
    pub remaining: Option<f64>,
}

impl StatedLimit {
    /// The limit the headers state; `None` when they state none, or something that is no
    /// limit: not a number, not above zero, not finite, or fewer than what they say remains.
    pub fn read<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<StatedLimit> {
        let number = |name: &str| header(name).and_then(|v| v.trim().parse::<f64>().ok());
        let (limit, remaining) = match number("x-ratelimit-limit-requests") {
            Some(limit) => (limit, number("x-ratelimit-remaining-requests")),
            None => (
                number("anthropic-ratelimit-requests-limit")?,
                number("anthropic-ratelimit-requests-remaining"),
            ),
        };
        let sane = limit.is_finite()
            && limit > 0.0
            && remaining.is_none_or(|r| r.is_finite() && r >= 0.0 && r <= limit);
        sane.then_some(StatedLimit {
            rpm: limit,
            remaining,
        })
    }
}

/// The largest token limit taken from headers: ten billion a minute.
const STATED_TOKENS_MAX: u64 = 10_000_000_000;

/// The token limit an upstream states in its headers, per minute: OpenAI's
/// `x-ratelimit-{limit,remaining,reset}-tokens` (the reset a duration, `6m0s`), Anthropic's
/// `anthropic-ratelimit-tokens-{limit,remaining,reset}` (RFC 3339) or, without those, the
/// stricter of its `-input-tokens-*` and `-output-tokens-*` budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatedTokens {
    pub limit: u64,
    pub remaining: Option<u64>,
    /// When the spent part is back, if the headers say.
    pub reset: Option<Duration>,
}

impl StatedTokens {
    /// The token limit the headers state; `None` when they state none, or something that is
    /// no limit: not a whole number, zero, absurdly large, or less than what they say remains.
    pub fn read<'a>(
        header: impl Fn(&str) -> Option<&'a str>,
        now: SystemTime,
    ) -> Option<StatedTokens> {
        let number = |name: &str| header(name).and_then(|v| v.trim().parse::<u64>().ok());
        let rfc3339 = |name: &str| {
            let at = parse_rfc3339(header(name)?)?;
            Some(at.duration_since(now).unwrap_or(Duration::ZERO))
        };
        let openai = || {
            Some(StatedTokens {
                limit: number("x-ratelimit-limit-tokens")?,
                remaining: number("x-ratelimit-remaining-tokens"),
                reset: header("x-ratelimit-reset-tokens").and_then(parse_go_duration),
            })
        };
        // (limit, remaining, reset) of one of Anthropic's budgets.
        let anthropic = |[limit, remaining, reset]: [&str; 3]| {
            Some(StatedTokens {
                limit: number(limit)?,
                remaining: number(remaining),
                reset: rfc3339(reset),
            })
        };
        let stated = openai()
            .or_else(|| {
                anthropic([
                    "anthropic-ratelimit-tokens-limit",
                    "anthropic-ratelimit-tokens-remaining",
                    "anthropic-ratelimit-tokens-reset",
                ])
            })
            .or_else(|| {
                let input = anthropic([
                    "anthropic-ratelimit-input-tokens-limit",
                    "anthropic-ratelimit-input-tokens-remaining",
                    "anthropic-ratelimit-input-tokens-reset",
                ]);
                let output = anthropic([
                    "anthropic-ratelimit-output-tokens-limit",
                    "anthropic-ratelimit-output-tokens-remaining",
                    "anthropic-ratelimit-output-tokens-reset",
                ]);
                match (input, output) {
                    (Some(i), Some(o)) => Some(if o.limit < i.limit { o } else { i }),
                    (i, o) => i.or(o),
                }
            })?;
        let sane = (1..=STATED_TOKENS_MAX).contains(&stated.limit)
            && stated.remaining.is_none_or(|r| r <= stated.limit);
        sane.then(|| StatedTokens {
            reset: stated.reset.map(|r| r.min(MAX_PAUSE)),
            ..stated
        })
    }
}

/// Whether a 429's headers say the tokens are spent and the requests are not.
fn tokens_spent_not_requests<'a>(header: &impl Fn(&str) -> Option<&'a str>) -> bool {
    let number = |name: &str| header(name).and_then(|v| v.trim().parse::<f64>().ok());
    let tokens_spent = [
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-output-tokens-remaining",
    ]
    .iter()
    .any(|name| number(name).is_some_and(|r| r <= 0.0));
    let requests_spent = [
        "x-ratelimit-remaining-requests",
        "anthropic-ratelimit-requests-remaining",
    ]
    .iter()
    .any(|name| number(name).is_some_and(|r| r <= 0.0));
    tokens_spent && !requests_spent
}

/// RFC 3339 (`2026-12-01T12:00:30Z`, `…30.5+01:00`) as a system time.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (date, rest) = text.split_once(['T', 't', ' '])?;
    let mut ymd = date.split('-');
    let year: i64 = ymd.next()?.parse().ok()?;
    let month: i64 = ymd.next()?.parse().ok()?;
    let day: i64 = ymd.next()?.parse().ok()?;
    let offset_at = rest.find(['Z', 'z', '+', '-'])?;
    let (time, zone) = rest.split_at(offset_at);
    let mut hms = time.split(':');
    let hour: i64 = hms.next()?.parse().ok()?;
    let minute: i64 = hms.next()?.parse().ok()?;
    let second: f64 = hms.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if !(0.0..61.0).contains(&second) {
        return None;
    }
    let offset = match zone {
        "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (h, m) = z[1..].split_once(':')?;
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(secs)
            + seconds(second.fract())?
            + Duration::from_secs(second.trunc() as u64),
    )
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
    ietf_reset_when_exhausted(header).or_else(|| anthropic_reset_when_exhausted(header, now))
}

/// Anthropic's `anthropic-ratelimit-requests-reset` (RFC 3339), when nothing remains.
fn anthropic_reset_when_exhausted<'a>(
    header: &impl Fn(&str) -> Option<&'a str>,
    now: SystemTime,
) -> Option<Duration> {
    let remaining = header("anthropic-ratelimit-requests-remaining")?
        .trim()
        .parse::<f64>()
        .ok()?;
    if remaining > 0.0 {
        return None;
    }
    let reset = parse_rfc3339(header("anthropic-ratelimit-requests-reset")?)?;
    Some(reset.duration_since(now).unwrap_or(Duration::ZERO))
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

    fn stated(headers: &[(&str, &str)], now: SystemTime) -> Option<StatedTokens> {
        StatedTokens::read(
            |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| *v)
            },
            now,
        )
    }

    #[test]
    fn token_limits_are_read_in_either_style_and_hostile_ones_ignored() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_590_400); // 2025-12-01T12:00:00Z
        assert_eq!(
            stated(
                &[
                    ("x-ratelimit-limit-tokens", "150000"),
                    ("x-ratelimit-remaining-tokens", "149000"),
                    ("x-ratelimit-reset-tokens", "6m0s"),
                ],
                now
            ),
            Some(StatedTokens {
                limit: 150_000,
                remaining: Some(149_000),
                reset: Some(Duration::from_secs(360)),
            })
        );
        let anthropic = stated(
            &[
                ("anthropic-ratelimit-input-tokens-limit", "40000"),
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2025-12-01T12:00:30Z",
                ),
                ("anthropic-ratelimit-output-tokens-limit", "8000"),
                ("anthropic-ratelimit-output-tokens-remaining", "8000"),
            ],
            now,
        )
        .unwrap();
        assert_eq!(
            (anthropic.limit, anthropic.remaining),
            (8_000, Some(8_000)),
            "the stricter"
        );
        let both = stated(
            &[
                ("anthropic-ratelimit-tokens-limit", "50000"),
                ("anthropic-ratelimit-tokens-remaining", "10"),
                ("anthropic-ratelimit-tokens-reset", "2025-12-01T12:00:30Z"),
            ],
            now,
        )
        .unwrap();
        assert_eq!(both.reset, Some(Duration::from_secs(30)));
        for bad in [
            [
                ("x-ratelimit-limit-tokens", "0"),
                ("x-ratelimit-remaining-tokens", "0"),
            ],
            [
                ("x-ratelimit-limit-tokens", "-5"),
                ("x-ratelimit-remaining-tokens", "0"),
            ],
            [
                ("x-ratelimit-limit-tokens", "1e9"),
                ("x-ratelimit-remaining-tokens", "0"),
            ],
            [
                ("x-ratelimit-limit-tokens", "100"),
                ("x-ratelimit-remaining-tokens", "101"),
            ],
            [
                ("x-ratelimit-limit-tokens", "99999999999999999999"),
                ("x", ""),
            ],
        ] {
            assert_eq!(stated(&bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn a_429_with_tokens_spent_and_requests_left_is_the_token_budget() {
        let tokens = read(
            429,
            &[
                ("x-ratelimit-remaining-requests", "12"),
                ("x-ratelimit-remaining-tokens", "0"),
            ],
            "",
        );
        assert_eq!(
            tokens,
            UpstreamSignal::NotRateLimit(NonRateLimitReason::TokenBudget)
        );
        assert_eq!(tokens.refusal_reason(), Some("token_limit"));
        let anthropic = read(
            429,
            &[("anthropic-ratelimit-input-tokens-remaining", "0")],
            "",
        );
        assert_eq!(
            anthropic,
            UpstreamSignal::NotRateLimit(NonRateLimitReason::TokenBudget)
        );
        for requests in [
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-remaining-tokens", "0"),
            ][..],
            &[("x-ratelimit-remaining-tokens", "500")],
            &[],
        ] {
            assert!(
                matches!(read(429, requests, ""), UpstreamSignal::RateLimited { .. }),
                "{requests:?}"
            );
        }
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
    fn stated_limits_of_both_styles_are_read_and_nonsense_is_not() {
        let stated = |headers: &[(&str, &str)]| {
            StatedLimit::read(|name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| *v)
            })
        };
        assert_eq!(
            stated(&[
                ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-remaining-requests", "499")
            ]),
            Some(StatedLimit {
                rpm: 500.0,
                remaining: Some(499.0)
            })
        );
        assert_eq!(
            stated(&[("anthropic-ratelimit-requests-limit", "50")]),
            Some(StatedLimit {
                rpm: 50.0,
                remaining: None
            })
        );
        for bad in ["0", "-5", "NaN", "inf", "abc", ""] {
            assert_eq!(
                stated(&[("x-ratelimit-limit-requests", bad)]),
                None,
                "{bad}"
            );
        }
        assert_eq!(
            stated(&[
                ("x-ratelimit-limit-requests", "10"),
                ("x-ratelimit-remaining-requests", "50")
            ]),
            None,
            "more remaining than the limit is no limit"
        );
        assert_eq!(stated(&[]), None);
    }

    #[test]
    fn rfc3339_times_parse() {
        let at = |s: &str| {
            parse_rfc3339(s).map(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
            })
        };
        assert_eq!(at("1970-01-01T00:00:30Z"), Some(30.0));
        assert_eq!(at("2026-12-01T12:00:00Z"), Some(1_796_126_400.0));
        assert_eq!(at("2026-12-01T13:00:00+01:00"), Some(1_796_126_400.0));
        assert_eq!(at("1970-01-01T00:00:01.5Z"), Some(1.5));
        assert_eq!(at("2026-13-01T00:00:00Z"), None);
        assert_eq!(at("yesterday"), None);
        // Anthropic's reset on an exhausted success pauses until then.
        let used_up = read(
            200,
            &[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:20Z"),
            ],
            "",
        );
        assert_eq!(
            used_up,
            UpstreamSignal::Accepted {
                pause: Some(Duration::from_secs(20))
            }
        );
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
