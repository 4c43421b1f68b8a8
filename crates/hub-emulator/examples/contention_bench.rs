//! Contention benchmark: how long a plain `GET /twins/{id}` waits while the hub is busy with
//! durable writes it has no part in.
//!
//! An in-process hub with persistence on (SQLite in a temporary data dir, durable commits) and
//! N registered devices (default 5,000). First a baseline: one reader issues `GET /twins/{other}`
//! sequentially, one request at a time, for `--seconds`. Then the same reader loop runs again
//! while, at the same time,
//! * ONE device connected over MQTT/TLS pipelines reported-property patches
//!   (`$iothub/twin/PATCH/properties/reported/?$rid=N`, QoS 0) as fast as the hub answers them,
//!   with at most `--window` (default 64) unanswered, so the hub is measured rather than an
//!   unbounded client queue;
//! * twin jobs (`scheduleUpdateTwin`, `queryCondition` `*`, via `PUT /jobs/v2/{id}`) over all N
//!   twins run back to back.
//!
//! Prints p50/p90/p99/max of the GET latency and the number of GETs for both runs, with the
//! target (p99 < 20 ms) beside the figure, plus reported patches acknowledged per second and
//! twin-job device operations per second during the loaded run. Everything is on loopback and
//! bounded: one device, one reader, one job at a time, fixed durations.
//!
//! Run with: `cargo run --release -p hub-emulator --example contention_bench -- --devices 5000
//! --seconds 10`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hub_core::connection_string::{ServiceConnectionString, SharedKey};
use hub_emulator::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// What the figure is measured against.
const TARGET_P99: Duration = Duration::from_millis(20);
/// How long the patching device may go without any answer before the run is declared broken
/// (a lost answer would otherwise shrink the window silently).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// GET-twin latency while reported patches and twin jobs write to a durable hub.
#[derive(Debug, Parser)]
struct Args {
    /// How many devices to register (the twin jobs update all of them).
    #[arg(long, default_value_t = 5_000)]
    devices: usize,
    /// How long each GET loop (baseline, then under load) runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Reported patches the device keeps unanswered at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A REST client for the hub: its CA trusted, one precomputed iothubowner SAS header.
#[derive(Clone)]
struct Service {
    client: reqwest::Client,
    base: String,
    auth: String,
}

impl Service {
    fn url(&self, path: &str) -> String {
        format!("{}{path}?api-version=2021-04-12", self.base)
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .client
            .get(self.url(path))
            .header("Authorization", &self.auth)
            .send()
            .await
            .expect("GET");
        assert!(response.status().is_success(), "GET {path}: {response:?}");
        response.json().await.expect("JSON")
    }

