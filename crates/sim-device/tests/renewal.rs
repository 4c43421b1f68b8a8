//! SAS token renewal end to end against the real hub-emulator: short-lived tokens are replaced
//! by reconnecting before they expire, and methods and desired patches keep working across it.
//!
//! The emulator, like IoT Hub, accepts a token up to 5 minutes past its `se` and ends the session
//! then, so a 15 s test cannot wait for that disconnect. What these tests check instead: each
//! renewal is a new connection the hub sees (its `connectionStateUpdatedTime` moves), made before
//! the old token's `se`; the client made no reconnect other than its renewals (any drop by the
//! hub, for expiry or otherwise, would be one); and a method called with no connect timeout
//! right after each renewal succeeds (a device that is not connected gets 404103 at once).
//! Without renewal (or with the old 60 s floor on token lifetimes) no renewal happens within the
//! waits and the tests fail.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use hub_core::device_client::{Backoff, ConnectionStatus, DeviceClient};
use hub_emulator::Hub;
use hub_emulator::hub::MethodCall;
use serde_json::{Value, json};
use sim_device::{Config, FleetSummary};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Short enough for two renewals in well under 15 s (renewed after half of it: 3 s).
const TTL: Duration = Duration::from_secs(6);
/// How long a renewal may take to show: the renewal point plus slack for a slow machine.
const RENEWAL_WAIT: Duration = Duration::from_secs(8);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// When the hub last saw the device connect or disconnect.
fn connection_state_time(hub: &Hub) -> String {
    match hub.get_device(DEVICE) {
        Ok(device) => device["connectionStateUpdatedTime"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        Err(e) => panic!("get device: {e}"),
    }
}

/// A method call that fails at once (404103) unless the device is connected and subscribed.
async fn invoke_now(hub: &Hub, name: &str, payload: Value) -> Result<(i32, Value), String> {
    let body = json!({
        "methodName": name,
        "payload": payload,
        "responseTimeoutInSeconds": 10,
        "connectTimeoutInSeconds": 0,
    });
    let call = MethodCall::from_request(&body).map_err(|e| e.to_string())?;
    hub.invoke_method(DEVICE, &call)
        .await
        .map(|o| (o.status, o.payload))
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_client_renews_a_short_token_before_it_expires_and_keeps_methods_and_desired() {
    let running = start_hub().await;
    let hub = running.hub().clone();
    let mut options = client_options(&running);
    options.sas_ttl = TTL;
    let started = std::time::Instant::now();
    let connected = DeviceClient::connect(&device_cs(&running), &options)
        .await
        .expect("connect");
    let client = connected.client.clone();
    let mut desired = connected.desired;
    let mut version = connected.twin.desired_version();
    let mut methods = connected.methods;
    let responder = tokio::spawn(async move {
        while let Some(request) = methods.recv().await {
            let echo = request.json().ok().flatten().unwrap_or(Value::Null);
            let _ = request.respond(200, &json!({ "echo": echo })).await;
        }
    });

    let first = client.stats();
    assert_eq!((first.connects, first.renewals), (1, 0));
    let mut expiry = first.token_expiry.expect("a minted token has an expiry");
    let lifetime = expiry as f64 - unix_now();
    assert!(
        lifetime > 4.0 && lifetime <= 7.5,
        "token lives {lifetime:.1}s"
    );
    let mut hub_seen = connection_state_time(&hub);

    for round in 1..=4u64 {
        let stats = eventually(&format!("renewal {round}"), RENEWAL_WAIT, || async {
            let stats = client.stats();
            // A renewal is counted when its DISCONNECT is queued, and the client reads as
            // connected until the hub closes the old connection: wait for the renewal's CONNACK
            // (`connects` past `renewals`), or a loaded machine sees the gap in between.
            (stats.renewals >= round
                && stats.connects > stats.renewals
                && client.is_connected()
                && hub.method_ready(DEVICE))
            .then_some(stats)
        })
        .await;
        let now = unix_now();
        assert!(
            now < expiry as f64,
            "round {round}: renewed {:.2}s after the old token expired",
            now - expiry as f64
        );
        assert_eq!(
            stats.connects,
            stats.renewals + 1,
            "round {round}: a reconnect that was not a renewal: {stats:?}"
        );
        let new_expiry = stats.token_expiry.expect("expiry");
        assert!(
            new_expiry > expiry,
            "round {round}: the token was not renewed"
        );
        expiry = new_expiry;
        let hub_now = connection_state_time(&hub);
        assert_ne!(
            hub_now, hub_seen,
            "round {round}: the hub saw no new connection"
        );
        hub_seen = hub_now;

        let answer = invoke_now(&hub, "ping", json!({ "round": round })).await;
        assert_eq!(
            answer,
            Ok((200, json!({ "echo": { "round": round } }))),
            "round {round}"
        );

        set_desired(&hub, DEVICE, json!({ "round": round })).await;
        version += 1;
        let patch = tokio::time::timeout(Duration::from_secs(5), desired.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: no desired patch"))
            .expect("open");
        // Either the notification or, if it raced the reconnect's twin read, the full state.
        assert_eq!(patch.version, version, "round {round}: {patch:?}");
        assert_eq!(patch.patch["round"], round, "round {round}: {patch:?}");
    }
    // Four renewals 3 s apart: the device stayed up for two whole token lifetimes.
    assert!(started.elapsed() >= 2 * TTL, "{:?}", started.elapsed());
    let last = client.stats();
    assert_eq!(last.connects, last.renewals + 1, "{last:?}");
    client.close().await;
    let _ = responder.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_answer_given_as_the_connection_drops_is_sent_on_the_next_one() {
    let running = start_hub().await;
    let hub = running.hub().clone();
    let mut options = client_options(&running);
    // A reconnect that takes a while, so the answer is given while the client is away.
    options.backoff = Backoff {
        initial: Duration::from_millis(600),
        max: Duration::from_millis(600),
    };
    let mut connected = DeviceClient::connect(&device_cs(&running), &options)
        .await
        .expect("connect");
    let client = connected.client.clone();
    let call_hub = hub.clone();
    let call = tokio::spawn(async move { invoke(&call_hub, DEVICE, "slow", None).await });
    let request = tokio::time::timeout(Duration::from_secs(10), connected.methods.recv())
        .await
        .expect("request")
        .expect("open");
    // The hub drops the session with the call outstanding (it keeps the call until its response
    // timeout); the answer goes into the client's queue as the connection dies.
    hub.kill_session(DEVICE);
    request
        .respond(200, &json!({ "late": true }))
        .await
        .expect("respond");
    let mut status = client.status();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| matches!(s, ConnectionStatus::Reconnecting { .. })),
    )
    .await;
    let outcome = tokio::time::timeout(Duration::from_secs(12), call)
        .await
        .expect("the call ends")
        .expect("join");
    assert_eq!(
        (outcome.status, outcome.payload),
        (200, json!({ "late": true }))
    );
    assert!(client.stats().connects >= 2, "{:?}", client.stats());
    client.close().await;
}

fn spawn_sim(
    config: Config,
) -> (
    CancellationToken,
    JoinHandle<Result<FleetSummary, sim_device::SimError>>,
) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sim_device::run(config, shutdown.clone()));
    (shutdown, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_device_with_sas_ttl_6s_keeps_answering_lock_door_across_renewals() {
    use clap::Parser as _;
    let running = start_hub().await;
    let hub = running.hub().clone();
    // The flag as a user gives it, parsed by the same parser as the binary's.
    let args = sim_device::Args::try_parse_from([
        "sim-device",
        "--connection-string",
        &running.env.device_connection_string,
        "--sas-ttl",
        "6s",
        "--connect-timeout",
        "10s",
    ])
    .expect("flags");
    assert_eq!(args.sas_ttl, TTL);
    let mut config = Config::from_args(args).expect("config");
    config.ca_pem = Some(running.env.ca_pem.clone());
    let (shutdown, task) = spawn_sim(config);
    wait_method_ready(&hub, DEVICE).await;
    let started = std::time::Instant::now();
    let lock_door = || async { invoke_now(&hub, "lockDoor", json!({ "lockTime": "1m" })).await };
    let expected = Ok((200, json!({ "Response": "lockDoor called successfully" })));
    assert_eq!(lock_door().await, expected);
    let mut seen = connection_state_time(&hub);
    for round in 1..=2 {
        // A renewal is a disconnect and a connect: the hub's connection state time moves twice.
        seen = eventually(
            &format!("renewal {round} seen by the hub"),
            RENEWAL_WAIT,
            || {
                let seen = seen.clone();
                let hub = hub.clone();
                async move {
                    let now = connection_state_time(&hub);
                    (now != seen && hub.method_ready(DEVICE)).then_some(now)
                }
            },
        )
        .await;
        assert_eq!(lock_door().await, expected, "after renewal {round}");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    shutdown.cancel();
    let summary = match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(Ok(summary))) => summary,
        other => panic!("sim-device did not stop cleanly: {other:?}"),
    };
    assert_eq!(summary.methods_answered, 3);
}

#[test]
fn sas_ttl_below_the_floor_is_a_usage_error() {
    use clap::Parser as _;
    let args = sim_device::Args::try_parse_from([
        "sim-device",
        "--connection-string",
        "HostName=h.example;DeviceId=d;SharedAccessKey=a2V5",
        "--sas-ttl",
        "2s",
    ])
    .expect("flags");
    let err = Config::from_args(args).expect_err("2s is below the floor");
    assert!(
        err.to_string().contains("--sas-ttl must be at least 5s"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
}
