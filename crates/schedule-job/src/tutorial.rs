//! The tutorial's flow (scheduleJobService.py): after a delay, invoke `lockDoor` on one device
//! and, after another, patch its desired properties; report each "job" every few seconds.
//!
//! Client-side mode runs the two delayed calls as tokio tasks, as the original ran threads;
//! `--hub-jobs` schedules the same pair as IoT Hub Jobs v2 with `startTime` = now + delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures_util::TryStreamExt;
use hub_core::error::ErrorCode;
use hub_core::job::{JobRequest, JobResponse, JobStatus};
use hub_core::method::CloudToDeviceMethod;
use hub_core::service_client::{ServiceClient, ServiceError, escape_sql_string};
use hub_core::twin::{Twin, TwinPatch};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Outcome;
use crate::cli::TutorialArgs;
use crate::error::Error;
use crate::jobs;
use crate::output::{Output, note};
use crate::report::DeviceOutcome;
use crate::settings::HubSettings;

/// The method the tutorial invokes.
pub const METHOD_NAME: &str = "lockDoor";
/// How long the hub waits for the device's answer (the tutorial's TIMEOUT).
pub const METHOD_RESPONSE_TIMEOUT_SECS: u64 = 60;
/// Hub-side jobs' `maxExecutionTimeInSeconds`.
pub const HUB_JOB_MAX_EXECUTION_SECS: u64 = 3600;

/// The tutorial's method payload.
pub fn method_payload() -> Value {
    json!({ "lockTime": "10m" })
}

/// The tutorial's desired-properties patch.
pub fn desired_patch() -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("building".into(), json!(43));
    map.insert("floor".into(), json!(3));
    map
}

fn method_call() -> CloudToDeviceMethod {
    CloudToDeviceMethod::new(METHOD_NAME)
        .with_payload(method_payload())
        .with_timeouts(METHOD_RESPONSE_TIMEOUT_SECS, 0)
}

const WAITING: u8 = 0;
const IN_FLIGHT: u8 = 1;

/// One delayed call running as a task.
struct Delayed<T> {
    job_id: String,
    what: &'static str,
    phase: Arc<AtomicU8>,
    handle: JoinHandle<Option<Result<T, ServiceError>>>,
    result: Option<Result<T, ServiceError>>,
}

impl<T: Send + 'static> Delayed<T> {
    fn spawn<F>(what: &'static str, delay: Duration, stop: CancellationToken, call: F) -> Self
    where
        F: std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
    {
        let phase = Arc::new(AtomicU8::new(WAITING));
        let task_phase = phase.clone();
        let handle = tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return None,
            }
            task_phase.store(IN_FLIGHT, Ordering::SeqCst);
            tokio::select! {
                result = call => Some(result),
                () = stop.cancelled() => None,
            }
        });
        Self {
            job_id: uuid::Uuid::new_v4().to_string(),
            what,
            phase,
            handle,
            result: None,
        }
    }

    fn done(&self) -> bool {
        self.result.is_some()
    }

    fn undone(&self) -> String {
        if self.phase.load(Ordering::SeqCst) == WAITING {
            format!("job {} ({}) was not started", self.job_id, self.what)
        } else {
            format!(
                "job {} ({}) was in flight and its answer was not awaited; the hub may still deliver it",
                self.job_id, self.what
            )
        }
    }
}

fn join<T>(
    r: Result<Option<Result<T, ServiceError>>, tokio::task::JoinError>,
    what: &str,
) -> Result<T, ServiceError> {
    match r {
        Ok(Some(result)) => result,
        Ok(None) => Err(ServiceError::InvalidArgument(format!("{what} was stopped"))),
        Err(e) => Err(ServiceError::InvalidArgument(format!(
            "{what} task failed: {e}"
        ))),
    }
}

