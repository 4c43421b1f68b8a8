//! The device endpoint end to end: the real emulator on 127.0.0.1:0 with its real TLS, driven by
//! rumqttc as a device would (and by a raw TLS socket for bytes rumqttc will not send).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use hub_core::connection_string::SharedKey;
use hub_core::sas;
use hub_core::topic::Topic;
use hub_emulator::hub::{Hub, MethodCall, SAS_SKEW_SECS};
use hub_emulator::{Config, RunningHub};
use rumqttc::mqttbytes::v4::{Connect, Packet as RawPacket};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::{ClientConfig, SupportedProtocolVersion};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    running: RunningHub,
    tls: Arc<ClientConfig>,
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_with(Config::ephemeral()).await
    }

    async fn start_with(config: Config) -> Fixture {
        let running = hub_emulator::start(config).await.expect("the hub starts");
        let tls = client_config(&running.env.ca_pem, None);
        Fixture { running, tls }
    }

    /// A hub keeping its state in `dir` (a restart on the same `dir` finds it again).
    async fn durable(dir: &Path) -> Fixture {
        Fixture::start_with(Config {
            data_dir: Some(dir.to_path_buf()),
            durable: true,
            ..Config::ephemeral()
        })
        .await
    }

    fn hub(&self) -> &Hub {
        self.running.hub()
    }

    /// Registers a device and returns its primary key.
    async fn add_device(&self, id: &str) -> String {
        let device = self
            .hub()
            .create_or_update_device(id, &json!({"deviceId": id}), None)
            .await
            .expect("create device");
        device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("primary key")
            .to_owned()
    }

    fn connection_state(&self, id: &str) -> String {
        let device = self.hub().get_device(id).expect("device exists");
        device["connectionState"]
            .as_str()
            .expect("connectionState")
            .to_owned()
    }

    fn tls_transport(&self) -> Transport {
        Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(&self.tls)))
    }

    /// MQTT options as an IoT Hub device SDK sets them (client id, username, SAS password).
    fn options(&self, id: &str, password: String, transport: Transport) -> MqttOptions {
        let (host, port) = match transport {
            Transport::Wss(_) => {
                let port = self.running.https_addr.port();
                (format!("wss://localhost:{port}/$iothub/websocket"), port)
            }
            _ => ("localhost".to_owned(), self.running.mqtt_addr.port()),
        };
        let mut options = MqttOptions::new(id, host, port);
        options.set_credentials(format!("localhost/{id}/?api-version=2021-04-12"), password);
        options.set_transport(transport);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(300 * 1024, 300 * 1024);
        options
    }

    async fn device(&self, id: &str, key: &str) -> Device {
        Device::connect(self.options(id, token(id, key, in_an_hour()), self.tls_transport()))
            .await
            .expect("connects")
    }

    /// Connects with the given CleanSession flag (the SDKs use 0: `clean == false`).
    async fn device_with_session(&self, id: &str, key: &str, clean: bool) -> Device {
        let mut options = self.options(id, token(id, key, in_an_hour()), self.tls_transport());
        options.set_clean_session(clean);
        Device::connect(options).await.expect("connects")
    }
}

