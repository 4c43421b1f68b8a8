//! MQTT over WebSocket on the HTTPS port: `GET /$iothub/websocket` with subprotocol `mqtt`,
//! as the Azure device SDKs use it (port 443 on IoT Hub). Binary frames carry the same MQTT
//! byte stream the TLS listener sees, served by the same session code.
//!
//! Invariants: frame boundaries mean nothing to MQTT here: a frame may hold part of a packet or
//! several packets. A session holds its HTTPS connection's admission until it ends, so it counts
//! against the HTTPS port's budgets although hyper has let go of the connection: pending (and
//! evictable) until CONNECT authenticates, then admitted.

use std::io;

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use bytes::BytesMut;
use futures_util::StreamExt as _;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info_span};

use super::transport::MqttIo;
use super::{CONNECT_TIMEOUT, MAX_INBOUND_PACKET, session};
use crate::http::AppState;
use crate::listener::Admission;

/// The path IoT Hub serves MQTT over WebSocket on (hub-core's, which its clients dial).
pub use hub_core::device_client::WEBSOCKET_PATH;

/// WebSocket read chunk size: small, since most device packets are small.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Largest WebSocket message or frame: one maximal MQTT packet plus its fixed header.
const WS_MAX_MESSAGE: usize = MAX_INBOUND_PACKET + 5;

/// The MQTT-over-WebSocket route, merged into the HTTPS router.
pub fn routes() -> Router<AppState> {
    Router::new().route(WEBSOCKET_PATH, get(upgrade))
}

async fn upgrade(
    State(state): State<AppState>,
    Extension(admission): Extension<Admission>,
    ws: WebSocketUpgrade,
) -> Response {
    // The connect deadline starts at the upgrade request (TLS is already done by then).
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let AppState {
        hub,
        shutdown,
        tracker,
        throttles,
        ..
    } = state;
    let span = info_span!("mqtt_ws", device_id = tracing::field::Empty);
    ws.protocols(["mqtt"])
        .read_buffer_size(WS_READ_BUFFER)
        // Eager writes: the session batches packets itself and flushes once per batch.
        .write_buffer_size(0)
        .max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .on_failed_upgrade(|e| debug!(error = %e, "MQTT WebSocket upgrade failed"))
        .on_upgrade(move |socket| {
            tracker.track_future(
                async move {
                    let transport = WsTransport { socket };
                    session::run(transport, hub, shutdown, deadline, admission, throttles).await;
                }
                .instrument(span),
            )
        })
}

/// A WebSocket carrying MQTT in binary messages.
#[derive(Debug)]
struct WsTransport {
    socket: WebSocket,
}

impl MqttIo for WsTransport {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        // Cancel-safe: the only await is `next()`, and a message it returns is consumed at once.
        loop {
            match self.socket.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(0),
                Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                    buf.extend_from_slice(&data);
                    return Ok(data.len());
                }
                // Pings are answered by the WebSocket layer; empty frames carry nothing.
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text frame; MQTT over WebSocket uses binary frames",
                    ));
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
    }

    async fn send(&mut self, buf: &mut BytesMut) -> io::Result<()> {
        let frame = buf.split().freeze();
        self.socket
            .send(Message::Binary(frame))
            .await
            .map_err(io::Error::other)
    }

    async fn close(&mut self) {
        let _ = self.socket.send(Message::Close(None)).await;
    }
}
