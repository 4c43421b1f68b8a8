//! Jobs v2 end to end: a real hub on 127.0.0.1:0, the REST API over real TLS (SAS from the hub's
//! connection string), and real MQTT devices (rumqttc over TLS trusting the hub's CA) that
//! answer direct methods and record desired-property patches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

use hub_core::connection_string::SharedKey;
use hub_emulator::Config;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use support::{Answer, TestHub, now};
use tokio::task::JoinHandle;

fn iso_in(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl Answer {
    fn ok(self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.body);
        self.body
    }

    /// Asserts IoT Hub's classic error form for `code`.
    fn assert_error(&self, status: StatusCode, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(
            self.header("iothub-errorcode"),
            Some(code),
            "body: {}",
            self.body
        );
        let message = self.body["Message"].as_str().expect("Message");
        assert!(
            message.starts_with(&format!("ErrorCode:{code};")),
            "{message}"
        );
        message.to_owned()
    }
}

impl TestHub {
    async fn put_job(&self, id: &str, body: &Value) -> Answer {
        self.call(Method::PUT, &format!("/jobs/v2/{id}"), Some(body))
            .await
    }

    async fn get_job(&self, id: &str) -> Value {
        self.call(Method::GET, &format!("/jobs/v2/{id}"), None)
            .await
            .ok()
    }

    /// Polls the job until `done` holds (or fails the test after `limit`).
    async fn wait_job(&self, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let job = self.get_job(id).await;
            assert_stats_consistent(&job);
            if done(&job) {
                return job;
            }
            assert!(
                started.elapsed() < limit,
                "job {id} did not get there in {limit:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_status(&self, id: &str, status: &str, limit: Duration) -> Value {
        self.wait_job(id, limit, |j| j["status"] == status).await
    }

    /// Registers a device (setup goes straight to the hub) with optional tags; returns its key.
    async fn register(&self, id: &str, tags: Option<Value>) -> String {
        let hub = self.running.hub();
        hub.create_or_update_device(id, &json!({"deviceId": id}), None)
            .await
            .expect("create device");
        if let Some(tags) = tags {
            hub.update_twin(id, &json!({"tags": tags}), Some("*"), false)
                .await
                .expect("tags");
        }
        hub.device_primary_key(id).expect("key")
    }

    /// Connects a device that answers every method with `status` and echoes the payload.
    async fn connect(&self, id: &str, status: u16) -> Device {
        let key = self.running.hub().device_primary_key(id).expect("key");
        let device = Device::connect(
            self.running.mqtt_addr.port(),
            self.tls.clone(),
            id,
            &key,
            status,
        );
        let started = Instant::now();
        while !self.running.hub().method_ready(id) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "device {id} did not subscribe"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        device
    }
}

fn assert_stats_consistent(job: &Value) {
    let s = &job["deviceJobStatistics"];
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {job}"))
    };
    assert_eq!(
        n("deviceCount"),
        n("failedCount") + n("succeededCount") + n("runningCount") + n("pendingCount"),
        "statistics must add up: {job}"
    );
}

/// What a device saw.
#[derive(Default)]
struct Seen {
    methods: Vec<(String, Value)>,
    desired: Vec<Value>,
}

