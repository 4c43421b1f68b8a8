//! Scheduled jobs v2 (`/jobs/v2/...`, reference §4.6) and device-level job rows from
//! `SELECT * FROM devices.jobs` (§4.7).
//!
//! Job `status` says `cancelled`, device-job `status` says `canceled`: both as the service spells
//! them. Status and type enums are open (`Other(String)`) so newer service values still parse.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::device::{open_wire_enum, present};
use crate::method::{CloudToDeviceMethod, CloudToDeviceMethodResult};
use crate::twin::TwinPatch;

/// `queryCondition` that targets every device.
pub const ALL_DEVICES_CONDITION: &str = "*";

open_wire_enum! {
    /// `type` of a job (`jobType` of a device job). Only the two `Schedule*` values are used
    /// with jobs v2; the rest are the swagger's list.
    pub enum JobType {
        /// `unknown`.
        Unknown => "unknown",
        /// `export` (import/export jobs).
        Export => "export",
        /// `import` (import/export jobs).
        Import => "import",
        /// `backup`.
        Backup => "backup",
        /// `readDeviceProperties`.
        ReadDeviceProperties => "readDeviceProperties",
        /// `writeDeviceProperties`.
        WriteDeviceProperties => "writeDeviceProperties",
        /// `updateDeviceConfiguration`.
        UpdateDeviceConfiguration => "updateDeviceConfiguration",
        /// `rebootDevice`.
        RebootDevice => "rebootDevice",
        /// `factoryResetDevice`.
        FactoryResetDevice => "factoryResetDevice",
        /// `firmwareUpdate`.
        FirmwareUpdate => "firmwareUpdate",
        /// `scheduleDeviceMethod`: invoke a direct method on every matching device.
        ScheduleDeviceMethod => "scheduleDeviceMethod",
        /// `scheduleUpdateTwin`: apply a twin patch to every matching device.
        ScheduleUpdateTwin => "scheduleUpdateTwin",
        /// `restoreFromBackup`.
        RestoreFromBackup => "restoreFromBackup",
        /// `failoverDataCopy`.
        FailoverDataCopy => "failoverDataCopy",
    }
}

open_wire_enum! {
    /// `status` of a job (`JobResponse`). Note `cancelled` with a double "l".
    pub enum JobStatus {
        /// `unknown`.
        Unknown => "unknown",
        /// `enqueued`.
        Enqueued => "enqueued",
        /// `running`.
        Running => "running",
        /// `completed`.
        Completed => "completed",
        /// `failed`.
        Failed => "failed",
        /// `cancelled` (double "l", unlike [`DeviceJobStatus::Canceled`]).
        Cancelled => "cancelled",
        /// `scheduled`: start time in the future.
        Scheduled => "scheduled",
        /// `queued`: accepted, about to run.
        Queued => "queued",
    }
}

impl JobStatus {
    /// True for `completed`, `failed` and `cancelled`: the job will not change any more.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

open_wire_enum! {
    /// `status` of one device's part in a job. Note `canceled` with a single "l".
    pub enum DeviceJobStatus {
        /// `pending`.
        Pending => "pending",
        /// `scheduled`.
        Scheduled => "scheduled",
        /// `running`.
        Running => "running",
        /// `completed`.
        Completed => "completed",
        /// `failed`.
        Failed => "failed",
        /// `canceled` (single "l", unlike [`JobStatus::Cancelled`]).
        Canceled => "canceled",
    }
}

impl DeviceJobStatus {
    /// True for `completed`, `failed` and `canceled`.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }
}

/// Body of `PUT /jobs/v2/{jobId}` (swagger `JobRequest`). Unknown keys are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRequest {
    /// `jobId` (SDKs send it; the path carries it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `type` (required).
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// `cloudToDeviceMethod`, for `scheduleDeviceMethod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<CloudToDeviceMethod>,
    /// `updateTwin`, for `scheduleUpdateTwin` (`etag`, `tags`, `properties.desired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<TwinPatch>,
    /// `queryCondition`: the WHERE part only, or `*` for all devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_condition: Option<String>,
    /// `startTime`, verbatim (ISO 8601, any fraction digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// `maxExecutionTimeInSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_execution_time_in_seconds: Option<u64>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl JobRequest {
    /// A `scheduleDeviceMethod` request.
    pub fn schedule_device_method(
        job_id: impl Into<String>,
        query_condition: impl Into<String>,
        method: CloudToDeviceMethod,
        start_time: impl Into<String>,
        max_execution_time_in_seconds: u64,
    ) -> Self {
        Self {
            job_id: Some(job_id.into()),
            job_type: JobType::ScheduleDeviceMethod,
            cloud_to_device_method: Some(method),
            update_twin: None,
            query_condition: Some(query_condition.into()),
            start_time: Some(start_time.into()),
            max_execution_time_in_seconds: Some(max_execution_time_in_seconds),
            extra: Map::new(),
        }
    }

