//! What an import/export job does once created: an export writes every device (identity, keys
//! unless excluded, tags, desired and reported properties) as one JSON line to the output
//! container's blob; an import reads the input blob's lines and applies them 100 at a time
//! through the bulk registry (the same staging as `POST /devices`, so every import mode, etag
//! check and validation is the same), then writes the devices it could not apply to
//! `importErrors.log` in the output container. With `includeConfigurations`, an export also
//! writes every configuration (as `GET /configurations/{id}` answers it) as one JSON line of
//! `configurations.txt`, and an import applies that blob's lines after the devices, each with
//! IoT Hub's one configuration import mode, `createOrUpdateIfMatchETag`; the configurations it
//! cannot apply join the same error log.

use serde_json::Value;

use hub_core::bulk::{
    DeviceRegistryOperationError, ExportImportDevice, ImportMode, MAX_BULK_DEVICES,
};
use hub_core::configuration::Configuration;
use hub_core::import_export::{
    CONFIGURATION_IMPORT_MODE, DEFAULT_CONFIGURATIONS_BLOB, DEFAULT_DEVICES_BLOB,
    IMPORT_ERRORS_BLOB, ImportExportJob, ImportExportStatus, ImportExportType,
};

use super::blob::{BlobError, Container};
use super::{ImportExportError, ImportExportJobs, blob_name};
use crate::hub::OperationError;

/// Devices read from the registry per page of an export.
const EXPORT_PAGE: usize = 1000;
/// Most failures an import lists in its error log; past it, one last line says how many more
/// there were, so a blob of garbage cannot grow the hub's memory.
pub const MAX_LOGGED_ERRORS: usize = 10_000;

/// Why a job failed (its `failureReason`).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A blob could not be read or written.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The registry could not take a batch (the store failed).
    #[error("the hub could not apply devices: {0}")]
    Hub(#[from] OperationError),
}

/// A checked job request.
pub(super) enum Plan {
    Export {
        output: Container,
        blob: String,
        exclude_keys: bool,
        /// The configurations' blob, when `includeConfigurations` is true.
        configurations: Option<String>,
    },
    Import {
        input: Container,
        input_blob: String,
        output: Container,
        /// The configurations' blob, when `includeConfigurations` is true.
        configurations: Option<String>,
    },
}

impl Plan {
    /// Checks a `POST /jobs/create` body.
    pub(super) fn from_request(request: &ImportExportJob) -> Result<Plan, ImportExportError> {
        let invalid = |why: String| ImportExportError::Invalid(why);
        if request
            .storage_authentication_type
            .as_deref()
            .is_some_and(|t| !t.eq_ignore_ascii_case("keyBased"))
        {
            return Err(invalid(
                "storageAuthenticationType identityBased needs a managed identity, which \
                 hub-emulator does not have; give container SAS URIs (keyBased)"
                    .into(),
            ));
        }
        let container =
            |field: &'static str, uri: Option<&String>| -> Result<Container, ImportExportError> {
                let uri =
                    uri.ok_or_else(|| invalid(format!("{field} is required for this job type")))?;
                Container::parse(field, uri).map_err(|e| invalid(e.to_string()))
            };
        let name = |field: &str,
                    name: Option<&String>,
                    default: &str|
         -> Result<String, ImportExportError> {
            let name = blob_name(name, default);
            if name.starts_with('/') || name.contains(['?', '#']) || name.len() > 1024 {
                return Err(invalid(format!(
                    "{field} `{name}` is not a blob name (at most 1,024 characters, no leading /, no ? or #)"
                )));
            }
            Ok(name)
        };
        let configurations = if request.include_configurations == Some(true) {
            Some(name(
                "configurationsBlobName",
                request.configurations_blob_name.as_ref(),
                DEFAULT_CONFIGURATIONS_BLOB,
            )?)
        } else {
            None
        };
        match request.job_type {
            Some(ImportExportType::Export) => Ok(Plan::Export {
                output: container(
                    "outputBlobContainerUri",
                    request.output_blob_container_uri.as_ref(),
                )?,
                blob: name(
                    "outputBlobName",
                    request.output_blob_name.as_ref(),
                    DEFAULT_DEVICES_BLOB,
                )?,
                exclude_keys: request.exclude_keys_in_export.unwrap_or(false),
                configurations,
            }),
            Some(ImportExportType::Import) => Ok(Plan::Import {
                input: container(
                    "inputBlobContainerUri",
                    request.input_blob_container_uri.as_ref(),
                )?,
                input_blob: name(
                    "inputBlobName",
                    request.input_blob_name.as_ref(),
                    DEFAULT_DEVICES_BLOB,
                )?,
                output: container(
                    "outputBlobContainerUri",
                    request.output_blob_container_uri.as_ref(),
                )?,
                configurations,
            }),
            None => Err(invalid("type is required: export or import".into())),
        }
    }

    pub(super) fn input_blob_name(&self) -> Option<String> {
        match self {
            Plan::Import { input_blob, .. } => Some(input_blob.clone()),
            Plan::Export { .. } => None,
        }
    }

    pub(super) fn output_blob_name(&self) -> Option<String> {
        match self {
            Plan::Export { blob, .. } => Some(blob.clone()),
            Plan::Import { .. } => None,
        }
    }

    /// The configurations' blob, when the job includes them.
    pub(super) fn configurations_blob_name(&self) -> Option<String> {
        match self {
            Plan::Export { configurations, .. } | Plan::Import { configurations, .. } => {
                configurations.clone()
            }
        }
    }

    pub(super) async fn run(
        &self,
        jobs: &ImportExportJobs,
        job_id: &str,
        max_configurations: usize,
    ) -> Result<(), RunError> {
        jobs.update(job_id, ImportExportStatus::Running, 0);
        match self {
            Plan::Export {
                output,
                blob,
                exclude_keys,
                configurations,
            } => {
                export(jobs, job_id, output, blob, *exclude_keys).await?;
                if let Some(name) = configurations {
                    export_configurations(jobs, output, name).await?;
                }
                Ok(())
            }
            Plan::Import {
                input,
                input_blob,
                output,
                configurations,
            } => {
                let configurations = configurations
                    .as_deref()
                    .map(|name| (name, max_configurations));
                import(jobs, input, input_blob, output, configurations).await
            }
        }
    }
}

