//! A fleet against a hub that enforces S1's rates, over real sockets: connects beyond the
//! "new device connections" rate get CONNACK 3 and are retried with backoff until the whole
//! fleet is connected, registry calls answered 429 are retried, and the summary counts both;
//! against a hub without a tier nothing is throttled and the summary says 0.

mod common;

use std::time::Duration;

use common::*;
use hub_core::connection_string::{ConnectionString, ServiceConnectionString};
use hub_core::tier::Tier;
use hub_emulator::RunningHub;
use serde_json::json;
use sim_device::{Config, Fleet, FleetSummary};
use tokio_util::sync::CancellationToken;

/// S1's rates with no burst and no queue: two connects within 10 ms (S1 admits 100 a second)
/// already meet a refusal, so a fleet's opening rush is throttled even on a slow machine.
async fn start_s1_hub() -> RunningHub {
    init_tracing();
    let config = hub_emulator::Config {
        tier: Some(Tier::S1.with_units(1).expect("S1")),
        throttle_shaping: (Duration::ZERO, Duration::ZERO),
        ..hub_emulator::Config::ephemeral()
    };
    match hub_emulator::start(config).await {
        Ok(hub) => hub,
        Err(e) => panic!("hub-emulator did not start: {e}"),
    }
}

fn service_cs(running: &RunningHub) -> ServiceConnectionString {
    match running
        .env
        .service_connection_string
        .parse::<ConnectionString>()
    {
        Ok(ConnectionString::Service(s)) => s,
        other => panic!("service cs: {other:?}"),
    }
}

fn fleet_config(running: &RunningHub, prefix: &str, count: usize, register: bool) -> Config {
    let mut config = Config::new(device_cs(running));
    config.ca_pem = Some(running.env.ca_pem.clone());
    config.connect_timeout = Duration::from_secs(30);
    config.service_connection_string = Some(service_cs(running));
    config.fleet = Some(Fleet {
        count,
        id_prefix: prefix.into(),
        register,
    });
    config.summary_interval = Duration::from_secs(1);
    config
}

/// Registers `{prefix}1..=count` in the hub directly, so the fleet's registry use is its one
/// listing (S1 allows 100 registry operations a minute: one by one, 300 take three minutes).
async fn register_in_hub(running: &RunningHub, prefix: &str, count: usize) {
    for i in 1..=count {
        let id = format!("{prefix}{i}");
        if let Err(e) = running
            .hub()
            .create_or_update_device(&id, &json!({ "deviceId": id }), None)
            .await
        {
            panic!("registering {id}: {e}");
        }
    }
}

/// Runs the fleet until every device is subscribed to methods, then stops it.
async fn run_until_connected(running: &RunningHub, config: Config) -> FleetSummary {
    let Some(fleet) = config.fleet.clone() else {
        panic!("not a fleet config");
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(sim_device::run(config, shutdown.clone()));
    let hub = running.hub().clone();
    eventually(
        &format!("{} devices subscribed to methods", fleet.count),
        Duration::from_secs(90),
        || async {
            if task.is_finished() {
                panic!("the fleet stopped before it was connected");
            }
            fleet
                .device_ids()
                .all(|id| hub.method_ready(&id))
                .then_some(())
        },
    )
    .await;
    // The hub marks a device method-ready on its SUBSCRIBE; the device counts itself connected
    // once the SUBACK is back, a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(15), task).await {
        Ok(Ok(Ok(summary))) => summary,
        other => panic!("sim-device did not stop cleanly: {other:?}"),
    }
}

/// 300 devices registered beforehand, run until all are connected, then stopped.
async fn fleet_of_300(running: &RunningHub, prefix: &str) -> FleetSummary {
    register_in_hub(running, prefix, 300).await;
    let summary = run_until_connected(running, fleet_config(running, prefix, 300, false)).await;
    assert_eq!((summary.devices, summary.connected), (300, 300));
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_300_on_s1_backs_off_from_connack_3_until_all_are_connected() {
    let running = start_s1_hub().await;
    let summary = fleet_of_300(&running, "s1-").await;
    assert!(
        summary.throttled.connects > 0,
        "S1 refused no connect of 300 arriving at once: {summary:?}"
    );
    // The one listing fits S1's registry rate.
    assert_eq!(summary.throttled.registry_calls, 0, "{summary:?}");
    let line = summary.throttle_line();
    assert!(
        line.starts_with(&format!(
            "throttled: {} connects (CONNACK 3), 0 registry calls; all 300 devices connected",
            summary.throttled.connects
        )),
        "{line}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_fleet_without_a_tier_is_never_throttled() {
    let running = start_hub().await;
    let summary = fleet_of_300(&running, "free-").await;
    assert_eq!(
        summary.throttle_line(),
        "throttled: 0 connects (CONNACK 3), 0 registry calls; all 300 devices connected"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_on_s1_retries_throttled_registry_calls() {
    let running = start_s1_hub().await;
    // A listing, then one bulk creation of the four: two registry calls where S1 admits one
    // every 0.6 s.
    let summary = run_until_connected(&running, fleet_config(&running, "new-", 4, true)).await;
    assert_eq!((summary.devices, summary.connected), (4, 4));
    assert!(
        summary.throttled.registry_calls > 0,
        "S1 throttled no registry call of nine at once: {summary:?}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_fleet_takes_one_bulk_call_per_hundred_devices() {
    // S1 as IoT Hub shapes it: a minute's worth (100 registry operations) passes at once, then
    // 10 s of queue at 1.67 a second, then 429. 250 new devices made one call each (a lookup and
    // a creation per device, 501 operations) would be throttled for minutes; in bulk they are a
    // listing and three calls.
    init_tracing();
    let running = match hub_emulator::start(hub_emulator::Config {
        tier: Some(Tier::S1.with_units(1).expect("S1")),
        ..hub_emulator::Config::ephemeral()
    })
    .await
    {
        Ok(hub) => hub,
        Err(e) => panic!("hub-emulator did not start: {e}"),
    };
    let started = std::time::Instant::now();
    let summary = run_until_connected(&running, fleet_config(&running, "bulk-", 250, true)).await;
    assert_eq!((summary.devices, summary.connected), (250, 250));
    assert_eq!(
        summary.throttled.registry_calls, 0,
        "four registry operations stay within S1's burst: {summary:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    for id in ["bulk-1", "bulk-100", "bulk-101", "bulk-250"] {
        let device = running.hub().get_device(id).expect("registered");
        assert!(
            device["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .is_some_and(|k| k.len() >= 40),
            "{id} has a 32-byte key: {device}"
        );
    }
    running.shutdown().await;
}
