//! `schedule-job rollout`: staged, rate-limited, self-aborting rollouts with retries and a window, as a series of IoT Hub Jobs v2 jobs over bounded `deviceId IN [...]` conditions.
//!
//! - [`plan`]: pure wave planning (canary, fixed and exponential rates, the tier's clamp, abort
//!   arithmetic, id chunking under the query-length limit).
//! - [`state`]: the spec, the rollout id derived from it, and the atomically written state file.
//! - [`run`]: the executor, which also replays the hub's record on resume.
//! - [`view`]: event lines and the progress line.
//!
//! Documented for users in docs/rollouts.md.

pub mod plan;
pub mod run;
pub mod state;
pub mod view;

use std::collections::HashMap;
use std::time::Duration;

use hub_core::service_client::ServiceClient;
use hub_core::tier::Quotas;

use crate::settings::KnownTier;
use serde_json::json;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::Outcome;
use crate::cli::{
    RolloutArgs, RolloutCommand, RolloutPlanArgs, RolloutResumeArgs, RolloutRunArgs,
    RolloutStatusArgs,
};
use crate::error::Error;
use crate::jobs;
use crate::output::{Output, note};
use plan::{RateSpec, WavePlan, plan_waves, wave_duration};
use run::{Ending, Executor, RolloutReport, RunOptions};
use state::{Action, RolloutSpec, RolloutState, STATE_VERSION};
use view::View;

/// AWS IoT Jobs' bounds for `incrementFactor`.
const INCREMENT_FACTOR: std::ops::RangeInclusive<f64> = 1.1..=5.0;

/// `schedule-job rollout ...`.
pub async fn command(
    client: &ServiceClient,
    tier: Option<&KnownTier>,
    command: &RolloutCommand,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    match command {
        RolloutCommand::Method(m) => {
            let call = jobs::method_call(&m.call)?;
            let action = Action::Method {
                name: m.call.name.clone(),
                payload: m.call.payload.clone(),
                response_timeout_secs: call.response_timeout_secs(),
                connect_timeout_secs: call.connect_timeout_secs(),
            };
            start(client, tier, action, &m.plan, out, shutdown).await
        }
        RolloutCommand::Twin(t) => {
            let action = Action::Twin {
                desired: t.patch.desired.clone(),
                tags: t.patch.tags.clone(),
            };
            start(client, tier, action, &t.plan, out, shutdown).await
        }
        RolloutCommand::Resume(r) => resume(client, tier, r, out, shutdown).await,
        RolloutCommand::Status(s) => status(client, s, out).await,
    }
}

/// The spec the arguments stand for, checked; nothing is sent.
pub fn spec_of(
    action: Action,
    condition: String,
    args: &RolloutArgs,
) -> Result<RolloutSpec, Error> {
    let rate = match (
        args.max_per_minute,
        args.base_rate,
        args.rate_increase_after,
    ) {
        (Some(per_minute), None, _) => RateSpec::Fixed {
            per_minute,
            wave_size: args.wave_size.unwrap_or(per_minute),
        },
        (None, Some(base), Some(after)) => {
            if !INCREMENT_FACTOR.contains(&args.increment_factor) {
                return Err(Error::Usage(format!(
                    "--increment-factor {} must be between 1.1 and 5 (AWS IoT Jobs' bounds)",
                    args.increment_factor
                )));
            }
            RateSpec::Exponential {
                base_per_minute: base,
                factor: args.increment_factor,
                after,
            }
        }
        (None, Some(_), None) => {
            return Err(Error::Usage(
                "--base-rate needs --rate-increase-after notified:N or succeeded:N".into(),
            ));
        }
        _ => {
            return Err(Error::Usage(
                "give a rate: --max-per-minute N, or --base-rate N --rate-increase-after notified:N"
                    .into(),
            ));
        }
    };
    if args.abort_min_executed == 0 {
        return Err(Error::Usage(
            "--abort-min-executed must be at least 1".into(),
        ));
    }
    let max = args.max_execution.as_secs();
    if max == 0 {
        return Err(Error::Usage("--max-execution must be at least 1s".into()));
    }
    Ok(RolloutSpec {
        action,
        condition,
        canary: args.canary,
        rate,
        abort: args.abort_when.clone(),
        abort_min_executed: args.abort_min_executed,
        retry: args.retry.unwrap_or_default(),
        retry_after_ms: u64::try_from(args.retry_after.as_millis()).unwrap_or(u64::MAX),
        job_max_execution_secs: max,
    })
}

