//! The shared listener on both ports, with real sockets on 127.0.0.1:0 and the hub's real TLS:
//! the connection caps (an upgraded MQTT-over-WebSocket session included), prompt shutdown, and
//! clients that never start their TLS handshake.

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
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use support::TestHub;

/// Upper bound for anything a test waits for.
const WAIT: Duration = Duration::from_secs(10);
/// How long a client stuck at a cap is watched to show it is not served. Well under the hub's
/// 10 s handshake timeout, so a server that accepted it would have answered by then.
const HELD_BACK: Duration = Duration::from_millis(700);

/// Registers `id` and returns a device SAS token for it.
async fn device_token(hub: &TestHub, id: &str) -> String {
    let device = hub
        .running
        .hub()
        .create_or_update_device(id, &json!({"deviceId": id}), None)
        .await
        .expect("create device");
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("primary key");
    let key = SharedKey::from_base64(key).expect("base64 key");
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
                    assert_eq!(ack.code, ConnectReturnCode::Success);
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("{id} cannot connect: {e}"),
            }
        }
        // Polling answers keep-alives; stop at the first error, since polling again reconnects.
        let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        Device {
            _client: client,
            pump,
        }
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

/// Starts a handshake on its own task and checks that the hub holds it back (the port is at its
/// cap); returns the task so the test can see it served once a slot frees.
async fn held_back_handshake(
    hub: &TestHub,
    addr: SocketAddr,
) -> JoinHandle<io::Result<TlsStream<TcpStream>>> {
    let mut waiting = tokio::spawn(handshake(Arc::clone(&hub.tls), addr));
    if let Ok(done) = timeout(HELD_BACK, &mut waiting).await {
        panic!(
            "a connection beyond the cap was served: {:?}",
            done.map(|r| r.map(|_| "handshake done"))
        );
    }
    waiting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_websocket_session_counts_against_the_https_cap() {
    let hub = TestHub::start_with(Config {
        max_https_connections: 1,
        ..Config::ephemeral()
    })
    .await;
    let https = hub.running.https_addr;
    let device = Device::connect(&hub, "ws-dev", true).await;

    // The session's upgrade request has been answered, so hyper no longer holds the connection:
    // only the session itself keeps the one HTTPS slot taken.
    let waiting = held_back_handshake(&hub, https).await;

    drop(device);
    let stream = timeout(WAIT, waiting)
        .await
        .expect("served once the WebSocket session ended")
        .expect("task")
        .expect("TLS handshake");
    drop(stream);
    let answer = hub.call(Method::GET, "/statistics/devices", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_mqtt_cap_new_clients_wait_until_a_slot_frees() {
    let hub = TestHub::start_with(Config {
        max_mqtt_connections: 1,
        ..Config::ephemeral()
    })
    .await;
    let mqtt = hub.running.mqtt_addr;
    let device = Device::connect(&hub, "tls-dev", false).await;

    let waiting = held_back_handshake(&hub, mqtt).await;
    // The HTTPS port has its own cap: WebSocket devices still get in.
    let ws_device = Device::connect(&hub, "ws-dev", true).await;

    drop(device);
    let stream = timeout(WAIT, waiting)
        .await
        .expect("served once the first device left")
        .expect("task")
        .expect("TLS handshake");
    drop((stream, ws_device));
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
