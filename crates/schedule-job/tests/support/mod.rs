//! Test support: a real hub-emulator in a temporary data directory (it writes hub.env there),
//! real MQTT devices (hub-core's DeviceClient) that record what they receive, and a runner for
//! the schedule-job binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use hub_core::connection_string::{DeviceConnectionString, ServiceConnectionString};
use hub_core::device::Device;
use hub_core::device_client::{DeviceClient, DeviceClientOptions};
use hub_core::service_client::ServiceClient;
use hub_core::tls::TrustOptions;
use hub_emulator::{Config, RunningHub};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::mpsc;

/// The tutorial's flags with short delays, for tests.
pub const FAST: &[&str] = &[
    "--method-delay",
    "1s",
    "--twin-delay",
    "500ms",
    "--status-interval",
    "300ms",
];

/// A running hub with its hub.env.
pub struct TestHub {
    pub hub: RunningHub,
    pub dir: TempDir,
    pub env_path: PathBuf,
    pub client: ServiceClient,
    pub service: ServiceConnectionString,
    pub options: DeviceClientOptions,
}

/// What a test device received.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Method(String, Option<Value>),
    Desired(Value),
}

/// A connected device that answers every method with 200 `{"result":"locked"}`.
pub struct TestDevice {
    pub client: DeviceClient,
    pub received: mpsc::UnboundedReceiver<Received>,
}

impl TestHub {
    pub async fn start() -> TestHub {
        TestHub::start_with(Config::ephemeral()).await
    }

    /// A hub with `config`'s limits (its data directory is the test's own).
    pub async fn start_with(config: Config) -> TestHub {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: Some(dir.path().to_owned()),
            durable: false,
            ..config
        };
        let hub = hub_emulator::start(config).await.expect("hub starts");
        let env_path = dir.path().join("hub.env");
        assert!(env_path.exists(), "the hub writes hub.env");
        let service: ServiceConnectionString = hub
            .env
            .service_connection_string
            .parse()
            .expect("service cs");
        let client = ServiceClient::builder(service.clone())
            .ca_pem(hub.env.ca_pem.as_bytes())
            .expect("ca")
            .pool_max_idle(256)
            .build()
            .expect("client");
        let tls = hub_core::tls::client_config(&TrustOptions::with_ca_pem(hub.env.ca_pem.clone()))
            .expect("tls");
        let mut options = DeviceClientOptions::new(tls);
        options.connect_timeout = Duration::from_secs(20);
        options.method_queue = 64;
        TestHub {
            hub,
            dir,
            env_path,
            client,
            service,
            options,
        }
    }

    /// The device connection string of a registered device.
    pub async fn device_cs(&self, device_id: &str) -> DeviceConnectionString {
        let device = self
            .client
            .get_device(device_id)
            .await
            .expect("device exists");
        let key = device
            .symmetric_key()
            .and_then(|k| k.primary())
            .expect("the hub generated a key")
            .to_owned();
        format!(
            "HostName=localhost:{};DeviceId={device_id};SharedAccessKey={key}",
            self.hub.mqtt_addr.port()
        )
        .parse()
        .expect("device cs")
    }

    /// Registers a device, optionally with tags.
    pub async fn register(&self, device_id: &str, tags: Option<Value>) {
        self.client
            .create_device(&Device::new(device_id))
            .await
            .expect("create device");
        if let Some(tags) = tags {
            self.client
                .update_twin(device_id, &json!({ "tags": tags }), None)
                .await
                .expect("tag device");
        }
    }

    /// Connects a registered device that records and answers what it gets.
    pub async fn connect(&self, device_id: &str) -> TestDevice {
        let cs = self.device_cs(device_id).await;
        let connected = DeviceClient::connect(&cs, &self.options)
            .await
            .expect("device connects");
        let (tx, received) = mpsc::unbounded_channel();
        let mut methods = connected.methods;
        let mut desired = connected.desired;
        let tx2 = tx.clone();
        tokio::spawn(async move {
            while let Some(request) = methods.recv().await {
                let payload = request.json().ok().flatten();
                let _ = tx.send(Received::Method(request.name.clone(), payload));
                let _ = request.respond(200, &json!({ "result": "locked" })).await;
            }
        });
        tokio::spawn(async move {
            while let Some(patch) = desired.recv().await {
                let _ = tx2.send(Received::Desired(patch.patch));
            }
        });
        TestDevice {
            client: connected.client,
            received,
        }
    }

    /// Runs the binary with this hub's hub.env; stdout and stderr are captured.
    pub async fn cli(&self, args: &[&str]) -> CliRun {
        let mut all: Vec<String> = vec!["--hub-env".into(), self.env_path.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        run_binary(all).await
    }
}

/// A finished run of the binary.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// Every stdout line parsed as JSON.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{self:#?}"))
            })
            .collect()
    }

    /// stdout as one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{self:#?}"))
    }
}

/// Runs the binary with exactly these arguments and no IOTHUB_* variables (tiers included).
pub async fn run_binary(args: Vec<String>) -> CliRun {
    let data_home = tempfile::tempdir().expect("tempdir");
    let home = data_home.path().to_owned();
    let out: Output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_schedule-job"))
            .args(&args)
            .env_remove("IOTHUB_CONNECTION_STRING")
            .env_remove("IOTHUB_CA_FILE")
            .env_remove("IOTHUB_TIER")
            .env_remove("IOTHUB_UNITS")
            .env("XDG_DATA_HOME", &home)
            .env("RUST_LOG", "warn")
            .output()
            .expect("schedule-job runs")
    })
    .await
    .expect("join");
    drop(data_home);
    let run = CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "--- schedule-job exited {:?}\n[stdout]\n{}\n[stderr]\n{}",
        run.code, run.stdout, run.stderr
    );
    run
}

/// Drains what a device received within `within`.
pub async fn collect(device: &mut TestDevice, within: Duration) -> Vec<Received> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, device.received.recv()).await {
        got.push(r);
    }
    got
}

/// Connects many devices at once.
pub async fn connect_many(hub: &Arc<TestHub>, ids: &[String]) -> Vec<TestDevice> {
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let hub = hub.clone();
        let id = id.clone();
        set.spawn(async move { hub.connect(&id).await });
    }
    let mut devices = Vec::new();
    while let Some(d) = set.join_next().await {
        devices.push(d.expect("connect task"));
    }
    devices
}
