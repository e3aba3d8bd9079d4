//! Test support: the mock upstream, a test CA, the real sidecar as a child process, a real
//! Redis server, and a plain HTTP client.
#![allow(dead_code)]

pub mod browser;
pub mod mock_upstream;
pub mod redis_server;
pub mod sidecar;
pub mod tls;

#[allow(unused_imports)]
pub use mock_upstream::{
    fnv1a64, prompt_tokens, Framing, LimitStyle, MockUpstream, Quota, QuotaKind, Stating,
};

#[allow(unused_imports)]
pub use redis_server::{RedisServer, Sentinels};
#[allow(unused_imports)]
pub use sidecar::{free_port, Sidecar};

/// An HTTP client that never goes through a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Runs an optional system tool, or explains why a test cannot. By hand a missing tool skips
/// the test with a printed reason; under `CI=true` it is a failure.
pub fn require_tool(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{tool} is required under CI=true but is not installed");
        }
        eprintln!("skipping: {tool} is not installed (CI installs it; see .ci/run)");
    }
    found
}

/// Checks a metrics exposition with `promtool check metrics` (skipped with a reason when
/// promtool is missing, a failure under `CI=true`).
pub fn promtool_check(metrics: &str) {
    use std::io::Write;
    if !require_tool("promtool") {
        return;
    }
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chat body of about `bytes` bytes: a coding agent's long prompt.
pub fn long_prompt(bytes: usize) -> Vec<u8> {
    let text: String = "lorem ipsum dolor sit amet "
        .chars()
        .cycle()
        .take(bytes)
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "model": "mock",
        "messages": [{"role": "user", "content": text}],
    }))
    .unwrap()
}

/// A small chat completion request body.
pub fn chat_body() -> serde_json::Value {
    serde_json::json!({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
}
