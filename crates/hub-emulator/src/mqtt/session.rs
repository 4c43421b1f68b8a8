//! One device or module connection: CONNECT with SAS authentication, then the loop that serves
//! IoT Hub's device topics (methods, twin, telemetry, C2D subscriptions) until the connection
//! ends. A module (client id `{deviceId}/{moduleId}`) is served the same `$iothub/...` topics on
//! its own connection, about its own twin and methods ([DOCS mqtt] "Using the MQTT protocol
//! directly (as a module)").
//!
//! Invariants: the hub knows the session only between a successful CONNECT and the end (a drop
//! guard always calls `detach_session`); a device publishes and subscribes on its own topics
//! only, anything else closes the connection with no acknowledgement, as IoT Hub does; hub
//! messages go out at the QoS granted for their subscription; buffers start small and grow only
//! for the packet at hand.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use hub_core::topic::{Topic, TopicFilter};

use super::MAX_INBOUND_PACKET;
use super::transport::MqttIo;
use crate::faults::TwinFault;
use crate::hub::{
    AuthError, GrantedQos, Hub, OperationError, Outbound, SAS_SKEW_SECS, SessionTicket,
    Subscriptions,
};
use crate::listener::Admission;
use crate::throttle::{Throttled, Throttles};
use hub_core::error::ErrorCode;
use hub_core::tier::Operation;

/// Size of a fresh read or write buffer, and how much a read buffer grows by at least.
const READ_CHUNK: usize = 512;
/// Spare read capacity below which the read buffer is grown before reading.
const MIN_SPARE: usize = 128;
/// Buffers that grew past this for a large packet are released once empty.
const SHRINK_ABOVE: usize = 16 * 1024;
/// Largest CONNECT accepted (before authentication nobody gets a big buffer).
const MAX_CONNECT_SIZE: usize = 16 * 1024;
/// Hub-to-device QoS 1 messages awaiting PUBACK before the outbound queue is paused.
const MAX_INFLIGHT: usize = 32;
/// Unacknowledged QoS 1 messages (including twin answers) after which the device is dropped.
const MAX_UNACKED: usize = 256;
/// Outbound messages encoded into one write.
const OUTBOUND_BATCH: usize = 16;
/// How long a write may block (a device that stops reading is dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the final flush and TLS close_notify / WebSocket close may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// IoT Hub's server-side keep-alive cap (1.5 × client keep-alive, at most 1767 s) [DOCS mqtt].
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(1767);
/// `lastActivityTime` is refreshed at most this often per device.
const TOUCH_INTERVAL: Duration = Duration::from_secs(1);
/// A deadline that never comes (keep-alive 0, tokens with absurd expiries).
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

const METHODS_PREFIX: &str = "$iothub/methods/POST/";
const TWIN_RESPONSE_PREFIX: &str = "$iothub/twin/res/";
const DESIRED_PREFIX: &str = "$iothub/twin/PATCH/properties/desired/";

/// Serves one connection from its first byte to its close. `connect_deadline` bounds the time
/// until CONNECT has been read (the TLS handshake or WebSocket upgrade already used part of it).
///
/// `admission` is the connection's place in its port's budgets: pending (evictable) until the
/// device authenticates, then admitted; it is held until the session ends.
pub(crate) async fn run<T: MqttIo>(
    mut transport: T,
    hub: Hub,
    shutdown: CancellationToken,
    connect_deadline: Instant,
    admission: Admission,
    throttles: Throttles,
) {
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let connect = tokio::select! {
        connect = tokio::time::timeout_at(connect_deadline, read_connect(&mut transport, &mut rbuf)) => connect,
        () = shutdown.cancelled() => return,
        () = admission.evicted() => {
            debug!("evicted before CONNECT: newer connections need the pending budget");
            return;
        }
    };
    let connect = match connect {
        Ok(Ok(connect)) => connect,
        Ok(Err(Refusal {
            code: Some(code),
            reason,
        })) => {
            info!(code = ?code, %reason, "connection refused");
            refuse(&mut transport, code).await;
            return;
        }
        Ok(Err(Refusal { code: None, reason })) => {
            debug!(%reason, "connection dropped before CONNECT");
            return;
        }
        Err(_) => {
            debug!(
                "no CONNECT within {:?} of accepting the connection",
                super::CONNECT_TIMEOUT
            );
            return;
        }
    };
    let keep_alive_secs = connect.keep_alive;
    let accepted = match authenticate(&hub, connect, &admission, &throttles).await {
        Ok(accepted) => accepted,
        Err(Refusal { code, reason }) => {
            info!(code = ?code, %reason, "connection refused");
            if let Some(code) = code {
                refuse(&mut transport, code).await;
            }
            return;
        }
    };
    let session_present = accepted.restored.is_some();
    info!(
        keep_alive = keep_alive_secs,
        session_present, "device connected"
    );
    let mut session = Session {
        attached: Attached {
            hub: &hub,
            ticket: accepted.ticket,
        },
        granted: accepted.restored.unwrap_or_default(),
        throttles,
        inflight: Vec::new(),
        last_packet_id: 0,
        wbuf: BytesMut::with_capacity(READ_CHUNK),
        telemetry: 0,
        next_touch: Instant::now() + TOUCH_INTERVAL,
    };
    // [MQTT-3.2.0-1] CONNACK is the first packet the server sends.
    encode(
        &mut session.wbuf,
        &Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
    );
    let end = serve(
        &mut transport,
        &mut session,
        &mut rbuf,
        &shutdown,
        accepted.keep_alive,
        accepted.token_deadline,
    )
    .await;
    let telemetry = session.telemetry;
    match &end {
        End::Forbidden(_) | End::Violation(_) => {
            warn!(reason = %end, telemetry, "device disconnected by the hub")
        }
        _ => info!(reason = %end, telemetry, "device disconnected"),
    }
    let mut wbuf = std::mem::take(&mut session.wbuf);
    // Unregister before closing so the registry shows `Disconnected` by the time the peer sees EOF.
    drop(session);
    // The budget place goes with the session, before the close below may wait on the peer.
    drop(admission);
    if end.can_write() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if !wbuf.is_empty() {
                let _ = transport.send(&mut wbuf).await;
            }
            transport.close().await;
        })
        .await;
    }
}