/// The run's options, checked against `now`.
pub fn options_of(
    run: &RolloutRunArgs,
    tier: Option<&KnownTier>,
    now: OffsetDateTime,
) -> Result<RunOptions, Error> {
    if let Some(known) = tier
        && known.quotas.max_active_jobs() == 0
    {
        return Err(Error::Usage(format!(
            "the hub's tier is {} (from {}): basic tiers have no jobs; a rollout needs a free or standard hub (F1, S1-S3)",
            known.quotas.tier, known.origin
        )));
    }
    let tier = tier.map(|known| known.quotas);
    if let Some(stop) = run.stop_starting_at {
        if stop <= now {
            return Err(Error::Usage(format!(
                "--stop-starting-at {} is not in the future (now is {}): give the end of the window",
                hub_core::timestamp::format_millis(stop),
                hub_core::timestamp::format_millis(now)
            )));
        }
        if run.start_at.is_some_and(|start| start >= stop) {
            return Err(Error::Usage(
                "--start-at must be before --stop-starting-at".into(),
            ));
        }
    }
    Ok(RunOptions {
        start_at: run.start_at,
        stop_starting_at: run.stop_starting_at,
        at_window_end: run.at_window_end,
        tier,
    })
}

async fn start(
    client: &ServiceClient,
    tier: Option<&KnownTier>,
    action: Action,
    plan: &RolloutPlanArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let (target, args, run) = (&plan.target, &plan.rollout, &plan.run);
    let condition = jobs::condition(target)?;
    let spec = spec_of(action, condition, args)?;
    let options = options_of(run, tier, OffsetDateTime::now_utc())?;
    let id = match &args.id {
        Some(id) => {
            state::check_id(id)?;
            id.clone()
        }
        None => spec.derived_id(),
    };
    let dir = state::state_dir(run.state_dir.as_deref())?;
    let state = match state::load(&dir, &id)? {
        Some(existing) if existing.spec != spec => {
            return Err(Error::Usage(format!(
                "rollout {id} exists ({}) with another spec; pass another --id, or `schedule-job rollout resume {id}` to continue it",
                state::state_path(&dir, &id).display()
            )));
        }
        Some(existing) => {
            note(format!(
                "rollout {id} exists: continuing it from the hub's record (fleet of {} as matched on {})",
                existing.fleet.len(),
                existing.created
            ));
            existing
        }
        None => {
            let mut fleet = jobs::matching_devices(client, target).await?;
            if fleet.is_empty() {
                return Err(Error::Usage(format!(
                    "no device matches `{}` now; nothing to roll out",
                    spec.condition
                )));
            }
            fleet.sort();
            fleet.dedup();
            RolloutState {
                version: STATE_VERSION,
                id: id.clone(),
                spec,
                fleet,
                created: hub_core::timestamp::format_millis(OffsetDateTime::now_utc()),
            }
        }
    };
    if args.dry_run {
        return dry_run(&state, options.tier, out);
    }
    let path = state::save(&dir, &state)?;
    tracing::info!(path = %path.display(), "rollout state saved");
    execute(client, &state, options, out, shutdown).await
}

async fn resume(
    client: &ServiceClient,
    tier: Option<&KnownTier>,
    args: &RolloutResumeArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    state::check_id(&args.id)?;
    let options = options_of(&args.run, tier, OffsetDateTime::now_utc())?;
    let state = load_existing(args.run.state_dir.as_deref(), &args.id)?;
    execute(client, &state, options, out, shutdown).await
}

