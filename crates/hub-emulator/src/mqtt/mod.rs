//! The device endpoint: MQTT 3.1.1 over TLS (`listener`, the MQTT port's handler for the hub's shared
//! `listener`) and over WebSocket (`websocket`, on the HTTPS port), both feeding the same
//! per-device `session` through a small byte `transport` abstraction.
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
use crate::listener::{ConnectionBudget, Listener};
use crate::throttle::Throttles;

/// Largest MQTT packet accepted from a device (remaining length): IoT Hub's 256 KB message limit.
/// A larger length field, or bytes that are not MQTT, drop the connection.
pub const MAX_INBOUND_PACKET: usize = 256 * 1024;
/// How long a new connection has for the TLS handshake (or WebSocket upgrade) plus CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many authenticated MQTT-over-TLS sessions the hub holds at once by default
/// ([`crate::Config::max_mqtt_connections`]); a device that authenticates beyond it gets CONNACK
/// 3 (server unavailable) and retries. MQTT over WebSocket counts against the HTTPS port's
/// budget instead. The hub lowers it to fit the process's open-file limit. Only devices with
/// valid credentials count against it, so it is sized for fleets (100,000 devices at about
/// 20 KiB each is 2 GiB), not for attackers, whom the pending budget bounds.
pub const MAX_CONNECTIONS: usize = 200_000;
/// How many MQTT-over-TLS connections may be in their TLS handshake or before CONNECT at once
/// by default ([`crate::Config::max_pending_mqtt_connections`]); beyond it the oldest is closed.
/// Devices authenticate within milliseconds of connecting, so this only bounds clients that
/// never do.
pub const MAX_PENDING_CONNECTIONS: usize = 1024;

/// Accepts device connections until `shutdown`, within `budget`; each session runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    budget: ConnectionBudget,
    hub: Hub,
    throttles: Throttles,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let handler = listener::Mqtt {
        hub,
        throttles,
        shutdown: shutdown.clone(),
    };
    let acceptor = listener::without_alpn(&acceptor);
    Listener::new(listener, acceptor, budget, handler, shutdown, tracker)
        .run()
        .await;
}

/// Runs one device session over `bytes`, as if a device had sent exactly them on a connection it
/// then closed, and returns every byte the hub wrote back. The same `session::run` as a TLS
/// connection, over an in-memory stream: the fuzz targets in `fuzz/` drive CONNECT parsing,
/// authentication and the packets after it with no socket. Needs a tokio runtime with time.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub async fn fuzz_session(hub: Hub, bytes: &[u8]) -> Vec<u8> {
    let mut stream = tokio::io::join(bytes, Vec::new());
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    session::run(
        transport::ByteStream(&mut stream),
        hub,
        CancellationToken::new(),
        deadline,
        crate::listener::Admission::alone(),
        Throttles::unlimited(),
    )
    .await;
    stream.into_inner().1
}