fn client_config(
    ca_pem: &str,
    version: Option<&'static SupportedProtocolVersion>,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in hub_core::tls::parse_ca_pem(ca_pem.as_bytes(), Path::new("ca.pem")).expect("CA PEM")
    {
        roots.add(cert).expect("CA certificate");
    }
    let versions: Vec<&'static SupportedProtocolVersion> = match version {
        Some(version) => vec![version],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn in_an_hour() -> u64 {
    now_unix() + 3600
}

/// A device SAS token for `localhost`, as the Python device SDK makes it.
fn token(id: &str, key: &str, expiry: u64) -> String {
    let key = SharedKey::from_base64(key).expect("base64 key");
    sas::generate(
        &sas::device_resource_uri("localhost", id, None),
        &key,
        None,
        expiry,
    )
}

/// A connected rumqttc client whose event loop is pumped by a task into a channel.
struct Device {
    /// CONNACK's session-present flag.
    session_present: bool,
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, ConnectionError>>,
    pump: JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Device {
    /// Connects and waits for the CONNACK; a refusal comes back as the error.
    async fn connect(options: MqttOptions) -> Result<Device, ConnectionError> {
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let session_present = loop {
            match timeout(WAIT, eventloop.poll())
                .await
                .expect("CONNACK within the wait")
            {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    assert_eq!(ack.code, ConnectReturnCode::Success);
                    break ack.session_present;
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        };
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
        Ok(Device {
            session_present,
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

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        loop {
            if let Packet::SubAck(ack) = self.next_packet().await {
                assert_eq!(ack.return_codes.len(), 1);
                return ack.return_codes[0];
            }
        }
    }

    async fn publish(&self, topic: impl Into<String>, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .expect("queue PUBLISH");
    }

    /// Waits for the hub to close the connection; returns the packets received before that.
    async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        loop {
            match timeout(WAIT, self.events.recv()).await {
                Ok(Some(Ok(packet))) => seen.push(packet),
                Ok(Some(Err(_))) | Ok(None) => return seen,
                Err(_) => {
                    panic!("the hub did not close the connection within {WAIT:?}; got {seen:?}")
                }
            }
        }
    }

    async fn twin_request(&mut self, topic: String, payload: &[u8]) -> (u16, Option<u64>, Value) {
        let (Topic::TwinGet { rid } | Topic::TwinPatchReported { rid }) =
            Topic::parse(&topic).expect("twin topic")
        else {
            panic!("not a twin request topic: {topic}");
        };
        self.publish(topic, QoS::AtLeastOnce, payload.to_vec())
            .await;
        let response = self.next_publish().await;
        let Ok(Topic::TwinResponse {
            status,
            rid: answered,
            version,
        }) = Topic::parse(&response.topic)
        else {
            panic!("expected a twin response, got {}", response.topic);
        };
        assert_eq!(answered, rid, "the response echoes $rid");
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

/// Invokes a method in-process while the device answers it; returns (status, payload).
async fn method_round_trip(hub: &Hub, device: &mut Device, id: &str) -> (i32, Value) {
    let call = MethodCall::from_request(&json!({
        "methodName": "reboot",
        "payload": {"delay": 5},
        "responseTimeoutInSeconds": 10,
    }))
    .expect("method call");
    let invoking = {
        let hub = hub.clone();
        let id = id.to_owned();
        tokio::spawn(async move { hub.invoke_method(&id, &call).await })
    };
    let request = device.next_publish().await;
    let Ok(Topic::MethodRequest { name, rid }) = Topic::parse(&request.topic) else {
        panic!("expected a method request, got {}", request.topic);
    };
    assert_eq!(name, "reboot");
    let payload: Value = serde_json::from_slice(&request.payload).expect("JSON method payload");
    assert_eq!(payload, json!({"delay": 5}));
    device
        .publish(
            Topic::MethodResponse { status: 200, rid }.to_string(),
            QoS::AtMostOnce,
            br#"{"result":"ok"}"#.to_vec(),
        )
        .await;
    let outcome = timeout(WAIT, invoking)
        .await
        .expect("method answered in time")
        .expect("task")
        .expect("method ok");
    (outcome.status, outcome.payload)
}

async fn raw_tls(fx: &Fixture, config: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(fx.running.mqtt_addr)
        .await
        .expect("TCP connect");
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

fn connect_bytes(id: &str, password: &str, keep_alive: u16) -> BytesMut {
    let mut connect = Connect::new(id);
    connect.keep_alive = keep_alive;
    connect.set_login(format!("localhost/{id}/?api-version=2021-04-12"), password);
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode CONNECT");
    buf
}

/// Reads one packet, or `None` when the hub closes the connection.
async fn read_raw(stream: &mut TlsStream<TcpStream>, buf: &mut BytesMut) -> Option<RawPacket> {
    loop {
        if let Ok(packet) = RawPacket::read(buf, 1024 * 1024) {
            return Some(packet);
        }
        match timeout(WAIT, stream.read_buf(buf))
            .await
            .expect("the hub answers or closes in time")
        {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_marks_device_connected_and_acks_telemetry() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-ok").await;
    assert_eq!(fx.connection_state("dev-ok"), "Disconnected");
    let mut device = fx.device("dev-ok", &key).await;
    assert_eq!(fx.connection_state("dev-ok"), "Connected");

    device
        .publish(
            "devices/dev-ok/messages/events/%24.ct=application%2Fjson&alert=high%20temp",
            QoS::AtLeastOnce,
            br#"{"t":21.5}"#.to_vec(),
        )
        .await;
    assert!(
        matches!(device.next_packet().await, Packet::PubAck(_)),
        "telemetry at QoS 1 is acknowledged"
    );
    device
        .publish(
            "devices/dev-ok/messages/events/",
            QoS::AtMostOnce,
            b"plain".to_vec(),
        )
        .await;
    // Both are kept for reading back, with the topic's property bag decoded.
    let mut kept = fx.hub().telemetry().read("dev-ok");
    for _ in 0..100 {
        if kept.total == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        kept = fx.hub().telemetry().read("dev-ok");
    }
    assert_eq!(kept.total, 2);
    assert_eq!(kept.messages[0].body, r#"{"t":21.5}"#);
    assert_eq!(
        kept.messages[0].properties,
        [
            ("$.ct".to_owned(), "application/json".to_owned()),
            ("alert".to_owned(), "high temp".to_owned())
        ]
    );
    assert_eq!(
        (
            kept.messages[1].body.as_str(),
            kept.messages[1].sequence_number
        ),
        ("plain", 2)
    );

    device.client.disconnect().await.expect("queue DISCONNECT");
    device.expect_closed().await;
    eventually("connectionState Disconnected", || {
        fx.connection_state("dev-ok") == "Disconnected"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_tls12_and_tls13() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-tls").await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut stream = raw_tls(&fx, client_config(&fx.running.env.ca_pem, Some(version))).await;
        assert_eq!(stream.get_ref().1.protocol_version(), Some(version.version));
        stream
            .write_all(&connect_bytes(
                "dev-tls",
                &token("dev-tls", &key, in_an_hour()),
                60,
            ))
            .await
            .expect("send");
        let mut buf = BytesMut::new();
        match read_raw(&mut stream, &mut buf).await {
            Some(RawPacket::ConnAck(ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::Success, "{version:?}")
            }
            other => panic!("expected CONNACK over {version:?}, got {other:?}"),
        }
        assert_eq!(fx.connection_state("dev-tls"), "Connected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_with_not_authorized() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-auth").await;
    let other_key = fx.add_device("dev-other").await;
    fx.add_device("dev-disabled").await;
    let disabled_key = fx.hub().device_primary_key("dev-disabled").expect("key");
    fx.hub()
        .create_or_update_device(
            "dev-disabled",
            &json!({"deviceId": "dev-disabled", "status": "disabled"}),
            Some("*"),
        )
        .await
        .expect("disable");

    let expired = now_unix() - SAS_SKEW_SECS - 60;
    let cases = [
        (
            "wrong key",
            "dev-auth",
            token("dev-auth", &other_key, in_an_hour()),
        ),
        (
            "expired token",
            "dev-auth",
            token("dev-auth", &key, expired),
        ),
        (
            "unknown device",
            "ghost",
            token("ghost", &key, in_an_hour()),
        ),
        (
            "disabled device",
            "dev-disabled",
            token("dev-disabled", &disabled_key, in_an_hour()),
        ),
        (
            "token for another device",
            "dev-auth",
            token("dev-other", &other_key, in_an_hour()),
        ),
    ];
    for (case, id, password) in cases {
        let refused = Device::connect(fx.options(id, password, fx.tls_transport()))
            .await
            .err();
        assert!(
            matches!(
                refused,
                Some(ConnectionError::ConnectionRefused(
                    ConnectReturnCode::NotAuthorized
                ))
            ),
            "{case}: {refused:?}"
        );
    }
    assert_eq!(fx.connection_state("dev-auth"), "Disconnected");
    assert_eq!(fx.hub().connected_count(), 0);

    // A module client id for a module that is not registered, with its device's token, is
    // not authorized (modules have their own keys; see tests/modules.rs), and a client id with
    // more than one `/` is no identity at all.
    let module = fx.options(
        "dev-auth/mod1",
        token("dev-auth", &key, in_an_hour()),
        fx.tls_transport(),
    );
    let refused = Device::connect(module).await.err();
    assert!(
        matches!(
            refused,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "{refused:?}"
    );
    let nested = fx.options(
        "dev-auth/mod1/extra",
        token("dev-auth", &key, in_an_hour()),
        fx.tls_transport(),
    );
    let refused = Device::connect(nested).await.err();
    assert!(
        matches!(
            refused,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadClientId
            ))
        ),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_round_trip_and_unsubscribe() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-method").await;
    let mut device = fx.device("dev-method", &key).await;
    assert!(!fx.hub().method_ready("dev-method"));
    // Node subscribes once per handler: identical filters are one subscription.
    for _ in 0..3 {
        assert_eq!(
            device
                .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
                .await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
    }
    assert!(fx.hub().method_ready("dev-method"));

    let (status, payload) = method_round_trip(fx.hub(), &mut device, "dev-method").await;
    assert_eq!(status, 200);
    assert_eq!(payload, json!({"result": "ok"}));

    device
        .client
        .unsubscribe("$iothub/methods/POST/#")
        .await
        .expect("queue UNSUBSCRIBE");
    loop {
        if let Packet::UnsubAck(_) = device.next_packet().await {
            break;
        }
    }
    assert!(!fx.hub().method_ready("dev-method"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_get_and_reported_patch() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-twin").await;
    let mut device = fx.device("dev-twin", &key).await;
    // QoS 2 asked, QoS 1 granted.
    assert_eq!(
        device
            .subscribe("$iothub/twin/res/#", QoS::ExactlyOnce)
            .await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    let (status, version, twin) = device
        .twin_request("$iothub/twin/GET/?$rid=get-1".into(), b" ")
        .await;
    assert_eq!((status, version), (200, None));
    assert!(twin["desired"]["$version"].is_u64(), "{twin}");
    let reported_version = twin["reported"]["$version"]
        .as_u64()
        .expect("reported $version");

    let (status, version, body) = device
        .twin_request(
            "$iothub/twin/PATCH/properties/reported/?$rid=patch-1".into(),
            br#"{"fw":"1.1","nested":{"a":1}}"#,
        )
        .await;
    assert_eq!(
        (status, version, body),
        (204, Some(reported_version + 1), Value::Null)
    );
    let stored = fx.hub().get_twin("dev-twin").expect("twin");
    assert_eq!(stored["properties"]["reported"]["fw"], "1.1");

    let (_, _, twin) = device
        .twin_request("$iothub/twin/GET/?$rid=get-2".into(), b" ")
        .await;
    assert_eq!(twin["reported"]["nested"], json!({"a": 1}));
    assert_eq!(twin["reported"]["$version"], reported_version + 1);

    let (status, version, body) = device
        .twin_request(
            "$iothub/twin/PATCH/properties/reported/?$rid=patch-2".into(),
            b"not json",
        )
        .await;
    assert_eq!((status, version), (400, None));
    assert!(
        body["Message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ErrorCode:ArgumentInvalid;")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_patch_is_pushed_after_update_twin() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-desired").await;
    let mut device = fx.device("dev-desired", &key).await;
    let granted = device
        .subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtMostOnce)
        .await;
    assert_eq!(granted, SubscribeReasonCode::Success(QoS::AtMostOnce));

    let twin = fx
        .hub()
        .update_twin(
            "dev-desired",
            &json!({"properties": {"desired": {"telemetryInterval": 30}}}),
            None,
            false,
        )
        .await
        .expect("update twin");
    let desired_version = twin["properties"]["desired"]["$version"]
        .as_u64()
        .expect("desired $version");

    let patch = device.next_publish().await;
    assert_eq!(patch.qos, QoS::AtMostOnce, "sent at the granted QoS");
    assert_eq!(
        Topic::parse(&patch.topic),
        Ok(Topic::TwinDesiredPatch {
            version: desired_version
        })
    );
    let body: Value = serde_json::from_slice(&patch.payload).expect("JSON patch");
    assert_eq!(
        body,
        json!({"telemetryInterval": 30, "$version": desired_version})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_replaces_the_first() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-twice").await;
    let mut first = fx.device("dev-twice", &key).await;
    let mut second = fx.device("dev-twice", &key).await;
    first.expect_closed().await;
    assert_eq!(fx.connection_state("dev-twice"), "Connected");
    assert_eq!(fx.hub().connected_count(), 1);

    second
        .subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;
    let (status, _) = method_round_trip(fx.hub(), &mut second, "dev-twice").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_topics_close_the_connection() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-a").await;
    fx.add_device("dev-b").await;

    let mut device = fx.device("dev-a", &key).await;
    let own = device
        .subscribe("devices/dev-a/messages/devicebound/#", QoS::AtLeastOnce)
        .await;
    assert_eq!(own, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    device
        .client
        .subscribe("devices/dev-b/messages/devicebound/#", QoS::AtLeastOnce)
        .await
        .expect("queue");
    let seen = device.expect_closed().await;
    assert!(
        !seen.iter().any(|p| matches!(p, Packet::SubAck(_))),
        "no SUBACK for another device's topic: {seen:?}"
    );

    let mut device = fx.device("dev-a", &key).await;
    device
        .publish(
            "devices/dev-b/messages/events/",
            QoS::AtLeastOnce,
            b"spoofed".to_vec(),
        )
        .await;
    let seen = device.expect_closed().await;
    assert!(
        !seen.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "no PUBACK for spoofed telemetry: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_publish_closes_the_connection() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-qos").await;
    let mut device = fx.device("dev-qos", &key).await;
    device
        .publish(
            "devices/dev-qos/messages/events/",
            QoS::ExactlyOnce,
            b"once".to_vec(),
        )
        .await;
    let seen = device.expect_closed().await;
    assert!(
        !seen.iter().any(|p| matches!(p, Packet::PubRec(_))),
        "QoS 2 is not acknowledged: {seen:?}"
    );
}

/// Microsoft's raw-MQTT samples rely on IoT Hub's leniency: the libmosquitto twin sample sends
/// its twin requests with RETAIN = 1 and retained telemetry, the mosquitto_sub step subscribes
/// to `#`. Each is served as IoT Hub serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_twin_requests_and_a_hash_subscription_are_served() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-lenient").await;
    let mut device = fx.device("dev-lenient", &key).await;
    assert_eq!(
        device.subscribe("#", QoS::ExactlyOnce).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce),
        "`#` is granted (QoS 2 asked, 1 granted)"
    );
    device
        .subscribe("$iothub/twin/res/#", QoS::AtMostOnce)
        .await;
    for (topic, body) in [
        (
            "$iothub/twin/PATCH/properties/reported/?$rid=0",
            &b"{\"temperature\": 32}"[..],
        ),
        ("$iothub/twin/GET/?$rid=1", &b"{}"[..]),
    ] {
        device
            .client
            .publish(topic, QoS::AtLeastOnce, true, body.to_vec())
            .await
            .expect("queue");
    }
    let patched = device.next_publish().await;
    assert!(
        patched.topic.starts_with("$iothub/twin/res/204/?$rid=0"),
        "the retained PATCH is answered: {}",
        patched.topic
    );
    let got = device.next_publish().await;
    assert!(
        got.topic.starts_with("$iothub/twin/res/200/?$rid=1"),
        "the retained GET is answered: {}",
        got.topic
    );
    let twin: Value = serde_json::from_slice(&got.payload).expect("twin JSON");
    assert_eq!(twin["reported"]["temperature"], 32);
    device
        .client
        .publish(
            "devices/dev-lenient/messages/events/",
            QoS::AtLeastOnce,
            true,
            b"Bonjour MQTT".to_vec(),
        )
        .await
        .expect("queue");
    loop {
        if let Packet::PubAck(_) = device.next_packet().await {
            break; // retained telemetry is acknowledged
        }
    }
}

/// Sends a direct method through the hub; `None` when the hub finds the device not subscribed.
async fn try_method(hub: &Hub, device: &mut Device, id: &str) -> Option<i32> {
    if !hub.method_ready(id) {
        return None;
    }
    Some(method_round_trip(hub, device, id).await.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_subscriptions_across_reconnects_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = "dev-session";
    let key = {
        let fx = Fixture::durable(dir.path()).await;
        let key = fx.add_device(id).await;
        let mut device = fx.device_with_session(id, &key, false).await;
        assert!(!device.session_present, "a new device has no session yet");
        device
            .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
            .await;
        assert_eq!(try_method(fx.hub(), &mut device, id).await, Some(200));
        drop(device);
        eventually("the device to disconnect", || {
            fx.connection_state(id) == "Disconnected"
        })
        .await;

        // A reconnect (token renewal, dropped network) resumes the session: no SUBSCRIBE.
        let mut device = fx.device_with_session(id, &key, false).await;
        assert!(device.session_present, "CONNACK says the session is back");
        assert_eq!(
            try_method(fx.hub(), &mut device, id).await,
            Some(200),
            "methods reach the device without a new SUBSCRIBE"
        );
        // A second connection replaces the first and resumes the same session.
        let mut second = fx.device_with_session(id, &key, false).await;
        assert!(second.session_present);
        drop(device);
        assert_eq!(try_method(fx.hub(), &mut second, id).await, Some(200));
        fx.running.shutdown().await;
        key
    };
    // A restarted hub (the same data directory) still has it.
    let fx = Fixture::durable(dir.path()).await;
    let mut device = fx.device_with_session(id, &key, false).await;
    assert!(device.session_present, "the session survives the restart");
    assert_eq!(try_method(fx.hub(), &mut device, id).await, Some(200));
    drop(device);
    eventually("the device to disconnect", || {
        fx.connection_state(id) == "Disconnected"
    })
    .await;

    // CleanSession = 1 discards it, for this connection and the next.
    let mut clean = fx.device_with_session(id, &key, true).await;
    assert!(!clean.session_present);
    assert_eq!(
        try_method(fx.hub(), &mut clean, id).await,
        None,
        "a clean session has no old subscriptions"
    );
    drop(clean);
    eventually("the device to disconnect", || {
        fx.connection_state(id) == "Disconnected"
    })
    .await;
    let again = fx.device_with_session(id, &key, false).await;
    assert!(
        !again.session_present,
        "the clean connection discarded the session"
    );
}

/// Opens a persistent session subscribed to methods, then disconnects.
async fn subscribe_and_leave(fx: &Fixture, id: &str, key: &str) {
    let mut device = fx.device_with_session(id, key, false).await;
    device
        .subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await;
    drop(device);
    eventually("the device to disconnect", || {
        fx.connection_state(id) == "Disconnected"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_or_disabling_end_a_persistent_session() {
    let fx = Fixture::start().await;
    let id = "dev-rekey";
    let key = fx.add_device(id).await;
    subscribe_and_leave(&fx, id, &key).await;
    let device = fx.hub().get_device(id).expect("device");
    let etag = device["etag"].as_str().expect("etag").to_owned();
    let new_key = "bmV3LWtleS1uZXcta2V5LW5ldy1rZXktbmV3LWtleSE=";
    fx.hub()
        .create_or_update_device(
            id,
            &json!({"deviceId": id, "authentication": {"type": "sas",
                "symmetricKey": {"primaryKey": new_key, "secondaryKey": key}}}),
            Some(&etag),
        )
        .await
        .expect("new primary key");
    let device = fx.device_with_session(id, new_key, false).await;
    assert!(
        !device.session_present,
        "a device whose keys changed starts a new session"
    );
    drop(device);
    eventually("the device to disconnect", || {
        fx.connection_state(id) == "Disconnected"
    })
    .await;

    subscribe_and_leave(&fx, id, new_key).await;
    for status in ["disabled", "enabled"] {
        fx.hub()
            .create_or_update_device(id, &json!({"deviceId": id, "status": status}), Some("*"))
            .await
            .expect("status change");
    }
    let device = fx.device_with_session(id, new_key, false).await;
    assert!(
        !device.session_present,
        "disabling a device ends its session (re-enabling is like re-creating it)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_packets_drop_only_that_connection() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-steady").await;
    let noisy_key = fx.add_device("dev-noisy").await;
    let mut steady = fx.device("dev-steady", &key).await;
    steady
        .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
        .await;

    // Not MQTT at all.
    let mut stream = raw_tls(&fx, Arc::clone(&fx.tls)).await;
    stream
        .write_all(b"\xff\xff\xff\xff\xff GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("send garbage");
    assert!(
        read_raw(&mut stream, &mut BytesMut::new()).await.is_none(),
        "garbage is dropped without an answer"
    );

    // A good CONNECT, then garbage.
    let mut stream = raw_tls(&fx, Arc::clone(&fx.tls)).await;
    stream
        .write_all(&connect_bytes(
            "dev-noisy",
            &token("dev-noisy", &noisy_key, in_an_hour()),
            60,
        ))
        .await
        .expect("send");
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_raw(&mut stream, &mut buf).await,
        Some(RawPacket::ConnAck(_))
    ));
    stream
        .write_all(&[0x00, 0x00, 0xde, 0xad, 0xbe, 0xef])
        .await
        .expect("send garbage");
    assert!(
        read_raw(&mut stream, &mut buf).await.is_none(),
        "garbage after CONNECT drops the connection"
    );

    // A PUBLISH announcing 300 KiB: dropped on the length field, before the body is sent.
    let mut stream = raw_tls(&fx, Arc::clone(&fx.tls)).await;
    stream
        .write_all(&connect_bytes(
            "dev-noisy",
            &token("dev-noisy", &noisy_key, in_an_hour()),
            60,
        ))
        .await
        .expect("send");
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_raw(&mut stream, &mut buf).await,
        Some(RawPacket::ConnAck(_))
    ));
    let length = 300 * 1024_u32;
    let header = [
        0x30,
        (length & 0x7f) as u8 | 0x80,
        ((length >> 7) & 0x7f) as u8 | 0x80,
        (length >> 14) as u8,
    ];
    stream.write_all(&header).await.expect("send header");
    assert!(
        read_raw(&mut stream, &mut buf).await.is_none(),
        "an oversized packet drops the connection"
    );

    let (status, _) = method_round_trip(fx.hub(), &mut steady, "dev-steady").await;
    assert_eq!(status, 200, "the other device is unaffected");
    assert_eq!(fx.connection_state("dev-steady"), "Connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_token_expiry_close_the_connection() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-quiet").await;

    // Keep-alive 1 s: silence for 1.5 s closes the connection.
    let mut stream = raw_tls(&fx, Arc::clone(&fx.tls)).await;
    stream
        .write_all(&connect_bytes(
            "dev-quiet",
            &token("dev-quiet", &key, in_an_hour()),
            1,
        ))
        .await
        .expect("send");
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_raw(&mut stream, &mut buf).await,
        Some(RawPacket::ConnAck(_))
    ));
    let started = Instant::now();
    assert!(read_raw(&mut stream, &mut buf).await.is_none());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );

    // A token the hub accepts for 2 more seconds (within its clock-skew allowance).
    let expiry = now_unix() + 2 - SAS_SKEW_SECS;
    let mut stream = raw_tls(&fx, Arc::clone(&fx.tls)).await;
    stream
        .write_all(&connect_bytes(
            "dev-quiet",
            &token("dev-quiet", &key, expiry),
            0,
        ))
        .await
        .expect("send");
    let mut buf = BytesMut::new();
    assert!(matches!(
        read_raw(&mut stream, &mut buf).await,
        Some(RawPacket::ConnAck(_))
    ));
    assert_eq!(fx.connection_state("dev-quiet"), "Connected");
    let started = Instant::now();
    assert!(read_raw(&mut stream, &mut buf).await.is_none());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed at token expiry, after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connects_and_answers_a_method() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-ws").await;
    let transport = Transport::wss_with_config(TlsConfiguration::Rustls(Arc::clone(&fx.tls)));
    let mut device =
        Device::connect(fx.options("dev-ws", token("dev-ws", &key, in_an_hour()), transport))
            .await
            .expect("connects over WebSocket");
    assert_eq!(fx.connection_state("dev-ws"), "Connected");
    device
        .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
        .await;
    let (status, payload) = method_round_trip(fx.hub(), &mut device, "dev-ws").await;
    assert_eq!((status, payload), (200, json!({"result": "ok"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_symmetric_keys_cannot_connect_with_an_empty_key_token() {
    let fx = Fixture::start().await;
    fx.hub()
        .create_or_update_device(
            "dev-x509",
            &json!({"deviceId": "dev-x509", "authentication": {"type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": "AA", "secondaryThumbprint": "BB"}}}),
            None,
        )
        .await
        .expect("create an X.509 device");
    // Anyone can sign with an empty key; the hub must not take that for the device's key.
    let empty_key_token = sas::generate(
        &sas::device_resource_uri("localhost", "dev-x509", None),
        &SharedKey::from_base64("").expect("empty key"),
        None,
        in_an_hour(),
    );
    let refused = Device::connect(fx.options("dev-x509", empty_key_token, fx.tls_transport()))
        .await
        .err();
    assert!(
        matches!(
            refused,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "{refused:?}"
    );
    assert_eq!(fx.connection_state("dev-x509"), "Disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_connected_device_closes_it_and_shows_it_disconnected() {
    let fx = Fixture::start().await;
    let key = fx.add_device("dev-disable").await;
    let mut device = fx.device("dev-disable", &key).await;
    assert_eq!(fx.connection_state("dev-disable"), "Connected");
    fx.hub()
        .create_or_update_device(
            "dev-disable",
            &json!({"deviceId": "dev-disable", "status": "disabled"}),
            Some("*"),
        )
        .await
        .expect("disable");
    device.expect_closed().await;
    eventually("the registry to show the device disconnected", || {
        fx.connection_state("dev-disable") == "Disconnected"
    })
    .await;
    assert_eq!(fx.hub().connected_count(), 0);
    let twin = fx.hub().get_twin("dev-disable").expect("twin");
    assert_eq!(twin["connectionState"], "Disconnected");
}

/// A device-key token must name the device: "SAS tokens granted to devices must be scoped to an
/// individual device; for example, `myHub.azure-devices.net/devices/device1`" (Microsoft Learn,
/// "Control access to IoT Hub with shared access signatures", SAS token structure). A token of
/// a policy with DeviceConnect may be scoped to `{hub}/devices`: "A protocol gateway could use
/// the same token for all devices simply setting the resource URI to
/// `myhub.azure-devices.net/devices`" (same page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_key_token_must_be_scoped_to_its_device() {
    let fx = Fixture::start().await;
    let id = "dev-scope";
    let key = fx.add_device(id).await;
    let device_key = SharedKey::from_base64(&key).expect("base64 key");
    for audience in ["localhost", "localhost/devices"] {
        let password = sas::generate(audience, &device_key, None, in_an_hour());
        let refused = Device::connect(fx.options(id, password, fx.tls_transport()))
            .await
            .err();
        assert!(
            matches!(
                refused,
                Some(ConnectionError::ConnectionRefused(
                    ConnectReturnCode::NotAuthorized
                ))
            ),
            "device-key token for `{audience}`: {refused:?}"
        );
    }
    assert_eq!(fx.hub().connected_count(), 0);

    let scoped = sas::generate(
        &format!("localhost/devices/{id}"),
        &device_key,
        None,
        in_an_hour(),
    );
    drop(
        Device::connect(fx.options(id, scoped, fx.tls_transport()))
            .await
            .expect("a device-key token for localhost/devices/{id} connects"),
    );

    let policy = fx.hub().policy_keys("device").expect("the device policy");
    let policy_key = SharedKey::from_base64(&policy.primary_key).expect("base64 key");
    for audience in [
        format!("localhost/devices/{id}"),
        "localhost/devices".to_owned(),
    ] {
        let password = sas::generate(&audience, &policy_key, Some("device"), in_an_hour());
        drop(
            Device::connect(fx.options(id, password, fx.tls_transport()))
                .await
                .unwrap_or_else(|e| panic!("policy token for `{audience}` connects: {e:?}")),
        );
    }
}
