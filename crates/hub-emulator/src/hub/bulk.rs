//! The bulk registry (`POST /devices`): up to 100 devices, each with its own import mode, staged
//! with the registry's single-device staging (`registry::stage_device`, the same validation,
//! etags and generated keys as `PUT /devices/{id}`) and twin staging (`twins::stage_twin_update`),
//! then committed in one transaction. A device that fails is reported and changes nothing; the
//! others still apply, as IoT Hub reports failures per device.

use std::collections::HashSet;

use hub_core::bulk::{DeviceRegistryOperationError, ExportImportDevice, ImportMode};
use serde_json::{Map, Value};

use super::record::{DeviceRecord, matches_etag};
use super::registry::{parse_device_update, stage_device};
use super::twins::{Staged, stage_twin_update};
use super::{DeviceChange, Hub, OperationError, lock};
use crate::twins;

/// What one device's operation stages.
enum BulkStaged {
    /// A created or updated record, with the desired patch a connected device should receive.
    Put(Box<DeviceRecord>, Option<Map<String, Value>>),
    /// The device is deleted.
    Delete,
}

/// Why a whole bulk call is refused before anything is staged.
#[derive(Debug, thiserror::Error)]
pub enum BulkRequestError {
    /// More devices than one call may name.
    #[error(
        "a bulk registry call may name at most {max} devices, this one names {count}; split it into calls of {max} or fewer"
    )]
    TooMany { count: usize, max: usize },
    /// No device at all.
    #[error("the bulk registry call names no device; send a JSON array of 1 to {max} devices")]
    Empty { max: usize },
    /// One id twice ("A device identity can be specified only once in the list", REST reference,
    /// "Bulk Registry - Update Registry").
    #[error("device {0} appears more than once in the bulk registry call; name each device once")]
    Duplicate(String),
}

/// Checks the call as a whole: 1 to [`hub_core::bulk::MAX_BULK_DEVICES`] devices, each once.
pub fn check_bulk_request(devices: &[ExportImportDevice]) -> Result<(), BulkRequestError> {
    let max = hub_core::bulk::MAX_BULK_DEVICES;
    if devices.is_empty() {
        return Err(BulkRequestError::Empty { max });
    }
    if devices.len() > max {
        return Err(BulkRequestError::TooMany {
            count: devices.len(),
            max,
        });
    }
    let mut seen = HashSet::with_capacity(devices.len());
    for device in devices {
        if !seen.insert(device.id.as_str()) {
            return Err(BulkRequestError::Duplicate(device.id.clone()));
        }
    }
    Ok(())
}

/// The `PUT /devices/{id}` body equivalent to a bulk entry's identity fields.
fn device_body(device: &ExportImportDevice) -> Result<Value, OperationError> {
    let encode = |what: &str, value: Result<Value, serde_json::Error>| {
        value.map_err(|e| OperationError::Internal(format!("cannot encode {what}: {e}")))
    };
    let mut body = Map::new();
    body.insert("deviceId".into(), Value::from(device.id.clone()));
    if let Some(status) = device.status {
        body.insert("status".into(), Value::from(status.as_str()));
    }
    if let Some(reason) = &device.status_reason {
        body.insert("statusReason".into(), Value::from(reason.clone()));
    }
    if let Some(auth) = &device.authentication {
        body.insert(
            "authentication".into(),
            encode("authentication", serde_json::to_value(auth))?,
        );
    }
    if let Some(capabilities) = &device.capabilities {
        body.insert(
            "capabilities".into(),
            encode("capabilities", serde_json::to_value(capabilities))?,
        );
    }
    Ok(Value::Object(body))
}

/// The twin update (`tags`, `properties`) a bulk entry carries, as a twin PATCH body; `None`
/// when it carries neither.
fn twin_body(device: &ExportImportDevice) -> Result<Option<Value>, OperationError> {
    if device.tags.is_none() && device.properties.is_none() {
        return Ok(None);
    }
    let mut body = Map::new();
    if let Some(tags) = &device.tags {
        body.insert("tags".into(), Value::Object(tags.clone()));
    }
    if let Some(properties) = &device.properties {
        let properties = serde_json::to_value(properties)
            .map_err(|e| OperationError::Internal(format!("cannot encode properties: {e}")))?;
        body.insert("properties".into(), properties);
    }
    Ok(Some(Value::Object(body)))
}

/// The device's etag a `...IfMatchETag` mode needs, or why it is missing.
fn required_etag(device: &ExportImportDevice, mode: ImportMode) -> Result<&str, OperationError> {
    device
        .e_tag
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| {
            OperationError::InvalidArgument(format!(
                "importMode {mode} needs the device's eTag; read it with GET /devices/{}",
                device.id
            ))
        })
}

