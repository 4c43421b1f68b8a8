//! The bulk registry's wire model (`POST /devices`, "Bulk Registry - Update Registry" in the
//! REST reference, api-version 2021-04-12): the request is a JSON array of
//! [`ExportImportDevice`], at most [`MAX_BULK_DEVICES`], each with its own [`ImportMode`]; the
//! answer is a [`BulkRegistryOperationResult`] with one [`DeviceRegistryOperationError`] per
//! device that failed. Pure: no I/O.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::device::{Authentication, Capabilities, DeviceStatus, UnknownValueError};
use crate::twin::TwinProperties;

/// Most devices one bulk call may name: "A maximum of 100 devices can be specified per
/// invocation" (REST reference, "Bulk Registry - Update Registry"; the same words in
/// azure-iot-hub-python `protocol/operations/bulk_registry_operations.py`). The Node SDK
/// refuses more before sending (azure-iothub `registry.js` `_processBulkDevices`).
pub const MAX_BULK_DEVICES: usize = 100;

/// What a bulk call does to one device, and whether it checks an etag first.
///
/// The swagger (azure-iot-hub-python `protocol/models/export_import_device.py`) lists create,
/// update, updateIfMatchETag, delete, deleteIfMatchETag, updateTwin and updateTwinIfMatchETag;
/// the C# SDK also sends createOrUpdate and createOrUpdateIfMatchETag (azure-iot-sdk-csharp
/// `iothub/service/src/Registry/Models/ImportMode.cs`). Spellings are read case-insensitively:
/// the Node SDK sends `Update`, `UpdateIfMatchETag`, `Delete` and `DeleteIfMatchETag`
/// capitalised (azure-iothub 1.16 `dist/registry.js`, `updateDevices`/`removeDevices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImportMode {
    /// `createOrUpdate`: create it, or overwrite it whatever its etag.
    CreateOrUpdate,
    /// `create`: create it; an existing device is an error.
    Create,
    /// `update`: overwrite an existing device whatever its etag; a missing one is an error.
    Update,
    /// `updateIfMatchETag`: overwrite an existing device whose etag is `eTag`.
    UpdateIfMatchETag,
    /// `createOrUpdateIfMatchETag`: create it, or overwrite it if its etag is `eTag`.
    CreateOrUpdateIfMatchETag,
    /// `delete`: delete an existing device whatever its etag.
    Delete,
    /// `deleteIfMatchETag`: delete an existing device whose etag is `eTag`.
    DeleteIfMatchETag,
    /// `updateTwin`: merge `tags` and `properties.desired` into an existing device's twin.
    UpdateTwin,
    /// `updateTwinIfMatchETag`: the same, if the twin's etag is `twinETag`.
    UpdateTwinIfMatchETag,
}

impl ImportMode {
    /// Every mode.
    pub const ALL: &'static [ImportMode] = &[
        ImportMode::CreateOrUpdate,
        ImportMode::Create,
        ImportMode::Update,
        ImportMode::UpdateIfMatchETag,
        ImportMode::CreateOrUpdateIfMatchETag,
        ImportMode::Delete,
        ImportMode::DeleteIfMatchETag,
        ImportMode::UpdateTwin,
        ImportMode::UpdateTwinIfMatchETag,
    ];

    /// The spelling this crate sends (the swagger's camelCase).
    pub const fn as_str(self) -> &'static str {
        match self {
            ImportMode::CreateOrUpdate => "createOrUpdate",
            ImportMode::Create => "create",
            ImportMode::Update => "update",
            ImportMode::UpdateIfMatchETag => "updateIfMatchETag",
            ImportMode::CreateOrUpdateIfMatchETag => "createOrUpdateIfMatchETag",
            ImportMode::Delete => "delete",
            ImportMode::DeleteIfMatchETag => "deleteIfMatchETag",
            ImportMode::UpdateTwin => "updateTwin",
            ImportMode::UpdateTwinIfMatchETag => "updateTwinIfMatchETag",
        }
    }

    /// Whether the mode needs `eTag` (the device's) to be set.
    pub const fn needs_etag(self) -> bool {
        matches!(
            self,
            ImportMode::UpdateIfMatchETag
                | ImportMode::CreateOrUpdateIfMatchETag
                | ImportMode::DeleteIfMatchETag
        )
    }
}

impl std::fmt::Display for ImportMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImportMode {
    type Err = UnknownValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImportMode::ALL
            .iter()
            .copied()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownValueError::new("ImportMode", s))
    }
}

impl Serialize for ImportMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ImportMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|_| {
            let known: Vec<&str> = ImportMode::ALL.iter().map(|m| m.as_str()).collect();
            serde::de::Error::custom(format!(
                "unknown importMode `{text}`, expected one of {}",
                known.join(", ")
            ))
        })
    }
}

