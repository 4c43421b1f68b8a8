//! IoT Hub Jobs v2: scheduled direct methods and twin updates over a query (reference §4.6, §4.7).
//!
//! [`Jobs`] holds every job with its per-device rows; [`routes()`] serves `/jobs/v2/...`; the
//! engine (`engine.rs`) starts due jobs and executes them.
//!
//! Invariants: a job or row change is committed to the [`Store`](crate::store::Store) before
//! anyone can read it here (rows in batches, one transaction each): it is staged under the
//! job's write lock (`Entry::writing`, async, held from staging to applying, so two changes of
//! one job never interleave), committed with no std lock held, then applied. Every job that
//! leaves `running` gets an `endTime`; statistics always equal the tally of the rows. The
//! `state` lock is a std mutex held only to read, stage or apply, never across an `.await`, a
//! commit or the hub's calls.

mod engine;
mod model;
mod request;
mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hub_core::job::{
    DeviceJob, DeviceJobError, DeviceJobStatistics, DeviceJobStatus, JobResponse, JobStatus,
    JobType,
};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use engine::{JobRunError, MAX_IN_FLIGHT};
pub use model::{JobRecord, Tally, format_time, parse_time};
pub use request::{
    DEFAULT_MAX_EXECUTION_SECS, InvalidJobRequest, JobSpec, parse_request, validate_job_id,
};
pub use routes::routes;

use crate::hub::{Hub, OperationError};
use crate::store::{StoreError, Write};

/// How long IoT Hub keeps finished jobs (reference §6.3): older ones are deleted at startup
/// and hourly.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often finished jobs past [`RETENTION`] are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why a jobs request failed; each maps to one IoT Hub error code.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// 400 `ArgumentInvalid`.
    #[error(transparent)]
    InvalidArgument(#[from] InvalidJobRequest),
    /// 404 `JobNotFound`.
    #[error("Job {0} not found.")]
    NotFound(String),
    /// 409 `JobAlreadyExists`.
    #[error("A job with id '{0}' already exists.")]
    AlreadyExists(String),
    /// 429 `ThrottlingMaxActiveJobCountExceeded`.
    #[error(
        "The hub already has {max} active jobs, its maximum; wait for one to finish or cancel one."
    )]
    TooManyActive {
        /// The cap.
        max: usize,
    },
    /// The store could not be written; nothing changed.
    #[error("the jobs store failed: {0}")]
    Store(#[from] StoreError),
    /// The hub could not encode or finish its own work (a bug, reported as 500); nothing changed.
    #[error("internal error: {0}")]
    Internal(String),
}

/// One device's row, with its query document kept ready.
#[derive(Debug)]
struct Row {
    row: DeviceJob,
    doc: Arc<Value>,
}

impl Row {
    fn new(row: DeviceJob) -> Row {
        let doc = model::row_document(&row);
        Row { row, doc }
    }
}

#[derive(Debug)]
struct Entry {
    record: JobRecord,
    stats: DeviceJobStatistics,
    rows: BTreeMap<String, Row>,
    /// Fired by cancel; the runner stops and finishes the job as `cancelled`.
    cancel: CancellationToken,
    /// Notified when the job reaches a terminal status.
    done: Arc<Notify>,
    /// Whether a runner task owns this job in this process.
    runner: bool,
    /// Held by every change of this job from staging to applying (see the module's
    /// invariants), so two changes of one job never interleave.
    writing: Arc<tokio::sync::Mutex<()>>,
}

impl Entry {
    fn new(record: JobRecord) -> Entry {
        Entry {
            record,
            stats: DeviceJobStatistics::default(),
            rows: BTreeMap::new(),
            cancel: CancellationToken::new(),
            done: Arc::new(Notify::new()),
            runner: false,
            writing: Arc::default(),
        }
    }

    fn response(&self) -> JobResponse {
        self.record.response(self.stats)
    }

    fn is_active(&self) -> bool {
        !self.record.status.is_terminal()
    }
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<String, Entry>,
    /// Jobs being created (their record is being committed): they count as existing and
    /// active, so neither a second create of the same id nor the active-job cap can race them.
    creating: BTreeSet<String>,
}