    /// A `scheduleUpdateTwin` request; `patch.etag` defaults to `"*"` as the service requires one.
    pub fn schedule_update_twin(
        job_id: impl Into<String>,
        query_condition: impl Into<String>,
        mut patch: TwinPatch,
        start_time: impl Into<String>,
        max_execution_time_in_seconds: u64,
    ) -> Self {
        patch.etag.get_or_insert_with(|| "*".to_owned());
        Self {
            job_id: Some(job_id.into()),
            job_type: JobType::ScheduleUpdateTwin,
            cloud_to_device_method: None,
            update_twin: Some(patch),
            query_condition: Some(query_condition.into()),
            start_time: Some(start_time.into()),
            max_execution_time_in_seconds: Some(max_execution_time_in_seconds),
            extra: Map::new(),
        }
    }
}

/// A job as `GET`/`PUT`/`cancel`/query of `/jobs/v2` return it (swagger `JobResponse`).
///
/// Everything but `jobId` is optional: the live PUT answer can be as small as
/// `{"jobId":..,"type":..,"status":"queued"}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResponse {
    /// `jobId`.
    pub job_id: String,
    /// `queryCondition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_condition: Option<String>,
    /// `createdTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_time: Option<String>,
    /// `startTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// `endTime`, verbatim (meaningful once terminal); `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub end_time: Option<Option<String>>,
    /// `maxExecutionTimeInSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_execution_time_in_seconds: Option<u64>,
    /// `type`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub job_type: Option<JobType>,
    /// `cloudToDeviceMethod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<CloudToDeviceMethod>,
    /// `updateTwin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<TwinPatch>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
    /// `failureReason`; `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub failure_reason: Option<Option<String>>,
    /// `statusMessage`; `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub status_message: Option<Option<String>>,
    /// `deviceJobStatistics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_job_statistics: Option<DeviceJobStatistics>,
    /// Keys this crate does not model (C# also knows `deviceId`, `parentJobId`).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl JobResponse {
    /// True once `status` is `completed`, `failed` or `cancelled`.
    pub fn is_terminal(&self) -> bool {
        self.status.as_ref().is_some_and(JobStatus::is_terminal)
    }

    /// `endTime` flattened: `None` when absent or `null`.
    pub fn end_time(&self) -> Option<&str> {
        self.end_time.as_ref().and_then(Option::as_deref)
    }

    /// `failureReason` flattened: `None` when absent or `null`.
    pub fn failure_reason(&self) -> Option<&str> {
        self.failure_reason.as_ref().and_then(Option::as_deref)
    }

    /// `statusMessage` flattened: `None` when absent or `null`.
    pub fn status_message(&self) -> Option<&str> {
        self.status_message.as_ref().and_then(Option::as_deref)
    }
}

