//! The jobs engine: the scheduler starts each job at its `startTime`; a runner fixes the job's
//! devices (the query condition over the twins at that moment) and executes the method or twin
//! patch on them, saving device progress (group-committed) before it becomes visible.
//! Invariant: a runner always ends its job (completed, failed, cancelled) unless the hub shuts
//! down, in which case what was saved is exactly what the next start resumes from.
//!
//! Guarantee across a crash (`kill -9`, power loss aside): a twin job applies its patch exactly
//! once per device (each batch of twin updates commits with its rows); a method job invokes
//! each device at most once, except calls in flight at the crash, which are invoked once more
//! on resume. A device's row is saved as `running` before its method is sent and its outcome is
//! saved in the next group commit after the answer, so only rows left `running` are re-invoked,
//! and at most [`MAX_IN_FLIGHT`] of them. IoT Hub documents no delivery guarantee for the calls
//! of a job: the jobs guide describes a method job's devices and statuses only ([DOCS jobs],
//! <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-jobs>), and the direct-methods
//! guide gives method calls no ordering or concurrency guarantee ([DOCS direct-methods],
//! <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-direct-methods>), so a handler
//! must tolerate a repeat; this is the narrowest repeat a crash-safe hub can promise (a call
//! whose outcome was not saved cannot be told apart from one never sent).
//! Checked by `tests/crash.rs` (kill -9 at random points, 500 devices).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use hub_core::job::{
    DeviceJob, DeviceJobError, DeviceJobOutcome, DeviceJobStatus, JobStatus, JobType,
};
use hub_core::method::CloudToDeviceMethodResult;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::model::{JobRecord, Tally as _, format_time};
use super::{Finish, JobError, Jobs, Row};
use crate::hub::{Hub, MethodCall, MethodOutcome, OperationError};
use crate::query::{self, QueryError};
use crate::store::{StoreError, Write};

/// Why a running job failed as a whole. The message becomes the job's `failureReason` and each
/// unfinished device's error description, so it carries its cause's text rather than chaining it.
#[derive(Debug, thiserror::Error)]
pub enum JobRunError {
    /// The stored `queryCondition` no longer parses.
    #[error("the queryCondition cannot be evaluated: {0}")]
    Condition(QueryError),
    /// The job's start (its rows and `running` status) could not be saved.
    #[error("the job could not be saved: {0}")]
    NotSaved(StoreError),
    /// A batch of device outcomes could not be saved.
    #[error("device outcomes could not be saved: {0}")]
    OutcomesNotSaved(StoreError),
    /// The stored `cloudToDeviceMethod` is not a valid method call.
    #[error("the job's cloudToDeviceMethod is invalid: {0}")]
    InvalidMethod(OperationError),
    /// A method job without `cloudToDeviceMethod`.
    #[error("the job has no cloudToDeviceMethod")]
    NoMethod,
    /// A twin job without `updateTwin`.
    #[error("the job has no updateTwin")]
    NoUpdateTwin,
    /// A record could not be encoded for the store (a bug).
    #[error("{0}")]
    Encode(String),
    /// A job type this hub does not run (from a damaged store; requests are validated).
    #[error("job type `{0}` cannot run on /jobs/v2")]
    UnsupportedType(JobType),
}

/// Direct methods a job has in flight at once. Each waits on a device (up to the connect plus
/// response timeouts), so the cap bounds memory and the hub's pending-request table, not CPU;
/// 256 keeps 10,000 devices moving in a few round trips without flooding session queues.
pub const MAX_IN_FLIGHT: usize = 256;
/// Devices per twin-update transaction: large enough that 10,000 devices take 20 commits,
/// small enough that one batch holds its devices' write locks for milliseconds only.
pub const TWIN_BATCH: usize = 500;
/// Device outcomes gathered into one transaction at most (a group commit takes what answered
/// during the previous commit; this bounds one transaction's size when commits are slow).
const FLUSH_ROWS: usize = 500;
/// Longest wait the engine computes (guards `Instant` arithmetic against huge deadlines).
const FAR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A record's stored JSON text.
fn encode<T: serde::Serialize>(value: &T) -> Result<String, JobRunError> {
    super::encode(value).map_err(|e| match e {
        JobError::Internal(message) => JobRunError::Encode(message),
        other => JobRunError::Encode(other.to_string()),
    })
}

