//! The durable part of a rollout: its spec (what, where, how fast, when to abort, how often to
//! retry) and its fleet as matched at the start, in a small local file written atomically; and
//! the rollout's id, derived from the normalised spec so that re-running the same command finds
//! the same rollout. Outcomes are not kept here: the hub's jobs and their `devices.jobs` rows
//! are the record (see `run.rs`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::plan::{AbortRule, Canary, RateSpec, RetryCaps};
use crate::error::Error;

/// The state file format; a file of another version is refused, not guessed at.
pub const STATE_VERSION: u32 = 1;

/// Longest rollout id (job ids `ro-<id>-wNN-aN-pNN` stay far below IoT Hub's 128).
pub const MAX_ROLLOUT_ID: usize = 40;

/// What every device of the rollout gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Action {
    /// A direct method (`scheduleDeviceMethod` jobs).
    Method {
        /// Method name.
        name: String,
        /// Payload.
        payload: Value,
        /// `responseTimeoutInSeconds`.
        response_timeout_secs: u64,
        /// `connectTimeoutInSeconds`.
        connect_timeout_secs: u64,
    },
    /// A twin patch (`scheduleUpdateTwin` jobs).
    Twin {
        /// Desired properties patch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        desired: Option<serde_json::Map<String, Value>>,
        /// Tags patch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tags: Option<serde_json::Map<String, Value>>,
    },
}

/// Everything that decides which device runs in which job: two runs with the same spec make the
/// same jobs, so the spec is the rollout's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// What to do.
    pub action: Action,
    /// The WHERE clause that chose the fleet.
    pub condition: String,
    /// The canary, if any.
    pub canary: Option<Canary>,
    /// The rate.
    pub rate: RateSpec,
    /// Abort rules.
    pub abort: Vec<AbortRule>,
    /// Devices executed before the abort rules apply.
    pub abort_min_executed: u64,
    /// Retries per failure type.
    pub retry: RetryCaps,
    /// Pause before a retry job, milliseconds.
    pub retry_after_ms: u64,
    /// Each job's `maxExecutionTimeInSeconds`.
    pub job_max_execution_secs: u64,
}

/// The state file: the rollout's id, spec and fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The rollout id.
    pub id: String,
    /// The spec.
    pub spec: RolloutSpec,
    /// The fleet, sorted by device id, as matched when the rollout was created.
    pub fleet: Vec<String>,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// JSON with object keys sorted at every level, so that the id does not depend on the order
/// keys were written in (serde_json here preserves insertion order).
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&map[k])))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// 64-bit FNV-1a: stable across Rust versions and platforms (std's hasher is not), and enough
/// to tell one operator's rollouts apart; not a security measure.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl RolloutSpec {
    /// The rollout id this spec derives: 12 hex digits of a hash of its normalised JSON.
    pub fn derived_id(&self) -> String {
        // The spec's types always serialize; the Debug text is only a fallback that still
        // tells specs apart.
        let text = serde_json::to_value(self)
            .map(|value| canonical(&value).to_string())
            .unwrap_or_else(|_| format!("{self:?}"));
        format!("{:012x}", fnv1a64(text.as_bytes()) & 0xffff_ffff_ffff)
    }
}

/// Checks an id given with `--id` or to `resume`/`status`.
pub fn check_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ROLLOUT_ID
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "rollout id `{id}`: use 1 to {MAX_ROLLOUT_ID} letters, digits, `-` or `_` (it becomes part of IoT Hub job ids)"
        )))
    }
}

/// Where rollouts' state files are: `--state-dir`, else `DATA_DIR/schedule-job/rollouts`.
pub fn state_dir(flag: Option<&Path>) -> Result<PathBuf, Error> {
    match flag {
        Some(dir) => Ok(dir.to_owned()),
        None => dirs_data_dir()
            .map(|d| d.join("schedule-job").join("rollouts"))
            .ok_or_else(|| {
                Error::Usage(
                    "no data directory for rollout state on this system; pass --state-dir DIR"
                        .into(),
                )
            }),
    }
}

