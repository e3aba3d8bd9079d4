//! The systemd unit: `systemd-analyze verify` is clean and `systemd-analyze security` scores
//! it at most 1.5 (lower is safer).

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

mod support;

use std::process::Command;

use support::require_tool;

/// The unit with its `ExecStart` pointing at the binary under test (verify checks that the
/// executable exists).
fn unit_for_this_build(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string("systemd/nvidia-sidecar.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/nvidia-sidecar -c /etc/nvidia-sidecar/sidecar.yaml"));
    let unit = unit.replace(
        "/usr/bin/nvidia-sidecar",
        env!("CARGO_BIN_EXE_nvidia-sidecar"),
    );
    let path = dir.join("nvidia-sidecar.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn the_unit_verifies_cleanly() {
    if !require_tool("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("nvidia-sidecar.service"))
        .collect();
    assert!(
        problems.is_empty(),
        "systemd-analyze verify complains:\n{stderr}"
    );
}

#[test]
fn the_unit_is_hardened() {
    if !require_tool("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let score: f64 = stdout
        .lines()
        .find_map(|l| {
            l.split("exposure level for nvidia-sidecar.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure score in:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    println!("systemd-analyze security: {score}");
    assert!(score <= 1.5, "exposure {score} is above 1.5:\n{stdout}");
    for setting in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=",
        "ConfigurationDirectory=",
        "LoadCredential=",
        "Restart=on-failure",
        "LimitNOFILE=",
    ] {
        assert!(
            std::fs::read_to_string(&unit).unwrap().contains(setting),
            "the unit lacks {setting}"
        );
    }
}

/// The unit's file limit holds the default `server.max_connections` with the admin plane's
/// connections and the upstream ones (`file_limit::needed`).
#[test]
fn the_units_file_limit_holds_the_default_connections() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/nvidia-sidecar.service"
    ))
    .unwrap();
    let limit: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("the unit sets LimitNOFILE")
        .trim()
        .parse()
        .unwrap();
    let max_connections = nvidia_sidecar::config::load_str("")
        .unwrap()
        .server
        .max_connections;
    let need = nvidia_sidecar::file_limit::needed(max_connections);
    assert!(
        limit >= need,
        "LimitNOFILE={limit} is below the {need} the default config needs"
    );
}

#[test]
fn the_config_shipped_for_the_unit_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("nvidia-api-key");
    std::fs::write(&key, "nvapi-test").unwrap();
    let config = std::fs::read_to_string("systemd/sidecar.yaml")
        .unwrap()
        .replace(
            "/run/credentials/nvidia-sidecar.service/nvidia-api-key",
            key.to_str().unwrap(),
        );
    let path = dir.path().join("sidecar.yaml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
