//! Jobs benchmark: N devices connected over MQTT/TLS to an in-process durable hub, one
//! `scheduleDeviceMethod` job over `*`, then one `scheduleUpdateTwin` job over `*`; prints how
//! long each took from the job's start to `completed` and the device operations per second.
//! With `--tiers`, each run's hub is that IoT Hub tier (`S1`, `S3x2` for two units, `none`), and
//! each job's duration is printed beside the one the tier's jobs device-operations rate predicts
//! (devices / rate) and their ratio.
//!
//! Run with (each device holds two sockets in this one process, so raise the open-file limit):
//!   ulimit -n 20000; cargo run --release -p hub-emulator --example jobs_bench -- --devices 1000
//!   cargo run --release -p hub-emulator --example jobs_bench -- --devices 100,1000 --tiers F1,S1,S2,S3

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hub_core::connection_string::{ServiceConnectionString, SharedKey};
use hub_core::tier::{Quotas, Tier};
use hub_emulator::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[derive(Default)]
struct Counters {
    methods: AtomicU64,
    patches: AtomicU64,
    /// Set before the hub shuts down, so closed connections are expected, not reported.
    stopping: AtomicBool,
}

/// One cheap device: a rumqttc event loop that answers methods and counts desired patches.
fn spawn_device(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    id: String,
    key: &SharedKey,
    counters: Arc<Counters>,
) {
    let host = format!("localhost:{port}");
    let password =
        hub_core::sas::generate(&format!("{host}/devices/{id}"), key, None, now() + 7200);
    let mut options = MqttOptions::new(id.clone(), "localhost", port);
    options
        .set_credentials(format!("{host}/{id}/?api-version=2021-04-12"), password)
        .set_keep_alive(Duration::from_secs(600))
        .set_max_packet_size(16 * 1024, 16 * 1024)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("$iothub/methods/POST/#", QoS::AtMostOnce);
                    let _ = client
                        .try_subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtMostOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(rest) = p.topic.strip_prefix("$iothub/methods/POST/") {
                        let rid = rest
                            .split_once("$rid=")
                            .map(|(_, r)| r.to_owned())
                            .unwrap_or_default();
                        counters.methods.fetch_add(1, Ordering::Relaxed);
                        let _ = client.try_publish(
                            format!("$iothub/methods/res/200/?$rid={rid}"),
                            QoS::AtMostOnce,
                            false,
                            "{\"ok\":true}",
                        );
                    } else {
                        counters.patches.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) if counters.stopping.load(Ordering::Relaxed) => return,
                Err(e) => {
                    eprintln!("device {id}: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// One run's figures for one job.
struct JobRun {
    id: &'static str,
    /// startTime to endTime, as the hub recorded them.
    engine: f64,
}

/// `S1`, `S3x2` (two units) or `none`.
fn parse_tier(text: &str) -> Option<Quotas> {
    if text.eq_ignore_ascii_case("none") {
        return None;
    }
    let (tier, units) = text.split_once(['x', 'X']).unwrap_or((text, "1"));
    let tier: Tier = tier
        .parse()
        .expect("--tiers: F1, S1, S2, S3, with xN for N units, or none");
    Some(
        tier.with_units(units.parse().expect("units"))
            .expect("tier and units"),
    )
}

#[tokio::main]
async fn main() {
    let mut sizes: Vec<usize> = vec![10_000];
    let mut tiers: Vec<Option<Quotas>> = vec![None];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--devices" => {
                sizes = args
                    .next()
                    .map(|list| {
                        list.split(',')
                            .map(|n| n.parse().expect("--devices N[,N..]"))
                            .collect()
                    })
                    .expect("--devices N[,N..]")
            }
            "--tiers" => {
                tiers = args
                    .next()
                    .map(|list| list.split(',').map(parse_tier).collect())
                    .expect("--tiers T[,T..]")
            }
            other => panic!(
                "unknown argument {other}; usage: jobs_bench [--devices N[,N..]] [--tiers T[,T..]]"
            ),
        }
    }
    let mut table = Vec::new();
    for &tier in &tiers {
        for &devices in &sizes {
            for job in run(tier, devices).await {
                table.push((tier, devices, job));
            }
        }
    }
    if tiers.iter().any(Option::is_some) {
        println!();
        println!(
            "| tier | devices | job | measured (start to end) | predicted (devices / jobs device-ops rate) | ratio |"
        );
        println!("|---|---|---|---|---|---|");
        for (tier, devices, job) in &table {
            let predicted = tier.and_then(|q| q.job_duration(*devices as u64));
            let tier = tier.map_or("none".to_owned(), |q| q.to_string());
            match predicted {
                Some(p) => println!(
                    "| {tier} | {devices} | {} | {:.2} s | {:.2} s | {:.3} |",
                    job.id,
                    job.engine,
                    p.as_secs_f64(),
                    job.engine / p.as_secs_f64()
                ),
                None => println!(
                    "| {tier} | {devices} | {} | {:.2} s | - | - |",
                    job.id, job.engine
                ),
            }
        }
    }
}

