//! Fault injection for users' own tests (docs/faults.md), over real sockets: a real hub on
//! 127.0.0.1 with ephemeral ports and real TLS, faults set through `/$emulator/faults` (or
//! `--fault`), hub-core `DeviceClient`s as devices and REST calls as the back end. Each kind is
//! observed (status, error code, latency, CONNACK), then cleared or expired, and normal
//! behaviour is checked to be back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hub_core::connection_string::ConnectionString;
use hub_core::device_client::{
    Backoff, ConnectError, ConnectionStatus, DeviceClient, DeviceClientError, DeviceClientOptions,
};
use hub_core::tls::TrustOptions;
use hub_emulator::Config;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Answer, TestHub};

/// The delay of the `slow` tests: long enough to measure, short enough to wait out.
const DELAY: Duration = Duration::from_millis(300);

/// A device that answers every method with 200 and its payload, counting what it was sent.
struct Device {
    client: DeviceClient,
    delivered: Arc<AtomicUsize>,
}

impl Device {
    fn delivered(&self) -> usize {
        self.delivered.load(Ordering::SeqCst)
    }
}

fn options(hub: &TestHub) -> DeviceClientOptions {
    let trust = TrustOptions {
        ca_pem: Some(hub.running.env.ca_pem.clone()),
        no_platform_roots: true,
        ..TrustOptions::default()
    };
    let mut options = DeviceClientOptions::new(hub_core::tls::client_config(&trust).expect("tls"));
    options.connect_timeout = Duration::from_secs(10);
    options.operation_timeout = Duration::from_secs(5);
    options.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(300),
    };
    options
}

fn connection_string(
    hub: &TestHub,
    id: &str,
) -> hub_core::connection_string::DeviceConnectionString {
    let key = hub.running.hub().device_primary_key(id).expect("key");
    let cs = format!(
        "HostName=localhost:{};DeviceId={id};SharedAccessKey={key}",
        hub.running.mqtt_addr.port()
    );
    let Ok(ConnectionString::Device(cs)) = ConnectionString::from_str(&cs) else {
        panic!("device connection string");
    };
    cs
}

/// Registers `id` (unless it exists) and connects it.
async fn device(hub: &TestHub, id: &str) -> Device {
    if !hub.running.hub().device_exists(id) {
        hub.running
            .hub()
            .create_or_update_device(id, &json!({"deviceId": id}), None)
            .await
            .expect("register");
    }
    let connected = DeviceClient::connect(&connection_string(hub, id), &options(hub))
        .await
        .expect("device connects");
    let delivered = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&delivered);
    let mut methods = connected.methods;
    tokio::spawn(async move {
        while let Some(request) = methods.recv().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let payload = request.json().ok().flatten().unwrap_or(Value::Null);
            let _ = request.respond(200, &json!({"echo": payload})).await;
        }
    });
    let mut desired = connected.desired;
    tokio::spawn(async move { while desired.recv().await.is_some() {} });
    wait_until(
        "the device subscribes to methods",
        Duration::from_secs(10),
        || hub.running.hub().method_ready(id),
    )
    .await;
    Device {
        client: connected.client,
        delivered,
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn try_set_fault(hub: &TestHub, id: &str, body: &Value) -> Answer {
    hub.call(Method::PUT, &format!("/$emulator/faults/{id}"), Some(body))
        .await
}

/// Sets a fault that must be accepted; returns the fault as the hub lists it.
async fn set_fault(hub: &TestHub, id: &str, body: Value) -> Value {
    let answer = try_set_fault(hub, id, &body).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{id} {body}: {}",
        answer.body
    );
    answer.body
}

async fn clear_fault(hub: &TestHub, id: &str) {
    let answer = hub
        .call(Method::DELETE, &format!("/$emulator/faults/{id}"), None)
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.body);
}

/// Invokes `method` on `id`; returns the answer and how long it took.
async fn invoke(
    hub: &TestHub,
    id: &str,
    method: &str,
    response_timeout: u64,
    connect_timeout: u64,
) -> (Answer, Duration) {
    let body = json!({"methodName": method, "payload": {"n": 1},
                      "responseTimeoutInSeconds": response_timeout,
                      "connectTimeoutInSeconds": connect_timeout});
    let started = Instant::now();
    let answer = hub
        .call(Method::POST, &format!("/twins/{id}/methods"), Some(&body))
        .await;
    (answer, started.elapsed())
}

