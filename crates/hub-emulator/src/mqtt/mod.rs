//! The device endpoint: MQTT 3.1.1 over TLS (`listener`) and over WebSocket (`websocket`),
//! both feeding the same per-device `session` through a small byte `transport` abstraction.
//!
//! Invariants: one task per connection (no task per subscription or per packet); the TLS
//! handshake and CONNECT happen inside that task under [`CONNECT_TIMEOUT`]; a connection's
//! failure never touches another connection; a session only ever sees its own device's traffic.

mod listener;
mod session;
mod transport;
pub mod websocket;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;

/// Largest MQTT packet accepted from a device (remaining length): IoT Hub's 256 KB message limit.
/// A larger length field, or bytes that are not MQTT, drop the connection.
pub const MAX_PACKET_SIZE: usize = 256 * 1024;
/// How long a new connection has for the TLS handshake (or WebSocket upgrade) plus CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many MQTT-over-TLS connections (authenticated or not) the hub holds at once; further
/// clients wait in the kernel's accept backlog.
pub const MAX_CONNECTIONS: usize = 20_000;

/// Accepts device connections until `shutdown`; each session runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    hub: Hub,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    listener::Listener::new(listener, acceptor, hub, shutdown, tracker)
        .run()
        .await;
}
