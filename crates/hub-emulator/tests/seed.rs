//! `hub-emulator --seed FILE` over real sockets: a seed's devices, keys, tags and desired
//! properties are there once the hub serves; a restart with the same file changes no etag or
//! version; a changed file updates only what changed; a bad file is a clear start error (from
//! the real binary too) that names the file and where in it, and applies nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

use hub_emulator::Config;
use hub_emulator::seed::Seed;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::TestHub;

const KEY_A: &str = "cHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ==";
const KEY_B: &str = "c2Vjb25kYXJ5LWtleS0wMTIzNDU2Nzg5";

fn write_seed(dir: &Path, name: &str, seed: &Value) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(seed).expect("JSON")).expect("write seed");
    path
}

fn seeded(data_dir: &Path, seed_file: &Path) -> Config {
    Config {
        data_dir: Some(data_dir.to_path_buf()),
        durable: true,
        seed: Some(Seed::load(seed_file).expect("the seed loads")),
        ..Config::ephemeral()
    }
}

/// What a restart must leave alone: each device's etag, keys and status, and its twin's etag,
/// version and desired `$version`.
async fn snapshot(hub: &TestHub, ids: &[&str]) -> Vec<Value> {
    let mut out = Vec::new();
    for id in ids {
        let device = hub.call(Method::GET, &format!("/devices/{id}"), None).await;
        assert_eq!(device.status, StatusCode::OK, "{id}: {}", device.body);
        let twin = hub.call(Method::GET, &format!("/twins/{id}"), None).await;
        assert_eq!(twin.status, StatusCode::OK, "{id}: {}", twin.body);
        out.push(json!({
            "id": id,
            "etag": device.body["etag"],
            "status": device.body["status"],
            "keys": device.body["authentication"]["symmetricKey"],
            "twinEtag": twin.body["etag"],
            "version": twin.body["version"],
            "desiredVersion": twin.body["properties"]["desired"]["$version"],
            "tags": twin.body["tags"],
        }));
    }
    out
}

fn seed_v1() -> Value {
    json!({
        "devices": [
            {"id": "myDeviceId", "auth": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
             "tags": {"role": "tutorial"}},
            {"id": "seed-1"},
            {"id": "seed-2", "status": "disabled", "tags": {"floor": 2},
             "desired": {"fw": "1.0", "telemetry": {"interval": 30}}},
        ]
    })
}