fn load_existing(dir: Option<&std::path::Path>, id: &str) -> Result<RolloutState, Error> {
    let dir = state::state_dir(dir)?;
    state::load(&dir, id)?.ok_or_else(|| {
        Error::Usage(format!(
            "no rollout {id} in {}; pass the --state-dir it was started with",
            dir.display()
        ))
    })
}

/// Runs a rollout (new or resumed) and reports how it ended.
pub async fn execute(
    client: &ServiceClient,
    state: &RolloutState,
    options: RunOptions,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let (report, _view) = execute_report(client, state, options, View::new(out), shutdown).await?;
    Ok(outcome_of(&report))
}

/// [`execute`], returning the run's report (for benchmarks and tests).
pub async fn execute_report(
    client: &ServiceClient,
    state: &RolloutState,
    options: RunOptions,
    mut view: View,
    shutdown: &CancellationToken,
) -> Result<(RolloutReport, View), Error> {
    let record = run::hub_record(client, &state.id).await?;
    let waves = plan_waves(
        state.fleet.len(),
        state.spec.canary,
        &state.spec.rate,
        options.tier,
    );
    view.event(
        &json!({ "event": "rollout-started", "rolloutId": state.id, "devices": state.fleet.len(),
                 "waves": waves.iter().map(|w| w.size).collect::<Vec<_>>(),
                 "jobsOnHub": record.len() }),
        format!(
            "rollout {}: {} device(s) in {} wave(s){}",
            state.id,
            state.fleet.len(),
            waves.len(),
            if record.is_empty() {
                String::new()
            } else {
                format!("; {} of its jobs are on the hub already", record.len())
            }
        ),
    );
    Executor::new(client, state, options, record, view, shutdown)
        .run()
        .await
}

/// The exit status a report stands for.
pub fn outcome_of(report: &RolloutReport) -> Outcome {
    let id = &report.id;
    match &report.ending {
        Ending::Completed if report.counts.failures() == 0 && report.counts.canceled == 0 => {
            Outcome::Success
        }
        Ending::Completed => Outcome::Failed(format!(
            "rollout {id}: {} device(s) failed after their retries ({})",
            report.counts.failures() + report.counts.canceled,
            report.counts.describe()
        )),
        Ending::Aborted(d) => Outcome::Failed(format!(
            "rollout {id} aborted: {} measured {:.1}% ({} of {} executed), above {}%",
            d.rule, d.percent, d.failures, d.executed, d.threshold
        )),
        Ending::WindowEnded => Outcome::Failed(format!(
            "rollout {id} stopped at the end of its window with {} device(s) not reached",
            report.counts.not_reached
        )),
        Ending::Interrupted => Outcome::Failed(format!(
            "rollout {id} interrupted; `schedule-job rollout resume {id}` continues it"
        )),
    }
}

/// The plan as JSON: waves with their sizes, rates, jobs and times.
fn plan_json(waves: &[WavePlan], state: &RolloutState, tier: Option<Quotas>) -> serde_json::Value {
    let total: Duration = waves.iter().map(|w| wave_duration(w, tier)).sum();
    json!({
        "rolloutId": state.id,
        "devices": state.fleet.len(),
        "tier": tier.map(|q| q.to_string()),
        "waves": waves.iter().map(|w| {
            let ids = &state.fleet[w.range()];
            json!({
                "wave": w.index, "canary": w.canary, "size": w.size,
                "perMinute": w.per_minute, "requestedPerMinute": w.requested_per_minute,
                "jobs": plan::chunk_ids(ids, w.part_max, plan::MAX_CONDITION_CHARS).len(),
                "estimatedSeconds": wave_duration(w, tier).as_secs_f64(),
            })
        }).collect::<Vec<_>>(),
        "estimatedSeconds": total.as_secs_f64(),
    })
}

/// `rollout ID: N device(s) matching `COND``.
fn headline(state: &RolloutState) -> String {
    format!(
        "rollout {}: {} device(s) matching `{}`",
        state.id,
        state.fleet.len(),
        state.spec.condition
    )
}

