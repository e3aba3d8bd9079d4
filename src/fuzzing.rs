//! Entry points for the fuzz targets in `fuzz/` (`cargo +nightly fuzz run <target>`): every
//! parser that reads input from outside the process, each called the way the sidecar calls it.
//! Each returns nothing; a target fails only by panicking (or by a sanitizer finding).

use std::time::SystemTime;

use crate::config;
use crate::limiter::{parse_go_duration, Priority, UpstreamSignal};

/// An upstream answer: its status, headers and the start of its body, read as the controller
/// reads them (rate-limit headers in every format, 429 and 503 bodies).
pub fn upstream_answer(status: u16, headers: &[(String, String)], body: &[u8]) {
    let lookup = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let signal = UpstreamSignal::read(status, lookup, body, SystemTime::now());
    let _ = signal.clone().with_body(status, body).refusal_reason();
    let _ = crate::limiter::retry_after_header(lookup, SystemTime::now());
    for (_, value) in headers {
        let _ = parse_go_duration(value);
    }
}

/// What a client controls in a request: `X-Priority`, `X-Client-Id`, the `Host` and the path.
pub fn client_request(priority: &str, client_id: &str, host: &str, path: &[u8]) {
    let claimed = priority.parse::<Priority>().unwrap_or(Priority::Normal);
    let access = config::AccessSettings::default();
    let _ = access.cap_priority(client_id, claimed);
    let _ = access.allows_host(host);
    let _ = crate::logging::log_value(client_id);
    let _ = crate::proxy::ambiguous_path(path);
}

/// A body of `POST /api/admin/config`: JSON, then the patch of live fields, then the whole
/// configuration validated with it.
pub fn admin_patch(body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let Ok(patch) = config::Overrides::from_json(&value) else {
        return;
    };
    let layers = config::ConfigLayers {
        path: None,
        file: config::parse(config::EMBEDDED_DEFAULT).expect("the embedded default parses"),
        overrides: patch,
    };
    let _ = config::validate_with_env(&layers.effective());
}

/// A configuration file's text, parsed and validated as `-t` and SIGHUP do.
pub fn config_text(text: &str) {
    if let Ok(file) = config::parse(text) {
        let _ = config::validate_with_env(&file);
    }
}

/// A reply of the shared quota's Lua script, built from fuzz input: integers and strings.
pub fn redis_reply(items: &[Result<i64, Vec<u8>>]) {
    crate::shared_quota::fuzz_reply(items);
}

/// A request head as a client sends it, in pieces: the first byte of `data` gives how many of
/// the next bytes are piece lengths (up to 8), the rest is the head. Read as the connection
/// loop reads it (the header deadline's clock, parking's parser, `Keep-Alive`).
pub fn request_head(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 9).min(rest.len());
    let (cuts, bytes) = rest.split_at(n);
    let cuts: Vec<usize> = cuts.iter().map(|c| usize::from(*c)).collect();
    crate::proxy::check_request_head(bytes, &cuts);
}
