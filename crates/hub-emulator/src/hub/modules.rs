//! Module identities and module twins: `PUT/GET/DELETE /devices/{id}/modules/{mid}`,
//! `GET /devices/{id}/modules`, `GET/PATCH/PUT /twins/{id}/modules/{mid}`, a module's reported
//! patches, and the module twin documents `FROM devices.modules` reads. A module lives inside
//! its device's record, so every change here runs under the device's write lock and commits
//! the device's record: deleting the device deletes its modules.

use std::ops::Bound;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::record::matches_etag;
use super::record::{DeviceRecord, ModuleRecord, NEVER, empty_doc, generation_id, random_key};
use super::registry::parse_device_update;
use super::twins::apply_service_update;
use super::{DeviceChange, Hub, OperationError, lock};
use crate::twins::{self, Section};

/// Most modules one device may have. IoT Hub documents no per-device module count; the
/// nearest documented figure is IoT Edge's "50 modules per deployment" (Microsoft Learn,
/// "Understand Azure IoT Edge limits and restrictions", Number of modules in a deployment),
/// and IoT Hub's own code for a device over its limit is 413003 TooManyModulesOnDevice
/// (Microsoft Learn, "Understand and resolve Azure IoT Hub errors"). The cap keeps a device's
/// record, which is rewritten on every change of the device, bounded.
pub const MAX_MODULES_PER_DEVICE: usize = 50;

/// Longest `managedBy` accepted (see [`stage_module`]).
const MAX_MANAGED_BY: usize = 128;

/// Checks a module id against IoT Hub's rules (shared with the clients in hub-core).
pub fn validate_module_id(id: &str) -> Result<(), OperationError> {
    hub_core::connection_string::validate_module_id(id)
        .map_err(|e| OperationError::InvalidArgument(e.to_string()))
}

/// The key of an identity's session and pending calls: the MQTT client id, `{deviceId}` or
/// `{deviceId}/{moduleId}` (device ids cannot contain `/`, so the two never collide).
pub fn identity_key(device_id: &str, module_id: Option<&str>) -> String {
    match module_id {
        Some(module) => format!("{device_id}/{module}"),
        None => device_id.to_owned(),
    }
}

/// The device and module ids of an identity key (see [`identity_key`]).
pub(super) fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once('/') {
        Some((device, module)) => (device, Some(module)),
        None => (key, None),
    }
}

fn not_found(device_id: &str, module_id: &str) -> OperationError {
    OperationError::ModuleNotFound {
        device: device_id.to_owned(),
        module: module_id.to_owned(),
    }
}