/// A real MQTT device over TLS: answers methods, records desired patches.
struct Device {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Device {
    fn connect(
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        id: &str,
        key: &str,
        status: u16,
    ) -> Device {
        let host = format!("localhost:{port}");
        let key = SharedKey::from_base64(key).expect("device key");
        let password =
            hub_core::sas::generate(&format!("{host}/devices/{id}"), &key, None, now() + 3600);
        let mut options = MqttOptions::new(id, "localhost", port);
        options
            .set_credentials(format!("{host}/{id}/?api-version=2021-04-12"), password)
            .set_keep_alive(Duration::from_secs(60))
            .set_max_packet_size(256 * 1024, 256 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("$iothub/methods/POST/#", QoS::AtMostOnce);
                        let _ = client.try_subscribe(
                            "$iothub/twin/PATCH/properties/desired/#",
                            QoS::AtMostOnce,
                        );
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let payload: Value =
                            serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if let Some(rest) = p.topic.strip_prefix("$iothub/methods/POST/") {
                            let (name, query) = rest.split_once("/?").unwrap_or((rest, ""));
                            let rid = query.trim_start_matches("$rid=").to_owned();
                            record
                                .lock()
                                .unwrap()
                                .methods
                                .push((name.to_owned(), payload.clone()));
                            let answer = json!({"echo": payload}).to_string();
                            // Never block inside the poll loop: try_publish queues without waiting.
                            let _ = client.try_publish(
                                format!("$iothub/methods/res/{status}/?$rid={rid}"),
                                QoS::AtMostOnce,
                                false,
                                answer,
                            );
                        } else if p
                            .topic
                            .starts_with("$iothub/twin/PATCH/properties/desired/")
                        {
                            record.lock().unwrap().desired.push(payload);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Device { seen, task }
    }

    fn methods(&self) -> Vec<(String, Value)> {
        self.seen.lock().unwrap().methods.clone()
    }

    fn desired(&self) -> Vec<Value> {
        self.seen.lock().unwrap().desired.clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn method_job(method: &str, payload: Value, condition: &str, connect_timeout: u64) -> Value {
    json!({
        "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": {"methodName": method, "payload": payload,
                                "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": connect_timeout},
        "queryCondition": condition,
        "startTime": iso_in(0),
        "maxExecutionTimeInSeconds": 300,
    })
}

fn stats(job: &Value) -> (u64, u64, u64, u64, u64) {
    let s = &job["deviceJobStatistics"];
    let n = |k: &str| s[k].as_u64().unwrap();
    (
        n("deviceCount"),
        n("succeededCount"),
        n("failedCount"),
        n("runningCount"),
        n("pendingCount"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_method_and_twin_jobs_on_my_device_id() {
    let hub = TestHub::start().await;
    let device = hub.connect("myDeviceId", 200).await;

    // The tutorial's method job: lockDoor with {"lockTime":"10m"}, start now.
    let body = json!({
        "jobId": "lockDoorJob",
        "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": {"methodName": "lockDoor", "payload": {"lockTime": "10m"},
                                "responseTimeoutInSeconds": 200},
        "queryCondition": "deviceId IN ['myDeviceId']",
        "startTime": "2020-01-01T00:00:00.000Z",
        "maxExecutionTimeInSeconds": 3600,
    });
    let created = hub.put_job("lockDoorJob", &body).await.ok();
    assert_eq!(created["jobId"], "lockDoorJob");
    assert_eq!(created["status"], "queued");
    assert_eq!(created["type"], "scheduleDeviceMethod");
    assert_eq!(created["cloudToDeviceMethod"]["connectTimeoutInSeconds"], 0);
    assert!(
        created.get("endTime").is_none(),
        "no endTime before the end: {created}"
    );

    let done = hub
        .wait_status("lockDoorJob", "completed", Duration::from_secs(20))
        .await;
    assert_eq!(stats(&done), (1, 1, 0, 0, 0));
    assert!(done["endTime"].is_string(), "{done}");
    assert_eq!(
        device.methods(),
        vec![("lockDoor".to_owned(), json!({"lockTime": "10m"}))]
    );

    let rows = hub.device_jobs("lockDoorJob").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row["deviceId"], "myDeviceId");
    assert_eq!(row["jobId"], "lockDoorJob");
    assert_eq!(row["jobType"], "scheduleDeviceMethod");
    assert_eq!(row["status"], "completed");
    assert_eq!(
        row["outcome"]["deviceMethodResponse"],
        json!({"status": 200, "payload": {"echo": {"lockTime": "10m"}}})
    );
    for field in [
        "startTimeUtc",
        "endTimeUtc",
        "createdDateTimeUtc",
        "lastUpdatedDateTimeUtc",
    ] {
        assert!(row[field].is_string(), "{field} in {row}");
    }

    // The tutorial's twin job: desired {"building":43,"floor":3}.
    let body = json!({
        "jobId": "twinJob",
        "type": "scheduleUpdateTwin",
        "updateTwin": {"etag": "*", "properties": {"desired": {"building": 43, "floor": 3}}},
        "queryCondition": "deviceId IN ['myDeviceId']",
        "startTime": iso_in(0),
        "maxExecutionTimeInSeconds": 3600,
    });
    hub.put_job("twinJob", &body).await.ok();
    let done = hub
        .wait_status("twinJob", "completed", Duration::from_secs(20))
        .await;
    assert_eq!(stats(&done), (1, 1, 0, 0, 0));
    let twin = hub.call(Method::GET, "/twins/myDeviceId", None).await.ok();
    assert_eq!(twin["properties"]["desired"]["building"], 43);
    assert_eq!(twin["properties"]["desired"]["floor"], 3);
    let started = Instant::now();
    while device.desired().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the device never got the desired patch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let patch = &device.desired()[0];
    assert_eq!(
        (patch["building"].clone(), patch["floor"].clone()),
        (json!(43), json!(3)),
        "{patch}"
    );
    assert!(patch["$version"].is_u64(), "{patch}");
    let rows = hub.device_jobs("twinJob").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "completed");
    assert_eq!(rows[0]["jobType"], "scheduleUpdateTwin");

    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_query_job_over_fifty_devices_fails_offline_ones() {
    let hub = TestHub::start().await;
    let mut devices = Vec::new();
    for i in 0..50 {
        let id = format!("dev-{i:02}");
        hub.register(&id, Some(json!({"building": "43"}))).await;
        if i % 5 != 0 {
            devices.push((id.clone(), hub.connect(&id, 200).await));
        }
    }
    hub.register("elsewhere", Some(json!({"building": "44"})))
        .await;

    hub.put_job(
        "many",
        &method_job("reboot", json!({"delay": 1}), "tags.building = '43'", 0),
    )
    .await
    .ok();
    let done = hub
        .wait_status("many", "completed", Duration::from_secs(30))
        .await;
    assert_eq!(stats(&done), (50, 40, 10, 0, 0), "{done}");
    for (id, device) in &devices {
        assert_eq!(device.methods().len(), 1, "{id} should be called once");
    }
    let rows = hub.device_jobs("many").await;
    assert_eq!(rows.len(), 50);
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r["deviceId"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "rows come ordered by deviceId");
    for row in &rows {
        let id = row["deviceId"].as_str().unwrap();
        let offline = id.trim_start_matches("dev-").parse::<u32>().unwrap() % 5 == 0;
        if offline {
            assert_eq!(row["status"], "failed", "{row}");
            assert_eq!(row["error"]["code"], "DeviceNotOnline", "{row}");
            assert!(
                row["error"]["description"]
                    .as_str()
                    .unwrap()
                    .contains("Timed out waiting for device to connect")
            );
        } else {
            assert_eq!(row["status"], "completed", "{row}");
            assert_eq!(row["outcome"]["deviceMethodResponse"]["status"], 200);
        }
    }

    // A device answering with an error status still completes (the device answered).
    let _bad = hub.connect("dev-00", 500).await;
    hub.put_job(
        "status500",
        &method_job("reboot", json!(null), "deviceId = 'dev-00'", 0),
    )
    .await
    .ok();
    hub.wait_status("status500", "completed", Duration::from_secs(20))
        .await;
    let rows = hub.device_jobs("status500").await;
    assert_eq!(rows[0]["status"], "completed");
    assert_eq!(rows[0]["outcome"]["deviceMethodResponse"]["status"], 500);

    // Offline devices reached within the connect timeout succeed.
    hub.put_job(
        "late",
        &method_job("reboot", json!(1), "deviceId IN ['dev-05', 'dev-10']", 30),
    )
    .await
    .ok();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let running = hub.get_job("late").await;
    assert_eq!(running["status"], "running");
    assert_eq!(stats(&running), (2, 0, 0, 2, 0), "{running}");
    let _d5 = hub.connect("dev-05", 200).await;
    let _d10 = hub.connect("dev-10", 200).await;
    let done = hub
        .wait_status("late", "completed", Duration::from_secs(20))
        .await;
    assert_eq!(stats(&done), (2, 2, 0, 0, 0));

    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_keeps_counts_and_cancels_pending_devices() {
    let hub = TestHub::start().await;
    let mut online = Vec::new();
    for i in 0..10 {
        let id = format!("c-{i}");
        hub.register(&id, Some(json!({"grp": "cancel"}))).await;
        if i < 4 {
            online.push(hub.connect(&id, 200).await);
        }
    }
    // Offline devices hold the job open (connect timeout 5 minutes).
    hub.put_job(
        "cancelMe",
        &method_job("ping", json!({}), "tags.grp = 'cancel'", 300),
    )
    .await
    .ok();
    let running = hub
        .wait_job("cancelMe", Duration::from_secs(20), |j| {
            j["deviceJobStatistics"]["succeededCount"] == 4
        })
        .await;
    assert_eq!(running["status"], "running");
    assert_eq!(stats(&running), (10, 4, 0, 6, 0));

    let cancelled = hub
        .call(Method::POST, "/jobs/v2/cancelMe/cancel", None)
        .await
        .ok();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["endTime"].is_string());
    assert_eq!(
        stats(&cancelled),
        (10, 4, 6, 0, 0),
        "canceled devices count as failed: {cancelled}"
    );
    let rows = hub.device_jobs("cancelMe").await;
    assert_eq!(rows.iter().filter(|r| r["status"] == "canceled").count(), 6);
    assert_eq!(
        rows.iter().filter(|r| r["status"] == "completed").count(),
        4
    );

    // Devices connecting now are not called: the work stopped.
    let late = hub.connect("c-9", 200).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(late.methods().is_empty());

    // Cancelling a finished job returns it unchanged.
    let again = hub
        .call(Method::POST, "/jobs/v2/cancelMe/cancel", None)
        .await
        .ok();
    assert_eq!(again, cancelled);

    // A scheduled job cancels before it ever runs.
    let mut future = method_job("ping", json!({}), "*", 0);
    future["startTime"] = json!(iso_in(3600));
    let scheduled = hub.put_job("later", &future).await.ok();
    assert_eq!(scheduled["status"], "scheduled");
    let cancelled = hub
        .call(Method::POST, "/jobs/v2/later/cancel", None)
        .await
        .ok();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(stats(&cancelled), (0, 0, 0, 0, 0));

    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_outliving_its_max_execution_time_fails_unreached_devices() {
    let hub = TestHub::start().await;
    hub.register("slow-1", None).await;
    hub.register("slow-2", None).await;
    let _online = hub.connect("slow-1", 200).await;
    let mut body = method_job("ping", json!({}), "deviceId IN ['slow-1', 'slow-2']", 300);
    body["maxExecutionTimeInSeconds"] = json!(2);
    hub.put_job("short", &body).await.ok();
    let started = Instant::now();
    let done = hub
        .wait_status("short", "failed", Duration::from_secs(15))
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "ended too early"
    );
    assert_eq!(stats(&done), (2, 1, 1, 0, 0), "{done}");
    assert!(done["endTime"].is_string());
    assert!(
        done["failureReason"]
            .as_str()
            .unwrap()
            .contains("maxExecutionTimeInSeconds"),
        "{done}"
    );
    let rows = hub.device_jobs("short").await;
    let unreached = rows.iter().find(|r| r["deviceId"] == "slow-2").unwrap();
    assert_eq!(unreached["status"], "failed");
    assert_eq!(unreached["error"]["code"], "JobRunTimeout");
    assert!(
        unreached["error"]["description"]
            .as_str()
            .unwrap()
            .contains("maxExecutionTimeInSeconds")
    );
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_job_resumes_without_repeating_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        data_dir: Some(dir.path().to_path_buf()),
        durable: true,
        mqtt_port: 0,
        https_port: 0,
        ..Config::ephemeral()
    };
    let ids = ["r-1", "r-2", "r-3", "r-4"];
    {
        let hub = TestHub::start_with(config.clone()).await;
        for id in ids {
            hub.register(id, Some(json!({"restart": true}))).await;
        }
        let first = [hub.connect("r-1", 200).await, hub.connect("r-2", 200).await];
        hub.put_job(
            "resume",
            &method_job("step", json!({"n": 1}), "tags.restart = true", 120),
        )
        .await
        .ok();
        let running = hub
            .wait_job("resume", Duration::from_secs(20), |j| {
                j["deviceJobStatistics"]["succeededCount"] == 2
            })
            .await;
        assert_eq!(stats(&running), (4, 2, 0, 2, 0));
        // A twin job due while the hub is down.
        let mut twin = json!({"type": "scheduleUpdateTwin", "queryCondition": "deviceId = 'r-1'",
                              "updateTwin": {"etag": "*", "tags": {"resumed": "yes"}}});
        twin["startTime"] = json!(iso_in(2));
        assert_eq!(
            hub.put_job("dueWhileDown", &twin).await.ok()["status"],
            "scheduled"
        );
        for device in &first {
            assert_eq!(device.methods().len(), 1);
        }
        hub.running.shutdown().await;
        drop(first);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let hub = TestHub::start_with(config).await;
    let job = hub.get_job("resume").await;
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(stats(&job).1, 2, "completed devices are remembered: {job}");
    let mut devices = HashMap::new();
    for id in ids {
        devices.insert(id, hub.connect(id, 200).await);
    }
    let done = hub
        .wait_status("resume", "completed", Duration::from_secs(30))
        .await;
    assert_eq!(stats(&done), (4, 4, 0, 0, 0), "{done}");
    assert!(
        devices["r-1"].methods().is_empty(),
        "r-1 already answered before the restart"
    );
    assert!(
        devices["r-2"].methods().is_empty(),
        "r-2 already answered before the restart"
    );
    assert_eq!(devices["r-3"].methods().len(), 1);
    assert_eq!(devices["r-4"].methods().len(), 1);

    let twin_job = hub
        .wait_status("dueWhileDown", "completed", Duration::from_secs(20))
        .await;
    assert_eq!(stats(&twin_job), (1, 1, 0, 0, 0));
    let twin = hub.call(Method::GET, "/twins/r-1", None).await.ok();
    assert_eq!(twin["tags"]["resumed"], "yes");
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_iot_hub_errors() {
    let hub = TestHub::start_with(Config {
        max_active_jobs: 2,
        ..Config::ephemeral()
    })
    .await;
    let good = method_job("reboot", json!({}), "*", 0);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut body = good.clone();
        f(&mut body);
        body
    };
    let long = "x".repeat(129);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "j1",
            with(&|b| b["jobId"] = json!("other")),
            "does not match",
        ),
        (
            "j1",
            with(&|b| b["type"] = json!("export")),
            "not supported",
        ),
        (
            "j1",
            with(&|b| b["type"] = json!("nonsense")),
            "unknown job type",
        ),
        (
            "j1",
            with(&|b| b["queryCondition"] = json!("deviceId = ")),
            "queryCondition",
        ),
        (
            "j1",
            with(&|b| b["queryCondition"] = json!("")),
            "queryCondition is required",
        ),
        (
            "j1",
            with(&|b| b["startTime"] = json!("next tuesday")),
            "startTime",
        ),
        (
            // A valid RFC 3339 time that is past year 9999 in UTC.
            "j1",
            with(&|b| b["startTime"] = json!("9999-12-31T23:59:59-05:00")),
            "startTime",
        ),
        (
            "j1",
            with(&|b| b["cloudToDeviceMethod"]["responseTimeoutInSeconds"] = json!(301)),
            "responseTimeoutInSeconds",
        ),
        (
            "j1",
            with(&|b| b["cloudToDeviceMethod"]["responseTimeoutInSeconds"] = json!(4)),
            "responseTimeoutInSeconds",
        ),
        (
            "j1",
            with(&|b| b["cloudToDeviceMethod"]["connectTimeoutInSeconds"] = json!(301)),
            "connectTimeoutInSeconds",
        ),
        (
            "j1",
            with(&|b| b["cloudToDeviceMethod"]["methodName"] = json!("has space")),
            "method name",
        ),
        (
            "j1",
            with(&|b| b["cloudToDeviceMethod"]["payload"] = json!("x".repeat(130 * 1024))),
            "payload",
        ),
        ("j%20x", good.clone(), "job id"),
        (long.as_str(), good.clone(), "job id"),
    ];
    for (id, body, expected) in cases {
        let answer = hub.put_job(id, &body).await;
        let message = answer.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
        assert!(
            message.contains(expected),
            "{id}: `{message}` should mention `{expected}`"
        );
    }
    // The parser's position travels to the client.
    let answer = hub
        .put_job(
            "j1",
            &with(&|b| b["queryCondition"] = json!("tags.x = = 1")),
        )
        .await;
    let message = answer.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    assert!(message.contains("at character"), "{message}");
    // Not JSON at all.
    let raw = hub
        .client
        .put(format!("{}/jobs/v2/raw?api-version=2021-04-12", hub.base))
        .header("Authorization", &hub.owner)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);

    // Unknown ids.
    hub.call(Method::GET, "/jobs/v2/nope", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "JobNotFound");
    hub.call(Method::POST, "/jobs/v2/nope/cancel", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "JobNotFound");
    // No credentials.
    let anonymous = hub
        .call_as(None, Method::GET, "/jobs/v2/nope", None, &[])
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    // Duplicates and the active-job cap (2 here): scheduled jobs are active.
    let mut later = good.clone();
    later["startTime"] = json!(iso_in(3600));
    assert_eq!(hub.put_job("a", &later).await.ok()["status"], "scheduled");
    hub.put_job("a", &later)
        .await
        .assert_error(StatusCode::CONFLICT, "JobAlreadyExists");
    hub.put_job("b", &later).await.ok();
    let throttled = hub.put_job("c", &later).await;
    throttled.assert_error(
        StatusCode::TOO_MANY_REQUESTS,
        "ThrottlingMaxActiveJobCountExceeded",
    );
    hub.call(Method::POST, "/jobs/v2/a/cancel", None).await.ok();
    hub.put_job("c", &later).await.ok();
    // A finished job keeps its id.
    hub.put_job("a", &later)
        .await
        .assert_error(StatusCode::CONFLICT, "JobAlreadyExists");
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_query_answers_arrays_with_paging_headers() {
    let hub = TestHub::start().await;
    let mut later = method_job("reboot", json!({}), "*", 0);
    later["startTime"] = json!(iso_in(3600));
    for id in ["q1", "q2", "q3"] {
        hub.put_job(id, &later).await.ok();
    }
    let twin = json!({"type": "scheduleUpdateTwin", "queryCondition": "deviceId = 'nobody'",
                      "updateTwin": {"tags": {"a": 1}}});
    hub.put_job("q4", &twin).await.ok();
    hub.wait_status("q4", "completed", Duration::from_secs(10))
        .await;

    let page = hub
        .call_as(
            Some(&hub.owner),
            Method::GET,
            "/jobs/v2/query",
            None,
            &[("x-ms-max-item-count", "2")],
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.header("x-ms-item-type"), Some("JobResponse"));
    let items = page
        .body
        .as_array()
        .expect("an array, as the live service answers");
    assert_eq!(
        items
            .iter()
            .map(|j| j["jobId"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["q1", "q2"]
    );
    let token = page
        .header("x-ms-continuation")
        .expect("more pages")
        .to_owned();
    let next = hub
        .call_as(
            Some(&hub.owner),
            Method::GET,
            "/jobs/v2/query",
            None,
            &[("x-ms-max-item-count", "2"), ("x-ms-continuation", &token)],
        )
        .await;
    let items = next.body.as_array().unwrap();
    assert_eq!(
        items
            .iter()
            .map(|j| j["jobId"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["q3", "q4"]
    );
    assert!(
        next.header("x-ms-continuation").is_none(),
        "no continuation on the last page"
    );

    let filtered = hub
        .call(
            Method::GET,
            "/jobs/v2/query?jobType=scheduleDeviceMethod&jobStatus=scheduled",
            None,
        )
        .await
        .ok();
    assert_eq!(filtered.as_array().unwrap().len(), 3);
    let filtered = hub
        .call(
            Method::GET,
            "/jobs/v2/query?jobType=scheduleUpdateTwin&jobStatus=completed",
            None,
        )
        .await
        .ok();
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    assert_eq!(filtered[0]["jobId"], "q4");
    let none = hub
        .call(Method::GET, "/jobs/v2/query?jobStatus=failed", None)
        .await
        .ok();
    assert_eq!(none, json!([]));
    hub.call(Method::GET, "/jobs/v2/query?jobStatus=bogus", None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_job_waits_for_its_start_time() {
    let hub = TestHub::start().await;
    let device = hub.connect("myDeviceId", 200).await;
    let mut body = method_job(
        "lockDoor",
        json!({"lockTime": "1m"}),
        "deviceId = 'myDeviceId'",
        0,
    );
    body["startTime"] = json!(iso_in(2));
    let created = hub.put_job("soon", &body).await.ok();
    assert_eq!(created["status"], "scheduled");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(hub.get_job("soon").await["status"], "scheduled");
    assert!(device.methods().is_empty());
    hub.wait_status("soon", "completed", Duration::from_secs(10))
        .await;
    assert_eq!(device.methods().len(), 1);
    hub.running.shutdown().await;
}

/// The error text after IoT Hub's `ErrorCode:<code>;` prefix.
fn error_text(message: &str) -> &str {
    message.split_once(';').map_or(message, |(_, text)| text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_patch_and_twin_job_treat_reported_alike() {
    let hub = TestHub::start().await;
    hub.register("d1", None).await;
    let twin_job = |id: &str, update: &Value| {
        let mut update = update.clone();
        update["etag"] = json!("*");
        json!({
            "jobId": id, "type": "scheduleUpdateTwin", "updateTwin": update,
            "queryCondition": "deviceId IN ['d1']", "startTime": iso_in(0),
            "maxExecutionTimeInSeconds": 300,
        })
    };

    // `reported: {}` as the C# service SDK sends it with every twin update: accepted by both.
    let empty = json!({"properties": {"desired": {"x": 1}, "reported": {}}});
    let patched = hub
        .call(Method::PATCH, "/twins/d1", Some(&empty))
        .await
        .ok();
    assert_eq!(patched["properties"]["desired"]["x"], 1);
    let mut by_job = empty.clone();
    by_job["properties"]["desired"]["x"] = json!(2);
    hub.put_job("empty-reported", &twin_job("empty-reported", &by_job))
        .await
        .ok();
    let done = hub
        .wait_status("empty-reported", "completed", Duration::from_secs(20))
        .await;
    assert_eq!(stats(&done), (1, 1, 0, 0, 0));
    let twin = hub.call(Method::GET, "/twins/d1", None).await.ok();
    assert_eq!(twin["properties"]["desired"]["x"], 2);

    // Non-empty reported properties: refused by both, in the same words (the job's prefixed
    // with the field they are about).
    let written = json!({"properties": {"desired": {"x": 3}, "reported": {"x": 1}}});
    let rest = hub
        .call(Method::PATCH, "/twins/d1", Some(&written))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let job = hub
        .put_job("set-reported", &twin_job("set-reported", &written))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    assert!(
        error_text(&rest).starts_with("properties.reported is written by the device"),
        "{rest}"
    );
    assert_eq!(
        error_text(&job),
        format!("updateTwin: {}", error_text(&rest)),
        "job and twin PATCH disagree"
    );
    let twin = hub.call(Method::GET, "/twins/d1", None).await.ok();
    assert_eq!(twin["properties"]["desired"]["x"], 2, "nothing was written");
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_respect_the_job_id_and_the_active_job_cap() {
    // A durable hub: creates commit through the store, so they really overlap.
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = Arc::new(
        TestHub::start_with(Config {
            data_dir: Some(dir.path().to_path_buf()),
            durable: true,
            max_active_jobs: 2,
            ..Config::ephemeral()
        })
        .await,
    );
    let later = iso_in(3600);
    let body = |id: &str| {
        json!({"jobId": id, "type": "scheduleUpdateTwin", "queryCondition": "*",
               "updateTwin": {"etag": "*", "tags": {"building": 43}}, "startTime": later})
    };
    // Eight creates of one id: exactly one wins, the others are told it exists.
    let same: Vec<_> = (0..8)
        .map(|_| {
            let (hub, body) = (Arc::clone(&hub), body("same-id"));
            tokio::spawn(async move { hub.put_job("same-id", &body).await })
        })
        .collect();
    let mut created = 0;
    for task in same {
        let answer = task.await.expect("task");
        if answer.status == StatusCode::OK {
            created += 1;
        } else {
            answer.assert_error(StatusCode::CONFLICT, "JobAlreadyExists");
        }
    }
    assert_eq!(created, 1, "one create of an id wins");
    // Eight creates of new ids with one slot left under the cap of 2: exactly one fits.
    let others: Vec<_> = (0..8)
        .map(|i| {
            let id = format!("other-{i}");
            let (hub, body) = (Arc::clone(&hub), body(&id));
            tokio::spawn(async move { hub.put_job(&id, &body).await })
        })
        .collect();
    let mut created = 0;
    for task in others {
        let answer = task.await.expect("task");
        if answer.status == StatusCode::OK {
            created += 1;
        } else {
            answer.assert_error(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingMaxActiveJobCountExceeded",
            );
        }
    }
    assert_eq!(
        created, 1,
        "the active-job cap holds under concurrent creates"
    );
}