/// Confirms that the device is registered, through the query API as the tutorial does.
pub async fn confirm_device(client: &ServiceClient, device_id: &str) -> Result<Twin, Error> {
    let condition = format!("deviceId = '{}'", escape_sql_string(device_id));
    let twins: Vec<Twin> = client
        .query(jobs::twin_query(&condition))
        .try_collect()
        .await
        .map_err(|e| jobs::query_error(&condition, e))?;
    twins
        .into_iter()
        .find(|t| t.device_id == device_id)
        .ok_or_else(|| Error::UnknownDevice {
            device_id: device_id.to_owned(),
            host: client.host_name().to_owned(),
        })
}

/// Runs the tutorial.
pub async fn run(
    client: &ServiceClient,
    hub: &HubSettings,
    args: &TutorialArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    if args.status_interval.is_zero() {
        return Err(Error::Usage(
            "--status-interval must be more than 0s".into(),
        ));
    }
    out.line("Starting the IoT Hub jobs sample...");
    out.line(format!("    Hub               = {}", client.host_name()));
    out.line(format!("    Device ID         = {}", args.device_id));
    confirm_device(client, &args.device_id).await?;
    if args.hub_jobs {
        hub_jobs(client, hub, args, out, shutdown).await
    } else {
        client_side(client, args, out, shutdown).await
    }
}

/// Whether the hub refused a job for its cap on active jobs (429004, or IoT Hub's older 403003
/// `JobQuotaExceeded`).
pub fn is_active_job_cap(error: &ServiceError) -> bool {
    error.hub().and_then(|h| h.code).is_some_and(|code| {
        matches!(
            code,
            ErrorCode::ThrottlingMaxActiveJobCountExceeded | ErrorCode::JobQuotaExceeded
        )
    })
}

fn status_lines(out: Output, jobs: &[(&str, &str, bool, Option<&str>)]) {
    out.line("");
    for (job_id, _, complete, _) in jobs {
        out.line(format!(
            "...job {job_id} {}",
            if *complete {
                "complete."
            } else {
                "still running."
            }
        ));
    }
    out.line("Job status posted, press Ctrl-C to exit");
    let items: Vec<Value> = jobs
        .iter()
        .map(|(job_id, kind, complete, status)| {
            json!({ "jobId": job_id, "kind": kind, "state": if *complete { "complete" } else { "running" }, "status": status })
        })
        .collect();
    out.json_line(&json!({ "event": "status", "jobs": items }));
}

async fn client_side(
    client: &ServiceClient,
    args: &TutorialArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let stop = shutdown.child_token();
    let device = args.device_id.clone();
    let c = client.clone();
    let d = device.clone();
    let mut method = Delayed::spawn(METHOD_NAME, args.method_delay, stop.clone(), async move {
        c.invoke_method(&d, &method_call()).await
    });
    out.line("");
    out.line(format!(
        "Direct method called with Job Id: {}",
        method.job_id
    ));
    let c = client.clone();
    let d = device.clone();
    let mut twin = Delayed::spawn("twin update", args.twin_delay, stop.clone(), async move {
        let patch = TwinPatch::new().with_desired(desired_patch());
        c.update_twin(&d, &patch, None).await
    });
    out.line("");
    out.line(format!("Device twin called with Job Id: {}", twin.job_id));
    out.json_line(&json!({
        "event": "scheduled", "deviceId": device, "mode": "client",
        "jobs": [
            { "jobId": method.job_id, "kind": "method", "dueInSeconds": args.method_delay.as_secs_f64() },
            { "jobId": twin.job_id, "kind": "twin", "dueInSeconds": args.twin_delay.as_secs_f64() },
        ]
    }));

    let mut ticker = tokio::time::interval(args.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Shutdown first: a task that ended because of it must be reported as undone, not
            // collected as a result.
            biased;
            () = shutdown.cancelled() => {
                stop.cancel();
                let undone: Vec<String> = [(!method.done()).then(|| method.undone()), (!twin.done()).then(|| twin.undone())]
                    .into_iter()
                    .flatten()
                    .collect();
                return Ok(interrupted(out, undone));
            }
            _ = ticker.tick() => status_lines(out, &[
                (&method.job_id, "method", method.done(), None),
                (&twin.job_id, "twin", twin.done(), None),
            ]),
            r = &mut method.handle, if !method.done() => method.result = Some(join(r, METHOD_NAME)),
            r = &mut twin.handle, if !twin.done() => twin.result = Some(join(r, "twin update")),
        }
        if method.done() && twin.done() {
            status_lines(
                out,
                &[
                    (&method.job_id, "method", true, None),
                    (&twin.job_id, "twin", true, None),
                ],
            );
            break;
        }
    }
    let method_result = method
        .result
        .unwrap_or_else(|| Err(ServiceError::InvalidArgument("no result".into())));
    let twin_result = twin
        .result
        .unwrap_or_else(|| Err(ServiceError::InvalidArgument("no result".into())));
    let m = DeviceOutcome::from_call(device.clone(), method_result);
    let method_report = MethodReport::from_outcome(&method.job_id, &m);
    let twin_report = TwinReport::from_result(
        &twin.job_id,
        twin_result
            .map(|t| (t.desired_version(), t.version))
            .map_err(|e| e.to_string()),
    );
    Ok(done(out, &method_report, &twin_report))
}