/// The record a module create (no `existing`) or update makes; `body` is a `Module` document.
/// Keys are generated when a `sas` module has none, as for devices ("if no custom keys are
/// provided the service will generate them", Azure CLI reference, `az iot hub module-identity
/// create`); `moduleId`, `deviceId` and `generationId` cannot be changed (REST reference,
/// "Modules - Create Or Update Identity").
fn stage_module(
    device: &DeviceRecord,
    module_id: &str,
    body: &Value,
    if_match: Option<&str>,
    now: &str,
) -> Result<ModuleRecord, OperationError> {
    validate_module_id(module_id)?;
    if let Some(body_id) = body.get("moduleId").and_then(Value::as_str)
        && body_id != module_id
    {
        return Err(OperationError::InvalidArgument(format!(
            "the body's moduleId `{body_id}` does not match the URL's `{module_id}`"
        )));
    }
    // IoT Hub documents no length for `managedBy`; 128 is this hub's bound, the one the
    // identity registry documents for `generationId` and `statusReason` (Microsoft Learn,
    // "Understand the identity registry in your IoT hub", device identity properties).
    let managed_by = match body.get("managedBy") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_MANAGED_BY => Some(s.clone()),
        Some(Value::String(s)) => {
            return Err(OperationError::InvalidArgument(format!(
                "managedBy must be at most {MAX_MANAGED_BY} characters, got {}",
                s.len()
            )));
        }
        Some(other) => {
            return Err(OperationError::InvalidArgument(format!(
                "managedBy must be a string, got {}",
                crate::twins::kind(other)
            )));
        }
    };
    let update = parse_device_update(&device.device_id, body)?;
    let sas = update.auth_type == "sas";
    match device.modules.get(module_id) {
        None => {
            if if_match.is_some_and(|m| m.trim() != "*") {
                // An etag for a module that does not exist can only be a stale update.
                return Err(not_found(&device.device_id, module_id));
            }
            if device.modules.len() >= MAX_MODULES_PER_DEVICE {
                return Err(OperationError::TooManyModules {
                    device: device.device_id.clone(),
                    max: MAX_MODULES_PER_DEVICE,
                });
            }
            let (primary, secondary) = if sas {
                (
                    Some(update.primary.unwrap_or_else(random_key)),
                    Some(update.secondary.unwrap_or_else(random_key)),
                )
            } else {
                (update.primary, update.secondary)
            };
            let mut module = ModuleRecord {
                module_id: module_id.to_owned(),
                generation_id: generation_id(),
                etag_seq: 1,
                auth_type: update.auth_type,
                primary_key: primary,
                secondary_key: secondary,
                primary_thumbprint: update.primary_thumbprint,
                secondary_thumbprint: update.secondary_thumbprint,
                managed_by,
                twin_version: 1,
                tags: Map::new(),
                desired: twins::new_section(now, Section::Desired),
                reported: twins::new_section(now, Section::Reported),
                last_activity_time: NEVER.into(),
                session: None,
                configurations: std::collections::BTreeMap::new(),
                connected: false,
                connection_state_updated_time: NEVER.into(),
                doc: empty_doc(),
            };
            module.refresh(&device.device_id);
            Ok(module)
        }
        Some(existing) => {
            // As for devices: a create (no If-Match) of an existing module is a conflict.
            if if_match.is_none() {
                return Err(OperationError::ModuleAlreadyExists {
                    device: device.device_id.clone(),
                    module: module_id.to_owned(),
                });
            }
            if !matches_etag(if_match, &existing.etag()) {
                return Err(OperationError::PreconditionFailed {
                    what: "module",
                    id: identity_key(&device.device_id, Some(module_id)),
                });
            }
            let mut module = existing.clone();
            module.auth_type = update.auth_type;
            if sas {
                module.primary_key = Some(
                    update
                        .primary
                        .or(module.primary_key.take())
                        .unwrap_or_else(random_key),
                );
                module.secondary_key = Some(
                    update
                        .secondary
                        .or(module.secondary_key.take())
                        .unwrap_or_else(random_key),
                );
            } else {
                module.primary_key = update.primary;
                module.secondary_key = update.secondary;
            }
            module.primary_thumbprint = update.primary_thumbprint;
            module.secondary_thumbprint = update.secondary_thumbprint;
            module.managed_by = managed_by;
            // New credentials are a new identity to the session (as for devices).
            if module.primary_key != existing.primary_key
                || module.secondary_key != existing.secondary_key
                || module.auth_type != existing.auth_type
                || module.primary_thumbprint != existing.primary_thumbprint
                || module.secondary_thumbprint != existing.secondary_thumbprint
            {
                module.session = None;
            }
            module.etag_seq += 1;
            module.refresh(&device.device_id);
            Ok(module)
        }
    }
}

impl Hub {
    /// A copy of a registered device's committed record (the caller holds its write lock).
    fn device_copy(&self, device_id: &str) -> Result<DeviceRecord, OperationError> {
        lock(&self.inner.state)
            .devices
            .get(device_id)
            .cloned()
            .ok_or_else(|| OperationError::DeviceNotFound(device_id.to_owned()))
    }

