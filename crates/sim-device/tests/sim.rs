//! `sim_device::run` against the real hub-emulator: the tutorial device's behaviour, a hub
//! restart with a desired change made while the device was away, and a fleet of 200.

mod common;

use std::time::Duration;

use common::*;
use hub_core::device_client::DeviceClient;
use serde_json::{Value, json};
use sim_device::{Config, Fleet, FleetSummary};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn sim_config(running: &hub_emulator::RunningHub) -> Config {
    let mut config = Config::new(device_cs(running));
    config.ca_pem = Some(running.env.ca_pem.clone());
    config.connect_timeout = Duration::from_secs(10);
    config
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

async fn stop(
    shutdown: CancellationToken,
    task: JoinHandle<Result<FleetSummary, sim_device::SimError>>,
) -> FleetSummary {
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(Ok(summary))) => summary,
        other => panic!("sim-device did not stop cleanly: {other:?}"),
    }
}

#[tokio::test]
async fn lock_door_answers_200_and_reports_the_door_state() {
    let running = start_hub().await;
    let (shutdown, task) = spawn_sim(sim_config(&running));
    wait_method_ready(running.hub(), DEVICE).await;
    let outcome = invoke(
        running.hub(),
        DEVICE,
        "lockDoor",
        Some(json!({"lockTime": "10m"})),
    )
    .await;
    assert_eq!(outcome.status, 200);
    assert_eq!(
        outcome.payload,
        json!({"Response": "lockDoor called successfully"})
    );
    let door = eventually(
        "the door state in reported properties",
        Duration::from_secs(10),
        || async {
            let twin = twin(running.hub(), DEVICE);
            let door = twin.pointer("/properties/reported/door").cloned()?;
            (door["locked"] == true).then_some(door)
        },
    )
    .await;
    assert_eq!(door["lockTime"], "10m");
    assert!(door["lockedAt"].is_string());
    let summary = stop(shutdown, task).await;
    assert_eq!(summary.methods_answered, 1);
}

#[tokio::test]
async fn unknown_method_gets_404_naming_lock_door_and_the_device_stays_up() {
    let running = start_hub().await;
    let (shutdown, task) = spawn_sim(sim_config(&running));
    wait_method_ready(running.hub(), DEVICE).await;
    let outcome = invoke(running.hub(), DEVICE, "openWindow", Some(json!({}))).await;
    assert_eq!(outcome.status, 404);
    assert_eq!(outcome.payload["methods"], json!(["lockDoor"]));
    assert!(
        outcome.payload["message"]
            .as_str()
            .is_some_and(|m| m.contains("openWindow"))
    );
    // Empty payload on lockDoor is fine; the device is still there.
    let outcome = invoke(running.hub(), DEVICE, "lockDoor", None).await;
    assert_eq!(outcome.status, 200);
    let summary = stop(shutdown, task).await;
    assert_eq!(summary.methods_answered, 2);
}

