//! IoT Hub's import and export jobs: the whole identity registry (identities, keys, tags,
//! desired and reported properties) and, with `includeConfigurations`, its automatic device
//! configurations to a blob container, and a container's `devices.txt` (and
//! `configurations.txt`) into the registry (`POST /jobs/create`, `GET /jobs`, `GET /jobs/{id}`, `DELETE /jobs/{id}`).
//!
//! One job is active at a time, for every tier ("Only one active device import or export job is
//! allowed at a time for all IoT Hub tiers", Microsoft Learn, "Import and export IoT Hub device
//! identities in bulk"); a second create while one runs is refused with 403 `JobQuotaExceeded`,
//! as the C# SDK's `CreateJobAsync` maps it and users report it (azure-iot-sdk-csharp #608).
//! These jobs are apart from Jobs v2 ([`crate::jobs`]) and do not count toward its cap.
//!
//! Module map: this file (the job table and its rules), `blob` (container SAS URIs, Put Blob,
//! reading a blob's lines), `run` (what an export and an import do).
//!
//! Jobs are kept in memory: a hub restart forgets them (IoT Hub keeps 30 days of history).
//! Cancelling stops a job at its next await; a batch of an import already being committed is
//! still applied (a commit, once queued, always completes: see [`crate::hub`]).

mod blob;
mod run;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use hub_core::import_export::{ImportExportJob, ImportExportStatus};

pub use blob::{BlobError, MAX_LINE_BYTES, STORAGE_VERSION};

use crate::hub::Hub;

/// Most finished jobs remembered; the oldest are forgotten first.
pub const MAX_REMEMBERED: usize = 100;

/// Why an import/export request was refused; each maps to one IoT Hub error.
#[derive(Debug, thiserror::Error)]
pub enum ImportExportError {
    /// 400: the job document is not one the hub can run.
    #[error("{0}")]
    Invalid(String),
    /// 403 `JobQuotaExceeded`: another import or export job is active.
    #[error(
        "Only one active device import or export job is allowed at a time; job {0} is still \
         active. Wait for it to end (GET /jobs/{0}) or cancel it (DELETE /jobs/{0})."
    )]
    OneAtATime(String),
    /// 404: no such job.
    #[error("Job {0} not found.")]
    NotFound(String),
}

struct Entry {
    job: ImportExportJob,
    cancel: CancellationToken,
    /// Order of creation, to forget the oldest first.
    seq: u64,
}

#[derive(Default)]
struct Table {
    jobs: BTreeMap<String, Entry>,
    next_seq: u64,
}

/// Every import/export job the hub knows, and the one that may run.
#[derive(Clone)]
pub struct ImportExportJobs {
    hub: Hub,
    table: Arc<Mutex<Table>>,
    client: reqwest::Client,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for ImportExportJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportExportJobs").finish_non_exhaustive()
    }
}

