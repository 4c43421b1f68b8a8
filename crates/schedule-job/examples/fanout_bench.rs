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

use futures_util::StreamExt;
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
    let sim_device = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("sim-device"))
        .filter(|p| p.exists());
    let sim_device = if in_process { None } else { sim_device };

    let dir = tempfile::tempdir()?;
    let (hub, client) = fleet::start_hub(dir.path(), concurrency).await?;

    let t = Instant::now();
    let mut child = None;
    let mut devices = Vec::new();
    match &sim_device {
        Some(exe) => {
            eprintln!("starting {n} devices in {}", exe.display());
            child = Some(
                std::process::Command::new(exe)
                    .args([
                        "--hub-env",
                        &dir.path().join("hub.env").display().to_string(),
                    ])
                    .args([
                        "--count",
                        &n.to_string(),
                        "--id-prefix",
                        "bench-",
                        "--register",
                    ])
                    .args(["--connect-timeout", "300s", "--summary-interval", "1h"])
                    .env_remove("IOTHUB_CONNECTION_STRING")
                    .env_remove("IOTHUB_DEVICE_CONNECTION_STRING")
                    .env_remove("IOTHUB_CA_FILE")
                    .stdout(std::process::Stdio::null())
                    .spawn()?,
            );
            let deadline = Instant::now() + Duration::from_secs(600);
            while hub.hub().connected_count() < n {
                if Instant::now() > deadline {
                    return Err(format!(
                        "only {} of {n} devices connected",
                        hub.hub().connected_count()
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        None => devices = fleet::in_process_devices(&hub, &client, n).await?,
    }
    let ids: Vec<String> = client
        .query_twins("*")
        .map(|t| t.map(|t| t.device_id))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ids.iter().all(|id| hub.hub().method_ready(id)) {
        if Instant::now() > deadline {
            return Err("devices did not subscribe to methods".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} devices registered, connected and subscribed in {:.1} s ({})",
        ids.len(),
        t.elapsed().as_secs_f64(),
        if sim_device.is_some() {
            "sim-device fleet process"
        } else {
            "in this process"
        }
    );

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

    futures_util::stream::iter(&devices)
        .for_each_concurrent(256, |d| d.close())
        .await;
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
    hub.shutdown().await;
    Ok(())
}