/// One hub of `tier` with `devices` connected devices: a method job, then a twin job.
async fn run(tier: Option<Quotas>, devices: usize) -> Vec<JobRun> {
    println!(
        "== {} devices, {}",
        devices,
        tier.map_or("no tier".to_owned(), |q| format!("tier {q}"))
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: Some(dir.path().to_path_buf()),
        durable: true,
        mqtt_port: 0,
        https_port: 0,
        tier,
        max_active_jobs: tier.map_or(10, |q| q.max_active_jobs()),
        ..Config::ephemeral()
    };
    let running = hub_emulator::start(config).await.expect("hub starts");
    let hub = running.hub().clone();
    hub.delete_device(hub_emulator::hub::TUTORIAL_DEVICE_ID, None)
        .await
        .expect("delete tutorial device");

    let started = Instant::now();
    let mut keys = Vec::with_capacity(devices);
    for i in 0..devices {
        let id = format!("bench-{i:05}");
        hub.create_or_update_device(&id, &json!({"deviceId": id}), None)
            .await
            .expect("register");
        keys.push((
            id.clone(),
            SharedKey::from_base64(&hub.device_primary_key(&id).expect("key")).expect("key"),
        ));
    }
    println!("registered {devices} devices in {:.2?}", started.elapsed());

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
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let port = running.mqtt_addr.port();
    for (n, (id, key)) in keys.iter().enumerate() {
        spawn_device(port, tls.clone(), id.clone(), key, counters.clone());
        // Pace the TLS handshakes so the listener's backlog never overflows.
        if n % 200 == 199 {
            while hub.connected_count() + 400 < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    while keys.iter().any(|(id, _)| !hub.method_ready(id)) {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "devices did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect = started.elapsed();
    println!(
        "connected {devices} devices over TLS in {connect:.2?} ({:.0}/s)",
        devices as f64 / connect.as_secs_f64()
    );

    let cs: ServiceConnectionString = running
        .env
        .service_connection_string
        .parse()
        .expect("connection string");
    let host = cs.host_name.to_string();
    let auth = hub_core::sas::generate(&host, &cs.key, Some(&cs.policy_name), now() + 7200);
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(running.env.ca_pem.as_bytes()).expect("CA"),
        )
        .build()
        .expect("client");
    let base = format!("https://localhost:{}", running.https_addr.port());

    let method = json!({
        "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": {"methodName": "bench", "payload": {"x": 1}, "responseTimeoutInSeconds": 60},
        "queryCondition": "*",
        "maxExecutionTimeInSeconds": 3600,
    });
    let twin = json!({
        "type": "scheduleUpdateTwin",
        "updateTwin": {"etag": "*", "properties": {"desired": {"bench": 1}}},
        "queryCondition": "*",
        "maxExecutionTimeInSeconds": 3600,
    });
    // Within the jobs-operations throttle of every tier (100 a minute on S1).
    let poll = if tier.is_some() {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(10)
    };
    let mut runs = Vec::new();
    for (id, body) in [("bench-method", method), ("bench-twin", twin)] {
        let url = format!("{base}/jobs/v2/{id}?api-version=2021-04-12");
        let put = Instant::now();
        let response = client
            .put(&url)
            .header("Authorization", &auth)
            .json(&body)
            .send()
            .await
            .expect("PUT");
        assert!(
            response.status().is_success(),
            "PUT {id}: {}",
            response.text().await.unwrap_or_default()
        );
        let job: Value = loop {
            let job: Value = client
                .get(&url)
                .header("Authorization", &auth)
                .send()
                .await
                .expect("GET")
                .json()
                .await
                .expect("JSON");
            if job["status"]
                .as_str()
                .is_some_and(|s| ["completed", "failed", "cancelled"].contains(&s))
            {
                break job;
            }
            tokio::time::sleep(poll).await;
        };
        let wall = put.elapsed();
        let parse = |k: &str| hub_emulator::jobs::parse_time(job[k].as_str().unwrap_or_default());
        let engine = match (parse("startTime"), parse("endTime")) {
            (Some(start), Some(end)) => (end - start).as_seconds_f64(),
            _ => f64::NAN,
        };
        let stats = &job["deviceJobStatistics"];
        println!(
            "{id}: status {} devices {} succeeded {} failed {} | start->completed {:.3}s ({:.0} device ops/s) | PUT->seen completed {:.3}s",
            job["status"],
            stats["deviceCount"],
            stats["succeededCount"],
            stats["failedCount"],
            engine,
            devices as f64 / engine,
            wall.as_secs_f64(),
        );
        runs.push(JobRun { id, engine });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "devices saw {} method calls and {} desired patches",
        counters.methods.load(Ordering::Relaxed),
        counters.patches.load(Ordering::Relaxed)
    );
    counters.stopping.store(true, Ordering::Relaxed);
    running.shutdown().await;
    runs
}
