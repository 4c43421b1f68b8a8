//! The identity registry: device records created, updated, deleted, read and listed as
//! `PUT/GET/DELETE /devices/{id}` and `GET /devices` do it, and the tutorial device of a new hub.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value};

use super::record::{DeviceRecord, NEVER, empty_doc, generation_id, matches_etag, random_key};
use super::{DeviceChange, Hub, OperationError, lock};
use crate::store::{Store, Write};
use crate::twins::{self, Section};

/// The device every fresh hub has: the tutorial's `myDeviceId`.
pub const TUTORIAL_DEVICE_ID: &str = "myDeviceId";

/// Checks a device id against IoT Hub's rules (shared with the clients in hub-core).
pub fn validate_device_id(id: &str) -> Result<(), OperationError> {
    hub_core::connection_string::validate_device_id(id)
        .map_err(|e| OperationError::InvalidArgument(e.to_string()))
}

/// A `PUT /devices/{id}` body, validated: what a create or an update sets.
#[derive(Debug)]
pub(super) struct DeviceUpdate {
    status: Option<String>,
    status_reason: Option<String>,
    pub(super) auth_type: String,
    pub(super) primary: Option<String>,
    pub(super) secondary: Option<String>,
    pub(super) primary_thumbprint: Option<String>,
    pub(super) secondary_thumbprint: Option<String>,
    iot_edge: bool,
}

