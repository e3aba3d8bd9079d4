//! An upstream answer: status, headers (name and value split at the first `:` of each line up
//! to an empty line), and the rest as the body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = 100 + u16::from_le_bytes([data[0], data[1]]) % 500;
    let text = String::from_utf8_lossy(&data[2..]);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let headers: Vec<(String, String)> = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    nvidia_sidecar::fuzzing::upstream_answer(status, &headers, body.as_bytes());
});