/// `deviceJobStatistics` of a job. Missing counters read as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJobStatistics {
    /// `deviceCount`: devices the query condition matched.
    #[serde(default)]
    pub device_count: u64,
    /// `failedCount`.
    #[serde(default)]
    pub failed_count: u64,
    /// `succeededCount`.
    #[serde(default)]
    pub succeeded_count: u64,
    /// `runningCount`.
    #[serde(default)]
    pub running_count: u64,
    /// `pendingCount`.
    #[serde(default)]
    pub pending_count: u64,
}

/// One device's row of a job, from `SELECT * FROM devices.jobs` (`x-ms-item-type: DeviceJob`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJob {
    /// `deviceId`.
    pub device_id: String,
    /// `jobId`.
    pub job_id: String,
    /// `jobType`: `scheduleDeviceMethod` or `scheduleUpdateTwin`.
    pub job_type: JobType,
    /// `status`.
    pub status: DeviceJobStatus,
    /// `startTimeUtc`, verbatim (the service may omit the `Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_utc: Option<String>,
    /// `endTimeUtc`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time_utc: Option<String>,
    /// `createdDateTimeUtc`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    /// `lastUpdatedDateTimeUtc`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    /// `outcome`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<DeviceJobOutcome>,
    /// `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<DeviceJobError>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl DeviceJob {
    /// `outcome.deviceMethodResponse`, when present and not `null`.
    pub fn method_response(&self) -> Option<&CloudToDeviceMethodResult> {
        self.outcome
            .as_ref()
            .and_then(|o| o.device_method_response.as_ref())
            .and_then(Option::as_ref)
    }
}

/// `outcome` of a device job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJobOutcome {
    /// `deviceMethodResponse`: `Some(None)` = `null` (twin jobs).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub device_method_response: Option<Option<CloudToDeviceMethodResult>>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl DeviceJobOutcome {
    /// The outcome of a method the device answered: `{"deviceMethodResponse": result}`.
    pub fn method_response(result: CloudToDeviceMethodResult) -> Self {
        Self {
            device_method_response: Some(Some(result)),
            extra: Map::new(),
        }
    }
}

