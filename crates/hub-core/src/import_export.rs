//! IoT Hub's import and export jobs (`POST /jobs/create`, `GET /jobs[/{id}]`, `DELETE
//! /jobs/{id}`): the job document (swagger model `JobProperties`) that moves a whole identity
//! registry to and from a blob container, one `ExportImportDevice` JSON per line
//! ([`crate::bulk::ExportImportDevice`]). Sources: Microsoft Learn, "Import and export IoT Hub
//! device identities in bulk" and the REST reference "Jobs - Create Import Export Job";
//! azure-iot-hub-python 2.7.0 `protocol/models/job_properties_py3.py`.

use serde::{Deserialize, Serialize};

/// The blob an export writes and an import reads when the job names none.
pub const DEFAULT_DEVICES_BLOB: &str = "devices.txt";
/// The blob in the output container where an import lists the devices it could not apply (the
/// C# SDK's `CommonConstants.ImportDevicesOutputBlobName`).
pub const IMPORT_ERRORS_BLOB: &str = "importErrors.log";
/// The blob an export with `includeConfigurations` writes its configurations to, and an import
/// with it reads them from, when the job names none (`configurationsBlobName`: "Defaults to
/// configurations.txt", REST reference "Jobs - Create Import Export Job").
pub const DEFAULT_CONFIGURATIONS_BLOB: &str = "configurations.txt";
/// The one `importMode` a configuration line of an import may give, and what a line without
/// one means (the C# SDK's `ConfigurationImportMode` has this value only: created when missing,
/// overwritten only when the line's etag matches).
pub const CONFIGURATION_IMPORT_MODE: &str = "createOrUpdateIfMatchETag";

/// What kind of import/export job (`type`; the SDKs send `export` and `import`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImportExportType {
    /// The registry to a blob.
    Export,
    /// A blob into the registry.
    Import,
}

/// A job's state (`status`): `enqueued`, then `running`, then `completed`, `failed` or
/// `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImportExportStatus {
    /// Accepted, not started.
    Enqueued,
    /// Reading or writing its blobs.
    Running,
    /// Done (an import's per-device failures are in its error log, not here).
    Completed,
    /// Stopped by an error (`failureReason`).
    Failed,
    /// Cancelled with `DELETE /jobs/{id}`.
    Cancelled,
}

impl ImportExportStatus {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ImportExportStatus::Completed
                | ImportExportStatus::Failed
                | ImportExportStatus::Cancelled
        )
    }
}

/// The job document, as created (the caller sets `type` and the blob fields) and as answered.
/// Its `Debug` leaves out the container URIs' queries: they are SAS credentials.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportExportJob {
    /// `jobId` (the hub's; ignored on create).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `type`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub job_type: Option<ImportExportType>,
    /// `status` (the hub's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ImportExportStatus>,
    /// `startTimeUtc` (the hub's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_utc: Option<String>,
    /// `endTimeUtc` (the hub's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time_utc: Option<String>,
    /// `progress`: percent done (the hub's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u32>,
    /// `inputBlobContainerUri`: a container SAS URI an import reads from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_blob_container_uri: Option<String>,
    /// `inputBlobName` (default [`DEFAULT_DEVICES_BLOB`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_blob_name: Option<String>,
    /// `outputBlobContainerUri`: a container SAS URI an export writes to (an import writes its
    /// error log there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blob_container_uri: Option<String>,
    /// `outputBlobName` (default [`DEFAULT_DEVICES_BLOB`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blob_name: Option<String>,
    /// `excludeKeysInExport`: keys are written as null (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_keys_in_export: Option<bool>,
    /// `storageAuthenticationType`: `keyBased` (SAS URIs) or `identityBased`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_authentication_type: Option<String>,
    /// `includeConfigurations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_configurations: Option<bool>,
    /// `configurationsBlobName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configurations_blob_name: Option<String>,
    /// `failureReason` (the hub's, when `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
}

impl std::fmt::Debug for ImportExportJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let without_sas = |uri: &Option<String>| {
            uri.as_deref()
                .map(|u| u.split_once('?').map_or(u, |(base, _)| base).to_owned())
        };
        f.debug_struct("ImportExportJob")
            .field("job_id", &self.job_id)
            .field("job_type", &self.job_type)
            .field("status", &self.status)
            .field("progress", &self.progress)
            .field(
                "input_blob_container",
                &without_sas(&self.input_blob_container_uri),
            )
            .field(
                "output_blob_container",
                &without_sas(&self.output_blob_container_uri),
            )
            .field("failure_reason", &self.failure_reason)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_sdks_send_and_writes_the_hub_s_fields() {
        // azure-iothub (Node) `exportDevicesToBlob`'s body.
        let created: ImportExportJob = serde_json::from_str(
            r#"{"type":"export","outputBlobContainerUri":"http://h/c?sig=x","excludeKeysInExport":true}"#,
        )
        .expect("parses");
        assert_eq!(created.job_type, Some(ImportExportType::Export));
        assert_eq!(created.exclude_keys_in_export, Some(true));
        let answered = ImportExportJob {
            job_id: Some("j".into()),
            status: Some(ImportExportStatus::Running),
            progress: Some(40),
            ..created
        };
        let json = serde_json::to_value(&answered).expect("serializes");
        assert_eq!(json["jobId"], "j");
        assert_eq!(json["status"], "running");
        assert_eq!(json["type"], "export");
        assert_eq!(json["progress"], 40);
        assert!(
            !format!("{answered:?}").contains("sig=x"),
            "Debug leaves the SAS out"
        );
        assert!(ImportExportStatus::Cancelled.is_terminal());
        assert!(!ImportExportStatus::Enqueued.is_terminal());
    }
}
