//! A seed file's devices applied to the registry ([`Hub::apply_seed`]; the file itself is
//! `crate::seed`): a missing device is created as `PUT /devices/{id}` creates it, a present one
//! is updated to the file's status and keys and gets its tags and desired properties merged as a
//! twin PATCH, and one already in that state is not written at all, so its etag and versions
//! stay as they were. Everything is staged with the registry's and twins' own staging and
//! committed in one transaction.

use hub_core::device::DeviceStatus;
use serde_json::{Map, Value, json};

use super::record::DeviceRecord;
use super::registry::{parse_device_update, stage_device};
use super::twins::{Staged, stage_twin_update};
use super::{DeviceChange, Hub, OperationError, lock};
use crate::twins;

/// One device as a seed file declares it; `None` leaves that part as it is (keys: generated on
/// create, kept on update). `Debug` leaves the keys out.
#[derive(Clone)]
pub struct SeedDevice {
    /// The device id.
    pub id: String,
    /// `enabled` or `disabled` (create default: enabled).
    pub status: Option<DeviceStatus>,
    /// The primary symmetric key (base64).
    pub primary_key: Option<String>,
    /// The secondary symmetric key (base64).
    pub secondary_key: Option<String>,
    /// Tags, merged into the twin's.
    pub tags: Option<Map<String, Value>>,
    /// Desired properties, merged into the twin's.
    pub desired: Option<Map<String, Value>>,
}

impl std::fmt::Debug for SeedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedDevice")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("tags", &self.tags)
            .field("desired", &self.desired)
            .finish_non_exhaustive()
    }
}

/// What applying a seed did, device by device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedOutcome {
    /// Devices created.
    pub created: usize,
    /// Devices that existed and were brought to the file's state.
    pub updated: usize,
    /// Devices already in the file's state, not written.
    pub unchanged: usize,
}

/// The device a seed could not apply (by its index in the file), and why.
#[derive(Debug)]
pub struct SeedRefused {
    /// Its index in the file's `devices`.
    pub index: usize,
    /// Why.
    pub error: OperationError,
}

/// The `PUT /devices/{id}` body that sets `seed`'s status and keys on `existing` (or a new
/// device) and keeps the rest of its identity as it is.
fn identity_body(seed: &SeedDevice, existing: Option<&DeviceRecord>) -> Value {
    let mut body = existing.map_or_else(|| json!({"deviceId": seed.id}), DeviceRecord::device_json);
    if let Some(status) = seed.status {
        body["status"] = Value::from(status.as_str());
    }
    if seed.primary_key.is_some() || seed.secondary_key.is_some() {
        let current = |name: &str| body["authentication"]["symmetricKey"][name].clone();
        let key = |given: &Option<String>, name: &str| {
            given.clone().map_or_else(|| current(name), Value::from)
        };
        let auth = json!({
            "type": "sas",
            "symmetricKey": {
                "primaryKey": key(&seed.primary_key, "primaryKey"),
                "secondaryKey": key(&seed.secondary_key, "secondaryKey"),
            },
        });
        body["authentication"] = auth;
    }
    body
}

/// Whether `existing` differs from what `seed` declares of its identity.
fn identity_differs(seed: &SeedDevice, existing: &DeviceRecord) -> bool {
    let key_differs = |given: &Option<String>, current: &Option<String>| {
        given.as_ref().is_some_and(|g| Some(g) != current.as_ref())
    };
    seed.status.is_some_and(|s| s.as_str() != existing.status)
        || ((seed.primary_key.is_some() || seed.secondary_key.is_some())
            && existing.auth_type != "sas")
        || key_differs(&seed.primary_key, &existing.primary_key)
        || key_differs(&seed.secondary_key, &existing.secondary_key)
}

/// Whether merging `seed`'s tags and desired properties into `existing`'s twin changes it.
fn twin_differs(seed: &SeedDevice, existing: &DeviceRecord) -> bool {
    seed.tags
        .as_ref()
        .is_some_and(|t| twins::patch_changes(&existing.tags, t))
        || seed
            .desired
            .as_ref()
            .is_some_and(|d| twins::patch_changes(&existing.desired, d))
}

/// A staged record with the desired patch its device should receive.
type StagedPut = (DeviceRecord, Option<Map<String, Value>>);

/// What `seed` stages against `existing`: `None` when the device is in the file's state.
fn stage_seed(
    seed: &SeedDevice,
    existing: Option<&DeviceRecord>,
    now: &str,
) -> Result<Option<StagedPut>, OperationError> {
    let (record, twin) = match existing {
        None => {
            let update = parse_device_update(&seed.id, &identity_body(seed, None))?;
            let record = stage_device(None, &seed.id, update, None, now)?;
            let twin = seed.tags.as_ref().is_some_and(|t| !t.is_empty())
                || seed.desired.as_ref().is_some_and(|d| !d.is_empty());
            (record, twin)
        }
        Some(existing) => {
            let identity = identity_differs(seed, existing);
            let twin = twin_differs(seed, existing);
            if !identity && !twin {
                return Ok(None);
            }
            let record = if identity {
                let update = parse_device_update(&seed.id, &identity_body(seed, Some(existing)))?;
                stage_device(Some(existing), &seed.id, update, Some("*"), now)?
            } else {
                existing.clone()
            };
            (record, twin)
        }
    };
    if !twin {
        return Ok(Some((record, None)));
    }
    let mut body = Map::new();
    if let Some(tags) = &seed.tags {
        body.insert("tags".into(), Value::Object(tags.clone()));
    }
    if let Some(desired) = &seed.desired {
        body.insert("properties".into(), json!({ "desired": desired }));
    }
    let body = Value::Object(body);
    let parts = twins::parse_service_update(&body)?;
    match stage_twin_update(record, parts, None, false, None, now)? {
        Staged::Changed(record, notify) => Ok(Some((*record, notify))),
        // Only a twin job's update can have been applied already; a seed's has no job id.
        Staged::AlreadyApplied(_) => Err(OperationError::Internal(
            "a seed's twin update was taken for a job's".into(),
        )),
    }
}

impl Hub {
    /// Applies a seed's devices in one transaction (see the module's doc): all of them, or
    /// none when one is refused.
    pub async fn apply_seed(&self, devices: &[SeedDevice]) -> Result<SeedOutcome, SeedRefused> {
        let refused = |index, error| SeedRefused { index, error };
        let writing = self
            .write_locks(devices.iter().map(|d| d.id.as_str()))
            .await;
        let current: Vec<Option<DeviceRecord>> = {
            let state = lock(&self.inner.state);
            devices
                .iter()
                .map(|d| state.devices.get(&d.id).cloned())
                .collect()
        };
        let now = self.now();
        let mut outcome = SeedOutcome::default();
        let mut change = DeviceChange::default();
        for (index, (seed, existing)) in devices.iter().zip(&current).enumerate() {
            match stage_seed(seed, existing.as_ref(), &now).map_err(|e| refused(index, e))? {
                None => outcome.unchanged += 1,
                Some((record, notify)) => {
                    if existing.is_some() {
                        outcome.updated += 1;
                    } else {
                        outcome.created += 1;
                    }
                    if record.status != "enabled" {
                        change.close_sessions.push(record.device_id.clone());
                    }
                    change.put.push((record, notify));
                }
            }
        }
        if !change.put.is_empty() {
            self.commit_devices(writing, change)
                .await
                .map_err(|e| refused(0, e))?;
        }
        Ok(outcome)
    }
}