const IDS: [&str; 3] = ["myDeviceId", "seed-1", "seed-2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_is_applied_at_start_and_a_restart_with_it_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let file = write_seed(dir.path(), "seed.json", &seed_v1());

    let hub = TestHub::start_with(seeded(&data, &file)).await;
    let first = snapshot(&hub, &IDS).await;
    assert_eq!(first[0]["keys"]["primaryKey"], KEY_A, "the file's key");
    assert!(
        hub.running.env.device_connection_string.contains(KEY_A),
        "hub.env's device connection string carries the seeded key"
    );
    assert_eq!(first[0]["tags"], json!({"role": "tutorial"}));
    let generated = first[1]["keys"]["primaryKey"]
        .as_str()
        .expect("a generated key");
    assert!(generated.len() >= 24, "{generated}");
    assert_eq!(first[1]["status"], "enabled");
    assert_eq!(first[2]["status"], "disabled");
    assert_eq!(first[2]["tags"], json!({"floor": 2}));
    let twin = hub.call(Method::GET, "/twins/seed-2", None).await.body;
    assert_eq!(twin["properties"]["desired"]["fw"], "1.0");
    assert_eq!(twin["properties"]["desired"]["telemetry"]["interval"], 30);
    hub.running.shutdown().await;

    // The same file again: nothing is written.
    let hub = TestHub::start_with(seeded(&data, &file)).await;
    assert_eq!(
        snapshot(&hub, &IDS).await,
        first,
        "a restart with the same seed"
    );

    // Changes made while the hub runs that the file does not contradict survive a restart: a
    // tag the file does not name, a status it does not set.
    let patched = hub
        .call(
            Method::PATCH,
            "/twins/seed-2",
            Some(&json!({"tags": {"extra": true}})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    let disabled = hub
        .call_with(
            Method::PUT,
            "/devices/seed-1",
            Some(&json!({"deviceId": "seed-1", "status": "disabled"})),
            &[("If-Match", "*")],
        )
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.body);
    let before = snapshot(&hub, &IDS).await;
    hub.running.shutdown().await;
    let hub = TestHub::start_with(seeded(&data, &file)).await;
    let after = snapshot(&hub, &IDS).await;
    assert_eq!(after, before, "nothing the file declares had changed");
    assert_eq!(after[2]["tags"], json!({"floor": 2, "extra": true}));
    assert_eq!(after[1]["status"], "disabled");
    hub.running.shutdown().await;

    // A changed file changes only what it changes: seed-2's desired fw (a twin patch: a new
    // desired version, the same device etag), seed-2 enabled (a new device etag).
    let mut v2 = seed_v1();
    v2["devices"][2]["desired"]["fw"] = json!("2.0");
    v2["devices"][2]["status"] = json!("enabled");
    let file2 = write_seed(dir.path(), "seed-v2.json", &v2);
    let hub = TestHub::start_with(seeded(&data, &file2)).await;
    let changed = snapshot(&hub, &IDS).await;
    assert_eq!(changed[0], after[0], "myDeviceId is as the file says");
    assert_eq!(changed[1], after[1], "seed-1 is as the file says");
    assert_eq!(changed[2]["status"], "enabled");
    assert_ne!(changed[2]["etag"], after[2]["etag"]);
    assert_eq!(
        changed[2]["desiredVersion"].as_u64(),
        after[2]["desiredVersion"].as_u64().map(|v| v + 1)
    );
    assert_eq!(changed[2]["keys"], after[2]["keys"], "keys are kept");
    assert_eq!(changed[2]["tags"], json!({"floor": 2, "extra": true}));
    let twin = hub.call(Method::GET, "/twins/seed-2", None).await.body;
    assert_eq!(twin["properties"]["desired"]["fw"], "2.0");
    assert_eq!(twin["properties"]["desired"]["telemetry"]["interval"], 30);
    hub.running.shutdown().await;
}

#[tokio::test]
async fn a_device_the_hub_refuses_fails_the_start_and_applies_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_seed(
        dir.path(),
        "refused.json",
        &json!({"devices": [
            {"id": "fine-1"},
            {"id": "odd-1", "desired": {"bad.name": 1}},
        ]}),
    );
    let config = seeded(&dir.path().join("data"), &file);
    let error = match hub_emulator::start(config).await {
        Ok(_) => panic!("a hub started with a seed it cannot apply"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("refused.json"), "{error}");
    assert!(
        error.contains("devices[1]") && error.contains("odd-1"),
        "{error}"
    );
    assert!(error.contains("bad.name"), "{error}");
    // Nothing of the file was applied: a start without it has no fine-1.
    let hub = TestHub::start_with(Config {
        data_dir: Some(dir.path().join("data")),
        durable: true,
        ..Config::ephemeral()
    })
    .await;
    let fine = hub.call(Method::GET, "/devices/fine-1", None).await;
    assert_eq!(fine.status, StatusCode::NOT_FOUND, "{}", fine.body);
    hub.running.shutdown().await;
}

#[test]
fn the_binary_refuses_a_bad_seed_file_with_its_path_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "syntax.json",
            "{\n  \"devices\": [\n    {\"id\": \"d1\",}\n  ]\n}\n",
            &["syntax.json", "line 3", "not valid JSON"],
        ),
        (
            "top.json",
            "{\"devices\": [], \"configuration\": []}",
            &[
                "top.json",
                "unknown top-level key `configuration`",
                "configurations",
            ],
        ),
        (
            "field.json",
            "{\"devices\": [\n  {\"id\": \"d1\", \"tag\": {}}\n]}",
            &["field.json", "devices[0]", "unknown field `tag`", "line 2"],
        ),
        ("missing.json", "", &["missing.json", "not valid JSON"]),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let output = Command::new(env!("CARGO_BIN_EXE_hub-emulator"))
            .args([
                "--in-memory",
                "--mqtt-port",
                "0",
                "--https-port",
                "0",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .arg("--seed")
            .arg(&path)
            .output()
            .expect("runs hub-emulator");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        for part in expected {
            assert!(stderr.contains(part), "{name}: `{part}` not in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(
            !dir.path().join("data").exists(),
            "{name}: the data directory was made before the seed was checked"
        );
    }
    let absent = Command::new(env!("CARGO_BIN_EXE_hub-emulator"))
        .args(["--in-memory", "--seed"])
        .arg(dir.path().join("nowhere.json"))
        .output()
        .expect("runs hub-emulator");
    let stderr = String::from_utf8_lossy(&absent.stderr);
    assert_eq!(absent.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read the seed file") && stderr.contains("nowhere.json"),
        "{stderr}"
    );
}

/// A module's identity and twin as a restart must leave them.
async fn module_snapshot(hub: &TestHub, device: &str, module: &str) -> Value {
    let identity = hub
        .call(
            Method::GET,
            &format!("/devices/{device}/modules/{module}"),
            None,
        )
        .await;
    assert_eq!(identity.status, StatusCode::OK, "{}", identity.body);
    let twin = hub
        .call(
            Method::GET,
            &format!("/twins/{device}/modules/{module}"),
            None,
        )
        .await;
    assert_eq!(twin.status, StatusCode::OK, "{}", twin.body);
    json!({
        "etag": identity.body["etag"],
        "keys": identity.body["authentication"]["symmetricKey"],
        "twinEtag": twin.body["etag"],
        "version": twin.body["version"],
        "tags": twin.body["tags"],
        "desired": twin.body["properties"]["desired"]["telemetry"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_declares_modules_and_a_restart_with_it_changes_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let seed = json!({
        "devices": [{"id": "gateway-1", "modules": [
            {"id": "sensor", "auth": {"primaryKey": KEY_A}, "tags": {"kind": "sensor"},
             "desired": {"telemetry": {"interval": 10}}},
            {"id": "logger"},
        ]}]
    });
    let file = write_seed(dir.path(), "seed.json", &seed);
    let hub = TestHub::start_with(seeded(&data, &file)).await;
    let first = module_snapshot(&hub, "gateway-1", "sensor").await;
    assert_eq!(first["keys"]["primaryKey"], KEY_A);
    assert_eq!(first["tags"], json!({"kind": "sensor"}));
    assert_eq!(first["desired"]["interval"], 10);
    let logger = module_snapshot(&hub, "gateway-1", "logger").await;
    assert!(logger["keys"]["primaryKey"].is_string(), "a generated key");
    hub.running.shutdown().await;

    let hub = TestHub::start_with(seeded(&data, &file)).await;
    assert_eq!(
        module_snapshot(&hub, "gateway-1", "sensor").await,
        first,
        "unchanged"
    );
    assert_eq!(
        module_snapshot(&hub, "gateway-1", "logger").await,
        logger,
        "unchanged"
    );
    hub.running.shutdown().await;

    // Declaring a module twice for a device is refused with its path.
    let twice = json!({"devices": [{"id": "d", "modules": [{"id": "m"}, {"id": "m"}]}]});
    let error = Seed::parse(Path::new("twice.json"), &twice.to_string())
        .expect_err("refused")
        .to_string();
    assert!(error.contains("devices[0].modules[1].id"), "{error}");
}

/// Polls the twin of `id` until `done` holds (the configurations reconciler runs 50 ms after a
/// change), then returns it.
async fn twin_when(hub: &TestHub, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let twin = hub.call(Method::GET, &format!("/twins/{id}"), None).await;
        if done(&twin.body) {
            return twin.body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the twin of {id} never reached the expected state");
}

fn seed_with_configuration(priority: i64, rate: i64) -> Value {
    json!({
        "devices": [{"id": "door-7", "tags": {"building": 43}}],
        "configurations": [{
            "id": "door-settings",
            "targetCondition": "tags.building=43",
            "priority": priority,
            "labels": {"owner": "facilities"},
            "content": {"deviceContent": {"properties.desired.lock": {"rate": rate}}},
            "metrics": {"queries": {"locked": "SELECT deviceId FROM devices WHERE properties.reported.locked = true"}},
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_declares_configurations_that_reach_twins_and_restarts_keep_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let file = write_seed(dir.path(), "seed.json", &seed_with_configuration(5, 1));
    let hub = TestHub::start_with(seeded(&data, &file)).await;
    let first = hub
        .call(Method::GET, "/configurations/door-settings", None)
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["priority"], 5);
    assert_eq!(first.body["labels"], json!({"owner": "facilities"}));
    // Applied before the hub serves: the first read already sees it.
    let twin = hub.call(Method::GET, "/twins/door-7", None).await.body;
    assert_eq!(twin["properties"]["desired"]["lock"]["rate"], 1, "{twin}");
    assert_eq!(twin["configurations"]["door-settings"]["status"], "Applied");
    hub.running.shutdown().await;

    // The same file again: the configuration is not written (same etag).
    let hub = TestHub::start_with(seeded(&data, &file)).await;
    let again = hub
        .call(Method::GET, "/configurations/door-settings", None)
        .await;
    assert_eq!(again.body["etag"], first.body["etag"], "unchanged");
    assert_eq!(again.body["createdTimeUtc"], first.body["createdTimeUtc"]);
    hub.running.shutdown().await;

    // A new priority updates it in place; a new content replaces it and reaches the twin.
    write_seed(dir.path(), "seed.json", &seed_with_configuration(9, 1));
    let hub = TestHub::start_with(seeded(&data, &file)).await;
    let updated = hub
        .call(Method::GET, "/configurations/door-settings", None)
        .await;
    assert_eq!(updated.body["priority"], 9);
    assert_ne!(updated.body["etag"], first.body["etag"]);
    assert_eq!(updated.body["createdTimeUtc"], first.body["createdTimeUtc"]);
    hub.running.shutdown().await;

    write_seed(dir.path(), "seed.json", &seed_with_configuration(9, 2));
    let hub = TestHub::start_with(seeded(&data, &file)).await;
    let replaced = hub
        .call(Method::GET, "/configurations/door-settings", None)
        .await;
    assert_eq!(
        replaced.body["content"]["deviceContent"]["properties.desired.lock"]["rate"],
        2
    );
    twin_when(&hub, "door-7", |t| {
        t["properties"]["desired"]["lock"]["rate"] == 2
    })
    .await;
    hub.running.shutdown().await;
}

#[test]
fn a_seed_refuses_bad_configurations_with_their_path() {
    let error = |seed: Value| {
        Seed::parse(Path::new("seed.json"), &seed.to_string())
            .expect_err("refused")
            .to_string()
    };
    let typo = error(json!({"configurations": [{"id": "a", "targetConditon": "*"}]}));
    assert!(
        typo.contains("configurations[0].targetConditon") && typo.contains("targetCondition"),
        "{typo}"
    );
    let bad_id = error(json!({"configurations": [{"id": "Upper"}]}));
    assert!(bad_id.contains("configurations[0].id"), "{bad_id}");
    let content = json!({"deviceContent": {"properties.desired.x": 1}});
    let twice = error(json!({"configurations": [
        {"id": "a", "content": content}, {"id": "a", "content": content}]}));
    assert!(
        twice.contains("configurations[1].id") && twice.contains("configurations[0]"),
        "{twice}"
    );
    let bad_content = error(json!({"configurations": [{"id": "a",
        "content": {"deviceContent": {"tags.x": 1}}}]}));
    assert!(
        bad_content.contains("configurations[0].content"),
        "{bad_content}"
    );
}
