//! Job records as IoT Hub shows them: the `JobResponse` of `/jobs/v2` and the per-device rows of
//! `FROM devices.jobs` (reference §4.6, §4.7), with their statuses, statistics and timestamps.
//! Invariant: a job's statistics always equal the tally of its device rows, and
//! `deviceCount = succeeded + failed + running + pending` (a `canceled` row counts as failed).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Formats a time as IoT Hub writes job times: UTC with 7 fraction digits
/// (`2024-01-02T03:04:05.1234567Z`).
pub fn format_time(at: OffsetDateTime) -> String {
    let Some(at) = at.checked_to_offset(UtcOffset::UTC) else {
        return at.unix_timestamp().to_string();
    };
    at.format(format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
    ))
    .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Parses an ISO 8601 time as clients send `startTime`: any number of fraction digits, `Z` or an
/// offset (`...05.000Z`, `...41.224459Z`, `...05+02:00`); without an offset it is UTC, as IoT Hub
/// (and Python's "naive datetime is UTC" rule) treats it.
pub fn parse_time(text: &str) -> Option<OffsetDateTime> {
    // Only times that also exist in UTC (`9999-12-31T23:00:00-05:00` does not): everything
    // downstream formats them in UTC, and `to_offset` panics outside the supported range.
    parse_any_offset(text.trim()).and_then(|at| at.checked_to_offset(UtcOffset::UTC))
}

fn parse_any_offset(text: &str) -> Option<OffsetDateTime> {
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(at);
    }
    // RFC 3339 requires the offset; ISO 8601 also allows `+0200` and no offset at all.
    let (local, offset) = split_offset(text);
    let local = local.replacen(' ', "T", 1);
    let primitive = PrimitiveDateTime::parse(
        &local,
        format_description!(
            "[year]-[month]-[day]T[hour]:[minute][optional [:[second][optional [.[subsecond]]]]]"
        ),
    )
    .ok()?;
    Some(primitive.assume_offset(offset?))
}

/// Splits `2024-01-02T03:04:05+0200` into the local part and its offset (UTC when none).
fn split_offset(text: &str) -> (&str, Option<UtcOffset>) {
    if let Some(local) = text.strip_suffix(['Z', 'z']) {
        return (local, Some(UtcOffset::UTC));
    }
    // The offset sign comes after the time part, so search only past the `T`.
    let time_start = text.find(['T', 't', ' ']).unwrap_or(text.len());
    match text[time_start..].rfind(['+', '-']) {
        Some(i) => {
            let (local, offset) = text.split_at(time_start + i);
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let digits: String = offset[1..].chars().filter(char::is_ascii_digit).collect();
            let parsed = match digits.len() {
                2 => digits.parse::<i8>().ok().map(|h| (h, 0)),
                4 => match (digits[..2].parse::<i8>(), digits[2..].parse::<i8>()) {
                    (Ok(h), Ok(m)) => Some((h, m)),
                    _ => None,
                },
                _ => None,
            };
            let offset = parsed.and_then(|(h, m)| UtcOffset::from_hms(sign * h, sign * m, 0).ok());
            (local, offset)
        }
        None => (text, Some(UtcOffset::UTC)),
    }
}

/// The job types of the swagger; only the two `schedule*` ones run on Jobs v2.
pub const SWAGGER_JOB_TYPES: &[&str] = &[
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
    "failoverDataCopy",
];

/// What a job does to each device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobType {
    /// Invoke a direct method.
    ScheduleDeviceMethod,
    /// Patch tags and desired properties.
    ScheduleUpdateTwin,
}

impl JobType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::ScheduleDeviceMethod => "scheduleDeviceMethod",
            JobType::ScheduleUpdateTwin => "scheduleUpdateTwin",
        }
    }
}

/// A job's status (`JobResponse.status`; note IoT Hub's double-l `cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobStatus {
    /// Waiting for its start time.
    Scheduled,
    /// Due; about to run.
    Queued,
    /// Executing on devices.
    Running,
    /// Every device was processed (some may have failed).
    Completed,
    /// Stopped by a fatal error or by reaching `maxExecutionTimeInSeconds`.
    Failed,
    /// Stopped by `POST /jobs/v2/{id}/cancel`.
    Cancelled,
}

