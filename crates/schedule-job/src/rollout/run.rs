//! The executor: runs a rollout's waves as hub jobs, one job at a time, paced by the wave's rate,
//! waiting out the hub's active-job cap, retrying failed devices as later jobs, evaluating the
//! abort rules whenever a job ends, and honouring the window.
//!
//! Resume is replay: every job id is a function of the spec and of outcomes already on the hub
//! (`ro-<id>-w<wave>-a<attempt>-p<part>`), so the executor walks the same steps again; a step
//! whose job the hub already has is read (or followed, if still running), never created again.
//! A device that succeeded is never in a later job: only failures are retried, and each device
//! is in exactly one first-attempt job.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use hub_core::job::{DeviceJob, DeviceJobStatus, JobRequest, JobResponse, JobStatus};
use hub_core::method::CloudToDeviceMethod;
use hub_core::service_client::{HubErrorKind, ServiceClient};
use hub_core::tier::Quotas;
use hub_core::twin::TwinPatch;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::plan::{
    self, AbortDecision, Executed, FailureType, MAX_CONDITION_CHARS, WavePlan, chunk_ids,
    ids_condition, increases_after, plan_waves, rate_after_steps, should_abort, tier_per_minute,
};
use super::state::{Action, RolloutState};
use super::view::View;
use crate::cli::WindowEnd;
use crate::error::Error;
use crate::jobs::{JobWatch, PollPace};
use crate::output::note;

/// How this run goes: the window and the hub's tier (not part of the rollout's identity).
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// No job is created before this.
    pub start_at: Option<OffsetDateTime>,
    /// No job is created from this on.
    pub stop_starting_at: Option<OffsetDateTime>,
    /// What happens to the running job at `stop_starting_at`.
    pub at_window_end: WindowEnd,
    /// The hub's tier, when known.
    pub tier: Option<Quotas>,
}

/// A device's latest result in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceResult {
    /// Done and fine.
    Succeeded,
    /// Its last attempt failed so.
    Failure(FailureType),
    /// Its job was cancelled before it ran there.
    Canceled,
}

impl DeviceResult {
    /// `succeeded`, `failed`, `timed-out`, `offline` or `canceled`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceResult::Succeeded => "succeeded",
            DeviceResult::Failure(kind) => kind.name(),
            DeviceResult::Canceled => "canceled",
        }
    }
}

/// Most later jobs for a device whose job was cancelled before it ran.
const MAX_RERUNS: u32 = plan::MAX_RETRIES;

/// What the rollout knows of one device.
#[derive(Debug, Clone, Default)]
struct Track {
    last: Option<DeviceResult>,
    /// Retries scheduled so far, by failure type (index as [`FailureType::ALL`]).
    retries: [u32; 3],
    /// Times the device was put in a later job because its job was cancelled before it ran.
    reruns: u32,
}

fn type_index(kind: FailureType) -> usize {
    match kind {
        FailureType::Failed => 0,
        FailureType::TimedOut => 1,
        FailureType::Offline => 2,
    }
}

/// How a rollout run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "ending")]
pub enum Ending {
    /// Every wave ran.
    Completed,
    /// An abort rule fired.
    Aborted(AbortDecision),
    /// The window ended before every wave ran.
    WindowEnded,
    /// The run was interrupted (Ctrl-C); the hub goes on with the running job.
    Interrupted,
}

impl Ending {
    /// The name used in events.
    pub fn name(&self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::Aborted(_) => "aborted",
            Ending::WindowEnded => "window-ended",
            Ending::Interrupted => "interrupted",
        }
    }
}

/// Devices by latest result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Devices counted.
    pub devices: u64,
    /// Succeeded.
    pub succeeded: u64,
    /// Failed (the device answered non-2xx, or another error).
    pub failed: u64,
    /// Timed out.
    pub timed_out: u64,
    /// Offline.
    pub offline: u64,
    /// Cancelled before they ran.
    pub canceled: u64,
    /// Not reached yet.
    pub not_reached: u64,
}

impl Counts {
    fn add(&mut self, result: Option<DeviceResult>) {
        self.devices += 1;
        match result {
            Some(DeviceResult::Succeeded) => self.succeeded += 1,
            Some(DeviceResult::Failure(FailureType::Failed)) => self.failed += 1,
            Some(DeviceResult::Failure(FailureType::TimedOut)) => self.timed_out += 1,
            Some(DeviceResult::Failure(FailureType::Offline)) => self.offline += 1,
            Some(DeviceResult::Canceled) => self.canceled += 1,
            None => self.not_reached += 1,
        }
    }

