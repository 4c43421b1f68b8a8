//! Twins as the hub changes them: service updates of tags and desired properties (`PATCH` and
//! `PUT /twins/{id}`, and a twin job's batches, applied at most once per job and device), device
//! reported-property patches, and the twin documents that reads, queries and jobs see.

use std::ops::Bound;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::record::{DeviceRecord, matches_etag};
use super::{DeviceChange, Hub, OperationError, lock};
use crate::faults::TwinFault;
use crate::twins::{self, Section, TwinError};

/// How many twin-job ids a twin remembers: more than the active-job cap (the default is 10), so
/// a resumed job always finds its own.
const TWIN_JOBS_REMEMBERED: usize = 32;

/// Twin documents read per hold of the `state` lock by [`Hub::twin_documents_from`]: a few
/// tens of microseconds of pointer copies, against milliseconds for a whole 100,000-device
/// registry in one hold.
pub const TWIN_READ_CHUNK: usize = 4096;

/// One device's place in a twin batch: its staged record, or the twin as it is.
pub(super) enum Staged {
    Changed(Box<DeviceRecord>, Option<Map<String, Value>>),
    AlreadyApplied(Arc<Value>),
}

/// Applies a service update (`tags`, `desired`) to `record`, as of `now`. `replace` replaces
/// the sections (`PUT`) instead of merging (`PATCH`); `job_id` makes it a twin job's update,
/// applied once.
pub(super) fn stage_twin_update(
    mut record: DeviceRecord,
    twins::ServiceUpdate { tags, desired }: twins::ServiceUpdate<'_>,
    if_match: Option<&str>,
    replace: bool,
    job_id: Option<&str>,
    now: &str,
) -> Result<Staged, OperationError> {
    if !matches_etag(if_match, &record.twin_etag()) {
        return Err(OperationError::PreconditionFailed {
            what: "twin",
            id: record.device_id,
        });
    }
    if let Some(job) = job_id {
        if record.twin_jobs_applied.iter().any(|j| j == job) {
            return Ok(Staged::AlreadyApplied(record.doc));
        }
        if record.twin_jobs_applied.len() >= TWIN_JOBS_REMEMBERED {
            record.twin_jobs_applied.remove(0);
        }
        record.twin_jobs_applied.push(job.to_owned());
    }
    let notify = apply_service_update(
        &mut record.tags,
        &mut record.desired,
        twins::ServiceUpdate { tags, desired },
        replace,
        now,
    )?;
    record.twin_version += 1;
    record.refresh();
    Ok(Staged::Changed(Box::new(record), notify))
}

/// Applies a service update's `tags` and `desired` to a twin's sections (a device's or a
/// module's), merging (`PATCH`) or replacing (`PUT`) them. Returns the desired patch the twin's
/// session should receive (with its new `$version`), if desired properties changed.
pub(super) fn apply_service_update(
    record_tags: &mut Map<String, Value>,
    record_desired: &mut Map<String, Value>,
    twins::ServiceUpdate { tags, desired }: twins::ServiceUpdate<'_>,
    replace: bool,
    now: &str,
) -> Result<Option<Map<String, Value>>, OperationError> {
    if let Some(tags) = tags {
        if replace {
            twins::validate_patch("tags", tags)?;
            *record_tags = tags.as_object().cloned().unwrap_or_default();
            let size = twins::section_size(record_tags);
            if size > twins::MAX_TAGS_BYTES {
                return Err(TwinError::TooLarge {
                    section: "tags",
                    size,
                    limit: twins::MAX_TAGS_BYTES,
                }
                .into());
            }
        } else {
            twins::apply_tags(record_tags, tags)?;
        }
    }
    let mut notify = None;
    if let Some(desired) = desired {
        let (version, mut patch) = if replace {
            twins::replace_section(record_desired, desired, Section::Desired, now)?
        } else {
            let version = twins::apply_patch(record_desired, desired, Section::Desired, now)?;
            (version, desired.as_object().cloned().unwrap_or_default())
        };
        patch.insert("$version".into(), Value::from(version));
        notify = Some(patch);
    }
    Ok(notify)
}

impl Hub {
    /// `GET /twins/{id}`.
    pub fn get_twin(&self, id: &str) -> Result<Value, OperationError> {
        lock(&self.inner.state)
            .devices
            .get(id)
            .map(|d| (*d.doc).clone())
            .ok_or_else(|| OperationError::DeviceNotFound(id.to_owned()))
    }

    /// `GET /twins/{id}` as the service API serves it: [`Hub::get_twin`] after the device's
    /// injected twin fault, if any (a slow device's read waits its delay, a throttled one is
    /// refused with 429 ThrottlingException).
    pub async fn read_twin(&self, id: &str) -> Result<Value, OperationError> {
        match self.inner.faults.twin(id) {
            Some(TwinFault::Throttled) => return Err(OperationError::TwinThrottled(id.to_owned())),
            Some(TwinFault::Delay(delay)) => tokio::time::sleep(delay).await,
            None => {}
        }
        self.get_twin(id)
    }

    /// Twin documents in device-id order, starting after `after`, for queries and jobs
    /// (documents are shared, not copied). Read as [`Hub::twin_documents_from`] reads them:
    /// every device appears at most once, and every device that exists throughout appears.
    pub fn twin_documents_after(&self, after: Option<&str>) -> Vec<Arc<Value>> {
        self.twin_documents_from(after, usize::MAX)
    }