    /// `PUT /devices/{id}/modules/{mid}`: creates a module (no `If-Match`) or updates one. New
    /// keys close the module's session.
    pub async fn create_or_update_module(
        &self,
        device_id: &str,
        module_id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, OperationError> {
        validate_module_id(module_id)?;
        let writing = self.write_locks([device_id]).await;
        let mut device = self.device_copy(device_id)?;
        let module = stage_module(&device, module_id, body, if_match, &self.now())?;
        let rekeyed = device.modules.get(module_id).is_some_and(|old| {
            old.primary_key != module.primary_key || old.secondary_key != module.secondary_key
        });
        let out = module.module_json(device_id);
        device.modules.insert(module_id.to_owned(), module);
        let close_sessions = if rekeyed {
            vec![identity_key(device_id, Some(module_id))]
        } else {
            Vec::new()
        };
        self.commit_devices(
            writing,
            DeviceChange {
                put: vec![(device, None)],
                close_sessions,
                ..DeviceChange::default()
            },
        )
        .await?;
        Ok(out)
    }

    /// `GET /devices/{id}/modules/{mid}`.
    pub fn get_module(&self, device_id: &str, module_id: &str) -> Result<Value, OperationError> {
        let state = lock(&self.inner.state);
        let device = state
            .devices
            .get(device_id)
            .ok_or_else(|| OperationError::DeviceNotFound(device_id.to_owned()))?;
        device
            .modules
            .get(module_id)
            .map(|m| m.module_json(device_id))
            .ok_or_else(|| not_found(device_id, module_id))
    }

    /// Whether the device has this module.
    pub fn module_exists(&self, device_id: &str, module_id: &str) -> bool {
        lock(&self.inner.state)
            .devices
            .get(device_id)
            .is_some_and(|d| d.modules.contains_key(module_id))
    }

    /// `GET /devices/{id}/modules`: the device's modules by module id (at most
    /// [`MAX_MODULES_PER_DEVICE`]).
    pub fn list_modules(&self, device_id: &str) -> Result<Vec<Value>, OperationError> {
        let state = lock(&self.inner.state);
        let device = state
            .devices
            .get(device_id)
            .ok_or_else(|| OperationError::DeviceNotFound(device_id.to_owned()))?;
        Ok(device
            .modules
            .values()
            .map(|m| m.module_json(device_id))
            .collect())
    }

    /// `DELETE /devices/{id}/modules/{mid}`: removes the module and closes its session.
    pub async fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: Option<&str>,
    ) -> Result<(), OperationError> {
        let writing = self.write_locks([device_id]).await;
        let mut device = self.device_copy(device_id)?;
        let Some(existing) = device.modules.remove(module_id) else {
            return Err(not_found(device_id, module_id));
        };
        if !matches_etag(if_match, &existing.etag()) {
            return Err(OperationError::PreconditionFailed {
                what: "module",
                id: identity_key(device_id, Some(module_id)),
            });
        }
        self.commit_devices(
            writing,
            DeviceChange {
                put: vec![(device, None)],
                close_sessions: vec![identity_key(device_id, Some(module_id))],
                ..DeviceChange::default()
            },
        )
        .await
    }