/// Why a connection was not accepted; `code: None` means drop it without a CONNACK.
struct Refusal {
    code: Option<ConnectReturnCode>,
    reason: Cow<'static, str>,
}

impl Refusal {
    fn new(code: ConnectReturnCode, reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            code: Some(code),
            reason: reason.into(),
        }
    }

    fn drop(reason: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            code: None,
            reason: reason.into(),
        }
    }
}

async fn refuse<T: MqttIo>(transport: &mut T, code: ConnectReturnCode) {
    let mut wbuf = BytesMut::with_capacity(4);
    encode(&mut wbuf, &Packet::ConnAck(ConnAck::new(code, false)));
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        // [MQTT-3.2.2-5] after a refusing CONNACK the server closes the connection.
        if transport.send(&mut wbuf).await.is_ok() {
            transport.close().await;
        }
    })
    .await;
}

async fn read_connect<T: MqttIo>(
    transport: &mut T,
    rbuf: &mut BytesMut,
) -> Result<Connect, Refusal> {
    loop {
        match Packet::read(rbuf, MAX_CONNECT_SIZE) {
            Ok(Packet::Connect(connect)) => return Ok(connect),
            Ok(other) => {
                return Err(Refusal::drop(format!(
                    "the first packet was {other:?}, not CONNECT [MQTT-3.1.0-1]"
                )));
            }
            Err(CodecError::InsufficientBytes(needed)) => {
                rbuf.reserve(needed.max(READ_CHUNK));
                match transport.read_into(rbuf).await {
                    Ok(0) => return Err(Refusal::drop("the peer closed the connection")),
                    Ok(_) => {}
                    Err(e) => return Err(Refusal::drop(format!("read failed: {e}"))),
                }
            }
            // [MQTT-3.1.2-2] an unsupported protocol level is answered with return code 1.
            Err(CodecError::InvalidProtocolLevel(level)) => {
                return Err(Refusal::new(
                    ConnectReturnCode::RefusedProtocolVersion,
                    format!("MQTT protocol level {level}; IoT Hub speaks MQTT 3.1.1 (level 4)"),
                ));
            }
            Err(e) => return Err(Refusal::drop(format!("not an MQTT 3.1.1 CONNECT: {e}"))),
        }
    }
}

