//! nvidia-sidecar: an egress proxy that lets many clients share one quota-limited upstream API.
#![forbid(unsafe_code)]

pub mod limiter;