impl ImportExportJobs {
    /// The job table; jobs run on `tracker` and stop at `shutdown`.
    pub fn new(hub: Hub, shutdown: CancellationToken, tracker: TaskTracker) -> ImportExportJobs {
        // A silence of 60 s fails a job; a long transfer that keeps moving does not.
        let client = reqwest::Client::builder()
            .read_timeout(std::time::Duration::from_secs(60))
            .connect_timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        ImportExportJobs {
            hub,
            table: Arc::default(),
            client,
            shutdown,
            tracker,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `POST /jobs/create`: checks the document, refuses a second active job, and starts it.
    /// `max_configurations` is the tier's count, which an import's configurations stay within.
    pub fn create(
        &self,
        request: ImportExportJob,
        max_configurations: usize,
    ) -> Result<ImportExportJob, ImportExportError> {
        let plan = run::Plan::from_request(&request)?;
        let job_id = uuid::Uuid::new_v4().to_string();
        let job = ImportExportJob {
            job_id: Some(job_id.clone()),
            status: Some(ImportExportStatus::Enqueued),
            start_time_utc: Some(crate::jobs::format_time(OffsetDateTime::now_utc())),
            end_time_utc: None,
            progress: Some(0),
            failure_reason: None,
            storage_authentication_type: request
                .storage_authentication_type
                .clone()
                .or(Some("keyBased".into())),
            input_blob_name: plan.input_blob_name(),
            output_blob_name: plan.output_blob_name(),
            configurations_blob_name: plan.configurations_blob_name(),
            ..request
        };
        let cancel = self.shutdown.child_token();
        {
            let mut table = self.lock();
            if let Some((active, _)) = table
                .jobs
                .iter()
                .find(|(_, e)| !e.job.status.is_some_and(ImportExportStatus::is_terminal))
            {
                return Err(ImportExportError::OneAtATime(active.clone()));
            }
            table.next_seq += 1;
            let seq = table.next_seq;
            table.jobs.insert(
                job_id.clone(),
                Entry {
                    job: job.clone(),
                    cancel: cancel.clone(),
                    seq,
                },
            );
            forget_oldest(&mut table);
        }
        tracing::info!(%job_id, kind = ?job.job_type, "import/export job created");
        let jobs = self.clone();
        self.tracker.spawn(async move {
            let outcome = tokio::select! {
                () = cancel.cancelled() => return,
                outcome = plan.run(&jobs, &job_id, max_configurations) => outcome,
            };
            jobs.finish(&job_id, outcome);
        });
        Ok(job)
    }

    /// `GET /jobs/{id}`.
    pub fn get(&self, id: &str) -> Result<ImportExportJob, ImportExportError> {
        self.lock()
            .jobs
            .get(id)
            .map(|e| e.job.clone())
            .ok_or_else(|| ImportExportError::NotFound(id.to_owned()))
    }

    /// `GET /jobs`: every remembered job, oldest first.
    pub fn list(&self) -> Vec<ImportExportJob> {
        let table = self.lock();
        let mut entries: Vec<&Entry> = table.jobs.values().collect();
        entries.sort_by_key(|e| e.seq);
        entries.into_iter().map(|e| e.job.clone()).collect()
    }

    /// `DELETE /jobs/{id}`: cancels an active job (an ended one is left as it ended).
    pub fn cancel(&self, id: &str) -> Result<ImportExportJob, ImportExportError> {
        let mut table = self.lock();
        let entry = table
            .jobs
            .get_mut(id)
            .ok_or_else(|| ImportExportError::NotFound(id.to_owned()))?;
        if !entry
            .job
            .status
            .is_some_and(ImportExportStatus::is_terminal)
        {
            entry.cancel.cancel();
            entry.job.status = Some(ImportExportStatus::Cancelled);
            entry.job.end_time_utc = Some(crate::jobs::format_time(OffsetDateTime::now_utc()));
            tracing::info!(job_id = %id, "import/export job cancelled");
        }
        Ok(entry.job.clone())
    }

    /// Records progress of a running job (ignored once it ended, e.g. cancelled).
    fn update(&self, id: &str, status: ImportExportStatus, progress: u32) {
        if let Some(entry) = self.lock().jobs.get_mut(id)
            && !entry
                .job
                .status
                .is_some_and(ImportExportStatus::is_terminal)
        {
            entry.job.status = Some(status);
            entry.job.progress = Some(progress.min(100));
        }
    }

    fn finish(&self, id: &str, outcome: Result<(), run::RunError>) {
        let mut table = self.lock();
        let Some(entry) = table.jobs.get_mut(id) else {
            return;
        };
        if entry
            .job
            .status
            .is_some_and(ImportExportStatus::is_terminal)
        {
            return;
        }
        entry.job.end_time_utc = Some(crate::jobs::format_time(OffsetDateTime::now_utc()));
        match outcome {
            Ok(()) => {
                entry.job.status = Some(ImportExportStatus::Completed);
                entry.job.progress = Some(100);
                tracing::info!(job_id = %id, "import/export job completed");
            }
            Err(error) => {
                tracing::warn!(job_id = %id, %error, "import/export job failed");
                entry.job.status = Some(ImportExportStatus::Failed);
                entry.job.failure_reason = Some(error.to_string());
            }
        }
    }
}

fn forget_oldest(table: &mut Table) {
    while table.jobs.len() > MAX_REMEMBERED {
        let oldest = table
            .jobs
            .iter()
            .filter(|(_, e)| e.job.status.is_some_and(ImportExportStatus::is_terminal))
            .min_by_key(|(_, e)| e.seq)
            .map(|(id, _)| id.clone());
        match oldest {
            Some(id) => table.jobs.remove(&id),
            None => return,
        };
    }
}

/// The blob name a job uses for `name`, or `default`.
fn blob_name(name: Option<&String>, default: &str) -> String {
    name.filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}