async fn export(
    jobs: &ImportExportJobs,
    job_id: &str,
    output: &Container,
    blob: &str,
    exclude_keys: bool,
) -> Result<(), RunError> {
    let total = jobs.hub.device_count().max(1);
    let mut body = Vec::new();
    let mut after: Option<String> = None;
    let mut written = 0usize;
    loop {
        let page = jobs
            .hub
            .export_page(after.as_deref(), EXPORT_PAGE, exclude_keys);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for line in &page {
            // A line is a hub-core wire type the hub built: it always serializes.
            if let Ok(text) = serde_json::to_vec(line) {
                body.extend_from_slice(&text);
                body.push(b'\n');
            }
        }
        written += page.len();
        // Reading the registry is the first 90%; writing the blob the rest.
        let progress = u32::try_from(written * 90 / total).unwrap_or(90);
        jobs.update(job_id, ImportExportStatus::Running, progress);
        tokio::task::yield_now().await;
    }
    output.put(&jobs.client, blob, body).await?;
    Ok(())
}

/// Every configuration, one JSON line each, as `GET /configurations/{id}` answers it (metrics
/// counted now), so a line imports back as it is.
async fn export_configurations(
    jobs: &ImportExportJobs,
    output: &Container,
    blob: &str,
) -> Result<(), RunError> {
    let mut body = Vec::new();
    for configuration in jobs.hub.list_configurations(usize::MAX) {
        // A hub-core wire type the hub built: it always serializes.
        if let Ok(text) = serde_json::to_vec(&configuration) {
            body.extend_from_slice(&text);
            body.push(b'\n');
        }
    }
    output.put(&jobs.client, blob, body).await?;
    Ok(())
}

