//! Validation of a `PUT /jobs/v2/{jobId}` body (`JobRequest`) the way IoT Hub validates it:
//! every problem is a message for a 400 `ArgumentInvalid`, naming the field and what is allowed.

use hub_core::job::JobType;
use hub_core::method::CloudToDeviceMethod;
use hub_core::twin::TwinPatch;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::model::parse_time;
use crate::hub::MethodCall;
use crate::query;
use crate::twins;

/// `maxExecutionTimeInSeconds` when the request leaves it out (IoT Hub's default: one hour).
pub const DEFAULT_MAX_EXECUTION_SECS: u64 = 3600;

/// Why a job request was refused: the message of a 400 `ArgumentInvalid`, naming the field and
/// what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidJobRequest(pub String);

/// A validated job request.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// What the job does.
    pub job_type: JobType,
    /// The condition text as given.
    pub query_condition: String,
    /// When it is due.
    pub start_time: OffsetDateTime,
    /// How long it may run.
    pub max_execution_secs: u64,
    /// The normalized method request (method jobs).
    pub method: Option<CloudToDeviceMethod>,
    /// The twin patch (twin jobs).
    pub update_twin: Option<TwinPatch>,
}

/// Checks a job id: 1 to 128 printable US-ASCII characters without spaces or the characters
/// that cannot travel in a URL path segment (`/ \ ? # %`).
pub fn validate_job_id(id: &str) -> Result<(), InvalidJobRequest> {
    check_job_id(id).map_err(InvalidJobRequest)
}

fn check_job_id(id: &str) -> Result<(), String> {
    const FORBIDDEN: &str = "/\\?#%";
    if id.is_empty() || id.len() > 128 {
        return Err(format!(
            "the job id must be 1 to 128 characters, got {}",
            id.chars().count()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !c.is_ascii_graphic() || FORBIDDEN.contains(*c))
    {
        return Err(format!(
            "the job id `{}` contains {c:?}; use printable ASCII without spaces or / \\ ? # %",
            id.escape_debug()
        ));
    }
    Ok(())
}

/// Validates a `JobRequest` body for the job `url_id`, at time `now`.
pub fn parse_request(
    url_id: &str,
    body: &Value,
    now: OffsetDateTime,
) -> Result<JobSpec, InvalidJobRequest> {
    parse(url_id, body, now).map_err(InvalidJobRequest)
}

fn parse(url_id: &str, body: &Value, now: OffsetDateTime) -> Result<JobSpec, String> {
    check_job_id(url_id)?;
    let Value::Object(map) = body else {
        return Err("the job request must be a JSON object with jobId, type, queryCondition and cloudToDeviceMethod or updateTwin".into());
    };
    match map.get("jobId") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if id == url_id => {}
        Some(other) => {
            return Err(format!(
                "the body's jobId {other} does not match the job id `{url_id}` in the URL"
            ));
        }
    }
    let job_type = match map.get("type") {
        Some(Value::String(t)) if t == "scheduleDeviceMethod" => JobType::ScheduleDeviceMethod,
        Some(Value::String(t)) if t == "scheduleUpdateTwin" => JobType::ScheduleUpdateTwin,
        Some(Value::String(t)) if JobType::from_wire(t).is_known() => {
            return Err(format!(
                "job type `{t}` is not supported by /jobs/v2; use scheduleDeviceMethod or scheduleUpdateTwin"
            ));
        }
        Some(other) => {
            return Err(format!(
                "unknown job type {other}; use scheduleDeviceMethod or scheduleUpdateTwin"
            ));
        }
        None => return Err("type is required: scheduleDeviceMethod or scheduleUpdateTwin".into()),
    };
    let query_condition = match map.get("queryCondition") {
        Some(Value::String(text)) if !text.trim().is_empty() => text.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(
                "queryCondition is required: a WHERE clause such as `deviceId IN ['d1', 'd2']`, or `*` for every device"
                    .into(),
            );
        }
        Some(other) => return Err(format!("queryCondition must be a string, got {other}")),
    };
    if let Err(e) = query::parse_condition(&query_condition) {
        let at = e
            .position()
            .map(|p| format!(" (at character {p})"))
            .unwrap_or_default();
        return Err(format!(
            "queryCondition `{query_condition}` is invalid{at}: {}",
            e.message()
        ));
    }
    let start_time = match map.get("startTime") {
        None | Some(Value::Null) => now,
        Some(Value::String(text)) => parse_time(text).ok_or_else(|| {
            format!("startTime `{text}` is not an ISO 8601 time such as 2030-01-02T03:04:05.000Z")
        })?,
        Some(other) => return Err(format!("startTime must be an ISO 8601 string, got {other}")),
    };
    let max_execution_secs = match map.get("maxExecutionTimeInSeconds") {
        None | Some(Value::Null) => DEFAULT_MAX_EXECUTION_SECS,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => {
                return Err(format!(
                    "maxExecutionTimeInSeconds must be a positive whole number, got {v}"
                ));
            }
        },
    };
    // The `type` check above lets only the two schedule types through.
    let (method, update_twin) = if job_type == JobType::ScheduleDeviceMethod {
        (Some(parse_method(map)?), None)
    } else {
        (None, Some(parse_update_twin(map)?))
    };
    Ok(JobSpec {
        job_type,
        query_condition,
        start_time,
        max_execution_secs,
        method,
        update_twin,
    })
}