fn json_value<T: serde::Serialize>(value: &T) -> Value {
    // Hub-core wire types hold strings, numbers and JSON values only: this cannot fail.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn until(at: OffsetDateTime) -> Instant {
    let seconds = (at - OffsetDateTime::now_utc())
        .as_seconds_f64()
        .clamp(0.0, FAR.as_secs_f64());
    Instant::now() + Duration::from_secs_f64(seconds)
}

/// The scheduler loop: starts due jobs (and jobs left running by a previous process), prunes
/// old ones hourly, sleeps until the next start time or a new job.
pub(super) async fn schedule(jobs: Jobs, shutdown: CancellationToken, tracker: TaskTracker) {
    let mut next_prune = Instant::now() + super::PRUNE_EVERY;
    loop {
        let notified = jobs.inner.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (due, next_start) = jobs.take_due(OffsetDateTime::now_utc());
        for id in due {
            tracker.spawn(run(jobs.clone(), id, shutdown.clone()));
        }
        if Instant::now() >= next_prune {
            if let Err(e) = jobs.prune(OffsetDateTime::now_utc()).await {
                tracing::warn!(error = %e, "could not prune old jobs");
            }
            next_prune = Instant::now() + super::PRUNE_EVERY;
        }
        let wake_at = next_start.map_or(next_prune, |at| until(at).min(next_prune));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

impl Jobs {
    /// Marks due jobs as owned by a runner; returns them and the next future start time.
    fn take_due(&self, now: OffsetDateTime) -> (Vec<String>, Option<OffsetDateTime>) {
        let mut state = self.lock();
        let mut due = Vec::new();
        let mut next: Option<OffsetDateTime> = None;
        for entry in state
            .jobs
            .values_mut()
            .filter(|e| e.is_active() && !e.runner)
        {
            let start = entry.record.start_at();
            if entry.record.status == JobStatus::Running || start <= now {
                entry.runner = true;
                due.push(entry.record.job_id.clone());
            } else {
                next = Some(next.map_or(start, |n| n.min(start)));
            }
        }
        (due, next)
    }
}

/// What a runner works through.
struct Plan {
    record: JobRecord,
    pending: Vec<String>,
    cancel: CancellationToken,
}

/// One job's run, from start (or resume) to its end or the hub's shutdown.
async fn run(jobs: Jobs, id: String, shutdown: CancellationToken) {
    let plan = match begin(&jobs, &id).await {
        Ok(Some(plan)) => plan,
        Ok(None) => return,
        Err(reason) => {
            let _ = jobs.finish(&id, Finish::Failed(reason)).await;
            return;
        }
    };
    let deadline = until(plan.record.deadline());
    tracing::info!(job_id = %id, devices = plan.pending.len(), "job running");
    let ended = match &plan.record.job_type {
        JobType::ScheduleDeviceMethod => run_methods(&jobs, &plan, deadline, &shutdown).await,
        JobType::ScheduleUpdateTwin => run_twins(&jobs, &plan, deadline, &shutdown).await,
        other => Ended::Fatal(JobRunError::UnsupportedType(other.clone())),
    };
    let how = match ended {
        Ended::Shutdown => return,
        Ended::Done => Finish::Completed,
        Ended::Cancelled => Finish::Cancelled,
        Ended::TimedOut => Finish::TimedOut,
        Ended::Fatal(reason) => Finish::Failed(reason),
    };
    let _ = jobs.finish(&id, how).await;
}

/// Moves a due job to `running`: evaluates its condition over the twins now and saves one
/// `pending` row per matching device, with the job, in one transaction. A resumed job keeps its
/// rows. Returns `None` if the job ended meanwhile (cancelled).
async fn begin(jobs: &Jobs, id: &str) -> Result<Option<Plan>, JobRunError> {
    let Some(_writing) = jobs.write_lock(id).await else {
        return Ok(None);
    };
    let (record, cancel) = {
        let state = jobs.lock();
        let Some(entry) = state.jobs.get(id) else {
            return Ok(None);
        };
        if entry.record.status.is_terminal() {
            return Ok(None);
        }
        (entry.record.clone(), entry.cancel.clone())
    };
    if record.status == JobStatus::Running {
        let state = jobs.lock();
        let Some(entry) = state.jobs.get(id) else {
            return Ok(None);
        };
        let pending = entry
            .rows
            .values()
            .filter(|r| !r.row.status.is_terminal())
            .map(|r| r.row.device_id.clone())
            .collect();
        return Ok(Some(Plan {
            record: entry.record.clone(),
            pending,
            cancel,
        }));
    }
    let condition =
        query::parse_condition(&record.query_condition).map_err(JobRunError::Condition)?;
    let twins = jobs.hub().twin_documents_after(None);
    let devices: Vec<String> = query::filter_parallel(&condition, &twins)
        .into_iter()
        .filter_map(|index| twins.get(index))
        .filter_map(|doc| {
            doc.get("deviceId")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    let now = format_time(OffsetDateTime::now_utc());
    let rows: Vec<DeviceJob> = devices
        .iter()
        .map(|device_id| DeviceJob {
            device_id: device_id.clone(),
            job_id: id.to_owned(),
            job_type: record.job_type.clone(),
            status: DeviceJobStatus::Pending,
            start_time_utc: None,
            end_time_utc: None,
            created_date_time_utc: Some(now.clone()),
            last_updated_date_time_utc: Some(now.clone()),
            outcome: None,
            error: None,
            extra: Map::new(),
        })
        .collect();
    if !matches!(record.status, JobStatus::Scheduled | JobStatus::Queued) {
        return Ok(None);
    }
    let mut running = record;
    running.status = JobStatus::Running;
    running.run_started_time = Some(now);
    let mut writes = Vec::with_capacity(rows.len() + 1);
    writes.push(Write::PutJob {
        id: id.to_owned(),
        doc: encode(&running)?,
    });
    for row in &rows {
        writes.push(Write::PutDeviceJob {
            job_id: id.to_owned(),
            device_id: row.device_id.clone(),
            doc: encode(row)?,
        });
    }
    jobs.hub()
        .store()
        .commit(writes)
        .await
        .map_err(JobRunError::NotSaved)?;
    // The job's write lock kept every other change of it out since its record was read.
    let mut state = jobs.lock();
    let Some(entry) = state.jobs.get_mut(id) else {
        return Ok(None);
    };
    for row in rows {
        entry.stats.add(&row.status);
        entry.rows.insert(row.device_id.clone(), Row::new(row));
    }
    entry.record = running.clone();
    Ok(Some(Plan {
        record: running,
        pending: devices,
        cancel,
    }))
}

enum Ended {
    Done,
    Cancelled,
    TimedOut,
    Shutdown,
    Fatal(JobRunError),
}

/// A device's progress, saved in batches.
enum Event {
    Started {
        device_id: String,
        at: OffsetDateTime,
    },
    Finished {
        device_id: String,
        started: OffsetDateTime,
        ended: OffsetDateTime,
        result: Result<Option<DeviceJobOutcome>, DeviceJobError>,
    },
}

fn device_error(error: &OperationError) -> DeviceJobError {
    DeviceJobError::new(error.code().name(), error.to_string())
}

async fn invoke(hub: Hub, device_id: String, call: MethodCall) -> Event {
    let started = OffsetDateTime::now_utc();
    let result = match hub.invoke_method(&device_id, &call).await {
        // The device answered, whatever its status: for IoT Hub the device's work is done and
        // its answer is the outcome.
        Ok(MethodOutcome { status, payload }) => Ok(Some(DeviceJobOutcome::method_response(
            CloudToDeviceMethodResult { status, payload },
        ))),
        Err(e) => Err(device_error(&e)),
    };
    Event::Finished {
        device_id,
        started,
        ended: OffsetDateTime::now_utc(),
        result,
    }
}

/// Why a runner must stop before starting more work, if it must: cancelled, shutting down, or
/// past `maxExecutionTimeInSeconds`.
fn stop_reason(plan: &Plan, deadline: Instant, shutdown: &CancellationToken) -> Option<Ended> {
    if plan.cancel.is_cancelled() {
        Some(Ended::Cancelled)
    } else if shutdown.is_cancelled() {
        Some(Ended::Shutdown)
    } else if Instant::now() >= deadline {
        Some(Ended::TimedOut)
    } else {
        None
    }
}

async fn run_methods(
    jobs: &Jobs,
    plan: &Plan,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Ended {
    let Some(method) = &plan.record.cloud_to_device_method else {
        return Ended::Fatal(JobRunError::NoMethod);
    };
    // The hub validates method calls from their JSON, the same way as `POST /twins/{id}/methods`.
    let call = match MethodCall::from_request(&json_value(method)) {
        Ok(call) => call,
        Err(e) => return Ended::Fatal(JobRunError::InvalidMethod(e)),
    };
    let job_id = &plan.record.job_id;
    let mut queue = plan.pending.iter();
    let mut in_flight = FuturesUnordered::new();
    // Outcomes gathered since the last save.
    let mut batch: Vec<Event> = Vec::new();
    let ended = loop {
        // Checked before anything new is invoked (the select below only sees them once the
        // next call answers).
        if let Some(ended) = stop_reason(plan, deadline, shutdown) {
            break ended;
        }
        // The next devices' rows are saved as `running` before their calls go out, in one
        // transaction with the outcomes gathered meanwhile: after a crash, only a row saved as
        // `running` can have had its call sent without its outcome saved (the module's guarantee).
        let room = MAX_IN_FLIGHT
            .saturating_sub(in_flight.len())
            .min(queue.len());
        // On a tier, only the device operations its pace has due now go out.
        let room = jobs.pace().map_or(room, |pace| pace.take_due(room));
        let mut starting = Vec::new();
        while starting.len() < room {
            let Some(device_id) = queue.next() else { break };
            batch.push(Event::Started {
                device_id: device_id.clone(),
                at: OffsetDateTime::now_utc(),
            });
            starting.push(device_id);
        }
        match flush(jobs, job_id, std::mem::take(&mut batch)).await {
            Ok(Saved::Yes) => {}
            // Cancelled meanwhile: its end decided these rows; nothing more may be invoked.
            Ok(Saved::JobEnded) => break Ended::Cancelled,
            Err(reason) => break Ended::Fatal(reason),
        }
        for device_id in starting {
            in_flight.push(invoke(jobs.hub().clone(), device_id.clone(), call.clone()));
        }
        if in_flight.is_empty() && queue.len() == 0 {
            break Ended::Done;
        }
        let next_slot = jobs
            .pace()
            .filter(|_| queue.len() > 0 && in_flight.len() < MAX_IN_FLIGHT)
            .map(|pace| pace.next_due());
        tokio::select! {
            biased;
            _ = plan.cancel.cancelled() => break Ended::Cancelled,
            _ = shutdown.cancelled() => break Ended::Shutdown,
            _ = tokio::time::sleep_until(deadline) => break Ended::TimedOut,
            _ = tokio::time::sleep_until(next_slot.unwrap_or(deadline)), if next_slot.is_some() => {}
            Some(event) = in_flight.next() => {
                // Group commit: whatever else answered while the last save was being committed
                // goes into the next one, so the commits per second stay bounded by the store's
                // speed while each outcome waits for one commit at most.
                batch.push(event);
                while batch.len() < FLUSH_ROWS {
                    match in_flight.next().now_or_never() {
                        Some(Some(event)) => batch.push(event),
                        _ => break,
                    }
                }
            }
        }
    };
    // What devices answered is real, whatever ended the run: save it before ending the job.
    // Calls still in flight are abandoned; their rows stay running (resumed) or end with the job.
    drop(in_flight);
    match flush(jobs, job_id, batch).await {
        Err(reason) if !matches!(ended, Ended::Fatal(_)) => Ended::Fatal(reason),
        _ => ended,
    }
}

async fn run_twins(
    jobs: &Jobs,
    plan: &Plan,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Ended {
    let Some(patch) = &plan.record.update_twin else {
        return Ended::Fatal(JobRunError::NoUpdateTwin);
    };
    // The hub applies twin updates from their JSON, the same way as `PATCH /twins/{id}`.
    let body = json_value(patch);
    let mut rest = plan.pending.as_slice();
    while !rest.is_empty() {
        if let Some(ended) = stop_reason(plan, deadline, shutdown) {
            return ended;
        }
        let size = TWIN_BATCH.min(rest.len());
        // On a tier, a batch holds only the device operations its pace has due now.
        let size = match jobs.pace() {
            None => size,
            Some(pace) => match pace.take_due(size) {
                0 => {
                    tokio::select! {
                        _ = plan.cancel.cancelled() => {}
                        _ = shutdown.cancelled() => {}
                        () = tokio::time::sleep_until(pace.next_due().min(deadline)) => {}
                    }
                    continue;
                }
                due => due,
            },
        };
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        let started = OffsetDateTime::now_utc();
        // One durable transaction per batch, committed off the async workers by the store.
        let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let results = jobs
            .hub()
            .update_twins_for_job(&ids, &body, Some("*"), false, Some(&plan.record.job_id))
            .await;
        let ended = OffsetDateTime::now_utc();
        let events = chunk
            .iter()
            .zip(results)
            .map(|(device_id, result)| Event::Finished {
                device_id: device_id.clone(),
                started,
                ended,
                result: result.map(|_| None).map_err(|e| device_error(&e)),
            })
            .collect();
        match flush(jobs, &plan.record.job_id, events).await {
            Ok(Saved::Yes) => {}
            Ok(Saved::JobEnded) => return Ended::Cancelled,
            Err(reason) => return Ended::Fatal(reason),
        }
    }
    Ended::Done
}

/// Whether a batch of device progress was saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Saved {
    /// Saved and shown (or there was nothing to save).
    Yes,
    /// The job ended meanwhile (cancelled, or gone): nothing was saved.
    JobEnded,
}

/// Saves a batch of device progress in one transaction, then shows it. Events for a job that
/// ended meanwhile (cancelled) are dropped: the job's end already decided those rows.
async fn flush(jobs: &Jobs, job_id: &str, events: Vec<Event>) -> Result<Saved, JobRunError> {
    if events.is_empty() {
        return Ok(Saved::Yes);
    }
    let Some(_writing) = jobs.write_lock(job_id).await else {
        return Ok(Saved::JobEnded);
    };
    let changed = {
        let state = jobs.lock();
        let Some(entry) = state.jobs.get(job_id) else {
            return Ok(Saved::JobEnded);
        };
        if entry.record.status != JobStatus::Running {
            return Ok(Saved::JobEnded);
        }
        let mut changed: HashMap<String, DeviceJob> = HashMap::with_capacity(events.len());
        for event in events {
            let device_id = match &event {
                Event::Started { device_id, .. } | Event::Finished { device_id, .. } => {
                    device_id.clone()
                }
            };
            let row = match changed.get_mut(&device_id) {
                Some(row) => row,
                None => {
                    let Some(current) = entry.rows.get(&device_id) else {
                        continue;
                    };
                    changed
                        .entry(device_id)
                        .or_insert_with(|| current.row.clone())
                }
            };
            match event {
                Event::Started { at, .. } => {
                    if row.status.is_terminal() {
                        continue;
                    }
                    row.status = DeviceJobStatus::Running;
                    row.start_time_utc = Some(format_time(at));
                    row.last_updated_date_time_utc = Some(format_time(at));
                }
                Event::Finished {
                    started,
                    ended,
                    result,
                    ..
                } => {
                    let ended_text = format_time(ended);
                    row.start_time_utc = Some(format_time(started));
                    row.end_time_utc = Some(ended_text.clone());
                    row.last_updated_date_time_utc = Some(ended_text);
                    match result {
                        Ok(outcome) => {
                            row.status = DeviceJobStatus::Completed;
                            row.outcome = outcome;
                            row.error = None;
                        }
                        Err(error) => {
                            row.status = DeviceJobStatus::Failed;
                            row.outcome = None;
                            row.error = Some(error);
                        }
                    }
                }
            }
        }
        changed
    };
    let mut writes = Vec::with_capacity(changed.len());
    for row in changed.values() {
        writes.push(Write::PutDeviceJob {
            job_id: job_id.to_owned(),
            device_id: row.device_id.clone(),
            doc: encode(row)?,
        });
    }
    jobs.hub()
        .store()
        .commit(writes)
        .await
        .map_err(JobRunError::OutcomesNotSaved)?;
    // The job's write lock kept every other change of it out since the rows were read.
    let mut state = jobs.lock();
    let Some(entry) = state.jobs.get_mut(job_id) else {
        return Ok(Saved::JobEnded);
    };
    for (device_id, row) in changed {
        if let Some(slot) = entry.rows.get_mut(&device_id) {
            entry.stats.shift(&slot.row.status, &row.status);
            *slot = Row::new(row);
        }
    }
    Ok(Saved::Yes)
}
