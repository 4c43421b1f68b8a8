//! The service REST API end to end: a real hub on 127.0.0.1:0, real HTTPS (trusting the hub's
//! generated CA), SAS tokens made with hub_core::sas from the hub's connection string.
//! Method round trips with a connected device are covered by the MQTT and conformance tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

mod support;

use hub_core::connection_string::SharedKey;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Answer, TestHub, now};

impl Answer {
    /// Asserts the classic IoT Hub error form: `ErrorCode:<code>;...` plus the header.
    fn assert_error(&self, status: StatusCode, code: &str) {
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
        let exception = self.body["ExceptionMessage"]
            .as_str()
            .expect("ExceptionMessage");
        assert!(
            exception.starts_with("Tracking ID:") && exception.contains("-TimeStamp:"),
            "{exception}"
        );
    }
}

impl TestHub {
    async fn create(&self, id: &str) -> Answer {
        let answer = self
            .call_with(
                Method::PUT,
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
                &[],
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "create {id}: {}",
            answer.body
        );
        answer
    }

    async fn query(
        &self,
        text: &str,
        page_size: Option<&str>,
        continuation: Option<&str>,
    ) -> Answer {
        let mut extra = Vec::new();
        if let Some(size) = page_size {
            extra.push(("x-ms-max-item-count", size));
        }
        if let Some(token) = continuation {
            extra.push(("x-ms-continuation", token));
        }
        self.call_with(
            Method::POST,
            "/devices/query",
            Some(&json!({"query": text})),
            &extra,
        )
        .await
    }
}

#[tokio::test]
async fn device_create_get_update_delete_follow_etags() {
    let hub = TestHub::start().await;

    let created = hub.create("dev-a").await;
    let etag = created.body["etag"].as_str().expect("etag").to_owned();
    assert_eq!(created.header("etag"), Some(format!("\"{etag}\"").as_str()));
    assert_eq!(created.body["status"], "enabled");
    assert!(
        created.body["authentication"]["symmetricKey"]["primaryKey"].is_string(),
        "keys are generated"
    );

    let again = hub
        .call_with(
            Method::PUT,
            "/devices/dev-a",
            Some(&json!({"deviceId": "dev-a"})),
            &[],
        )
        .await;
    again.assert_error(StatusCode::CONFLICT, "DeviceAlreadyExists");

    let stale = hub
        .call_with(
            Method::PUT,
            "/devices/dev-a",
            Some(&json!({"deviceId": "dev-a", "status": "disabled"})),
            &[("If-Match", "\"bm9wZQ==\"")],
        )
        .await;
    stale.assert_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");

    let quoted = format!("\"{etag}\"");
    let updated = hub
        .call_with(
            Method::PUT,
            "/devices/dev-a",
            Some(&json!({"deviceId": "dev-a", "status": "disabled"})),
            &[("If-Match", &quoted)],
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["status"], "disabled");
    assert_ne!(updated.body["etag"], etag.as_str());

    let got = hub
        .call_with(Method::GET, "/devices/dev-a", None, &[])
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["deviceId"], "dev-a");
    assert_eq!(got.body["status"], "disabled");

    let listed = hub
        .call_with(Method::GET, "/devices?top=1", None, &[])
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body.as_array().map(Vec::len), Some(1));
    let all = hub.call_with(Method::GET, "/devices", None, &[]).await;
    assert_eq!(
        all.body.as_array().map(Vec::len),
        Some(2),
        "dev-a and the tutorial device"
    );

    let stats = hub
        .call_with(Method::GET, "/statistics/devices", None, &[])
        .await;
    assert_eq!(
        stats.body,
        json!({"totalDeviceCount": 2, "enabledDeviceCount": 1, "disabledDeviceCount": 1})
    );
    let service = hub
        .call_with(Method::GET, "/statistics/service", None, &[])
        .await;
    assert_eq!(service.body, json!({"connectedDeviceCount": 0}));

    let stale_delete = hub
        .call_with(
            Method::DELETE,
            "/devices/dev-a",
            None,
            &[("If-Match", &quoted)],
        )
        .await;
    stale_delete.assert_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let deleted = hub
        .call_with(
            Method::DELETE,
            "/devices/dev-a",
            None,
            &[("If-Match", "\"*\"")],
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(deleted.body, Value::Null);

    let gone = hub
        .call_with(Method::GET, "/devices/dev-a", None, &[])
        .await;
    gone.assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
    let gone = hub
        .call_with(Method::DELETE, "/devices/dev-a", None, &[])
        .await;
    gone.assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
}

