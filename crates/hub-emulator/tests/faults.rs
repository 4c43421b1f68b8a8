//! Fault injection over real sockets: our hub-core `DeviceClient` reaches a real hub through
//! the test proxy (`support::proxy`), which delays, cuts, black-holes or stalls one direction;
//! after each fault the device must answer a direct method and get a reported patch
//! acknowledged (both checked from the service side) within a bounded time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::str::FromStr as _;
use std::time::{Duration, Instant};

use hub_core::connection_string::ConnectionString;
use hub_core::device_client::{Backoff, DeviceClient, DeviceClientOptions};
use hub_core::tls::TrustOptions;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::TestHub;
use support::proxy::{Direction, Mode, Proxy};

const DEVICE: &str = "myDeviceId";
/// The device's MQTT keep-alive: short, so a dead connection is noticed in seconds (the client
/// fails a connection whose PINGRESP is missing; the hub drops one silent for 1.5 x this).
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// How long a device may take to come back after a fault ends.
const RECOVERY: Duration = Duration::from_secs(30);

/// A hub, a proxy in front of its MQTT port, and the tutorial device connected through it,
/// answering every method with its payload.
async fn setup() -> (TestHub, Proxy, DeviceClient) {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.running.mqtt_addr).await;
    let key = hub.running.hub().device_primary_key(DEVICE).expect("key");
    let cs = format!(
        "HostName=localhost:{};DeviceId={DEVICE};SharedAccessKey={key}",
        proxy.addr().port()
    );
    let Ok(ConnectionString::Device(cs)) = ConnectionString::from_str(&cs) else {
        panic!("device connection string");
    };
    let trust = TrustOptions {
        ca_pem: Some(hub.running.env.ca_pem.clone()),
        no_platform_roots: true,
        ..TrustOptions::default()
    };
    let mut options = DeviceClientOptions::new(hub_core::tls::client_config(&trust).expect("tls"));
    options.keep_alive = KEEP_ALIVE;
    options.connect_timeout = Duration::from_secs(10);
    options.operation_timeout = Duration::from_secs(5);
    options.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let connected = DeviceClient::connect(&cs, &options)
        .await
        .expect("device connects through the proxy");
    let mut methods = connected.methods;
    tokio::spawn(async move {
        while let Some(request) = methods.recv().await {
            let payload = request.json().ok().flatten().unwrap_or(Value::Null);
            let _ = request.respond(200, &json!({"echo": payload})).await;
        }
    });
    let mut desired = connected.desired;
    tokio::spawn(async move { while desired.recv().await.is_some() {} });
    (hub, proxy, connected.client)
}

/// Invokes `ping` on the device from the service; returns the status and body.
async fn invoke(hub: &TestHub, n: u64, response_timeout: u64) -> (StatusCode, Value) {
    let body = json!({"methodName": "ping", "payload": {"n": n},
                      "responseTimeoutInSeconds": response_timeout, "connectTimeoutInSeconds": 0});
    let answer = hub
        .call(
            Method::POST,
            &format!("/twins/{DEVICE}/methods"),
            Some(&body),
        )
        .await;
    (answer.status, answer.body)
}

/// One full round: a method answered with its payload, and a reported patch acknowledged and
/// visible in the service's twin.
async fn round(hub: &TestHub, device: &DeviceClient, n: u64) -> Result<(), String> {
    let (status, body) = invoke(hub, n, 5).await;
    if status != StatusCode::OK || body["payload"]["echo"]["n"] != n {
        return Err(format!("method: {status} {body}"));
    }
    device
        .patch_reported(&json!({"n": n}))
        .await
        .map_err(|e| format!("reported patch: {e}"))?;
    let twin = hub
        .call(Method::GET, &format!("/twins/{DEVICE}"), None)
        .await;
    if twin.body["properties"]["reported"]["n"] != n {
        return Err(format!("twin: {}", twin.body));
    }
    Ok(())
}