    /// `GET /twins/{id}/modules/{mid}`.
    pub fn get_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
    ) -> Result<Value, OperationError> {
        let state = lock(&self.inner.state);
        let device = state
            .devices
            .get(device_id)
            .ok_or_else(|| OperationError::DeviceNotFound(device_id.to_owned()))?;
        device
            .modules
            .get(module_id)
            .map(|m| (*m.doc).clone())
            .ok_or_else(|| not_found(device_id, module_id))
    }

    /// `PATCH` (`replace == false`) or `PUT /twins/{id}/modules/{mid}`: tags and desired
    /// properties of a module twin, with the same rules, etag and `$version` handling as a
    /// device twin; a desired change is sent to the module's session.
    pub async fn update_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
    ) -> Result<Value, OperationError> {
        let update = twins::parse_service_update(body)?;
        let writing = self.write_locks([device_id]).await;
        let mut device = self.device_copy(device_id)?;
        let Some(module) = device.modules.get_mut(module_id) else {
            return Err(not_found(device_id, module_id));
        };
        if !matches_etag(if_match, &module.twin_etag()) {
            return Err(OperationError::PreconditionFailed {
                what: "module twin",
                id: identity_key(device_id, Some(module_id)),
            });
        }
        let now = self.now();
        let notify =
            apply_service_update(&mut module.tags, &mut module.desired, update, replace, &now)?;
        module.twin_version += 1;
        module.refresh(device_id);
        let out = (*module.doc).clone();
        let module_desired = notify
            .map(|patch| vec![(identity_key(device_id, Some(module_id)), patch)])
            .unwrap_or_default();
        self.commit_devices(
            writing,
            DeviceChange {
                put: vec![(device, None)],
                module_desired,
                ..DeviceChange::default()
            },
        )
        .await?;
        Ok(out)
    }

    /// A module's twin GET answer over MQTT: `{"desired": {...}, "reported": {...}}`.
    pub fn module_twin_sections(&self, device_id: &str, module_id: &str) -> Option<Value> {
        let state = lock(&self.inner.state);
        let module = state.devices.get(device_id)?.modules.get(module_id)?;
        Some(json!({
            "desired": twins::without_metadata(&module.desired),
            "reported": twins::without_metadata(&module.reported),
        }))
    }

    /// A module's reported-properties patch. Returns the new reported `$version`.
    pub async fn patch_module_reported(
        &self,
        device_id: &str,
        module_id: &str,
        patch: Value,
    ) -> Result<u64, OperationError> {
        let writing = self.write_locks([device_id]).await;
        let mut device = self.device_copy(device_id)?;
        let Some(module) = device.modules.get_mut(module_id) else {
            return Err(not_found(device_id, module_id));
        };
        let now = self.now();
        let version = twins::apply_patch(&mut module.reported, &patch, Section::Reported, &now)?;
        module.twin_version += 1;
        module.last_activity_time = now;
        module.refresh(device_id);
        self.commit_devices(
            writing,
            DeviceChange {
                put: vec![(device, None)],
                ..DeviceChange::default()
            },
        )
        .await?;
        Ok(version)
    }

    /// Up to `max` module twin documents in (deviceId, moduleId) order, strictly after
    /// `after`, for `FROM devices.modules`. Read in chunks as
    /// [`Hub::twin_documents_from`] reads device twins: the state lock is held for at most
    /// [`super::TWIN_READ_CHUNK`] devices at a time.
    pub fn module_documents_from(
        &self,
        after: Option<(&str, &str)>,
        max: usize,
    ) -> Vec<Arc<Value>> {
        self.module_documents_chunked(after, max, super::TWIN_READ_CHUNK)
    }

    /// [`Hub::module_documents_from`], holding the state lock for `chunk` devices at a time.
    pub(super) fn module_documents_chunked(
        &self,
        after: Option<(&str, &str)>,
        max: usize,
        chunk: usize,
    ) -> Vec<Arc<Value>> {
        let chunk = chunk.max(1);
        let mut docs = Vec::new();
        // The device to resume in (modules after `module` in it), then the devices after it.
        let mut resume: Option<(String, Option<String>)> =
            after.map(|(d, m)| (d.to_owned(), Some(m.to_owned())));
        while docs.len() < max {
            let state = lock(&self.inner.state);
            let range = match &resume {
                Some((device, _)) => state
                    .devices
                    .range::<str, _>((Bound::Included(device.as_str()), Bound::Unbounded)),
                None => state.devices.range::<str, _>(..),
            };
            let mut last = None;
            let mut devices_read = 0;
            for (id, device) in range {
                devices_read += 1;
                let modules = match &resume {
                    Some((d, Some(m))) if d == id => device
                        .modules
                        .range::<str, _>((Bound::Excluded(m.as_str()), Bound::Unbounded)),
                    Some((d, None)) if d == id => {
                        // Already read whole in the chunk before.
                        continue;
                    }
                    _ => device.modules.range::<str, _>(..),
                };
                for (module_id, module) in modules {
                    if docs.len() >= max {
                        break;
                    }
                    docs.push(Arc::clone(&module.doc));
                    last = Some((id.clone(), Some(module_id.clone())));
                }
                if docs.len() >= max {
                    break;
                }
                last = Some((id.clone(), None));
                if devices_read >= chunk {
                    break;
                }
            }
            let done = last.is_none() || devices_read < chunk;
            drop(state);
            if docs.len() >= max || done {
                break;
            }
            resume = last;
        }
        docs
    }
}
