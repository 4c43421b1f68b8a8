//! What this shows: the time `schedule-job rollout` spends above the work itself. N devices
//! (default 10,000; real MQTT/TLS devices) on an in-process hub-emulator
//! get `lockDoor` in 5 waves, a canary then 4 at an exponential rate; for each wave it prints the
//! wave's wall time, the hub jobs' own time (each job's startTime to endTime as the hub recorded
//! them, summed: the wave's jobs run one after the other), the rate's floor (devices / rate),
//! and the scheduling overhead: wall time minus the jobs' own time (creating jobs, noticing their
//! end by polling, reading their `devices.jobs` rows), with the creating and reading shares.
//!
//! The rates are set high enough that the floor stays below the hub's own pace, so what is left
//! is overhead, not deliberate waiting.
//!
//! Devices run in a `sim-device` child process when it is built next to this example (see
//! `examples/fleet`), else (or with `--in-process`) in this process.
//!
//! Run with: `ulimit -n "$(ulimit -Hn)"; cargo build --release -p sim-device;
//! cargo run --release -p schedule-job --example rollout_bench -- [N] [--in-process]`

use std::time::{Duration, Instant};

use schedule_job::cli::{OutputFormat, WindowEnd};
use schedule_job::output::Output;
use schedule_job::rollout::plan::{Canary, IncreaseCriteria, RateSpec, RetryCaps};
use schedule_job::rollout::run::RunOptions;
use schedule_job::rollout::state::{Action, RolloutSpec, RolloutState, STATE_VERSION};
use schedule_job::rollout::view::View;
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod fleet;

use fleet::BoxError;

/// Waves: the canary, then steps of this share of the rest.
const WAVES: u64 = 5;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let in_process = std::env::args().any(|a| a == "--in-process");
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| a != "--in-process")
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let dir = tempfile::tempdir()?;
    let (hub, client) = fleet::start_hub(dir.path(), 64).await?;
    let devices = fleet::start_fleet(&hub, &client, dir.path(), n, in_process).await?;
    let fleet = devices.ids.clone();

    // A canary of 4%, then 4 waves of equal steps at an exponential rate.
    let canary = (n as u64 / 25).max(1);
    let step = (n as u64 - canary).div_ceil(WAVES - 1).max(1);
    let spec = RolloutSpec {
        action: Action::Method {
            name: "lockDoor".into(),
            payload: json!({ "lockTime": "10m" }),
            response_timeout_secs: 30,
            connect_timeout_secs: 0,
        },
        condition: "*".into(),
        canary: Some(Canary::Count(canary)),
        rate: RateSpec::Exponential {
            base_per_minute: 600_000,
            factor: 1.5,
            after: IncreaseCriteria::Notified(step),
        },
        abort: vec!["all>5%".parse()?],
        abort_min_executed: 100,
        retry: RetryCaps::default(),
        retry_after_ms: 0,
        job_max_execution_secs: 3600,
    };
    let state = RolloutState {
        version: STATE_VERSION,
        id: spec.derived_id(),
        spec,
        fleet,
        created: hub_core::timestamp::format_millis(time::OffsetDateTime::now_utc()),
    };
    let options = RunOptions {
        start_at: None,
        stop_starting_at: None,
        at_window_end: WindowEnd::Stop,
        tier: None,
    };
    let view = View::new(Output {
        format: OutputFormat::Human,
        label: "",
    });
    let t = Instant::now();
    let (report, _view) = schedule_job::rollout::execute_report(
        &client,
        &state,
        options,
        view,
        &CancellationToken::new(),
    )
    .await?;
    let total = t.elapsed();

    println!();
    println!(
        "| wave | devices | jobs | rate (/min) | wall | hub jobs' own time | rate floor | overhead | overhead per job | of which creating | of which reading rows |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut overhead_sum = Duration::ZERO;
    for wave in &report.waves {
        let mut own = Duration::ZERO;
        for job_id in &wave.jobs {
            let job = client.get_job(job_id).await?;
            let start = job.start_time.as_deref().map(hub_core::timestamp::parse);
            let end = job.end_time().map(hub_core::timestamp::parse);
            if let (Some(Ok(start)), Some(Ok(end))) = (start, end) {
                own += Duration::try_from(end - start).unwrap_or_default();
            }
        }
        let floor = Duration::from_secs_f64(wave.size as f64 * 60.0 / wave.per_minute);
        let overhead = wave.wall.saturating_sub(own);
        overhead_sum += overhead;
        println!(
            "| {} | {} | {} | {:.0} | {:.3} s | {:.3} s | {:.3} s | {:.3} s | {:.1} ms | {:.3} s | {:.3} s |",
            wave.index + 1,
            wave.size,
            wave.jobs.len(),
            wave.per_minute,
            wave.wall.as_secs_f64(),
            own.as_secs_f64(),
            floor.as_secs_f64(),
            overhead.as_secs_f64(),
            overhead.as_secs_f64() * 1000.0 / wave.jobs.len().max(1) as f64,
            wave.creating.as_secs_f64(),
            wave.reading.as_secs_f64()
        );
    }
    println!(
        "rollout {}: {} of {} succeeded, ending {}, {:.2} s in all, {:.3} s of it scheduling overhead",
        report.id,
        report.counts.succeeded,
        report.counts.devices,
        report.ending.name(),
        total.as_secs_f64(),
        overhead_sum.as_secs_f64()
    );
    devices.stop().await;
    hub.shutdown().await;
    Ok(())
}
