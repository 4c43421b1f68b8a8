//! Every REST answer that carries a device, twin, job or device-job row is exactly hub-core's wire
//! type: it parses into that type, re-serializes to the same JSON (same keys, values, nulls and
//! key order), and nothing lands in the types' `extra` catch-alls. A field the emulator sends but
//! hub-core does not model, or a `null` hub-core would drop, fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use hub_core::connection_string::SharedKey;
use hub_core::device::Device;
use hub_core::job::{DeviceJob, JobResponse};
use hub_core::twin::Twin;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use support::{Answer, TestHub, now};
use tokio::task::JoinHandle;

/// A wire type whose catch-all maps can be listed.
trait Shape: Serialize + DeserializeOwned {
    /// The keys that landed in any `extra` map, with where.
    fn strays(&self) -> Vec<String>;
}

fn note(out: &mut Vec<String>, at: &str, extra: &Map<String, Value>) {
    out.extend(extra.keys().map(|k| format!("{at}{k}")));
}

impl Shape for Device {
    fn strays(&self) -> Vec<String> {
        let mut out = Vec::new();
        note(&mut out, "", &self.extra);
        if let Some(a) = &self.authentication {
            note(&mut out, "authentication.", &a.extra);
        }
        if let Some(c) = &self.capabilities {
            note(&mut out, "capabilities.", &c.extra);
        }
        out
    }
}

impl Shape for Twin {
    fn strays(&self) -> Vec<String> {
        let mut out = Vec::new();
        note(&mut out, "", &self.extra);
        if let Some(p) = &self.properties {
            note(&mut out, "properties.", &p.extra);
        }
        if let Some(c) = &self.capabilities {
            note(&mut out, "capabilities.", &c.extra);
        }
        out
    }
}

impl Shape for JobResponse {
    fn strays(&self) -> Vec<String> {
        let mut out = Vec::new();
        note(&mut out, "", &self.extra);
        if let Some(m) = &self.cloud_to_device_method {
            note(&mut out, "cloudToDeviceMethod.", &m.extra);
        }
        if let Some(t) = &self.update_twin {
            note(&mut out, "updateTwin.", &t.extra);
            if let Some(p) = &t.properties {
                note(&mut out, "updateTwin.properties.", &p.extra);
            }
        }
        out
    }
}

impl Shape for DeviceJob {
    fn strays(&self) -> Vec<String> {
        let mut out = Vec::new();
        note(&mut out, "", &self.extra);
        if let Some(o) = &self.outcome {
            note(&mut out, "outcome.", &o.extra);
        }
        if let Some(e) = &self.error {
            note(&mut out, "error.", &e.extra);
        }
        out
    }
}

/// Asserts `body` is exactly a `T` and returns it.
fn check<T: Shape>(what: &str, body: &Value) -> T {
    let name = std::any::type_name::<T>();
    let parsed: T = serde_json::from_value(body.clone())
        .unwrap_or_else(|e| panic!("{what}: not a {name}: {e}\n{body}"));
    let back = serde_json::to_value(&parsed).unwrap();
    assert_eq!(back, *body, "{what}: {name} does not re-serialize the same");
    // `Value` equality ignores key order; the text does not.
    assert_eq!(
        back.to_string(),
        body.to_string(),
        "{what}: {name} re-serializes in another key order"
    );
    let strays = parsed.strays();
    assert!(
        strays.is_empty(),
        "{what}: {name} does not model {strays:?}\n{body}"
    );
    parsed
}

/// Asserts `body` is a non-empty array of exactly `T`s.
fn check_all<T: Shape>(what: &str, body: &Value) -> Vec<T> {
    let items = body
        .as_array()
        .unwrap_or_else(|| panic!("{what}: not an array: {body}"));
    assert!(!items.is_empty(), "{what}: empty, so nothing was checked");
    items
        .iter()
        .enumerate()
        .map(|(i, item)| check(&format!("{what}[{i}]"), item))
        .collect()
}

fn ok(answer: Answer) -> Value {
    assert_eq!(answer.status, StatusCode::OK, "body: {}", answer.body);
    answer.body
}

