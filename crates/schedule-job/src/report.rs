//! Per-device outcomes of a job (hub-side rows or client-side calls) and their summary.

use std::collections::BTreeMap;

use hub_core::job::{DeviceJob, DeviceJobStatus, JobResponse};
use hub_core::method::CloudToDeviceMethodResult;
use hub_core::service_client::ServiceError;
use serde::Serialize;
use serde_json::Value;

/// How many failures the summary lists.
pub const FIRST_FAILURES: usize = 10;

/// One device's part in a job.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceOutcome {
    /// The device.
    pub device_id: String,
    /// `completed`, `failed`, `canceled`, `running`, `pending` or `scheduled`.
    pub status: String,
    /// The device's method status, for method jobs that reached it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method_status: Option<i32>,
    /// The device's method payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Error code, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeviceOutcome {
    /// From a `devices.jobs` row.
    pub fn from_row(row: &DeviceJob) -> Self {
        let response = row.method_response();
        Self {
            device_id: row.device_id.clone(),
            status: row.status.as_str().to_owned(),
            method_status: response.map(|r| r.status),
            payload: response.map(|r| r.payload.clone()),
            error_code: row.error.as_ref().and_then(|e| e.code.clone()),
            error: row.error.as_ref().and_then(|e| e.description.clone()),
        }
    }

    /// From a direct invocation.
    pub fn from_call(
        device_id: String,
        result: Result<CloudToDeviceMethodResult, ServiceError>,
    ) -> Self {
        match result {
            Ok(r) => Self {
                device_id,
                status: if (200..300).contains(&r.status) {
                    "completed"
                } else {
                    "failed"
                }
                .to_owned(),
                method_status: Some(r.status),
                error_code: None,
                error: (!(200..300).contains(&r.status))
                    .then(|| format!("the device answered status {}", r.status)),
                payload: Some(r.payload),
            },
            Err(e) => Self {
                device_id,
                status: "failed".to_owned(),
                method_status: None,
                payload: None,
                error_code: e.hub().map(|h| {
                    h.code.map_or_else(
                        || {
                            h.raw_code
                                .clone()
                                .unwrap_or_else(|| format!("HTTP {}", h.status))
                        },
                        |c| c.name().to_owned(),
                    )
                }),
                error: Some(e.hub().map_or_else(|| e.to_string(), |h| h.message.clone())),
            },
        }
    }

    /// Whether this device is done and fine.
    pub fn succeeded(&self) -> bool {
        self.status == DeviceJobStatus::Completed.as_str()
    }

    /// Whether this device failed.
    pub fn failed(&self) -> bool {
        self.status == DeviceJobStatus::Failed.as_str()
    }

    /// A short label for grouping: `completed (200)`, `failed: DeviceNotOnline`.
    pub fn label(&self) -> String {
        match (&self.method_status, &self.error_code) {
            (_, Some(code)) => format!("{}: {code}", self.status),
            (Some(s), None) => format!("{} (device status {s})", self.status),
            (None, None) => self.status.clone(),
        }
    }
}

/// Counts by outcome and the first failures.
#[derive(Debug, Clone, Serialize)]
pub struct OutcomeSummary {
    /// Devices in the job.
    pub total: usize,
    /// Completed devices.
    pub succeeded: usize,
    /// Failed devices.
    pub failed: usize,
    /// Devices not finished (pending, scheduled, running) or canceled.
    pub unfinished: usize,
    /// Devices per outcome label.
    pub by_outcome: BTreeMap<String, usize>,
    /// The first failures, with reasons.
    pub first_failures: Vec<DeviceOutcome>,
}

impl OutcomeSummary {
    /// Summarises outcomes (sorted by device id for stable output).
    pub fn of(outcomes: &[DeviceOutcome]) -> Self {
        let mut by_outcome = BTreeMap::new();
        for o in outcomes {
            *by_outcome.entry(o.label()).or_insert(0) += 1;
        }
        let mut failures: Vec<DeviceOutcome> =
            outcomes.iter().filter(|o| o.failed()).cloned().collect();
        failures.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        failures.truncate(FIRST_FAILURES);
        let succeeded = outcomes.iter().filter(|o| o.succeeded()).count();
        let failed = outcomes.iter().filter(|o| o.failed()).count();
        Self {
            total: outcomes.len(),
            succeeded,
            failed,
            unfinished: outcomes.len() - succeeded - failed,
            by_outcome,
            first_failures: failures,
        }
    }

    /// Human lines.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "{} device(s): {} succeeded, {} failed, {} not finished",
            self.total, self.succeeded, self.failed, self.unfinished
        )];
        for (label, n) in &self.by_outcome {
            lines.push(format!("  {n:>7}  {label}"));
        }
        if !self.first_failures.is_empty() {
            lines.push(format!("first {} failure(s):", self.first_failures.len()));
            for f in &self.first_failures {
                lines.push(format!(
                    "  {}: {}",
                    f.device_id,
                    f.error.as_deref().unwrap_or("failed (no reason given)")
                ));
            }
        }
        lines
    }
}

/// A one-line description of a job for humans.
pub fn describe_job(job: &JobResponse) -> String {
    let kind = match (&job.cloud_to_device_method, &job.update_twin) {
        (Some(m), _) => format!("method {}", m.method_name),
        (None, Some(_)) => "twin update".to_owned(),
        _ => job
            .job_type
            .as_ref()
            .map_or("job".to_owned(), |t| t.as_str().to_owned()),
    };
    let status = job.status.as_ref().map_or("unknown", |s| s.as_str());
    let mut text = format!("job {}: {kind}, {status}", job.job_id);
    if let Some(q) = &job.query_condition {
        text.push_str(&format!(", devices where {q}"));
    }
    if let Some(start) = &job.start_time {
        text.push_str(&format!(", start {start}"));
    }
    if let Some(s) = &job.device_job_statistics {
        text.push_str(&format!(
            "; {} device(s): {} succeeded, {} failed, {} running, {} pending",
            s.device_count, s.succeeded_count, s.failed_count, s.running_count, s.pending_count
        ));
    }
    if let Some(reason) = job.failure_reason() {
        text.push_str(&format!("; failure: {reason}"));
    }
    text
}

/// A fixed-width table of outcomes.
pub fn table(outcomes: &[DeviceOutcome]) -> Vec<String> {
    let width = outcomes
        .iter()
        .map(|o| o.device_id.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut lines = vec![format!("{:<width$}  {:<10}  RESULT", "DEVICE", "STATUS")];
    for o in outcomes {
        let result = match (&o.method_status, &o.error) {
            (_, Some(e)) => format!(
                "{}{e}",
                o.error_code
                    .as_ref()
                    .map(|c| format!("{c}: "))
                    .unwrap_or_default()
            ),
            (Some(s), None) => format!(
                "{s} {}",
                o.payload.as_ref().map(Value::to_string).unwrap_or_default()
            ),
            (None, None) => String::new(),
        };
        lines.push(format!(
            "{:<width$}  {:<10}  {result}",
            o.device_id, o.status
        ));
    }
    lines
}