struct MethodReport {
    job_id: String,
    ok: bool,
    status: Option<i32>,
    payload: Option<Value>,
    error: Option<String>,
}

impl MethodReport {
    fn from_outcome(job_id: &str, o: &DeviceOutcome) -> Self {
        Self {
            job_id: job_id.to_owned(),
            ok: o.succeeded(),
            status: o.method_status,
            payload: o.payload.clone(),
            error: match (&o.error, &o.error_code) {
                (Some(e), Some(code)) => Some(format!("{e} ({code})")),
                (e, _) => e.clone(),
            },
        }
    }
}

struct TwinReport {
    job_id: String,
    desired_version: Option<u64>,
    version: Option<u64>,
    error: Option<String>,
}

impl TwinReport {
    fn from_result(job_id: &str, r: Result<(Option<u64>, Option<u64>), String>) -> Self {
        match r {
            Ok((desired_version, version)) => Self {
                job_id: job_id.to_owned(),
                desired_version,
                version,
                error: None,
            },
            Err(e) => Self {
                job_id: job_id.to_owned(),
                desired_version: None,
                version: None,
                error: Some(e),
            },
        }
    }
}

fn done(out: Output, method: &MethodReport, twin: &TwinReport) -> Outcome {
    out.line("");
    match (&method.error, method.status) {
        (None, Some(status)) => out.line(format!(
            "Direct method {METHOD_NAME} called: the device answered {status} {}",
            method
                .payload
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default()
        )),
        (Some(e), _) => out.line(format!("Direct method {METHOD_NAME} failed: {e}")),
        (None, None) => out.line(format!("Direct method {METHOD_NAME}: no answer")),
    }
    match &twin.error {
        None => out.line(format!(
            "Device twin updated: desired $version {}, twin version {}",
            twin.desired_version
                .map_or("?".to_owned(), |v| v.to_string()),
            twin.version.map_or("?".to_owned(), |v| v.to_string())
        )),
        Some(e) => out.line(format!("Device twin update failed: {e}")),
    }
    let twin_ok = twin.error.is_none();
    let mut reasons = Vec::new();
    if !method.ok {
        reasons.push(format!(
            "{METHOD_NAME} did not succeed: {}",
            method.error.clone().unwrap_or_else(|| "no answer".into())
        ));
    }
    if let Some(e) = &twin.error {
        reasons.push(format!("the twin update failed: {e}"));
    }
    out.json_line(&json!({
        "event": "done",
        "ok": method.ok && twin_ok,
        "method": { "jobId": method.job_id, "ok": method.ok, "status": method.status, "payload": method.payload, "error": method.error },
        "twin": { "jobId": twin.job_id, "ok": twin_ok, "desiredVersion": twin.desired_version, "version": twin.version, "error": twin.error },
        "reason": (!reasons.is_empty()).then(|| reasons.join("; ")),
    }));
    if reasons.is_empty() {
        Outcome::Success
    } else {
        Outcome::Failed(reasons.join("; "))
    }
}

