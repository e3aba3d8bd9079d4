//! A configuration file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        nvidia_sidecar::fuzzing::config_text(text);
    }
});