#[tokio::test]
async fn routes_work_without_api_version() {
    let hub = TestHub::start().await;
    let response = hub
        .client
        .get(format!("{}/devices/myDeviceId", hub.base))
        .header("Authorization", &hub.owner)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn registry_read_policy_cannot_write() {
    let hub = TestHub::start().await;
    let token = hub.policy_token("registryRead", now() + 600);
    let read = hub
        .call_as(Some(&token), Method::GET, "/devices/myDeviceId", None, &[])
        .await;
    assert_eq!(read.status, StatusCode::OK);
    let write = hub
        .call_as(
            Some(&token),
            Method::PUT,
            "/devices/dev-b",
            Some(&json!({"deviceId": "dev-b"})),
            &[],
        )
        .await;
    write.assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
    let delete = hub
        .call_as(
            Some(&token),
            Method::DELETE,
            "/devices/myDeviceId",
            None,
            &[],
        )
        .await;
    delete.assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
    let twin = hub
        .call_as(Some(&token), Method::GET, "/twins/myDeviceId", None, &[])
        .await;
    twin.assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");

    // `service` has ServiceConnect only: twins yes, registry no.
    let service = hub.policy_token("service", now() + 600);
    let twin = hub
        .call_as(Some(&service), Method::GET, "/twins/myDeviceId", None, &[])
        .await;
    assert_eq!(twin.status, StatusCode::OK);
    let device = hub
        .call_as(
            Some(&service),
            Method::GET,
            "/devices/myDeviceId",
            None,
            &[],
        )
        .await;
    device.assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
}

#[tokio::test]
async fn device_key_token_is_refused() {
    let hub = TestHub::start().await;
    let key = hub
        .running
        .hub()
        .device_primary_key("myDeviceId")
        .expect("device key");
    let key = SharedKey::from_base64(&key).expect("key");
    let token = hub_core::sas::generate(
        &format!("{}/devices/myDeviceId", hub.host),
        &key,
        None,
        now() + 600,
    );
    let answer = hub
        .call_as(Some(&token), Method::GET, "/twins/myDeviceId", None, &[])
        .await;
    answer.assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
}

#[tokio::test]
async fn expired_missing_and_forged_tokens_are_refused() {
    let hub = TestHub::start().await;
    let expired = hub.policy_token("iothubowner", now() - 3600);
    hub.call_as(
        Some(&expired),
        Method::GET,
        "/devices/myDeviceId",
        None,
        &[],
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
    hub.call_as(None, Method::GET, "/devices/myDeviceId", None, &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
    let forged = hub_core::sas::generate(
        &hub.host,
        &SharedKey::from_bytes(vec![7u8; 32]),
        Some("iothubowner"),
        now() + 600,
    );
    hub.call_as(Some(&forged), Method::GET, "/devices/myDeviceId", None, &[])
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
    hub.call_as(
        Some("Bearer abc"),
        Method::GET,
        "/devices/myDeviceId",
        None,
        &[],
    )
    .await
    .assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
}

#[tokio::test]
async fn twin_patch_and_replace_honour_if_match() {
    let hub = TestHub::start().await;
    let twin = hub
        .call_with(Method::GET, "/twins/myDeviceId", None, &[])
        .await;
    assert_eq!(twin.status, StatusCode::OK);
    let etag = twin.body["etag"].as_str().expect("etag").to_owned();
    assert_eq!(twin.header("etag"), Some(format!("\"{etag}\"").as_str()));
    let desired_version = twin.body["properties"]["desired"]["$version"]
        .as_u64()
        .expect("$version");

    let quoted = format!("\"{etag}\"");
    let patch =
        json!({"tags": {"building": "43"}, "properties": {"desired": {"telemetryInterval": 20}}});
    let patched = hub
        .call_with(
            Method::PATCH,
            "/twins/myDeviceId",
            Some(&patch),
            &[("If-Match", &quoted)],
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.body["tags"]["building"], "43");
    assert_eq!(
        patched.body["properties"]["desired"]["telemetryInterval"],
        20
    );
    assert_eq!(
        patched.body["properties"]["desired"]["$version"],
        desired_version + 1
    );
    let new_etag = patched.body["etag"].as_str().expect("etag").to_owned();
    assert_ne!(new_etag, etag);
    assert_eq!(
        patched.header("etag"),
        Some(format!("\"{new_etag}\"").as_str())
    );

    let stale = hub
        .call_with(
            Method::PATCH,
            "/twins/myDeviceId",
            Some(&json!({"tags": {"x": 1}})),
            &[("If-Match", &quoted)],
        )
        .await;
    stale.assert_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");

    let merged = hub
        .call_with(
            Method::PATCH,
            "/twins/myDeviceId",
            Some(&json!({"properties": {"desired": {"mode": "eco"}}})),
            &[("If-Match", "*")],
        )
        .await;
    assert_eq!(merged.status, StatusCode::OK);
    assert_eq!(
        merged.body["properties"]["desired"]["telemetryInterval"], 20,
        "a patch merges"
    );
    assert_eq!(
        merged.body["properties"]["desired"]["$version"],
        desired_version + 2
    );

    let replacement = json!({"tags": {"floor": 2}, "properties": {"desired": {"mode": "off"}}});
    let replaced = hub
        .call_with(
            Method::PUT,
            "/twins/myDeviceId",
            Some(&replacement),
            &[("If-Match", "\"*\"")],
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.body);
    assert_eq!(
        replaced.body["tags"],
        json!({"floor": 2}),
        "a replace drops old tags"
    );
    assert_eq!(replaced.body["properties"]["desired"]["mode"], "off");
    assert!(
        replaced.body["properties"]["desired"]
            .get("telemetryInterval")
            .is_none()
    );
    assert_eq!(
        replaced.body["properties"]["desired"]["$version"],
        desired_version + 3
    );

    let reported = hub
        .call_with(
            Method::PATCH,
            "/twins/myDeviceId",
            Some(&json!({"properties": {"reported": {"x": 1}}})),
            &[],
        )
        .await;
    reported.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let missing = hub.call_with(Method::GET, "/twins/nobody", None, &[]).await;
    missing.assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
}

#[tokio::test]
async fn method_to_offline_device_is_404103_after_connect_timeout() {
    let hub = TestHub::start().await;
    let started = Instant::now();
    let answer = hub
        .call_with(
            Method::POST,
            "/twins/myDeviceId/methods",
            Some(&json!({"methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 1})),
            &[],
        )
        .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for the connect timeout"
    );
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.body);
    assert_eq!(answer.header("iothub-errorcode"), Some("DeviceNotOnline"));
    assert_eq!(answer.body["ExceptionMessage"], "");
    let inner: Value = serde_json::from_str(answer.body["Message"].as_str().expect("Message"))
        .expect("JSON in Message");
    assert_eq!(inner["errorCode"], 404103);
    assert_eq!(inner["message"], "Timed out waiting for device to connect.");
    assert_eq!(inner["info"]["timeout"], "00:00:01");
    assert!(inner["trackingId"].is_string() && inner["timestampUtc"].is_string());

    let unknown = hub
        .call_with(
            Method::POST,
            "/twins/nobody/methods",
            Some(&json!({"methodName": "reboot"})),
            &[],
        )
        .await;
    unknown.assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
    let bad = hub
        .call_with(
            Method::POST,
            "/twins/myDeviceId/methods",
            Some(&json!({"methodName": "x", "responseTimeoutInSeconds": 1})),
            &[],
        )
        .await;
    bad.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let big = json!({"methodName": "x", "payload": "y".repeat(130 * 1024)});
    let too_large = hub
        .call_with(Method::POST, "/twins/myDeviceId/methods", Some(&big), &[])
        .await;
    too_large.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "MessageTooLarge");
    let huge = json!({"methodName": "x", "payload": "y".repeat(512 * 1024)});
    let too_large = hub
        .call_with(Method::POST, "/twins/myDeviceId/methods", Some(&huge), &[])
        .await;
    too_large.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "MessageTooLarge");
}

#[tokio::test]
async fn query_pages_are_stable_while_devices_are_added() {
    let hub = TestHub::start().await;
    for i in 1..=5 {
        hub.create(&format!("dev-{i}")).await;
    }
    let existing: HashSet<String> = ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "myDeviceId"]
        .into_iter()
        .map(String::from)
        .collect();

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = hub
            .query("SELECT * FROM devices", Some("2"), token.as_deref())
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        assert_eq!(page.header("x-ms-item-type"), Some("Twin"));
        let rows = page.body.as_array().expect("array");
        assert!(rows.len() <= 2, "page size honoured");
        seen.extend(
            rows.iter()
                .map(|r| r["deviceId"].as_str().expect("deviceId").to_owned()),
        );
        pages += 1;
        if pages == 1 {
            // One device sorts after the cursor (must appear), one before it (already passed).
            hub.create("dev-9").await;
            hub.create("dev-0").await;
        }
        match page.header("x-ms-continuation") {
            Some(next) => {
                assert!(!next.is_empty(), "never an empty continuation");
                assert!(!rows.is_empty());
                token = Some(next.to_owned());
            }
            None => break,
        }
        assert!(pages < 10, "paging terminates");
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no device twice: {seen:?}");
    assert!(existing.is_subset(&unique), "none skipped: {seen:?}");
    assert!(
        unique.contains("dev-9"),
        "a device added ahead of the cursor appears: {seen:?}"
    );
    assert_eq!(pages, 4, "7 rows in pages of 2: {seen:?}");

    // The default page holds everything here; TOP limits across pages.
    let all = hub.query("SELECT * FROM devices", None, None).await;
    assert_eq!(all.body.as_array().map(Vec::len), Some(8));
    assert!(all.header("x-ms-continuation").is_none());
    let first = hub
        .query("SELECT TOP 3 * FROM devices", Some("2"), None)
        .await;
    let next = first.header("x-ms-continuation").expect("more").to_owned();
    let second = hub
        .query("SELECT TOP 3 * FROM devices", Some("2"), Some(&next))
        .await;
    assert_eq!(second.body.as_array().map(Vec::len), Some(1));
    assert!(second.header("x-ms-continuation").is_none());
}

#[tokio::test]
async fn query_item_types_and_results() {
    let hub = TestHub::start().await;
    hub.call_with(
        Method::PATCH,
        "/twins/myDeviceId",
        Some(&json!({"tags": {"building": "43"}})),
        &[],
    )
    .await;
    hub.create("dev-1").await;

    let twins = hub
        .query(
            "SELECT * FROM devices WHERE tags.building = '43'",
            None,
            None,
        )
        .await;
    assert_eq!(twins.status, StatusCode::OK, "{}", twins.body);
    assert_eq!(twins.header("x-ms-item-type"), Some("Twin"));
    assert_eq!(twins.body.as_array().map(Vec::len), Some(1));
    assert_eq!(twins.body[0]["deviceId"], "myDeviceId");

    let count = hub
        .query("SELECT COUNT() AS n FROM devices", Some("1"), None)
        .await;
    assert_eq!(count.header("x-ms-item-type"), Some("Raw"));
    assert_eq!(count.body, json!([{"n": 2}]));
    assert!(count.header("x-ms-continuation").is_none());

    let projected = hub
        .query("SELECT deviceId FROM devices", Some("1"), None)
        .await;
    assert_eq!(projected.header("x-ms-item-type"), Some("Raw"));
    // Projections page like `SELECT *` (tests/query_paging.rs has the rest).
    assert_eq!(projected.body.as_array().map(Vec::len), Some(1));
    assert!(projected.header("x-ms-continuation").is_some());

    let jobs = hub.query("SELECT * FROM devices.jobs", None, None).await;
    assert_eq!(jobs.status, StatusCode::OK, "{}", jobs.body);
    assert_eq!(jobs.header("x-ms-item-type"), Some("DeviceJob"));
    assert!(jobs.body.is_array());

    let bad_token = hub
        .query("SELECT * FROM devices", None, Some("not a token"))
        .await;
    bad_token.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
}

#[tokio::test]
async fn query_errors_are_400_with_position() {
    let hub = TestHub::start().await;
    let answer = hub.query("SELECT * FRM devices", None, None).await;
    answer.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let message = answer.body["Message"].as_str().unwrap_or_default();
    assert!(message.contains("position 9"), "{message}");

    let too_long = hub
        .query(
            &format!(
                "SELECT * FROM devices WHERE deviceId = '{}'",
                "x".repeat(8200)
            ),
            None,
            None,
        )
        .await;
    too_long.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");

    let missing = hub
        .call_with(
            Method::POST,
            "/devices/query",
            Some(&json!({"sql": "SELECT * FROM devices"})),
            &[],
        )
        .await;
    missing.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
}

#[tokio::test]
async fn unknown_route_is_404_in_iot_hub_form() {
    let hub = TestHub::start().await;
    let answer = hub
        .call_with(Method::GET, "/no/such/route", None, &[])
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let code = answer
        .header("iothub-errorcode")
        .expect("error code header")
        .to_owned();
    assert!(
        answer.body["Message"]
            .as_str()
            .expect("Message")
            .starts_with(&format!("ErrorCode:{code};"))
    );
    let wrong_method = hub
        .call_with(Method::POST, "/twins/myDeviceId", Some(&json!({})), &[])
        .await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        wrong_method.body["Message"]
            .as_str()
            .expect("Message")
            .starts_with("ErrorCode:")
    );
}

