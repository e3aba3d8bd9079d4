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
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Overrides;
use crate::limiter::{Ceiling, CeilingSource, LimiterState, RetreatState, SavedModelLane};
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

/// A route's limiter: its first key at the top level (as before key pools), and with a pool,
/// every key by name.
#[derive(Debug, Serialize, Deserialize)]
struct SavedLimiter {
    tokens: f64,
    effective_rpm: f64,
    state: String,
    pause_remaining_seconds: f64,
    /// The ceiling recovery climbs to, when one was known, and where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ceiling_rpm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ceiling_source: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    keys: BTreeMap<String, SavedLimiter>,
    /// The learned lanes that hold a model back, by key name, then model id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    models: BTreeMap<String, BTreeMap<String, SavedLimiter>>,
}

impl SavedLimiter {
    fn new(saved: &LimiterState) -> SavedLimiter {
        SavedLimiter {
            tokens: saved.tokens,
            effective_rpm: saved.effective_rpm,
            state: saved.state.as_str().to_string(),
            pause_remaining_seconds: saved.pause_remaining.map_or(0.0, |d| d.as_secs_f64()),
            ceiling_rpm: saved.ceiling.map(|c| c.rpm),
            ceiling_source: saved.ceiling.map(|c| c.source.as_str().to_string()),
            keys: BTreeMap::new(),
            models: BTreeMap::new(),
        }
    }

    /// The saved state, or why it cannot be taken.
    fn state(&self) -> Result<LimiterState, String> {
        let state = match self.state.as_str() {
            "normal" => RetreatState::Normal,
            "retreat" => RetreatState::Retreat,
            "recover" => RetreatState::Recover,
            other => return Err(format!("unknown state {other:?}")),
        };
        if !(self.tokens.is_finite()
            && self.effective_rpm.is_finite()
            && self.pause_remaining_seconds.is_finite())
        {
            return Err("not a number".to_string());
        }
        let ceiling = match (self.ceiling_rpm, self.ceiling_source.as_deref()) {
            (Some(rpm), source) if rpm.is_finite() && rpm > 0.0 => Some(Ceiling {
                rpm,
                source: match source {
                    Some("header") => CeilingSource::Header,
                    Some("config") => CeilingSource::Config,
                    _ => CeilingSource::Window,
                },
            }),
            _ => None,
        };
        Ok(LimiterState {
            tokens: self.tokens,
            effective_rpm: self.effective_rpm,
            state,
            pause_remaining: (self.pause_remaining_seconds > 0.0)
                .then(|| Duration::from_secs_f64(self.pause_remaining_seconds.min(86_400.0))),
            ceiling,
        })
    }
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
            let gate = route.gate.as_ref()?;
            let mut saved = SavedLimiter::new(&gate.export());
            if gate.key_count() > 1 {
                saved.keys = gate
                    .export_keys()
                    .iter()
                    .map(|(name, state)| (name.to_string(), SavedLimiter::new(state)))
                    .collect();
            }
            for lane in gate.export_models() {
                saved
                    .models
                    .entry(lane.key.to_string())
                    .or_default()
                    .insert(lane.model.to_string(), SavedLimiter::new(&lane.state));
            }
            Some((route.name().to_string(), saved))
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
        let state = match s.state() {
            Ok(state) => state,
            Err(why) => {
                log::warn!("ignoring saved state of route {}: {why}", route.name());
                continue;
            }
        };
        gate.restore(&state, age);
        for (name, key) in &s.keys {
            match key.state() {
                Ok(state) => {
                    if !gate.restore_key(name, &state, age) {
                        log::warn!(
                            "ignoring saved state of key {name} of route {}: no key of that name now",
                            route.name()
                        );
                    }
                }
                Err(why) => log::warn!(
                    "ignoring saved state of key {name} of route {}: {why}",
                    route.name()
                ),
            }
        }
        for (key, models) in &s.models {
            for (model, saved) in models {
                let restored = saved.state().map(|state| SavedModelLane {
                    key: Arc::from(key.as_str()),
                    model: Arc::from(model.as_str()),
                    state,
                });
                match restored {
                    Ok(lane) if gate.restore_model(&lane, age) => {}
                    Ok(_) => log::warn!(
                        "ignoring saved state of model {model} on key {key} of route {}: no place for it now",
                        route.name()
                    ),
                    Err(why) => log::warn!(
                        "ignoring saved state of model {model} on key {key} of route {}: {why}",
                        route.name()
                    ),
                }
            }
        }
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