impl JobStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Scheduled => "scheduled",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the job can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// One device's status within a job (`DeviceJobStatus`; single-l `canceled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DeviceJobStatus {
    /// Not started.
    Pending,
    /// The method call or twin update is in progress.
    Running,
    /// The device answered the method (any status) or its twin was updated.
    Completed,
    /// The device could not be reached, or the update was refused.
    Failed,
    /// The job was cancelled before this device finished.
    Canceled,
}

impl DeviceJobStatus {
    /// Whether this device is done.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeviceJobStatus::Completed | DeviceJobStatus::Failed | DeviceJobStatus::Canceled
        )
    }
}

/// `deviceJobStatistics`: the tally of a job's device rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statistics {
    /// Devices the job targets (fixed when it starts).
    pub device_count: u64,
    /// Failed or canceled devices.
    pub failed: u64,
    /// Completed devices.
    pub succeeded: u64,
    /// Devices in progress.
    pub running: u64,
    /// Devices not started.
    pub pending: u64,
}

impl Statistics {
    fn slot(&mut self, status: DeviceJobStatus) -> &mut u64 {
        match status {
            DeviceJobStatus::Pending => &mut self.pending,
            DeviceJobStatus::Running => &mut self.running,
            DeviceJobStatus::Completed => &mut self.succeeded,
            // IoT Hub's statistics have no canceled bucket (C# DeviceJobStatistics); a device
            // the job did not finish did not succeed, so it counts as failed and the sum holds.
            DeviceJobStatus::Failed | DeviceJobStatus::Canceled => &mut self.failed,
        }
    }

    /// Counts a new row.
    pub fn add(&mut self, status: DeviceJobStatus) {
        self.device_count += 1;
        *self.slot(status) += 1;
    }

    /// Moves one row from `from` to `to`.
    pub fn shift(&mut self, from: DeviceJobStatus, to: DeviceJobStatus) {
        let old = self.slot(from);
        *old = old.saturating_sub(1);
        *self.slot(to) += 1;
    }

    /// The wire form.
    pub fn to_json(self) -> Value {
        json!({
            "deviceCount": self.device_count,
            "failedCount": self.failed,
            "succeededCount": self.succeeded,
            "runningCount": self.running,
            "pendingCount": self.pending,
        })
    }
}

/// A job as stored: the `JobResponse` fields plus when it actually began running.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// Job id.
    pub job_id: String,
    /// What it does.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The WHERE clause (or `*`) as given.
    pub query_condition: String,
    /// When it was created.
    pub created_time: String,
    /// When it is (or was) due.
    pub start_time: String,
    /// When it reached a terminal status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// How long it may run.
    pub max_execution_time_in_seconds: u64,
    /// The method (method jobs), normalized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_method: Option<Value>,
    /// The twin patch (twin jobs), as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<Value>,
    /// Status.
    pub status: JobStatus,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// A note on its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    /// When it began running (the deadline counts from here); not on the wire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_started_time: Option<String>,
}

impl JobRecord {
    /// The `JobResponse` JSON with these statistics.
    pub fn response(&self, stats: Statistics) -> Value {
        let mut map = Map::new();
        map.insert("jobId".into(), json!(self.job_id));
        map.insert("queryCondition".into(), json!(self.query_condition));
        map.insert("createdTime".into(), json!(self.created_time));
        map.insert("startTime".into(), json!(self.start_time));
        if let Some(end) = &self.end_time {
            map.insert("endTime".into(), json!(end));
        }
        map.insert(
            "maxExecutionTimeInSeconds".into(),
            json!(self.max_execution_time_in_seconds),
        );
        map.insert("type".into(), json!(self.job_type.as_str()));
        if let Some(method) = &self.cloud_to_device_method {
            map.insert("cloudToDeviceMethod".into(), method.clone());
        }
        if let Some(twin) = &self.update_twin {
            map.insert("updateTwin".into(), twin.clone());
        }
        map.insert("status".into(), json!(self.status.as_str()));
        if let Some(reason) = &self.failure_reason {
            map.insert("failureReason".into(), json!(reason));
        }
        if let Some(message) = &self.status_message {
            map.insert("statusMessage".into(), json!(message));
        }
        map.insert("deviceJobStatistics".into(), stats.to_json());
        Value::Object(map)
    }