/// `error` of a device job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJobError {
    /// `code` (an error code name, as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl DeviceJobError {
    /// An error with both `code` and `description` set.
    pub fn new(code: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            code: Some(code.into()),
            description: Some(description.into()),
            extra: Map::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Reference §4.6, method job request.
    const METHOD_JOB: &str = r#"{
      "jobId": "job-m",
      "type": "scheduleDeviceMethod",
      "cloudToDeviceMethod": {"methodName": "reboot", "payload": {"delay": 5},
                              "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 10},
      "queryCondition": "deviceId IN ['dev1', 'dev2']",
      "startTime": "2030-01-02T03:04:05.000Z",
      "maxExecutionTimeInSeconds": 3600
    }"#;

    /// Reference §4.6, twin job request.
    const TWIN_JOB: &str = r#"{
      "jobId": "job-t",
      "type": "scheduleUpdateTwin",
      "updateTwin": {"etag": "*", "tags": {"building": "43"},
                     "properties": {"desired": {"telemetryInterval": 60}}},
      "queryCondition": "tags.building = '43'",
      "startTime": "2030-01-02T03:04:05.000Z",
      "maxExecutionTimeInSeconds": 600
    }"#;

    /// Reference §7.5, Python twin job body (naive datetime, microseconds).
    const PY_TWIN_JOB: &str = r#"{"jobId": "job-t", "type": "scheduleUpdateTwin", "updateTwin": {"tags": {"building": "43"}, "properties": {"desired": {"telemetryInterval": 60}}, "etag": "*"}, "queryCondition": "tags.building = '43'", "startTime": "2026-11-28T08:09:41.224459Z", "maxExecutionTimeInSeconds": 600}"#;

    /// Reference §4.7, device job row.
    const DEVICE_JOB: &str = r#"{
      "deviceId": "myDeviceId",
      "jobId": "myJobId",
      "jobType": "scheduleDeviceMethod",
      "status": "completed",
      "startTimeUtc": "2016-09-29T18:18:52.7418462",
      "endTimeUtc": "2016-09-29T18:20:52.7418462",
      "createdDateTimeUtc": "2016-09-29T18:18:56.7787107Z",
      "lastUpdatedDateTimeUtc": "2016-09-29T18:18:56.8894408Z",
      "outcome": {"deviceMethodResponse": {"status": 200, "payload": {"result": "ok"}}},
      "error": {"code": "...", "description": "..."}
    }"#;

    /// A full JobResponse with every modelled field (§4.6 field list).
    const FULL_RESPONSE: &str = r#"{
      "jobId": "job-m", "queryCondition": "deviceId IN ['dev1', 'dev2']",
      "createdTime": "2030-01-02T03:04:00.123Z", "startTime": "2030-01-02T03:04:05.000Z",
      "endTime": "2030-01-02T03:04:09.5Z", "maxExecutionTimeInSeconds": 3600,
      "type": "scheduleDeviceMethod",
      "cloudToDeviceMethod": {"methodName": "reboot", "payload": {"delay": 5},
                              "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 10},
      "status": "completed", "failureReason": null, "statusMessage": "",
      "deviceJobStatistics": {"deviceCount": 2, "failedCount": 0, "succeededCount": 2,
                              "runningCount": 0, "pendingCount": 0},
      "parentJobId": null
    }"#;

    fn round_trip<T>(text: &str) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let original: Value = serde_json::from_str(text).unwrap();
        let parsed: T = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), original, "{text}");
        parsed
    }

    #[test]
    fn method_job_request_round_trips() {
        let r: JobRequest = round_trip(METHOD_JOB);
        assert_eq!(r.job_type, JobType::ScheduleDeviceMethod);
        assert_eq!(r.job_id.as_deref(), Some("job-m"));
        let m = r.cloud_to_device_method.as_ref().unwrap();
        assert_eq!(m.method_name, "reboot");
        assert_eq!(r.max_execution_time_in_seconds, Some(3600));
        assert_eq!(r.start_time.as_deref(), Some("2030-01-02T03:04:05.000Z"));
    }

    #[test]
    fn twin_job_requests_round_trip() {
        for text in [TWIN_JOB, PY_TWIN_JOB] {
            let r: JobRequest = round_trip(text);
            assert_eq!(r.job_type, JobType::ScheduleUpdateTwin);
            let patch = r.update_twin.as_ref().unwrap();
            assert_eq!(patch.etag.as_deref(), Some("*"));
            assert_eq!(
                patch.desired().unwrap().get("telemetryInterval"),
                Some(&json!(60))
            );
        }
        let r: JobRequest = serde_json::from_str(PY_TWIN_JOB).unwrap();
        // Timestamps are kept exactly as sent.
        assert_eq!(r.start_time.as_deref(), Some("2026-11-28T08:09:41.224459Z"));
    }

    #[test]
    fn constructors_match_the_captures() {
        let method = CloudToDeviceMethod::new("reboot")
            .with_payload(json!({"delay": 5}))
            .with_timeouts(30, 10);
        let r = JobRequest::schedule_device_method(
            "job-m",
            "deviceId IN ['dev1', 'dev2']",
            method,
            "2030-01-02T03:04:05.000Z",
            3600,
        );
        let expected: Value = serde_json::from_str(METHOD_JOB).unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap(), expected);

        let mut tags = Map::new();
        tags.insert("building".into(), json!("43"));
        let mut desired = Map::new();
        desired.insert("telemetryInterval".into(), json!(60));
        let patch = TwinPatch::new().with_tags(tags).with_desired(desired);
        let r = JobRequest::schedule_update_twin(
            "job-t",
            "tags.building = '43'",
            patch,
            "2030-01-02T03:04:05.000Z",
            600,
        );
        let expected: Value = serde_json::from_str(TWIN_JOB).unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap(), expected);
    }

    #[test]
    fn job_responses_round_trip() {
        let minimal: JobResponse =
            round_trip(r#"{"jobId":"job01","type":"scheduleDeviceMethod","status":"queued"}"#);
        assert_eq!(minimal.status, Some(JobStatus::Queued));
        assert!(!minimal.is_terminal());
        assert_eq!(minimal.end_time(), None);

        let full: JobResponse = round_trip(FULL_RESPONSE);
        assert!(full.is_terminal());
        assert_eq!(full.end_time(), Some("2030-01-02T03:04:09.5Z"));
        assert_eq!(full.failure_reason, Some(None));
        assert_eq!(full.status_message(), Some(""));
        let stats = full.device_job_statistics.unwrap();
        assert_eq!((stats.device_count, stats.succeeded_count), (2, 2));
        assert_eq!(full.extra.get("parentJobId"), Some(&Value::Null));

        let twin: JobResponse = round_trip(
            r#"{"jobId":"job-t","type":"scheduleUpdateTwin","updateTwin":{"etag":"*","properties":{"desired":{"x":null}}},"status":"cancelled","endTime":null}"#,
        );
        assert_eq!(twin.status, Some(JobStatus::Cancelled));
        assert_eq!(twin.end_time, Some(None));
    }

    #[test]
    fn job_query_array_round_trips() {
        let text = format!(
            "[{FULL_RESPONSE}, {}]",
            r#"{"jobId":"job01","type":"scheduleDeviceMethod","status":"running"}"#
        );
        let jobs: Vec<JobResponse> = round_trip(&text);
        assert_eq!(jobs.len(), 2);
    }

    #[test]
    fn device_job_round_trips() {
        let d: DeviceJob = round_trip(DEVICE_JOB);
        assert_eq!(d.status, DeviceJobStatus::Completed);
        assert_eq!(d.job_type, JobType::ScheduleDeviceMethod);
        assert_eq!(d.method_response().unwrap().status, 200);
        assert_eq!(
            d.start_time_utc.as_deref(),
            Some("2016-09-29T18:18:52.7418462")
        );
        assert_eq!(d.error.as_ref().unwrap().code.as_deref(), Some("..."));

        let twin_row: DeviceJob = round_trip(
            r#"{"deviceId":"d","jobId":"j","jobType":"scheduleUpdateTwin","status":"canceled","outcome":{"deviceMethodResponse":null}}"#,
        );
        assert_eq!(twin_row.status, DeviceJobStatus::Canceled);
        assert!(twin_row.method_response().is_none());
        assert_eq!(
            twin_row.outcome.as_ref().unwrap().device_method_response,
            Some(None)
        );
    }

    #[test]
    fn device_job_constructors_match_the_wire() {
        let outcome = DeviceJobOutcome::method_response(CloudToDeviceMethodResult {
            status: 200,
            payload: json!({"result": "ok"}),
        });
        assert_eq!(
            serde_json::to_value(&outcome).unwrap(),
            json!({"deviceMethodResponse": {"status": 200, "payload": {"result": "ok"}}})
        );
        assert_eq!(
            serde_json::to_value(DeviceJobError::new("DeviceNotOnline", "gone")).unwrap(),
            json!({"code": "DeviceNotOnline", "description": "gone"})
        );
    }

    #[test]
    fn cancelled_versus_canceled() {
        assert_eq!(
            serde_json::to_value(JobStatus::Cancelled).unwrap(),
            json!("cancelled")
        );
        assert_eq!(
            serde_json::to_value(DeviceJobStatus::Canceled).unwrap(),
            json!("canceled")
        );
        let s: JobStatus = serde_json::from_value(json!("cancelled")).unwrap();
        assert_eq!(s, JobStatus::Cancelled);
        // The other spelling is not silently mapped: it is kept as an unknown value.
        let s: JobStatus = serde_json::from_value(json!("canceled")).unwrap();
        assert_eq!(s, JobStatus::Other("canceled".into()));
        assert!(!s.is_known() && !s.is_terminal());
        let d: DeviceJobStatus = serde_json::from_value(json!("cancelled")).unwrap();
        assert_eq!(d, DeviceJobStatus::Other("cancelled".into()));
        assert!(DeviceJobStatus::Canceled.is_terminal());
    }

    #[test]
    fn status_spellings() {
        let job: Vec<&str> = JobStatus::KNOWN.iter().map(JobStatus::as_str).collect();
        assert_eq!(
            job,
            [
                "unknown",
                "enqueued",
                "running",
                "completed",
                "failed",
                "cancelled",
                "scheduled",
                "queued"
            ]
        );
        let dev: Vec<&str> = DeviceJobStatus::KNOWN
            .iter()
            .map(DeviceJobStatus::as_str)
            .collect();
        assert_eq!(
            dev,
            [
                "pending",
                "scheduled",
                "running",
                "completed",
                "failed",
                "canceled"
            ]
        );
        for s in JobStatus::KNOWN
            .iter()
            .chain([&JobStatus::Other("x".into())])
        {
            let back: JobStatus = serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap();
            assert_eq!(&back, s);
            assert_eq!(s.to_string().parse::<JobStatus>().unwrap(), *s);
        }
    }

    #[test]
    fn job_type_spellings_and_unknown_values() {
        let all: Vec<&str> = JobType::KNOWN.iter().map(JobType::as_str).collect();
        assert_eq!(
            all,
            [
                "unknown",
                "export",
                "import",
                "backup",
                "readDeviceProperties",
                "writeDeviceProperties",
                "updateDeviceConfiguration",
                "rebootDevice",
                "factoryResetDevice",
                "firmwareUpdate",
                "scheduleDeviceMethod",
                "scheduleUpdateTwin",
                "restoreFromBackup",
                "failoverDataCopy"
            ]
        );
        for t in JobType::KNOWN {
            assert_eq!(JobType::from_wire(t.as_str()), *t);
        }
        let r: JobRequest =
            round_trip(r#"{"jobId":"j","type":"someFutureJob","queryCondition":"*"}"#);
        assert_eq!(r.job_type, JobType::Other("someFutureJob".into()));
        assert_eq!(r.query_condition.as_deref(), Some(ALL_DEVICES_CONDITION));
        assert!(serde_json::from_str::<JobRequest>(r#"{"jobId":"j"}"#).is_err());
        assert!(serde_json::from_str::<JobRequest>(r#"{"type":5}"#).is_err());
    }

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC*") {
            let _ = serde_json::from_str::<JobRequest>(&s);
            let _ = serde_json::from_str::<JobResponse>(&s);
            let _ = serde_json::from_str::<Vec<JobResponse>>(&s);
            let _ = serde_json::from_str::<DeviceJob>(&s);
            let _ = serde_json::from_str::<DeviceJobStatistics>(&s);
            let _ = serde_json::from_str::<JobStatus>(&s);
            let _ = serde_json::from_str::<DeviceJobStatus>(&s);
            let _ = serde_json::from_str::<JobType>(&s);
        }

        #[test]
        fn mutated_fixture_never_panics(cut in 0usize..700, junk in "[{}\\[\\]\":, a-z0-9nul-]{0,8}") {
            for fixture in [METHOD_JOB, DEVICE_JOB, FULL_RESPONSE] {
                let mut text: String = fixture.chars().take(cut).collect();
                text.push_str(&junk);
                text.extend(fixture.chars().skip(cut));
                let _ = serde_json::from_str::<JobRequest>(&text);
                let _ = serde_json::from_str::<JobResponse>(&text);
                if let Ok(d) = serde_json::from_str::<DeviceJob>(&text) {
                    let _ = d.method_response();
                }
            }
        }
    }
}