struct Accepted {
    ticket: SessionTicket,
    /// The subscriptions of the persistent session this connection resumes.
    restored: Option<Subscriptions>,
    keep_alive: Option<Duration>,
    token_deadline: Instant,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks CONNECT as IoT Hub does, takes an admitted place for the connection and registers
/// the session.
async fn authenticate(
    hub: &Hub,
    connect: Connect,
    admission: &Admission,
    throttles: &Throttles,
) -> Result<Accepted, Refusal> {
    if connect.protocol != Protocol::V4 {
        return Err(Refusal::new(
            ConnectReturnCode::RefusedProtocolVersion,
            "MQTT 5; IoT Hub speaks MQTT 3.1.1 (level 4)",
        ));
    }
    let device_id = connect.client_id;
    tracing::Span::current().record("device_id", device_id.as_str());
    if device_id.is_empty() {
        return Err(Refusal::new(
            ConnectReturnCode::BadClientId,
            "empty client id; IoT Hub needs the device id",
        ));
    }
    // `{deviceId}/{moduleId}` is a module; one more `/` is neither.
    if device_id.split('/').count() > 2 || device_id.starts_with('/') || device_id.ends_with('/') {
        return Err(Refusal::new(
            ConnectReturnCode::BadClientId,
            "the client id must be `{deviceId}` or `{deviceId}/{moduleId}`",
        ));
    }
    let Some(login) = connect.login else {
        return Err(Refusal::new(
            ConnectReturnCode::BadUserNamePassword,
            "no username and password; IoT Hub devices send `{host}/{deviceId}/?api-version=...` and a SAS token",
        ));
    };
    let now = now_unix();
    // The password is a secret: only the hub's error text (which never contains it) is logged.
    let grant = hub
        .authenticate_device(&device_id, &login.username, &login.password, now)
        .map_err(refusal)?;
    // MQTT 3.1.1 §3.2.2.3: return code 3, "the network connection has been made but the MQTT
    // service is unavailable", is what a device's retry policy expects of a busy server (the
    // Azure IoT SDKs treat it as retryable). It answers a throttled connect (the tier's "new
    // device connections" rate) as well as a full session budget.
    if let Err(throttled) = throttles.pass(Operation::NewConnection, 1).await {
        return Err(Refusal::new(
            ConnectReturnCode::ServiceUnavailable,
            throttled.to_string(),
        ));
    }
    if admission.admit().is_err() {
        return Err(Refusal::new(
            ConnectReturnCode::ServiceUnavailable,
            "the hub holds as many device connections as it is configured for; the device retries",
        ));
    }
    let expiry = grant.expiry().unwrap_or(u64::MAX);
    // The hub accepts tokens up to SAS_SKEW_SECS past `se`, so that is when the session ends.
    let remaining = Duration::from_secs(expiry.saturating_add(SAS_SKEW_SECS).saturating_sub(now));
    let token_deadline = Instant::now() + remaining.min(FAR_FUTURE);
    // [MQTT-3.1.2-24] no packet within 1.5 × keep-alive: the server disconnects; 0 disables it.
    let keep_alive = match connect.keep_alive {
        0 => None,
        secs => Some((Duration::from_millis(u64::from(secs) * 1500)).min(MAX_KEEP_ALIVE)),
    };
    let opened = hub
        .attach_session(&device_id, &grant, connect.clean_session)
        .await
        .map_err(refusal)?;
    Ok(Accepted {
        ticket: opened.ticket,
        restored: opened.restored,
        keep_alive,
        token_deadline,
    })
}

/// The CONNACK refusal for an authentication failure.
fn refusal(error: AuthError) -> Refusal {
    let code = match error {
        AuthError::Malformed(_) => ConnectReturnCode::BadUserNamePassword,
        // MQTT 3.1.1 §3.2.2.3, return code 3: "the MQTT service is unavailable", which device
        // SDKs retry, as a device of a hub that is down for it does.
        AuthError::HeldOffline(_) => ConnectReturnCode::ServiceUnavailable,
        _ => ConnectReturnCode::NotAuthorized,
    };
    Refusal::new(code, error.to_string())
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The device sent DISCONNECT.
    Disconnected,
    /// The device closed the connection.
    PeerClosed,
    /// Reading or writing failed.
    Io(io::Error),
    /// A write did not complete in time (the device stopped reading).
    WriteTimeout,
    /// Bytes that are not MQTT, or a packet over the size limit.
    Malformed(CodecError),
    /// A packet IoT Hub does not allow (a QoS 2 PUBLISH, a second CONNECT, ...).
    Violation(Cow<'static, str>),
    /// A topic outside this device's own.
    Forbidden(String),
    /// Nothing received within 1.5 × keep-alive.
    KeepAlive(Duration),
    /// The SAS token expired.
    TokenExpired,
    /// The hub dropped the session (replaced by a new connection, device deleted or disabled,
    /// queue overflow).
    Dropped,
    /// The hub is shutting down.
    Shutdown,
    /// A device-to-cloud send beyond the tier's throttle and its backlog.
    Throttled(Throttled),
}

impl End {
    /// Whether the connection can still take a final flush and a polite close.
    fn can_write(&self) -> bool {
        !matches!(self, End::PeerClosed | End::Io(_) | End::WriteTimeout)
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Disconnected => f.write_str("the device sent DISCONNECT"),
            End::PeerClosed => f.write_str("the device closed the connection"),
            End::Io(e) => write!(f, "connection error: {e}"),
            End::WriteTimeout => write!(f, "the device did not read for {WRITE_TIMEOUT:?}"),
            End::Malformed(e) => write!(f, "not a valid MQTT 3.1.1 packet: {e}"),
            End::Violation(what) => write!(f, "{what}"),
            End::Forbidden(what) => write!(f, "{what}"),
            End::KeepAlive(limit) => write!(f, "no packet for {limit:?} (1.5 × keep-alive)"),
            End::TokenExpired => f.write_str("the SAS token expired"),
            End::Dropped => f.write_str("replaced by a newer connection or dropped by the hub"),
            End::Shutdown => f.write_str("the hub is shutting down"),
            End::Throttled(throttled) => write!(f, "closed: {throttled}"),
        }
    }
}

/// Keeps the session registered with the hub; unregisters it however the session ends.
struct Attached<'h> {
    hub: &'h Hub,
    ticket: SessionTicket,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.hub.detach_session(&self.ticket);
    }
}

/// The QoS a granted subscription's messages go out with.
fn qos_of(granted: GrantedQos) -> QoS {
    match granted {
        GrantedQos::AtMostOnce => QoS::AtMostOnce,
        GrantedQos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

struct Session<'h> {
    attached: Attached<'h>,
    /// What this session is subscribed to (restored from a persistent session, or subscribed).
    granted: Subscriptions,
    /// The tier: its throttles (twin reads and updates, device-to-cloud sends) and, on a basic
    /// tier, the topics it lacks.
    throttles: Throttles,
    /// Packet ids of hub-to-device QoS 1 publishes not yet acknowledged.
    inflight: Vec<u16>,
    last_packet_id: u16,
    /// Encoded packets waiting to be written.
    wbuf: BytesMut,
    telemetry: u64,
    next_touch: Instant,
}

/// The session loop: socket reads, the hub's outbound queue, keep-alive, token expiry, the
/// session's kill switch and shutdown.
async fn serve<T: MqttIo>(
    transport: &mut T,
    session: &mut Session<'_>,
    rbuf: &mut BytesMut,
    shutdown: &CancellationToken,
    keep_alive: Option<Duration>,
    token_deadline: Instant,
) -> End {
    // Packets the device sent right behind CONNECT.
    let mut needed = match session.process(rbuf).await {
        Ok(needed) => needed,
        Err(end) => return end,
    };
    let keep_alive_limit = keep_alive.unwrap_or(FAR_FUTURE);
    let mut last_packet = Instant::now();
    let keep_alive_timer = tokio::time::sleep_until(last_packet + keep_alive_limit);
    let token_timer = tokio::time::sleep_until(token_deadline);
    // Created once: a fresh `cancelled()` per loop turn registers with (and leaves) the token's
    // waiter list each time, and the shutdown token's list is shared by every connection.
    let killed = session.attached.ticket.kill.clone().cancelled_owned();
    let stopping = shutdown.clone().cancelled_owned();
    tokio::pin!(keep_alive_timer, token_timer, killed, stopping);
    loop {
        if !session.wbuf.is_empty() {
            let written = tokio::select! {
                written = tokio::time::timeout(WRITE_TIMEOUT, transport.send(&mut session.wbuf)) => written,
                () = &mut killed => return End::Dropped,
                () = &mut stopping => return End::Shutdown,
            };
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return End::Io(e),
                Err(_) => return End::WriteTimeout,
            }
            if session.wbuf.capacity() > SHRINK_ABOVE {
                session.wbuf = BytesMut::new();
            }
        }
        if rbuf.is_empty() && rbuf.capacity() > SHRINK_ABOVE {
            *rbuf = BytesMut::new();
        }
        if rbuf.capacity() - rbuf.len() < needed.max(MIN_SPARE) {
            rbuf.reserve(needed.max(READ_CHUNK));
        }
        let outbound_open = session.inflight.len() < MAX_INFLIGHT;
        tokio::select! {
            () = &mut stopping => return End::Shutdown,
            () = &mut killed => return End::Dropped,
            () = &mut token_timer => return End::TokenExpired,
            () = &mut keep_alive_timer => {
                // The timer is re-armed lazily: reads only record the time.
                let due = last_packet + keep_alive_limit;
                if due <= Instant::now() {
                    return End::KeepAlive(keep_alive_limit);
                }
                keep_alive_timer.as_mut().reset(due);
            }
            read = transport.read_into(rbuf) => match read {
                Ok(0) => return End::PeerClosed,
                Ok(_) => {
                    last_packet = Instant::now();
                    needed = match session.process(rbuf).await {
                        Ok(needed) => needed,
                        Err(end) => return end,
                    };
                }
                Err(e) => return End::Io(e),
            },
            message = session.attached.ticket.outbound.recv(), if outbound_open => {
                let Some(message) = message else { return End::Dropped };
                if let Err(end) = session.push(message) {
                    return end;
                }
                // Batch whatever else is queued into the same write.
                for _ in 1..OUTBOUND_BATCH {
                    if session.inflight.len() >= MAX_INFLIGHT {
                        break;
                    }
                    let Ok(message) = session.attached.ticket.outbound.try_recv() else { break };
                    if let Err(end) = session.push(message) {
                        return end;
                    }
                }
            }
        }
    }
}