#[tokio::test]
async fn malformed_json_is_400_argument_invalid() {
    let hub = TestHub::start().await;
    let response = hub
        .client
        .put(format!("{}/devices/dev-x?api-version=2021-04-12", hub.base))
        .header("Authorization", &hub.owner)
        .header("Content-Type", "application/json; charset=utf-8")
        .body("{\"deviceId\": \"dev-x\",")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response
            .headers()
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok()),
        Some("ArgumentInvalid")
    );
    let body: Value = response.json().await.expect("JSON error body");
    let message = body["Message"].as_str().expect("Message");
    assert!(
        message.starts_with("ErrorCode:ArgumentInvalid;") && message.contains("JSON"),
        "{message}"
    );
}

#[tokio::test]
async fn shutdown_answers_waiting_methods_and_stops_accepting() {
    let hub = TestHub::start().await;
    let warm = hub
        .call_with(Method::GET, "/devices/myDeviceId", None, &[])
        .await;
    assert_eq!(
        warm.status,
        StatusCode::OK,
        "an idle keep-alive connection must not hold up shutdown"
    );
    let request = hub
        .client
        .post(format!("{}/twins/myDeviceId/methods", hub.base))
        .header("Authorization", &hub.owner)
        .json(&json!({"methodName": "reboot", "connectTimeoutInSeconds": 60}));
    let waiting = tokio::spawn(request.send());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let TestHub {
        running,
        client,
        base,
        owner,
        ..
    } = hub;
    let started = Instant::now();
    running.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drained in {:?}",
        started.elapsed()
    );

    let answer = waiting
        .await
        .expect("task")
        .expect("the waiting call is answered");
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer
            .headers()
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok()),
        Some("ServiceUnavailable")
    );
    let after = client
        .get(format!("{base}/devices/myDeviceId"))
        .header("Authorization", &owner)
        .send()
        .await;
    assert!(
        after.is_err(),
        "no new connections after shutdown: {after:?}"
    );
}

