//! The shared listener on both ports, with real sockets on 127.0.0.1:0 and the hub's real TLS:
//! the pending and admitted connection budgets (an upgraded MQTT-over-WebSocket session
//! included), body deadlines, prompt shutdown, and clients that never start their TLS handshake.

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hub_core::connection_string::SharedKey;
use hub_core::sas;
use hub_emulator::Config;
use reqwest::{Method, StatusCode};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, TlsConfiguration, Transport,
};
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use support::TestHub;

/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);
/// Registers `id` (unless it is already) and returns a device SAS token for it.
async fn device_token(hub: &TestHub, id: &str) -> String {
    let created = hub
        .running
        .hub()
        .create_or_update_device(id, &json!({"deviceId": id}), None)
        .await;
    if let Err(e) = created
        && !matches!(e, hub_emulator::hub::OperationError::DeviceAlreadyExists(_))
    {
        panic!("create {id}: {e}");
    }
    let key = hub
        .running
        .hub()
        .device_primary_key(id)
        .expect("primary key");
    let key = SharedKey::from_base64(&key).expect("base64 key");
    sas::generate(
        &sas::device_resource_uri("localhost", id, None),
        &key,
        None,
        support::now() + 3600,
    )
}

/// An MQTT device connected (CONNACK received) over TLS or, with `websocket`, over WebSocket on
/// the HTTPS port. Dropping it closes its connection.
struct Device {
    _client: AsyncClient,
    pump: JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Device {
    async fn connect(hub: &TestHub, id: &str, websocket: bool) -> Device {
        match Device::try_connect(hub, id, websocket).await {
            Ok(device) => device,
            Err(code) => panic!("{id} was refused: {code:?}"),
        }
    }

    /// Connects, retrying while the hub refuses; panics with `why` after [`WAIT`].
    async fn connect_once_admitted(hub: &TestHub, id: &str, websocket: bool, why: &str) -> Device {
        let retried = timeout(WAIT, async {
            loop {
                match Device::try_connect(hub, id, websocket).await {
                    Ok(device) => break device,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        retried.await.unwrap_or_else(|_| panic!("{id} not {why}"))
    }

    /// Connects, or returns the CONNACK code that refused the device.
    async fn try_connect(
        hub: &TestHub,
        id: &str,
        websocket: bool,
    ) -> Result<Device, ConnectReturnCode> {
        let tls = TlsConfiguration::Rustls(Arc::clone(&hub.tls));
        let mut options = if websocket {
            let port = hub.running.https_addr.port();
            let url = format!("wss://localhost:{port}/$iothub/websocket");
            let mut options = MqttOptions::new(id, url, port);
            options.set_transport(Transport::wss_with_config(tls));
            options
        } else {
            let mut options = MqttOptions::new(id, "localhost", hub.running.mqtt_addr.port());
            options.set_transport(Transport::tls_with_config(tls));
            options
        };
        options.set_credentials(
            format!("localhost/{id}/?api-version=2021-04-12"),
            device_token(hub, id).await,
        );
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        loop {
            match timeout(WAIT, eventloop.poll())
                .await
                .expect("CONNACK within the wait")
            {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        return Err(ack.code);
                    }
                    break;
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
                Err(e) => panic!("{id} cannot connect: {e}"),
            }
        }
        // Polling answers keep-alives; stop at the first error, since polling again reconnects.
        let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        Ok(Device {
            _client: client,
            pump,
        })
    }
}

/// A TLS handshake with the hub on `addr`, trusting the hub's CA.
async fn handshake(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(tls).connect(name, tcp).await
}

/// How many of `sockets` the hub has closed (EOF or reset) within `wait`.
async fn closed_by_the_hub(sockets: &mut [TcpStream], wait: Duration) -> usize {
    let mut closed = 0;
    for socket in sockets.iter_mut() {
        let mut byte = [0_u8; 1];
        if let Ok(Ok(0) | Err(_)) = timeout(wait, socket.read(&mut byte)).await {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_websocket_and_https_cap_devices_are_refused_and_rest_is_answered_then_closed() {
    let hub = TestHub::start_with(Config {
        max_https_connections: 1,
        ..Config::ephemeral()
    })
    .await;
    let device = Device::connect(&hub, "ws-dev", true).await;

    // The session's upgrade request has been answered, so hyper no longer holds the connection:
    // only the session itself keeps the one admitted HTTPS place taken.
    let refused = Device::try_connect(&hub, "ws-dev-2", true).await;
    assert_eq!(refused.err(), Some(ConnectReturnCode::ServiceUnavailable));
    // REST is still answered, on a connection the hub then closes.
    let answer = hub.call(Method::GET, "/statistics/devices", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("connection"), Some("close"));

    drop(device);
    let second = Device::connect_once_admitted(
        &hub,
        "ws-dev-2",
        true,
        "admitted once the first WebSocket session ended",
    )
    .await;
    drop(second);
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_mqtt_session_cap_a_device_gets_connack_3_until_a_place_frees() {
    let hub = TestHub::start_with(Config {
        max_mqtt_connections: 1,
        ..Config::ephemeral()
    })
    .await;
    let device = Device::connect(&hub, "tls-dev", false).await;
    let refused = Device::try_connect(&hub, "tls-dev-2", false).await;
    assert_eq!(refused.err(), Some(ConnectReturnCode::ServiceUnavailable));
    // The HTTPS port has its own budget: WebSocket devices still get in.
    let ws_device = Device::connect(&hub, "ws-dev", true).await;

    drop(device);
    let second = Device::connect_once_admitted(
        &hub,
        "tls-dev-2",
        false,
        "admitted once the first device left",
    )
    .await;
    drop((second, ws_device));
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_authenticate_cannot_lock_devices_or_rest_clients_out() {
    const PENDING: usize = 4;
    let hub = TestHub::start_with(Config {
        max_pending_mqtt_connections: PENDING,
        max_pending_https_connections: PENDING,
        // Short, so that setting up the idle clients themselves does not wait long for room.
        pending_eviction_age: Duration::from_millis(100),
        ..Config::ephemeral()
    })
    .await;
    let (mqtt, https) = (hub.running.mqtt_addr, hub.running.https_addr);
    // Far more idle clients than either pending budget: silent TCP, and TLS done but no CONNECT
    // or request. Before the pending budget they held their slots for the whole 10 s connect
    // timeout (30 s header timeout on HTTPS).
    let mut silent = Vec::new();
    let mut idle_tls = Vec::new();
    for _ in 0..3 * PENDING {
        for addr in [mqtt, https] {
            silent.push(TcpStream::connect(addr).await.expect("TCP connect"));
            idle_tls.push(handshake(Arc::clone(&hub.tls), addr).await.expect("TLS"));
        }
    }

    let quick = Duration::from_secs(3);
    let tls_device = timeout(quick, Device::connect(&hub, "tls-dev", false))
        .await
        .expect("a device connects over TLS while idle clients wait");
    let ws_device = timeout(quick, Device::connect(&hub, "ws-dev", true))
        .await
        .expect("a device connects over WebSocket while idle clients wait");
    let answer = timeout(quick, hub.call(Method::GET, "/statistics/devices", None))
        .await
        .expect("the HTTPS port answers while idle clients wait");
    assert_eq!(answer.status, StatusCode::OK);

    // The hub closed the oldest idle clients to stay within its pending budgets.
    let closed = closed_by_the_hub(&mut silent, Duration::from_millis(200)).await;
    assert!(
        closed >= silent.len() - 2 * PENDING,
        "only {closed} of {} silent connections were closed",
        silent.len()
    );
    let mut idle_closed = 0;
    for stream in &mut idle_tls {
        let mut byte = [0_u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            timeout(Duration::from_millis(200), stream.read(&mut byte)).await
        {
            idle_closed += 1;
        }
    }
    assert!(
        idle_closed >= idle_tls.len() - 2 * PENDING,
        "only {idle_closed} of {} idle TLS connections were closed",
        idle_tls.len()
    );
    drop((tls_device, ws_device, silent, idle_tls));
    hub.running.shutdown().await;
}

/// Sends an authenticated (or not) PATCH whose body never finishes, on a raw TLS connection;
/// returns the response head the hub sent and how long it took.
async fn trickled_patch(
    hub: &TestHub,
    token: Option<&str>,
    content_length: usize,
) -> (String, Duration) {
    let mut stream = handshake(Arc::clone(&hub.tls), hub.running.https_addr)
        .await
        .expect("TLS");
    let auth = token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "PATCH /twins/{}?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n{{\"tags\":",
        hub_emulator::hub::TUTORIAL_DEVICE_ID
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.flush().await.expect("flush");
    let started = Instant::now();
    let mut response = Vec::new();
    let mut chunk = [0_u8; 1024];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        match timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => response.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer within {WAIT:?} to a trickled body"),
        }
    }
    (
        String::from_utf8_lossy(&response).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_401_at_once_without_a_token_and_408_at_the_body_deadline_with_one() {
    let hub = TestHub::start_with(Config {
        body_read_timeout: Duration::from_secs(1),
        ..Config::ephemeral()
    })
    .await;
    let (head, took) = trickled_patch(&hub, None, 1000).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(took < Duration::from_millis(900), "401 took {took:?}");

    let token = hub.policy_token("iothubowner", support::now() + 600);
    // Declared over the 256 KB limit: 413 from the headers, without waiting for the body.
    let (head, took) = trickled_patch(&hub, Some(&token), 10 << 20).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(took < Duration::from_millis(900), "413 took {took:?}");
    let (head, took) = trickled_patch(&hub, Some(&token), 1000).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "408 came after {took:?}"
    );
    // Nothing of the half-sent patch was applied.
    let twin = hub
        .call(
            Method::GET,
            &format!("/twins/{}", hub_emulator::hub::TUTORIAL_DEVICE_ID),
            None,
        )
        .await;
    assert_eq!(twin.status, StatusCode::OK);
    assert!(
        twin.body
            .get("tags")
            .is_none_or(|t| t.as_object().is_some_and(|m| m.is_empty()))
    );
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_both_ports_promptly() {
    let hub = TestHub::start().await;
    let (mqtt, https) = (hub.running.mqtt_addr, hub.running.https_addr);
    // Something in every state a connection can be in: sessions over TLS and over WebSocket,
    // an idle keep-alive HTTPS connection (reqwest's pool), and clients stuck before their
    // handshake on both ports.
    let tls_device = Device::connect(&hub, "tls-dev", false).await;
    let ws_device = Device::connect(&hub, "ws-dev", true).await;
    let answer = hub.call(Method::GET, "/statistics/devices", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    let silent_mqtt = TcpStream::connect(mqtt).await.expect("TCP connect");
    let silent_https = TcpStream::connect(https).await.expect("TCP connect");

    let started = Instant::now();
    let TestHub { running, .. } = hub;
    running.shutdown().await;
    // Nothing here waits on a client: well under the drain deadline (4 s) and the handshake
    // timeout (10 s).
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    for addr in [mqtt, https] {
        let refused = TcpStream::connect(addr).await;
        assert!(
            refused.is_err(),
            "{addr} still accepts connections after shutdown"
        );
    }
    drop((tls_device, ws_device, silent_mqtt, silent_https));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_handshakes_does_not_stall_accepting_others() {
    let hub = TestHub::start().await;
    let (mqtt, https) = (hub.running.mqtt_addr, hub.running.https_addr);
    // Queued ahead of the real clients, so the hub accepts them first.
    let mut silent = Vec::new();
    for addr in [mqtt, https, mqtt, https] {
        silent.push(TcpStream::connect(addr).await.expect("TCP connect"));
    }

    // Far less than the 10 s the silent clients have for their handshake.
    let quick = Duration::from_secs(3);
    let stream = timeout(quick, handshake(Arc::clone(&hub.tls), mqtt))
        .await
        .expect("the MQTT port answers while silent clients wait")
        .expect("TLS handshake");
    drop(stream);
    let answer = timeout(quick, hub.call(Method::GET, "/statistics/devices", None))
        .await
        .expect("the HTTPS port answers while silent clients wait");
    assert_eq!(answer.status, StatusCode::OK);
    let device = timeout(quick, Device::connect(&hub, "ws-dev", true))
        .await
        .expect("a WebSocket device connects while silent clients wait");
    drop((device, silent));
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_devices_connecting_at_once_is_queued_not_evicted() {
    // Far more simultaneous handshakes than the pending budget, as after a hub restart: young
    // pending connections are not evicted, so every device gets in (new ones wait for room).
    let hub = TestHub::start_with(Config {
        max_pending_mqtt_connections: 2,
        ..Config::ephemeral()
    })
    .await;
    let ids: Vec<String> = (0..16).map(|i| format!("flood-{i}")).collect();
    for id in &ids {
        device_token(&hub, id).await;
    }
    let connects = ids.iter().map(|id| Device::try_connect(&hub, id, false));
    let devices = futures_util::future::join_all(connects).await;
    let refused: Vec<_> = devices.iter().filter_map(|d| d.as_ref().err()).collect();
    assert!(refused.is_empty(), "refused: {refused:?}");
    drop(devices);
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_tier_connects_beyond_its_new_connection_rate_get_connack_3() {
    // S1 allows 100 new connections a second; with no burst and no queue, connects closer than
    // 10 ms apart are refused with CONNACK 3 (server unavailable) and may retry.
    let hub = TestHub::start_with(Config {
        tier: Some(hub_core::tier::Tier::S1.with_units(1).expect("S1")),
        throttle_shaping: (Duration::ZERO, Duration::ZERO),
        ..Config::ephemeral()
    })
    .await;
    let ids: Vec<String> = (0..20).map(|i| format!("throttled-{i}")).collect();
    for id in &ids {
        device_token(&hub, id).await;
    }
    let connects = ids.iter().map(|id| Device::try_connect(&hub, id, false));
    let results = futures_util::future::join_all(connects).await;
    let refused: Vec<&ConnectReturnCode> =
        results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        !refused.is_empty(),
        "20 simultaneous connects all passed a 100/s throttle"
    );
    assert!(
        refused
            .iter()
            .all(|code| **code == ConnectReturnCode::ServiceUnavailable),
        "{refused:?}"
    );
    assert!(
        results.iter().any(Result::is_ok),
        "the first connect passes"
    );
    // Retried at the rate, every device gets in.
    drop(results);
    for id in &ids {
        let device = Device::connect_once_admitted(&hub, id, false, "admitted at the rate").await;
        drop(device);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.running.shutdown().await;
}
