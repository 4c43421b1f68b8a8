//! What the hub keeps of a job beside hub-core's wire types: the stored [`JobRecord`] (from
//! which the `JobResponse` of `/jobs/v2` is built), the tally of device rows into
//! `deviceJobStatistics`, and IoT Hub's job time format (reference §4.6, §4.7). Device rows are
//! hub-core's `DeviceJob` as they are, stored and served alike.
//! Invariant: a job's statistics always equal the tally of its device rows, and
//! `deviceCount = succeeded + failed + running + pending` (a `canceled` row counts as failed).

use std::sync::Arc;

use hub_core::job::{
    DeviceJob, DeviceJobStatistics, DeviceJobStatus, JobResponse, JobStatus, JobType,
};
use hub_core::method::CloudToDeviceMethod;
use hub_core::twin::TwinPatch;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
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

/// The tally of a job's device rows kept in hub-core's `deviceJobStatistics`.
pub trait Tally {
    /// Counts a new row.
    fn add(&mut self, status: &DeviceJobStatus);
    /// Moves one row from `from` to `to`.
    fn shift(&mut self, from: &DeviceJobStatus, to: &DeviceJobStatus);
}

fn slot<'a>(stats: &'a mut DeviceJobStatistics, status: &DeviceJobStatus) -> &'a mut u64 {
    match status {
        DeviceJobStatus::Pending | DeviceJobStatus::Scheduled => &mut stats.pending_count,
        DeviceJobStatus::Running => &mut stats.running_count,
        DeviceJobStatus::Completed => &mut stats.succeeded_count,
        // IoT Hub's statistics have no canceled bucket (C# DeviceJobStatistics); a device the
        // job did not finish did not succeed, so it counts as failed and the sum holds. A status
        // this hub never writes (`Other`, from a damaged store) did not succeed either.
        DeviceJobStatus::Failed | DeviceJobStatus::Canceled | DeviceJobStatus::Other(_) => {
            &mut stats.failed_count
        }
    }
}

impl Tally for DeviceJobStatistics {
    fn add(&mut self, status: &DeviceJobStatus) {
        self.device_count += 1;
        *slot(self, status) += 1;
    }

    fn shift(&mut self, from: &DeviceJobStatus, to: &DeviceJobStatus) {
        let old = slot(self, from);
        *old = old.saturating_sub(1);
        *slot(self, to) += 1;
    }
}

/// A job as stored: the `JobResponse` fields the hub always has, plus when it actually began
/// running. Field names and spellings are those of the wire, so stored jobs stay readable.
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
    pub cloud_to_device_method: Option<CloudToDeviceMethod>,
    /// The twin patch (twin jobs), as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_twin: Option<TwinPatch>,
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
    /// The `JobResponse` with these statistics. `endTime`, `failureReason` and
    /// `statusMessage` are left out until they have a value, as IoT Hub does.
    pub fn response(&self, stats: DeviceJobStatistics) -> JobResponse {
        JobResponse {
            job_id: self.job_id.clone(),
            query_condition: Some(self.query_condition.clone()),
            created_time: Some(self.created_time.clone()),
            start_time: Some(self.start_time.clone()),
            end_time: self.end_time.clone().map(Some),
            max_execution_time_in_seconds: Some(self.max_execution_time_in_seconds),
            job_type: Some(self.job_type.clone()),
            cloud_to_device_method: self.cloud_to_device_method.clone(),
            update_twin: self.update_twin.clone(),
            status: Some(self.status.clone()),
            failure_reason: self.failure_reason.clone().map(Some),
            status_message: self.status_message.clone().map(Some),
            device_job_statistics: Some(stats),
            extra: Map::new(),
        }
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

/// A device-job row's query document: the row as `FROM devices.jobs` returns it.
pub fn row_document(row: &DeviceJob) -> Arc<Value> {
    // Strings, enums and JSON values only: serializing cannot fail.
    Arc::new(serde_json::to_value(row).unwrap_or(Value::Null))
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
        let mut stats = DeviceJobStatistics::default();
        for _ in 0..3 {
            stats.add(&DeviceJobStatus::Pending);
        }
        stats.shift(&DeviceJobStatus::Pending, &DeviceJobStatus::Running);
        stats.shift(&DeviceJobStatus::Running, &DeviceJobStatus::Completed);
        stats.shift(&DeviceJobStatus::Pending, &DeviceJobStatus::Canceled);
        assert_eq!(
            stats,
            DeviceJobStatistics {
                device_count: 3,
                failed_count: 1,
                succeeded_count: 1,
                running_count: 0,
                pending_count: 1
            }
        );
        assert_eq!(
            stats.device_count,
            stats.failed_count + stats.succeeded_count + stats.running_count + stats.pending_count
        );
    }

    #[test]
    fn stored_records_of_earlier_versions_still_load() {
        // Written by the hub before it used hub-core's types: same names and spellings.
        let text = r#"{"jobId":"j","type":"scheduleDeviceMethod","queryCondition":"*","createdTime":"2030-01-02T03:04:05.0000000Z","startTime":"2030-01-02T03:04:05.0000000Z","endTime":"2030-01-02T03:04:06.0000000Z","maxExecutionTimeInSeconds":60,"cloudToDeviceMethod":{"methodName":"m","payload":null,"responseTimeoutInSeconds":30,"connectTimeoutInSeconds":0},"status":"cancelled","runStartedTime":"2030-01-02T03:04:05.0000000Z"}"#;
        let record: JobRecord = serde_json::from_str(text).expect("record");
        assert_eq!(record.status, JobStatus::Cancelled);
        assert_eq!(
            serde_json::to_value(&record).expect("encode"),
            serde_json::from_str::<Value>(text).expect("json")
        );
        let row = r#"{"deviceId":"d","jobId":"j","jobType":"scheduleUpdateTwin","status":"failed","startTimeUtc":"a","endTimeUtc":"b","createdDateTimeUtc":"c","lastUpdatedDateTimeUtc":"d","error":{"code":"JobFailed","description":"x"}}"#;
        let parsed: DeviceJob = serde_json::from_str(row).expect("row");
        assert!(parsed.extra.is_empty());
        assert_eq!(
            *row_document(&parsed),
            serde_json::from_str::<Value>(row).expect("json")
        );
    }
}
