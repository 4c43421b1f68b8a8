//! The dashboard's server side over real HTTPS: the per-start token exchanged for a cookie, the
//! cookie plus CSRF header as a REST credential with the policy's permissions, keys blanked in
//! what the page reads, the live feed as server-sent events, and the telemetry read-back route.
//! The page itself is tested in a real browser (tests/browser).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use hub_emulator::Config;
use hub_emulator::config::DashboardConfig;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::TestHub;

const TOKEN: &str = "dashboard-test-token-0123456789";

async fn hub() -> TestHub {
    TestHub::start_with(Config {
        dashboard: Some(DashboardConfig {
            token: Some(TOKEN.to_owned()),
        }),
        ..Config::ephemeral()
    })
    .await
}

/// A client that follows no redirects (the token exchange is one).
fn plain_client(hub: &TestHub) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(hub.running.env.ca_pem.as_bytes()).expect("CA");
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .resolve("localhost", hub.running.https_addr)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Signs in with the token: the cookie pair and the page's CSRF token.
async fn sign_in(hub: &TestHub, client: &reqwest::Client) -> (String, String) {
    let url = hub.running.dashboard_url.clone().expect("a dashboard link");
    assert_eq!(url, format!("{}/?token={TOKEN}", hub.base));
    let exchange = client.get(&url).send().await.expect("exchange");
    assert_eq!(exchange.status(), StatusCode::SEE_OTHER);
    assert_eq!(exchange.headers()[LOCATION], "/");
    let set_cookie = exchange.headers()[SET_COOKIE]
        .to_str()
        .expect("ascii")
        .to_owned();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(
            set_cookie.contains(attribute),
            "{set_cookie} lacks {attribute}"
        );
    }
    let cookie = set_cookie.split(';').next().expect("pair").to_owned();
    let page = client
        .get(format!("{}/", hub.base))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .expect("ascii")
            .contains("script-src 'self'")
    );
    let html = page.text().await.expect("html");
    let csrf = html
        .split("name=\"csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();
    assert!(!html.contains(TOKEN), "the token is not in the page");
    (cookie, csrf)
}