fn iso_in(seconds: i64) -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl TestHub {
    async fn put_job(&self, id: &str, body: &Value) -> JobResponse {
        let answer = self
            .call(Method::PUT, &format!("/jobs/v2/{id}"), Some(body))
            .await;
        check(&format!("PUT /jobs/v2/{id}"), &ok(answer))
    }

    async fn get_job(&self, id: &str) -> JobResponse {
        let answer = self
            .call(Method::GET, &format!("/jobs/v2/{id}"), None)
            .await;
        check(&format!("GET /jobs/v2/{id}"), &ok(answer))
    }

    async fn wait_job(&self, id: &str, done: impl Fn(&JobResponse) -> bool) -> JobResponse {
        let started = Instant::now();
        loop {
            let job = self.get_job(id).await;
            if done(&job) {
                return job;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "job {id} did not get there: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn query(&self, query: &str, page: Option<&str>) -> Answer {
        let size = page.unwrap_or("1000");
        self.call_with(
            Method::POST,
            "/devices/query",
            Some(&json!({ "query": query })),
            &[("x-ms-max-item-count", size)],
        )
        .await
    }
}

/// A real MQTT device that answers every method with 200 and an echo of the payload.
struct Responder {
    task: JoinHandle<()>,
}

impl Responder {
    async fn connect(hub: &TestHub, id: &str) -> Responder {
        let key = hub.running.hub().device_primary_key(id).expect("key");
        let port = hub.running.mqtt_addr.port();
        let host = format!("localhost:{port}");
        let key = SharedKey::from_base64(&key).expect("device key");
        let password =
            hub_core::sas::generate(&format!("{host}/devices/{id}"), &key, None, now() + 3600);
        let mut options = MqttOptions::new(id, "localhost", port);
        options
            .set_credentials(format!("{host}/{id}/?api-version=2021-04-12"), password)
            .set_keep_alive(Duration::from_secs(60))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(&hub.tls),
            )));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("$iothub/methods/POST/#", QoS::AtMostOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Some(rest) = p.topic.strip_prefix("$iothub/methods/POST/") else {
                            continue;
                        };
                        let rid = rest.split_once("/?$rid=").map_or("", |(_, rid)| rid);
                        let payload: Value =
                            serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let _ = client.try_publish(
                            format!("$iothub/methods/res/200/?$rid={rid}"),
                            QoS::AtMostOnce,
                            false,
                            json!({ "echo": payload }).to_string(),
                        );
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        let started = Instant::now();
        while !hub.running.hub().method_ready(id) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "device {id} did not subscribe"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Responder { task }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn method_job(condition: &str, method: Value, max_secs: u64) -> Value {
    json!({
        "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": method,
        "queryCondition": condition,
        "startTime": iso_in(0),
        "maxExecutionTimeInSeconds": max_secs,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_twin_and_query_answers_are_hub_core_shapes() {
    let hub = TestHub::start().await;

    let answer = hub.call(Method::GET, "/devices/myDeviceId", None).await;
    check::<Device>("GET /devices/myDeviceId", &ok(answer));

    let created = hub
        .call(
            Method::PUT,
            "/devices/wire-sas",
            Some(&json!({"deviceId": "wire-sas"})),
        )
        .await;
    let device: Device = check("PUT /devices/wire-sas (create)", &ok(created));
    assert_eq!(device.module_id, Some(None), "moduleId stays null");
    assert_eq!(device.device_scope, Some(None), "deviceScope stays null");

    let x509 = json!({
        "deviceId": "wire-x509", "status": "disabled", "statusReason": "under test",
        "authentication": {"type": "selfSigned", "x509Thumbprint": {
            "primaryThumbprint": "0123456789ABCDEF0123456789ABCDEF01234567",
            "secondaryThumbprint": "76543210FEDCBA9876543210FEDCBA9876543210"}},
        "capabilities": {"iotEdge": true},
    });
    let answer = hub
        .call(Method::PUT, "/devices/wire-x509", Some(&x509))
        .await;
    let device: Device = check("PUT /devices/wire-x509", &ok(answer));
    assert_eq!(device.status_reason(), Some("under test"));

    let update = json!({"deviceId": "wire-sas", "status": "enabled", "statusReason": "updated"});
    let answer = hub
        .call_with(
            Method::PUT,
            "/devices/wire-sas",
            Some(&update),
            &[("If-Match", "*")],
        )
        .await;
    check::<Device>("PUT /devices/wire-sas (update)", &ok(answer));

    let answer = hub.call(Method::GET, "/devices", None).await;
    let devices: Vec<Device> = check_all("GET /devices", &ok(answer));
    assert_eq!(devices.len(), 3);

    let answer = hub.call(Method::GET, "/twins/wire-x509", None).await;
    check::<Twin>("GET /twins/wire-x509", &ok(answer));

    let patch = json!({"tags": {"building": "43", "nested": {"a": 1}},
                       "properties": {"desired": {"interval": 10, "nested": {"x": 1, "y": null}}}});
    let answer = hub
        .call(Method::PATCH, "/twins/wire-sas", Some(&patch))
        .await;
    let twin: Twin = check("PATCH /twins/wire-sas", &ok(answer));
    assert_eq!(twin.module_id, None, "device twins carry no moduleId");

    let replace = json!({"tags": {"floor": 3}, "properties": {"desired": {"interval": 20}}});
    let answer = hub
        .call(Method::PUT, "/twins/wire-sas", Some(&replace))
        .await;
    check::<Twin>("PUT /twins/wire-sas", &ok(answer));

    // A connected device shows its connection in both shapes.
    let _device = Responder::connect(&hub, "myDeviceId").await;
    let answer = hub.call(Method::GET, "/twins/myDeviceId", None).await;
    let twin: Twin = check("GET /twins/myDeviceId (connected)", &ok(answer));
    assert_eq!(
        twin.connection_state,
        Some(hub_core::device::ConnectionState::Connected)
    );
    let answer = hub.call(Method::GET, "/devices/myDeviceId", None).await;
    check::<Device>("GET /devices/myDeviceId (connected)", &ok(answer));

    let answer = hub.query("SELECT * FROM devices", None).await;
    assert_eq!(answer.header("x-ms-item-type"), Some("Twin"));
    let twins: Vec<Twin> = check_all("SELECT * FROM devices", &ok(answer));
    assert_eq!(twins.len(), 3);
    let answer = hub.query("SELECT * FROM devices", Some("1")).await;
    assert!(answer.header("x-ms-continuation").is_some());
    check_all::<Twin>("SELECT * FROM devices (page of 1)", &ok(answer));

    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_and_device_job_answers_are_hub_core_shapes() {
    let hub = TestHub::start().await;
    let hub_state = hub.running.hub();
    hub_state
        .create_or_update_device("offline", &json!({"deviceId": "offline"}), None)
        .await
        .expect("offline device");
    let _online = Responder::connect(&hub, "myDeviceId").await;
    let both = "deviceId IN ['myDeviceId', 'offline']";

    // A method job: one device answers (outcome), one is offline (error).
    let method = json!({"methodName": "lockDoor", "payload": {"lockTime": "10m"},
                        "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 0});
    let created = hub
        .put_job("wire-method", &method_job(both, method, 300))
        .await;
    assert_eq!(created.end_time, None, "no endTime before the end");
    hub.wait_job("wire-method", JobResponse::is_terminal).await;

    // A method without payload or timeouts: the hub fills them in, payload `null`.
    let bare = hub
        .put_job(
            "wire-bare",
            &method_job(
                "deviceId = 'myDeviceId'",
                json!({"methodName": "ping"}),
                300,
            ),
        )
        .await;
    assert_eq!(
        bare.cloud_to_device_method.and_then(|m| m.payload),
        Some(Value::Null)
    );
    hub.wait_job("wire-bare", JobResponse::is_terminal).await;

    // A twin job.
    let twin_job = json!({
        "type": "scheduleUpdateTwin",
        "updateTwin": {"etag": "*", "tags": {"building": "43"},
                       "properties": {"desired": {"floor": 3, "gone": null}}},
        "queryCondition": both,
        "startTime": iso_in(0),
        "maxExecutionTimeInSeconds": 300,
    });
    hub.put_job("wire-twin", &twin_job).await;
    hub.wait_job("wire-twin", JobResponse::is_terminal).await;

    // Running out of time: failureReason on the job, JobRunTimeout on the unreached device.
    let waiting = json!({"methodName": "ping", "payload": null, "connectTimeoutInSeconds": 300});
    hub.put_job(
        "wire-timeout",
        &method_job("deviceId = 'offline'", waiting.clone(), 1),
    )
    .await;
    let failed = hub.wait_job("wire-timeout", JobResponse::is_terminal).await;
    assert!(failed.failure_reason().is_some(), "{failed:?}");

    // Cancelled while running (a canceled row) and before it started.
    hub.put_job(
        "wire-cancel",
        &method_job("deviceId = 'offline'", waiting, 300),
    )
    .await;
    hub.wait_job("wire-cancel", |j| {
        j.device_job_statistics
            .is_some_and(|s| s.running_count == 1)
    })
    .await;
    let answer = hub
        .call(Method::POST, "/jobs/v2/wire-cancel/cancel", None)
        .await;
    check::<JobResponse>("POST /jobs/v2/wire-cancel/cancel", &ok(answer));
    let mut later = method_job("*", json!({"methodName": "ping"}), 300);
    later["startTime"] = json!(iso_in(3600));
    hub.put_job("wire-later", &later).await;
    let answer = hub
        .call(Method::POST, "/jobs/v2/wire-later/cancel", None)
        .await;
    let cancelled: JobResponse = check("POST /jobs/v2/wire-later/cancel", &ok(answer));
    assert!(cancelled.end_time().is_some());

    let answer = hub.call(Method::GET, "/jobs/v2/query", None).await;
    assert_eq!(answer.header("x-ms-item-type"), Some("JobResponse"));
    let jobs: Vec<JobResponse> = check_all("GET /jobs/v2/query", &ok(answer));
    assert_eq!(jobs.len(), 6);
    for filter in [
        "jobType=scheduleUpdateTwin",
        "jobStatus=cancelled",
        "jobStatus=failed",
    ] {
        let path = format!("/jobs/v2/query?{filter}");
        let answer = hub.call(Method::GET, &path, None).await;
        check_all::<JobResponse>(&path, &ok(answer));
    }
    let answer = hub
        .call_with(
            Method::GET,
            "/jobs/v2/query",
            None,
            &[("x-ms-max-item-count", "2")],
        )
        .await;
    assert!(answer.header("x-ms-continuation").is_some());
    check_all::<JobResponse>("GET /jobs/v2/query (page of 2)", &ok(answer));

    let answer = hub.query("SELECT * FROM devices.jobs", None).await;
    assert_eq!(answer.header("x-ms-item-type"), Some("DeviceJob"));
    let rows: Vec<DeviceJob> = check_all("SELECT * FROM devices.jobs", &ok(answer));
    // Every optional part of a row was on the wire at least once, so each shape was checked.
    assert!(
        rows.iter().any(|r| r.method_response().is_some()),
        "{rows:?}"
    );
    for code in ["DeviceNotOnline", "JobRunTimeout"] {
        assert!(
            rows.iter()
                .any(|r| r.error.as_ref().and_then(|e| e.code.as_deref()) == Some(code)),
            "no {code} row: {rows:?}"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r.status == hub_core::job::DeviceJobStatus::Canceled),
        "{rows:?}"
    );
    let answer = hub
        .query(
            "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'wire-twin'",
            Some("1"),
        )
        .await;
    check_all::<DeviceJob>("FROM devices.jobs (page of 1)", &ok(answer));

    hub.running.shutdown().await;
}

#[test]
fn the_check_refuses_what_hub_core_does_not_describe() {
    let refused = |body: Value| {
        std::panic::catch_unwind(|| {
            check::<Device>("test", &body);
        })
        .is_err()
    };
    assert!(!refused(
        json!({"deviceId": "d", "moduleId": null, "statusReason": null})
    ));
    // A field hub-core does not model lands in `extra`.
    assert!(refused(json!({"deviceId": "d", "futureField": 1})));
    assert!(refused(
        json!({"deviceId": "d", "capabilities": {"iotEdge": false, "other": true}})
    ));
    // A `null` hub-core would drop does not re-serialize.
    assert!(refused(json!({"deviceId": "d", "parentScopes": null})));
    // Another key order is a different answer.
    assert!(refused(json!({"status": "enabled", "deviceId": "d"})));
}
