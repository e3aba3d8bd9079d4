//! What a client controls: `X-Priority`, `X-Client-Id`, `Host` and the path, one per line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |b| *b == b'\n');
    let mut next = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (priority, client, host) = (next(), next(), next());
    let path = data.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    nvidia_sidecar::fuzzing::client_request(&priority, &client, &host, path);
});