/// Validates a `PUT /devices/{id}` body for device `id`.
pub(super) fn parse_device_update(id: &str, body: &Value) -> Result<DeviceUpdate, OperationError> {
    validate_device_id(id)?;
    if let Some(body_id) = body.get("deviceId").and_then(Value::as_str)
        && body_id != id
    {
        return Err(OperationError::InvalidArgument(format!(
            "the body's deviceId `{body_id}` does not match the URL's `{id}`"
        )));
    }
    let status = match body.get("status") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "enabled" || s == "disabled" => Some(s.clone()),
        Some(other) => {
            return Err(OperationError::InvalidArgument(format!(
                "status must be \"enabled\" or \"disabled\", got {other}"
            )));
        }
    };
    let status_reason = body
        .get("statusReason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let auth = body.get("authentication");
    let auth_type = auth
        .and_then(|a| a.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("sas")
        .to_owned();
    if !["sas", "selfSigned", "certificateAuthority", "none"].contains(&auth_type.as_str()) {
        return Err(OperationError::InvalidArgument(format!(
            "authentication.type must be sas, selfSigned, certificateAuthority or none, got `{auth_type}`"
        )));
    }
    let key = |name: &str| -> Result<Option<String>, OperationError> {
        match auth
            .and_then(|a| a.get("symmetricKey"))
            .and_then(|k| k.get(name))
        {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => {
                let decoded = BASE64.decode(s).map_err(|_| {
                    OperationError::InvalidArgument(format!(
                        "authentication.symmetricKey.{name} is not valid base64"
                    ))
                })?;
                if !(16..=64).contains(&decoded.len()) {
                    return Err(OperationError::InvalidArgument(format!(
                        "authentication.symmetricKey.{name} must decode to 16 to 64 bytes, got {}",
                        decoded.len()
                    )));
                }
                Ok(Some(s.clone()))
            }
            Some(other) => Err(OperationError::InvalidArgument(format!(
                "authentication.symmetricKey.{name} must be a base64 string, got {other}"
            ))),
        }
    };
    let (primary, secondary) = (key("primaryKey")?, key("secondaryKey")?);
    let thumb = |name: &str| {
        auth.and_then(|a| a.get("x509Thumbprint"))
            .and_then(|k| k.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let iot_edge = body
        .get("capabilities")
        .and_then(|c| c.get("iotEdge"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(DeviceUpdate {
        primary_thumbprint: thumb("primaryThumbprint"),
        secondary_thumbprint: thumb("secondaryThumbprint"),
        status,
        status_reason,
        auth_type,
        primary,
        secondary,
        iot_edge,
    })
}

/// The record a create (`existing` is `None`) or an update makes, as of `now`.
pub(super) fn stage_device(
    existing: Option<&DeviceRecord>,
    id: &str,
    update: DeviceUpdate,
    if_match: Option<&str>,
    now: &str,
) -> Result<DeviceRecord, OperationError> {
    let DeviceUpdate {
        status,
        status_reason,
        auth_type,
        primary,
        secondary,
        primary_thumbprint,
        secondary_thumbprint,
        iot_edge,
    } = update;
    let record = match existing {
        None => {
            if if_match.is_some_and(|m| m.trim() != "*") {
                // Python sends `If-Match: "*"`-less creates; an etag on a missing device
                // can only be a stale update.
                return Err(OperationError::DeviceNotFound(id.to_owned()));
            }
            let (primary, secondary) = if auth_type == "sas" {
                (
                    Some(primary.unwrap_or_else(random_key)),
                    Some(secondary.unwrap_or_else(random_key)),
                )
            } else {
                (primary, secondary)
            };
            let mut record = DeviceRecord {
                device_id: id.to_owned(),
                generation_id: generation_id(),
                etag_seq: 1,
                status: status.unwrap_or_else(|| "enabled".into()),
                status_reason,
                status_updated_time: NEVER.into(),
                auth_type,
                primary_key: primary,
                secondary_key: secondary,
                primary_thumbprint,
                secondary_thumbprint,
                iot_edge,
                device_scope: None,
                twin_version: 1,
                tags: Map::new(),
                desired: twins::new_section(now, Section::Desired),
                reported: twins::new_section(now, Section::Reported),
                last_activity_time: NEVER.into(),
                model_id: String::new(),
                twin_jobs_applied: Vec::new(),
                session: None,
                modules: BTreeMap::new(),
                configurations: BTreeMap::new(),
                connected: false,
                connection_state_updated_time: NEVER.into(),
                doc: empty_doc(),
            };
            record.refresh();
            record
        }
        Some(existing) => {
            if if_match.is_none() {
                return Err(OperationError::DeviceAlreadyExists(id.to_owned()));
            }
            if !matches_etag(if_match, &existing.etag()) {
                return Err(OperationError::PreconditionFailed {
                    what: "device",
                    id: id.to_owned(),
                });
            }
            let mut record = existing.clone();
            if let Some(status) = status
                && status != record.status
            {
                record.status = status;
                record.status_updated_time = now.to_owned();
            }
            record.status_reason = status_reason;
            record.auth_type = auth_type;
            if record.auth_type == "sas" {
                record.primary_key = Some(
                    primary
                        .or(record.primary_key.take())
                        .unwrap_or_else(random_key),
                );
                record.secondary_key = Some(
                    secondary
                        .or(record.secondary_key.take())
                        .unwrap_or_else(random_key),
                );
            } else {
                record.primary_key = primary;
                record.secondary_key = secondary;
            }
            record.primary_thumbprint = primary_thumbprint;
            record.secondary_thumbprint = secondary_thumbprint;
            record.iot_edge = iot_edge;
            // A device disabled, or whose credentials changed, starts over: re-enabling is like
            // re-creating it (its handlers stop until it subscribes again; Azure IoT SDK for C#
            // issue 42, a maintainer's answer), and a new key is a new identity to the session.
            if record.status != "enabled"
                || record.primary_key != existing.primary_key
                || record.secondary_key != existing.secondary_key
                || record.primary_thumbprint != existing.primary_thumbprint
                || record.secondary_thumbprint != existing.secondary_thumbprint
                || record.auth_type != existing.auth_type
            {
                record.session = None;
            }
            record.etag_seq += 1;
            record.refresh();
            record
        }
    };
    Ok(record)
}

/// Every stored device record, with its twin document built.
pub(super) fn load_devices(
    store: &Store,
) -> Result<BTreeMap<String, DeviceRecord>, OperationError> {
    let mut devices = BTreeMap::new();
    for (id, text) in store.load_devices()? {
        let mut record: DeviceRecord = serde_json::from_str(&text).map_err(|e| {
            OperationError::Unreadable(format!(
                "the hub store's record of device {id} is unreadable: {e}"
            ))
        })?;
        record.refresh_all();
        devices.insert(id, record);
    }
    Ok(devices)
}

impl Hub {
    /// Creates the tutorial device on a new hub (blocking: only while the hub opens).
    pub(super) fn create_tutorial_device(&self) -> Result<(), OperationError> {
        let mut state = lock(&self.inner.state);
        if state.devices.contains_key(TUTORIAL_DEVICE_ID) {
            return Ok(());
        }
        let update = parse_device_update(TUTORIAL_DEVICE_ID, &Value::Object(Map::new()))?;
        let record = stage_device(None, TUTORIAL_DEVICE_ID, update, None, &self.now())?;
        if self.inner.store.is_durable() {
            let doc = serde_json::to_string(&record)
                .map_err(|e| OperationError::Internal(format!("cannot encode a device: {e}")))?;
            self.inner.store.write(&[Write::PutDevice {
                id: TUTORIAL_DEVICE_ID.into(),
                doc,
            }])?;
        }
        state.devices.insert(TUTORIAL_DEVICE_ID.to_owned(), record);
        Ok(())
    }

    /// `PUT /devices/{id}`: creates a device (no `If-Match`) or updates one. Disabling a device
    /// closes its session.
    pub async fn create_or_update_device(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, OperationError> {
        let update = parse_device_update(id, body)?;
        let writing = self.write_locks([id]).await;
        let existing = lock(&self.inner.state).devices.get(id).cloned();
        let record = stage_device(existing.as_ref(), id, update, if_match, &self.now())?;
        let close_sessions = if record.status == "enabled" {
            Vec::new()
        } else {
            vec![id.to_owned()]
        };
        let out = record.device_json();
        self.commit_devices(
            writing,
            DeviceChange {
                put: vec![(record, None)],
                close_sessions,
                ..DeviceChange::default()
            },
        )
        .await?;
        Ok(out)
    }

    /// `GET /devices/{id}`.
    pub fn get_device(&self, id: &str) -> Result<Value, OperationError> {
        lock(&self.inner.state)
            .devices
            .get(id)
            .map(DeviceRecord::device_json)
            .ok_or_else(|| OperationError::DeviceNotFound(id.to_owned()))
    }

    /// Whether a device is registered.
    pub fn device_exists(&self, id: &str) -> bool {
        lock(&self.inner.state).devices.contains_key(id)
    }

    /// `GET /devices?top=n`: the first `top` devices by id.
    pub fn list_devices(&self, top: usize) -> Vec<Value> {
        lock(&self.inner.state)
            .devices
            .values()
            .take(top)
            .map(DeviceRecord::device_json)
            .collect()
    }

    /// `DELETE /devices/{id}`: removes the device and closes its session.
    pub async fn delete_device(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), OperationError> {
        let writing = self.write_locks([id]).await;
        {
            let state = lock(&self.inner.state);
            let Some(existing) = state.devices.get(id) else {
                return Err(OperationError::DeviceNotFound(id.to_owned()));
            };
            if !matches_etag(if_match, &existing.etag()) {
                return Err(OperationError::PreconditionFailed {
                    what: "device",
                    id: id.to_owned(),
                });
            }
        }
        self.commit_devices(
            writing,
            DeviceChange {
                delete: vec![id.to_owned()],
                close_sessions: vec![id.to_owned()],
                ..DeviceChange::default()
            },
        )
        .await
    }
}
