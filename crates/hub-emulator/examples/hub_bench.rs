//! Hub benchmark: N devices connect over MQTT/TLS, then a direct method is invoked on each
//! through the REST API with bounded concurrency.
//!
//! Prints TLS connects/s, methods/s, p50/p99 method latency and the hub's resident memory per
//! connected device. The hub runs as a separate process (the `hub-emulator` binary next to this
//! example) so that its memory is measured alone.
//!
//! Run with: `ulimit -n 65536; cargo build --release -p hub-emulator --bins --examples &&
//! cargo run --release -p hub-emulator --example hub_bench -- --devices 10000`

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt as _;
use futures_util::stream;
use hub_core::connection_string::{ServiceConnectionString, SharedKey};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Semaphore;

const CONNECT_CONCURRENCY: usize = 256;
const METHOD_CONCURRENCY: usize = 256;
const REGISTER_CONCURRENCY: usize = 64;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("read /proc status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS not found")
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn hub_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/hub_bench -> target/<profile>/hub-emulator
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("example path")?;
    let bin = dir.join("hub-emulator");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p hub-emulator --bins` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

struct Service {
    http: reqwest::Client,
    base: String,
    cs: ServiceConnectionString,
}

impl Service {
    fn auth(&self) -> String {
        hub_core::sas::generate(
            &self.cs.host_name.to_string(),
            &self.cs.key,
            Some(&self.cs.policy_name),
            now_unix() + 3600,
        )
    }

    async fn put_device(&self, id: &str) -> Result<String> {
        let response = self
            .http
            .put(format!("{}/devices/{id}?api-version=2021-04-12", self.base))
            .header("Authorization", self.auth())
            .json(&json!({"deviceId": id}))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("create {id}: {status} {body}");
        }
        body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .map(str::to_owned)
            .context("primary key")
    }

    async fn invoke(&self, id: &str) -> Result<Duration> {
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}/twins/{id}/methods?api-version=2021-04-12", self.base))
            .header("Authorization", self.auth())
            .json(&json!({"methodName": "lockDoor", "payload": {"lockTime": "10m"}, "responseTimeoutInSeconds": 30}))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() || body["status"] != 200 {
            bail!("method on {id}: {status} {body}");
        }
        Ok(started.elapsed())
    }
}

async fn run_device(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    ready: Arc<AtomicUsize>,
    subscribed: tokio::sync::mpsc::Sender<()>,
) {
    let mut signalled = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let _ = client.try_subscribe("$iothub/methods/POST/#", QoS::AtMostOnce);
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) if !signalled => {
                signalled = true;
                ready.fetch_add(1, Ordering::Relaxed);
                let _ = subscribed.send(()).await;
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                if let Ok(hub_core::topic::Topic::MethodRequest { rid, .. }) =
                    hub_core::topic::Topic::parse(&publish.topic)
                {
                    let topic = format!("$iothub/methods/res/200/?$rid={rid}");
                    let _ = client.try_publish(
                        topic,
                        QoS::AtMostOnce,
                        false,
                        &b"{\"Response\":\"ok\"}"[..],
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("device connection ended: {e}");
                return;
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let devices = arg("--devices", 10_000);
    let data_dir = tempfile::tempdir()?;
    let mut hub = tokio::process::Command::new(hub_binary()?)
        .args([
            "--in-memory",
            "--mqtt-port",
            "0",
            "--https-port",
            "0",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start hub-emulator")?;
    let stdout = hub.stdout.take().context("hub stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut env = HashMap::new();
    while let Some(line) = lines.next_line().await? {
        if line == "hub-emulator ready" {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    let hub_pid = hub.id().context("hub pid")?;
    let cs: ServiceConnectionString = env
        .get("IOTHUB_CONNECTION_STRING")
        .context("service connection string")?
        .parse()?;
    let device_cs = env
        .get("IOTHUB_DEVICE_CONNECTION_STRING")
        .context("device connection string")?
        .clone();
    let mqtt_port: u16 = device_cs
        .split(';')
        .find_map(|p| p.strip_prefix("HostName=localhost:"))
        .and_then(|p| p.parse().ok())
        .context("MQTT port in HostName")?;
    let ca_pem = std::fs::read_to_string(data_dir.path().join("ca.pem"))?;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .pool_max_idle_per_host(METHOD_CONCURRENCY)
        .build()?;
    let service = Arc::new(Service {
        http,
        base: format!("https://{}", cs.host_name),
        cs,
    });

    println!(
        "hub-emulator benchmark: {devices} devices, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let started = Instant::now();
    let ids: Vec<String> = (0..devices).map(|i| format!("bench-{i:05}")).collect();
    let keys: Vec<(String, String)> = stream::iter(ids.clone())
        .map(|id| {
            let service = Arc::clone(&service);
            async move { service.put_device(&id).await.map(|key| (id, key)) }
        })
        .buffer_unordered(REGISTER_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    println!("registered {devices} devices in {:.2?}", started.elapsed());

    let rss_before = rss_kib(hub_pid)?;
    let tls = tls_config(&ca_pem)?;
    let ready = Arc::new(AtomicUsize::new(0));
    let (subscribed_tx, mut subscribed_rx) = tokio::sync::mpsc::channel(devices.max(1));
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let connect_started = Instant::now();
    for (id, key) in &keys {
        let host = format!("localhost:{mqtt_port}");
        let resource = hub_core::sas::device_resource_uri(&host, id, None);
        let key = SharedKey::from_base64(key)?;
        let password = hub_core::sas::generate(&resource, &key, None, now_unix() + 3600);
        let mut options = MqttOptions::new(id.clone(), "localhost", mqtt_port);
        options.set_credentials(format!("{host}/{id}/?api-version=2021-04-12"), password);
        options.set_keep_alive(Duration::from_secs(60));
        options.set_clean_session(false);
        options.set_max_packet_size(16 * 1024, 16 * 1024);
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::clone(&tls))));
        let (client, eventloop) = AsyncClient::new(options, 4);
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let (ready, tx) = (Arc::clone(&ready), subscribed_tx.clone());
        let (one_tx, mut one_rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(run_device(client, eventloop, ready, one_tx));
        tokio::spawn(async move {
            if one_rx.recv().await.is_some() {
                let _ = tx.send(()).await;
            }
            drop(permit);
            while one_rx.recv().await.is_some() {}
        });
    }
    for _ in 0..devices {
        tokio::time::timeout(Duration::from_secs(120), subscribed_rx.recv())
            .await
            .context("devices did not all connect within 120 s")?;
    }
    let connect_elapsed = connect_started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(hub_pid)?;
    println!(
        "connected {devices} devices over TLS in {:.2?}: {:.0} connects/s",
        connect_elapsed,
        devices as f64 / connect_elapsed.as_secs_f64()
    );
    println!(
        "hub resident memory: {rss_before} KiB before, {rss_after} KiB after: {:.1} KiB per connected device",
        (rss_after.saturating_sub(rss_before)) as f64 / devices as f64
    );

    let methods_started = Instant::now();
    let mut latencies: Vec<Duration> = stream::iter(ids.clone())
        .map(|id| {
            let service = Arc::clone(&service);
            async move { service.invoke(&id).await }
        })
        .buffer_unordered(METHOD_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let methods_elapsed = methods_started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "invoked {devices} direct methods in {:.2?} ({METHOD_CONCURRENCY} in flight): {:.0} methods/s, p50 {:.2?}, p99 {:.2?}",
        methods_elapsed,
        devices as f64 / methods_elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99)
    );
    println!(
        "hub resident memory after the methods: {} KiB",
        rss_kib(hub_pid)?
    );
    hub.start_kill()?;
    Ok(())
}