/// One device of a bulk call (swagger model `ExportImportDevice`). Unknown keys (a Node caller
/// sends whole `Device` objects) are kept in `extra` and ignored by the hub.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportImportDevice {
    /// `id`: the device id (required).
    pub id: String,
    /// `moduleId`: for module identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    /// `eTag`: the device's etag, checked by the `...IfMatchETag` modes.
    #[serde(rename = "eTag", default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    /// `importMode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_mode: Option<ImportMode>,
    /// `status` (default `enabled` on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// `statusReason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// `authentication` (default: SAS with keys the hub generates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// `twinETag`: the twin's etag, checked by `updateTwinIfMatchETag`.
    #[serde(rename = "twinETag", default, skip_serializing_if = "Option::is_none")]
    pub twin_etag: Option<String>,
    /// `tags` of the twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// `properties` of the twin (`desired`; `reported` belongs to the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
    /// `capabilities`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// `deviceScope`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    /// `parentScopes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_scopes: Option<Vec<String>>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ExportImportDevice {
    /// A device `id` with `mode` and nothing else (the hub generates keys on create).
    pub fn new(id: impl Into<String>, mode: ImportMode) -> Self {
        ExportImportDevice {
            id: id.into(),
            import_mode: Some(mode),
            ..ExportImportDevice::default()
        }
    }
}

/// The answer to a bulk call (swagger model `BulkRegistryOperationResult`), sent with 200 when
/// every device succeeded and 400 when some failed: the REST reference lists this body for both
/// statuses, and azure-iot-hub-python's `update_registry` accepts exactly 200 and 400 and reads
/// this model from either (`protocol/operations/bulk_registry_operations.py`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkRegistryOperationResult {
    /// `isSuccessful`: whether every device's operation succeeded.
    #[serde(default)]
    pub is_successful: bool,
    /// `errors`: one per device that failed.
    #[serde(default)]
    pub errors: Vec<DeviceRegistryOperationError>,
    /// `warnings`.
    #[serde(default)]
    pub warnings: Vec<DeviceRegistryOperationWarning>,
}

/// Why one device of a bulk call failed (swagger model `DeviceRegistryOperationError`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistryOperationError {
    /// `deviceId`.
    pub device_id: String,
    /// `errorCode`: the error code's name, e.g. `DeviceAlreadyExists` (the swagger's enum is of
    /// names, not numbers).
    pub error_code: String,
    /// `errorStatus`: what went wrong, in words.
    #[serde(default)]
    pub error_status: String,
    /// `moduleId`, for module identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    /// `operation`: the operation that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
}

/// A warning about one device of a bulk call (swagger model `DeviceRegistryOperationWarning`;
/// its one code is `DeviceRegisteredWithoutTwin`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistryOperationWarning {
    /// `deviceId`.
    pub device_id: String,
    /// `warningCode`.
    pub warning_code: String,
    /// `warningStatus`.
    #[serde(default)]
    pub warning_status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_modes_read_in_any_case_and_write_camel_case() {
        for mode in ImportMode::ALL {
            let upper = mode.as_str()[..1].to_uppercase() + &mode.as_str()[1..];
            assert_eq!(upper.parse::<ImportMode>(), Ok(*mode));
            assert_eq!(mode.as_str().parse::<ImportMode>(), Ok(*mode));
            assert_eq!(
                serde_json::to_value(mode).ok(),
                Some(Value::from(mode.as_str()))
            );
        }
        let error = serde_json::from_str::<ImportMode>("\"upsert\"")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("unknown importMode `upsert`"), "{error}");
    }

    #[test]
    fn an_sdk_body_parses_and_round_trips() {
        // The shape azure-iot-hub-python sends for a create with keys.
        let text = r#"{"id": "BulkDevice1", "importMode": "create", "status": "enabled",
            "authentication": {"symmetricKey": {"primaryKey": "cHJpbWFyeQ==",
            "secondaryKey": "c2Vjb25kYXJ5"}, "type": "sas"}, "eTag": "MQ==",
            "tags": {"floor": 3}, "properties": {"desired": {"fw": "1.0"}}, "connectionState": "Disconnected"}"#;
        let device: ExportImportDevice = serde_json::from_str(text).expect("parses");
        assert_eq!(device.id, "BulkDevice1");
        assert_eq!(device.import_mode, Some(ImportMode::Create));
        assert_eq!(device.status, Some(DeviceStatus::Enabled));
        assert_eq!(device.e_tag.as_deref(), Some("MQ=="));
        assert_eq!(
            device.tags.as_ref().map(|t| t["floor"].clone()),
            Some(Value::from(3))
        );
        assert!(device.extra.contains_key("connectionState"));
        let again: ExportImportDevice =
            serde_json::from_value(serde_json::to_value(&device).expect("encodes"))
                .expect("parses");
        assert_eq!(again, device);
    }

    #[test]
    fn a_result_reads_with_or_without_its_lists() {
        let result: BulkRegistryOperationResult = serde_json::from_str(
            r#"{"isSuccessful": false, "errors": [{"deviceId": "d1",
            "errorCode": "DeviceAlreadyExists", "errorStatus": "already registered"}]}"#,
        )
        .expect("parses");
        assert!(!result.is_successful);
        assert_eq!(result.errors[0].error_code, "DeviceAlreadyExists");
        assert!(result.warnings.is_empty());
        let text = serde_json::to_string(&BulkRegistryOperationResult {
            is_successful: true,
            ..Default::default()
        })
        .expect("encodes");
        assert_eq!(text, r#"{"isSuccessful":true,"errors":[],"warnings":[]}"#);
    }
}
