//! The seed file (`hub-emulator --seed FILE`, format in docs/seed.md): a JSON document that
//! declares devices (id, status, keys, tags, desired properties), read and checked whole before
//! the hub opens anything, then applied at every start by [`Hub::apply_seed`]: missing devices
//! are created, present ones brought to the file's state, and up-to-date ones left alone, so a
//! restart with the same file changes nothing. Top-level keys other than `devices` and
//! `configurations` are refused; every error names the file, the JSON path and, where the
//! parser knows it, the line.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hub_core::configuration::Configuration;
use serde::Deserialize;
use serde_json::{Map, Value};

use hub_core::device::DeviceStatus;

use crate::hub::{Hub, SeedDevice, SeedOutcome};

/// Largest seed file read: far beyond 100,000 devices with tags, and a bound on what a typo in
/// the path (a disk image, a log) can make the hub load.
pub const MAX_SEED_BYTES: u64 = 64 * 1024 * 1024;

/// Top-level keys a seed file may have.
const TOP_LEVEL_KEYS: &[&str] = &["devices", "configurations"];
/// The keys a seeded configuration may have: what `PUT /configurations/{id}` takes, plus the
/// hub's own fields of a document read back (`GET /configurations/{id}`), which are ignored,
/// so a configuration copied from a hub can be pasted as it is. Anything else is a typo.
const CONFIGURATION_KEYS: &[&str] = &[
    "id",
    "schemaVersion",
    "labels",
    "content",
    "contentType",
    "targetCondition",
    "priority",
    "metrics",
    "createdTimeUtc",
    "lastUpdatedTimeUtc",
    "systemMetrics",
    "etag",
];

/// A seed file, read and checked. `Debug` shows the file and its device count only: the file
/// may hold keys.
#[derive(Clone)]
pub struct Seed {
    path: PathBuf,
    devices: Vec<SeedDevice>,
    modules: Vec<SeedModule>,
    configurations: Vec<Configuration>,
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("path", &self.path)
            .field("devices", &self.devices.len())
            .field("configurations", &self.configurations.len())
            .finish()
    }
}

/// Why a seed file was refused. Messages name the file and never quote a key.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The file could not be read.
    #[error("cannot read the seed file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_SEED_BYTES`].
    #[error(
        "the seed file {} is {size} bytes, more than the {MAX_SEED_BYTES} a seed file may have; is it the right file?",
        path.display()
    )]
    TooLarge { path: PathBuf, size: u64 },
    /// The file is not what docs/seed.md describes.
    #[error(
        "the seed file {} is invalid{}{}: {problem} (see docs/seed.md for the format)",
        path.display(),
        if at.is_empty() { String::new() } else { format!(" at {at}") },
        line.map(|(l, c)| format!(" (line {l}, column {c})")).unwrap_or_default()
    )]
    Invalid {
        path: PathBuf,
        /// The JSON path, e.g. `devices[2].status`; empty for the document as a whole.
        at: String,
        /// Line and column, when the parser knows them.
        line: Option<(usize, usize)>,
        problem: String,
    },
    /// The hub refused one of the file's devices (nothing of the file was applied).
    #[error(
        "the seed file {} could not be applied: devices[{index}] (device {device_id}): {problem}; fix that entry and start again",
        path.display()
    )]
    Refused {
        path: PathBuf,
        index: usize,
        device_id: String,
        problem: String,
    },
    /// The hub refused one of the file's configurations (the devices, modules and the
    /// configurations before it stay applied).
    #[error(
        "the seed file {} could not be applied: configurations[{index}] (configuration {id}): {problem}; fix that entry and start again",
        path.display()
    )]
    RefusedConfiguration {
        path: PathBuf,
        index: usize,
        id: String,
        problem: String,
    },
}

/// One device as the file writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    id: String,
    #[serde(default)]
    status: Option<DeviceStatus>,
    #[serde(default)]
    auth: Option<AuthEntry>,
    #[serde(default)]
    tags: Option<Map<String, Value>>,
    #[serde(default)]
    desired: Option<Map<String, Value>>,
    #[serde(default)]
    modules: Vec<ModuleEntry>,
}