fn desired_version(twin: &Value) -> u64 {
    twin.pointer("/properties/desired/$version")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn acked(twin: &Value) -> Option<u64> {
    twin.pointer("/properties/reported/desiredAck/version")
        .and_then(Value::as_u64)
}

#[tokio::test]
async fn desired_patches_are_applied_and_acknowledged_and_state_on_connect_once() {
    let running = start_hub().await;
    // Desired state set before the device starts: applied once on connect.
    set_desired(running.hub(), DEVICE, json!({"building": 42})).await;
    let (shutdown, task) = spawn_sim(sim_config(&running));
    eventually(
        "the desired state read on connect to be acknowledged",
        Duration::from_secs(10),
        || async {
            let twin = twin(running.hub(), DEVICE);
            (acked(&twin) == Some(desired_version(&twin))
                && twin["properties"]["reported"]["building"] == 42)
                .then_some(())
        },
    )
    .await;
    // The tutorial's update: {"building":43,"floor":3}.
    let updated = set_desired(running.hub(), DEVICE, json!({"building": 43, "floor": 3})).await;
    let version = desired_version(&updated);
    eventually(
        "the patch to be acknowledged",
        Duration::from_secs(10),
        || async {
            let twin = twin(running.hub(), DEVICE);
            let reported = &twin["properties"]["reported"];
            (acked(&twin) == Some(version) && reported["building"] == 43 && reported["floor"] == 3)
                .then_some(())
        },
    )
    .await;
    let summary = stop(shutdown, task).await;
    assert_eq!(summary.patches_applied, 2);
}

#[tokio::test]
async fn reconnects_after_a_hub_restart_and_catches_up_on_desired_changes() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let durable = |mqtt_port: u16, https_port: u16| hub_emulator::Config {
        data_dir: Some(dir.path().to_owned()),
        durable: true,
        mqtt_port,
        https_port,
        ..hub_emulator::Config::ephemeral()
    };
    let first = hub_emulator::start(durable(0, 0)).await.expect("hub");
    let (mqtt_port, https_port) = (first.mqtt_addr.port(), first.https_addr.port());
    let mut connected = DeviceClient::connect(&device_cs(&first), &client_options(&first))
        .await
        .expect("connect");
    let client = connected.client.clone();
    let mut status = client.status();
    let start_version = connected.twin.desired_version();
    first.shutdown().await;
    status
        .wait_for(|s| !matches!(s, hub_core::device_client::ConnectionStatus::Connected))
        .await
        .expect("sees the loss");

    // While the device is away: the same hub (same store) on other ports takes a desired change.
    let elsewhere = hub_emulator::start(durable(0, 0))
        .await
        .expect("hub, other ports");
    set_desired(elsewhere.hub(), DEVICE, json!({"building": 43})).await;
    set_desired(elsewhere.hub(), DEVICE, json!({"floor": 3})).await;
    elsewhere.shutdown().await;

    // Back on the original ports: the device reconnects, re-reads the twin, and gets one full patch.
    let again = hub_emulator::start(durable(mqtt_port, https_port))
        .await
        .expect("hub, same ports");
    let patch = tokio::time::timeout(Duration::from_secs(15), connected.desired.recv())
        .await
        .expect("a patch after the reconnect")
        .expect("open");
    assert!(patch.full, "{patch:?}");
    assert_eq!(patch.version, start_version + 2);
    assert_eq!(
        (
            patch.patch["building"].clone(),
            patch.patch["floor"].clone()
        ),
        (json!(43), json!(3))
    );
    wait_method_ready(again.hub(), DEVICE).await;

    // Live again: the next change arrives as a normal patch, once.
    set_desired(again.hub(), DEVICE, json!({"floor": 4})).await;
    let next = tokio::time::timeout(Duration::from_secs(10), connected.desired.recv())
        .await
        .expect("next")
        .expect("open");
    assert_eq!((next.version, next.full), (start_version + 3, false));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), connected.desired.recv())
            .await
            .is_err(),
        "delivered twice"
    );
    client.close().await;
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_200_devices_in_one_process() {
    let running = start_hub().await;
    let mut config = sim_config(&running);
    config.service_connection_string = Some(
        match running
            .env
            .service_connection_string
            .parse::<hub_core::connection_string::ConnectionString>()
        {
            Ok(hub_core::connection_string::ConnectionString::Service(s)) => s,
            other => panic!("service cs: {other:?}"),
        },
    );
    config.fleet = Some(Fleet {
        count: 200,
        id_prefix: "fleet-".into(),
        register: true,
    });
    config.summary_interval = Duration::from_secs(1);
    let (shutdown, task) = spawn_sim(config);
    let hub = running.hub().clone();
    eventually(
        "200 devices subscribed to methods",
        Duration::from_secs(60),
        || async {
            (1..=200)
                .all(|i| hub.method_ready(&format!("fleet-{i}")))
                .then_some(())
        },
    )
    .await;
    let calls = (1..=200).map(|i| {
        let hub = hub.clone();
        async move {
            invoke(
                &hub,
                &format!("fleet-{i}"),
                "lockDoor",
                Some(json!({"lockTime": "1m"})),
            )
            .await
            .status
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let summary = stop(shutdown, task).await;
    assert_eq!(
        (summary.devices, summary.connected, summary.methods_answered),
        (200, 200, 200)
    );
}