/// `configurations`: the configurations' blob and the tier's count, when the job includes them.
async fn import(
    jobs: &ImportExportJobs,
    input: &Container,
    input_blob: &str,
    output: &Container,
    configurations: Option<(&str, usize)>,
) -> Result<(), RunError> {
    let mut lines = input.lines(&jobs.client, input_blob).await?;
    let mut batch: Vec<ExportImportDevice> = Vec::with_capacity(MAX_BULK_DEVICES);
    let mut errors = ErrorLog::default();
    while let Some((number, line)) = lines.next().await? {
        let device = match import_line(&line) {
            Ok(device) => device,
            Err(why) => {
                errors.push(DeviceRegistryOperationError {
                    device_id: String::new(),
                    error_code: "ArgumentInvalid".into(),
                    error_status: format!("line {number} of {input_blob}: {why}"),
                    ..DeviceRegistryOperationError::default()
                });
                continue;
            }
        };
        if device.module_id.as_deref().is_some_and(|m| !m.is_empty()) {
            // A module line applies after the devices before it (its device may be among them).
            if !batch.is_empty() {
                errors.extend(jobs.hub.bulk_registry(&batch).await?);
                batch.clear();
            }
            if let Err(error) = import_module(jobs, &device).await {
                errors.push(error);
            }
            continue;
        }
        // One bulk call names a device once: a repeated id starts the next call, so the
        // file's later line wins, as applying the lines in order would.
        if batch.len() == MAX_BULK_DEVICES || batch.iter().any(|d| d.id == device.id) {
            errors.extend(jobs.hub.bulk_registry(&batch).await?);
            batch.clear();
        }
        batch.push(device);
    }
    if !batch.is_empty() {
        errors.extend(jobs.hub.bulk_registry(&batch).await?);
    }
    // After the devices, so target conditions see the tags the import just set.
    if let Some((blob, max)) = configurations {
        let mut lines = input.lines(&jobs.client, blob).await?;
        while let Some((number, line)) = lines.next().await? {
            if let Err((id, error)) = import_configuration(jobs, &line, max).await {
                errors.push(DeviceRegistryOperationError {
                    device_id: String::new(),
                    error_code: error.code().name().to_owned(),
                    error_status: format!("line {number} of {blob}: configuration {id}: {error}"),
                    ..DeviceRegistryOperationError::default()
                });
            }
        }
    }
    let mut log = Vec::new();
    if errors.dropped > 0 {
        errors.kept.push(DeviceRegistryOperationError {
            device_id: String::new(),
            error_code: "ArgumentInvalid".into(),
            error_status: format!(
                "{} more lines failed; only the first {MAX_LOGGED_ERRORS} are listed",
                errors.dropped
            ),
            ..DeviceRegistryOperationError::default()
        });
    }
    for error in &errors.kept {
        if let Ok(text) = serde_json::to_vec(error) {
            log.extend_from_slice(&text);
            log.push(b'\n');
        }
    }
    output.put(&jobs.client, IMPORT_ERRORS_BLOB, log).await?;
    Ok(())
}

/// Applies a module line: its identity (created, or updated keeping what the line leaves out)
/// and its twin's tags and desired properties. Only `createOrUpdate` and `delete` apply to
/// modules here; the other modes are refused for the line.
async fn import_module(
    jobs: &ImportExportJobs,
    line: &ExportImportDevice,
) -> Result<(), DeviceRegistryOperationError> {
    let module_id = line.module_id.clone().unwrap_or_default();
    let failed = |error: OperationError| DeviceRegistryOperationError {
        device_id: line.id.clone(),
        error_code: error.code().name().to_owned(),
        error_status: error.to_string(),
        module_id: Some(module_id.clone()),
        operation: None,
    };
    match line.import_mode {
        Some(ImportMode::Delete) => {
            return jobs
                .hub
                .delete_module(&line.id, &module_id, Some("*"))
                .await
                .map_err(failed);
        }
        Some(ImportMode::CreateOrUpdate) | None => {}
        Some(other) => {
            return Err(failed(OperationError::InvalidArgument(format!(
                "importMode {other:?} is not served for module lines; use createOrUpdate or delete"
            ))));
        }
    }
    let mut body = serde_json::json!({"moduleId": module_id, "deviceId": line.id});
    if let Some(authentication) = &line.authentication
        && let Ok(value) = serde_json::to_value(authentication)
    {
        body["authentication"] = value;
    }
    let exists = jobs.hub.module_exists(&line.id, &module_id);
    jobs.hub
        .create_or_update_module(&line.id, &module_id, &body, exists.then_some("*"))
        .await
        .map_err(failed)?;
    let mut twin = serde_json::Map::new();
    if let Some(tags) = &line.tags {
        twin.insert("tags".into(), Value::Object(tags.clone()));
    }
    if let Some(desired) = line.properties.as_ref().and_then(|p| p.desired.as_ref())
        && let Ok(desired) = serde_json::to_value(desired)
    {
        twin.insert("properties".into(), serde_json::json!({"desired": desired}));
    }
    if !twin.is_empty() {
        jobs.hub
            .update_module_twin(&line.id, &module_id, &Value::Object(twin), Some("*"), false)
            .await
            .map_err(failed)?;
    }
    Ok(())
}

