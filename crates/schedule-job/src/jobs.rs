//! Hub-side jobs (Jobs v2): validate, create, follow with a progress bar, and report per device.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use hub_core::job::{DeviceJob, DeviceJobStatistics, JobRequest, JobResponse, JobStatus, JobType};
use hub_core::method::{
    CloudToDeviceMethod, MAX_CONNECT_TIMEOUT_SECS, MAX_PAYLOAD_BYTES, MAX_RESPONSE_TIMEOUT_SECS,
    MIN_RESPONSE_TIMEOUT_SECS,
};
use hub_core::service_client::{ServiceClient, ServiceError, escape_sql_string};
use hub_core::twin::{Twin, TwinPatch};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::Outcome;
use crate::cli::{
    JobKind, ListArgs, MethodArgs, MethodCallArgs, ScheduleArgs, TargetArgs, TwinArgs,
    TwinPatchArgs,
};
use crate::error::Error;
use crate::forecast::JobForecast;
use crate::output::{Output, note};
use crate::report::{DeviceOutcome, OutcomeSummary, describe_job, table};
use crate::settings::HubSettings;

/// How a waiting command paces its polls of a job: the first poll after [`PollPace::FIRST`], each
/// next one half again as long, up to [`PollPace::LONGEST`]. A fast job's end shows within a
/// fraction of a second, and a long wait costs at most 30 calls a minute (under 40 in the first),
/// within the jobs operations throttle of every tier ("Jobs operations (create, update, list,
/// delete): 1.67/sec/unit (100/min/unit)" on F1, S1 and S2; Microsoft Learn, "IoT Hub quotas and
/// throttling"). [`JobWatch`] shortens a pause to the job's predicted end.
#[derive(Debug, Clone)]
pub struct PollPace {
    next: Duration,
}

impl PollPace {
    /// The pause before the first poll.
    pub const FIRST: Duration = Duration::from_millis(50);
    /// The longest pause between polls.
    pub const LONGEST: Duration = Duration::from_secs(2);

    /// A pace that starts over.
    pub fn new() -> PollPace {
        PollPace { next: Self::FIRST }
    }

    /// A pace whose first pause is `first` (kept within 50 ms and [`PollPace::LONGEST`]): a
    /// caller that knows how long a job takes polls its end sooner.
    pub fn starting_at(first: Duration) -> PollPace {
        PollPace {
            next: first.clamp(Duration::from_millis(50), Self::LONGEST),
        }
    }

    /// The pause before the next poll.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 3 / 2).min(Self::LONGEST);
        pause
    }
}

impl Default for PollPace {
    fn default() -> Self {
        PollPace::new()
    }
}

/// The polls of one running job: a [`PollPace`], each pause shortened to when the job's progress
/// says it will end (its devices finished so far, over the time they took), so that the end is
/// seen soon after the hub records it. A pause is never cut below half the pace's, nor below
/// [`JobWatch::SHORTEST`]: a wrong prediction costs at most twice the pace's calls.
#[derive(Debug, Clone)]
pub struct JobWatch {
    pace: PollPace,
    /// When the first poll was seen, and how many devices had finished then.
    first: Option<(Instant, u64)>,
}

impl JobWatch {
    /// The shortest pause between polls.
    pub const SHORTEST: Duration = Duration::from_millis(25);

    /// A watch over `pace`.
    pub fn new(pace: PollPace) -> JobWatch {
        JobWatch { pace, first: None }
    }

    /// The pause before the next poll, given the statistics the last poll saw at `now`.
    pub fn next_pause(&mut self, now: Instant, stats: Option<&DeviceJobStatistics>) -> Duration {
        let pause = self.pace.next_pause();
        let Some(stats) = stats else {
            return pause;
        };
        let done = stats.succeeded_count + stats.failed_count;
        let Some((since, done_then)) = self.first else {
            self.first = Some((now, done));
            return pause;
        };
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        if done <= done_then || elapsed <= 0.0 {
            return pause;
        }
        let rate = (done - done_then) as f64 / elapsed;
        let left = stats.device_count.saturating_sub(done) as f64 / rate;
        let until_end = Duration::try_from_secs_f64(left).unwrap_or(pause);
        let floor = (pause / 2).max(Self::SHORTEST);
        pause.min(until_end.max(floor))
    }
}

