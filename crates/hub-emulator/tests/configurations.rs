//! Automatic device configurations end to end: content applied to the twins that match now and
//! to those that come to match later, taken back when they stop matching, priorities, metrics,
//! IoT Hub's refusals and configurations kept across a restart, against the real hub on
//! 127.0.0.1:0 with real TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use hub_core::tier::Tier;
use hub_emulator::Config;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Answer, TestHub};
use tokio::time::Instant;

/// Upper bound for anything a test waits for (the reconciler settles within 50 ms).
const WAIT: Duration = Duration::from_secs(10);

fn ok(answer: Answer, what: &str) -> Value {
    assert_eq!(answer.status, StatusCode::OK, "{what}: {}", answer.body);
    answer.body
}

fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "body: {}", answer.body);
    assert_eq!(
        answer.header("iothub-errorcode"),
        Some(code),
        "body: {}",
        answer.body
    );
}

async fn add_device(hub: &TestHub, id: &str, tags: Value) {
    ok(
        hub.call(
            Method::PUT,
            &format!("/devices/{id}"),
            Some(&json!({"deviceId": id})),
        )
        .await,
        "create device",
    );
    ok(
        hub.call(
            Method::PATCH,
            &format!("/twins/{id}"),
            Some(&json!({"tags": tags})),
        )
        .await,
        "tag device",
    );
}

async fn create(hub: &TestHub, id: &str, condition: &str, priority: i64, fw: Value) -> Value {
    ok(
        hub.call(
            Method::PUT,
            &format!("/configurations/{id}"),
            Some(&json!({
                "id": id,
                "content": {"deviceContent": {"properties.desired.fw": fw}},
                "targetCondition": condition,
                "priority": priority,
                "metrics": {"queries": {"fwOk": "SELECT deviceId FROM devices WHERE properties.reported.fw.v = 2"}},
            })),
        )
        .await,
        "create configuration",
    )
}

/// Polls `GET /twins/{id}` until `done` holds, returning that twin; panics after [`WAIT`].
async fn twin_until(hub: &TestHub, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let twin = ok(
            hub.call(Method::GET, &format!("/twins/{id}"), None).await,
            "twin",
        );
        if done(&twin) {
            return twin;
        }
        assert!(Instant::now() < deadline, "{what}: twin is {twin}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn content_reaches_twins_that_match_now_and_later_and_leaves_those_that_stop() {
    let hub = TestHub::start().await;
    add_device(&hub, "a", json!({"env": "prod"})).await;
    add_device(&hub, "other", json!({"env": "dev"})).await;
    create(&hub, "fw2", "tags.env='prod'", 0, json!({"v": 2})).await;

    let twin = twin_until(&hub, "a", "applied to a", |t| {
        t["properties"]["desired"]["fw"]["v"] == 2
    })
    .await;
    assert_eq!(twin["configurations"]["fw2"]["status"], "Applied");

    // A device created later, and one whose tags change, come to match.
    add_device(&hub, "b", json!({"env": "prod"})).await;
    twin_until(&hub, "b", "applied to new b", |t| {
        t["properties"]["desired"]["fw"]["v"] == 2
    })
    .await;
    ok(
        hub.call(
            Method::PATCH,
            "/twins/other",
            Some(&json!({"tags": {"env": "prod"}})),
        )
        .await,
        "retag",
    );
    twin_until(&hub, "other", "applied to retagged", |t| {
        t["properties"]["desired"]["fw"]["v"] == 2
    })
    .await;

    let doc = ok(
        hub.call(Method::GET, "/configurations/fw2", None).await,
        "get",
    );
    assert_eq!(doc["systemMetrics"]["results"]["targetedCount"], 3, "{doc}");
    assert_eq!(doc["systemMetrics"]["results"]["appliedCount"], 3, "{doc}");
    assert_eq!(doc["metrics"]["results"]["fwOk"], 0, "{doc}");

    // Stops matching: the configuration's settings are taken back.
    ok(
        hub.call(
            Method::PATCH,
            "/twins/b",
            Some(&json!({"tags": {"env": "dev"}})),
        )
        .await,
        "untag",
    );
    let twin = twin_until(&hub, "b", "removed from b", |t| {
        t["properties"]["desired"].get("fw").is_none()
    })
    .await;
    assert!(
        twin["configurations"].get("fw2").is_none(),
        "no status once it stops matching: {twin}"
    );
    let list = ok(hub.call(Method::GET, "/configurations", None).await, "list");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["systemMetrics"]["results"]["targetedCount"], 2);
}