/// Applies one line of an import's configurations blob with `createOrUpdateIfMatchETag`: a
/// configuration missing from the hub is created; an existing one is overwritten only when the
/// line's etag matches the hub's (or is `*`), and then, as `PUT` with `If-Match`, only in what
/// IoT Hub lets change (its content never does). Fails with the line's id and why.
async fn import_configuration(
    jobs: &ImportExportJobs,
    line: &[u8],
    max: usize,
) -> Result<(), (String, OperationError)> {
    let configuration = configuration_line(line).map_err(|why| {
        (
            "(unreadable)".to_owned(),
            OperationError::InvalidArgument(why),
        )
    })?;
    let id = configuration.id.clone();
    let failed = |error| (id.clone(), error);
    let if_match = if jobs.hub.configuration_exists(&id) {
        let Some(etag) = configuration.etag.clone().filter(|e| !e.is_empty()) else {
            return Err(failed(OperationError::InvalidArgument(format!(
                "configuration {id} already exists and the line gives no etag; \
                 createOrUpdateIfMatchETag overwrites only on a matching etag (or *)"
            ))));
        };
        Some(etag)
    } else {
        None
    };
    jobs.hub
        .put_configuration(&id, configuration, if_match.as_deref(), max)
        .await
        .map(|_| ())
        .map_err(failed)
}

/// One line of a configurations blob: a configuration document with an optional `importMode`,
/// which can only be [`CONFIGURATION_IMPORT_MODE`].
fn configuration_line(line: &[u8]) -> Result<Configuration, String> {
    let mut value: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Some(object) = value.as_object_mut() else {
        return Err("not a configuration: a line is one JSON object".into());
    };
    match object.remove("importMode") {
        None | Some(Value::Null) => {}
        Some(Value::String(mode)) if mode.eq_ignore_ascii_case(CONFIGURATION_IMPORT_MODE) => {}
        Some(other) => {
            return Err(format!(
                "importMode {other} is not a configuration import mode; the only one is \
                 {CONFIGURATION_IMPORT_MODE}"
            ));
        }
    }
    let configuration: Configuration =
        serde_json::from_value(value).map_err(|e| format!("not a configuration: {e}"))?;
    if configuration.id.is_empty() {
        return Err("its id is empty".into());
    }
    Ok(configuration)
}

/// An import's failures: the first [`MAX_LOGGED_ERRORS`], and how many more.
#[derive(Default)]
struct ErrorLog {
    kept: Vec<DeviceRegistryOperationError>,
    dropped: usize,
}

impl ErrorLog {
    fn push(&mut self, error: DeviceRegistryOperationError) {
        if self.kept.len() < MAX_LOGGED_ERRORS {
            self.kept.push(error);
        } else {
            self.dropped += 1;
        }
    }

    fn extend(&mut self, errors: Vec<DeviceRegistryOperationError>) {
        for error in errors {
            self.push(error);
        }
    }
}