fn interrupted(out: Output, undone: Vec<String>) -> Outcome {
    let msg = if undone.is_empty() {
        "stopped by Ctrl-C; nothing was left undone".to_owned()
    } else {
        format!("stopped by Ctrl-C: {}", undone.join("; "))
    };
    out.line("");
    out.line("IoTHubService sample stopped");
    out.json_line(&json!({ "event": "interrupted", "undone": undone }));
    note(&msg);
    Outcome::Failed(msg)
}

async fn hub_jobs(
    client: &ServiceClient,
    hub: &HubSettings,
    args: &TutorialArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let now = time::OffsetDateTime::now_utc();
    let condition = format!("deviceId = '{}'", escape_sql_string(&args.device_id));
    let method_id = uuid::Uuid::new_v4().to_string();
    let twin_id = uuid::Uuid::new_v4().to_string();
    let method_req = JobRequest::schedule_device_method(
        &method_id,
        &condition,
        method_call(),
        hub_core::timestamp::format_millis(now + args.method_delay),
        HUB_JOB_MAX_EXECUTION_SECS,
    );
    let twin_req = JobRequest::schedule_update_twin(
        &twin_id,
        &condition,
        TwinPatch::new().with_desired(desired_patch()),
        hub_core::timestamp::format_millis(now + args.twin_delay),
        HUB_JOB_MAX_EXECUTION_SECS,
    );
    client.create_job(&method_req).await?;
    out.line("");
    out.line(format!(
        "Direct method job scheduled with Job Id: {method_id}"
    ));
    // F1 and S1 hubs allow one active job at a time ("Maximum concurrent jobs: 1 (Free, S1)",
    // Microsoft Learn, "IoT Hub quotas and throttling"), and a scheduled job already counts: the
    // twin job is then created once the method job has ended, so the pair runs on every tier.
    // A known tier with that cap saves the creation the hub would refuse.
    let defer_twin = |why: &str| {
        out.line("");
        out.line(format!(
            "{why}: the device twin job {twin_id} will be scheduled when the method job ends."
        ));
        Some(twin_req.clone())
    };
    let single_job_tier = hub
        .tier
        .as_ref()
        .filter(|t| t.quotas.max_active_jobs() == 1);
    let mut deferred_twin = if let Some(known) = single_job_tier {
        defer_twin(&format!(
            "{} allows one active job at a time (from {})",
            known.quotas.tier, known.origin
        ))
    } else {
        match client.create_job(&twin_req).await {
            Ok(_) => {
                out.line("");
                out.line(format!("Device twin job scheduled with Job Id: {twin_id}"));
                None
            }
            Err(e) if is_active_job_cap(&e) => {
                defer_twin("The hub allows no more active jobs (F1 and S1 allow one)")
            }
            Err(e) => {
                // Nothing half-done: take the first job back.
                if let Err(cancel) = client.cancel_job(&method_id).await {
                    note(format!(
                        "could not cancel job {method_id} after the twin job failed: {cancel}"
                    ));
                }
                return Err(e.into());
            }
        }
    };
    let mut scheduled = vec![json!({
        "jobId": method_id, "kind": "method", "startTime": method_req.start_time
    })];
    if deferred_twin.is_none() {
        scheduled
            .push(json!({ "jobId": twin_id, "kind": "twin", "startTime": twin_req.start_time }));
    }
    out.json_line(&json!({
        "event": "scheduled", "deviceId": args.device_id, "mode": "hub-jobs", "jobs": scheduled,
    }));

    let mut ticker = tokio::time::interval(args.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (method_job, twin_job) = loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => {
                let mut undone = Vec::new();
                let created: &[(&String, &str)] = if deferred_twin.is_some() {
                    &[(&method_id, METHOD_NAME)]
                } else {
                    &[(&method_id, METHOD_NAME), (&twin_id, "twin update")]
                };
                for &(id, what) in created {
                    match client.get_job(id).await {
                        Ok(job) if job.is_terminal() => {}
                        _ => match client.cancel_job(id).await {
                            Ok(job) => undone.push(format!("job {id} ({what}) cancelled on the hub (now {})", job.status.as_ref().map_or("?", |s| s.as_str()))),
                            Err(e) => undone.push(format!("job {id} ({what}) could not be cancelled: {e}")),
                        },
                    }
                }
                if deferred_twin.is_some() {
                    undone.push(format!("job {twin_id} (twin update) was never scheduled"));
                }
                return Ok(interrupted(out, undone));
            }
        }
        let m = client.get_job(&method_id).await?;
        if m.is_terminal()
            && let Some(mut request) = deferred_twin.take()
        {
            // Its start time may have passed while it waited: it starts now, then.
            let now = time::OffsetDateTime::now_utc();
            let planned =
                hub_core::timestamp::parse(request.start_time.as_deref().unwrap_or_default()).ok();
            if planned.is_none_or(|at| at < now) {
                request.start_time = Some(hub_core::timestamp::format_millis(now));
            }
            client.create_job(&request).await?;
            out.line("");
            out.line(format!("Device twin job scheduled with Job Id: {twin_id}"));
            out.json_line(&json!({
                "event": "scheduled", "deviceId": args.device_id, "mode": "hub-jobs",
                "jobs": [{ "jobId": twin_id, "kind": "twin", "startTime": request.start_time }],
            }));
        }
        let state = |j: &JobResponse| j.status.as_ref().map(|s| s.as_str().to_owned());
        let ms = state(&m);
        if deferred_twin.is_some() {
            status_lines(
                out,
                &[
                    (&method_id, "method", m.is_terminal(), ms.as_deref()),
                    (&twin_id, "twin", false, Some("waiting to be scheduled")),
                ],
            );
            continue;
        }
        let t = client.get_job(&twin_id).await?;
        let ts = state(&t);
        status_lines(
            out,
            &[
                (&method_id, "method", m.is_terminal(), ms.as_deref()),
                (&twin_id, "twin", t.is_terminal(), ts.as_deref()),
            ],
        );
        if m.is_terminal() && t.is_terminal() {
            break (m, t);
        }
    };

    let rows = jobs::device_outcomes(client, &method_id).await?;
    let row = rows.into_iter().find(|r| r.device_id == args.device_id);
    let mut method_report = match &row {
        Some(o) => MethodReport::from_outcome(&method_id, o),
        None => MethodReport {
            job_id: method_id.clone(),
            ok: false,
            status: None,
            payload: None,
            error: Some("the job did not reach the device".into()),
        },
    };
    if method_job.status != Some(JobStatus::Completed) {
        method_report.ok = false;
        method_report.error.get_or_insert_with(|| {
            format!(
                "job ended {}",
                method_job.status.as_ref().map_or("?", |s| s.as_str())
            )
        });
    }
    if method_report.ok
        && !method_report
            .status
            .is_some_and(|s| (200..300).contains(&s))
    {
        method_report.ok = false;
        method_report.error = Some(format!(
            "the device answered {}",
            method_report
                .status
                .map_or("nothing".into(), |s| s.to_string())
        ));
    }
    let twin_rows = jobs::device_outcomes(client, &twin_id).await?;
    let twin_ok = twin_job.status == Some(JobStatus::Completed)
        && twin_rows
            .iter()
            .any(|r| r.device_id == args.device_id && r.succeeded());
    let twin_report = if twin_ok {
        let twin = client.get_twin(&args.device_id).await?;
        TwinReport::from_result(&twin_id, Ok((twin.desired_version(), twin.version)))
    } else {
        let reason = twin_rows
            .iter()
            .find_map(|r| r.error.clone())
            .or_else(|| twin_job.failure_reason().map(str::to_owned))
            .unwrap_or_else(|| {
                format!(
                    "job ended {}",
                    twin_job.status.as_ref().map_or("?", |s| s.as_str())
                )
            });
        TwinReport::from_result(&twin_id, Err(reason))
    };
    Ok(done(out, &method_report, &twin_report))
}
