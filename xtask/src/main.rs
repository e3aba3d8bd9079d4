//! `cargo xtask run [-- sidecar args]`: runs the sidecar (release build) on its embedded
//! default config. `cargo xtask test [-- cargo test args]`: runs the test suite.
//! `cargo xtask prerequisites [--test-tools]`: only installs what is missing.
//! `cargo xtask deb [--binary PATH] [--out DIR] [--compression xz|gzip|none]`: builds the
//! Debian package (`deb.rs`).
//!
//! Building the sidecar needs C and C++ compilers, make and CMake (Pingora's zlib-ng). On a fresh Debian or
//! Ubuntu machine with only the Rust toolchain, these commands install them with `apt-get`
//! (as root, or through `sudo`) before they build; elsewhere they say what to install. With
//! `--test-tools` (and always under `CI=true` for `test`) the optional tools some tests use are
//! installed as well: `promtool`, `chromium`, `systemd-analyze`, `redis-server`,
//! `redis-sentinel`, `debootstrap`, `systemd-nspawn` and `dpkg-deb`.
#![forbid(unsafe_code)]

mod deb;

use std::process::{exit, Command};

/// What the build needs: (command, Debian package). CMake drives Pingora's zlib-ng build with
/// `make` and probes a C++ compiler, so a machine with only `cc` (the Rust toolchain's linker)
/// still lacks three of them.
const BUILD: [(&str, &str); 4] = [
    ("cc", "gcc"),
    ("c++", "g++"),
    ("make", "make"),
    ("cmake", "cmake"),
];

/// What some tests use: (command, Debian package). Without them those tests skip by hand and
/// fail under `CI=true`.
const TEST_TOOLS: [(&str, &str); 8] = [
    ("promtool", "prometheus"),
    ("chromium", "chromium"),
    ("systemd-analyze", "systemd"),
    ("redis-server", "redis-server"),
    ("redis-sentinel", "redis-sentinel"),
    ("debootstrap", "debootstrap"),
    ("systemd-nspawn", "systemd-container"),
    ("dpkg-deb", "dpkg"),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (task, rest) = match args.split_first() {
        Some((task, rest)) => (task.as_str(), rest),
        None => ("help", &[][..]),
    };
    let rest: Vec<&str> = rest
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--")
        .collect();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match task {
        "run" => {
            install_missing(&BUILD);
            exit(cargo(&[&["run", "--release", "--"][..], &rest].concat()));
        }
        "test" => {
            install_missing(&BUILD);
            if ci {
                install_missing(&TEST_TOOLS);
            }
            exit(cargo(&[&["test"][..], &rest].concat()));
        }
        "prerequisites" => {
            install_missing(&BUILD);
            if ci || rest.contains(&"--test-tools") {
                install_missing(&TEST_TOOLS);
            }
        }
        "deb" => {
            let binary = option(&rest, "--binary");
            if binary.is_none() {
                install_missing(&BUILD);
                let code = cargo(&["build", "--release", "--locked"]);
                if code != 0 {
                    exit(code);
                }
            }
            install_missing(&[("dpkg-deb", "dpkg")]);
            match deb::build(binary, option(&rest, "--out"), option(&rest, "--compression")) {
                Ok(path) => println!("{}", path.display()),
                Err(e) => {
                    eprintln!("xtask deb: {e}");
                    exit(1);
                }
            }
        }
        _ => {
            eprintln!(
                "usage: cargo xtask run [-- ARGS] | test [-- ARGS] | prerequisites [--test-tools] \
                 | deb [--binary PATH] [--out DIR] [--compression TYPE]"
            );
            exit(2);
        }
    }
}

/// The value after `name` in `args`.
fn option<'a>(args: &[&'a str], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == name)
        .and_then(|i| args.get(i + 1).copied())
}

/// Runs cargo with `args`; its exit code.
fn cargo(args: &[&str]) -> i32 {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    match Command::new(cargo).args(args).status() {
        Ok(status) => status.code().unwrap_or(1),
        Err(e) => {
            eprintln!("xtask: cannot run cargo: {e}");
            1
        }
    }
}

fn found(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the Debian packages of the commands that are missing, or says what to install.
fn install_missing(tools: &[(&str, &str)]) {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(command, _)| !found(command))
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return;
    }
    if !found("apt-get") {
        eprintln!(
            "xtask: missing {}; install them with your package manager and run this again",
            missing.join(", ")
        );
        exit(1);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root && !found("sudo") {
        eprintln!(
            "xtask: missing {}; as root run: apt-get install -y --no-install-recommends {}",
            missing.join(", "),
            missing.join(" ")
        );
        exit(1);
    }
    eprintln!("xtask: installing {} with apt-get", missing.join(", "));
    let as_root = |args: &[&str]| {
        let mut command = if root {
            Command::new(args[0])
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg(args[0]);
            sudo
        };
        command
            .args(&args[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let installed = as_root(&["apt-get", "update", "-qq"])
        && as_root(
            &[
                &["apt-get", "install", "-y", "-qq", "--no-install-recommends"][..],
                &missing,
            ]
            .concat(),
        );
    if !installed {
        eprintln!("xtask: apt-get could not install {}", missing.join(", "));
        exit(1);
    }
}
