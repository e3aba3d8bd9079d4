//! A body of `POST /api/admin/config`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvidia_sidecar::fuzzing::admin_patch(data);
});
