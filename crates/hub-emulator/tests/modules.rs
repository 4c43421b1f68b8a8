//! Module identities end to end: the registry's module routes, module twins, module MQTT
//! sessions beside their device's, module direct methods, `FROM devices.modules` and modules
//! kept across a restart, against the real hub on 127.0.0.1:0 with real TLS (REST through
//! reqwest, MQTT through rumqttc as a module client would connect).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use hub_core::connection_string::SharedKey;
use hub_core::sas;
use hub_core::topic::Topic;
use hub_emulator::Config;
use reqwest::{Method, StatusCode};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{Value, json};
use support::{Answer, TestHub, now};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);

impl Answer {
    /// Asserts IoT Hub's classic error form: status, `iothub-errorcode` and `ErrorCode:<code>;`.
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
    }

    fn ok(self, what: &str) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{what}: {}", self.body);
        self.body
    }
}

impl TestHub {
    async fn add_device(&self, id: &str) {
        self.call(
            Method::PUT,
            &format!("/devices/{id}"),
            Some(&json!({"deviceId": id})),
        )
        .await
        .ok("create device");
    }

    /// Creates a module and returns its document.
    async fn add_module(&self, device: &str, module: &str) -> Value {
        self.call(
            Method::PUT,
            &format!("/devices/{device}/modules/{module}"),
            Some(&json!({"deviceId": device, "moduleId": module})),
        )
        .await
        .ok("create module")
    }

    async fn query(&self, text: &str, extra: &[(&str, &str)]) -> Answer {
        self.call_with(
            Method::POST,
            "/devices/query",
            Some(&json!({"query": text})),
            extra,
        )
        .await
    }

    fn connection_state(&self, device: &str, module: Option<&str>) -> String {
        let doc = match module {
            None => self.running.hub().get_device(device),
            Some(module) => self.running.hub().get_module(device, module),
        }
        .expect("identity exists");
        doc["connectionState"].as_str().unwrap().to_owned()
    }

    /// MQTT options as an IoT Hub SDK sets them for a device (`module: None`) or a module:
    /// client id, username and a SAS token signed with `key` for the identity's resource.
    fn mqtt_options(&self, device: &str, module: Option<&str>, key: &str) -> MqttOptions {
        let client_id = match module {
            Some(module) => format!("{device}/{module}"),
            None => device.to_owned(),
        };
        let key = SharedKey::from_base64(key).expect("base64 key");
        let password = sas::generate(
            &sas::device_resource_uri("localhost", device, module),
            &key,
            None,
            now() + 3600,
        );
        let mut options = MqttOptions::new(
            client_id.clone(),
            "localhost",
            self.running.mqtt_addr.port(),
        );
        options.set_credentials(
            format!("localhost/{client_id}/?api-version=2021-04-12"),
            password,
        );
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(&self.tls),
        )));
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(false);
        options
    }

    async fn connect(&self, device: &str, module: Option<&str>, key: &str) -> Client {
        Client::connect(self.mqtt_options(device, module, key))
            .await
            .expect("connects")
    }
}