/// The numeric `errorCode` of a direct-method error (IoT Hub's JSON-in-Message form).
fn method_error_code(answer: &Answer) -> Value {
    let message = answer.body["Message"].as_str().expect("Message");
    let inner: Value = serde_json::from_str(message).expect("JSON in Message");
    inner["errorCode"].clone()
}

/// Asserts IoT Hub's 429 ThrottlingException in the classic REST error body.
fn assert_throttled(answer: &Answer) {
    assert_eq!(
        answer.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        answer.body
    );
    assert_eq!(
        answer.header("iothub-errorcode"),
        Some("ThrottlingException")
    );
    let message = answer.body["Message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("ErrorCode:ThrottlingException;"),
        "{message}"
    );
}

async fn timed<T>(future: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let output = future.await;
    (output, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_delays_methods_and_twins_on_both_sides_until_cleared() {
    let hub = TestHub::start().await;
    let device = device(&hub, "slow-dev").await;
    let set = set_fault(&hub, "slow-dev", json!({"kind": "slow", "delay": "300ms"})).await;
    assert_eq!(set["kind"], "slow");
    assert_eq!(set["delay"], "300ms");
    assert_eq!(set["remainingMs"], Value::Null, "until cleared");

    let (answer, took) = invoke(&hub, "slow-dev", "ping", 5, 0).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["payload"]["echo"]["n"], 1, "still delivered");
    assert!(took >= DELAY, "the method took {took:?}");

    let (twin, took) = timed(device.client.get_twin()).await;
    twin.expect("device twin GET");
    assert!(took >= DELAY, "the device's twin GET took {took:?}");
    let (patched, took) = timed(device.client.patch_reported(&json!({"slow": true}))).await;
    patched.expect("reported patch");
    assert!(took >= DELAY, "the reported patch took {took:?}");

    let (read, took) = timed(hub.call(Method::GET, "/twins/slow-dev", None)).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["properties"]["reported"]["slow"], true);
    assert!(took >= DELAY, "the service twin read took {took:?}");
    let patch = json!({"properties": {"desired": {"speed": 1}}});
    let (updated, took) = timed(hub.call(Method::PATCH, "/twins/slow-dev", Some(&patch))).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert!(took >= DELAY, "the service twin update took {took:?}");

    clear_fault(&hub, "slow-dev").await;
    let (answer, took) = invoke(&hub, "slow-dev", "ping", 5, 0).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(took < DELAY, "after clearing, the method took {took:?}");
    let (twin, took) = timed(device.client.get_twin()).await;
    twin.expect("device twin GET");
    assert!(took < DELAY, "after clearing, the twin GET took {took:?}");
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_beyond_the_response_timeout_times_out_with_504101() {
    let hub = TestHub::start().await;
    let device = device(&hub, "late-dev").await;
    set_fault(&hub, "late-dev", json!({"kind": "slow", "delay": "1m"})).await;
    // 5 s is the shortest response timeout IoT Hub accepts.
    let (answer, took) = invoke(&hub, "late-dev", "ping", 5, 0).await;
    assert_eq!(
        answer.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        answer.body
    );
    assert_eq!(answer.header("iothub-errorcode"), Some("GatewayTimeout"));
    assert_eq!(method_error_code(&answer), 504101);
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(8),
        "timed out after {took:?}, not the 5 s response timeout"
    );
    assert_eq!(
        device.delivered(),
        0,
        "a request late beyond its timeout is never delivered"
    );
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_disconnects_refuses_reconnects_with_connack_3_then_lets_the_device_back() {
    let hub = TestHub::start().await;
    let device = device(&hub, "gone-dev").await;
    let set = set_fault(&hub, "gone-dev", json!({"kind": "offline", "for": "4s"})).await;
    let remaining = set["remainingMs"].as_u64().expect("remainingMs");
    assert!(remaining <= 4000 && remaining > 3000, "{remaining}");

    // The connection is closed and the device's own reconnects are refused with CONNACK 3.
    let mut status = device.client.status();
    let refused = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let ConnectionStatus::Reconnecting { error, .. } = &*status.borrow_and_update()
                && error.contains("CONNACK 3")
            {
                return;
            }
            status.changed().await.expect("status");
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the device's reconnect was not refused with CONNACK 3"
    );
    // A new client retries CONNACK 3 (a transient refusal) until its connect timeout.
    let mut brief = options(&hub);
    brief.connect_timeout = Duration::from_millis(500);
    let fresh = DeviceClient::connect(&connection_string(&hub, "gone-dev"), &brief).await;
    assert!(
        matches!(&fresh, Err(ConnectError::Unreachable { last_error, .. }) if last_error.contains("CONNACK 3")),
        "a new connection: {:?}",
        fresh.err()
    );
    assert_eq!(
        hub.call(Method::GET, "/devices/gone-dev", None).await.body["connectionState"],
        "Disconnected"
    );

    // A method waits out its connect timeout, then 404103, as for a disconnected device.
    let (answer, took) = invoke(&hub, "gone-dev", "ping", 5, 1).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.body);
    assert_eq!(answer.header("iothub-errorcode"), Some("DeviceNotOnline"));
    assert_eq!(method_error_code(&answer), 404103);
    assert!(took >= Duration::from_secs(1), "404103 after {took:?}");
    assert_eq!(device.delivered(), 0);

    // When the fault expires the device reconnects by itself and is reachable again.
    let (answer, _) = invoke(&hub, "gone-dev", "ping", 5, 10).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(device.delivered(), 1);
    let listed = hub.call(Method::GET, "/$emulator/faults", None).await;
    assert_eq!(listed.body, json!([]), "the expired fault is not listed");
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_answers_the_named_method_itself_until_cleared() {
    let hub = TestHub::start().await;
    let device = device(&hub, "fail-dev").await;
    set_fault(
        &hub,
        "fail-dev",
        json!({"kind": "failing", "status": 503, "payload": {"error": "busy"}, "method": "reboot"}),
    )
    .await;

    let (answer, _) = invoke(&hub, "fail-dev", "reboot", 5, 0).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.body,
        json!({"status": 503, "payload": {"error": "busy"}})
    );
    assert_eq!(device.delivered(), 0, "the failing method is not delivered");
    let (answer, _) = invoke(&hub, "fail-dev", "ping", 5, 0).await;
    assert_eq!(answer.body["status"], 200, "other methods are delivered");
    assert_eq!(device.delivered(), 1);

    clear_fault(&hub, "fail-dev").await;
    let (answer, _) = invoke(&hub, "fail-dev", "reboot", 5, 0).await;
    assert_eq!(answer.body["status"], 200, "{}", answer.body);
    assert_eq!(device.delivered(), 2);
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_throttled_answers_429_to_device_and_service_until_it_expires() {
    let hub = TestHub::start().await;
    let device = device(&hub, "busy-dev").await;
    set_fault(
        &hub,
        "busy-dev",
        json!({"kind": "twin-throttled", "for": "800ms"}),
    )
    .await;
    let set_at = Instant::now();

    let got = device.client.get_twin().await;
    assert!(
        matches!(got, Err(DeviceClientError::Status { status: 429, .. })),
        "device twin GET: {got:?}"
    );
    let patched = device.client.patch_reported(&json!({"lost": true})).await;
    assert!(
        matches!(patched, Err(DeviceClientError::Status { status: 429, .. })),
        "reported patch: {patched:?}"
    );
    assert_throttled(&hub.call(Method::GET, "/twins/busy-dev", None).await);
    let patch = json!({"properties": {"desired": {"x": 1}}});
    assert_throttled(
        &hub.call(Method::PATCH, "/twins/busy-dev", Some(&patch))
            .await,
    );
    // Methods are not twin operations: delivered as usual.
    let (answer, _) = invoke(&hub, "busy-dev", "ping", 5, 0).await;
    assert_eq!(answer.body["status"], 200, "{}", answer.body);
    assert!(
        set_at.elapsed() < Duration::from_millis(800),
        "the checks above ran past the fault's end; the test proves nothing"
    );

    tokio::time::sleep(Duration::from_millis(800).saturating_sub(set_at.elapsed())).await;
    device
        .client
        .get_twin()
        .await
        .expect("twin GET after expiry");
    device
        .client
        .patch_reported(&json!({"back": true}))
        .await
        .expect("reported patch after expiry");
    let twin = hub.call(Method::GET, "/twins/busy-dev", None).await;
    assert_eq!(twin.status, StatusCode::OK);
    let reported = &twin.body["properties"]["reported"];
    assert_eq!(reported["back"], true);
    assert!(
        reported.get("lost").is_none(),
        "a throttled patch is not applied: {reported}"
    );
    assert_eq!(twin.body["properties"]["desired"].get("x"), None);
    hub.running.shutdown().await;
}

