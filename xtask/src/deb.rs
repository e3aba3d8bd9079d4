//! The Debian package: the binary, the hardened unit, `/etc/nvidia-sidecar/sidecar.yaml` as a
//! conffile and the maintainer scripts in `packaging/deb/`, put together with `dpkg-deb`.
//!
//! Installing enables the unit and leaves it stopped until `/etc/nvidia-sidecar/api-key` exists;
//! removing stops it; purging removes the limiter state. The package holds no key.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const NAME: &str = "nvidia-sidecar";

/// Builds the package from `binary` (default: the release build) into `out` (default:
/// `target/debian`), compressed with `compression` (a `dpkg-deb -Z` type, default `xz`); the
/// path of the `.deb`.
pub fn build(
    binary: Option<&str>,
    out: Option<&str>,
    compression: Option<&str>,
) -> Result<PathBuf, String> {
    let root = workspace_root();
    let binary = binary
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release").join(NAME));
    let out = out
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/debian"));
    let version = package_version(&root.join("Cargo.toml"))?;
    let arch = command_output("dpkg", &["--print-architecture"])?;

    let stage = out.join(format!("{NAME}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).map_err(|e| format!("{}: {e}", stage.display()))?;
    }
    let put = |from: &Path, to: &str, mode: u32| -> Result<(), String> {
        copy(from, &stage.join(to), mode).map_err(|e| format!("{} → {to}: {e}", from.display()))
    };
    put(&binary, "usr/bin/nvidia-sidecar", 0o755)?;
    put(
        &root.join("systemd/nvidia-sidecar.service"),
        "usr/lib/systemd/system/nvidia-sidecar.service",
        0o644,
    )?;
    put(
        &root.join("systemd/sidecar.yaml"),
        "etc/nvidia-sidecar/sidecar.yaml",
        0o644,
    )?;
    put(
        &root.join("packaging/deb/copyright"),
        "usr/share/doc/nvidia-sidecar/copyright",
        0o644,
    )?;
    put(
        &root.join("static/vendor/uplot/LICENSE"),
        "usr/share/doc/nvidia-sidecar/uPlot-LICENSE",
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        put(
            &root.join("packaging/deb").join(script),
            &format!("DEBIAN/{script}"),
            0o755,
        )?;
    }
    write(
        &stage.join("DEBIAN/conffiles"),
        "/etc/nvidia-sidecar/sidecar.yaml\n",
    )?;
    let size_kib = tree_size(&stage).map_err(|e| e.to_string())? / 1024;
    write(
        &stage.join("DEBIAN/control"),
        &format!(
            "Package: {NAME}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: nvidia-sidecar developers <nvidia-sidecar@localhost>\n\
             Installed-Size: {size_kib}\n\
             Depends: libc6 (>= 2.34), systemd\n\
             Section: net\n\
             Priority: optional\n\
             Description: shared-quota egress proxy for quota-limited LLM APIs\n \
             Queues requests from many clients against one adaptive token bucket that\n \
             retreats on 429 and recovers when it stops; streams responses through;\n \
             Prometheus metrics, health, dashboard and a config admin API.\n"
        ),
    )?;
    let deb = out.join(format!("{NAME}_{version}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .arg(format!("-Z{}", compression.unwrap_or("xz")))
        .arg("--build")
        .arg(&stage)
        .arg(&deb)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("dpkg-deb: {e}"))?;
    if !status.success() {
        return Err(format!("dpkg-deb failed: {status}"));
    }
    Ok(deb)
}

fn workspace_root() -> PathBuf {
    // xtask/ is one level below the workspace.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The `version` of the `[package]` section.
fn package_version(manifest: &Path) -> Result<String, String> {
    let text = fs::read_to_string(manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if let Some(value) = line.strip_prefix("version") {
            if in_package {
                let value = value.trim_start().trim_start_matches('=').trim();
                return Ok(value.trim_matches('"').to_string());
            }
        }
    }
    Err(format!("no [package] version in {}", manifest.display()))
}

fn command_output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{program} failed: {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn copy(from: &Path, to: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(to.parent().expect("a path inside the stage"))?;
    fs::copy(from, to)?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fs::create_dir_all(path.parent().expect("a path inside the stage"))
        .and_then(|()| fs::write(path, text))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            tree_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