    /// A route table on a pool of two keys read from files in `dir`.
    fn pool_table(dir: &Path) -> RouteTable {
        for (name, key) in [("a", "nvapi-state-a"), ("b", "nvapi-state-b")] {
            fs::write(dir.join(name), key).unwrap();
        }
        let text = format!(
            "rate_rpm: 60\nupstream:\n  keys:\n    - {{name: a, key_file: {a}}}\n    - {{name: b, key_file: {b}}}\n",
            a = dir.join("a").display(),
            b = dir.join("b").display()
        );
        let settings = crate::config::load_str(&text).unwrap();
        RouteTable::build(std::sync::Arc::new(settings), None)
    }

    #[tokio::test]
    async fn every_key_of_a_pool_keeps_its_retreat_and_pause_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let before = pool_table(dir.path());
        let gate = before.default.gate.clone().unwrap();
        let on_b = crate::limiter::Grant {
            lane: 1,
            ..gate.current_grant()
        };
        gate.observe(
            &crate::limiter::UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(30)),
            },
            on_b,
        );
        save_limiters(dir.path(), &before).unwrap();

        let after = pool_table(dir.path());
        restore_limiters(dir.path(), &after);
        let keys = after.default.gate.as_ref().unwrap().snapshot().keys;
        assert_eq!(keys[0].state, RetreatState::Normal, "{keys:?}");
        assert_eq!(keys[1].state, RetreatState::Retreat, "{keys:?}");
        let paused = keys[1].paused_for.expect("key b is still paused");
        assert!(paused > Duration::from_secs(25), "{paused:?}");
        assert_eq!(keys[0].paused_for, None);
    }

    /// A model locked by the upstream stays locked across a restart, on its key, and its key
    /// is not: what was learned per model is saved beside the keys.
    #[tokio::test]
    async fn a_learned_model_lane_survives_a_restart() {
        use crate::limiter::{Ask, Priority};
        let dir = tempfile::tempdir().unwrap();
        let before = pool_table(dir.path());
        let gate = before.default.gate.clone().unwrap();
        let far = crate::admission::now() + Duration::from_secs(600);
        let ask = |model: &str| Ask {
            model_id: Some(Arc::from(model)),
            ..Ask::new(Arc::from("c"), Priority::Normal, far)
        };
        let mut ticket = gate.admit_with(ask("locked"));
        let crate::admission::Verdict::Granted(grant) = ticket.verdict().await else {
            panic!("granted at once");
        };
        // Requests of another model wait (the first goes on the second key at once), so the
        // 429 is charged to the model while the key is judged.
        let _others: Vec<_> = (0..3).map(|_| gate.admit_with(ask("other"))).collect();
        gate.observe(
            &crate::limiter::UpstreamSignal::RateLimited {
                retry_after: Some(Duration::from_secs(3 * 3600)),
            },
            grant,
        );
        let saved_lanes = gate.export_models();
        assert_eq!(saved_lanes.len(), 1, "{saved_lanes:?}");
        save_limiters(dir.path(), &before).unwrap();

        let after = pool_table(dir.path());
        restore_limiters(dir.path(), &after);
        let s = after.default.gate.as_ref().unwrap().snapshot();
        let key = s
            .keys
            .iter()
            .find(|k| !k.models.is_empty())
            .expect("a key with the lane");
        assert_eq!(
            key.state,
            RetreatState::Normal,
            "the key is not cut: {key:?}"
        );
        let lane = &key.models[0];
        assert_eq!(&*lane.model, "locked");
        let paused = lane.paused_for.expect("still locked after the restart");
        assert!(paused > Duration::from_secs(3 * 3600 - 60), "{paused:?}");
    }

    #[test]
    fn overrides_round_trip_and_an_empty_set_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_overrides(dir.path()).unwrap(), Overrides::default());
        let set = Overrides {
            rate_rpm: Some(crate::config::RateRpm::Fixed(12.5)),
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
