//! Fleet benchmark: N simulated devices (default 10,000) in this process, each with its own MQTT
//! connection over TLS, running sim-device's per-device code (`sim_device::device::serve`).
//! Prints the time until all are connected, resident memory per device, and a `lockDoor`
//! fan-out over all of them through the service API.
//!
//! The hub runs as a child `hub-emulator` process (so its memory is not counted here) when the
//! binary sits next to this example; build it first. `--in-process` runs it in this process.
//!
//! Run with:
//!   ulimit -n "$(ulimit -Hn)"
//!   cargo build --release -p hub-emulator
//!   cargo run --release -p sim-device --example fleet_bench -- [N] [--in-process]

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hub_core::connection_string::{
    ConnectionString, DeviceAuth, DeviceConnectionString, ServiceConnectionString, SharedKey,
};
use hub_core::device::Device;
use hub_core::device_client::{DeviceClient, DeviceClientOptions};
use hub_core::method::CloudToDeviceMethod;
use hub_core::service_client::ServiceClient;
use hub_core::tls::TrustOptions;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

/// `VmRSS` (or another field) of /proc/{pid}/status, in KiB.
fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct HubProcess {
    service: String,
    device: String,
    ca_file: Option<PathBuf>,
    ca_pem: Option<String>,
    pid: Option<u32>,
    _child: Option<tokio::process::Child>,
    _in_process: Option<hub_emulator::RunningHub>,
    _dir: tempfile::TempDir,
}

