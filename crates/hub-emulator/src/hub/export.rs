//! Reading the registry out for an export job: each device's identity and twin as one
//! `ExportImportDevice` (the line format of IoT Hub's `devices.txt`), in id order, a page at a
//! time so the `state` lock is never held for the whole registry.

use std::ops::Bound;

use serde_json::{Map, Value, json};

use hub_core::bulk::ExportImportDevice;

use super::{Hub, lock};

impl Hub {
    /// Up to `max` devices after `after` (by id), as export lines; keys are null when
    /// `exclude_keys` ("keys are exported as null", Microsoft Learn, "Import and export IoT Hub
    /// device identities in bulk").
    pub fn export_page(
        &self,
        after: Option<&str>,
        max: usize,
        exclude_keys: bool,
    ) -> Vec<ExportImportDevice> {
        // Copied under the lock, turned into documents after it: the lock is held for clones,
        // not for building JSON.
        let records: Vec<_> = {
            let state = lock(&self.inner.state);
            let range = match after {
                Some(after) => state
                    .devices
                    .range::<str, _>((Bound::Excluded(after), Bound::Unbounded)),
                None => state.devices.range::<str, _>(..),
            };
            range.take(max).map(|(_, record)| record.clone()).collect()
        };
        let mut lines = Vec::with_capacity(records.len());
        for record in records {
            lines.push(export_line(
                record.device_json(),
                &record.twin_json(),
                exclude_keys,
            ));
            // A device's modules follow it, one line each with `moduleId`, as IoT Hub exports
            // them (azure-iot-sdk-csharp issue 1146 shows an export with `$edgeAgent` lines).
            for module in record.modules.values() {
                let mut line = export_line(
                    module.module_json(&record.device_id),
                    &module.twin_json(&record.device_id),
                    exclude_keys,
                );
                line.id.clone_from(&record.device_id);
                line.module_id = module
                    .module_json(&record.device_id)
                    .get("moduleId")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                lines.push(line);
            }
        }
        lines
    }

    /// How many devices the registry holds.
    pub fn device_count(&self) -> usize {
        lock(&self.inner.state).devices.len()
    }
}

/// One device's export line from its identity and twin documents.
fn export_line(device: Value, twin: &Value, exclude_keys: bool) -> ExportImportDevice {
    let mut authentication = device.get("authentication").cloned().unwrap_or(Value::Null);
    if exclude_keys && let Some(keys) = authentication.get_mut("symmetricKey") {
        *keys = json!({"primaryKey": null, "secondaryKey": null});
    }
    let mut properties = Map::new();
    for section in ["desired", "reported"] {
        if let Some(value) = twin.pointer(&format!("/properties/{section}")) {
            properties.insert(section.to_owned(), value.clone());
        }
    }
    let line = json!({
        "id": device.get("deviceId").cloned().unwrap_or(Value::Null),
        "eTag": device.get("etag").cloned().unwrap_or(Value::Null),
        "status": device.get("status").cloned().unwrap_or(Value::Null),
        "statusReason": device.get("statusReason").cloned().unwrap_or(Value::Null),
        "authentication": authentication,
        "twinETag": twin.get("etag").cloned().unwrap_or(Value::Null),
        "tags": twin.get("tags").cloned().unwrap_or_else(|| json!({})),
        "properties": properties,
        "capabilities": device.get("capabilities").cloned().unwrap_or(Value::Null),
    });
    // Every field above is one the hub itself wrote, so the line always reads back; a failure
    // would be a bug in the records, and the device is still exported by its id.
    serde_json::from_value(strip_nulls(line)).unwrap_or_else(|_| {
        ExportImportDevice::new(
            device
                .get("deviceId")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            hub_core::bulk::ImportMode::CreateOrUpdate,
        )
    })
}

/// Drops top-level nulls (optional fields the line leaves out).
fn strip_nulls(mut line: Value) -> Value {
    if let Some(object) = line.as_object_mut() {
        object.retain(|_, value| !value.is_null());
    }
    line
}
