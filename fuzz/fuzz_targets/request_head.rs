//! A request head in pieces, as the proxy port's connection loop reads it (see
//! `nvidia_sidecar::fuzzing::request_head`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvidia_sidecar::fuzzing::request_head(data);
});