async fn start_hub(in_process: bool) -> anyhow::Result<HubProcess> {
    let dir = tempfile::tempdir()?;
    let binary = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("hub-emulator"));
    match binary {
        Some(binary) if binary.exists() && !in_process => {
            let mut child = tokio::process::Command::new(&binary)
                .args([
                    "--in-memory",
                    "--mqtt-port",
                    "0",
                    "--https-port",
                    "0",
                    "--data-dir",
                ])
                .arg(dir.path())
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let stdout = child.stdout.take().context("hub stdout")?;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let (mut service, mut device, mut ca_file) = (None, None, None);
            while let Some(line) = lines.next_line().await? {
                if let Some(v) = line.strip_prefix("IOTHUB_CONNECTION_STRING=") {
                    service = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("IOTHUB_DEVICE_CONNECTION_STRING=") {
                    device = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("IOTHUB_CA_FILE=") {
                    ca_file = Some(PathBuf::from(v));
                } else if line.contains("hub-emulator ready") {
                    break;
                }
            }
            // Keep draining its stdout so the hub never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            println!(
                "hub: child process {} (pid {:?})",
                binary.display(),
                child.id()
            );
            Ok(HubProcess {
                service: service.context("hub printed no IOTHUB_CONNECTION_STRING")?,
                device: device.context("hub printed no IOTHUB_DEVICE_CONNECTION_STRING")?,
                ca_file,
                ca_pem: None,
                pid: child.id(),
                _child: Some(child),
                _in_process: None,
                _dir: dir,
            })
        }
        _ => {
            if !in_process {
                println!(
                    "hub: no hub-emulator binary next to this example; running it in this process"
                );
            } else {
                println!("hub: in this process (its memory is included below)");
            }
            let running = hub_emulator::start(hub_emulator::Config::ephemeral()).await?;
            Ok(HubProcess {
                service: running.env.service_connection_string.clone(),
                device: running.env.device_connection_string.clone(),
                ca_file: None,
                ca_pem: Some(running.env.ca_pem.clone()),
                pid: None,
                _child: None,
                _in_process: Some(running),
                _dir: dir,
            })
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let in_process = args.iter().any(|a| a == "--in-process");
    let n: usize = match args.iter().find(|a| !a.starts_with("--")) {
        Some(v) => v
            .parse()
            .with_context(|| format!("N must be a number, got {v}"))?,
        None => 10_000,
    };

    let hub = start_hub(in_process).await?;
    let ConnectionString::Service(scs) = ConnectionString::from_str(&hub.service)? else {
        bail!("not a service connection string");
    };
    let ConnectionString::Device(base) = ConnectionString::from_str(&hub.device)? else {
        bail!("not a device connection string");
    };
    let scs: ServiceConnectionString = scs;
    let mut builder = ServiceClient::builder(scs);
    if let Some(ca) = &hub.ca_file {
        builder = builder.ca_file(ca)?;
    }
    if let Some(pem) = &hub.ca_pem {
        builder = builder.ca_pem(pem.as_bytes())?;
    }
    let service = builder.pool_max_idle(256).build()?;

    // 1. Identities (not part of the connect figure).
    let started = Instant::now();
    let created: Vec<anyhow::Result<DeviceConnectionString>> = futures_util::stream::iter(1..=n)
        .map(|i| {
            let service = service.clone();
            let base = base.clone();
            async move {
                let id = format!("bench-{i}");
                let device = service.create_device(&Device::new(id.clone())).await?;
                let key = device
                    .symmetric_key()
                    .and_then(|k| k.primary_key.clone().flatten())
                    .context("no key")?;
                Ok(DeviceConnectionString {
                    host_name: base.host_name.clone(),
                    device_id: id,
                    module_id: None,
                    auth: DeviceAuth::SharedAccessKey(SharedKey::from_base64(&key)?),
                    gateway_host_name: None,
                })
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let devices: Vec<DeviceConnectionString> =
        created.into_iter().collect::<anyhow::Result<_>>()?;
    println!(
        "registered {n} devices in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // 2. Connect them all, each running sim-device's per-device loop.
    let trust = TrustOptions {
        ca_file: hub.ca_file.clone(),
        ca_pem: hub.ca_pem.clone(),
        no_platform_roots: false,
    };
    let mut options = DeviceClientOptions::new(hub_core::tls::client_config(&trust)?);
    options.connect_timeout = Duration::from_secs(120);
    let me = std::process::id().to_string();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = proc_status_kib(&me, "VmRSS:").unwrap_or(0);
    let hub_rss_before = hub
        .pid
        .and_then(|p| proc_status_kib(&p.to_string(), "VmRSS:"));

    let stats = Arc::new(sim_device::Stats::default());
    let shutdown = CancellationToken::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(sim_device::CONNECT_CONCURRENCY));
    let connected_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tracker = tokio_util::task::TaskTracker::new();
    let started = Instant::now();
    for cs in devices {
        let (options, stats, shutdown, permits, connected_count, failures) = (
            options.clone(),
            stats.clone(),
            shutdown.clone(),
            permits.clone(),
            connected_count.clone(),
            failures.clone(),
        );
        tracker.spawn(async move {
            let connected = {
                let Ok(_permit) = permits.acquire().await else {
                    return;
                };
                Box::pin(DeviceClient::connect(&cs, &options)).await
            };
            match connected {
                Ok(connected) => {
                    connected_count.fetch_add(1, Ordering::Relaxed);
                    let voice = sim_device::device::Voice {
                        events: false,
                        prefix: String::new(),
                    };
                    sim_device::device::serve(connected, stats, voice, shutdown).await;
                }
                Err(e) => {
                    if failures.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connect failed: {e}");
                    }
                }
            }
        });
    }
    tracker.close();
    loop {
        let done = connected_count.load(Ordering::Relaxed) + failures.load(Ordering::Relaxed);
        if done >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_time = started.elapsed();
    let failed = failures.load(Ordering::Relaxed);
    println!(
        "connected {}/{n} devices over TLS in {:.2}s ({:.0} connects/s){}",
        n - failed,
        connect_time.as_secs_f64(),
        (n - failed) as f64 / connect_time.as_secs_f64(),
        if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        }
    );
    // Let the connect-time twin reads and allocator settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = proc_status_kib(&me, "VmRSS:").unwrap_or(0);
    let per_device = (rss_after.saturating_sub(rss_before)) as f64 / n as f64;
    println!(
        "sim-device process RSS: {:.1} MiB before, {:.1} MiB with {n} devices connected => {:.1} KiB per device",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        per_device
    );
    if let (Some(pid), Some(before)) = (hub.pid, hub_rss_before) {
        let after = proc_status_kib(&pid.to_string(), "VmRSS:").unwrap_or(0);
        println!(
            "hub-emulator process RSS: {:.1} MiB before, {:.1} MiB after ({:.1} KiB per device session)",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / n as f64
        );
    }

    // 3. lockDoor on every device through the service API (what a method job does per device).
    let started = Instant::now();
    let calls: Vec<(Duration, anyhow::Result<i32>)> = futures_util::stream::iter(1..=n)
        .map(|i| {
            let service = service.clone();
            async move {
                let t = Instant::now();
                let method = CloudToDeviceMethod::new("lockDoor")
                    .with_payload(serde_json::json!({"lockTime": "10m"}))
                    .with_timeouts(30, 0);
                let result = service.invoke_method(&format!("bench-{i}"), &method).await;
                (
                    t.elapsed(),
                    result.map(|r| r.status).map_err(anyhow::Error::from),
                )
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let fanout = started.elapsed();
    let ok = calls.iter().filter(|(_, r)| matches!(r, Ok(200))).count();
    if let Some((_, Err(e))) = calls.iter().find(|(_, r)| r.is_err()) {
        eprintln!("a method call failed: {e:#}");
    }
    let mut latencies: Vec<Duration> = calls.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    println!(
        "lockDoor fan-out: {ok}/{n} answered 200 in {:.2}s ({:.0} calls/s, 256 in flight; p50 {:.1} ms, p99 {:.1} ms)",
        fanout.as_secs_f64(),
        n as f64 / fanout.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "devices answered {} methods, applied {} twin patches; peak RSS {:.1} MiB",
        stats.methods_answered.load(Ordering::Relaxed),
        stats.patches_applied.load(Ordering::Relaxed),
        proc_status_kib(&me, "VmHWM:").unwrap_or(0) as f64 / 1024.0
    );

    let started = Instant::now();
    shutdown.cancel();
    tracker.wait().await;
    println!(
        "all devices disconnected in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
