//! The tutorial "Schedule and broadcast jobs" in one process.
//!
//! What this shows: a local IoT hub (hub-emulator, on free ports with a throwaway data directory),
//! the simulated device answering `lockDoor` and logging desired-property updates (sim-device),
//! and the job service scheduling the method call and the twin update and reporting their
//! status (schedule-job), with both programs' output interleaved and labelled as the tutorial's
//! two console windows.
//!
//! Run with: `cargo run --release --example tutorial` (short delays), or
//! `cargo run --release --example tutorial -- --real-delays` (the tutorial's 20 s and 10 s);
//! add `--hub-jobs` to run the pair as IoT Hub Jobs v2 instead of client-side timers.
//! Exits 0 when both jobs completed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser as _;
use tokio_util::sync::CancellationToken;

const DEVICE_LABEL: &str = "[simDevice]          ";
const SERVICE_LABEL: &str = "[scheduleJobService] ";

#[tokio::main]
async fn main() -> ExitCode {
    match tutorial().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn tutorial() -> Result<bool> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let real_delays = args.iter().any(|a| a == "--real-delays");
    let hub_jobs = args.iter().any(|a| a == "--hub-jobs");
    if let Some(unknown) = args
        .iter()
        .find(|a| *a != "--real-delays" && *a != "--hub-jobs")
    {
        bail!("unknown argument `{unknown}`; this example takes --real-delays and --hub-jobs");
    }
    let (method_delay, twin_delay, interval) = if real_delays {
        ("20s", "10s", "6s")
    } else {
        ("3s", "2s", "1s")
    };

    let data_dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let hub = hub_emulator::start(hub_emulator::Config {
        data_dir: Some(data_dir.path().to_path_buf()),
        ..hub_emulator::Config::ephemeral()
    })
    .await
    .context("cannot start the local IoT hub")?;
    let hub_env = data_dir.path().join("hub.env");
    println!(
        "Local IoT hub (hub-emulator) running: MQTT/TLS on {}, HTTPS on {}",
        hub.mqtt_addr, hub.https_addr
    );
    println!();

    let shutdown = CancellationToken::new();
    let device_args = sim_device::config::Args::parse_from([
        "sim-device",
        "--hub-env",
        &hub_env.to_string_lossy(),
    ]);
    let mut device_config =
        sim_device::Config::from_args(device_args).context("sim-device configuration")?;
    device_config.label = DEVICE_LABEL.to_owned();
    let device = tokio::spawn(sim_device::run(device_config, shutdown.child_token()));

    // The tutorial starts the device first; wait until it listens for methods.
    let ready = async {
        while !hub
            .hub()
            .method_ready(hub_emulator::hub::TUTORIAL_DEVICE_ID)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .context("the simulated device did not connect within 30 s")?;

    let mut service_argv = vec![
        "schedule-job",
        "--hub-env",
        hub_env.to_str().context("temporary path is not UTF-8")?,
        "--method-delay",
        method_delay,
        "--twin-delay",
        twin_delay,
        "--status-interval",
        interval,
    ];
    if hub_jobs {
        service_argv.push("--hub-jobs");
    }
    let service_args = schedule_job::Args::parse_from(service_argv);
    let outcome =
        schedule_job::run_labelled(service_args, SERVICE_LABEL, shutdown.child_token()).await;

    // Let the device print the last twin update before it stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    let device_summary = device.await.context("the device task panicked")?;
    hub.shutdown().await;

    let outcome = outcome.context("schedule-job failed")?;
    let device_summary = device_summary.context("sim-device failed")?;
    println!();
    match outcome {
        schedule_job::Outcome::Success => {
            println!("Both jobs completed. Device totals: {device_summary}.");
            Ok(true)
        }
        schedule_job::Outcome::Failed(reason) => {
            println!("The tutorial did not complete: {reason}");
            Ok(false)
        }
    }
}