    async fn put(&self, path: &str, body: &Value) {
        let response = self
            .client
            .put(self.url(path))
            .header("Authorization", &self.auth)
            .json(body)
            .send()
            .await
            .expect("PUT");
        let status = response.status();
        assert!(
            status.is_success(),
            "PUT {path}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }
}

/// The sequential reader: one `GET /twins/{id}` at a time for `duration`; every latency.
async fn read_loop(service: &Service, id: &str, duration: Duration) -> Vec<Duration> {
    let path = format!("/twins/{id}");
    let url = service.url(&path);
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let sent = Instant::now();
        let response = service
            .client
            .get(&url)
            .header("Authorization", &service.auth)
            .send()
            .await
            .expect("GET twin");
        assert!(response.status().is_success(), "GET {path}: {response:?}");
        // Read the whole body: the latency a client sees includes it.
        response.bytes().await.expect("twin body");
        latencies.push(sent.elapsed());
    }
    latencies
}

fn report(label: &str, mut latencies: Vec<Duration>, seconds: f64) {
    latencies.sort();
    let at = |p: f64| {
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1]
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = at(0.99);
    println!(
        "{label}: {} GETs ({:.0}/s) | p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.2} ms | target p99 < {} ms: {}",
        latencies.len(),
        latencies.len() as f64 / seconds,
        ms(at(0.50)),
        ms(at(0.90)),
        ms(p99),
        ms(at(1.0)),
        TARGET_P99.as_millis(),
        if p99 < TARGET_P99 { "met" } else { "MISSED" },
    );
}

#[derive(Default)]
struct DeviceCounters {
    /// Answers with status 204.
    acked: AtomicU64,
    /// Answers with any other status.
    refused: AtomicU64,
    /// Set before the hub shuts down, so a closed connection is expected.
    stopping: AtomicBool,
}

/// Connects the patching device; resolves once it is subscribed to twin answers.
async fn connect_device(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    id: &str,
    key: &SharedKey,
    window: Arc<Semaphore>,
    counters: Arc<DeviceCounters>,
) -> AsyncClient {
    let host = format!("localhost:{port}");
    let password =
        hub_core::sas::generate(&format!("{host}/devices/{id}"), key, None, now() + 7200);
    let mut options = MqttOptions::new(id, "localhost", port);
    options
        .set_credentials(format!("{host}/{id}/?api-version=2021-04-12"), password)
        .set_keep_alive(Duration::from_secs(600))
        .set_max_packet_size(64 * 1024, 64 * 1024)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    // The request queue only needs to hold one window of publishes.
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let subscriber = client.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    subscriber
                        .subscribe("$iothub/twin/res/#", QoS::AtMostOnce)
                        .await
                        .expect("subscribe");
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // `$iothub/twin/res/{status}/?$rid=N&$version=V`
                    let status = p
                        .topic
                        .strip_prefix("$iothub/twin/res/")
                        .and_then(|rest| rest.split('/').next());
                    if status == Some("204") {
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    window.add_permits(1);
                }
                Ok(_) => {}
                Err(_) if counters.stopping.load(Ordering::Relaxed) => return,
                Err(e) => panic!("patching device: {e}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), subscribed_rx)
        .await
        .expect("device subscribed in 30 s")
        .expect("device event loop");
    client
}

/// Publishes reported patches until `stop`, never more than the window unanswered.
async fn patch_loop(client: AsyncClient, window: Arc<Semaphore>, stop: Arc<AtomicBool>) {
    let mut rid: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let permit = tokio::time::timeout(ANSWER_TIMEOUT, window.acquire())
            .await
            .expect("the hub answered no reported patch for 30 s")
            .expect("window open");
        // The answer hands the slot back (`add_permits` in the event loop).
        permit.forget();
        rid += 1;
        client
            .publish(
                format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                QoS::AtMostOnce,
                false,
                format!("{{\"counter\":{rid},\"fw\":\"1.{}\"}}", rid % 10),
            )
            .await
            .expect("publish");
    }
}

/// Twin-job device operations done while the loop ran.
struct JobTotals {
    completed: u64,
    device_ops: u64,
}

/// Runs twin jobs over `*` back to back until `stop`; cancels the one still running then.
async fn job_loop(service: Service, stop: Arc<AtomicBool>) -> JobTotals {
    let mut totals = JobTotals {
        completed: 0,
        device_ops: 0,
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("contention-{n}");
        let body = json!({
            "jobId": id,
            "type": "scheduleUpdateTwin",
            "updateTwin": {"etag": "*", "properties": {"desired": {"bench": n}}},
            "queryCondition": "*",
            "maxExecutionTimeInSeconds": 3600,
        });
        let path = format!("/jobs/v2/{id}");
        service.put(&path, &body).await;
        loop {
            let job = service.get(&path).await;
            let stats = &job["deviceJobStatistics"];
            let done = stats["succeededCount"].as_u64().unwrap_or(0)
                + stats["failedCount"].as_u64().unwrap_or(0);
            let status = job["status"].as_str().unwrap_or_default();
            if ["completed", "failed", "cancelled"].contains(&status) {
                totals.completed += u64::from(status == "completed");
                totals.device_ops += done;
                break;
            }
            if stop.load(Ordering::Relaxed) {
                // Count what this job did inside the window, then stop it (it may have just
                // finished, so the answer does not matter).
                totals.device_ops += done;
                let _ = service
                    .client
                    .post(service.url(&format!("{path}/cancel")))
                    .header("Authorization", &service.auth)
                    .send()
                    .await;
                return totals;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    totals
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(
        args.devices >= 2,
        "--devices must be at least 2 (one patches, one is read)"
    );
    let seconds = Duration::from_secs(args.seconds.max(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: Some(dir.path().to_path_buf()),
        durable: true,
        ..Config::ephemeral()
    };
    let running = hub_emulator::start(config).await.expect("hub starts");
    let hub = running.hub().clone();
    hub.delete_device(hub_emulator::hub::TUTORIAL_DEVICE_ID, None)
        .await
        .expect("delete tutorial device");

    // Registration goes straight to the hub, as in jobs_bench (setup, not what is measured).
    let started = Instant::now();
    for i in 0..args.devices {
        let id = format!("bench-{i:05}");
        hub.create_or_update_device(&id, &json!({"deviceId": id}), None)
            .await
            .expect("register");
    }
    println!(
        "registered {} devices (durable) in {:.2?}",
        args.devices,
        started.elapsed()
    );
    let patcher = "bench-00000";
    let read = "bench-00001";

    let cs: ServiceConnectionString = running
        .env
        .service_connection_string
        .parse()
        .expect("connection string");
    let host = cs.host_name.to_string();
    let auth = hub_core::sas::generate(&host, &cs.key, Some(&cs.policy_name), now() + 7200);
    let ca = reqwest::Certificate::from_pem(running.env.ca_pem.as_bytes()).expect("CA");
    // Separate clients (connection pools), so the reader never queues behind job polling.
    let service = || Service {
        client: reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .resolve("localhost", running.https_addr)
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client"),
        base: format!("https://localhost:{}", running.https_addr.port()),
        auth: auth.clone(),
    };
    let reader = service();
    let jobs = service();

    // Warm the reader's connection (TLS handshake) so neither run counts it.
    reader.get(&format!("/twins/{read}")).await;
    let baseline = read_loop(&reader, read, seconds).await;
    report("baseline, no load", baseline, seconds.as_secs_f64());

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(running.env.ca_pem.as_bytes()) {
        roots.add(cert.expect("CA")).expect("add CA");
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let key = SharedKey::from_base64(&hub.device_primary_key(patcher).expect("key")).expect("key");
    let window = Arc::new(Semaphore::new(args.window.max(1)));
    let counters = Arc::new(DeviceCounters::default());
    let device = connect_device(
        running.mqtt_addr.port(),
        tls,
        patcher,
        &key,
        window.clone(),
        counters.clone(),
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let loaded_at = Instant::now();
    let patches = tokio::spawn(patch_loop(device.clone(), window, stop.clone()));
    let job_runner = tokio::spawn(job_loop(jobs, stop.clone()));
    let under_load = read_loop(&reader, read, seconds).await;
    let acked = counters.acked.load(Ordering::Relaxed);
    let refused = counters.refused.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let loaded = loaded_at.elapsed().as_secs_f64();
    report("under load", under_load, seconds.as_secs_f64());
    patches.await.expect("patch loop");
    let totals = job_runner.await.expect("job loop");
    println!(
        "reported patches acknowledged: {acked} ({:.0}/s, window {}){}",
        acked as f64 / loaded,
        args.window.max(1),
        if refused > 0 {
            format!(", {refused} refused")
        } else {
            String::new()
        }
    );
    println!(
        "twin jobs over {} twins: {} completed, {} device ops ({:.0}/s)",
        args.devices,
        totals.completed,
        totals.device_ops,
        totals.device_ops as f64 / loaded
    );
    counters.stopping.store(true, Ordering::Relaxed);
    let _ = device.disconnect().await;
    running.shutdown().await;
}