#[tokio::test]
async fn device_job_rows_page_by_job_and_device() {
    let hub = TestHub::start().await;
    for i in 1..=3 {
        hub.create(&format!("dev-{i}")).await;
    }
    for job in ["job-a", "job-b"] {
        let request = json!({
            "jobId": job,
            "type": "scheduleUpdateTwin",
            "updateTwin": {"etag": "*", "tags": {"job": job}},
            "queryCondition": "*",
            "startTime": "2020-01-01T00:00:00.000Z",
            "maxExecutionTimeInSeconds": 60,
        });
        let created = hub
            .call_with(Method::PUT, &format!("/jobs/v2/{job}"), Some(&request), &[])
            .await;
        assert_eq!(created.status, StatusCode::OK, "{}", created.body);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = hub
                .call_with(Method::GET, &format!("/jobs/v2/{job}"), None, &[])
                .await;
            if status.body["status"] == "completed" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "job did not complete: {}",
                status.body
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut rows = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = hub
            .query("SELECT * FROM devices.jobs", Some("3"), token.as_deref())
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        assert_eq!(page.header("x-ms-item-type"), Some("DeviceJob"));
        rows.extend(page.body.as_array().expect("array").iter().map(|r| {
            (
                r["jobId"].as_str().unwrap_or_default().to_owned(),
                r["deviceId"].as_str().unwrap_or_default().to_owned(),
            )
        }));
        match page.header("x-ms-continuation") {
            Some(next) => token = Some(next.to_owned()),
            None => break,
        }
    }
    let mut expected = Vec::new();
    for job in ["job-a", "job-b"] {
        for device in ["dev-1", "dev-2", "dev-3", "myDeviceId"] {
            expected.push((job.to_owned(), device.to_owned()));
        }
    }
    assert_eq!(rows, expected, "every (job, device) row once, in order");

    let filtered = hub
        .query(
            "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'job-b'",
            Some("100"),
            None,
        )
        .await;
    assert_eq!(
        filtered.body.as_array().map(Vec::len),
        Some(4),
        "{}",
        filtered.body
    );

    // One job's rows, paged: the pages resume after their last row within that job.
    let mut job_b = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = hub
            .query(
                "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'job-b'",
                Some("3"),
                token.as_deref(),
            )
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        job_b.extend(
            page.body
                .as_array()
                .expect("array")
                .iter()
                .map(|r| r["deviceId"].as_str().unwrap_or_default().to_owned()),
        );
        match page.header("x-ms-continuation") {
            Some(next) => token = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(job_b, ["dev-1", "dev-2", "dev-3", "myDeviceId"]);
}

#[tokio::test]
async fn purging_a_devices_cloud_to_device_queue_answers_as_iot_hub() {
    let hub = TestHub::start().await;
    hub.create("dev-purge").await;
    let answer = hub
        .call(Method::DELETE, "/devices/dev-purge/commands", None)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "body: {}", answer.body);
    assert_eq!(
        answer.body,
        json!({"totalMessagesPurged": 0, "deviceId": "dev-purge", "moduleId": null})
    );
    hub.call(Method::DELETE, "/devices/nobody/commands", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
    let device_token = hub.policy_token("device", now() + 3600);
    let refused = hub
        .call_as(
            Some(&device_token),
            Method::DELETE,
            "/devices/dev-purge/commands",
            None,
            &[],
        )
        .await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "the device policy has no ServiceConnect: {}",
        refused.body
    );
}