    /// Devices that ended in a failure.
    pub fn failures(&self) -> u64 {
        self.failed + self.timed_out + self.offline
    }

    /// `8 succeeded, 1 failed, 0 timed out, 1 offline` (and what else is non-zero).
    pub fn describe(&self) -> String {
        let mut text = format!(
            "{} succeeded, {} failed, {} timed out, {} offline",
            self.succeeded, self.failed, self.timed_out, self.offline
        );
        if self.canceled > 0 {
            text.push_str(&format!(", {} cancelled", self.canceled));
        }
        if self.not_reached > 0 {
            text.push_str(&format!(", {} not reached", self.not_reached));
        }
        text
    }
}

/// One wave as it ran.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveReport {
    /// The wave.
    pub index: usize,
    /// Its devices.
    pub size: usize,
    /// The rate it ran at, devices per minute.
    pub per_minute: f64,
    /// From its start to the end of its last job, this run (replayed steps take no time).
    #[serde(rename = "wallMs", serialize_with = "millis")]
    pub wall: Duration,
    /// Time spent creating its jobs (the active-job cap's waits included).
    #[serde(rename = "creatingMs", serialize_with = "millis")]
    pub creating: Duration,
    /// Time spent reading its jobs' `devices.jobs` rows.
    #[serde(rename = "readingMs", serialize_with = "millis")]
    pub reading: Duration,
    /// Its jobs, in order.
    pub jobs: Vec<String>,
    /// Its devices by latest result.
    pub counts: Counts,
}

/// A duration as whole milliseconds, as the events write them.
fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A rollout run's result.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutReport {
    /// The rollout.
    pub id: String,
    /// How it ended.
    pub ending: Ending,
    /// The waves that started.
    pub waves: Vec<WaveReport>,
    /// Every device by latest result.
    pub counts: Counts,
}

/// Lists the rollout's jobs on the hub (its record), by job id.
pub async fn hub_record(
    client: &ServiceClient,
    rollout: &str,
) -> Result<HashMap<String, JobResponse>, Error> {
    let jobs: Vec<JobResponse> = client.query_jobs(None, None).try_collect().await?;
    Ok(jobs
        .into_iter()
        .filter(|j| plan::parse_job_id(rollout, &j.job_id).is_some())
        .map(|j| (j.job_id.clone(), j))
        .collect())
}

/// What a `devices.jobs` row says of the device.
pub fn classify(row: &DeviceJob, method: bool) -> Option<DeviceResult> {
    match &row.status {
        DeviceJobStatus::Completed => match row.method_response() {
            // IoT Hub completes a method job's device whatever status it answered; for a rollout
            // a device whose handler answered non-2xx did not take the change.
            Some(r) if method && !(200..300).contains(&r.status) => {
                Some(DeviceResult::Failure(FailureType::Failed))
            }
            _ => Some(DeviceResult::Succeeded),
        },
        DeviceJobStatus::Failed => {
            let code = row
                .error
                .as_ref()
                .and_then(|e| e.code.as_deref())
                .unwrap_or_default();
            Some(DeviceResult::Failure(match code {
                "DeviceNotOnline" | "404103" => FailureType::Offline,
                "GatewayTimeout" | "504101" | "JobRunTimeout" => FailureType::TimedOut,
                _ => FailureType::Failed,
            }))
        }
        DeviceJobStatus::Canceled => Some(DeviceResult::Canceled),
        _ => None,
    }
}

/// Whether the hub refused a job for its cap on active jobs (429004, or the older 403003).
pub use crate::tutorial::is_active_job_cap;

/// The executor of one rollout run.
#[derive(Debug)]
pub struct Executor<'a> {
    client: &'a ServiceClient,
    state: &'a RolloutState,
    options: RunOptions,
    shutdown: &'a CancellationToken,
    view: View,
    record: HashMap<String, JobResponse>,
    tracks: HashMap<String, Track>,
    notified: u64,
    /// The cap note is said once a run.
    said_cap: bool,
    /// Wave being run, for progress lines.
    current: Option<(usize, usize, f64)>,
    /// When the next job may be created, by the rate.
    next_due: Option<Instant>,
    /// This wave's time creating jobs and reading their rows (for the report).
    spent: (Duration, Duration),
}

