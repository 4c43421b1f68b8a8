//! Shared by the examples: an in-process hub, and a fleet of real MQTT/TLS devices answering
//! every method with 200, in a `sim-device --count N --register` child process (built next to
//! the example: `cargo build --release -p sim-device`), so hub and devices each have their own
//! file-descriptor limit, or, with `in_process` or when sim-device is not built, in this process
//! (hub-core's DeviceClient).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hub_core::connection_string::DeviceConnectionString;
use hub_core::device::Device;
use hub_core::device_client::{DeviceClient, DeviceClientOptions};
use hub_core::service_client::ServiceClient;
use hub_core::tls::TrustOptions;
use serde_json::json;

/// The examples' error type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A running fleet: its device ids (sorted), and what to stop.
pub struct Fleet {
    /// Every device id in the registry, sorted.
    pub ids: Vec<String>,
    devices: Vec<DeviceClient>,
    child: Option<std::process::Child>,
}

impl Fleet {
    /// Disconnects the devices.
    pub async fn stop(mut self) {
        futures_util::stream::iter(&self.devices)
            .for_each_concurrent(256, |d| d.close())
            .await;
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Registers `n` devices `bench-1`.. and connects them (see the module's doc for where), and
/// waits until every one is subscribed to methods.
pub async fn start_fleet(
    hub: &hub_emulator::RunningHub,
    client: &ServiceClient,
    dir: &std::path::Path,
    n: usize,
    in_process: bool,
) -> Result<Fleet, BoxError> {
    let sim_device = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("sim-device"))
        .filter(|p| p.exists() && !in_process);
    let t = Instant::now();
    let mut child = None;
    let mut devices = Vec::new();
    match &sim_device {
        Some(exe) => {
            eprintln!("starting {n} devices in {}", exe.display());
            child = Some(
                std::process::Command::new(exe)
                    .args(["--hub-env", &dir.join("hub.env").display().to_string()])
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
        None => devices = in_process_devices(hub, client, n).await?,
    }
    let mut ids: Vec<String> = client
        .query_twins("*")
        .map(|t| t.map(|t| t.device_id))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    ids.sort();
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
    Ok(Fleet {
        ids,
        devices,
        child,
    })
}

/// An in-process hub writing into `dir`, a service client with `pool` idle connections, and
/// only the bench devices to come in the registry (the tutorial's myDeviceId is deleted, so a
/// job can target '*').
pub async fn start_hub(
    dir: &std::path::Path,
    pool: usize,
) -> Result<(hub_emulator::RunningHub, ServiceClient), BoxError> {
    let hub = hub_emulator::start(hub_emulator::Config {
        data_dir: Some(dir.to_owned()),
        durable: false,
        ..hub_emulator::Config::ephemeral()
    })
    .await?;
    let service = hub.env.service_connection_string.parse()?;
    let client = ServiceClient::builder(service)
        .ca_pem(hub.env.ca_pem.as_bytes())?
        .pool_max_idle(pool)
        .build()?;
    client.delete_device("myDeviceId", None).await?;
    Ok((hub, client))
}

/// Registers and connects `n` devices as DeviceClients in this process.
async fn in_process_devices(
    hub: &hub_emulator::RunningHub,
    client: &ServiceClient,
    n: usize,
) -> Result<Vec<DeviceClient>, BoxError> {
    let ids: Vec<String> = (1..=n).map(|i| format!("bench-{i}")).collect();
    let keys: Vec<Result<(String, String), BoxError>> = futures_util::stream::iter(ids)
        .map(|id| {
            let client = client.clone();
            async move {
                let d = client.create_device(&Device::new(&id)).await?;
                let key = d
                    .symmetric_key()
                    .and_then(|k| k.primary())
                    .ok_or("no key")?
                    .to_owned();
                Ok((id, key))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let tls = hub_core::tls::client_config(&TrustOptions::with_ca_pem(hub.env.ca_pem.clone()))?;
    let mut options = DeviceClientOptions::new(tls);
    options.connect_timeout = Duration::from_secs(120);
    let options = Arc::new(options);
    let mqtt_port = hub.mqtt_addr.port();
    let devices: Vec<Result<DeviceClient, BoxError>> = futures_util::stream::iter(keys)
        .map(|k| {
            let options = options.clone();
            async move {
                let (id, key) = k?;
                let cs: DeviceConnectionString =
                    format!("HostName=localhost:{mqtt_port};DeviceId={id};SharedAccessKey={key}")
                        .parse()?;
                let connected = DeviceClient::connect(&cs, &options).await?;
                let mut methods = connected.methods;
                let desired = connected.desired;
                tokio::spawn(async move {
                    let _desired = desired;
                    while let Some(request) = methods.recv().await {
                        let _ = request.respond(200, &json!({ "result": "locked" })).await;
                    }
                });
                Ok(connected.client)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    devices.into_iter().collect()
}