#[tokio::test]
async fn twin_tags_patch_of_many_empty_objects_is_400() {
    // Each array element weighs at least 1 byte (twins::section_size), so 10,000 `{}` are
    // over the 8 KB tags limit instead of weighing nothing.
    let hub = TestHub::start().await;
    let empties = vec![json!({}); 10_000];
    let patch = json!({"tags": {"a": empties}});
    let refused = hub
        .call_with(Method::PATCH, "/twins/myDeviceId", Some(&patch), &[])
        .await;
    refused.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let message = refused.body["Message"].as_str().expect("Message");
    assert!(message.contains("tags would be 10001 bytes"), "{message}");
    let twin = hub
        .call_with(Method::GET, "/twins/myDeviceId", None, &[])
        .await;
    assert_eq!(twin.status, StatusCode::OK);
    assert!(twin.body["tags"].get("a").is_none(), "{}", twin.body);
}

/// A raw request with a text body (`call_as` only sends well-formed JSON).
async fn send_text(
    hub: &TestHub,
    auth: Option<&str>,
    method: Method,
    path: &str,
    body: &str,
) -> Answer {
    let mut request = hub
        .client
        .request(method, format!("{}{path}?api-version=2021-04-12", hub.base))
        .header("Content-Type", "application/json; charset=utf-8")
        .body(body.to_owned());
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let body: Value = response.json().await.expect("JSON error body");
    Answer {
        status,
        headers,
        body,
    }
}

