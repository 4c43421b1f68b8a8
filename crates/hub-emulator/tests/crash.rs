//! `kill -9` of the real `hub-emulator` binary in the middle of a method job and a twin job over
//! 500 devices (hub-core `DeviceClient`s in this process), restarted on the same ports and data
//! directory, repeatedly; after each restart the jobs' invariants are checked against what the
//! store held at the crash (read from `hub.db` while the hub is down).
//!
//! Runs: `CRASH_RUNS` (default 3, about 30 s on two busy cores); kill points come from
//! `CRASH_SEED` (printed) within `CRASH_KILL_WINDOW_MS` (900) of the jobs' creation, e.g. `CRASH_RUNS=20 CRASH_SEED=7 cargo test -p hub-emulator --test
//! crash -- --nocapture` prints the duplicate figures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use hub_core::connection_string::{ConnectionString, ServiceConnectionString};
use hub_core::device_client::{Backoff, DeviceClient, DeviceClientOptions};
use hub_core::tls::TrustOptions;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const DEVICES: usize = 500;
/// The engine's cap on method calls in flight (`jobs::engine::MAX_IN_FLIGHT`): at most this many
/// rows can be `running` at a crash, so it bounds the duplicates of one crash.
const IN_FLIGHT_CAP: usize = hub_emulator::jobs::MAX_IN_FLIGHT;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn iso_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The hub as a child process; its stdout lines are collected by a thread.
struct HubProc {
    child: Child,
    mqtt: SocketAddr,
    https: SocketAddr,
    service_cs: String,
}

impl HubProc {
    /// Starts the binary on `dir` with the given ports (0: any) and waits for `hub-emulator ready`.
    fn start(dir: &Path, mqtt_port: u16, https_port: u16) -> HubProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("hub.log"))
            .expect("hub log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_hub-emulator"))
            .args(["--data-dir"])
            .arg(dir)
            .args(["--mqtt-port", &mqtt_port.to_string()])
            .args(["--https-port", &https_port.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start hub-emulator");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut addrs, mut service_cs) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(dir.join("hub.log")).unwrap_or_default();
                    panic!("hub-emulator did not become ready; its log:\n{log}");
                }
            };
            if let Some(cs) = line.strip_prefix("IOTHUB_CONNECTION_STRING=") {
                service_cs = Some(cs.to_owned());
            }
            // "# written to ..; MQTT/TLS on 127.0.0.1:P, HTTPS on 127.0.0.1:Q"
            if let Some((_, rest)) = line.split_once("MQTT/TLS on ")
                && let Some((mqtt, https)) = rest.split_once(", HTTPS on ")
            {
                addrs = Some((
                    mqtt.parse().expect("mqtt addr"),
                    https.parse().expect("addr"),
                ));
            }
            if line == "hub-emulator ready" {
                break;
            }
        }
        let (mqtt, https) = addrs.expect("the hub prints its addresses");
        HubProc {
            child,
            mqtt,
            https,
            service_cs: service_cs.expect("the hub prints its connection string"),
        }
    }

    /// SIGKILL (std's `Child::kill` on Unix), then reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// REST as iothubowner, over TLS trusting the hub's CA; the ports stay the same across restarts.
struct Rest {
    client: reqwest::Client,
    base: String,
    auth: String,
}