#[derive(Debug)]
struct Inner {
    hub: Hub,
    max_active: usize,
    /// The tier's pace for device operations (None: as fast as the hub goes).
    pace: Option<crate::throttle::Pace>,
    state: Mutex<State>,
    /// Wakes the scheduler (a job was created).
    wake: Notify,
}

/// The jobs engine handle (cheap to clone).
#[derive(Debug, Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

/// A record's stored JSON text.
fn encode<T: serde::Serialize>(value: &T) -> Result<String, JobError> {
    serde_json::to_string(value)
        .map_err(|e| JobError::Internal(format!("cannot encode a job: {e}")))
}

impl Jobs {
    /// Loads stored jobs and their device rows, prunes finished jobs older than [`RETENTION`].
    ///
    /// A job that was `running` when the hub stopped resumes where it was: rows already
    /// `completed`, `failed` or `canceled` are kept and never executed again; rows still
    /// `running` at the crash (the call was sent, the device may or may not have acted) go back
    /// to `pending` and are executed again. Rows are saved as `running` before their call is
    /// sent, so no other row can have been executed (the guarantee in `engine.rs`).
    /// Unreadable records are skipped with a warning rather than refusing to start.
    ///
    /// With `pace`, device operations run at the tier's jobs device-operations rate.
    pub fn open(
        hub: Hub,
        max_active: usize,
        pace: Option<crate::throttle::Pace>,
    ) -> Result<Jobs, OperationError> {
        let store = hub.store();
        let mut state = State::default();
        for (id, text) in store.load_jobs()? {
            match serde_json::from_str::<JobRecord>(&text) {
                Ok(record) => {
                    state.jobs.insert(id, Entry::new(record));
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "skipping an unreadable stored job")
                }
            }
        }
        for (job_id, device_id, text) in store.load_device_jobs()? {
            let Some(entry) = state.jobs.get_mut(&job_id) else {
                continue;
            };
            match serde_json::from_str::<DeviceJob>(&text) {
                Ok(mut row) => {
                    if row.status == DeviceJobStatus::Running
                        && entry.record.status == JobStatus::Running
                    {
                        row.status = DeviceJobStatus::Pending;
                        row.start_time_utc = None;
                    }
                    entry.stats.add(&row.status);
                    entry.rows.insert(device_id, Row::new(row));
                }
                Err(e) => {
                    tracing::warn!(job_id = %job_id, device_id = %device_id, error = %e, "skipping an unreadable stored device-job row");
                }
            }
        }
        let jobs = Jobs {
            inner: Arc::new(Inner {
                hub,
                max_active: max_active.max(1),
                pace,
                state: Mutex::new(state),
                wake: Notify::new(),
            }),
        };
        let expired = jobs.expired(OffsetDateTime::now_utc());
        if !expired.is_empty() {
            jobs.hub().store().write(&delete_jobs(&expired))?;
            jobs.forget(&expired);
        }
        Ok(jobs)
    }

    /// Starts the scheduler: due jobs run on `tracker`; everything stops on `shutdown` (a job
    /// interrupted by shutdown stays `running` in the store and resumes on the next start).
    pub fn spawn(&self, shutdown: CancellationToken, tracker: &TaskTracker) {
        tracker.spawn(engine::schedule(self.clone(), shutdown, tracker.clone()));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug already reported; every mutation is computed
        // and stored before it is applied, so the data is still consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The tier's pace for device operations, if any.
    fn pace(&self) -> Option<&crate::throttle::Pace> {
        self.inner.pace.as_ref()
    }

    /// `PUT /jobs/v2/{id}`: validates and schedules a job; returns its `JobResponse`.
    pub async fn create(&self, id: &str, body: &Value) -> Result<JobResponse, JobError> {
        let now = OffsetDateTime::now_utc();
        let spec = parse_request(id, body, now)?;
        let status = if spec.start_time > now {
            JobStatus::Scheduled
        } else {
            JobStatus::Queued
        };
        let record = JobRecord {
            job_id: id.to_owned(),
            job_type: spec.job_type,
            query_condition: spec.query_condition,
            created_time: format_time(now),
            start_time: format_time(spec.start_time),
            end_time: None,
            max_execution_time_in_seconds: spec.max_execution_secs,
            cloud_to_device_method: spec.method,
            update_twin: spec.update_twin,
            status: status.clone(),
            failure_reason: None,
            status_message: None,
            run_started_time: None,
        };
        let doc = encode(&record)?;
        {
            let mut state = self.lock();
            if state.jobs.contains_key(id) || state.creating.contains(id) {
                return Err(JobError::AlreadyExists(id.to_owned()));
            }
            let active = state.jobs.values().filter(|e| e.is_active()).count();
            if active + state.creating.len() >= self.inner.max_active {
                return Err(JobError::TooManyActive {
                    max: self.inner.max_active,
                });
            }
            state.creating.insert(id.to_owned());
        }
        // Applied by the store's writer right after the commit, as device changes are: a caller
        // that goes away must not leave the id reserved, nor a stored job the engine never saw.
        let (jobs, id) = (self.clone(), id.to_owned());
        let (done, outcome) = tokio::sync::oneshot::channel();
        let write = Write::PutJob {
            id: id.clone(),
            doc,
        };
        self.hub().store().commit_then(vec![write], move |saved| {
            let created = {
                let mut state = jobs.lock();
                state.creating.remove(&id);
                saved.map(|()| {
                    let entry = Entry::new(record);
                    let response = entry.response();
                    state.jobs.insert(id.clone(), entry);
                    response
                })
            };
            if created.is_ok() {
                tracing::info!(job_id = %id, status = status.as_str(), "job created");
                jobs.inner.wake.notify_one();
                jobs.hub()
                    .feed()
                    .publish(|| crate::feed::Change::Job(Arc::from(id.as_str())));
            }
            // Released before the caller hears back (see `Hub::commit_devices`).
            drop(jobs);
            let _ = done.send(created);
        });
        match outcome.await {
            Ok(created) => Ok(created?),
            Err(_) => Err(JobError::Internal(
                "the store dropped a job's commit without answering".into(),
            )),
        }
    }

    /// `GET /jobs/v2/{id}`.
    pub fn get(&self, id: &str) -> Result<JobResponse, JobError> {
        self.lock()
            .jobs
            .get(id)
            .map(Entry::response)
            .ok_or_else(|| JobError::NotFound(id.to_owned()))
    }

    /// `POST /jobs/v2/{id}/cancel`: stops the job (running work is abandoned, devices not done
    /// become `canceled`) and returns it; a job already finished is returned unchanged.
    pub async fn cancel(&self, id: &str) -> Result<JobResponse, JobError> {
        let waiting = {
            let mut state = self.lock();
            let entry = state
                .jobs
                .get_mut(id)
                .ok_or_else(|| JobError::NotFound(id.to_owned()))?;
            if entry.record.status.is_terminal() {
                return Ok(entry.response());
            }
            if entry.record.status == JobStatus::Running && entry.runner {
                // The runner owns the rows: it saves what devices already answered, then marks
                // the rest canceled. Register for its signal before firing, so none is missed.
                let done = Arc::clone(&entry.done);
                entry.cancel.cancel();
                Some(done)
            } else {
                entry.cancel.cancel();
                None
            }
        };
        if let Some(done) = waiting {
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_terminal(id) {
                // The runner stops within one flush; the timeout only guards against a bug.
                let _ = tokio::time::timeout(Duration::from_secs(10), notified).await;
            }
        }
        if !self.is_terminal(id) {
            self.finish(id, Finish::Cancelled).await?;
        }
        self.get(id)
    }

    fn is_terminal(&self, id: &str) -> bool {
        self.lock()
            .jobs
            .get(id)
            .is_none_or(|e| e.record.status.is_terminal())
    }

    /// `GET /jobs/v2/query`: jobs of `job_type` and `status` (each optional), in job-id order,
    /// at most `limit` of them after the job id `after`. Returns the page and whether more follow.
    pub fn query(
        &self,
        job_type: Option<JobType>,
        status: Option<JobStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<JobResponse>, bool) {
        use std::ops::Bound;
        let state = self.lock();
        let range = match after {
            Some(after) => state
                .jobs
                .range::<str, _>((Bound::Excluded(after), Bound::Unbounded)),
            None => state.jobs.range::<str, _>(..),
        };
        let mut matching = range.map(|(_, e)| e).filter(|e| {
            job_type.as_ref().is_none_or(|t| e.record.job_type == *t)
                && status.as_ref().is_none_or(|s| e.record.status == *s)
        });
        let page: Vec<JobResponse> = matching
            .by_ref()
            .take(limit.max(1))
            .map(Entry::response)
            .collect();
        let more = matching.next().is_some();
        (page, more)
    }

    /// The device-job rows for `SELECT * FROM devices.jobs`, ordered by (jobId, deviceId): only
    /// those of job `only` when given, and only those strictly after `after` (a page's last
    /// row). A page of one job's rows costs that job's rows, not every row of the hub.
    pub fn device_job_documents(
        &self,
        only: Option<&str>,
        after: Option<(&str, &str)>,
    ) -> Vec<Arc<Value>> {
        use std::ops::Bound;
        let state = self.lock();
        let jobs: Box<dyn Iterator<Item = (&String, &Entry)>> = match (only, after) {
            (Some(job), _) => Box::new(state.jobs.get_key_value(job).into_iter()),
            (None, Some((job, _))) => Box::new(
                state
                    .jobs
                    .range::<str, _>((Bound::Included(job), Bound::Unbounded)),
            ),
            (None, None) => Box::new(state.jobs.iter()),
        };
        let mut docs = Vec::new();
        for (job_id, entry) in jobs {
            let rows: Box<dyn Iterator<Item = &Row>> = match after {
                Some((after_job, after_device)) if job_id.as_str() == after_job => Box::new(
                    entry
                        .rows
                        .range::<str, _>((Bound::Excluded(after_device), Bound::Unbounded))
                        .map(|(_, row)| row),
                ),
                Some((after_job, _)) if job_id.as_str() < after_job => continue,
                _ => Box::new(entry.rows.values()),
            };
            docs.extend(rows.map(|r| Arc::clone(&r.doc)));
        }
        docs
    }

    /// Finished jobs whose `endTime` is older than [`RETENTION`] (IoT Hub's 30 days).
    fn expired(&self, now: OffsetDateTime) -> Vec<String> {
        let cutoff = now - RETENTION;
        self.lock()
            .jobs
            .values()
            .filter(|e| {
                e.record.status.is_terminal()
                    && e.record
                        .end_time
                        .as_deref()
                        .and_then(parse_time)
                        .is_some_and(|end| end < cutoff)
            })
            .map(|e| e.record.job_id.clone())
            .collect()
    }

    /// Drops deleted jobs from memory.
    fn forget(&self, ids: &[String]) {
        let mut state = self.lock();
        for id in ids {
            state.jobs.remove(id);
        }
        drop(state);
        tracing::info!(
            count = ids.len(),
            "pruned jobs past IoT Hub's 30-day retention"
        );
    }

    /// Deletes finished jobs past [`RETENTION`]; returns how many. Finished jobs are never
    /// written again, so nothing else changes them meanwhile.
    pub async fn prune(&self, now: OffsetDateTime) -> Result<usize, StoreError> {
        let expired = self.expired(now);
        if expired.is_empty() {
            return Ok(0);
        }
        self.hub().store().commit(delete_jobs(&expired)).await?;
        self.forget(&expired);
        Ok(expired.len())
    }

    /// Takes the write lock of job `id` (`None` if there is no such job). Every change of a
    /// created job is made under it, so its release tells the hub's watchers the job changed.
    async fn write_lock(&self, id: &str) -> Option<JobWriting> {
        let writing = Arc::clone(&self.lock().jobs.get(id)?.writing);
        Some(JobWriting {
            _guard: writing.lock_owned().await,
            jobs: self.clone(),
            id: Arc::from(id),
        })
    }

    /// Ends a job: rows not done get the status `how` implies, the job its terminal status and
    /// `endTime`; saved in one transaction, then applied. A store failure is logged and the job
    /// still ends in memory, so it is never left `running`.
    async fn finish(&self, id: &str, how: Finish) -> Result<(), JobError> {
        let Some(_writing) = self.write_lock(id).await else {
            return Ok(());
        };
        let now = OffsetDateTime::now_utc();
        let now_text = format_time(now);
        let (record, changed, status) = {
            let state = self.lock();
            let Some(entry) = state.jobs.get(id) else {
                return Ok(());
            };
            if entry.record.status.is_terminal() {
                return Ok(());
            }
            let (status, row_status, row_error, reason) = match &how {
                Finish::Completed => (JobStatus::Completed, DeviceJobStatus::Failed, None, None),
                Finish::Cancelled => (JobStatus::Cancelled, DeviceJobStatus::Canceled, None, None),
                Finish::TimedOut => {
                    let limit = entry.record.max_execution_time_in_seconds;
                    let description = format!(
                        "The job reached its maxExecutionTimeInSeconds ({limit} s) before this device was processed."
                    );
                    (
                        JobStatus::Failed,
                        DeviceJobStatus::Failed,
                        Some(DeviceJobError::new("JobRunTimeout", description)),
                        Some(format!(
                            "The job did not finish within maxExecutionTimeInSeconds ({limit} s)."
                        )),
                    )
                }
                Finish::Failed(error) => {
                    let reason = error.to_string();
                    (
                        JobStatus::Failed,
                        DeviceJobStatus::Failed,
                        Some(DeviceJobError::new("JobFailed", reason.clone())),
                        Some(reason),
                    )
                }
            };
            let mut record = entry.record.clone();
            record.status = status.clone();
            record.end_time = Some(now_text.clone());
            record.failure_reason = reason;
            let changed: Vec<DeviceJob> = entry
                .rows
                .values()
                .filter(|r| !r.row.status.is_terminal())
                .map(|r| {
                    let mut row = r.row.clone();
                    row.status = row_status.clone();
                    row.end_time_utc = Some(now_text.clone());
                    row.last_updated_date_time_utc = Some(now_text.clone());
                    row.error = row_error.clone();
                    row
                })
                .collect();
            (record, changed, status)
        };
        let mut writes: Vec<Write> = vec![Write::PutJob {
            id: id.to_owned(),
            doc: encode(&record)?,
        }];
        for row in &changed {
            writes.push(Write::PutDeviceJob {
                job_id: id.to_owned(),
                device_id: row.device_id.clone(),
                doc: encode(row)?,
            });
        }
        let saved = self.hub().store().commit(writes).await;
        if let Err(e) = &saved {
            tracing::error!(job_id = %id, error = %e, "could not save the end of the job; ending it in memory only");
        }
        let mut state = self.lock();
        let Some(entry) = state.jobs.get_mut(id) else {
            return Ok(());
        };
        for row in changed {
            if let Some(slot) = entry.rows.get_mut(&row.device_id) {
                entry.stats.shift(&slot.row.status, &row.status);
                *slot = Row::new(row);
            }
        }
        entry.record = record;
        entry.cancel.cancel();
        entry.done.notify_waiters();
        let stats = entry.stats;
        drop(state);
        tracing::info!(
            job_id = %id, status = status.as_str(), devices = stats.device_count,
            succeeded = stats.succeeded_count, failed = stats.failed_count, "job ended"
        );
        saved.map_err(JobError::from)
    }
}

/// The writes that delete `ids` with their device rows.
/// A job's write lock; when released, watchers hear that the job may have changed.
struct JobWriting {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    jobs: Jobs,
    id: Arc<str>,
}

impl Drop for JobWriting {
    fn drop(&mut self) {
        let id = Arc::clone(&self.id);
        self.jobs
            .hub()
            .feed()
            .publish(|| crate::feed::Change::Job(id));
    }
}

fn delete_jobs(ids: &[String]) -> Vec<Write> {
    ids.iter()
        .map(|id| Write::DeleteJob { id: id.clone() })
        .collect()
}

/// How a job ends.
#[derive(Debug)]
enum Finish {
    /// Every device was processed (no row is left pending; if one is, it failed).
    Completed,
    /// Cancelled by the service.
    Cancelled,
    /// `maxExecutionTimeInSeconds` ran out.
    TimedOut,
    /// A fatal error; its message is the job's `failureReason`.
    Failed(JobRunError),
}