/// Appends `packet` to `wbuf`; on an encoding error (never expected for packets we build) the
/// partial bytes are removed and the packet is dropped.
fn encode(wbuf: &mut BytesMut, packet: &Packet) {
    let mark = wbuf.len();
    if let Err(e) = packet.write(wbuf, usize::MAX) {
        wbuf.truncate(mark);
        warn!(error = %e, "cannot encode an MQTT packet; dropped");
    }
}

/// The `$iothub/twin/res/{status}` status and body for a failed twin request: the HTTP status
/// of the IoT Hub error code, and IoT Hub's classic error JSON.
fn twin_error(error: &OperationError) -> (u16, Bytes) {
    error_answer(error.code(), error)
}

/// The twin response for a throttled request: 429 with IoT Hub's `ThrottlingException` body.
fn throttled_answer(throttled: &Throttled) -> (u16, Bytes) {
    error_answer(ErrorCode::ThrottlingException, throttled)
}

fn error_answer(code: ErrorCode, text: impl fmt::Display) -> (u16, Bytes) {
    let body = json!({
        "Message": format!("ErrorCode:{};{text}", code.name()),
        "ExceptionMessage": "",
    });
    (code.http_status(), Bytes::from(body.to_string()))
}

impl Session<'_> {
    /// The device this session speaks for (the module's device, for a module).
    fn device_id(&self) -> &str {
        &self.attached.ticket.device_id
    }

    /// The module this session speaks for, if it is a module's.
    fn module_id(&self) -> Option<&str> {
        self.attached.ticket.module_id.as_deref()
    }

    /// The identity's key for the hub's calls (`{deviceId}` or `{deviceId}/{moduleId}`).
    fn key(&self) -> &str {
        &self.attached.ticket.key
    }

    /// Handles every complete packet in `rbuf`; returns how many more bytes the next one needs.
    async fn process(&mut self, rbuf: &mut BytesMut) -> Result<usize, End> {
        loop {
            match Packet::read(rbuf, MAX_INBOUND_PACKET) {
                Ok(packet) => self.handle(packet).await?,
                Err(CodecError::InsufficientBytes(needed)) => return Ok(needed),
                Err(e) => return Err(End::Malformed(e)),
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish).await,
            Packet::PubAck(PubAck { pkid }) => {
                // An id we never sent (or already acknowledged) is ignored [MQTT-4.3.2].
                if let Some(at) = self.inflight.iter().position(|&id| id == pkid) {
                    self.inflight.swap_remove(at);
                }
                Ok(())
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe) => {
                self.on_unsubscribe(unsubscribe).await;
                Ok(())
            }
            Packet::PingReq => {
                encode(&mut self.wbuf, &Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect => Err(End::Disconnected),
            Packet::Connect(_) => Err(End::Violation(
                "a second CONNECT on one connection [MQTT-3.1.0-2]".into(),
            )),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => Err(End::Violation(
                "a QoS 2 packet; IoT Hub supports QoS 0 and 1 only".into(),
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
                End::Violation("a server-to-client packet sent by the device".into()),
            ),
        }
    }

    /// Whether the hub runs as a basic tier (no twins, methods or jobs).
    fn basic_tier(&self) -> bool {
        self.throttles.quotas().is_some_and(|q| q.tier.is_basic())
    }

    fn touch(&mut self) {
        let now = Instant::now();
        if now >= self.next_touch {
            self.next_touch = now + TOUCH_INTERVAL;
            self.attached.hub.touch(&self.attached.ticket.key);
        }
    }

    async fn on_publish(&mut self, publish: Publish) -> Result<(), End> {
        // [DOCS mqtt] a PUBLISH with QoS 2 makes IoT Hub close the connection.
        if publish.qos == QoS::ExactlyOnce {
            return Err(End::Violation(
                format!(
                    "published on `{}` with QoS 2; IoT Hub supports QoS 0 and 1 only",
                    publish.topic
                )
                .into(),
            ));
        }
        let topic = Topic::parse(&publish.topic).map_err(|e| {
            End::Forbidden(format!(
                "published on `{}`, which is not an IoT Hub device topic: {e}",
                publish.topic
            ))
        })?;
        // RETAIN is never stored: [DOCS mqtt] IoT Hub forwards retained telemetry with an
        // `mqtt-retain` application property (telemetry is not routed here, so nothing to add),
        // and Microsoft's own twin sample (Azure-Samples/IoTMQTTSample, libmosquitto twin) sends
        // its twin GET and reported PATCH with RETAIN = 1, which a real hub answers as usual
        // (its README and tutorial-use-mqtt show the 200 and 204 answers): ignored everywhere.
        if publish.retain {
            debug!(topic = %publish.topic, "RETAIN ignored, as IoT Hub does");
        }
        self.touch();
        // A basic tier has no twins: IoT Hub disconnects a device that publishes a twin request
        // there (eclipse-threadx/getting-started#67: a reported-property publish on a Basic hub
        // "results in a disconnect").
        if matches!(
            topic,
            Topic::TwinGet { .. } | Topic::TwinPatchReported { .. }
        ) && self.basic_tier()
        {
            return Err(End::Forbidden(format!(
                "published on `{}`, but twins are not available on the hub's basic tier \
                 (403010); use a standard tier (F1 or S1-S3)",
                publish.topic
            )));
        }
        match topic {
            Topic::Telemetry {
                device_id,
                module_id,
                properties,
            } => {
                if device_id != self.device_id() || module_id.as_deref() != self.module_id() {
                    return Err(End::Forbidden(format!(
                        "published telemetry on `{}`, another identity's topic",
                        publish.topic
                    )));
                }
                // The tier's device-to-cloud throttle: a shaped send waits here, so its PUBACK
                // (and the session's next read) comes late, the back-pressure a device sees from
                // a throttled hub. MQTT 3.1.1 has no negative PUBACK, so a send refused by a full
                // backlog can only be answered by closing the connection, which every SDK
                // retries.
                if let Err(throttled) = self.throttles.pass(Operation::DeviceToCloud, 1).await {
                    return Err(End::Throttled(throttled));
                }
                self.telemetry += 1;
                debug!(topic = %publish.topic, bytes = publish.payload.len(), "telemetry");
                match self.module_id() {
                    None => self.attached.hub.record_telemetry(
                        self.device_id(),
                        &publish.payload,
                        &properties,
                    ),
                    Some(module_id) => {
                        // A module's messages are its device's, marked with the module as IoT
                        // Hub marks them (system property `iothub-connection-module-id`,
                        // Microsoft Learn, "Create and read IoT Hub messages").
                        let mut properties = properties;
                        properties.push((
                            "iothub-connection-module-id".to_owned(),
                            module_id.to_owned(),
                        ));
                        self.attached.hub.record_telemetry(
                            self.device_id(),
                            &publish.payload,
                            &properties,
                        );
                    }
                }
            }
            Topic::MethodResponse { status, rid } => {
                debug!(%rid, status, "method response");
                self.attached
                    .hub
                    .method_response(self.key(), &rid, status, publish.payload);
            }
            Topic::TwinGet { rid } => self.twin_get(rid).await?,
            Topic::TwinPatchReported { rid } => self.twin_patch(rid, &publish.payload).await?,
            _ => {
                return Err(End::Forbidden(format!(
                    "published on `{}`, a hub-to-device topic",
                    publish.topic
                )));
            }
        }
        if publish.qos == QoS::AtLeastOnce {
            encode(&mut self.wbuf, &Packet::PubAck(PubAck::new(publish.pkid)));
        }
        Ok(())
    }

    /// The twin GET answer of this session's identity (its device's, or its module's).
    fn twin_sections(&self) -> Option<Value> {
        match self.module_id() {
            None => self.attached.hub.device_twin(self.device_id()),
            Some(module_id) => self
                .attached
                .hub
                .module_twin_sections(self.device_id(), module_id),
        }
    }

    async fn twin_get(&mut self, rid: String) -> Result<(), End> {
        let Some(qos) = self.granted.twin_responses else {
            warn!(%rid, "twin GET without a subscription to $iothub/twin/res/#; IoT Hub sends no answer");
            return Ok(());
        };
        let fault = self.attached.hub.faults().twin(self.key());
        let (status, body) = match self.twin_refusal(fault, Operation::TwinRead).await {
            Some(refused) => refused,
            None => match self.twin_sections() {
                Some(twin) => (200, Bytes::from(twin.to_string())),
                None => twin_error(&OperationError::DeviceNotFound(self.key().to_owned())),
            },
        };
        let topic = Topic::TwinResponse {
            status,
            rid,
            version: None,
        }
        .to_string();
        self.answer_twin(topic, body, qos, fault)
    }

    /// The 429 answer of a twin request that is refused: by an injected `twin-throttled` fault
    /// (without spending the tier's quota), or by the tier's throttle for `operation`. Either
    /// way it is IoT Hub's ThrottlingException body.
    async fn twin_refusal(
        &self,
        fault: Option<TwinFault>,
        operation: Operation,
    ) -> Option<(u16, Bytes)> {
        if fault == Some(TwinFault::Throttled) {
            return Some(twin_error(&OperationError::TwinThrottled(
                self.device_id().to_owned(),
            )));
        }
        let throttled = self.throttles.pass(operation, 1).await.err()?;
        Some(throttled_answer(&throttled))
    }

    /// Publishes a twin answer: now, or `delay` late for a device with an injected `slow`
    /// fault (queued for later, so the session goes on reading and answering pings meanwhile).
    fn answer_twin(
        &mut self,
        topic: String,
        body: Bytes,
        qos: GrantedQos,
        fault: Option<TwinFault>,
    ) -> Result<(), End> {
        if let Some(TwinFault::Delay(delay)) = fault {
            self.attached.hub.send_later(
                &self.attached.ticket,
                delay,
                Outbound::Publish {
                    topic,
                    payload: body,
                },
            );
            return Ok(());
        }
        self.publish(topic, body, qos_of(qos))
    }

    async fn twin_patch(&mut self, rid: String, payload: &[u8]) -> Result<(), End> {
        // A throttled patch is not applied; the device hears 429 on its twin response topic. A
        // slow device's patch is applied at once and answered late.
        let fault = self.attached.hub.faults().twin(self.key());
        let result = match self.twin_refusal(fault, Operation::TwinUpdate).await {
            Some(refused) => Err(refused),
            None => match serde_json::from_slice::<Value>(payload) {
                Ok(patch) => match self.module_id() {
                    None => {
                        self.attached
                            .hub
                            .patch_reported(self.device_id(), patch)
                            .await
                    }
                    Some(module_id) => {
                        self.attached
                            .hub
                            .patch_module_reported(self.device_id(), module_id, patch)
                            .await
                    }
                }
                .map_err(|error| twin_error(&error)),
                Err(e) => Err(twin_error(&OperationError::InvalidArgument(format!(
                    "the reported properties patch is not valid JSON: {e}"
                )))),
            },
        };
        let (status, version, body) = match result {
            Ok(version) => (204, Some(version), Bytes::new()),
            Err((status, body)) => {
                debug!(%rid, status, "reported properties patch refused");
                (status, None, body)
            }
        };
        // Applied (or refused) either way; only the answer needs the subscription.
        let Some(qos) = self.granted.twin_responses else {
            warn!(%rid, "reported patch without a subscription to $iothub/twin/res/#; IoT Hub sends no answer");
            return Ok(());
        };
        let topic = Topic::TwinResponse {
            status,
            rid,
            version,
        }
        .to_string();
        self.answer_twin(topic, body, qos, fault)
    }

    async fn on_subscribe(&mut self, subscribe: Subscribe) -> Result<(), End> {
        // Every filter is checked before any is applied: one bad filter closes the connection.
        // IoT Hub allows at most 5 subscriptions; a device has only the four filters below, and a
        // repeated filter replaces the earlier one [MQTT-3.8.4-3] (Node subscribes methods once
        // per handler), so the limit cannot be reached.
        let mut granted = self.granted;
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            // [DOCS mqtt] a subscription asking for QoS 2 is granted QoS 1.
            let qos = if filter.qos == QoS::AtMostOnce {
                GrantedQos::AtMostOnce
            } else {
                GrantedQos::AtLeastOnce
            };
            // `#` is what Microsoft's raw-MQTT samples subscribe to for cloud-to-device messages
            // (Azure-Samples/IoTMQTTSample: the mosquitto_sub CLI step and the libmosquitto
            // subscribe sample), and their READMEs show a real hub granting it and delivering
            // C2D messages on `devices/{id}/messages/devicebound/...`: it is taken as the
            // device's C2D subscription. Whether IoT Hub also routes `$iothub/...` traffic to it
            // is not documented, so nothing else is.
            if filter.path == "#" {
                granted.c2d = Some(qos);
                codes.push(SubscribeReasonCode::Success(qos_of(qos)));
                continue;
            }
            let parsed = TopicFilter::parse(&filter.path).map_err(|e| {
                End::Forbidden(format!(
                    "subscribed to `{}`, which is not an IoT Hub device topic filter: {e}",
                    filter.path
                ))
            })?;
            // A basic tier has no direct methods or twins: the subscription is refused (SUBACK
            // 0x80) and the connection kept, so the device can still send telemetry.
            if matches!(
                parsed,
                TopicFilter::Methods | TopicFilter::TwinResponses | TopicFilter::TwinDesired
            ) && self.basic_tier()
            {
                debug!(filter = %filter.path, "subscription refused: not available on a basic tier");
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            match parsed {
                TopicFilter::Methods => granted.methods = Some(qos),
                TopicFilter::TwinResponses => granted.twin_responses = Some(qos),
                TopicFilter::TwinDesired => granted.desired = Some(qos),
                TopicFilter::C2d { device_id }
                    if device_id == self.device_id() && self.module_id().is_none() =>
                {
                    granted.c2d = Some(qos)
                }
                // A module's own inputs (what the Python module client subscribes to for
                // `on_message_received`, reference §7.2): kept as its message subscription;
                // nothing is ever routed to it, as no C2D message is ever queued here.
                TopicFilter::ModuleInputs {
                    device_id,
                    module_id,
                } if device_id == self.device_id()
                    && Some(module_id.as_str()) == self.module_id() =>
                {
                    granted.c2d = Some(qos)
                }
                TopicFilter::C2d { .. } | TopicFilter::ModuleInputs { .. } => {
                    return Err(End::Forbidden(format!(
                        "subscribed to `{}`, another identity's messages",
                        filter.path
                    )));
                }
            }
            codes.push(SubscribeReasonCode::Success(qos_of(qos)));
        }
        // Stored (for a persistent session) before SUBACK, so an acknowledged subscription
        // survives a hub restart.
        self.set_granted(granted).await;
        encode(
            &mut self.wbuf,
            &Packet::SubAck(SubAck::new(subscribe.pkid, codes)),
        );
        Ok(())
    }

    async fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut granted = self.granted;
        for filter in &unsubscribe.topics {
            if filter == "#" {
                granted.c2d = None;
                continue;
            }
            // Unsubscribing from anything else is not an error [MQTT-3.10.4-5].
            match TopicFilter::parse(filter) {
                Ok(TopicFilter::Methods) => granted.methods = None,
                Ok(TopicFilter::TwinResponses) => granted.twin_responses = None,
                Ok(TopicFilter::TwinDesired) => granted.desired = None,
                Ok(TopicFilter::C2d { device_id }) if device_id == self.device_id() => {
                    granted.c2d = None
                }
                Ok(TopicFilter::ModuleInputs {
                    device_id,
                    module_id,
                }) if device_id == self.device_id()
                    && Some(module_id.as_str()) == self.module_id() =>
                {
                    granted.c2d = None
                }
                _ => {}
            }
        }
        self.set_granted(granted).await;
        encode(
            &mut self.wbuf,
            &Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)),
        );
    }

    async fn set_granted(&mut self, granted: Subscriptions) {
        if granted == self.granted {
            return;
        }
        self.granted = granted;
        self.attached
            .hub
            .set_subscriptions(&self.attached.ticket, granted)
            .await;
    }

    /// The QoS a hub-to-device topic goes out with, or `None` if the device is not subscribed.
    /// Topics come from the hub already formatted, so a prefix test is enough.
    fn granted_for(&self, topic: &str) -> Option<QoS> {
        let granted = if topic.starts_with(METHODS_PREFIX) {
            self.granted.methods
        } else if topic.starts_with(DESIRED_PREFIX) {
            self.granted.desired
        } else if topic.starts_with(TWIN_RESPONSE_PREFIX) {
            self.granted.twin_responses
        } else if topic
            .strip_prefix("devices/")
            .and_then(|rest| rest.strip_prefix(self.device_id()))
            .is_some_and(|rest| rest.starts_with("/messages/devicebound/"))
        {
            self.granted.c2d
        } else {
            None
        };
        granted.map(qos_of)
    }

    /// Queues a message from the hub.
    fn push(&mut self, message: Outbound) -> Result<(), End> {
        match message {
            Outbound::Publish { topic, payload } => match self.granted_for(&topic) {
                Some(qos) => self.publish(topic, payload, qos),
                None => {
                    debug!(%topic, "not subscribed (any more); message dropped");
                    Ok(())
                }
            },
        }
    }

    fn publish(&mut self, topic: String, payload: Bytes, qos: QoS) -> Result<(), End> {
        let mut publish = Publish::from_bytes(topic, qos, payload);
        if qos == QoS::AtLeastOnce {
            if self.inflight.len() >= MAX_UNACKED {
                return Err(End::Violation(
                    format!("the device left {MAX_UNACKED} QoS 1 messages unacknowledged").into(),
                ));
            }
            publish.pkid = self.next_packet_id();
            self.inflight.push(publish.pkid);
        }
        encode(&mut self.wbuf, &Packet::Publish(publish));
        Ok(())
    }

    /// A non-zero id not in flight [MQTT-2.3.1-1, MQTT-2.3.1-2].
    fn next_packet_id(&mut self) -> u16 {
        loop {
            self.last_packet_id = self.last_packet_id.wrapping_add(1);
            if self.last_packet_id != 0 && !self.inflight.contains(&self.last_packet_id) {
                return self.last_packet_id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::DeviceGrant;
    use crate::store::Store;
    use rumqttc::mqttbytes::v4::SubscribeFilter;

    async fn session<'h>(hub: &'h Hub, device_id: &str) -> Session<'h> {
        // Only registered, enabled devices get sessions.
        match hub
            .create_or_update_device(device_id, &json!({ "deviceId": device_id }), None)
            .await
        {
            Ok(_) | Err(OperationError::DeviceAlreadyExists(_)) => {}
            Err(e) => panic!("cannot register {device_id}: {e}"),
        }
        Session {
            attached: Attached {
                hub,
                ticket: hub
                    .attach_session(device_id, &DeviceGrant::for_tests(), true)
                    .await
                    .expect("the device is registered and enabled")
                    .ticket,
            },
            granted: Subscriptions::default(),
            throttles: Throttles::unlimited(),
            inflight: Vec::new(),
            last_packet_id: 0,
            wbuf: BytesMut::new(),
            telemetry: 0,
            next_touch: Instant::now(),
        }
    }

    #[tokio::test]
    async fn outbound_topics_need_a_matching_subscription_of_this_device() {
        let hub = Hub::open(Store::in_memory(), vec!["localhost".into()]).expect("hub");
        let mut session = session(&hub, "dev-a").await;
        let c2d = "devices/dev-a/messages/devicebound/%24.mid=1";
        assert_eq!(session.granted_for(c2d), None, "not subscribed yet");
        session.granted = Subscriptions {
            methods: Some(GrantedQos::AtMostOnce),
            c2d: Some(GrantedQos::AtLeastOnce),
            ..Subscriptions::default()
        };
        assert_eq!(
            session.granted_for("$iothub/methods/POST/reboot/?$rid=1"),
            Some(QoS::AtMostOnce)
        );
        assert_eq!(session.granted_for(c2d), Some(QoS::AtLeastOnce));
        assert_eq!(
            session.granted_for("$iothub/twin/PATCH/properties/desired/?$version=2"),
            None
        );
        for foreign in [
            "devices/dev-ab/messages/devicebound/",
            "devices/dev/messages/devicebound/",
            "devices/dev-b/messages/devicebound/",
            "devices/dev-a/messages/events/",
        ] {
            assert_eq!(session.granted_for(foreign), None, "{foreign}");
        }
    }

    #[tokio::test]
    async fn twin_requests_beyond_the_tier_rate_are_answered_429_and_not_applied() {
        let hub = Hub::open(Store::in_memory(), vec!["localhost".into()]).expect("hub");
        let mut session = session(&hub, "dev-a").await;
        session.granted.twin_responses = Some(GrantedQos::AtMostOnce);
        // S1's twin updates (50/s) and reads (100/s) with no burst and no queue: the second
        // request in a row is over the rate.
        let s1 = hub_core::tier::Tier::S1.with_units(1).expect("S1");
        session.throttles = Throttles::shaped(s1, Duration::ZERO, Duration::ZERO);
        let answers = |session: &mut Session<'_>| {
            let text = String::from_utf8_lossy(&session.wbuf).into_owned();
            session.wbuf.clear();
            text
        };
        session
            .twin_patch("1".into(), br#"{"first":1}"#)
            .await
            .expect("answered");
        assert!(answers(&mut session).contains("$iothub/twin/res/204/?$rid=1"));
        session
            .twin_patch("2".into(), br#"{"second":2}"#)
            .await
            .expect("answered");
        let refused = answers(&mut session);
        assert!(
            refused.contains("$iothub/twin/res/429/?$rid=2"),
            "{refused}"
        );
        assert!(
            refused.contains("ErrorCode:ThrottlingException;"),
            "{refused}"
        );
        let twin = hub.device_twin("dev-a").expect("twin");
        assert_eq!(twin["reported"]["first"], 1, "{twin}");
        assert!(
            twin["reported"].get("second").is_none(),
            "a throttled patch applied"
        );
        session.twin_get("3".into()).await.expect("answered");
        assert!(answers(&mut session).contains("$iothub/twin/res/200/?$rid=3"));
        session.twin_get("4".into()).await.expect("answered");
        assert!(answers(&mut session).contains("$iothub/twin/res/429/?$rid=4"));
    }

    #[tokio::test]
    async fn a_basic_tier_refuses_twin_and_method_topics_and_keeps_telemetry() {
        let hub = Hub::open(Store::in_memory(), vec!["localhost".into()]).expect("hub");
        let mut session = session(&hub, "dev-a").await;
        let b1 = hub_core::tier::Tier::B1.with_units(1).expect("B1");
        session.throttles = Throttles::of(b1);
        let subscribe = Subscribe::new_many([
            SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
            SubscribeFilter::new("$iothub/twin/res/#".into(), QoS::AtMostOnce),
            SubscribeFilter::new(
                "$iothub/twin/PATCH/properties/desired/#".into(),
                QoS::AtMostOnce,
            ),
            SubscribeFilter::new(
                "devices/dev-a/messages/devicebound/#".into(),
                QoS::AtLeastOnce,
            ),
        ]);
        session.on_subscribe(subscribe).await.expect("answered");
        assert_eq!(session.granted.methods, None);
        assert_eq!(session.granted.twin_responses, None);
        assert_eq!(session.granted.desired, None);
        assert_eq!(session.granted.c2d, Some(GrantedQos::AtLeastOnce));
        // SUBACK: three failures (0x80), then QoS 1 granted.
        assert!(
            session.wbuf.ends_with(&[0x80, 0x80, 0x80, 0x01]),
            "{:?}",
            session.wbuf
        );
        let telemetry = Publish::new("devices/dev-a/messages/events/", QoS::AtMostOnce, "t");
        session
            .on_publish(telemetry)
            .await
            .expect("telemetry flows");
        let twin_get = Publish::new("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, "");
        let end = session
            .on_publish(twin_get)
            .await
            .expect_err("disconnected");
        assert!(
            matches!(&end, End::Forbidden(why) if why.contains("basic tier")),
            "{end}"
        );
        // A standard tier grants the same filters.
        session.throttles = Throttles::of(hub_core::tier::Tier::S1.with_units(1).expect("S1"));
        let subscribe = Subscribe::new("$iothub/twin/res/#", QoS::AtMostOnce);
        session.on_subscribe(subscribe).await.expect("answered");
        assert_eq!(session.granted.twin_responses, Some(GrantedQos::AtMostOnce));
    }

    #[tokio::test]
    async fn telemetry_beyond_the_tier_rate_and_backlog_closes_the_connection() {
        let hub = Hub::open(Store::in_memory(), vec!["localhost".into()]).expect("hub");
        let mut session = session(&hub, "dev-a").await;
        let telemetry = || Publish::new("devices/dev-a/messages/events/", QoS::AtLeastOnce, "t");
        // Unthrottled: any number of sends pass.
        for _ in 0..500 {
            session.on_publish(telemetry()).await.expect("no tier");
        }
        // S1's device-to-cloud rate (100/s) with no burst and no queue: the second send in a
        // row is over it and gets no PUBACK; the connection is closed instead.
        let s1 = hub_core::tier::Tier::S1.with_units(1).expect("S1");
        session.throttles = Throttles::shaped(s1, Duration::ZERO, Duration::ZERO);
        session.wbuf.clear();
        session
            .on_publish(telemetry())
            .await
            .expect("within the rate");
        assert!(!session.wbuf.is_empty(), "PUBACK for the first send");
        session.wbuf.clear();
        let end = session
            .on_publish(telemetry())
            .await
            .expect_err("refused send");
        assert!(matches!(end, End::Throttled(_)), "{end}");
        assert!(session.wbuf.is_empty(), "no PUBACK for a refused send");
        // With a backlog the send is shaped instead: it waits its turn, then is acknowledged.
        session.throttles = Throttles::shaped(s1, Duration::ZERO, Duration::from_secs(1));
        let started = Instant::now();
        session.on_publish(telemetry()).await.expect("first");
        session
            .on_publish(telemetry())
            .await
            .expect("shaped, not refused");
        assert!(
            started.elapsed() >= Duration::from_millis(9),
            "served at 100/s"
        );
    }

    #[tokio::test]
    async fn packet_ids_skip_zero_and_ids_in_flight() {
        let hub = Hub::open(Store::in_memory(), vec!["localhost".into()]).expect("hub");
        let mut session = session(&hub, "dev-a").await;
        session.last_packet_id = u16::MAX - 1;
        session.inflight = vec![u16::MAX, 1];
        assert_eq!(session.next_packet_id(), 2);
        assert_eq!(session.next_packet_id(), 3);
    }
}