async fn as_page(
    client: &reqwest::Client,
    hub: &TestHub,
    method: Method,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = client
        .request(method, format!("{}{path}", hub.base))
        .header(COOKIE, cookie);
    if let Some(csrf) = csrf {
        request = request.header("x-dashboard-csrf", csrf);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_page_needs_this_start_s_token() {
    let hub = hub().await;
    let client = plain_client(&hub);
    let bare = client
        .get(format!("{}/", hub.base))
        .send()
        .await
        .expect("page");
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);
    assert!(
        bare.text()
            .await
            .expect("html")
            .contains("the link the hub printed")
    );
    let wrong = client
        .get(format!("{}/?token=another-start-s-token-000", hub.base))
        .send()
        .await
        .expect("page");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(SET_COOKIE).is_none());
    let events = client
        .get(format!("{}/$dashboard/events", hub.base))
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), StatusCode::UNAUTHORIZED);
    // The assets hold no secret and load without it.
    let script = client
        .get(format!("{}/$dashboard/app.js", hub.base))
        .send()
        .await
        .expect("script");
    assert_eq!(script.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_cookie_with_the_csrf_header_is_a_rest_credential_that_never_sees_keys() {
    let hub = hub().await;
    let client = plain_client(&hub);
    let (cookie, csrf) = sign_in(&hub, &client).await;

    let (status, body) = as_page(
        &client,
        &hub,
        Method::GET,
        "/devices/myDeviceId",
        &cookie,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no CSRF header: {body}");
    let (status, body) = as_page(
        &client,
        &hub,
        Method::GET,
        "/devices/myDeviceId",
        &cookie,
        Some("forged"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let (status, device) = as_page(
        &client,
        &hub,
        Method::GET,
        "/devices/myDeviceId",
        &cookie,
        Some(&csrf),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        device["authentication"]["symmetricKey"],
        json!({"primaryKey": null, "secondaryKey": null})
    );
    let (_, list) = as_page(
        &client,
        &hub,
        Method::GET,
        "/devices",
        &cookie,
        Some(&csrf),
        None,
    )
    .await;
    assert_eq!(
        list[0]["authentication"]["symmetricKey"]["primaryKey"],
        Value::Null
    );
    let (status, created) = as_page(
        &client,
        &hub,
        Method::PUT,
        "/devices/from-the-page",
        &cookie,
        Some(&csrf),
        Some(json!({"deviceId": "from-the-page"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(
        created["authentication"]["symmetricKey"]["primaryKey"],
        Value::Null
    );

    // Sending the blanked identity back (how the page disables a device) keeps its keys.
    let before = hub
        .call(Method::GET, "/devices/from-the-page", None)
        .await
        .body;
    let mut disabled = created.clone();
    disabled["status"] = json!("disabled");
    let etag = format!("\"{}\"", created["etag"].as_str().expect("etag"));
    let answer = client
        .put(format!("{}/devices/from-the-page", hub.base))
        .header(COOKIE, &cookie)
        .header("x-dashboard-csrf", &csrf)
        .header("if-match", etag)
        .json(&disabled)
        .send()
        .await
        .expect("update");
    assert_eq!(answer.status(), StatusCode::OK);
    let after = hub
        .call(Method::GET, "/devices/from-the-page", None)
        .await
        .body;
    assert_eq!(after["status"], "disabled");
    assert_eq!(
        after["authentication"]["symmetricKey"], before["authentication"]["symmetricKey"],
        "keys kept"
    );
    assert!(
        after["authentication"]["symmetricKey"]["primaryKey"].is_string(),
        "a SAS client still sees them"
    );

    // Twins, queries and jobs are the REST API's own, with its checks (etags included).
    let (status, _) = as_page(
        &client,
        &hub,
        Method::PATCH,
        "/twins/myDeviceId",
        &cookie,
        Some(&csrf),
        Some(json!({"tags": {"floor": 3}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let stale = client
        .patch(format!("{}/twins/myDeviceId", hub.base))
        .header(COOKIE, &cookie)
        .header("x-dashboard-csrf", &csrf)
        .header("if-match", "\"AAAAAAAAAAA=\"")
        .json(&json!({"tags": {"floor": 4}}))
        .send()
        .await
        .expect("patch");
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn the_page_never_sees_module_keys() {
    let hub = hub().await;
    let client = plain_client(&hub);
    let (cookie, csrf) = sign_in(&hub, &client).await;
    let blank = json!({"primaryKey": null, "secondaryKey": null});

    let (status, created) = as_page(
        &client,
        &hub,
        Method::PUT,
        "/devices/myDeviceId/modules/mod1",
        &cookie,
        Some(&csrf),
        Some(json!({"moduleId": "mod1"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["authentication"]["symmetricKey"], blank);
    let (status, module) = as_page(
        &client,
        &hub,
        Method::GET,
        "/devices/myDeviceId/modules/mod1",
        &cookie,
        Some(&csrf),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{module}");
    assert_eq!(module["authentication"]["symmetricKey"], blank);
    let (status, list) = as_page(
        &client,
        &hub,
        Method::GET,
        "/devices/myDeviceId/modules",
        &cookie,
        Some(&csrf),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list[0]["authentication"]["symmetricKey"], blank);
    // A SAS client still sees the keys the hub generated.
    let module = hub
        .call(Method::GET, "/devices/myDeviceId/modules/mod1", None)
        .await
        .body;
    assert!(
        module["authentication"]["symmetricKey"]["primaryKey"].is_string(),
        "{module}"
    );
}

#[tokio::test]
async fn another_start_s_cookie_is_not_a_credential_here() {
    let hub = hub().await;
    let other = TestHub::start().await;
    let client = plain_client(&hub);
    let (cookie, csrf) = sign_in(&hub, &client).await;
    let other_client = plain_client(&other);
    let (status, _) = as_page(
        &other_client,
        &other,
        Method::GET,
        "/devices/myDeviceId",
        &cookie,
        Some(&csrf),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_event_stream_names_what_changed() {
    let hub = hub().await;
    let client = plain_client(&hub);
    let (cookie, _) = sign_in(&hub, &client).await;
    let mut events = client
        .get(format!("{}/$dashboard/events", hub.base))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    while !seen.contains("event: ready") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
            .await
            .expect("ready in time")
            .expect("chunk")
            .expect("open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    hub.call(
        Method::PATCH,
        "/twins/myDeviceId",
        Some(&json!({"properties": {"desired": {"x": 1}}})),
    )
    .await;
    hub.call(
        Method::PUT,
        "/jobs/v2/watched-job",
        Some(&json!({
            "jobId": "watched-job", "type": "scheduleUpdateTwin",
            "queryCondition": "deviceId = 'myDeviceId'",
            "updateTwin": {"etag": "*", "tags": {"y": 2}},
            "startTime": "2020-01-01T00:00:00Z", "maxExecutionTimeInSeconds": 60
        })),
    )
    .await;
    let mut batches = Vec::new();
    let mut buffer = String::new();
    let wanted = |batches: &[Value]| {
        let named = |key: &str, id: &str| {
            batches
                .iter()
                .any(|b| b[key].as_array().is_some_and(|a| a.iter().any(|v| v == id)))
        };
        named("devices", "myDeviceId") && named("jobs", "watched-job")
    };
    while !wanted(&batches) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
            .await
            .expect("a batch in time")
            .expect("chunk")
            .expect("open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.strip_prefix("event: changes\ndata: ") {
                batches.push(serde_json::from_str(data.trim()).expect("batch JSON"));
            }
        }
    }
}

#[tokio::test]
async fn a_device_s_telemetry_is_read_back_with_service_connect() {
    let hub = hub().await;
    hub.running.hub().record_telemetry(
        "myDeviceId",
        b"{\"t\":1}",
        &[("$.ct".into(), "application/json".into())],
    );
    let answer = hub
        .call(Method::GET, "/$emulator/devices/myDeviceId/messages", None)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["total"], 1);
    assert_eq!(answer.body["messages"][0]["body"], "{\"t\":1}");
    let missing = hub
        .call(Method::GET, "/$emulator/devices/nobody/messages", None)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let reader = hub.policy_token("registryRead", support::now() + 60);
    let refused = hub
        .call_as(
            Some(&reader),
            Method::GET,
            "/$emulator/devices/myDeviceId/messages",
            None,
            &[],
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_the_dashboard_the_page_is_not_served() {
    let hub = TestHub::start_with(Config {
        dashboard: None,
        ..Config::ephemeral()
    })
    .await;
    assert!(hub.running.dashboard_url.is_none());
    let page = plain_client(&hub)
        .get(format!("{}/", hub.base))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_export_made_from_the_page_leaves_keys_out_and_the_page_never_sees_a_sas() {
    let hub = hub().await;
    let client = plain_client(&hub);
    let (cookie, csrf) = sign_in(&hub, &client).await;
    // Port 9 on loopback: nothing listens, so the job fails fast; what matters is the request.
    let uri = "http://127.0.0.1:9/devstoreaccount1/exports?sv=2021&sig=secret";
    let (status, job) = as_page(
        &client,
        &hub,
        Method::POST,
        "/jobs/create",
        &cookie,
        Some(&csrf),
        Some(
            json!({"type": "export", "outputBlobContainerUri": uri, "excludeKeysInExport": false}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["excludeKeysInExport"], true, "forced for the page");
    let shown = job["outputBlobContainerUri"].as_str().expect("uri");
    assert!(
        !shown.contains("secret") && shown.starts_with("http://127.0.0.1:9/"),
        "{shown}"
    );
    let id = job["jobId"].as_str().expect("id").to_owned();
    let (_, listed) = as_page(
        &client,
        &hub,
        Method::GET,
        "/jobs",
        &cookie,
        Some(&csrf),
        None,
    )
    .await;
    assert!(!listed.to_string().contains("secret"), "{listed}");
    // A SAS-token caller sees the job as IoT Hub shows it, URI included.
    let answer = hub.call(Method::GET, &format!("/jobs/{id}"), None).await;
    assert_eq!(answer.body["outputBlobContainerUri"], uri);
}