impl Rest {
    fn new(dir: &Path, hub: &HubProc) -> Rest {
        let pem = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA"))
            .resolve("localhost", hub.https)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let cs = ServiceConnectionString::from_str(&hub.service_cs).expect("service cs");
        let auth = hub_core::sas::generate(
            &cs.host_name.to_string(),
            &cs.key,
            Some(&cs.policy_name),
            unix_now() + 7200,
        );
        Rest {
            client,
            base: format!("https://localhost:{}", hub.https.port()),
            auth,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let url = format!("{}{path}?api-version=2021-04-12", self.base);
        let mut request = self
            .client
            .request(method, url)
            .header("Authorization", &self.auth);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// A call that must answer 200.
    async fn ok(&self, method: Method, path: &str, body: Option<&Value>) -> Value {
        let (status, body) = self
            .call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }
}

fn device_id(i: usize) -> String {
    format!("crash-{i:03}")
}

/// Connects device `i` and serves it until the test ends: counts each `lockDoor` it receives,
/// answers after a random delay (so a job spends time with calls in flight), drains patches.
async fn serve_device(
    i: usize,
    key: String,
    mqtt: SocketAddr,
    options: DeviceClientOptions,
    counts: Arc<Vec<AtomicU32>>,
) -> DeviceClient {
    let cs = format!(
        "HostName=localhost:{};DeviceId={};SharedAccessKey={key}",
        mqtt.port(),
        device_id(i)
    );
    let Ok(ConnectionString::Device(cs)) = ConnectionString::from_str(&cs) else {
        panic!("device connection string");
    };
    let connected = DeviceClient::connect(&cs, &options)
        .await
        .unwrap_or_else(|e| panic!("device {i} connects: {e}"));
    let (mut methods, mut desired) = (connected.methods, connected.desired);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                request = methods.recv() => {
                    let Some(request) = request else { return };
                    if request.name == "lockDoor" {
                        counts[i].fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
                        let _ = request.respond(200, &json!({"locked": true})).await;
                    });
                }
                patch = desired.recv() => if patch.is_none() { return },
            }
        }
    });
    connected.client
}

/// Each device row's status in the store (read from `hub.db` while the hub is down).
fn stored_rows(db: &Path, job_id: &str) -> HashMap<String, String> {
    let conn = rusqlite::Connection::open(db).expect("open hub.db");
    let mut stmt = conn
        .prepare("SELECT device_id, doc FROM device_jobs WHERE job_id = ?1")
        .expect("prepare");
    let rows = stmt
        .query_map([job_id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })
        .expect("query");
    rows.map(|row| {
        let (device, doc) = row.expect("row");
        let doc: Value = serde_json::from_str(&doc).expect("row JSON");
        (
            device,
            doc["status"].as_str().unwrap_or_default().to_owned(),
        )
    })
    .collect()
}

async fn desired_versions(rest: &Rest) -> Vec<(u64, Value)> {
    futures_util::stream::iter(0..DEVICES)
        .map(|i| async move {
            let twin = rest
                .ok(Method::GET, &format!("/twins/{}", device_id(i)), None)
                .await;
            let desired = &twin["properties"]["desired"];
            (
                desired["$version"].as_u64().expect("$version"),
                desired["run"].clone(),
            )
        })
        .buffered(16)
        .collect()
        .await
}