#[tokio::test]
async fn the_highest_priority_wins_and_deleting_it_hands_over_to_the_next() {
    let hub = TestHub::start().await;
    add_device(&hub, "d", json!({"env": "prod"})).await;
    create(&hub, "low", "tags.env='prod'", 5, json!({"v": 1})).await;
    create(&hub, "high", "tags.env='prod'", 10, json!({"v": 3})).await;
    let twin = twin_until(&hub, "d", "high wins", |t| {
        t["properties"]["desired"]["fw"]["v"] == 3
    })
    .await;
    assert_eq!(twin["configurations"]["high"]["status"], "Applied");
    assert_eq!(twin["configurations"]["low"]["status"], "Targeted");

    let deleted = hub.call(Method::DELETE, "/configurations/high", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    let twin = twin_until(&hub, "d", "low takes over", |t| {
        t["properties"]["desired"]["fw"]["v"] == 1
    })
    .await;
    assert_eq!(twin["configurations"]["low"]["status"], "Applied");
}

/// Replacing a configuration's content is a delete and a create under the same id (IoT Hub
/// refuses a content change): the new content must reach the twins, even when the create comes
/// before the reconciler's next pass.
#[tokio::test]
async fn a_configuration_deleted_and_created_again_at_once_applies_its_new_content() {
    let hub = TestHub::start().await;
    add_device(&hub, "d", json!({"env": "prod"})).await;
    create(&hub, "fw", "tags.env='prod'", 1, json!({"v": 1})).await;
    twin_until(&hub, "d", "first content", |t| {
        t["properties"]["desired"]["fw"]["v"] == 1
    })
    .await;
    let deleted = hub.call(Method::DELETE, "/configurations/fw", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    create(&hub, "fw", "tags.env='prod'", 1, json!({"v": 2})).await;
    let twin = twin_until(&hub, "d", "the new content", |t| {
        t["properties"]["desired"]["fw"]["v"] == 2
    })
    .await;
    assert_eq!(twin["configurations"]["fw"]["status"], "Applied");
}

#[tokio::test]
async fn refusals_are_iot_hubs() {
    let hub = TestHub::start().await;
    let saved = create(&hub, "c1", "tags.env='prod'", 0, json!({"v": 1})).await;
    let etag = saved["etag"].as_str().expect("etag").to_owned();

    let again = hub
        .call(
            Method::PUT,
            "/configurations/c1",
            Some(&json!({"id": "c1", "content": {"deviceContent": {"properties.desired.x": 1}}})),
        )
        .await;
    assert_error(&again, StatusCode::CONFLICT, "ConfigurationAlreadyExists");
    assert_error(
        &hub.call(Method::GET, "/configurations/nope", None).await,
        StatusCode::NOT_FOUND,
        "ConfigurationNotFound",
    );
    let stale = hub
        .call_with(
            Method::PUT,
            "/configurations/c1",
            Some(&json!({"id": "c1", "targetCondition": "*", "priority": 2})),
            &[("If-Match", "\"stale\"")],
        )
        .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.body
    );
    let quoted = format!("\"{etag}\"");
    let changed = hub
        .call_with(
            Method::PUT,
            "/configurations/c1",
            Some(&json!({"id": "c1", "content": {"deviceContent": {"properties.desired.fw": {"v": 9}}}})),
            &[("If-Match", quoted.as_str())],
        )
        .await;
    assert_error(
        &changed,
        StatusCode::BAD_REQUEST,
        "CannotModifyImmutableConfigurationContent",
    );
    let updated = ok(
        hub.call_with(
            Method::PUT,
            "/configurations/c1",
            Some(&json!({"id": "c1", "targetCondition": "tags.env='dev'", "priority": 7})),
            &[("If-Match", quoted.as_str())],
        )
        .await,
        "update",
    );
    assert_eq!(updated["priority"], 7);
    assert_ne!(updated["etag"], saved["etag"]);
    assert_eq!(updated["content"], saved["content"], "content kept");

    let bad = hub
        .call(
            Method::POST,
            "/configurations/testQueries",
            Some(&json!({"targetCondition": "tags.env = ", "customMetricQueries": {"m": "SELECT deviceId FROM devices"}})),
        )
        .await;
    let bad = ok(bad, "testQueries");
    assert_ne!(bad["targetConditionError"], "", "{bad}");
    assert!(bad["customMetricQueryErrors"].get("m").is_none(), "{bad}");
}

#[tokio::test]
async fn an_f1_hub_holds_ten_configurations() {
    let hub = TestHub::start_with(Config {
        tier: Some(Tier::F1.with_units(1).expect("F1")),
        ..Config::ephemeral()
    })
    .await;
    for n in 0..10 {
        create(&hub, &format!("c{n}"), "*", 0, json!({"v": n})).await;
    }
    let eleventh = hub
        .call(
            Method::PUT,
            "/configurations/c10",
            Some(&json!({"id": "c10", "content": {"deviceContent": {"properties.desired.x": 1}}})),
        )
        .await;
    assert_error(
        &eleventh,
        StatusCode::PAYLOAD_TOO_LARGE,
        "ConfigurationCountLimitExceeded",
    );
}

#[tokio::test]
async fn configurations_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || Config {
        data_dir: Some(dir.path().to_path_buf()),
        durable: true,
        ..Config::ephemeral()
    };
    let saved = {
        let hub = TestHub::start_with(config()).await;
        add_device(&hub, "k", json!({"env": "prod"})).await;
        let saved = create(&hub, "keep", "tags.env='prod'", 3, json!({"v": 4})).await;
        twin_until(&hub, "k", "applied", |t| {
            t["properties"]["desired"]["fw"]["v"] == 4
        })
        .await;
        hub.running.shutdown().await;
        saved
    };
    let hub = TestHub::start_with(config()).await;
    let again = ok(
        hub.call(Method::GET, "/configurations/keep", None).await,
        "after restart",
    );
    for field in [
        "etag",
        "content",
        "targetCondition",
        "priority",
        "createdTimeUtc",
    ] {
        assert_eq!(again[field], saved[field], "{field}");
    }
    let twin = twin_until(&hub, "k", "status kept", |t| {
        t["configurations"]["keep"]["status"] == "Applied"
    })
    .await;
    assert_eq!(twin["properties"]["desired"]["fw"]["v"], 4);
}