fn primary_key(identity: &Value) -> String {
    identity["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("a primary key")
        .to_owned()
}

/// A connected rumqttc client whose event loop is pumped by a task into a channel.
struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>,
    pump: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Client {
    /// Connects and waits for the CONNACK; a refusal comes back as the error.
    async fn connect(options: MqttOptions) -> Result<Client, ConnectionError> {
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        loop {
            match timeout(WAIT, eventloop.poll())
                .await
                .expect("CONNACK within the wait")
            {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    assert_eq!(ack.code, ConnectReturnCode::Success);
                    break;
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(Ok(packet)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        // Stop here: polling again would make rumqttc reconnect.
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        Ok(Client {
            client,
            events,
            pump,
        })
    }

    async fn next_packet(&mut self) -> Packet {
        match timeout(WAIT, self.events.recv()).await {
            Ok(Some(Ok(packet))) => packet,
            Ok(Some(Err(e))) => panic!("the connection failed: {e}"),
            Ok(None) => panic!("the event loop stopped"),
            Err(_) => panic!("nothing arrived within {WAIT:?}"),
        }
    }

    async fn next_publish(&mut self) -> Publish {
        loop {
            if let Packet::Publish(publish) = self.next_packet().await {
                return publish;
            }
        }
    }

    /// Whether a PUBLISH arrives within `within` (the connection must stay up).
    async fn publish_within(&mut self, within: Duration) -> Option<Publish> {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(Some(Ok(Packet::Publish(publish)))) => return Some(publish),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("the connection failed: {e}"),
                Ok(None) => panic!("the event loop stopped"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        loop {
            if let Packet::SubAck(ack) = self.next_packet().await {
                assert!(
                    matches!(
                        ack.return_codes.as_slice(),
                        [rumqttc::SubscribeReasonCode::Success(_)]
                    ),
                    "SUBACK for {filter}: {:?}",
                    ack.return_codes
                );
                return;
            }
        }
    }

    async fn publish(&self, topic: impl Into<String>, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue PUBLISH");
    }

    /// Answers the next method request with `status` and `payload`; returns its name and body.
    async fn answer_method(&mut self, status: i32, payload: &Value) -> (String, Value) {
        let request = self.next_publish().await;
        let Ok(Topic::MethodRequest { name, rid }) = Topic::parse(&request.topic) else {
            panic!("expected a method request, got {}", request.topic);
        };
        let body: Value = serde_json::from_slice(&request.payload).expect("JSON payload");
        self.publish(
            Topic::MethodResponse { status, rid }.to_string(),
            payload.to_string(),
        )
        .await;
        (name, body)
    }

    /// A twin request (GET or reported PATCH) and its answer: status, `$version`, body.
    async fn twin_request(&mut self, topic: String, payload: &[u8]) -> (u16, Option<u64>, Value) {
        self.publish(topic, payload.to_vec()).await;
        let response = self.next_publish().await;
        let Ok(Topic::TwinResponse {
            status, version, ..
        }) = Topic::parse(&response.topic)
        else {
            panic!("expected a twin response, got {}", response.topic);
        };
        let body = if response.payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&response.payload).expect("JSON twin response")
        };
        (status, version, body)
    }
}

/// Waits for a condition that has no event to await (registry state after a disconnect).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn module_create_get_update_list_delete_follow_etags_and_iot_hub_errors() {
    let hub = TestHub::start().await;
    hub.add_device("dev1").await;

    // Create: no If-Match, keys generated, the Module shape of the REST reference.
    let created = hub
        .call(
            Method::PUT,
            "/devices/dev1/modules/mod1",
            Some(&json!({"moduleId": "mod1", "deviceId": "dev1"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let module = &created.body;
    assert_eq!(module["moduleId"], "mod1");
    assert_eq!(module["deviceId"], "dev1");
    assert_eq!(module["managedBy"], Value::Null);
    assert_eq!(module["connectionState"], "Disconnected");
    assert_eq!(module["cloudToDeviceMessageCount"], 0);
    assert_eq!(module["lastActivityTime"], "0001-01-01T00:00:00Z");
    assert_eq!(module["connectionStateUpdatedTime"], "0001-01-01T00:00:00Z");
    assert_eq!(module["authentication"]["type"], "sas");
    assert!(
        module["generationId"]
            .as_str()
            .is_some_and(|g| !g.is_empty())
    );
    let key = primary_key(module);
    assert_ne!(
        module["authentication"]["symmetricKey"]["secondaryKey"],
        Value::Null
    );
    let etag = module["etag"].as_str().unwrap().to_owned();
    assert_eq!(created.header("etag"), Some(format!("\"{etag}\"").as_str()));
    assert!(module.get("status").is_none(), "modules have no status");

    // A second create is a conflict.
    hub.call(
        Method::PUT,
        "/devices/dev1/modules/mod1",
        Some(&json!({"moduleId": "mod1"})),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "ModuleAlreadyExistsOnDevice");
    // An update with a stale etag is refused; with the current one it applies and keeps keys.
    hub.call_with(
        Method::PUT,
        "/devices/dev1/modules/mod1",
        Some(&json!({"moduleId": "mod1", "managedBy": "IotEdge"})),
        &[("If-Match", "\"c3RhbGU=\"")],
    )
    .await
    .assert_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let updated = hub
        .call_with(
            Method::PUT,
            "/devices/dev1/modules/mod1",
            Some(&json!({"moduleId": "mod1", "managedBy": "IotEdge"})),
            &[("If-Match", &format!("\"{etag}\""))],
        )
        .await
        .ok("update");
    assert_eq!(updated["managedBy"], "IotEdge");
    assert_eq!(
        primary_key(&updated),
        key,
        "keys are kept when none are given"
    );
    assert_eq!(updated["generationId"], module["generationId"]);
    assert_ne!(updated["etag"], module["etag"]);
    let fetched = hub
        .call(Method::GET, "/devices/dev1/modules/mod1", None)
        .await
        .ok("get");
    assert_eq!(fetched, updated);

    // A module given its keys keeps them; the list has both, by module id.
    let keys = json!({"type": "sas", "symmetricKey": {
        "primaryKey": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        "secondaryKey": "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA="}});
    let second = hub
        .call(
            Method::PUT,
            "/devices/dev1/modules/a-mod",
            Some(&json!({"moduleId": "a-mod", "authentication": keys})),
        )
        .await
        .ok("create with keys");
    assert_eq!(
        primary_key(&second),
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
    );
    let list = hub
        .call(Method::GET, "/devices/dev1/modules", None)
        .await
        .ok("list");
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a-mod", "mod1"]);

    // Errors: unknown module and device, bad ids, a body naming another module, no permission.
    hub.call(Method::GET, "/devices/dev1/modules/ghost", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "ModuleNotFound");
    hub.call(Method::GET, "/devices/ghost/modules", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
    hub.call(
        Method::PUT,
        "/devices/ghost/modules/mod1",
        Some(&json!({"moduleId": "mod1"})),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
    let bad = hub
        .call(
            Method::PUT,
            "/devices/dev1/modules/bad%20id",
            Some(&json!({})),
        )
        .await;
    bad.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    assert!(bad.body["Message"].as_str().unwrap().contains("module"));
    hub.call(
        Method::PUT,
        "/devices/dev1/modules/mod2",
        Some(&json!({"moduleId": "other"})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
    for managed_by in [json!(5), json!("x".repeat(129))] {
        let refused = hub
            .call(
                Method::PUT,
                "/devices/dev1/modules/mod2",
                Some(&json!({"managedBy": managed_by})),
            )
            .await;
        refused.assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");
        assert!(
            refused.body["Message"]
                .as_str()
                .unwrap()
                .contains("managedBy"),
            "{}",
            refused.body
        );
    }
    let reader = hub.policy_token("registryRead", now() + 3600);
    let refused = hub
        .call_as(
            Some(&reader),
            Method::PUT,
            "/devices/dev1/modules/mod3",
            Some(&json!({})),
            &[],
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);
    let read = hub
        .call_as(
            Some(&reader),
            Method::GET,
            "/devices/dev1/modules/mod1",
            None,
            &[],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK, "RegistryRead reads modules");

    // Delete: a stale etag is refused, then 204 and the module is gone.
    hub.call_with(
        Method::DELETE,
        "/devices/dev1/modules/mod1",
        None,
        &[("If-Match", "\"c3RhbGU=\"")],
    )
    .await
    .assert_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let deleted = hub
        .call(Method::DELETE, "/devices/dev1/modules/mod1", None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    hub.call(Method::GET, "/devices/dev1/modules/mod1", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "ModuleNotFound");
    hub.call(Method::DELETE, "/devices/dev1/modules/mod1", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "ModuleNotFound");
}

#[tokio::test]
async fn a_device_holds_at_most_fifty_modules() {
    let hub = TestHub::start().await;
    hub.add_device("busy").await;
    for i in 0..hub_emulator::hub::MAX_MODULES_PER_DEVICE {
        hub.add_module("busy", &format!("m{i:02}")).await;
    }
    hub.call(
        Method::PUT,
        "/devices/busy/modules/one-more",
        Some(&json!({})),
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "TooManyModulesOnDevice");
    // Updating one of them is still fine.
    let updated = hub
        .call_with(
            Method::PUT,
            "/devices/busy/modules/m00",
            Some(&json!({"managedBy": "me"})),
            &[("If-Match", "*")],
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
}

#[tokio::test]
async fn deleting_a_device_deletes_its_modules_and_closes_their_sessions() {
    let hub = TestHub::start().await;
    hub.add_device("gone").await;
    let module = hub.add_module("gone", "m1").await;
    hub.add_module("gone", "m2").await;
    let mut session = hub.connect("gone", Some("m1"), &primary_key(&module)).await;
    session.subscribe("$iothub/methods/POST/#").await;

    let deleted = hub.call(Method::DELETE, "/devices/gone", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    // The module's connection is closed by the hub.
    loop {
        match timeout(WAIT, session.events.recv()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("the module's session outlived its device"),
        }
    }
    // A device re-created with the same id starts with no modules.
    hub.add_device("gone").await;
    let list = hub
        .call(Method::GET, "/devices/gone/modules", None)
        .await
        .ok("list");
    assert_eq!(list, json!([]));
    hub.call(Method::GET, "/devices/gone/modules/m1", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "ModuleNotFound");
}

#[tokio::test]
async fn module_twins_get_patch_and_replace_with_etags() {
    let hub = TestHub::start().await;
    hub.add_device("dev1").await;
    let module = hub.add_module("dev1", "mod1").await;

    let twin = hub
        .call(Method::GET, "/twins/dev1/modules/mod1", None)
        .await;
    assert_eq!(twin.status, StatusCode::OK);
    let twin = twin.body;
    assert_eq!(twin["deviceId"], "dev1");
    assert_eq!(twin["moduleId"], "mod1");
    assert_eq!(twin["deviceEtag"], module["etag"]);
    assert_eq!(twin["version"], 1);
    assert_eq!(twin["properties"]["desired"]["$version"], 1);
    assert_eq!(twin["properties"]["reported"]["$version"], 1);
    let etag = twin["etag"].as_str().unwrap().to_owned();

    let patched = hub
        .call_with(
            Method::PATCH,
            "/twins/dev1/modules/mod1",
            Some(&json!({"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}})),
            &[("If-Match", &format!("\"{etag}\""))],
        )
        .await
        .ok("patch");
    assert_eq!(patched["tags"], json!({"site": "a"}));
    assert_eq!(patched["properties"]["desired"]["rate"], 5);
    assert_eq!(patched["properties"]["desired"]["$version"], 2);
    assert!(patched["properties"]["desired"]["$metadata"]["rate"]["$lastUpdated"].is_string());
    assert_eq!(patched["version"], 2);
    assert_ne!(patched["etag"], twin["etag"]);

    // The old etag is stale now.
    hub.call_with(
        Method::PATCH,
        "/twins/dev1/modules/mod1",
        Some(&json!({"tags": {"site": "b"}})),
        &[("If-Match", &format!("\"{etag}\""))],
    )
    .await
    .assert_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    // PUT replaces the sections; reported properties belong to the module.
    let replaced = hub
        .call(
            Method::PUT,
            "/twins/dev1/modules/mod1",
            Some(&json!({"tags": {"floor": 2}, "properties": {"desired": {"mode": "eco"}}})),
        )
        .await
        .ok("replace");
    assert_eq!(replaced["tags"], json!({"floor": 2}));
    assert!(replaced["properties"]["desired"].get("rate").is_none());
    assert_eq!(replaced["properties"]["desired"]["mode"], "eco");
    hub.call(
        Method::PATCH,
        "/twins/dev1/modules/mod1",
        Some(&json!({"properties": {"reported": {"x": 1}}})),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "ArgumentInvalid");

    // The device's own twin is untouched, and unknown modules are 404.
    let device_twin = hub.call(Method::GET, "/twins/dev1", None).await.ok("twin");
    assert_eq!(device_twin["tags"], json!({}));
    assert_eq!(device_twin["properties"]["desired"]["$version"], 1);
    hub.call(Method::GET, "/twins/dev1/modules/ghost", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "ModuleNotFound");
    hub.call(
        Method::PATCH,
        "/twins/ghost/modules/mod1",
        Some(&json!({"tags": {}})),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "DeviceNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_connects_beside_its_device_and_answers_its_own_methods() {
    let hub = TestHub::start().await;
    hub.add_device("edge1").await;
    let device_key = primary_key(
        &hub.call(Method::GET, "/devices/edge1", None)
            .await
            .ok("device"),
    );
    let module_key = primary_key(&hub.add_module("edge1", "filter").await);

    let mut device = hub.connect("edge1", None, &device_key).await;
    device.subscribe("$iothub/methods/POST/#").await;
    let mut module = hub.connect("edge1", Some("filter"), &module_key).await;
    module.subscribe("$iothub/methods/POST/#").await;
    assert_eq!(hub.connection_state("edge1", None), "Connected");
    assert_eq!(hub.connection_state("edge1", Some("filter")), "Connected");
    let statistics = hub
        .call(Method::GET, "/statistics/service", None)
        .await
        .ok("statistics");
    assert_eq!(
        statistics["connectedDeviceCount"], 1,
        "a module's connection is not a device's"
    );

    // A module method goes to the module's session, not the device's.
    let invoking = {
        let client = hub.client.clone();
        let url = format!(
            "{}/twins/edge1/modules/filter/methods?api-version=2021-04-12",
            hub.base
        );
        let owner = hub.owner.clone();
        tokio::spawn(async move {
            let response = client
                .post(url)
                .header("Authorization", owner)
                .json(&json!({"methodName": "flush", "payload": {"n": 3},
                              "responseTimeoutInSeconds": 10}))
                .send()
                .await
                .expect("request");
            let status = response.status();
            (status, response.json::<Value>().await.expect("JSON"))
        })
    };
    let (name, body) = module.answer_method(201, &json!({"flushed": 3})).await;
    assert_eq!(name, "flush");
    assert_eq!(body, json!({"n": 3}));
    let (status, answer) = invoking.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({"status": 201, "payload": {"flushed": 3}}));
    assert!(
        device
            .publish_within(Duration::from_millis(200))
            .await
            .is_none(),
        "the device saw the module's method"
    );

    // The device is still connected and answers its own methods.
    let invoking = {
        let client = hub.client.clone();
        let url = format!("{}/twins/edge1/methods?api-version=2021-04-12", hub.base);
        let owner = hub.owner.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .header("Authorization", owner)
                .json(&json!({"methodName": "ping", "responseTimeoutInSeconds": 10}))
                .send()
                .await
                .expect("request")
                .json::<Value>()
                .await
                .expect("JSON")
        })
    };
    let request = device.next_publish().await;
    let Ok(Topic::MethodRequest { name, rid }) = Topic::parse(&request.topic) else {
        panic!("expected a method request, got {}", request.topic);
    };
    assert_eq!(name, "ping");
    device
        .publish(
            Topic::MethodResponse { status: 200, rid }.to_string(),
            "null",
        )
        .await;
    assert_eq!(invoking.await.unwrap()["status"], 200);
    assert!(
        module
            .publish_within(Duration::from_millis(200))
            .await
            .is_none(),
        "the module saw the device's method"
    );
    assert_eq!(hub.connection_state("edge1", Some("filter")), "Connected");

    // Module telemetry goes on the module's own topic.
    module
        .publish("devices/edge1/modules/filter/messages/events/", "{\"t\":1}")
        .await;
    loop {
        if let Packet::PubAck(_) = module.next_packet().await {
            break;
        }
    }

    // A module method to a module that is not connected is 404103 after the connect timeout;
    // to an unknown module 404010.
    let offline = hub
        .call(
            Method::POST,
            "/twins/edge1/modules/absent/methods",
            Some(&json!({"methodName": "x"})),
        )
        .await;
    offline.assert_error(StatusCode::NOT_FOUND, "ModuleNotFound");
    hub.add_module("edge1", "idle").await;
    let idle = hub
        .call(
            Method::POST,
            "/twins/edge1/modules/idle/methods",
            Some(&json!({"methodName": "x", "connectTimeoutInSeconds": 0})),
        )
        .await;
    assert_eq!(idle.status, StatusCode::NOT_FOUND, "{}", idle.body);

    // Dropping the module leaves the device connected.
    drop(module);
    eventually("the module to disconnect", || {
        hub.connection_state("edge1", Some("filter")) == "Disconnected"
    })
    .await;
    assert_eq!(hub.connection_state("edge1", None), "Connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_is_refused_with_its_devices_key_or_the_wrong_username() {
    let hub = TestHub::start().await;
    hub.add_device("dev1").await;
    let device_key = primary_key(&hub.call(Method::GET, "/devices/dev1", None).await.ok("dev"));
    let module_key = primary_key(&hub.add_module("dev1", "mod1").await);

    // The device's key does not sign for its module.
    let refused = Client::connect(hub.mqtt_options("dev1", Some("mod1"), &device_key)).await;
    assert!(refused.is_err(), "a module connected with its device's key");
    // A token for the device (not the module) is refused for the module's client id.
    let mut options = hub.mqtt_options("dev1", Some("mod1"), &module_key);
    let key = SharedKey::from_base64(&module_key).unwrap();
    let device_scoped = sas::generate(
        &sas::device_resource_uri("localhost", "dev1", None),
        &key,
        None,
        now() + 3600,
    );
    options.set_credentials("localhost/dev1/mod1/?api-version=2021-04-12", device_scoped);
    assert!(Client::connect(options).await.is_err());
    // The username must name the module.
    let mut options = hub.mqtt_options("dev1", Some("mod1"), &module_key);
    let password = sas::generate(
        &sas::device_resource_uri("localhost", "dev1", Some("mod1")),
        &key,
        None,
        now() + 3600,
    );
    options.set_credentials("localhost/dev1/?api-version=2021-04-12", password);
    assert!(Client::connect(options).await.is_err());
    // An unknown module is refused.
    assert!(
        Client::connect(hub.mqtt_options("dev1", Some("ghost"), &module_key))
            .await
            .is_err()
    );
    // And the right credentials work.
    let _module = hub.connect("dev1", Some("mod1"), &module_key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_twin_desired_patch_reaches_the_module_and_its_reported_patch_its_twin() {
    let hub = TestHub::start().await;
    hub.add_device("dev1").await;
    let device_key = primary_key(&hub.call(Method::GET, "/devices/dev1", None).await.ok("dev"));
    let module_key = primary_key(&hub.add_module("dev1", "mod1").await);
    let mut device = hub.connect("dev1", None, &device_key).await;
    device
        .subscribe("$iothub/twin/PATCH/properties/desired/#")
        .await;
    let mut module = hub.connect("dev1", Some("mod1"), &module_key).await;
    module
        .subscribe("$iothub/twin/PATCH/properties/desired/#")
        .await;
    module.subscribe("$iothub/twin/res/#").await;

    hub.call(
        Method::PATCH,
        "/twins/dev1/modules/mod1",
        Some(&json!({"properties": {"desired": {"rate": 7}}})),
    )
    .await
    .ok("patch");
    let patch = module.next_publish().await;
    assert_eq!(
        Topic::parse(&patch.topic).unwrap(),
        Topic::TwinDesiredPatch { version: 2 }
    );
    let body: Value = serde_json::from_slice(&patch.payload).unwrap();
    assert_eq!(body, json!({"rate": 7, "$version": 2}));
    assert!(
        device
            .publish_within(Duration::from_millis(200))
            .await
            .is_none(),
        "the device got its module's desired patch"
    );

    // The module's twin GET is its own twin; its reported patch lands in its own twin.
    let (status, _, twin) = module
        .twin_request("$iothub/twin/GET/?$rid=1".to_owned(), b" ")
        .await;
    assert_eq!(status, 200);
    assert_eq!(twin["desired"], json!({"rate": 7, "$version": 2}));
    let (status, version, _) = module
        .twin_request(
            "$iothub/twin/PATCH/properties/reported/?$rid=2".to_owned(),
            br#"{"applied": 7}"#,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(version, Some(2));
    let module_twin = hub
        .call(Method::GET, "/twins/dev1/modules/mod1", None)
        .await
        .ok("module twin");
    assert_eq!(module_twin["properties"]["reported"]["applied"], 7);
    let device_twin = hub.call(Method::GET, "/twins/dev1", None).await.ok("twin");
    assert!(
        device_twin["properties"]["reported"]
            .get("applied")
            .is_none()
    );
    assert!(device_twin["properties"]["desired"].get("rate").is_none());
}

#[tokio::test]
async fn devices_modules_queries_return_module_twins_paged() {
    let hub = TestHub::start().await;
    for device in ["a", "b"] {
        hub.add_device(device).await;
    }
    for (device, module) in [("a", "m1"), ("a", "m2"), ("b", "m1")] {
        hub.add_module(device, module).await;
        hub.call(
            Method::PATCH,
            &format!("/twins/{device}/modules/{module}"),
            Some(&json!({"tags": {"kind": format!("{device}-{module}")}})),
        )
        .await
        .ok("tag");
    }
    let pairs = |rows: &Value| -> Vec<String> {
        rows.as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r["deviceId"].as_str().unwrap(),
                    r["moduleId"].as_str().unwrap()
                )
            })
            .collect()
    };

    let all = hub.query("SELECT * FROM devices.modules", &[]).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(all.header("x-ms-item-type"), Some("Twin"));
    assert_eq!(pairs(&all.body), ["a/m1", "a/m2", "b/m1"]);
    assert!(all.header("x-ms-continuation").is_none());

    let m1 = hub
        .query("SELECT * FROM devices.modules WHERE moduleId = 'm1'", &[])
        .await
        .ok("where moduleId");
    assert_eq!(pairs(&m1), ["a/m1", "b/m1"]);
    let tagged = hub
        .query(
            "SELECT * FROM devices.modules WHERE tags.kind = 'a-m2'",
            &[],
        )
        .await
        .ok("where tags");
    assert_eq!(pairs(&tagged), ["a/m2"]);
    let reported = hub
        .query(
            "SELECT * FROM devices.modules WHERE properties.desired.$version = 1 AND deviceId = 'b'",
            &[],
        )
        .await
        .ok("where properties");
    assert_eq!(pairs(&reported), ["b/m1"]);

    // Paged: two, then the last one.
    let first = hub
        .query(
            "SELECT * FROM devices.modules",
            &[("x-ms-max-item-count", "2")],
        )
        .await;
    assert_eq!(pairs(&first.body), ["a/m1", "a/m2"]);
    let token = first
        .header("x-ms-continuation")
        .expect("a continuation")
        .to_owned();
    let rest = hub
        .query(
            "SELECT * FROM devices.modules",
            &[("x-ms-max-item-count", "2"), ("x-ms-continuation", &token)],
        )
        .await;
    assert_eq!(pairs(&rest.body), ["b/m1"]);
    assert!(rest.header("x-ms-continuation").is_none());

    // Aggregates and projections, and module twins stay out of `FROM devices`.
    let count = hub
        .query("SELECT COUNT() AS n FROM devices.modules", &[])
        .await
        .ok("count");
    assert_eq!(count, json!([{"n": 3}]));
    let ids = hub
        .query(
            "SELECT moduleId FROM devices.modules WHERE deviceId = 'a'",
            &[],
        )
        .await
        .ok("projection");
    assert_eq!(ids, json!([{"moduleId": "m1"}, {"moduleId": "m2"}]));
    let devices = hub
        .query("SELECT * FROM devices WHERE deviceId IN ['a', 'b']", &[])
        .await
        .ok("devices");
    assert_eq!(devices.as_array().unwrap().len(), 2);
    assert!(
        devices
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d.get("moduleId").is_none() || d["moduleId"].is_null())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_and_their_twins_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || Config {
        data_dir: Some(dir.path().to_path_buf()),
        durable: true,
        ..Config::ephemeral()
    };
    let (module, twin) = {
        let hub = TestHub::start_with(config()).await;
        hub.add_device("keep").await;
        let module = hub.add_module("keep", "m1").await;
        let key = primary_key(&module);
        let mut session = hub.connect("keep", Some("m1"), &key).await;
        session.subscribe("$iothub/twin/res/#").await;
        let (status, _, _) = session
            .twin_request(
                "$iothub/twin/PATCH/properties/reported/?$rid=1".to_owned(),
                br#"{"fw": "2.0"}"#,
            )
            .await;
        assert_eq!(status, 204);
        let twin = hub
            .call(
                Method::PATCH,
                "/twins/keep/modules/m1",
                Some(&json!({"tags": {"site": "x"}, "properties": {"desired": {"a": 1}}})),
            )
            .await
            .ok("patch");
        drop(session);
        hub.running.shutdown().await;
        (module, twin)
    };
    let hub = TestHub::start_with(config()).await;
    let again = hub
        .call(Method::GET, "/devices/keep/modules/m1", None)
        .await
        .ok("module after restart");
    for field in ["etag", "generationId", "authentication"] {
        assert_eq!(again[field], module[field], "{field}");
    }
    let twin_again = hub
        .call(Method::GET, "/twins/keep/modules/m1", None)
        .await
        .ok("twin after restart");
    for field in ["etag", "version", "tags"] {
        assert_eq!(twin_again[field], twin[field], "{field}");
    }
    assert_eq!(twin_again["properties"]["reported"]["fw"], "2.0");
    assert_eq!(twin_again["properties"]["desired"]["a"], 1);
    // The module still connects with its key.
    let _session = hub.connect("keep", Some("m1"), &primary_key(&module)).await;
    assert_eq!(hub.connection_state("keep", Some("m1")), "Connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_devices_modules_are_disconnected_and_refused() {
    let hub = TestHub::start().await;
    hub.add_device("dev1").await;
    let module_key = primary_key(&hub.add_module("dev1", "mod1").await);
    // A policy with DeviceConnect may connect on a module's behalf, as on a device's.
    let mut options = hub.mqtt_options("dev1", Some("mod1"), &module_key);
    options.set_credentials(
        "localhost/dev1/mod1/?api-version=2021-04-12",
        hub.policy_token("device", now() + 3600),
    );
    drop(
        Client::connect(options)
            .await
            .expect("a policy token connects"),
    );
    let mut module = hub.connect("dev1", Some("mod1"), &module_key).await;
    module.subscribe("$iothub/methods/POST/#").await;

    let device = hub
        .call(Method::GET, "/devices/dev1", None)
        .await
        .ok("device");
    let mut disabled = device.clone();
    disabled["status"] = json!("disabled");
    let etag = format!("\"{}\"", device["etag"].as_str().unwrap());
    hub.call_with(
        Method::PUT,
        "/devices/dev1",
        Some(&disabled),
        &[("If-Match", &etag)],
    )
    .await
    .ok("disable");
    loop {
        match timeout(WAIT, module.events.recv()).await {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("the module's session outlived its device's enablement"),
        }
    }
    assert!(
        Client::connect(hub.mqtt_options("dev1", Some("mod1"), &module_key))
            .await
            .is_err(),
        "a module of a disabled device connected"
    );
}