fn dry_run(state: &RolloutState, tier: Option<Quotas>, out: Output) -> Result<Outcome, Error> {
    let waves = plan_waves(state.fleet.len(), state.spec.canary, &state.spec.rate, tier);
    let doc = plan_json(&waves, state, tier);
    out.document(&doc);
    if !out.json() {
        out.line(format!(
            "{}, {} wave(s){}",
            headline(state),
            waves.len(),
            tier.map(|q| format!(" on {q}")).unwrap_or_default()
        ));
        for (w, j) in waves
            .iter()
            .zip(doc["waves"].as_array().into_iter().flatten())
        {
            out.line(format!(
                "  wave {:>2}{:9} {:>6} device(s) at {:>7.0}/min{} in {} job(s), at least {:.0} s",
                w.index + 1,
                if w.canary { " (canary)" } else { "" },
                w.size,
                w.per_minute,
                if w.per_minute < w.requested_per_minute {
                    format!(" (asked {:.0}, the tier's cap)", w.requested_per_minute)
                } else {
                    String::new()
                },
                j["jobs"],
                wave_duration(w, tier).as_secs_f64()
            ));
        }
        let total = doc["estimatedSeconds"].as_f64().unwrap_or_default();
        out.line(format!(
            "at least {total:.0} s in all ({:.1} min), waves one after the other{}",
            total / 60.0,
            if tier.is_some() {
                ", each wave's jobs at the tier's jobs device-operations rate"
            } else {
                "; pass --tier to include the hub's own pace"
            }
        ));
        note("dry run: no job was created and no state was written");
    }
    Ok(Outcome::Success)
}

async fn status(
    client: &ServiceClient,
    args: &RolloutStatusArgs,
    out: Output,
) -> Result<Outcome, Error> {
    state::check_id(&args.id)?;
    let state = load_existing(args.state_dir.as_deref(), &args.id)?;
    let record = run::hub_record(client, &state.id).await?;
    let results = run::replay(client, &state, &record).await?;
    let waves = plan_waves(state.fleet.len(), state.spec.canary, &state.spec.rate, None);
    let mut by_wave: HashMap<usize, Vec<&hub_core::job::JobResponse>> = HashMap::new();
    for job in record.values() {
        if let Some((w, _, _)) = plan::parse_job_id(&state.id, &job.job_id) {
            by_wave.entry(w).or_default().push(job);
        }
    }
    let overall = run::counts_of(state.fleet.iter(), &results);
    let mut wave_docs = Vec::new();
    for w in &waves {
        let counts = run::counts_of(state.fleet[w.range()].iter(), &results);
        let mut jobs = by_wave.remove(&w.index).unwrap_or_default();
        jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
        wave_docs.push((w, counts, jobs));
    }
    let mut devices: HashMap<&str, Vec<&String>> = HashMap::new();
    for id in &state.fleet {
        let key = results.get(id).map_or("not-reached", |r| r.name());
        devices.entry(key).or_default().push(id);
    }
    out.document(&json!({
        "rolloutId": state.id,
        "spec": state.spec,
        "created": state.created,
        "counts": overall,
        "waves": wave_docs.iter().map(|(w, counts, jobs)| json!({
            "wave": w.index, "canary": w.canary, "size": w.size, "counts": counts,
            "jobs": jobs.iter().map(|j| json!({
                "jobId": j.job_id, "status": j.status.as_ref().map(|s| s.as_str()),
                "deviceJobStatistics": j.device_job_statistics,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "devices": devices,
    }));
    if !out.json() {
        out.line(format!(
            "{} (created {}): {}",
            headline(&state),
            state.created,
            overall.describe()
        ));
        for (w, counts, jobs) in &wave_docs {
            let running = jobs.iter().filter(|j| !j.is_terminal()).count();
            out.line(format!(
                "  wave {:>2}{:9} {:>6} device(s): {}{}",
                w.index + 1,
                if w.canary { " (canary)" } else { "" },
                w.size,
                if jobs.is_empty() {
                    "not started".to_owned()
                } else {
                    counts.describe()
                },
                if running > 0 {
                    format!(" ({running} job(s) running)")
                } else {
                    String::new()
                }
            ));
        }
    }
    Ok(Outcome::Success)
}