/// The credential is the `Authorization` header alone ("HTTPS implements authentication by
/// including a valid token in the Authorization request header", Microsoft Learn, "Control
/// access to IoT Hub with shared access signatures"), so a request without a valid token is
/// refused with 401 before its body is read: a malformed body does not turn that into a 400
/// (project issue 13). With a valid token the same body is still 400 naming the JSON error.
#[tokio::test]
async fn a_malformed_body_without_a_valid_token_is_401_not_400() {
    let hub = TestHub::start().await;
    let malformed = "{\"deviceId\": \"dev-x\",";
    let routes = [
        (Method::PUT, "/devices/dev-x"),
        (Method::PUT, "/devices/query"),
        (Method::PATCH, "/twins/dev-x"),
        (Method::PUT, "/twins/dev-x"),
        (Method::POST, "/twins/dev-x/methods"),
        (Method::POST, "/devices/query"),
        (Method::PUT, "/jobs/v2/job-x"),
    ];
    let forged = hub_core::sas::generate(
        &hub.host,
        &SharedKey::from_bytes(vec![7u8; 32]),
        Some("iothubowner"),
        now() + 600,
    );
    for (method, path) in routes {
        for auth in [None, Some("garbage"), Some(forged.as_str())] {
            let answer = send_text(&hub, auth, method.clone(), path, malformed).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {auth:?}: {}",
                answer.body
            );
            answer.assert_error(StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
        }
        let answer = send_text(&hub, Some(&hub.owner), method.clone(), path, malformed).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
        let message = answer.body["Message"].as_str().expect("Message");
        assert!(message.contains("JSON"), "{method} {path}: {message}");
    }
}

