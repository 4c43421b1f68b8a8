//! hub-core's DeviceClient against the real hub-emulator (TLS on 127.0.0.1, free ports).

mod common;

use std::time::Duration;

use common::*;
use hub_core::connection_string::{DeviceAuth, SharedKey};
use hub_core::device_client::{ConnectError, DeviceClient, Transport};
use serde_json::json;

#[tokio::test]
async fn method_request_round_trip_with_raw_and_json_payloads() {
    let running = start_hub().await;
    let mut connected = DeviceClient::connect(&device_cs(&running), &client_options(&running))
        .await
        .expect("connect");
    let hub = running.hub().clone();
    let call =
        tokio::spawn(
            async move { invoke(&hub, DEVICE, "reboot", Some(json!({"delay": 5}))).await },
        );
    let request = tokio::time::timeout(Duration::from_secs(10), connected.methods.recv())
        .await
        .expect("request")
        .expect("open");
    assert_eq!(request.name, "reboot");
    assert_eq!(request.json().expect("json"), Some(json!({"delay": 5})));
    request
        .respond(200, &json!({"result": "ok"}))
        .await
        .expect("respond");
    let outcome = call.await.expect("join");
    assert_eq!(outcome.status, 200);
    assert_eq!(outcome.payload, json!({"result": "ok"}));

    // No payload at all: the device sees an empty body.
    let hub = running.hub().clone();
    let call = tokio::spawn(async move { invoke(&hub, DEVICE, "ping", None).await });
    let request = connected.methods.recv().await.expect("request");
    assert_eq!(request.json().expect("empty is fine"), None);
    request
        .respond(204, &serde_json::Value::Null)
        .await
        .expect("respond");
    assert_eq!(call.await.expect("join").status, 204);
    connected.client.close().await;
}

#[tokio::test]
async fn twin_get_patch_and_desired_notifications_in_order() {
    let running = start_hub().await;
    let mut connected = DeviceClient::connect(&device_cs(&running), &client_options(&running))
        .await
        .expect("connect");
    let client = connected.client.clone();
    let v0 = connected.twin.desired_version();

    let reported_version = client
        .patch_reported(&json!({"fw": "1.1", "nested": {"a": 1}}))
        .await
        .expect("patch");
    let twin = client.get_twin().await.expect("get");
    assert_eq!(twin.reported_version(), reported_version);
    assert_eq!(twin.reported["fw"], "1.1");

    set_desired(running.hub(), DEVICE, json!({"building": 43})).await;
    set_desired(running.hub(), DEVICE, json!({"floor": 3})).await;
    let first = tokio::time::timeout(Duration::from_secs(10), connected.desired.recv())
        .await
        .expect("patch 1")
        .expect("open");
    let second = tokio::time::timeout(Duration::from_secs(10), connected.desired.recv())
        .await
        .expect("patch 2")
        .expect("open");
    assert_eq!((first.version, first.full), (v0 + 1, false));
    assert_eq!(first.patch["building"], 43);
    assert_eq!(second.version, v0 + 2);
    assert_eq!(second.patch["floor"], 3);
    client.close().await;
}

#[tokio::test]
async fn wrong_key_is_refused_with_a_clear_error() {
    let running = start_hub().await;
    let mut cs = device_cs(&running);
    cs.auth = DeviceAuth::SharedAccessKey(SharedKey::from_bytes(
        b"not the device key, not at all!!".to_vec(),
    ));
    let err = DeviceClient::connect(&cs, &client_options(&running))
        .await
        .expect_err("must be refused");
    assert!(matches!(err, ConnectError::Refused { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("refused the credentials for device myDeviceId"),
        "{text}"
    );
}

#[tokio::test]
async fn untrusted_ca_is_a_tls_error_that_says_what_to_do() {
    let running = start_hub().await;
    let mut options = client_options(&running);
    let other_ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("rcgen")
        .cert
        .pem();
    let trust = hub_core::tls::TrustOptions {
        ca_pem: Some(other_ca),
        no_platform_roots: true,
        ..Default::default()
    };
    options.tls = hub_core::tls::client_config(&trust).expect("tls");
    let err = DeviceClient::connect(&device_cs(&running), &options)
        .await
        .expect_err("must fail");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("IOTHUB_CA_FILE"), "{err}");
}

#[tokio::test]
async fn unreachable_hub_gives_up_after_the_connect_timeout() {
    let running = start_hub().await;
    let mut cs = device_cs(&running);
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    cs.host_name = format!("localhost:{port}").parse().expect("host");
    let mut options = client_options(&running);
    options.connect_timeout = Duration::from_millis(1500);
    let started = std::time::Instant::now();
    let err = DeviceClient::connect(&cs, &options)
        .await
        .expect_err("must fail");
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.to_string().contains(&format!("localhost:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn gateway_host_name_routes_the_connection_but_keeps_the_identity() {
    let running = start_hub().await;
    let mut cs = device_cs(&running);
    // HostName keeps the hub's name (SAS audience, username); the socket goes to the gateway.
    let port = cs.host_name.port_or(8883);
    cs.gateway_host_name = Some(format!("127.0.0.1:{port}").parse().expect("gateway"));
    cs.host_name = "localhost".parse().expect("host");
    let connected = DeviceClient::connect(&cs, &client_options(&running))
        .await
        .expect("connect via gateway");
    assert!(connected.client.is_connected());
    connected.client.close().await;
}

#[tokio::test]
async fn mqtt_over_websocket() {
    let running = start_hub().await;
    let mut cs = device_cs(&running);
    cs.host_name = format!("localhost:{}", running.https_addr.port())
        .parse()
        .expect("host");
    let mut options = client_options(&running);
    options.transport = Transport::MqttWebSocket;
    let mut connected = DeviceClient::connect(&cs, &options)
        .await
        .expect("connect over websocket");
    let hub = running.hub().clone();
    let call = tokio::spawn(async move { invoke(&hub, DEVICE, "lockDoor", None).await });
    let request = connected.methods.recv().await.expect("request");
    request
        .respond(200, &json!({"ws": true}))
        .await
        .expect("respond");
    assert_eq!(call.await.expect("join").payload, json!({"ws": true}));
    connected.client.close().await;
}