/// What a step ended with.
enum Step {
    Go,
    End(Ending),
}

impl<'a> Executor<'a> {
    /// An executor over the hub's `record` of the rollout's jobs.
    pub fn new(
        client: &'a ServiceClient,
        state: &'a RolloutState,
        options: RunOptions,
        record: HashMap<String, JobResponse>,
        view: View,
        shutdown: &'a CancellationToken,
    ) -> Executor<'a> {
        Executor {
            client,
            state,
            options,
            shutdown,
            view,
            record,
            tracks: HashMap::new(),
            notified: 0,
            said_cap: false,
            current: None,
            next_due: None,
            spent: (Duration::ZERO, Duration::ZERO),
        }
    }

    fn method(&self) -> bool {
        matches!(self.state.spec.action, Action::Method { .. })
    }

    fn plan(&self) -> Vec<WavePlan> {
        plan_waves(
            self.state.fleet.len(),
            self.state.spec.canary,
            &self.state.spec.rate,
            self.options.tier,
        )
    }

    fn counts<'i>(&self, ids: impl IntoIterator<Item = &'i String>) -> Counts {
        let mut counts = Counts::default();
        for id in ids {
            counts.add(self.tracks.get(id).and_then(|t| t.last));
        }
        counts
    }

    /// Devices whose result is final: succeeded, or failed with no retry of that type left.
    fn executed(&self) -> Executed {
        let caps = self.state.spec.retry;
        let mut executed = Executed::default();
        for track in self.tracks.values() {
            match track.last {
                Some(DeviceResult::Succeeded) => executed.succeeded += 1,
                Some(DeviceResult::Failure(kind))
                    if track.retries[type_index(kind)] >= caps.cap(kind) =>
                {
                    executed.add_failure(kind);
                }
                _ => {}
            }
        }
        executed
    }

    fn abort_check(&self, ignore_minimum: bool) -> Option<AbortDecision> {
        should_abort(
            &self.state.spec.abort,
            &self.executed(),
            self.state.spec.abort_min_executed,
            ignore_minimum,
        )
    }

    /// The rate of the next wave: the spec's, grown by what ran so far, clamped by the tier.
    fn rate_now(&self, wave: &WavePlan) -> f64 {
        let succeeded = self
            .tracks
            .values()
            .filter(|t| t.last == Some(DeviceResult::Succeeded))
            .count() as u64;
        let steps = increases_after(&self.state.spec.rate, self.notified, succeeded);
        let requested = match self.state.spec.rate {
            plan::RateSpec::Fixed { .. } => wave.requested_per_minute,
            plan::RateSpec::Exponential { .. } => rate_after_steps(&self.state.spec.rate, steps),
        };
        tier_per_minute(self.options.tier).map_or(requested, |cap| requested.min(cap))
    }

    fn request(&self, job_id: &str, condition: String) -> JobRequest {
        let start = hub_core::timestamp::format_millis(OffsetDateTime::now_utc());
        let max = self.state.spec.job_max_execution_secs;
        match &self.state.spec.action {
            Action::Method {
                name,
                payload,
                response_timeout_secs,
                connect_timeout_secs,
            } => JobRequest::schedule_device_method(
                job_id,
                condition,
                CloudToDeviceMethod::new(name.clone())
                    .with_payload(payload.clone())
                    .with_timeouts(*response_timeout_secs, *connect_timeout_secs),
                start,
                max,
            ),
            Action::Twin { desired, tags } => {
                let mut patch = TwinPatch::new();
                if let Some(desired) = desired {
                    patch = patch.with_desired(desired.clone());
                }
                if let Some(tags) = tags {
                    patch = patch.with_tags(tags.clone());
                }
                JobRequest::schedule_update_twin(job_id, condition, patch, start, max)
            }
        }
    }

    fn past_window(&self) -> bool {
        self.options
            .stop_starting_at
            .is_some_and(|stop| OffsetDateTime::now_utc() >= stop)
    }

    /// Sleeps `pause`, or returns false when interrupted first.
    async fn pause(&self, pause: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = self.shutdown.cancelled() => false,
        }
    }

    /// Waits for the window to open; `Some` when the rollout must end instead.
    async fn window_gate(&mut self) -> Option<Ending> {
        if let Some(start) = self.options.start_at {
            let wait = start - OffsetDateTime::now_utc();
            if wait.is_positive() {
                let wait = Duration::try_from(wait).unwrap_or_default();
                self.view.lines([format!(
                    "waiting {:.0} s for the window to open at {}",
                    wait.as_secs_f64(),
                    hub_core::timestamp::format_millis(start)
                )]);
                if !self.pause(wait).await {
                    return Some(Ending::Interrupted);
                }
            }
        }
        self.past_window().then_some(Ending::WindowEnded)
    }

    /// Creates a job, waiting while the hub is at its active-job cap (F1 and S1 allow one; the
    /// service client does not retry 429004, since only the caller knows whether to wait).
    async fn create(&mut self, request: &JobRequest) -> Result<Result<JobResponse, Ending>, Error> {
        let job_id = request.job_id.clone().unwrap_or_default();
        let mut pace = Duration::from_millis(500);
        loop {
            match self.client.create_job(request).await {
                Ok(job) => return Ok(Ok(job)),
                Err(e) if e.hub_kind() == Some(HubErrorKind::JobAlreadyExists) => {
                    // An earlier run created it and stopped before it could see the answer.
                    return Ok(Ok(self.client.get_job(&job_id).await?));
                }
                Err(e) if is_active_job_cap(&e) => {
                    if !self.said_cap {
                        self.said_cap = true;
                        self.view.lines([format!(
                            "the hub is at its cap on active jobs (F1 and S1 allow one): job {job_id} waits for the running one"
                        )]);
                        tracing::info!(%job_id, "active-job cap; waiting");
                    }
                    if self.past_window() {
                        return Ok(Err(Ending::WindowEnded));
                    }
                    if !self.pause(pace).await {
                        return Ok(Err(Ending::Interrupted));
                    }
                    pace = (pace * 3 / 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn progress(&mut self, job: &JobResponse) {
        let stats = job.device_job_statistics.unwrap_or_default();
        let status = job.status.clone().unwrap_or(JobStatus::Unknown);
        let all = self.counts(self.state.fleet.iter());
        let executed = self.executed();
        let figures: Vec<String> = self
            .state
            .spec
            .abort
            .iter()
            .map(|r| format!("{r}: {:.1}%", executed.percent(r.scope)))
            .collect();
        let (wave, waves, rate) = self.current.unwrap_or_default();
        let rules = if figures.is_empty() {
            "no abort rule".to_owned()
        } else {
            format!(
                "abort {} of {} executed (rules apply from {})",
                figures.join(", "),
                executed.total(),
                self.state.spec.abort_min_executed
            )
        };
        let human = format!(
            "wave {}/{waves} at {rate:.0}/min, job {} {status}: {}/{} done ({} ok, {} failed) | overall: {} | {rules}",
            wave + 1,
            job.job_id,
            stats.succeeded_count + stats.failed_count,
            stats.device_count,
            stats.succeeded_count,
            stats.failed_count,
            all.describe(),
        );
        let json = json!({
            "event": "progress", "rolloutId": self.state.id, "wave": wave, "jobId": job.job_id,
            "status": status.as_str(), "deviceJobStatistics": stats, "counts": all,
            "abort": self.state.spec.abort.iter().map(|r| json!({
                "rule": r.to_string(), "percent": executed.percent(r.scope)
            })).collect::<Vec<_>>(),
            "executed": executed.total(),
        });
        self.view.progress(&json, &human);
    }

    /// Follows a job to its end; cancels it at the window's end when asked to.
    async fn follow(
        &mut self,
        mut job: JobResponse,
        devices: usize,
    ) -> Result<Result<(JobResponse, bool), Ending>, Error> {
        // A job's end is polled first when the tier says it should be over (else soon, then
        // less and less often: PollPace stays within every tier's jobs-operations throttle),
        // and then when its progress says it will be (JobWatch).
        let devices = job
            .device_job_statistics
            .map_or(0, |s| s.device_count)
            .max(devices as u64);
        let expected = self
            .options
            .tier
            .and_then(|q| q.job_duration(devices))
            .unwrap_or(Duration::ZERO);
        let mut watch = JobWatch::new(PollPace::starting_at(expected));
        let mut cancelled = false;
        loop {
            self.progress(&job);
            if job.is_terminal() {
                return Ok(Ok((job, cancelled)));
            }
            let cancel_at_end = self.options.at_window_end == WindowEnd::Cancel;
            if !cancelled && cancel_at_end && self.past_window() {
                tracing::info!(job_id = %job.job_id, "window ended; cancelling the running job");
                self.client.cancel_job(&job.job_id).await?;
                cancelled = true;
            }
            let mut pause = watch.next_pause(
                std::time::Instant::now(),
                job.device_job_statistics.as_ref(),
            );
            // Wake at the window's end to cancel on time.
            if let (false, true, Some(stop)) =
                (cancelled, cancel_at_end, self.options.stop_starting_at)
            {
                let left = Duration::try_from(stop - OffsetDateTime::now_utc()).unwrap_or_default();
                pause = pause.min(left.max(Duration::from_millis(10)));
            }
            if !self.pause(pause).await {
                return Ok(Err(Ending::Interrupted));
            }
            job = self.client.get_job(&job.job_id).await?;
        }
    }

    /// Reads a finished job's rows into the tracks.
    async fn absorb(&mut self, job_id: &str) -> Result<(), Error> {
        let rows: Vec<DeviceJob> = self.client.device_jobs(job_id).try_collect().await?;
        let method = self.method();
        for row in &rows {
            if let (Some(result), Some(track)) =
                (classify(row, method), self.tracks.get_mut(&row.device_id))
            {
                track.last = Some(result);
            }
        }
        Ok(())
    }

    /// Runs (or replays) one attempt over `ids` of `wave`: its jobs one after the other.
    async fn attempt(
        &mut self,
        wave: &WavePlan,
        attempt: u32,
        ids: &[String],
        per_minute: f64,
        jobs: &mut Vec<String>,
    ) -> Result<Step, Error> {
        let parts = chunk_ids(ids, wave.part_max, MAX_CONDITION_CHARS);
        for (p, part) in parts.iter().enumerate() {
            let job_id = plan::job_id(&self.state.id, wave.index, attempt, p + 1);
            jobs.push(job_id.clone());
            let job = match self.record.get(&job_id).cloned() {
                Some(job) => job,
                None => {
                    // Checked before every creation, not only at a wave's start: a resumed
                    // wave may have its first jobs on the hub already.
                    if let Some(ending) = self.window_gate().await {
                        return Ok(Step::End(ending));
                    }
                    if let Some(due) = self.next_due {
                        let wait = due.saturating_duration_since(Instant::now());
                        if !wait.is_zero() && !self.pause(wait).await {
                            return Ok(Step::End(Ending::Interrupted));
                        }
                    }
                    let request = self.request(&job_id, ids_condition(part));
                    let t = Instant::now();
                    let created = self.create(&request).await?;
                    self.spent.0 += t.elapsed();
                    let job = match created {
                        Ok(job) => job,
                        Err(ending) => return Ok(Step::End(ending)),
                    };
                    // The rate: the devices of this job have their share of the minute before
                    // the next job (of this wave, a retry or the next wave) may be created.
                    self.next_due = Some(
                        Instant::now()
                            + Duration::from_secs_f64(
                                part.len() as f64 * 60.0 / per_minute.max(f64::MIN_POSITIVE),
                            ),
                    );
                    self.view.event(
                        &json!({ "event": "job-created", "rolloutId": self.state.id, "wave": wave.index,
                                 "attempt": attempt, "jobId": job_id, "devices": part.len() }),
                        format!("  created job {job_id} over {} device(s)", part.len()),
                    );
                    job
                }
            };
            self.notified += part.len() as u64;
            let (job, cancelled) = match self.follow(job, part.len()).await? {
                Ok(done) => done,
                Err(ending) => return Ok(Step::End(ending)),
            };
            self.record.insert(job_id.clone(), job);
            let t = Instant::now();
            self.absorb(&job_id).await?;
            self.spent.1 += t.elapsed();
            if cancelled {
                return Ok(Step::End(Ending::WindowEnded));
            }
            if let Some(decision) = self.abort_check(false) {
                return Ok(Step::End(Ending::Aborted(decision)));
            }
        }
        Ok(Step::Go)
    }

    /// The devices of `ids` to retry now, by failure type; their retry counters are raised.
    fn schedule_retries(&mut self, ids: &[String]) -> (Vec<String>, BTreeMap<&'static str, u64>) {
        let caps = self.state.spec.retry;
        let mut retry = Vec::new();
        let mut by_type: BTreeMap<&'static str, u64> = BTreeMap::new();
        for id in ids {
            let Some(track) = self.tracks.get_mut(id) else {
                continue;
            };
            match track.last {
                Some(DeviceResult::Failure(kind)) => {
                    let used = &mut track.retries[type_index(kind)];
                    if *used < caps.cap(kind) {
                        *used += 1;
                        retry.push(id.clone());
                        *by_type.entry(kind.name()).or_default() += 1;
                    }
                }
                // Its job was cancelled before it reached the device (the window's end with
                // `--at-window-end cancel`, or someone's `cancel`): the device has not run, so a
                // later run gives it a later job. Capped, so that a job cancelled again and
                // again does not loop.
                Some(DeviceResult::Canceled) if track.reruns < MAX_RERUNS => {
                    track.reruns += 1;
                    retry.push(id.clone());
                    *by_type.entry(DeviceResult::Canceled.name()).or_default() += 1;
                }
                _ => {}
            }
        }
        (retry, by_type)
    }

    /// Runs the rollout to its end, or until the window closes, an abort rule fires or the run
    /// is interrupted.
    pub async fn run(mut self) -> Result<(RolloutReport, View), Error> {
        self.tracks = self
            .state
            .fleet
            .iter()
            .map(|id| (id.clone(), Track::default()))
            .collect();
        let waves = self.plan();
        let mut reports = Vec::new();
        let ending = 'waves: {
            for wave in &waves {
                let ids: Vec<String> = self.state.fleet[wave.range()].to_vec();
                let replaying = self.record.keys().any(|j| {
                    plan::parse_job_id(&self.state.id, j).is_some_and(|(w, _, _)| w == wave.index)
                });
                if !replaying && let Some(ending) = self.window_gate().await {
                    break 'waves ending;
                }
                let per_minute = self.rate_now(wave);
                self.current = Some((wave.index, waves.len(), per_minute));
                let started = Instant::now();
                self.view.event(
                    &json!({ "event": "wave-started", "rolloutId": self.state.id, "wave": wave.index,
                             "canary": wave.canary, "size": wave.size, "perMinute": per_minute,
                             "replaying": replaying }),
                    format!(
                        "wave {}/{}{}: {} device(s) at {per_minute:.0}/min{}",
                        wave.index + 1,
                        waves.len(),
                        if wave.canary { " (canary)" } else { "" },
                        wave.size,
                        if replaying { ", continuing from the hub's record" } else { "" }
                    ),
                );
                let mut jobs = Vec::new();
                self.spent = (Duration::ZERO, Duration::ZERO);
                let mut attempt = 0u32;
                let mut devices = ids.clone();
                let step = loop {
                    match self
                        .attempt(wave, attempt, &devices, per_minute, &mut jobs)
                        .await?
                    {
                        Step::Go => {}
                        end @ Step::End(_) => break end,
                    }
                    let (retry, by_type) = self.schedule_retries(&ids);
                    if retry.is_empty() {
                        break Step::Go;
                    }
                    attempt += 1;
                    let next_exists = self.record.contains_key(&plan::job_id(
                        &self.state.id,
                        wave.index,
                        attempt,
                        1,
                    ));
                    let after = Duration::from_millis(self.state.spec.retry_after_ms);
                    self.view.event(
                        &json!({ "event": "retry-scheduled", "rolloutId": self.state.id, "wave": wave.index,
                                 "attempt": attempt, "devices": retry.len(), "byType": by_type,
                                 "deviceIds": retry, "afterMs": after.as_millis() as u64 }),
                        format!(
                            "  retry {attempt} of wave {}: {} device(s) ({}) in {:.1} s",
                            wave.index + 1,
                            retry.len(),
                            by_type.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", "),
                            after.as_secs_f64()
                        ),
                    );
                    if !next_exists && !self.pause(after).await {
                        break Step::End(Ending::Interrupted);
                    }
                    devices = retry;
                };
                let counts = self.counts(ids.iter());
                let report = WaveReport {
                    index: wave.index,
                    size: wave.size,
                    per_minute,
                    wall: started.elapsed(),
                    creating: self.spent.0,
                    reading: self.spent.1,
                    jobs,
                    counts,
                };
                if let Step::End(ending) = step {
                    reports.push(report);
                    break 'waves ending;
                }
                self.view.event(
                    &json!({ "event": "wave-finished", "rolloutId": self.state.id, "wave": wave.index,
                             "size": wave.size, "counts": counts, "wallMs": report.wall.as_millis() as u64,
                             "jobs": report.jobs }),
                    format!(
                        "wave {}/{} finished in {:.1} s: {}",
                        wave.index + 1,
                        waves.len(),
                        report.wall.as_secs_f64(),
                        counts.describe()
                    ),
                );
                reports.push(report);
                if let Some(decision) = self.abort_check(wave.canary) {
                    break 'waves Ending::Aborted(decision);
                }
            }
            Ending::Completed
        };
        self.view.done();
        let counts = self.counts(self.state.fleet.iter());
        let report = RolloutReport {
            id: self.state.id.clone(),
            ending,
            waves: reports,
            counts,
        };
        self.announce_end(&report);
        Ok((report, self.view))
    }

    fn reached(&self) -> Vec<String> {
        self.state
            .fleet
            .iter()
            .filter(|id| {
                self.tracks
                    .get(*id)
                    .is_some_and(|t| matches!(t.last, Some(r) if r != DeviceResult::Canceled))
            })
            .cloned()
            .collect()
    }

    fn announce_end(&mut self, report: &RolloutReport) {
        let id = &self.state.id;
        if let Ending::Aborted(decision) = &report.ending {
            let reached = self.reached();
            let shown: Vec<&str> = reached.iter().take(20).map(String::as_str).collect();
            self.view.event(
                &json!({ "event": "aborted", "rolloutId": id, "rule": decision.rule,
                         "percent": decision.percent, "threshold": decision.threshold,
                         "failures": decision.failures, "executed": decision.executed,
                         "reachedCount": reached.len(), "reached": reached }),
                format!(
                    "ABORTED: {} at {:.1}% ({} of {} executed devices) exceeds {}%; no more jobs are created. \
                     Reached {} device(s): {}{}",
                    decision.rule,
                    decision.percent,
                    decision.failures,
                    decision.executed,
                    decision.threshold,
                    reached.len(),
                    shown.join(", "),
                    if reached.len() > shown.len() {
                        format!(", ... (all of them: schedule-job rollout status {id} --output json)")
                    } else {
                        String::new()
                    }
                ),
            );
        }
        self.view.event(
            &json!({ "event": "done", "rolloutId": id, "ending": report.ending.name(),
                     "counts": report.counts, "waves": report.waves }),
            format!(
                "rollout {id} {}: {} of {} device(s): {}",
                report.ending.name(),
                report.counts.devices - report.counts.not_reached,
                report.counts.devices,
                report.counts.describe()
            ),
        );
        match report.ending {
            Ending::Interrupted => note(format!(
                "stopped following; the running job goes on on the hub. Continue with: schedule-job rollout resume {id}"
            )),
            Ending::WindowEnded => note(format!(
                "the window ended; continue in the next one with: schedule-job rollout resume {id} --stop-starting-at TIME"
            )),
            _ => {}
        }
    }
}

/// Reads what the hub holds of a rollout: every device's latest result, replaying its jobs in
/// order (for `status`). Jobs still running are left out of the results and returned.
pub async fn replay(
    client: &ServiceClient,
    state: &RolloutState,
    record: &HashMap<String, JobResponse>,
) -> Result<HashMap<String, DeviceResult>, Error> {
    let method = matches!(state.spec.action, Action::Method { .. });
    let mut ids: Vec<(&String, (usize, u32, usize))> = record
        .iter()
        .filter(|(_, job)| job.is_terminal())
        .filter_map(|(id, _)| plan::parse_job_id(&state.id, id).map(|k| (id, k)))
        .collect();
    ids.sort_by_key(|(_, k)| *k);
    let mut results = HashMap::new();
    for (job_id, _) in ids {
        let rows: Vec<DeviceJob> = client.device_jobs(job_id).try_collect().await?;
        for row in &rows {
            if let Some(result) = classify(row, method) {
                results.insert(row.device_id.clone(), result);
            }
        }
    }
    Ok(results)
}

/// Counts of `ids` in `results`.
pub fn counts_of<'i>(
    ids: impl IntoIterator<Item = &'i String>,
    results: &HashMap<String, DeviceResult>,
) -> Counts {
    let mut counts = Counts::default();
    for id in ids {
        counts.add(results.get(id).copied());
    }
    counts
}