async fn run_job(hub: &TestHub, job_id: &str, body: Value) -> Vec<Value> {
    let created = hub
        .call(Method::PUT, &format!("/jobs/v2/{job_id}"), Some(&body))
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let started = Instant::now();
    loop {
        let job = hub
            .call(Method::GET, &format!("/jobs/v2/{job_id}"), None)
            .await;
        if job.body["status"] == "completed" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{}", job.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rows = hub.device_jobs(job_id).await;
    rows.sort_by_key(|row| row["deviceId"].as_str().unwrap_or_default().to_owned());
    rows
}

fn now_iso() -> String {
    hub_core::timestamp::format_millis(time::OffsetDateTime::now_utc())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_show_each_faulty_devices_outcome() {
    let hub = TestHub::start().await;
    let ok = device(&hub, "job-a-ok").await;
    let failing = device(&hub, "job-b-failing").await;
    let offline = device(&hub, "job-c-offline").await;
    let slow = device(&hub, "job-d-slow").await;
    let throttled = device(&hub, "job-e-throttled").await;
    for (id, body) in [
        (
            "job-b-failing",
            json!({"kind": "failing", "status": 500, "payload": {"why": "injected"}}),
        ),
        ("job-c-offline", json!({"kind": "offline"})),
        ("job-d-slow", json!({"kind": "slow", "delay": "1m"})),
        ("job-e-throttled", json!({"kind": "twin-throttled"})),
    ] {
        set_fault(&hub, id, body).await;
    }
    let condition = "deviceId IN ['job-a-ok', 'job-b-failing', 'job-c-offline', 'job-d-slow']";
    let rows = run_job(
        &hub,
        "faulty-methods",
        json!({
            "type": "scheduleDeviceMethod",
            "cloudToDeviceMethod": {"methodName": "ping", "payload": {},
                                    "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 0},
            "queryCondition": condition,
            "startTime": now_iso(),
            "maxExecutionTimeInSeconds": 60,
        }),
    )
    .await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0]["status"], "completed", "{}", rows[0]);
    assert_eq!(rows[0]["outcome"]["deviceMethodResponse"]["status"], 200);
    assert_eq!(
        rows[1]["status"], "completed",
        "the hub answered: {}",
        rows[1]
    );
    assert_eq!(
        rows[1]["outcome"]["deviceMethodResponse"],
        json!({"status": 500, "payload": {"why": "injected"}})
    );
    assert_eq!(rows[2]["status"], "failed", "{}", rows[2]);
    assert_eq!(rows[2]["error"]["code"], "DeviceNotOnline", "{}", rows[2]);
    assert_eq!(rows[3]["status"], "failed", "{}", rows[3]);
    assert_eq!(rows[3]["error"]["code"], "GatewayTimeout", "{}", rows[3]);
    assert_eq!(ok.delivered(), 1);
    assert_eq!(
        failing.delivered() + offline.delivered() + slow.delivered(),
        0
    );

    let rows = run_job(
        &hub,
        "faulty-twins",
        json!({
            "type": "scheduleUpdateTwin",
            "updateTwin": {"etag": "*", "properties": {"desired": {"mode": "eco"}}},
            "queryCondition": "deviceId IN ['job-a-ok', 'job-e-throttled']",
            "startTime": now_iso(),
            "maxExecutionTimeInSeconds": 60,
        }),
    )
    .await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["status"], "completed", "{}", rows[0]);
    assert_eq!(rows[1]["status"], "failed", "{}", rows[1]);
    assert_eq!(
        rows[1]["error"]["code"], "ThrottlingException",
        "{}",
        rows[1]
    );
    let twin = hub.running.hub().get_twin("job-e-throttled").expect("twin");
    assert_eq!(
        twin["properties"]["desired"].get("mode"),
        None,
        "not applied"
    );
    drop(throttled);
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_routes_need_a_service_connect_token() {
    let hub = TestHub::start().await;
    let body = json!({"kind": "offline"});
    let read_only = hub.policy_token("registryRead", support::now() + 3600);
    for auth in [None, Some(read_only.as_str())] {
        for (method, path) in [
            (Method::PUT, "/$emulator/faults/myDeviceId"),
            (Method::GET, "/$emulator/faults"),
            (Method::DELETE, "/$emulator/faults"),
            (Method::DELETE, "/$emulator/faults/myDeviceId"),
        ] {
            let answer = hub
                .call_as(auth, method.clone(), path, Some(&body), &[])
                .await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path}: {}",
                answer.body
            );
            assert_eq!(
                answer.header("iothub-errorcode"),
                Some("IotHubUnauthorizedAccess")
            );
        }
    }
    assert!(
        hub.running.hub().faults().list().is_empty(),
        "nothing was set"
    );
    // The `service` policy grants ServiceConnect: enough.
    let service = hub.policy_token("service", support::now() + 3600);
    let answer = hub
        .call_as(
            Some(&service),
            Method::PUT,
            "/$emulator/faults/myDeviceId",
            Some(&body),
            &[],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fault_requests_are_400_naming_the_problem() {
    let hub = TestHub::start().await;
    for (body, names) in [
        (json!({"kind": "sleepy"}), "unknown fault kind `sleepy`"),
        (json!({"kind": "offline", "for": "soon"}), "`for`"),
        (json!({"kind": "slow"}), "needs `delay`"),
        (json!({"kind": "failing", "status": "bad"}), "`status`"),
        (json!({"delay": "1s"}), "needs `kind`"),
    ] {
        let answer = try_set_fault(&hub, "myDeviceId", &body).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            answer.body
        );
        assert_eq!(answer.header("iothub-errorcode"), Some("ArgumentInvalid"));
        let message = answer.body["Message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{body}: {message}");
        assert!(
            message.contains("docs/faults.md"),
            "says where to look: {message}"
        );
    }
    let not_json = hub
        .client
        .put(format!("{}/$emulator/faults/myDeviceId", hub.base))
        .header("Authorization", &hub.owner)
        .body("kind=offline")
        .send()
        .await
        .expect("request");
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    let bad_id = try_set_fault(&hub, "bad%20id", &json!({"kind": "offline"})).await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST, "{}", bad_id.body);
    assert!(
        hub.running.hub().faults().list().is_empty(),
        "nothing was set"
    );

    // Not an error: a device that is not registered yet may get a fault.
    set_fault(&hub, "not-yet", json!({"kind": "offline"})).await;
    let listed = hub.call(Method::GET, "/$emulator/faults", None).await;
    assert_eq!(listed.body[0]["deviceId"], "not-yet");
    let cleared = hub.call(Method::DELETE, "/$emulator/faults", None).await;
    assert_eq!(cleared.body, json!({"cleared": 1}));
    let gone = hub
        .call(Method::DELETE, "/$emulator/faults/not-yet", None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.body);
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_flag_applies_from_the_start() {
    let flag = hub_emulator::faults::parse_flag("myDeviceId=failing:500").expect("flag");
    let hub = TestHub::start_with(Config {
        faults: vec![flag],
        ..Config::ephemeral()
    })
    .await;
    // Answered by the hub: the device need not even be connected.
    let (answer, _) = invoke(&hub, "myDeviceId", "reboot", 5, 0).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body, json!({"status": 500, "payload": null}));
    let listed = hub.call(Method::GET, "/$emulator/faults", None).await;
    assert_eq!(listed.body[0]["kind"], "failing");
    hub.running.shutdown().await;
}