/// Repeats [`round`] until it succeeds or [`RECOVERY`] has passed (then fails the test).
/// A call made while the hub still holds the dead session waits out its response timeout
/// (504), as IoT Hub's does: the hub cannot tell a lost request from a slow device.
async fn recovers(hub: &TestHub, device: &DeviceClient, n: u64, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let Err(e) = round(hub, device, n).await else {
            return started.elapsed();
        };
        println!("{what}: not yet after {:?}: {e}", started.elapsed());
        assert!(
            started.elapsed() < RECOVERY,
            "{what}: the device did not recover within {RECOVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn delay_in_both_directions_slows_calls_but_keeps_the_connection() {
    let (hub, proxy, device) = setup().await;
    round(&hub, &device, 1).await.expect("a clean round");
    let delay = Duration::from_millis(300);
    proxy.set(Direction::Up, Mode::Delay(delay));
    proxy.set(Direction::Down, Mode::Delay(delay));
    let started = Instant::now();
    let (status, body) = invoke(&hub, 2, 10).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payload"]["echo"]["n"], 2, "{body}");
    // The request crosses the proxy down, the answer up: two delays at least.
    assert!(took >= 2 * delay, "a delayed proxy answered in {took:?}");
    device
        .patch_reported(&json!({"n": 2}))
        .await
        .expect("a reported patch through a slow link");
    proxy.resume();
    round(&hub, &device, 3).await.expect("after the delay");
    assert_eq!(
        proxy.accepted(),
        1,
        "latency alone must not cost a reconnect"
    );
    assert_eq!(device.stats().connects, 1);
}

#[tokio::test]
async fn a_reset_connection_is_reestablished() {
    let (hub, proxy, device) = setup().await;
    round(&hub, &device, 1).await.expect("a clean round");
    proxy.cut();
    let took = recovers(&hub, &device, 2, "after a cut").await;
    assert!(
        proxy.accepted() >= 2 && device.stats().connects >= 2,
        "the device must have reconnected (accepted {}, connects {})",
        proxy.accepted(),
        device.stats().connects
    );
    println!("recovered from a cut in {took:?}");
}

#[tokio::test]
async fn a_black_hole_in_either_direction_fails_calls_then_the_device_recovers() {
    let (hub, proxy, device) = setup().await;
    round(&hub, &device, 1).await.expect("a clean round");
    for (n, direction) in [(2, Direction::Down), (3, Direction::Up)] {
        proxy.set(direction, Mode::BlackHole);
        // Down: the request never reaches the device; up: its answer never reaches the hub.
        // Either way IoT Hub's answer is 504 GatewayTimeout after responseTimeoutInSeconds, or
        // 404 DeviceNotOnline once the hub has dropped the silent session.
        let (status, body) = invoke(&hub, n, 5).await;
        assert!(
            status == StatusCode::GATEWAY_TIMEOUT || status == StatusCode::NOT_FOUND,
            "{direction:?} black-holed: {status} {body}"
        );
        proxy.resume();
        let took = recovers(&hub, &device, n, &format!("black hole {direction:?}")).await;
        println!("recovered from a black hole {direction:?} in {took:?}");
    }
    assert!(
        device.stats().connects >= 2,
        "a black-holed stream is dead: the device must have reconnected"
    );
}

#[tokio::test]
async fn a_short_stall_in_either_direction_only_delays_the_call() {
    let (hub, proxy, device) = setup().await;
    round(&hub, &device, 1).await.expect("a clean round");
    let stall = Duration::from_millis(1500);
    for (n, direction) in [(2, Direction::Down), (3, Direction::Up)] {
        proxy.set(direction, Mode::Stall);
        let resume = {
            let started = Instant::now();
            async move {
                tokio::time::sleep(stall).await;
                started
            }
        };
        let (answer, started) = tokio::join!(invoke(&hub, n, 10), async {
            let started = resume.await;
            proxy.resume();
            started
        });
        let took = started.elapsed();
        let (status, body) = answer;
        assert_eq!(status, StatusCode::OK, "{direction:?} stalled: {body}");
        assert_eq!(body["payload"]["echo"]["n"], n, "{body}");
        assert!(
            took >= stall,
            "{direction:?}: answered in {took:?} through a stalled link"
        );
    }
    round(&hub, &device, 4).await.expect("after the stalls");
    assert_eq!(
        device.stats().connects,
        1,
        "a stall shorter than the keep-alive must not cost a reconnect"
    );
}

#[tokio::test]
async fn a_long_stall_drops_the_session_and_the_device_comes_back() {
    let (hub, proxy, device) = setup().await;
    round(&hub, &device, 1).await.expect("a clean round");
    proxy.set(Direction::Up, Mode::Stall);
    // Longer than 1.5 x keep-alive: the hub must give up on the silent device.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.running.hub().method_ready(DEVICE) {
        assert!(
            Instant::now() < deadline,
            "the hub kept a session silent for 10 s (keep-alive {KEEP_ALIVE:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.resume();
    let took = recovers(&hub, &device, 2, "after a long stall").await;
    assert!(device.stats().connects >= 2, "the device reconnected");
    println!("recovered from a long stall in {took:?}");
}
