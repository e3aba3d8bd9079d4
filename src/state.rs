//! What survives a restart, kept in `state_dir`: the runtime overrides set through the admin
//! API (`overrides.yaml`) and the limiter state of every bucket (`limiter-state.json`).
//!
//! Files are written atomically (temporary file, fsync, rename, fsync of the directory), so a
//! crash leaves either the old or the new file, never half of one. A limiter state file that
//! cannot be read is logged and ignored: it is never a reason not to start.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Overrides;
use crate::limiter::{LimiterState, RetreatState};
use crate::routes::RouteTable;

const OVERRIDES_FILE: &str = "overrides.yaml";
const LIMITER_FILE: &str = "limiter-state.json";
const LIMITER_FORMAT: u32 = 1;

/// Writes `contents` to `path` so that readers see the old file or the new one, nothing else.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let (temp, mut f) = create_temp(dir, name)?;
    let result = (|| {
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// A new temporary file beside the target: an unpredictable name, created exclusively (so an
/// existing file or a symlink planted under that name is never followed) and readable by the
/// owner only.
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(PathBuf, File)> {
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::OpenOptionsExt;
    let mut attempt = 0;
    loop {
        // `RandomState` is seeded from the operating system's randomness for every instance.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let temp = dir.join(format!(".{name}.{:016x}.tmp", hasher.finish()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
        {
            Ok(f) => return Ok((temp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

pub fn overrides_path(dir: &Path) -> PathBuf {
    dir.join(OVERRIDES_FILE)
}

/// Why the saved overrides could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

/// The saved overrides; none when the file does not exist.
pub fn load_overrides(dir: &Path) -> Result<Overrides, StateError> {
    let path = overrides_path(dir);
    match fs::read_to_string(&path) {
        Ok(text) => serde_yaml::from_str::<Option<Overrides>>(&text)
            .map(Option::unwrap_or_default)
            .map_err(|source| StateError::Parse { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Overrides::default()),
        Err(source) => Err(StateError::Read { path, source }),
    }
}

/// Saves the overrides; an empty set removes the file.
pub fn save_overrides(dir: &Path, overrides: &Overrides) -> std::io::Result<()> {
    let path = overrides_path(dir);
    if overrides.is_empty() {
        return match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let text = format!(
        "# Runtime overrides set through the admin API; they are laid over the config file.\n# Remove them with DELETE /api/admin/config/overrides.\n{}",
        serde_yaml::to_string(overrides).expect("overrides serialise")
    );
    write_atomic(&path, text.as_bytes())
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedLimiters {
    format: u32,
    /// Seconds since the Unix epoch when the state was taken.
    saved_at: f64,
    routes: BTreeMap<String, SavedLimiter>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedLimiter {
    tokens: f64,
    effective_rpm: f64,
    state: String,
    pause_remaining_seconds: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Saves the state of every bucket of `table`.
pub fn save_limiters(dir: &Path, table: &RouteTable) -> std::io::Result<()> {
    let routes = table
        .all()
        .filter_map(|route| {
            let saved = route.gate.as_ref()?.export();
            Some((
                route.name().to_string(),
                SavedLimiter {
                    tokens: saved.tokens,
                    effective_rpm: saved.effective_rpm,
                    state: saved.state.as_str().to_string(),
                    pause_remaining_seconds: saved.pause_remaining.map_or(0.0, |d| d.as_secs_f64()),
                },
            ))
        })
        .collect();
    let saved = SavedLimiters {
        format: LIMITER_FORMAT,
        saved_at: unix_now(),
        routes,
    };
    let json = serde_json::to_vec_pretty(&saved).expect("limiter state serialises");
    write_atomic(&dir.join(LIMITER_FILE), &json)
}

/// Restores every bucket that has a saved state; problems are logged and ignored.
pub fn restore_limiters(dir: &Path, table: &RouteTable) {
    let path = dir.join(LIMITER_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            log::warn!("ignoring limiter state {}: {e}", path.display());
            return;
        }
    };
    let saved: SavedLimiters = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("ignoring limiter state {}: not valid ({e})", path.display());
            return;
        }
    };
    if saved.format != LIMITER_FORMAT {
        log::warn!(
            "ignoring limiter state {}: format {} is not {LIMITER_FORMAT}",
            path.display(),
            saved.format
        );
        return;
    }
    let age = Duration::from_secs_f64((unix_now() - saved.saved_at).clamp(0.0, 1e9));
    for route in table.all() {
        let (Some(gate), Some(s)) = (route.gate.as_ref(), saved.routes.get(route.name())) else {
            continue;
        };
        let state = match s.state.as_str() {
            "normal" => RetreatState::Normal,
            "retreat" => RetreatState::Retreat,
            "recover" => RetreatState::Recover,
            other => {
                log::warn!(
                    "ignoring saved state of route {}: unknown state {other:?}",
                    route.name()
                );
                continue;
            }
        };
        if !(s.tokens.is_finite()
            && s.effective_rpm.is_finite()
            && s.pause_remaining_seconds.is_finite())
        {
            log::warn!(
                "ignoring saved state of route {}: not a number",
                route.name()
            );
            continue;
        }
        let pause = (s.pause_remaining_seconds > 0.0)
            .then(|| Duration::from_secs_f64(s.pause_remaining_seconds.min(3600.0)));
        gate.restore(
            &LimiterState {
                tokens: s.tokens,
                effective_rpm: s.effective_rpm,
                state,
                pause_remaining: pause,
            },
            age,
        );
        log::info!(
            "restored limiter state of route {} ({}, {:.1} rpm, saved {:.0} s ago)",
            route.name(),
            s.state,
            s.effective_rpm,
            age.as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_round_trip_and_an_empty_set_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_overrides(dir.path()).unwrap(), Overrides::default());
        let set = Overrides {
            rate_rpm: Some(12.5),
            fallback_enabled_passthrough: Some(true),
            ..Overrides::default()
        };
        save_overrides(dir.path(), &set).unwrap();
        assert_eq!(load_overrides(dir.path()).unwrap(), set);
        save_overrides(dir.path(), &Overrides::default()).unwrap();
        assert!(!overrides_path(dir.path()).exists());
        fs::write(overrides_path(dir.path()), "rate_rpm: [").unwrap();
        assert!(load_overrides(dir.path()).is_err());
    }

    #[test]
    fn atomic_writes_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn state_files_are_private_and_planted_symlinks_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limiter.json");
        // Whatever name a temporary file might get, a symlink there is never written through:
        // the file is created exclusively under a name nobody can guess.
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        for guess in ["limiter.json.tmp", ".limiter.json.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(guess)).unwrap();
        }
        write_atomic(&path, b"state").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "mode {mode:o}");
        // The temporary name is not predictable from one write to the next.
        let (a, _) = create_temp(dir.path(), "x").unwrap();
        let (b, _) = create_temp(dir.path(), "x").unwrap();
        assert_ne!(a, b);
    }
}