/// One module identity of a device, as the file writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleEntry {
    id: String,
    #[serde(default)]
    auth: Option<AuthEntry>,
    #[serde(default)]
    tags: Option<Map<String, Value>>,
    #[serde(default)]
    desired: Option<Map<String, Value>>,
}

/// A module a seed declares; `Debug` leaves the keys out.
#[derive(Clone)]
struct SeedModule {
    device_index: usize,
    device_id: String,
    id: String,
    primary_key: Option<String>,
    secondary_key: Option<String>,
    tags: Option<Map<String, Value>>,
    desired: Option<Map<String, Value>>,
}

/// `auth` of a device: its symmetric keys, each generated by the hub when absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AuthEntry {
    #[serde(default)]
    primary_key: Option<String>,
    #[serde(default)]
    secondary_key: Option<String>,
}

/// The document.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedDocument {
    #[serde(default)]
    devices: Vec<DeviceEntry>,
    #[serde(default)]
    configurations: Vec<Configuration>,
}

impl Seed {
    /// Reads and checks the seed file at `path`.
    pub fn load(path: &Path) -> Result<Seed, SeedError> {
        let read_error = |source| SeedError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > MAX_SEED_BYTES {
            return Err(SeedError::TooLarge {
                path: path.to_owned(),
                size,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Seed::parse(path, &text)
    }

    /// Checks seed file text; `path` is only named in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Seed, SeedError> {
        let invalid =
            |at: &str, line: Option<(usize, usize)>, problem: String| SeedError::Invalid {
                path: path.to_owned(),
                at: at.to_owned(),
                line,
                problem,
            };
        // Syntax first, as a plain value: its errors carry the line, and the top-level keys
        // get their own words before the typed read.
        let document: Value = serde_json::from_str(text).map_err(|e| {
            invalid(
                "",
                Some((e.line(), e.column())),
                format!("not valid JSON: {}", without_position(&e)),
            )
        })?;
        let Value::Object(top) = &document else {
            return Err(invalid(
                "",
                None,
                format!(
                    "a seed file is a JSON object such as {{\"devices\": [...]}}, this one is {}",
                    crate::twins::kind(&document)
                ),
            ));
        };
        for key in top.keys() {
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                return Err(invalid(
                    key,
                    None,
                    format!(
                        "unknown top-level key `{key}`; a seed file's keys are {}",
                        TOP_LEVEL_KEYS.join(", ")
                    ),
                ));
            }
        }
        // The wire type takes unknown fields, as IoT Hub's REST API does; a file's typo is
        // refused here instead.
        if let Some(Value::Array(configurations)) = top.get("configurations") {
            for (index, entry) in configurations.iter().enumerate() {
                let Value::Object(entry) = entry else {
                    continue;
                };
                if let Some(key) = entry
                    .keys()
                    .find(|k| !CONFIGURATION_KEYS.contains(&k.as_str()))
                {
                    return Err(invalid(
                        &format!("configurations[{index}].{key}"),
                        None,
                        format!(
                            "unknown field `{key}`; a configuration's fields are {}",
                            CONFIGURATION_KEYS[..8].join(", ")
                        ),
                    ));
                }
            }
        }
        let mut reader = serde_json::Deserializer::from_str(text);
        let parsed: SeedDocument = serde_path_to_error::deserialize(&mut reader).map_err(|e| {
            let at = e.path().to_string();
            let inner = e.into_inner();
            let line = Some((inner.line(), inner.column()));
            // serde_json appends " at line L column C"; the line is given once, apart.
            let problem = inner.to_string();
            let problem = problem
                .rsplit_once(" at line ")
                .map_or(problem.as_str(), |(head, _)| head)
                .to_owned();
            invalid(&at, line, problem)
        })?;
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(parsed.devices.len());
        let mut devices = Vec::with_capacity(parsed.devices.len());
        let mut modules = Vec::new();
        for (index, entry) in parsed.devices.into_iter().enumerate() {
            let at = |field: &str| format!("devices[{index}].{field}");
            hub_core::connection_string::validate_device_id(&entry.id)
                .map_err(|e| invalid(&at("id"), None, e.to_string()))?;
            if let Some(first) = seen.insert(entry.id.clone(), index) {
                return Err(invalid(
                    &at("id"),
                    None,
                    format!(
                        "device {} is already declared at devices[{first}]; declare each device once",
                        entry.id
                    ),
                ));
            }
            let (primary_key, secondary_key) = check_keys(entry.auth, &at("auth"))
                .map_err(|(at, problem)| invalid(&at, None, problem))?;
            let mut module_ids = HashSet::with_capacity(entry.modules.len());
            for (module_index, module) in entry.modules.into_iter().enumerate() {
                let at = |field: &str| format!("devices[{index}].modules[{module_index}].{field}");
                crate::hub::validate_module_id(&module.id)
                    .map_err(|e| invalid(&at("id"), None, e.to_string()))?;
                if !module_ids.insert(module.id.clone()) {
                    return Err(invalid(
                        &at("id"),
                        None,
                        format!(
                            "module {} is declared twice for device {}",
                            module.id, entry.id
                        ),
                    ));
                }
                let (primary_key, secondary_key) = check_keys(module.auth, &at("auth"))
                    .map_err(|(at, problem)| invalid(&at, None, problem))?;
                modules.push(SeedModule {
                    device_index: index,
                    device_id: entry.id.clone(),
                    id: module.id,
                    primary_key,
                    secondary_key,
                    tags: module.tags,
                    desired: module.desired,
                });
            }
            devices.push(SeedDevice {
                id: entry.id,
                status: entry.status,
                primary_key,
                secondary_key,
                tags: entry.tags,
                desired: entry.desired,
            });
        }
        let mut configuration_ids: HashMap<&str, usize> = HashMap::new();
        for (index, configuration) in parsed.configurations.iter().enumerate() {
            let at = |field: &str| format!("configurations[{index}].{field}");
            hub_core::configuration::validate_configuration_id(&configuration.id)
                .map_err(|e| invalid(&at("id"), None, e.to_string()))?;
            if let Some(first) = configuration_ids.insert(&configuration.id, index) {
                return Err(invalid(
                    &at("id"),
                    None,
                    format!(
                        "configuration {} is already declared at configurations[{first}]; declare each configuration once",
                        configuration.id
                    ),
                ));
            }
            hub_core::configuration::DesiredContent::parse(configuration.content.as_ref())
                .map_err(|e| invalid(&at("content"), None, e.to_string()))?;
        }
        Ok(Seed {
            path: path.to_owned(),
            devices,
            modules,
            configurations: parsed.configurations,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many devices it declares.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// How many configurations it declares.
    pub fn configuration_count(&self) -> usize {
        self.configurations.len()
    }

    /// Applies the file to `hub`: its devices in one transaction (all of them, or, when the
    /// hub refuses one, e.g. a desired property name IoT Hub does not allow, none), then their
    /// modules, then its configurations, each of those one by one. `max_configurations` is
    /// the tier's count of configurations.
    pub async fn apply(
        &self,
        hub: &Hub,
        max_configurations: usize,
    ) -> Result<SeedOutcome, SeedError> {
        let outcome =
            hub.apply_seed(&self.devices)
                .await
                .map_err(|refused| SeedError::Refused {
                    path: self.path.clone(),
                    index: refused.index,
                    device_id: self
                        .devices
                        .get(refused.index)
                        .map(|d| d.id.clone())
                        .unwrap_or_default(),
                    problem: refused.error.to_string(),
                })?;
        for module in &self.modules {
            apply_module(hub, module)
                .await
                .map_err(|error| SeedError::Refused {
                    path: self.path.clone(),
                    index: module.device_index,
                    device_id: module.device_id.clone(),
                    problem: format!("module {}: {error}", module.id),
                })?;
        }
        for (index, configuration) in self.configurations.iter().enumerate() {
            apply_configuration(hub, configuration, max_configurations)
                .await
                .map_err(|error| SeedError::RefusedConfiguration {
                    path: self.path.clone(),
                    index,
                    id: configuration.id.clone(),
                    problem: error.to_string(),
                })?;
        }
        if !self.configurations.is_empty() {
            hub.settle_configurations().await;
        }
        Ok(outcome)
    }
}

/// Brings one module to the file's state, after its device: created when missing; its keys
/// replaced only when the file gives other ones; its twin patched only when the file's tags or
/// desired properties would change it, so a restart with the same file changes no module's
/// etag or version. Modules are applied one by one after the devices' transaction.
async fn apply_module(hub: &Hub, module: &SeedModule) -> Result<(), crate::hub::OperationError> {
    let (device_id, module_id) = (module.device_id.as_str(), module.id.as_str());
    let mut body = serde_json::json!({"moduleId": module_id, "deviceId": device_id});
    if module.primary_key.is_some() || module.secondary_key.is_some() {
        body["authentication"] = serde_json::json!({
            "type": "sas",
            "symmetricKey": {"primaryKey": module.primary_key, "secondaryKey": module.secondary_key},
        });
    }
    if !hub.module_exists(device_id, module_id) {
        hub.create_or_update_module(device_id, module_id, &body, None)
            .await?;
    } else {
        let current = hub.get_module(device_id, module_id)?;
        let keys = current.pointer("/authentication/symmetricKey");
        let differs = |name: &str, wanted: &Option<String>| {
            wanted.as_deref().is_some_and(|key| {
                keys.and_then(|k| k.get(name)).and_then(Value::as_str) != Some(key)
            })
        };
        if differs("primaryKey", &module.primary_key)
            || differs("secondaryKey", &module.secondary_key)
        {
            hub.create_or_update_module(device_id, module_id, &body, Some("*"))
                .await?;
        }
    }
    let twin = hub.get_module_twin(device_id, module_id)?;
    let section = |pointer: &str| {
        twin.pointer(pointer)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let mut patch = Map::new();
    if let Some(tags) = &module.tags
        && crate::twins::patch_changes(&section("/tags"), tags)
    {
        patch.insert("tags".into(), Value::Object(tags.clone()));
    }
    if let Some(desired) = &module.desired
        && crate::twins::patch_changes(&section("/properties/desired"), desired)
    {
        patch.insert("properties".into(), serde_json::json!({"desired": desired}));
    }
    if !patch.is_empty() {
        hub.update_module_twin(
            device_id,
            module_id,
            &Value::Object(patch),
            Some("*"),
            false,
        )
        .await?;
    }
    Ok(())
}

/// Brings one configuration to the file's state: created when missing; updated (with
/// `If-Match: *`) when its target condition, priority, labels or metric queries differ; left
/// alone, etag and all, when they match. IoT Hub never lets a configuration's content change,
/// so a file whose content differs from the hub's replaces the configuration: deleted, then
/// created again (as the Azure CLI tells users to do), which leaves the old content's
/// settings in the twins until the new one applies.
async fn apply_configuration(
    hub: &Hub,
    wanted: &Configuration,
    max: usize,
) -> Result<(), crate::hub::OperationError> {
    use hub_core::configuration::DesiredContent;
    let id = wanted.id.as_str();
    let Ok(current) = hub.get_configuration(id) else {
        hub.put_configuration(id, wanted.clone(), None, max).await?;
        tracing::info!(configuration = %id, "seed: configuration created");
        return Ok(());
    };
    let content = |c: &Configuration| DesiredContent::parse(c.content.as_ref()).ok();
    if content(&current) != content(wanted) {
        hub.delete_configuration(id, None).await?;
        hub.put_configuration(id, wanted.clone(), None, max).await?;
        tracing::info!(configuration = %id, "seed: configuration replaced (its content changed)");
        return Ok(());
    }
    let queries = |c: &Configuration| c.metrics.as_ref().and_then(|m| m.queries.clone());
    let differs = current.target_condition.as_deref().unwrap_or_default()
        != wanted.target_condition.as_deref().unwrap_or_default()
        || current.priority.unwrap_or(0) != wanted.priority.unwrap_or(0)
        || current.labels.clone().unwrap_or_default() != wanted.labels.clone().unwrap_or_default()
        || queries(&current).unwrap_or_default() != queries(wanted).unwrap_or_default();
    if differs {
        hub.put_configuration(id, wanted.clone(), Some("*"), max)
            .await?;
        tracing::info!(configuration = %id, "seed: configuration updated");
    }
    Ok(())
}

/// serde_json's message without the " at line L column C" it appends: the error gives the
/// position once, apart.
fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rsplit_once(" at line ") {
        Some((head, _)) => head.to_owned(),
        None => text,
    }
}

/// An `auth` entry's two keys, each checked by [`check_key`] (`at` is the entry's path).
type Keys = (Option<String>, Option<String>);
fn check_keys(auth: Option<AuthEntry>, at: &str) -> Result<Keys, (String, String)> {
    let Some(auth) = auth else {
        return Ok((None, None));
    };
    Ok((
        check_key(auth.primary_key, &format!("{at}.primaryKey"))?,
        check_key(auth.secondary_key, &format!("{at}.secondaryKey"))?,
    ))
}

/// A key as IoT Hub takes it: base64 of 16 to 64 bytes (the hub's own rule for
/// `PUT /devices/{id}`), or absent. Never quotes the key.
fn check_key(key: Option<String>, at: &str) -> Result<Option<String>, (String, String)> {
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Ok(None);
    };
    match BASE64.decode(&key) {
        Ok(bytes) if (16..=64).contains(&bytes.len()) => Ok(Some(key)),
        Ok(bytes) => Err((
            at.to_owned(),
            format!(
                "a key must be base64 of 16 to 64 bytes, this one decodes to {}; leave it out to have one generated",
                bytes.len()
            ),
        )),
        Err(_) => Err((
            at.to_owned(),
            "a key must be base64 (e.g. `openssl rand -base64 32`); leave it out to have one generated".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        match Seed::parse(Path::new("seed.json"), text) {
            Ok(seed) => panic!("accepted: {seed:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_file_reads_whole() {
        let seed = Seed::parse(
            Path::new("seed.json"),
            r#"{"devices": [
                {"id": "d1"},
                {"id": "d2", "status": "disabled", "auth": {"primaryKey": "cHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ=="},
                 "tags": {"floor": 2}, "desired": {"fw": "1.0"}}
            ]}"#,
        )
        .expect("valid");
        assert_eq!(seed.device_count(), 2);
        assert_eq!(seed.devices[1].status, Some(DeviceStatus::Disabled));
        assert!(seed.devices[1].secondary_key.is_none());
        assert!(!format!("{seed:?}").contains("cHJp"), "Debug shows no key");
        assert_eq!(
            Seed::parse(Path::new("s"), "{}")
                .map(|s| s.device_count())
                .ok(),
            Some(0)
        );
    }

    #[test]
    fn errors_name_the_file_the_path_and_the_line() {
        let syntax = error("{\"devices\": [\n  {\"id\": \"d1\",}\n]}");
        assert!(
            syntax.contains("seed.json") && syntax.contains("line 2"),
            "{syntax}"
        );
        let top = error(r#"{"devices": [], "device": []}"#);
        assert!(
            top.contains("unknown top-level key `device`") && top.contains("devices"),
            "{top}"
        );
        let field = error(
            "{\"devices\": [\n {\"id\": \"d1\"},\n {\"id\": \"d2\", \"statu\": \"enabled\"}]}",
        );
        assert!(
            field.contains("devices[1].statu") || field.contains("devices[1]"),
            "{field}"
        );
        assert!(
            field.contains("line 3") && field.contains("unknown field `statu`"),
            "{field}"
        );
        let status = error(r#"{"devices": [{"id": "d1", "status": "on"}]}"#);
        assert!(
            status.contains("devices[0].status") && status.contains("enabled"),
            "{status}"
        );
        let id = error(r#"{"devices": [{"id": "d1"}, {"id": "bad id"}]}"#);
        assert!(id.contains("devices[1].id"), "{id}");
        let twice = error(r#"{"devices": [{"id": "d1"}, {"id": "d1"}]}"#);
        assert!(
            twice.contains("devices[1].id") && twice.contains("devices[0]"),
            "{twice}"
        );
        let key = error(r#"{"devices": [{"id": "d1", "auth": {"primaryKey": "c2hvcnQ="}}]}"#);
        assert!(
            key.contains("devices[0].auth.primaryKey") && !key.contains("c2hvcnQ"),
            "{key}"
        );
        let array = error("[]");
        assert!(array.contains("JSON object"), "{array}");
    }
}