/// One import line as a bulk entry: `importMode` defaults to `createOrUpdate` ("If the
/// serialization data doesn't explicitly define an importMode flag for a device, it defaults to
/// createOrUpdate", Microsoft Learn, "Import and export IoT Hub device identities in bulk").
/// The twin's `$metadata` and `$version` are the hub's to keep, so an exported file imports
/// back; reported properties are the device's and are not imported (the bulk registry ignores
/// them, as `PUT /devices` does).
fn import_line(line: &[u8]) -> Result<ExportImportDevice, String> {
    let mut value: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(desired) = value
        .pointer_mut("/properties/desired")
        .and_then(Value::as_object_mut)
    {
        desired.retain(|key, _| !key.starts_with('$'));
    }
    if let Some(properties) = value.get_mut("properties").and_then(Value::as_object_mut) {
        properties.remove("reported");
    }
    let mut device: ExportImportDevice =
        serde_json::from_value(value).map_err(|e| format!("not an ExportImportDevice: {e}"))?;
    if device.id.is_empty() {
        return Err("its id is empty".into());
    }
    device.import_mode.get_or_insert(ImportMode::CreateOrUpdate);
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exported_line_imports_with_create_or_update_and_without_hub_fields() {
        let device = import_line(
            br#"{"id":"d1","eTag":"MQ==","status":"enabled","twinETag":"AAAA","tags":{"a":1},
                "properties":{"desired":{"x":1,"$version":3,"$metadata":{}},"reported":{"y":2}}}"#,
        )
        .expect("a device");
        assert_eq!(device.import_mode, Some(ImportMode::CreateOrUpdate));
        let properties = serde_json::to_value(device.properties).expect("json");
        assert_eq!(properties, serde_json::json!({"desired": {"x": 1}}));
        assert!(import_line(b"{not json").is_err());
        assert!(import_line(br#"{"id":""}"#).is_err());
        let kept = import_line(br#"{"id":"d2","importMode":"delete"}"#).expect("a device");
        assert_eq!(kept.import_mode, Some(ImportMode::Delete));
    }

    #[test]
    fn requests_are_checked_before_a_job_is_made() {
        let request = |json: &str| -> ImportExportJob { serde_json::from_str(json).expect("json") };
        let refused = |json: &str| match Plan::from_request(&request(json)) {
            Err(ImportExportError::Invalid(why)) => why,
            _ => panic!("{json} should be refused"),
        };
        assert!(refused(r#"{"outputBlobContainerUri":"http://h/c?s=1"}"#).contains("type"));
        assert!(refused(r#"{"type":"export"}"#).contains("outputBlobContainerUri"));
        assert!(
            refused(r#"{"type":"import","outputBlobContainerUri":"http://h/c?s=1"}"#)
                .contains("inputBlobContainerUri")
        );
        assert!(refused(r#"{"type":"export","outputBlobContainerUri":"http://h/c","storageAuthenticationType":"identityBased"}"#)
            .contains("SAS"));
        assert!(
            refused(
                r#"{"type":"export","outputBlobContainerUri":"http://h/c","outputBlobName":"a?b"}"#
            )
            .contains("outputBlobName")
        );
        let plan = Plan::from_request(&request(
            r#"{"type":"export","outputBlobContainerUri":"http://h/c?s=1"}"#,
        ))
        .expect("an export");
        assert_eq!(plan.output_blob_name().as_deref(), Some("devices.txt"));
        assert_eq!(plan.configurations_blob_name(), None);
        let with = |json: &str| Plan::from_request(&request(json)).expect("a plan");
        assert_eq!(
            with(r#"{"type":"export","outputBlobContainerUri":"http://h/c?s=1","includeConfigurations":true}"#)
                .configurations_blob_name()
                .as_deref(),
            Some("configurations.txt")
        );
        assert_eq!(
            with(r#"{"type":"import","inputBlobContainerUri":"http://h/i?s=1","outputBlobContainerUri":"http://h/c?s=1","includeConfigurations":true,"configurationsBlobName":"c.jsonl"}"#)
                .configurations_blob_name()
                .as_deref(),
            Some("c.jsonl")
        );
        assert_eq!(
            with(r#"{"type":"export","outputBlobContainerUri":"http://h/c?s=1","includeConfigurations":false,"configurationsBlobName":"c.jsonl"}"#)
                .configurations_blob_name(),
            None,
            "a name without includeConfigurations exports none"
        );
        assert!(
            refused(r#"{"type":"export","outputBlobContainerUri":"http://h/c?s=1","includeConfigurations":true,"configurationsBlobName":"/c"}"#)
                .contains("configurationsBlobName")
        );
    }

    #[test]
    fn a_configuration_line_takes_its_one_import_mode_and_refuses_others() {
        let line = configuration_line(
            br#"{"id":"fw","importMode":"createOrUpdateIfMatchETag","etag":"MQ==","priority":3,
                "content":{"deviceContent":{"properties.desired.fw":{"v":1}}},
                "systemMetrics":{"results":{"appliedCount":2}}}"#,
        )
        .expect("a configuration");
        assert_eq!(line.id, "fw");
        assert_eq!(line.priority, Some(3));
        assert_eq!(line.etag.as_deref(), Some("MQ=="));
        assert!(
            configuration_line(br#"{"id":"fw"}"#).is_ok(),
            "the mode may be left out"
        );
        let mode =
            configuration_line(br#"{"id":"fw","importMode":"delete"}"#).expect_err("refused");
        assert!(mode.contains("createOrUpdateIfMatchETag"), "{mode}");
        assert!(configuration_line(br#"{"id":""}"#).is_err());
        assert!(configuration_line(b"[1]").is_err());
        assert!(configuration_line(b"{nope").is_err());
    }
}