async fn wait_terminal(rest: &Rest, job_id: &str, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        if let Ok((StatusCode::OK, job)) = rest
            .call(Method::GET, &format!("/jobs/v2/{job_id}"), None)
            .await
        {
            let s = &job["deviceJobStatistics"];
            let n = |k: &str| s[k].as_u64().unwrap_or(u64::MAX / 8);
            assert_eq!(
                n("deviceCount"),
                n("failedCount") + n("succeededCount") + n("runningCount") + n("pendingCount"),
                "statistics must add up: {job}"
            );
            if matches!(
                job["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return job;
            }
        }
        assert!(
            started.elapsed() < limit,
            "job {job_id} did not end within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers the devices (returns their keys).
async fn register(rest: &Rest) -> Vec<String> {
    futures_util::stream::iter(0..DEVICES)
        .map(|i| async move {
            let id = device_id(i);
            let created = rest
                .ok(
                    Method::PUT,
                    &format!("/devices/{id}"),
                    Some(&json!({"deviceId": id})),
                )
                .await;
            created["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .expect("key")
                .to_owned()
        })
        .buffered(16)
        .collect()
        .await
}

/// Writes devices `ack-{run}-{n}` one after another until `stop`; returns those acknowledged.
async fn acknowledged_writes(rest: Arc<Rest>, run: usize, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let id = format!("ack-{run}-{n}");
        n += 1;
        if let Ok((StatusCode::OK, _)) = rest
            .call(
                Method::PUT,
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
            )
            .await
        {
            acked.push(id);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked
}

/// What one crash run measured.
#[derive(Debug)]
struct RunFigures {
    kill_after_ms: u64,
    running_at_crash: usize,
    done_at_crash: usize,
    duplicates: usize,
    /// Calls beyond what the guarantee allows (0 unless it is broken).
    excess: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_method_and_twin_jobs_keeps_their_guarantees() {
    let runs: usize = std::env::var("CRASH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    // Kill points are drawn from [0, CRASH_KILL_WINDOW_MS).
    let kill_window_ms: u64 = std::env::var("CRASH_KILL_WINDOW_MS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(900)
        .max(1);
    println!("crash suite: {runs} runs, CRASH_SEED={seed}, CRASH_KILL_WINDOW_MS={kill_window_ms}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("hub.db");
    let mut hub = HubProc::start(dir.path(), 0, 0);
    let (mqtt, https) = (hub.mqtt, hub.https);
    let rest = Arc::new(Rest::new(dir.path(), &hub));
    let keys = register(&rest).await;

    let trust = TrustOptions {
        ca_pem: Some(std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem")),
        no_platform_roots: true,
        ..TrustOptions::default()
    };
    let mut options = DeviceClientOptions::new(hub_core::tls::client_config(&trust).expect("tls"));
    options.connect_timeout = Duration::from_secs(30);
    // Quick reconnects: the hub is back within a second or two.
    options.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let counts: Arc<Vec<AtomicU32>> = Arc::new((0..DEVICES).map(|_| AtomicU32::new(0)).collect());
    let clients: Vec<DeviceClient> = futures_util::stream::iter(keys.into_iter().enumerate())
        .map(|(i, key)| serve_device(i, key, mqtt, options.clone(), counts.clone()))
        .buffer_unordered(32)
        .collect()
        .await;
    let mut versions = desired_versions(&rest).await;
    let condition = "STARTSWITH(deviceId, 'crash-')";
    let mut figures = Vec::new();
    let mut violations: Vec<String> = Vec::new();

    for run in 0..runs {
        let before: Vec<u32> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        let (method_job, twin_job) = (format!("method-{run}"), format!("twin-{run}"));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(acknowledged_writes(rest.clone(), run, stop.clone()));
        let method = json!({
            "type": "scheduleDeviceMethod",
            "cloudToDeviceMethod": {"methodName": "lockDoor", "payload": {"lockTime": "10m"},
                                    "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 30},
            "queryCondition": condition, "startTime": iso_now(), "maxExecutionTimeInSeconds": 300,
        });
        let twin = json!({
            "type": "scheduleUpdateTwin",
            "updateTwin": {"etag": "*", "properties": {"desired": {"run": run}}},
            "queryCondition": condition, "startTime": iso_now(), "maxExecutionTimeInSeconds": 300,
        });
        rest.ok(
            Method::PUT,
            &format!("/jobs/v2/{method_job}"),
            Some(&method),
        )
        .await;
        rest.ok(Method::PUT, &format!("/jobs/v2/{twin_job}"), Some(&twin))
            .await;

        // A random point of the jobs' run: the method job takes 0.8-1 s here (devices answer after
        // up to 300 ms, 256 calls in flight), the twin job a fraction of that.
        let kill_after_ms = rng.u64(0..kill_window_ms);
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        hub.kill();
        stop.store(true, Ordering::SeqCst);
        let acked = writer.await.expect("writer");
        // Let what the kernel had already delivered reach the devices.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let at_crash: Vec<u32> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        let rows = stored_rows(&db, &method_job);

        hub = HubProc::start(dir.path(), mqtt.port(), https.port());
        let ended = wait_terminal(&rest, &method_job, Duration::from_secs(90)).await;
        let twin_ended = wait_terminal(&rest, &twin_job, Duration::from_secs(90)).await;
        let after: Vec<u32> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();

        assert_eq!(ended["status"], "completed", "{ended}");
        assert_eq!(twin_ended["status"], "completed", "{twin_ended}");
        for job in [&ended, &twin_ended] {
            let s = &job["deviceJobStatistics"];
            assert_eq!(s["deviceCount"], DEVICES, "{job}");
            assert_eq!(s["succeededCount"], DEVICES, "every device answered: {job}");
        }

        // Method job: a row saved as done at the crash is never invoked again; a row saved as
        // pending was never invoked; only rows saved as running may be invoked once more.
        // Violations are collected, so that a failing run still prints its figures.
        let (mut running_at_crash, mut done_at_crash, mut duplicates, mut excess) = (0, 0, 0, 0);
        for i in 0..DEVICES {
            let id = device_id(i);
            let stored = rows.get(&id).map_or("none", String::as_str);
            let (sent_before, sent_total) = (at_crash[i] - before[i], after[i] - before[i]);
            duplicates += sent_total.saturating_sub(1) as usize;
            let allowed = match stored {
                "running" => {
                    running_at_crash += 1;
                    2
                }
                "completed" | "failed" => {
                    done_at_crash += 1;
                    1
                }
                _ => {
                    if sent_before > 0 {
                        violations.push(format!(
                            "run {run}: {id} got lockDoor before the crash, but its row was saved as {stored}"
                        ));
                    }
                    1
                }
            };
            excess += sent_total.saturating_sub(allowed) as usize;
            if sent_total == 0 || sent_total > allowed {
                violations.push(format!(
                    "run {run}: {id} (saved as {stored} at the crash) got lockDoor {sent_total} times"
                ));
            }
        }
        if duplicates > running_at_crash.min(IN_FLIGHT_CAP) {
            violations.push(format!(
                "run {run}: {duplicates} duplicate calls, but only {running_at_crash} rows were in flight"
            ));
        }

        // Twin job: the patch applied exactly once per device.
        let now = desired_versions(&rest).await;
        for (i, ((old, _), (new, value))) in versions.iter().zip(&now).enumerate() {
            assert_eq!(
                *new,
                old + 1,
                "run {run}: {}'s desired $version went {old} -> {new}",
                device_id(i)
            );
            assert_eq!(*value, json!(run), "run {run}: {}", device_id(i));
        }
        versions = now;

        // Every write acknowledged before the crash survived it.
        let lost: Vec<String> = futures_util::stream::iter(acked.iter())
            .map(|id| {
                let rest = rest.clone();
                async move {
                    match rest
                        .call(Method::GET, &format!("/devices/{id}"), None)
                        .await
                    {
                        Ok((StatusCode::OK, _)) => None,
                        _ => Some(id.clone()),
                    }
                }
            })
            .buffered(16)
            .filter_map(|lost| async move { lost })
            .collect()
            .await;
        assert!(
            lost.is_empty(),
            "run {run}: acknowledged writes lost: {lost:?}"
        );

        let run_figures = RunFigures {
            kill_after_ms,
            running_at_crash,
            done_at_crash,
            duplicates,
            excess,
        };
        println!(
            "run {run}: killed after {} ms; at the crash {} rows running, {} done; {} duplicate lockDoor calls ({} beyond the guarantee); {} acknowledged writes kept",
            run_figures.kill_after_ms,
            run_figures.running_at_crash,
            run_figures.done_at_crash,
            run_figures.duplicates,
            run_figures.excess,
            acked.len()
        );
        figures.push(run_figures);
    }
    let total: usize = figures.iter().map(|f| f.duplicates).sum();
    let max = figures.iter().map(|f| f.duplicates).max().unwrap_or(0);
    let excess: usize = figures.iter().map(|f| f.excess).sum();
    println!(
        "crash suite: {runs} runs, duplicate lockDoor calls total {total} ({excess} beyond the guarantee), at most {max} in one run (CRASH_SEED={seed})"
    );
    for client in clients {
        client.close().await;
    }
    assert!(
        violations.is_empty(),
        "{} violations of the method job's guarantee:\n{}",
        violations.len(),
        violations.join("\n")
    );
}
