//! Client-side fan-out: the tutorial's direct invocation applied to many devices, through the
//! REST API with bounded concurrency (the alternative to a hub-side job).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hub_core::method::CloudToDeviceMethod;
use hub_core::service_client::ServiceClient;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Outcome;
use crate::cli::MethodArgs;
use crate::error::Error;
use crate::jobs;
use crate::output::{Output, note};
use crate::report::{DeviceOutcome, OutcomeSummary, table};

/// What a fan-out did.
#[derive(Debug)]
pub struct FanoutReport {
    /// One outcome per device that was invoked (sorted by device id).
    pub outcomes: Vec<DeviceOutcome>,
    /// Devices not invoked because of a shutdown.
    pub not_invoked: usize,
    /// Wall time of the invocations.
    pub elapsed: Duration,
}

impl FanoutReport {
    /// Invocations per second.
    pub fn rate(&self) -> f64 {
        self.outcomes.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Invokes `method` on every device, at most `concurrency` at a time; stops starting new calls
/// when `shutdown` fires (calls in flight finish).
pub async fn invoke_all(
    client: &ServiceClient,
    device_ids: Vec<String>,
    method: &CloudToDeviceMethod,
    concurrency: usize,
    progress: &ProgressBar,
    shutdown: &CancellationToken,
) -> FanoutReport {
    let total = device_ids.len();
    let started = Instant::now();
    let calls = futures_util::stream::iter(device_ids)
        .take_until(shutdown.clone().cancelled_owned())
        .map(|id| async move {
            let result = client.invoke_method(&id, method).await;
            DeviceOutcome::from_call(id, result)
        })
        .buffer_unordered(concurrency.max(1));
    let mut outcomes: Vec<DeviceOutcome> = calls.inspect(|_| progress.inc(1)).collect().await;
    let elapsed = started.elapsed();
    outcomes.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    FanoutReport {
        not_invoked: total - outcomes.len(),
        outcomes,
        elapsed,
    }
}

/// `schedule-job method NAME --client-side ...`.
pub async fn run(
    client: &ServiceClient,
    args: &MethodArgs,
    out: Output,
    shutdown: &CancellationToken,
) -> Result<Outcome, Error> {
    let method = jobs::method_call(&args.call)?;
    let start = jobs::start_time(&args.schedule, time::OffsetDateTime::now_utc())?;
    let ids = jobs::matching_devices(client, &args.target).await?;
    if args.schedule.dry_run {
        let condition = jobs::condition(&args.target)?;
        out.document(
            &json!({ "queryCondition": condition, "deviceCount": ids.len(), "devices": ids }),
        );
        out.line(format!("{} device(s) match `{condition}` now:", ids.len()));
        for id in &ids {
            out.line(format!("  {id}"));
        }
        note("dry run: nothing was invoked");
        return Ok(Outcome::Success);
    }
    let delay = (start - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    if delay > time::Duration::ZERO {
        note(format!(
            "waiting {:.1} s until the start time",
            delay.as_seconds_f64()
        ));
        tokio::select! {
            () = tokio::time::sleep(delay.unsigned_abs()) => {}
            () = shutdown.cancelled() => {
                let msg = format!("interrupted before the start time: {} was not invoked on any of the {} device(s)", args.call.name, ids.len());
                note(&msg);
                return Ok(Outcome::Failed(msg));
            }
        }
    }
    note(format!(
        "invoking {} on {} device(s), {} at a time, from this client",
        args.call.name,
        ids.len(),
        args.concurrency
    ));
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(ids.len() as u64), target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = invoke_all(
        client,
        ids,
        &method,
        args.concurrency as usize,
        &bar,
        shutdown,
    )
    .await;
    bar.finish_and_clear();
    let summary = OutcomeSummary::of(&report.outcomes);
    out.document(&json!({
        "method": args.call.name,
        "clientSide": true,
        "elapsedSeconds": report.elapsed.as_secs_f64(),
        "devicesPerSecond": report.rate(),
        "notInvoked": report.not_invoked,
        "summary": summary,
        "devices": report.outcomes,
    }));
    if !out.json() {
        if report.outcomes.len() <= 50 {
            for line in table(&report.outcomes) {
                out.line(line);
            }
        }
        for line in summary.lines() {
            out.line(line);
        }
        out.line(format!(
            "{} call(s) in {:.2} s ({:.0} devices/s)",
            report.outcomes.len(),
            report.elapsed.as_secs_f64(),
            report.rate()
        ));
    }
    if report.not_invoked > 0 {
        let msg = format!(
            "interrupted: {} device(s) were not invoked",
            report.not_invoked
        );
        note(&msg);
        return Ok(Outcome::Failed(msg));
    }
    Ok(if summary.failed == 0 {
        Outcome::Success
    } else {
        Outcome::Failed(format!("{} device(s) failed", summary.failed))
    })
}
