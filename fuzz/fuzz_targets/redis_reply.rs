//! A reply of the shared quota's Lua script: items of one tag byte each, an integer (8 bytes)
//! or a string (a length byte, then that many bytes).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut items = Vec::new();
    let mut rest = data;
    while let Some((&tag, tail)) = rest.split_first() {
        if tag % 2 == 0 {
            let mut n = [0u8; 8];
            let take = tail.len().min(8);
            n[..take].copy_from_slice(&tail[..take]);
            items.push(Ok(i64::from_le_bytes(n)));
            rest = &tail[take..];
        } else {
            let len = usize::from(tail.first().copied().unwrap_or(0)).min(tail.len().saturating_sub(1));
            let bytes = tail.get(1..1 + len).unwrap_or_default().to_vec();
            items.push(Err(bytes));
            rest = tail.get(1 + len..).unwrap_or_default();
        }
    }
    nvidia_sidecar::fuzzing::redis_reply(&items);
});