    /// Up to `max` twin documents in device-id order, starting after `after`.
    ///
    /// The `state` lock is taken once per [`TWIN_READ_CHUNK`] documents, not for the whole
    /// read, so a scan of a large registry never makes a twin read or a device's patch wait
    /// for more than one chunk. Each chunk resumes strictly after the last id of the one
    /// before: a device is seen at most once (as it was when its chunk was read), and a device
    /// that exists throughout is never skipped, as with the paging of `POST /devices/query`.
    pub fn twin_documents_from(&self, after: Option<&str>, max: usize) -> Vec<Arc<Value>> {
        let mut docs = Vec::new();
        let mut resume: Option<String> = after.map(str::to_owned);
        while docs.len() < max {
            let take = (max - docs.len()).min(TWIN_READ_CHUNK);
            let state = lock(&self.inner.state);
            let range = match &resume {
                Some(after) => state
                    .devices
                    .range::<str, _>((Bound::Excluded(after.as_str()), Bound::Unbounded)),
                None => state.devices.range::<str, _>(..),
            };
            let mut last = None;
            let before = docs.len();
            for (id, device) in range.take(take) {
                docs.push(Arc::clone(&device.doc));
                last = Some(id);
            }
            let read = docs.len() - before;
            resume = last.cloned();
            drop(state);
            if read < take {
                break;
            }
        }
        docs
    }

    /// `PATCH /twins/{id}` (`replace == false`) or `PUT /twins/{id}` (`replace == true`):
    /// tags and desired properties; reported properties are the device's and are refused.
    pub async fn update_twin(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
    ) -> Result<Value, OperationError> {
        let mut results = self
            .update_twins_for_job(&[id], body, if_match, replace, None)
            .await;
        results
            .pop()
            .unwrap_or_else(|| Err(OperationError::DeviceNotFound(id.to_owned())))
            .map(|doc| (*doc).clone())
    }

    /// Applies one twin update to many devices in one durable transaction, as twin job `job_id`
    /// when given: a twin that already has this job's patch is left as it is (and reported as
    /// updated), which makes resuming a job after a crash apply its patch at most once per
    /// device. Returns one result per id, in order.
    pub async fn update_twins_for_job(
        &self,
        ids: &[&str],
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
        job_id: Option<&str>,
    ) -> Vec<Result<Arc<Value>, OperationError>> {
        let parsed = twins::parse_service_update(body);
        // Injected faults (see `crate::faults`): a throttled device's update is refused, and a
        // batch with slow devices waits the longest of their delays, before any lock is taken.
        let faults: Vec<Option<TwinFault>> =
            ids.iter().map(|id| self.inner.faults.twin(id)).collect();
        let slowest = faults
            .iter()
            .filter_map(|fault| match fault {
                Some(TwinFault::Delay(delay)) => Some(*delay),
                _ => None,
            })
            .max();
        if let Some(delay) = slowest {
            tokio::time::sleep(delay).await;
        }
        let writing = self.write_locks(ids.iter().copied()).await;
        // Copies of the committed records: staging (merges, documents) runs without the state
        // lock; the write locks keep these records from changing meanwhile.
        let current: Vec<Option<DeviceRecord>> = {
            let state = lock(&self.inner.state);
            ids.iter()
                .map(|id| state.devices.get(*id).cloned())
                .collect()
        };
        let now = self.now();
        let mut change = DeviceChange::default();
        let mut results: Vec<Result<Arc<Value>, OperationError>> = Vec::with_capacity(ids.len());
        for ((id, current), fault) in ids.iter().zip(current).zip(faults) {
            if fault == Some(TwinFault::Throttled) {
                results.push(Err(OperationError::TwinThrottled((*id).to_owned())));
                continue;
            }
            let staged = match (&parsed, current) {
                (Err(e), _) => Err(OperationError::Twin(e.clone())),
                (Ok(_), None) => Err(OperationError::DeviceNotFound((*id).to_owned())),
                (Ok(parts), Some(record)) => {
                    stage_twin_update(record, *parts, if_match, replace, job_id, &now)
                }
            };
            results.push(staged.map(|staged| match staged {
                Staged::Changed(record, notify) => {
                    let doc = Arc::clone(&record.doc);
                    change.put.push((*record, notify));
                    doc
                }
                Staged::AlreadyApplied(doc) => doc,
            }));
        }
        // One transaction for the whole batch: either every staged change is durable or none is.
        if let Err(e) = self.commit_devices(writing, change).await {
            let message = e.to_string();
            return ids
                .iter()
                .map(|_| Err(OperationError::NotSaved(message.clone())))
                .collect();
        }
        results
    }

    /// The device's twin GET answer: `{"desired": {...}, "reported": {...}}` without metadata.
    pub fn device_twin(&self, id: &str) -> Option<Value> {
        let state = lock(&self.inner.state);
        let device = state.devices.get(id)?;
        Some(json!({
            "desired": twins::without_metadata(&device.desired),
            "reported": twins::without_metadata(&device.reported),
        }))
    }

    /// A device's reported-properties patch. Returns the new reported `$version`.
    pub async fn patch_reported(&self, id: &str, patch: Value) -> Result<u64, OperationError> {
        let writing = self.write_locks([id]).await;
        let current = lock(&self.inner.state).devices.get(id).cloned();
        let mut record = current.ok_or_else(|| OperationError::DeviceNotFound(id.to_owned()))?;
        let now = self.now();
        let version = twins::apply_patch(&mut record.reported, &patch, Section::Reported, &now)?;
        record.twin_version += 1;
        record.last_activity_time = now;
        record.refresh();
        self.commit_devices(
            writing,
            DeviceChange {
                put: vec![(record, None)],
                ..DeviceChange::default()
            },
        )
        .await?;
        Ok(version)
    }
}