/// Stages one bulk entry against the device's committed record (`existing`), as of `now`.
fn stage_entry(
    device: &ExportImportDevice,
    existing: Option<&DeviceRecord>,
    now: &str,
) -> Result<BulkStaged, OperationError> {
    let id = device.id.as_str();
    if device.module_id.as_deref().is_some_and(|m| !m.is_empty()) {
        return Err(OperationError::InvalidArgument(format!(
            "the bulk registry takes device identities only (moduleId of device {id}); create \
             modules with PUT /devices/{id}/modules/{{moduleId}}, or import them with an import \
             job"
        )));
    }
    // Without importMode, the C# SDK's default (its enum's 0) applies: createOrUpdate.
    let mode = device.import_mode.unwrap_or(ImportMode::CreateOrUpdate);
    let missing = || OperationError::DeviceNotFound(id.to_owned());
    match mode {
        ImportMode::Delete | ImportMode::DeleteIfMatchETag => {
            let existing = existing.ok_or_else(missing)?;
            if mode == ImportMode::DeleteIfMatchETag
                && !matches_etag(Some(required_etag(device, mode)?), &existing.etag())
            {
                return Err(OperationError::PreconditionFailed {
                    what: "device",
                    id: id.to_owned(),
                });
            }
            Ok(BulkStaged::Delete)
        }
        ImportMode::UpdateTwin | ImportMode::UpdateTwinIfMatchETag => {
            let existing = existing.ok_or_else(missing)?;
            let twin_etag = match mode {
                ImportMode::UpdateTwinIfMatchETag => Some(
                    device
                        .twin_etag
                        .as_deref()
                        .filter(|e| !e.trim().is_empty())
                        .ok_or_else(|| {
                            OperationError::InvalidArgument(format!(
                                "importMode {mode} needs the twin's twinETag; read it with GET /twins/{id}"
                            ))
                        })?,
                ),
                _ => None,
            };
            let body = twin_body(device)?.unwrap_or_else(|| Value::Object(Map::new()));
            stage_twin(existing.clone(), &body, twin_etag, now)
        }
        ImportMode::Create
        | ImportMode::CreateOrUpdate
        | ImportMode::Update
        | ImportMode::UpdateIfMatchETag
        | ImportMode::CreateOrUpdateIfMatchETag => {
            // Each mode as the If-Match of an equivalent `PUT /devices/{id}`: none creates only,
            // `*` overwrites whatever the etag, an etag overwrites only a device that has it.
            let if_match = match (mode, existing.is_some()) {
                (ImportMode::Create, _) | (ImportMode::CreateOrUpdateIfMatchETag, false) => None,
                (ImportMode::CreateOrUpdate, _) | (ImportMode::Update, true) => Some("*"),
                (ImportMode::UpdateIfMatchETag | ImportMode::CreateOrUpdateIfMatchETag, true) => {
                    Some(required_etag(device, mode)?)
                }
                (ImportMode::Update | ImportMode::UpdateIfMatchETag, false) => {
                    return Err(missing());
                }
                // The delete and twin modes are matched by the arms above this one.
                (other, _) => {
                    return Err(OperationError::Internal(format!(
                        "importMode {other} reached the create/update staging"
                    )));
                }
            };
            let update = parse_device_update(id, &device_body(device)?)?;
            let record = stage_device(existing, id, update, if_match, now)?;
            match twin_body(device)? {
                Some(body) => stage_twin(record, &body, None, now),
                None => Ok(BulkStaged::Put(Box::new(record), None)),
            }
        }
    }
}

/// Applies a twin PATCH body to `record` as `PATCH /twins/{id}` does.
fn stage_twin(
    record: DeviceRecord,
    body: &Value,
    if_match: Option<&str>,
    now: &str,
) -> Result<BulkStaged, OperationError> {
    let parts = twins::parse_service_update(body)?;
    match stage_twin_update(record, parts, if_match, false, None, now)? {
        Staged::Changed(record, notify) => Ok(BulkStaged::Put(record, notify)),
        // Only a twin job's update can have been applied already; this one has no job id.
        Staged::AlreadyApplied(_) => Err(OperationError::Internal(
            "a bulk twin update was taken for a job's".into(),
        )),
    }
}

impl Hub {
    /// `POST /devices`: stages each device's operation (see [`ImportMode`]) under the write
    /// locks of them all, then commits every staged change in one transaction. Returns the
    /// devices that failed, in request order; the call must have passed
    /// [`check_bulk_request`]. A failed commit fails the whole call and changes nothing.
    pub async fn bulk_registry(
        &self,
        devices: &[ExportImportDevice],
    ) -> Result<Vec<DeviceRegistryOperationError>, OperationError> {
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
        let mut change = DeviceChange::default();
        let mut failed = Vec::new();
        for (device, existing) in devices.iter().zip(current) {
            match stage_entry(device, existing.as_ref(), &now) {
                Ok(BulkStaged::Put(record, notify)) => {
                    if record.status != "enabled" {
                        change.close_sessions.push(record.device_id.clone());
                    }
                    change.put.push((*record, notify));
                }
                Ok(BulkStaged::Delete) => {
                    change.delete.push(device.id.clone());
                    change.close_sessions.push(device.id.clone());
                }
                Err(error) => failed.push(DeviceRegistryOperationError {
                    device_id: device.id.clone(),
                    error_code: error.code().name().to_owned(),
                    error_status: error.to_string(),
                    module_id: device.module_id.clone(),
                    operation: device.import_mode.map(|m| m.as_str().to_owned()),
                }),
            }
        }
        if !change.put.is_empty() || !change.delete.is_empty() {
            self.commit_devices(writing, change).await?;
        }
        Ok(failed)
    }
}
