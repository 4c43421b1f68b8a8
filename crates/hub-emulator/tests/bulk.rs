//! The bulk registry (`POST /devices`) over real HTTPS: every import mode, per-device errors
//! beside devices that still apply, the 100-device cap and the whole-call refusals, and its
//! permission (RegistryWrite, as `PUT /devices/{id}`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Answer, TestHub, now};

const KEY_A: &str = "cHJpbWFyeS1rZXktMDEyMzQ1Njc4OQ==";
const KEY_B: &str = "c2Vjb25kYXJ5LWtleS0wMTIzNDU2Nzg5";

impl TestHub {
    async fn bulk(&self, body: Value) -> Answer {
        self.call(Method::POST, "/devices", Some(&body)).await
    }

    async fn device(&self, id: &str) -> Answer {
        self.call(Method::GET, &format!("/devices/{id}"), None)
            .await
    }

    async fn twin(&self, id: &str) -> Value {
        let answer = self.call(Method::GET, &format!("/twins/{id}"), None).await;
        assert_eq!(answer.status, StatusCode::OK, "twin {id}: {}", answer.body);
        answer.body
    }

    async fn etag(&self, id: &str) -> String {
        let answer = self.device(id).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "device {id}: {}",
            answer.body
        );
        answer.body["etag"].as_str().expect("etag").to_owned()
    }
}

/// Asserts a 200 with `{"isSuccessful": true, "errors": [], "warnings": []}`.
fn assert_all_succeeded(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.body,
        json!({"isSuccessful": true, "errors": [], "warnings": []})
    );
}