/// The WHERE clause a target stands for.
pub fn condition(target: &TargetArgs) -> Result<String, Error> {
    if let Some(q) = &target.query {
        let q = q.trim();
        if q.is_empty() {
            return Err(Error::Usage(
                "--query is empty; give a WHERE clause or '*' for all devices".into(),
            ));
        }
        return Ok(q.to_owned());
    }
    match target.device_ids.as_slice() {
        [] => Err(Error::Usage(
            "give --query or at least one --device-id".into(),
        )),
        [one] => Ok(format!("deviceId = '{}'", escape_sql_string(one))),
        many => Ok(format!(
            "deviceId IN [{}]",
            many.iter()
                .map(|d| format!("'{}'", escape_sql_string(d)))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `SELECT * FROM devices [WHERE c]`.
pub fn twin_query(condition: &str) -> String {
    if condition == "*" {
        "SELECT * FROM devices".to_owned()
    } else {
        format!("SELECT * FROM devices WHERE {condition}")
    }
}

/// Maps the hub's refusal of a query to a clear error naming the condition.
pub fn query_error(condition: &str, e: ServiceError) -> Error {
    match e.hub() {
        Some(h) if h.status == 400 => Error::InvalidQuery {
            condition: condition.to_owned(),
            message: h.message.clone(),
        },
        _ => Error::Service(e),
    }
}

/// Device ids matching the target now (all pages). For `--device-id`, every id must exist.
pub async fn matching_devices(
    client: &ServiceClient,
    target: &TargetArgs,
) -> Result<Vec<String>, Error> {
    let condition = condition(target)?;
    let twins: Vec<Twin> = client
        .query(twin_query(&condition))
        .try_collect()
        .await
        .map_err(|e| query_error(&condition, e))?;
    let ids: Vec<String> = twins.into_iter().map(|t| t.device_id).collect();
    check_named_devices(client, &target.device_ids, &ids)?;
    Ok(ids)
}

fn check_named_devices(
    client: &ServiceClient,
    named: &[String],
    found: &[String],
) -> Result<(), Error> {
    let missing: Vec<String> = named
        .iter()
        .filter(|d| !found.contains(d))
        .cloned()
        .collect();
    match missing.len() {
        0 => Ok(()),
        1 => Err(Error::UnknownDevice {
            device_id: missing.into_iter().next().unwrap_or_default(),
            host: client.host_name().to_owned(),
        }),
        _ => Err(Error::UnknownDevices {
            missing,
            host: client.host_name().to_owned(),
        }),
    }
}

/// Validates a target cheaply (first page only): the query parses and named devices exist.
/// Returns how many devices match on the first page and whether there are more.
async fn validate_target(
    client: &ServiceClient,
    target: &TargetArgs,
) -> Result<(usize, bool), Error> {
    if !target.device_ids.is_empty() {
        let ids = matching_devices(client, target).await?;
        return Ok((ids.len(), false));
    }
    let condition = condition(target)?;
    let page = client
        .query_page::<serde_json::Value>(&twin_query(&condition), None, Some(100))
        .await
        .map_err(|e| query_error(&condition, e))?;
    Ok((page.items.len(), page.continuation.is_some()))
}

/// The start time for a schedule; a time in the past is refused.
pub fn start_time(schedule: &ScheduleArgs, now: OffsetDateTime) -> Result<OffsetDateTime, Error> {
    match (schedule.start_at, schedule.start_in) {
        (Some(at), _) if at < now - Duration::from_secs(1) => Err(Error::Usage(format!(
            "--start-at {} is in the past (now is {}); give a future time or use --start-in",
            hub_core::timestamp::format_millis(at),
            hub_core::timestamp::format_millis(now)
        ))),
        (Some(at), _) => Ok(at),
        (None, Some(delay)) => Ok(now + delay),
        (None, None) => Ok(now),
    }
}

fn max_execution_secs(schedule: &ScheduleArgs) -> Result<u64, Error> {
    let secs = schedule.max_execution.as_secs();
    if secs == 0 {
        return Err(Error::Usage("--max-execution must be at least 1s".into()));
    }
    Ok(secs)
}

fn job_id(schedule: &ScheduleArgs) -> Result<String, Error> {
    match &schedule.job_id {
        Some(id) if id.trim().is_empty() || id.len() > 128 => {
            Err(Error::Usage("--job-id must be 1 to 128 characters".into()))
        }
        Some(id) => Ok(id.clone()),
        None => Ok(uuid::Uuid::new_v4().to_string()),
    }
}

/// Checks a method's timeouts and payload size as the hub would.
pub fn method_call(args: &MethodCallArgs) -> Result<CloudToDeviceMethod, Error> {
    let response = args.response_timeout.as_secs();
    let connect = args.connect_timeout.as_secs();
    if !(MIN_RESPONSE_TIMEOUT_SECS..=MAX_RESPONSE_TIMEOUT_SECS).contains(&response) {
        return Err(Error::Usage(format!(
            "--response-timeout must be between {MIN_RESPONSE_TIMEOUT_SECS}s and {MAX_RESPONSE_TIMEOUT_SECS}s"
        )));
    }
    if connect > MAX_CONNECT_TIMEOUT_SECS {
        return Err(Error::Usage(format!(
            "--connect-timeout must be at most {MAX_CONNECT_TIMEOUT_SECS}s"
        )));
    }
    if args.payload.to_string().len() > MAX_PAYLOAD_BYTES {
        return Err(Error::Usage(format!(
            "--payload is larger than {} KB",
            MAX_PAYLOAD_BYTES / 1024
        )));
    }
    if args.name.is_empty() || args.name.contains(['$', '/', '#', '+', ' ', '?']) {
        return Err(Error::Usage(format!(
            "`{}` is not a valid method name",
            args.name
        )));
    }
    Ok(CloudToDeviceMethod::new(args.name.clone())
        .with_payload(args.payload.clone())
        .with_timeouts(response, connect))
}

/// Prints the devices a target matches now (`--dry-run`), and how long a job over them takes
/// at least on the hub's tier, when the tier is known.
async fn dry_run(
    client: &ServiceClient,
    hub: &HubSettings,
    target: &TargetArgs,
    out: Output,
) -> Result<Outcome, Error> {
    let condition = condition(target)?;
    let ids = matching_devices(client, target).await?;
    let forecast = JobForecast::new(hub, ids.len());
    if out.json() {
        let mut doc =
            json!({ "queryCondition": condition, "deviceCount": ids.len(), "devices": ids });
        if let (Some(doc), serde_json::Value::Object(fields)) =
            (doc.as_object_mut(), forecast.json())
        {
            doc.extend(fields);
        }
        out.document(&doc);
    } else {
        out.line(format!("{} device(s) match `{condition}` now:", ids.len()));
        for id in &ids {
            out.line(format!("  {id}"));
        }
        for line in forecast.lines() {
            out.line(line);
        }
        note("dry run: no job was created");
    }
    Ok(Outcome::Success)
}

/// `schedule-job method ...` as a hub job.
pub async fn method(
    client: &ServiceClient,
    hub: &HubSettings,
    args: &MethodArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let call = method_call(&args.call)?;
    if args.schedule.dry_run {
        return dry_run(client, hub, &args.target, out).await;
    }
    let condition = condition(&args.target)?;
    let start = start_time(&args.schedule, OffsetDateTime::now_utc())?;
    let max = max_execution_secs(&args.schedule)?;
    let id = job_id(&args.schedule)?;
    let matched = validate_target(client, &args.target).await?;
    let request = JobRequest::schedule_device_method(
        &id,
        &condition,
        call,
        hub_core::timestamp::format_millis(start),
        max,
    );
    create_and_follow(client, request, matched, &args.schedule, out, shutdown).await
}

/// The twin patch the arguments stand for.
pub fn twin_patch(args: &TwinPatchArgs) -> TwinPatch {
    let mut patch = TwinPatch::new();
    if let Some(desired) = &args.desired {
        patch = patch.with_desired(desired.clone());
    }
    if let Some(tags) = &args.tags {
        patch = patch.with_tags(tags.clone());
    }
    patch
}

/// `schedule-job twin ...`.
pub async fn twin(
    client: &ServiceClient,
    hub: &HubSettings,
    args: &TwinArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let patch = twin_patch(&args.patch);
    if args.schedule.dry_run {
        return dry_run(client, hub, &args.target, out).await;
    }
    let condition = condition(&args.target)?;
    let start = start_time(&args.schedule, OffsetDateTime::now_utc())?;
    let max = max_execution_secs(&args.schedule)?;
    let id = job_id(&args.schedule)?;
    let matched = validate_target(client, &args.target).await?;
    let request = JobRequest::schedule_update_twin(
        &id,
        &condition,
        patch,
        hub_core::timestamp::format_millis(start),
        max,
    );
    create_and_follow(client, request, matched, &args.schedule, out, shutdown).await
}

async fn create_and_follow(
    client: &ServiceClient,
    request: JobRequest,
    (matched, more): (usize, bool),
    schedule: &ScheduleArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    if matched == 0 {
        note(
            "note: no device matches the query right now; the job will apply to devices that match when it runs",
        );
    }
    let job = client.create_job(&request).await?;
    if !out.json() {
        out.line(format!("created {}", describe_job(&job)));
        note(format!(
            "{}{} device(s) match now",
            if more { "at least " } else { "" },
            matched
        ));
    }
    if !schedule.wait {
        out.document(&job);
        if !out.json() {
            note(format!(
                "follow it with: schedule-job status {} --wait",
                job.job_id
            ));
        }
        return Ok(Outcome::Success);
    }
    out.json_line(&json!({ "event": "created", "job": job }));
    wait(client, &job.job_id, out, shutdown).await
}

/// Follows a job to its end with a progress bar, then prints the per-device summary.
pub async fn wait(
    client: &ServiceClient,
    job_id: &str,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(0), target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last: Option<String> = None;
    let mut watch = JobWatch::new(PollPace::new());
    let job = loop {
        let job = client.get_job(job_id).await?;
        let stats = job.device_job_statistics.unwrap_or_default();
        let status = job.status.clone().unwrap_or(JobStatus::Unknown);
        bar.set_length(stats.device_count);
        bar.set_position(stats.succeeded_count + stats.failed_count);
        bar.set_message(format!(
            "{status}: {} succeeded, {} failed, {} running, {} pending",
            stats.succeeded_count, stats.failed_count, stats.running_count, stats.pending_count
        ));
        let snapshot =
            serde_json::to_string(&(&job.status, &job.device_job_statistics)).unwrap_or_default();
        if last.as_ref() != Some(&snapshot) {
            out.json_line(&json!({ "event": "progress", "jobId": job.job_id, "status": status.as_str(), "deviceJobStatistics": stats }));
            last = Some(snapshot);
        }
        if status.is_terminal() {
            break job;
        }
        let pause = watch.next_pause(Instant::now(), Some(&stats));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => {
                bar.finish_and_clear();
                let msg = format!(
                    "stopped waiting; job {job_id} goes on on the hub (status {status}): \
                     `schedule-job status {job_id} --wait` to follow it, `schedule-job cancel {job_id}` to stop it"
                );
                note(&msg);
                out.json_line(&json!({ "event": "interrupted", "jobId": job_id, "status": status.as_str() }));
                return Ok(Outcome::Failed(msg));
            }
        }
    };
    bar.finish_and_clear();
    let outcomes = device_outcomes(client, job_id).await?;
    let summary = OutcomeSummary::of(&outcomes);
    finish(&job, &summary, out)
}

fn finish(job: &JobResponse, summary: &OutcomeSummary, out: Output) -> Result<Outcome, Error> {
    let status = job.status.clone().unwrap_or(JobStatus::Unknown);
    let failed = job
        .device_job_statistics
        .as_ref()
        .map_or(0, |s| s.failed_count)
        .max(summary.failed as u64);
    out.json_line(&json!({ "event": "done", "job": job, "summary": summary }));
    if !out.json() {
        out.line(describe_job(job));
        for line in summary.lines() {
            out.line(line);
        }
    }
    Ok(match status {
        JobStatus::Completed if failed == 0 => Outcome::Success,
        JobStatus::Completed => {
            Outcome::Failed(format!("job {}: {failed} device(s) failed", job.job_id))
        }
        other => Outcome::Failed(format!(
            "job {} ended {other}{}",
            job.job_id,
            job.failure_reason()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
    })
}

/// Every device row of a job, sorted by device id.
pub async fn device_outcomes(
    client: &ServiceClient,
    job_id: &str,
) -> Result<Vec<DeviceOutcome>, Error> {
    let rows: Vec<DeviceJob> = client.device_jobs(job_id).try_collect().await?;
    let mut outcomes: Vec<DeviceOutcome> = rows.iter().map(DeviceOutcome::from_row).collect();
    outcomes.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(outcomes)
}

/// `schedule-job status JOB_ID [--wait]`.
pub async fn status(
    client: &ServiceClient,
    job_id: &str,
    follow: bool,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    if follow {
        return wait(client, job_id, out, shutdown).await;
    }
    let job = client.get_job(job_id).await?;
    out.document(&job);
    out.line(describe_job(&job));
    Ok(Outcome::Success)
}

/// `schedule-job list`.
pub async fn list(client: &ServiceClient, args: &ListArgs, out: Output) -> Result<Outcome, Error> {
    let job_type = args.job_type.map(|k| match k {
        JobKind::Method => JobType::ScheduleDeviceMethod,
        JobKind::Twin => JobType::ScheduleUpdateTwin,
    });
    let job_status = match &args.status {
        None => None,
        Some(s) => {
            let status = JobStatus::from_wire(s);
            if !status.is_known() {
                let known: Vec<&str> = JobStatus::KNOWN.iter().map(JobStatus::as_str).collect();
                return Err(Error::Usage(format!(
                    "unknown job status `{s}`; use one of {}",
                    known.join(", ")
                )));
            }
            Some(status)
        }
    };
    let jobs: Vec<JobResponse> = client
        .query_jobs(job_type, job_status)
        .try_collect()
        .await?;
    out.document(&jobs);
    if !out.json() {
        if jobs.is_empty() {
            out.line("no jobs");
        }
        for job in &jobs {
            out.line(describe_job(job));
        }
    }
    Ok(Outcome::Success)
}

/// `schedule-job cancel JOB_ID`.
pub async fn cancel(client: &ServiceClient, job_id: &str, out: Output) -> Result<Outcome, Error> {
    let job = client.cancel_job(job_id).await?;
    out.document(&job);
    out.line(describe_job(&job));
    Ok(Outcome::Success)
}

/// `schedule-job results JOB_ID`.
pub async fn results(client: &ServiceClient, job_id: &str, out: Output) -> Result<Outcome, Error> {
    let job = client.get_job(job_id).await?;
    let outcomes = device_outcomes(client, job_id).await?;
    let summary = OutcomeSummary::of(&outcomes);
    out.document(&json!({ "job": job, "summary": summary, "devices": outcomes }));
    if !out.json() {
        out.line(describe_job(&job));
        for line in table(&outcomes) {
            out.line(line);
        }
        for line in summary.lines() {
            out.line(line);
        }
    }
    Ok(if summary.failed == 0 && summary.unfinished == 0 {
        Outcome::Success
    } else {
        Outcome::Failed(format!(
            "{} failed, {} not finished",
            summary.failed, summary.unfinished
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_start_fast_and_stay_within_thirty_a_minute() {
        let mut pace = PollPace::new();
        let pauses: Vec<Duration> = (0..200).map(|_| pace.next_pause()).collect();
        assert_eq!(pauses[0], PollPace::FIRST);
        assert!(
            pauses.windows(2).all(|w| w[0] <= w[1]),
            "pauses never shrink"
        );
        assert_eq!(pauses.last().copied(), Some(PollPace::LONGEST));
        // The first minute holds the few fast first polls plus at most 30 at the longest pause.
        let mut elapsed = Duration::ZERO;
        let first_minute = pauses
            .iter()
            .take_while(|p| {
                elapsed += **p;
                elapsed <= Duration::from_secs(60)
            })
            .count();
        assert!(
            first_minute <= 40,
            "{first_minute} polls in the first minute"
        );
    }

    fn stats(device_count: u64, done: u64) -> DeviceJobStatistics {
        DeviceJobStatistics {
            device_count,
            succeeded_count: done,
            ..DeviceJobStatistics::default()
        }
    }

    #[test]
    fn a_watch_polls_at_the_predicted_end_and_never_faster_than_half_the_pace() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut pace = PollPace::new();
        let mut watch = JobWatch::new(PollPace::new());
        // The first poll only starts the clock.
        assert_eq!(
            watch.next_pause(at(0), Some(&stats(1000, 0))),
            pace.next_pause()
        );
        // 300 of 1000 in 100 ms: 700 more take about 233 ms, longer than the pace's 75 ms.
        assert_eq!(
            watch.next_pause(at(100), Some(&stats(1000, 300))),
            pace.next_pause()
        );
        // A long job, late in its run: 10 s of pace grown to 2 s, 40 devices left at 10/s.
        let mut late = JobWatch::new(PollPace::starting_at(PollPace::LONGEST));
        late.next_pause(at(0), Some(&stats(100, 0)));
        let pause = late.next_pause(at(6_000), Some(&stats(100, 60)));
        assert_eq!(pause, PollPace::LONGEST, "4 s left: the pace's 2 s");
        let pause = late.next_pause(at(8_500), Some(&stats(100, 85)));
        assert!(
            (Duration::from_millis(1_400)..=Duration::from_millis(1_600)).contains(&pause),
            "15 left at 10/s: about 1.5 s, not 2 s: {pause:?}"
        );
        // All done but not yet completed: poll again soon, but no sooner than half the pace.
        let pause = late.next_pause(at(10_000), Some(&stats(100, 100)));
        assert_eq!(pause, PollPace::LONGEST / 2);
        // Without progress the pace stands.
        let mut idle = JobWatch::new(PollPace::new());
        idle.next_pause(at(0), Some(&stats(10, 0)));
        let mut pace = PollPace::new();
        pace.next_pause();
        assert_eq!(
            idle.next_pause(at(500), Some(&stats(10, 0))),
            pace.next_pause()
        );
    }
}