/// The platform's data directory (hub-core's helper names the emulator's folder in it).
fn dirs_data_dir() -> Option<PathBuf> {
    hub_core::hub_env::default_data_dir().and_then(|d| d.parent().map(Path::to_owned))
}

/// The state file of rollout `id` in `dir`.
pub fn state_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

fn state_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::RolloutState {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads rollout `id`'s state, `None` when there is no file.
pub fn load(dir: &Path, id: &str) -> Result<Option<RolloutState>, Error> {
    let path = state_path(dir, id);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_error(&path, e.to_string())),
    };
    let state: RolloutState = serde_json::from_str(&text)
        .map_err(|e| state_error(&path, format!("not a rollout state file ({e})")))?;
    if state.version != STATE_VERSION {
        return Err(state_error(
            &path,
            format!(
                "state version {} is not {STATE_VERSION}; use the schedule-job that wrote it",
                state.version
            ),
        ));
    }
    if state.id != id {
        return Err(state_error(&path, format!("it holds rollout {}", state.id)));
    }
    Ok(Some(state))
}

/// Writes the state atomically: a temporary file in the same directory, synced, then renamed
/// over the old one, so a crash leaves either the old file or the new one, never half of one.
pub fn save(dir: &Path, state: &RolloutState) -> Result<PathBuf, Error> {
    let path = state_path(dir, &state.id);
    std::fs::create_dir_all(dir).map_err(|e| state_error(dir, e.to_string()))?;
    let text = serde_json::to_vec_pretty(state)
        .map_err(|e| state_error(&path, format!("cannot encode ({e})")))?;
    let tmp = dir.join(format!(".{}.json.tmp", state.id));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    };
    write().map_err(|e| state_error(&path, e.to_string()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::plan::IncreaseCriteria;
    use serde_json::json;

    fn spec(payload: Value) -> RolloutSpec {
        RolloutSpec {
            action: Action::Method {
                name: "lockDoor".into(),
                payload,
                response_timeout_secs: 30,
                connect_timeout_secs: 0,
            },
            condition: "*".into(),
            canary: Some(Canary::Count(2)),
            rate: RateSpec::Exponential {
                base_per_minute: 10,
                factor: 2.0,
                after: IncreaseCriteria::Notified(5),
            },
            abort: vec![],
            abort_min_executed: 1,
            retry: RetryCaps::default(),
            retry_after_ms: 0,
            job_max_execution_secs: 3600,
        }
    }

    #[test]
    fn the_id_ignores_key_order_and_follows_the_spec() {
        let a = spec(serde_json::from_str(r#"{"a":1,"b":{"y":2,"x":3}}"#).unwrap_or_default());
        let b = spec(serde_json::from_str(r#"{"b":{"x":3,"y":2},"a":1}"#).unwrap_or_default());
        assert_eq!(a.derived_id(), b.derived_id());
        assert_eq!(a.derived_id().len(), 12);
        let c = spec(json!({"a": 2}));
        assert_ne!(a.derived_id(), c.derived_id());
        assert!(check_id(&a.derived_id()).is_ok());
        assert!(check_id("bad id").is_err());
        assert!(check_id(&"x".repeat(41)).is_err());
    }

    #[test]
    fn state_round_trips_atomically() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = spec(json!(null));
        let state = RolloutState {
            version: STATE_VERSION,
            id: s.derived_id(),
            spec: s,
            fleet: vec!["a".into(), "b".into()],
            created: "2030-01-01T00:00:00Z".into(),
        };
        assert_eq!(load(dir.path(), &state.id)?, None);
        save(dir.path(), &state)?;
        save(dir.path(), &state)?;
        assert_eq!(load(dir.path(), &state.id)?, Some(state.clone()));
        let names: Vec<_> = std::fs::read_dir(dir.path())?.collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
        std::fs::write(state_path(dir.path(), "other"), "{")?;
        assert!(
            load(dir.path(), "other")
                .is_err_and(|e| e.to_string().contains("not a rollout state file"))
        );
        Ok(())
    }
}