/// The `(deviceId, errorCode)` pairs of a 400 answer with per-device errors.
fn failures(answer: &Answer) -> Vec<(String, String)> {
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert_eq!(answer.body["isSuccessful"], false, "{}", answer.body);
    answer.body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            assert!(
                e["errorStatus"].as_str().is_some_and(|s| !s.is_empty()),
                "every error says what went wrong: {e}"
            );
            (
                e["deviceId"].as_str().unwrap_or_default().to_owned(),
                e["errorCode"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Asserts IoT Hub's classic error body for a refused call, and returns its message.
fn assert_refused(answer: &Answer, status: StatusCode, code: &str) -> String {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(
        answer.header("iothub-errorcode"),
        Some(code),
        "{}",
        answer.body
    );
    let message = answer.body["Message"].as_str().expect("Message").to_owned();
    assert!(
        message.starts_with(&format!("ErrorCode:{code};")),
        "{message}"
    );
    message
}

#[tokio::test]
async fn every_import_mode_creates_updates_and_deletes_as_put_and_delete_do() {
    let hub = TestHub::start().await;
    // create: one with its keys, one with generated keys and a twin, one disabled.
    let created = hub
        .bulk(json!([
            {"id": "b1", "importMode": "create",
             "authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B}}},
            {"id": "b2", "importMode": "create", "tags": {"floor": 3},
             "properties": {"desired": {"fw": "1.0"}}},
            {"id": "b3", "importMode": "create", "status": "disabled"},
        ]))
        .await;
    assert_all_succeeded(&created);
    let b1 = hub.device("b1").await.body;
    assert_eq!(b1["authentication"]["symmetricKey"]["primaryKey"], KEY_A);
    assert_eq!(b1["status"], "enabled");
    let b2 = hub.device("b2").await.body;
    let generated = b2["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("a generated key");
    assert!(!generated.is_empty() && generated != KEY_A);
    let twin = hub.twin("b2").await;
    assert_eq!(twin["tags"], json!({"floor": 3}));
    assert_eq!(twin["properties"]["desired"]["fw"], "1.0");
    assert_eq!(hub.device("b3").await.body["status"], "disabled");

    // update (any etag) and updateIfMatchETag (the current one); keys stay when none are sent.
    let b2_etag = hub.etag("b2").await;
    let updated = hub
        .bulk(json!([
            {"id": "b1", "importMode": "update", "status": "disabled"},
            {"id": "b2", "importMode": "updateIfMatchETag", "eTag": b2_etag, "status": "disabled"},
        ]))
        .await;
    assert_all_succeeded(&updated);
    let b1_after = hub.device("b1").await.body;
    assert_eq!(b1_after["status"], "disabled");
    assert_eq!(
        b1_after["authentication"]["symmetricKey"]["primaryKey"],
        KEY_A
    );
    assert_ne!(b1_after["etag"], b1["etag"], "an update moves the etag");
    let b2_after = hub.device("b2").await.body;
    assert_eq!(b2_after["status"], "disabled");
    assert_eq!(
        b2_after["authentication"]["symmetricKey"]["primaryKey"], generated,
        "the generated key is kept"
    );

    // createOrUpdate creates a new device and overwrites an existing one; the IfMatchETag
    // variant checks the etag of an existing one only.
    let b3_etag = hub.etag("b3").await;
    let upserted = hub
        .bulk(json!([
            {"id": "b4", "importMode": "createOrUpdate"},
            {"id": "b1", "importMode": "createOrUpdate", "status": "enabled"},
            {"id": "b5", "importMode": "createOrUpdateIfMatchETag"},
            {"id": "b3", "importMode": "createOrUpdateIfMatchETag", "eTag": b3_etag, "status": "enabled"},
        ]))
        .await;
    assert_all_succeeded(&upserted);
    assert_eq!(hub.device("b4").await.status, StatusCode::OK);
    assert_eq!(hub.device("b5").await.status, StatusCode::OK);
    assert_eq!(hub.device("b1").await.body["status"], "enabled");
    assert_eq!(hub.device("b3").await.body["status"], "enabled");

    // updateTwin merges tags and desired properties into an existing twin.
    let twin_etag = hub.twin("b2").await["etag"]
        .as_str()
        .expect("etag")
        .to_owned();
    let twinned = hub
        .bulk(json!([
            {"id": "b2", "importMode": "updateTwinIfMatchETag", "twinETag": twin_etag,
             "tags": {"room": "12"}, "properties": {"desired": {"fw": "2.0"}}},
        ]))
        .await;
    assert_all_succeeded(&twinned);
    let twin = hub.twin("b2").await;
    assert_eq!(twin["tags"], json!({"floor": 3, "room": "12"}));
    assert_eq!(twin["properties"]["desired"]["fw"], "2.0");

    // delete (any etag) and deleteIfMatchETag; the Node SDK capitalises these modes.
    let b4_etag = hub.etag("b4").await;
    let deleted = hub
        .bulk(json!([
            {"id": "b1", "importMode": "delete"},
            {"id": "b4", "importMode": "DeleteIfMatchETag", "eTag": b4_etag},
            {"id": "b5", "importMode": "Delete"},
        ]))
        .await;
    assert_all_succeeded(&deleted);
    for id in ["b1", "b4", "b5"] {
        assert_eq!(hub.device(id).await.status, StatusCode::NOT_FOUND, "{id}");
    }
    assert_eq!(hub.device("b2").await.status, StatusCode::OK);
    hub.running.shutdown().await;
}

#[tokio::test]
async fn failed_devices_are_reported_with_400_and_the_others_still_apply() {
    let hub = TestHub::start().await;
    assert_all_succeeded(
        &hub.bulk(json!([{"id": "x1", "importMode": "create"}]))
            .await,
    );
    let x1_etag = hub.etag("x1").await;
    let answer = hub
        .bulk(json!([
            {"id": "x1", "importMode": "create"},
            {"id": "new1", "importMode": "create"},
            {"id": "x1", "importMode": "updateIfMatchETag", "eTag": "bm9wZQ==", "status": "disabled"}
        ]))
        .await;
    // The duplicate id refuses the whole call first: nothing of it applies.
    assert_refused(
        &answer,
        StatusCode::BAD_REQUEST,
        "DeviceDefinedMultipleTimes",
    );
    assert_eq!(hub.device("new1").await.status, StatusCode::NOT_FOUND);

    let answer = hub
        .bulk(json!([
            {"id": "x1", "importMode": "create"},
            {"id": "new1", "importMode": "create"},
            {"id": "missing1", "importMode": "delete"},
            {"id": "missing2", "importMode": "update"},
            {"id": "myDeviceId", "importMode": "updateIfMatchETag", "eTag": "bm9wZQ==", "status": "disabled"},
            {"id": "new2", "importMode": "create", "status": "paused"},
            {"id": "new3", "importMode": "create", "authentication": {"symmetricKey": {"primaryKey": "c2hvcnQ="}}},
            {"id": "bad id!", "importMode": "create"},
            {"id": "myDeviceId", "importMode": "deleteIfMatchETag"},
        ]))
        .await;
    // new2's status is not a status at all: the call's JSON is refused as a whole.
    let message = assert_refused(&answer, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    assert!(message.contains("device [5]"), "{message}");

    let answer = hub
        .bulk(json!([
            {"id": "x1", "importMode": "create"},
            {"id": "new1", "importMode": "create"},
            {"id": "missing1", "importMode": "delete"},
            {"id": "missing2", "importMode": "update"},
            {"id": "myDeviceId", "importMode": "updateIfMatchETag", "eTag": "bm9wZQ==", "status": "disabled"},
            {"id": "new3", "importMode": "create", "authentication": {"symmetricKey": {"primaryKey": "c2hvcnQ="}}},
            {"id": "bad id!", "importMode": "create"},
            {"id": "new4", "importMode": "deleteIfMatchETag"},
            {"id": "new5", "importMode": "create"},
        ]))
        .await;
    assert_eq!(
        failures(&answer),
        [
            ("x1".into(), "DeviceAlreadyExists".into()),
            ("missing1".into(), "DeviceNotFound".into()),
            ("missing2".into(), "DeviceNotFound".into()),
            ("myDeviceId".into(), "PreconditionFailed".into()),
            ("new3".into(), "ArgumentInvalid".into()),
            ("bad id!".into(), "ArgumentInvalid".into()),
            ("new4".into(), "DeviceNotFound".into()),
        ]
    );
    let errors = answer.body["errors"].as_array().expect("errors");
    assert!(
        errors[4]["errorStatus"]
            .as_str()
            .is_some_and(|s| s.contains("primaryKey")),
        "the key's problem is named: {}",
        errors[4]
    );
    // The devices that succeeded are there; the failed ones changed nothing.
    assert_eq!(hub.device("new1").await.status, StatusCode::OK);
    assert_eq!(hub.device("new5").await.status, StatusCode::OK);
    assert_eq!(hub.etag("x1").await, x1_etag);
    assert_eq!(hub.device("myDeviceId").await.body["status"], "enabled");
    assert_eq!(hub.device("new3").await.status, StatusCode::NOT_FOUND);

    // An IfMatchETag mode without an eTag says which one it needs.
    let answer = hub
        .bulk(json!([{"id": "x1", "importMode": "deleteIfMatchETag"}]))
        .await;
    assert_eq!(failures(&answer), [("x1".into(), "ArgumentInvalid".into())]);
    assert!(
        answer.body["errors"][0]["errorStatus"]
            .as_str()
            .is_some_and(|s| s.contains("eTag")),
        "{}",
        answer.body
    );
    assert_eq!(hub.device("x1").await.status, StatusCode::OK);
    hub.running.shutdown().await;
}

#[tokio::test]
async fn at_most_100_devices_per_call_and_malformed_calls_are_refused_whole() {
    let hub = TestHub::start().await;
    let devices = |n: usize, prefix: &str| {
        Value::Array(
            (0..n)
                .map(|i| json!({"id": format!("{prefix}{i}"), "importMode": "create"}))
                .collect(),
        )
    };
    let too_many = hub.bulk(devices(101, "over")).await;
    let message = assert_refused(&too_many, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    assert!(message.contains("at most 100"), "{message}");
    assert!(message.contains("101"), "{message}");
    assert_eq!(hub.device("over0").await.status, StatusCode::NOT_FOUND);

    assert_all_succeeded(&hub.bulk(devices(100, "cap")).await);
    assert_eq!(hub.device("cap0").await.status, StatusCode::OK);
    assert_eq!(hub.device("cap99").await.status, StatusCode::OK);

    let empty = hub.bulk(json!([])).await;
    assert_refused(&empty, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let object = hub.bulk(json!({"id": "d1", "importMode": "create"})).await;
    let message = assert_refused(&object, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    assert!(message.contains("JSON array"), "{message}");
    let mode = hub
        .bulk(json!([{"id": "d1", "importMode": "upsert"}]))
        .await;
    let message = assert_refused(&mode, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    assert!(
        message.contains("device [0]") && message.contains("upsert"),
        "{message}"
    );
    let no_id = hub.bulk(json!([{"importMode": "create"}])).await;
    assert_refused(&no_id, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    hub.running.shutdown().await;
}

#[tokio::test]
async fn the_bulk_registry_needs_registry_write() {
    let hub = TestHub::start().await;
    let body = json!([{"id": "p1", "importMode": "create"}]);
    for policy in ["registryRead", "service"] {
        let token = hub.policy_token(policy, now() + 600);
        let answer = hub
            .call_as(Some(&token), Method::POST, "/devices", Some(&body), &[])
            .await;
        let message = assert_refused(
            &answer,
            StatusCode::UNAUTHORIZED,
            "IotHubUnauthorizedAccess",
        );
        assert!(message.contains("RegistryWrite"), "{policy}: {message}");
    }
    let anonymous = hub
        .call_as(None, Method::POST, "/devices", Some(&body), &[])
        .await;
    assert_refused(
        &anonymous,
        StatusCode::UNAUTHORIZED,
        "IotHubUnauthorizedAccess",
    );
    assert_eq!(hub.device("p1").await.status, StatusCode::NOT_FOUND);
    let token = hub.policy_token("registryReadWrite", now() + 600);
    let answer = hub
        .call_as(Some(&token), Method::POST, "/devices", Some(&body), &[])
        .await;
    assert_all_succeeded(&answer);
    assert_eq!(hub.device("p1").await.status, StatusCode::OK);
    hub.running.shutdown().await;
}