/// The files holding keys (hub.env: connection strings; hub.db: device and policy keys; the CA
/// and server private keys) end up 0600 even when they already existed with looser modes: the
/// mode given to `OpenOptions` applies only "If a new file is created as part of an
/// OpenOptions::open call" (std `OpenOptionsExt::mode`), so each writer tightens an existing
/// file itself (project issue 13).
#[cfg(unix)]
#[tokio::test]
async fn existing_secret_files_are_tightened_to_0600() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = || hub_emulator::Config {
        data_dir: Some(dir.path().to_path_buf()),
        durable: true,
        ..hub_emulator::Config::ephemeral()
    };
    let loosen = |name: &str| {
        std::fs::set_permissions(
            dir.path().join(name),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod 0644");
    };
    let assert_private = |name: &str| {
        let mode = std::fs::metadata(dir.path().join(name))
            .expect("the file exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} has mode {:o}", mode & 0o777);
    };
    let secrets = ["hub.env", "hub.db", "ca-key.pem", "server-key.pem"];

    // Before the first start: hub.env and an empty hub.db made by someone else, mode 0644.
    for name in ["hub.env", "hub.db"] {
        std::fs::write(dir.path().join(name), "").expect("pre-create");
        loosen(name);
    }
    let running = hub_emulator::start(config()).await.expect("hub starts");
    for name in secrets {
        assert_private(name);
    }
    running.shutdown().await;

    // A restart on the same directory finds every file (the CA key is read, not rewritten).
    for name in secrets {
        loosen(name);
    }
    let running = hub_emulator::start(config()).await.expect("hub restarts");
    for name in secrets {
        assert_private(name);
    }
    running.shutdown().await;
}

#[tokio::test]
async fn health_is_ready_without_a_token_and_never_throttled() {
    // S1 with a one-second burst and no queue: the second registry call in a second is refused,
    // so twenty health checks in a row would be too if /health were throttled like the registry.
    let hub = TestHub::start_with(hub_emulator::Config {
        tier: Some(hub_core::tier::Tier::S1.with_units(1).expect("S1")),
        throttle_shaping: (Duration::from_secs(1), Duration::ZERO),
        ..hub_emulator::Config::ephemeral()
    })
    .await;
    for attempt in 0..20 {
        let answer = hub.call_as(None, Method::GET, "/health", None, &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "attempt {attempt}: {}",
            answer.body
        );
        assert_eq!(answer.body, json!({"status": "ready"}));
    }
    // The same hub does throttle a registry call made as fast.
    let first = hub.call(Method::GET, "/devices/myDeviceId", None).await;
    let second = hub.call(Method::GET, "/devices/myDeviceId", None).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    second.assert_error(StatusCode::TOO_MANY_REQUESTS, "ThrottlingException");
    // A forged token is not looked at either: /health reads no header.
    let forged = hub
        .call_as(
            Some("SharedAccessSignature sr=x&sig=y&se=1&skn=iothubowner"),
            Method::GET,
            "/health",
            None,
            &[],
        )
        .await;
    assert_eq!(forged.status, StatusCode::OK);
    // Other methods on it are refused as any route refuses them.
    let posted = hub
        .call_as(None, Method::POST, "/health", Some(&json!({})), &[])
        .await;
    assert_eq!(posted.status, StatusCode::METHOD_NOT_ALLOWED);
    hub.running.shutdown().await;
}