fn parse_method(map: &Map<String, Value>) -> Result<CloudToDeviceMethod, String> {
    let method = match map.get("cloudToDeviceMethod") {
        Some(method @ Value::Object(_)) => method,
        None | Some(Value::Null) => {
            return Err("cloudToDeviceMethod is required for a scheduleDeviceMethod job".into());
        }
        Some(other) => {
            return Err(format!(
                "cloudToDeviceMethod must be an object, got {other}"
            ));
        }
    };
    // The same checks as `POST /twins/{id}/methods`: name rules, timeouts 5-300 s and 0-300 s,
    // payload up to 128 KiB. In a job request each of them is a plain argument error.
    let call = MethodCall::from_request(method).map_err(|e| format!("cloudToDeviceMethod: {e}"))?;
    let payload = method.get("payload").cloned().unwrap_or(Value::Null);
    Ok(CloudToDeviceMethod {
        method_name: call.name,
        payload: Some(payload),
        response_timeout_in_seconds: Some(call.response_timeout.as_secs()),
        connect_timeout_in_seconds: Some(call.connect_timeout.as_secs()),
        extra: Map::new(),
    })
}

fn parse_update_twin(map: &Map<String, Value>) -> Result<TwinPatch, String> {
    let twin = match map.get("updateTwin") {
        Some(twin @ Value::Object(_)) => twin,
        None | Some(Value::Null) => {
            return Err("updateTwin is required for a scheduleUpdateTwin job".into());
        }
        Some(other) => return Err(format!("updateTwin must be an object, got {other}")),
    };
    // The validator `PATCH /twins/{id}` and the job's execution use, so a job is refused up
    // front exactly when each of its device updates would be, in the same words; the
    // `updateTwin: ` prefix says which field of the request they are about.
    let update = twins::parse_service_update(twin).map_err(|e| format!("updateTwin: {e}"))?;
    // A job must change something; a REST twin update of `{}` stays accepted, as before.
    if update.is_empty() {
        return Err(format!("updateTwin: {}", twins::TwinError::NothingToUpdate));
    }
    match twin.get("etag") {
        None | Some(Value::Null) => {}
        Some(Value::String(etag)) if etag.trim().trim_matches('"') == "*" => {}
        Some(other) => {
            return Err(format!(
                "updateTwin.etag must be \"*\" (a job updates every matching twin whatever its version), got {other}"
            ));
        }
    }
    // Every part was checked above, so this only fails on a shape already refused. `null`
    // tags, properties or etag mean "absent" here as in the twin update, so dropping them is
    // harmless.
    serde_json::from_value(twin.clone()).map_err(|e| format!("updateTwin is not a twin patch: {e}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::model::format_time;
    use super::*;
    use crate::hub::MAX_METHOD_PAYLOAD;

    fn method_job() -> Value {
        json!({
            "jobId": "j1", "type": "scheduleDeviceMethod",
            "cloudToDeviceMethod": {"methodName": "lockDoor", "payload": {"lockTime": "10m"},
                                    "responseTimeoutInSeconds": 200, "connectTimeoutInSeconds": 5},
            "queryCondition": "deviceId IN ['myDeviceId']",
        })
    }

    #[test]
    fn accepts_the_tutorial_jobs_with_defaults() {
        let now = OffsetDateTime::now_utc();
        let spec = parse_request("j1", &method_job(), now).expect("method job");
        assert_eq!(spec.max_execution_secs, DEFAULT_MAX_EXECUTION_SECS);
        assert_eq!(spec.start_time, now);
        assert_eq!(
            spec.method
                .as_ref()
                .and_then(|m| m.connect_timeout_in_seconds),
            Some(5)
        );
        let twin = json!({"type": "scheduleUpdateTwin", "queryCondition": "*", "startTime": "2030-01-02T03:04:05.224459Z",
                          "updateTwin": {"etag": "*", "properties": {"desired": {"building": 43, "floor": 3}}}});
        let spec = parse_request("j2", &twin, now).expect("twin job");
        assert_eq!(spec.job_type, JobType::ScheduleUpdateTwin);
        assert_eq!(format_time(spec.start_time), "2030-01-02T03:04:05.2244590Z");
    }

    #[test]
    fn refuses_what_iot_hub_refuses() {
        let now = OffsetDateTime::now_utc();
        let with = |f: &dyn Fn(&mut Map<String, Value>)| {
            let mut body = method_job();
            if let Value::Object(map) = &mut body {
                f(map);
            }
            body
        };
        let long = "x".repeat(129);
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "j1",
                with(&|m| {
                    m.insert("jobId".into(), json!("other"));
                }),
                "does not match",
            ),
            (
                "j1",
                with(&|m| {
                    m.insert("type".into(), json!("export"));
                }),
                "not supported",
            ),
            (
                "j1",
                with(&|m| {
                    m.insert("type".into(), json!("bogus"));
                }),
                "unknown job type",
            ),
            (
                "j1",
                with(&|m| {
                    m.remove("type");
                }),
                "type is required",
            ),
            (
                "j1",
                with(&|m| {
                    m.insert("queryCondition".into(), json!("deviceId = "));
                }),
                "queryCondition",
            ),
            (
                "j1",
                with(&|m| {
                    m.remove("queryCondition");
                }),
                "queryCondition is required",
            ),
            (
                "j1",
                with(&|m| {
                    m.insert("startTime".into(), json!("tomorrow"));
                }),
                "startTime",
            ),
            (
                "j1",
                with(&|m| {
                    m.insert("maxExecutionTimeInSeconds".into(), json!(-1));
                }),
                "maxExecutionTimeInSeconds",
            ),
            (
                "j1",
                with(&|m| {
                    m["cloudToDeviceMethod"]["responseTimeoutInSeconds"] = json!(4);
                }),
                "responseTimeoutInSeconds",
            ),
            (
                "j1",
                with(&|m| {
                    m["cloudToDeviceMethod"]["connectTimeoutInSeconds"] = json!(301);
                }),
                "connectTimeoutInSeconds",
            ),
            (
                "j1",
                with(&|m| {
                    m["cloudToDeviceMethod"]["methodName"] = json!("a/b");
                }),
                "method name",
            ),
            (
                "j1",
                with(&|m| {
                    m["cloudToDeviceMethod"]["payload"] = json!("x".repeat(MAX_METHOD_PAYLOAD));
                }),
                "payload",
            ),
            (
                "j1",
                with(&|m| {
                    m.remove("cloudToDeviceMethod");
                }),
                "cloudToDeviceMethod is required",
            ),
            ("a/b", method_job(), "job id"),
            ("", method_job(), "job id"),
            (long.as_str(), method_job(), "job id"),
            ("j1", json!([1]), "JSON object"),
            (
                "t",
                json!({"type": "scheduleUpdateTwin", "queryCondition": "*", "updateTwin": {}}),
                "tags and/or",
            ),
            (
                "t",
                json!({"type": "scheduleUpdateTwin", "queryCondition": "*", "updateTwin": {"etag": "AAAA", "tags": {"a": 1}}}),
                "etag",
            ),
            (
                "t",
                json!({"type": "scheduleUpdateTwin", "queryCondition": "*", "updateTwin": {"properties": {"reported": {"a": 1}}}}),
                "reported",
            ),
        ];
        for (id, body, expected) in cases {
            let err = parse_request(id, &body, now).expect_err(expected);
            assert!(
                err.0.contains(expected),
                "{id} {body}: `{err}` should mention `{expected}`"
            );
        }
    }
}