    /// When the job is due.
    pub fn start_at(&self) -> OffsetDateTime {
        parse_time(&self.start_time).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// When the job began running, or its start time.
    pub fn run_started_at(&self) -> OffsetDateTime {
        self.run_started_time
            .as_deref()
            .and_then(parse_time)
            .unwrap_or_else(|| self.start_at())
    }

    /// The moment `maxExecutionTimeInSeconds` runs out.
    pub fn deadline(&self) -> OffsetDateTime {
        let seconds = i64::try_from(self.max_execution_time_in_seconds).unwrap_or(i64::MAX);
        self.run_started_at()
            .saturating_add(time::Duration::seconds(seconds))
    }
}

/// A device's error within a job (`DeviceJobError`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceJobError {
    /// IoT Hub error code name (`DeviceNotOnline`, `GatewayTimeout`, ...).
    pub code: String,
    /// What happened.
    pub description: String,
}

/// One device's row in a job, shaped as `FROM devices.jobs` returns it (reference §4.7).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJobRow {
    /// The device.
    pub device_id: String,
    /// The job.
    pub job_id: String,
    /// The job's type.
    pub job_type: JobType,
    /// Status.
    pub status: DeviceJobStatus,
    /// When the device's work began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_utc: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time_utc: Option<String>,
    /// When the row was made (the job's start).
    pub created_date_time_utc: String,
    /// Last change.
    pub last_updated_date_time_utc: String,
    /// `{"deviceMethodResponse": {"status", "payload"}}` for a method the device answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Value>,
    /// Why the device failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<DeviceJobError>,
}

impl DeviceJobRow {
    /// The row's query document.
    pub fn document(&self) -> Arc<Value> {
        Arc::new(serde_json::to_value(self).unwrap_or(Value::Null))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_iso_form_clients_send() {
        let base = parse_time("2030-01-02T03:04:05Z").expect("plain");
        for (text, nanos) in [
            ("2030-01-02T03:04:05.000Z", 0),
            ("2030-01-02T03:04:05.224459Z", 224_459_000),
            ("2030-01-02T03:04:05.1234567Z", 123_456_700),
            ("2030-01-02T05:04:05.000+02:00", 0),
            ("2030-01-02T05:04:05+0200", 0),
            ("2030-01-02T01:04:05-02:00", 0),
            ("2030-01-02T03:04:05", 0),
            ("2030-01-02T03:04:05.5", 500_000_000),
            ("2030-01-02 03:04:05Z", 0),
        ] {
            let at = parse_time(text).unwrap_or_else(|| panic!("{text} should parse"));
            assert_eq!(at - base, time::Duration::nanoseconds(nanos), "{text}");
        }
        for bad in [
            "",
            "soon",
            "2030-13-02T03:04:05Z",
            "2030-01-02T03:04:05+99:00",
            "2030-01-02",
            // Valid as written, but after 9999-12-31 in UTC.
            "9999-12-31T23:59:59-05:00",
        ] {
            assert!(parse_time(bad).is_none(), "{bad} should not parse");
        }
    }

    #[test]
    fn formats_seven_digits_in_utc() {
        let at = parse_time("2030-01-02T05:04:05.123+02:00").expect("parse");
        assert_eq!(format_time(at), "2030-01-02T03:04:05.1230000Z");
        assert_eq!(parse_time(&format_time(at)), Some(at));
    }

    #[test]
    fn statistics_keep_the_sum() {
        let mut stats = Statistics::default();
        for _ in 0..3 {
            stats.add(DeviceJobStatus::Pending);
        }
        stats.shift(DeviceJobStatus::Pending, DeviceJobStatus::Running);
        stats.shift(DeviceJobStatus::Running, DeviceJobStatus::Completed);
        stats.shift(DeviceJobStatus::Pending, DeviceJobStatus::Canceled);
        assert_eq!(
            stats,
            Statistics {
                device_count: 3,
                failed: 1,
                succeeded: 1,
                running: 0,
                pending: 1
            }
        );
        assert_eq!(
            stats.device_count,
            stats.failed + stats.succeeded + stats.running + stats.pending
        );
    }
}
