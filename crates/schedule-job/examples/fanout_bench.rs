//! What this shows: the tutorial's client-side approach (one REST call per device, bounded
//! concurrency) against IoT Hub's hub-side job, invoking `lockDoor` on N connected devices of an
//! in-process hub-emulator. Devices are real MQTT/TLS clients (hub-core's DeviceClient).
//!
//! Devices run in a `sim-device --count N --register` child process (built next to this example:
//! `cargo build --release -p sim-device`), so hub and devices each have their own file-descriptor
//! limit; with `--in-process`, or when sim-device is not built, they run in this process.
//!
//! Run with: `ulimit -n "$(ulimit -Hn)"; cargo build --release -p sim-device;
//! cargo run --release -p schedule-job --example fanout_bench -- [N] [CONCURRENCY] [--in-process]`
//! (defaults 10000 and 256). Prints devices/s for both; it is a benchmark, not a test.

use std::time::{Duration, Instant};

use hub_core::job::{JobRequest, JobStatus};
use hub_core::method::CloudToDeviceMethod;
use indicatif::ProgressBar;
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod fleet;

use fleet::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut positional = Vec::new();
    let mut in_process = false;
    for a in std::env::args().skip(1) {
        if a == "--in-process" {
            in_process = true;
        } else {
            positional.push(a);
        }
    }
    let n: usize = positional
        .first()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let concurrency: usize = positional
        .get(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(256);
    let dir = tempfile::tempdir()?;
    let (hub, client) = fleet::start_hub(dir.path(), concurrency).await?;

    let fleet = fleet::start_fleet(&hub, &client, dir.path(), n, in_process).await?;
    let ids = fleet.ids.clone();

    let method = CloudToDeviceMethod::new("lockDoor")
        .with_payload(json!({ "lockTime": "10m" }))
        .with_timeouts(30, 0);

    // Warm-up: open the connection pool.
    let warm = ids.iter().take(concurrency.min(n)).cloned().collect();
    schedule_job::fanout::invoke_all(
        &client,
        warm,
        &method,
        concurrency,
        &ProgressBar::hidden(),
        &CancellationToken::new(),
    )
    .await;

    let report = schedule_job::fanout::invoke_all(
        &client,
        ids.clone(),
        &method,
        concurrency,
        &ProgressBar::hidden(),
        &CancellationToken::new(),
    )
    .await;
    let ok = report.outcomes.iter().filter(|o| o.succeeded()).count();
    println!(
        "client-side fan-out: {} devices ({ok} ok) in {:.2} s = {:.0} devices/s (concurrency {concurrency})",
        report.outcomes.len(),
        report.elapsed.as_secs_f64(),
        report.rate()
    );

    let t = Instant::now();
    let request = JobRequest::schedule_device_method(
        "bench-job",
        "*",
        method.clone(),
        hub_core::timestamp::format_millis(time::OffsetDateTime::now_utc()),
        3600,
    );
    client.create_job(&request).await?;
    let job = loop {
        let job = client.get_job("bench-job").await?;
        if job.is_terminal() {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = t.elapsed();
    let stats = job.device_job_statistics.unwrap_or_default();
    println!(
        "hub-side job:        {} devices ({} ok, {} failed, status {}) in {:.2} s = {:.0} devices/s (create to completed, 20 ms polling)",
        stats.device_count,
        stats.succeeded_count,
        stats.failed_count,
        job.status.unwrap_or(JobStatus::Unknown),
        elapsed.as_secs_f64(),
        stats.device_count as f64 / elapsed.as_secs_f64()
    );

    fleet.stop().await;
    hub.shutdown().await;
    Ok(())
}
