//! An async IoT Hub device client over MQTT 3.1.1 (rumqttc, rustls): direct methods, twin GET,
//! reported patches and desired-property notifications, with reconnects it handles itself.
//! Invariant: rumqttc's `EventLoop` is polled by one task ([`connection`]) that never awaits
//! anything but the socket, a backoff sleep, or shutdown; requests resolve through a pending map.

mod backoff;
mod connection;
mod desired;

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use rustls::ClientConfig;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::connection_string::{DeviceAuth, DeviceConnectionString, SharedKey};
use crate::topic::Topic;

pub use backoff::Backoff;

/// The MQTT/TLS port of IoT Hub.
pub const MQTT_PORT: u16 = 8883;
/// The MQTT-over-WebSocket (TLS) port of IoT Hub.
pub const WEBSOCKET_PORT: u16 = 443;
/// The WebSocket path IoT Hub serves MQTT on.
pub const WEBSOCKET_PATH: &str = "/$iothub/websocket";
/// The api-version we put in the MQTT username.
pub const API_VERSION: &str = "2021-04-12";
/// Largest packet we accept or send: a 128 KiB method payload plus its topic.
pub const MAX_PACKET_SIZE: usize = 136 * 1024;
/// Shortest SAS token lifetime the client mints ([`DeviceClientOptions::sas_ttl`] is raised to
/// it). Short enough for tests to watch several renewals; long enough that a renewal (TLS
/// handshake, CONNACK, three SUBACKs, twin GET) finishes well inside the token's life.
pub const MIN_SAS_TTL: Duration = Duration::from_secs(5);
/// How far ahead of expiry the Python SDK renews its SAS token (its default TTL is 3600 s).
pub const SDK_RENEWAL_MARGIN: Duration = Duration::from_secs(120);

/// How long before a token minted with lifetime `ttl` expires the client renews it: the
/// earlier of "80% of the lifetime has passed" and "[`SDK_RENEWAL_MARGIN`] before expiry", but
/// never more than half the lifetime ahead, so a short token is used for a while before it is
/// replaced.
///
/// Where the numbers come from: the Python SDK renews 120 s before expiry of a 3600 s token; the
/// Node SDK renews with a 900 s margin on a 3600 s token. 20% of 3600 s (720 s) sits between the
/// two. For lifetimes under 600 s, 120 s is the larger margin, and below 240 s it is capped at
/// half the lifetime (a 6 s token is renewed after 3 s).
pub fn renewal_margin(ttl: Duration) -> Duration {
    let ttl = ttl.max(MIN_SAS_TTL);
    (ttl / 5).max(SDK_RENEWAL_MARGIN.min(ttl / 2))
}

/// How the client reaches the hub.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TLS, port from `HostName` (or `GatewayHostName`) else 8883.
    #[default]
    Mqtt,
    /// MQTT over a TLS WebSocket on `/$iothub/websocket`, port from the host else 443.
    MqttWebSocket,
}

/// Settings of a [`DeviceClient`]; `Default` gives the SDKs' values (keep-alive 60 s, 1 h tokens).
#[derive(Clone)]
pub struct DeviceClientOptions {
    /// The TLS configuration (share one `Arc` between many clients).
    pub tls: Arc<ClientConfig>,
    /// TCP/TLS or WebSocket.
    pub transport: Transport,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long [`DeviceClient::connect`] keeps trying before it gives up.
    pub connect_timeout: Duration,
    /// How long a twin request waits for its answer.
    pub operation_timeout: Duration,
    /// Lifetime of the SAS tokens minted from a key (at least [`MIN_SAS_TTL`]). Each token is
    /// renewed [`renewal_margin`] before it expires by reconnecting with a fresh one.
    pub sas_ttl: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// How many method requests may wait for the application before the client answers 503.
    pub method_queue: usize,
    /// `DeviceClientType` sent in the username (URL-encoded by the client).
    pub product_info: String,
}

impl fmt::Debug for DeviceClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceClientOptions")
            .field("transport", &self.transport)
            .field("keep_alive", &self.keep_alive)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("sas_ttl", &self.sas_ttl)
            .field("backoff", &self.backoff)
            .field("method_queue", &self.method_queue)
            .field("product_info", &self.product_info)
            .finish_non_exhaustive()
    }
}

impl DeviceClientOptions {
    /// Defaults with the given TLS configuration (see [`crate::tls::client_config`]).
    pub fn new(tls: Arc<ClientConfig>) -> DeviceClientOptions {
        DeviceClientOptions {
            tls,
            transport: Transport::Mqtt,
            keep_alive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(30),
            sas_ttl: Duration::from_secs(3600),
            backoff: Backoff::default(),
            method_queue: 8,
            product_info: format!("iothub-jobs-rs/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Why [`DeviceClient::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection string asks for something this client does not do.
    #[error(
        "device {device_id}: {what} is not supported by this client; use a SharedAccessKey or SharedAccessSignature"
    )]
    Unsupported {
        /// The device.
        device_id: String,
        /// What.
        what: &'static str,
    },
    /// The given SharedAccessSignature has expired.
    #[error(
        "the SharedAccessSignature for device {device_id} expired at {expiry} (Unix time); \
         make a new token or use a connection string with SharedAccessKey"
    )]
    TokenExpired {
        /// The device.
        device_id: String,
        /// When it expired.
        expiry: u64,
    },
    /// CONNACK 4 or 5: bad key, expired token, unknown or disabled device.
    #[error(
        "the hub refused the credentials for device {device_id} (CONNACK {code}: {reason}): \
         check the key/connection string and that the device is registered and enabled"
    )]
    Refused {
        /// The device.
        device_id: String,
        /// The CONNACK return code.
        code: u8,
        /// Its meaning.
        reason: &'static str,
    },
    /// Another CONNACK refusal (protocol, client id, server unavailable).
    #[error(
        "the hub at {addr} refused the connection for device {device_id} (CONNACK {code}: {reason})"
    )]
    Rejected {
        /// The device.
        device_id: String,
        /// host:port.
        addr: String,
        /// The CONNACK return code.
        code: u8,
        /// Its meaning.
        reason: &'static str,
    },
    /// TLS failed: certificate not trusted, wrong name, or no common protocol.
    #[error(
        "TLS with {addr} failed: {detail}; if the hub uses a private CA (the local hub-emulator does), \
         pass its ca.pem with --ca-file or IOTHUB_CA_FILE"
    )]
    Tls {
        /// host:port.
        addr: String,
        /// rustls' reason.
        detail: String,
    },
    /// The hub could not be reached within the connect timeout.
    #[error("cannot reach the hub at {addr} within {}s: {last_error}", timeout.as_secs_f32())]
    Unreachable {
        /// host:port.
        addr: String,
        /// The budget that ran out.
        timeout: Duration,
        /// The last error seen.
        last_error: String,
    },
}

/// Why a request on a connected client failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceClientError {
    /// No answer within the operation timeout.
    #[error("device {device_id}: no answer to {what} within {}s", timeout.as_secs_f32())]
    Timeout {
        /// The device.
        device_id: String,
        /// The request.
        what: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The hub answered with an error status.
    #[error("device {device_id}: the hub answered {what} with status {status}")]
    Status {
        /// The device.
        device_id: String,
        /// The request.
        what: &'static str,
        /// The status from the topic.
        status: u16,
    },
    /// The hub's answer was not what IoT Hub sends.
    #[error("device {device_id}: unexpected answer to {what}: {detail}")]
    BadAnswer {
        /// The device.
        device_id: String,
        /// The request.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The client was closed.
    #[error("device {device_id}: the client is closed")]
    Closed {
        /// The device.
        device_id: String,
    },
}

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionStatus {
    /// Connected and subscribed.
    Connected,
    /// Lost; trying again.
    Reconnecting {
        /// Attempts since the connection was lost.
        attempt: u32,
        /// Why the last attempt (or the connection) failed.
        error: String,
    },
    /// Closed for good (shutdown, or credentials that cannot be renewed were refused).
    Closed {
        /// Why, if not a requested shutdown.
        error: Option<String>,
    },
}

/// Counters of one client's connection, for monitoring and tests (see [`DeviceClient::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionStats {
    /// CONNACKs received: 1 after [`DeviceClient::connect`], one more per reconnect.
    pub connects: u64,
    /// Reconnects started to renew the SAS token before it expired. While connected,
    /// `connects - 1 - renewals` is the number of reconnects after a lost connection.
    pub renewals: u64,
    /// Connect attempts (the first connect's and reconnects') the hub refused with CONNACK 3,
    /// server unavailable: IoT Hub's answer to a connect beyond its new-connection throttle.
    /// Each was retried after a fully jittered backoff.
    pub throttled: u64,
    /// When the token of the latest connection expires (Unix seconds); `None` if unknown.
    pub token_expiry: Option<u64>,
}

/// The twin as a device sees it: `{"desired": {..,"$version":n}, "reported": {..,"$version":m}}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TwinDocument {
    /// Desired properties, with `$version`.
    pub desired: Value,
    /// Reported properties, with `$version`.
    pub reported: Value,
}

impl TwinDocument {
    /// Parses a twin GET answer.
    pub fn from_json(body: &[u8]) -> Result<TwinDocument, String> {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(mut map) = value else {
            return Err("not a JSON object".into());
        };
        let desired = map
            .remove("desired")
            .unwrap_or_else(|| Value::Object(Default::default()));
        let reported = map
            .remove("reported")
            .unwrap_or_else(|| Value::Object(Default::default()));
        if !desired.is_object() || !reported.is_object() {
            return Err("desired and reported must be objects".into());
        }
        Ok(TwinDocument { desired, reported })
    }

    /// `desired.$version` (0 when absent).
    pub fn desired_version(&self) -> u64 {
        self.desired
            .get("$version")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// `reported.$version` (0 when absent).
    pub fn reported_version(&self) -> u64 {
        self.reported
            .get("$version")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// A desired-properties change, delivered once and in `$version` order.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPatch {
    /// The desired `$version` after this change.
    pub version: u64,
    /// The patch as the hub sent it (with `$version`; `null` members mean "deleted"), or the
    /// whole desired section when `full`.
    pub patch: Value,
    /// True when changes were missed while disconnected and this is the full desired state,
    /// re-read after the reconnect (as the Python SDK does).
    pub full: bool,
}

/// A direct-method call from the hub; answer it with [`MethodRequest::respond`].
pub struct MethodRequest {
    /// The method name (percent-decoded).
    pub name: String,
    /// The hub's request id.
    pub rid: String,
    /// The raw payload (possibly empty).
    pub payload: Bytes,
    responder: AsyncClient,
}

impl fmt::Debug for MethodRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodRequest")
            .field("name", &self.name)
            .field("rid", &self.rid)
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .finish()
    }
}

impl MethodRequest {
    /// The payload as JSON: `Ok(None)` when empty (or only whitespace), `Err` when not JSON.
    pub fn json(&self) -> Result<Option<Value>, serde_json::Error> {
        if self.payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&self.payload).map(Some)
    }

    /// Answers with `status` and a JSON body.
    pub async fn respond(self, status: i32, body: &Value) -> Result<(), DeviceClientError> {
        self.respond_raw(status, Bytes::from(body.to_string()))
            .await
    }

    /// Answers with `status` and a body sent as is (valid JSON or empty, says IoT Hub).
    pub async fn respond_raw(self, status: i32, body: Bytes) -> Result<(), DeviceClientError> {
        let topic = Topic::MethodResponse {
            status,
            rid: self.rid,
        }
        .to_string();
        self.responder
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|_| DeviceClientError::Closed {
                device_id: String::new(),
            })
    }
}

/// The method requests of one client (a `Stream`, or call [`MethodRequests::recv`]).
#[derive(Debug)]
pub struct MethodRequests {
    rx: mpsc::Receiver<Box<MethodRequest>>,
}

impl MethodRequests {
    /// The next request; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<MethodRequest> {
        self.rx.recv().await.map(|b| *b)
    }
}

impl futures_util::Stream for MethodRequests {
    type Item = MethodRequest;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<MethodRequest>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| *b))
    }
}

/// The desired-property changes of one client (a `Stream`, or call [`DesiredPatches::recv`]).
#[derive(Debug)]
pub struct DesiredPatches {
    rx: mpsc::UnboundedReceiver<Box<DesiredPatch>>,
}

impl DesiredPatches {
    /// The next change; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<DesiredPatch> {
        self.rx.recv().await.map(|b| *b)
    }
}

impl futures_util::Stream for DesiredPatches {
    type Item = DesiredPatch;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DesiredPatch>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| *b))
    }
}

/// What [`DeviceClient::connect`] returns: the client, its two incoming streams, and the twin
/// read right after connecting. The desired stream carries every change after `twin`.
#[derive(Debug)]
pub struct Connected {
    /// The client handle (cheap to clone).
    pub client: DeviceClient,
    /// Direct-method calls.
    pub methods: MethodRequests,
    /// Desired-property changes after `twin`.
    pub desired: DesiredPatches,
    /// The twin as read on connect.
    pub twin: TwinDocument,
}

/// An answer on `$iothub/twin/res/{status}/?$rid=..`.
#[derive(Debug)]
struct TwinReply {
    status: u16,
    version: Option<u64>,
    body: Bytes,
}

type Waiter = oneshot::Sender<Result<TwinReply, Lost>>;

/// The connection dropped before the answer came.
#[derive(Debug)]
struct Lost;

/// State shared by the handles and the event-loop task. Its mutex is never held across `.await`
/// (std `Mutex`: the critical sections are a map insert/remove).
#[derive(Debug)]
struct Shared {
    device_id: String,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_rid: AtomicU64,
    /// [`ConnectionStats`], written by the connection task only.
    connects: AtomicU64,
    renewals: AtomicU64,
    throttled: AtomicU64,
    /// 0: unknown.
    token_expiry: AtomicU64,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Waiter>> {
        // A poisoned map only means a panic elsewhere; the map itself is still consistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail_pending(&self) {
        for (_, waiter) in self.pending().drain() {
            let _ = waiter.send(Err(Lost));
        }
    }
}

/// A connected device. Clones share one connection; the connection closes when
/// [`DeviceClient::close`] is called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct DeviceClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    requests: AsyncClient,
    status: watch::Receiver<ConnectionStatus>,
    operation_timeout: Duration,
    shutdown: CancellationToken,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How the MQTT password is made.
#[derive(Clone)]
enum Credentials {
    /// Minted from the key, renewed before expiry.
    Key {
        key: SharedKey,
        resource: String,
        ttl: Duration,
    },
    /// Given as is; cannot be renewed.
    Fixed { token: String, expiry: Option<u64> },
}

impl Credentials {
    /// A password and its expiry (Unix seconds).
    fn password(&self) -> (String, Option<u64>) {
        match self {
            Credentials::Key { key, resource, ttl } => {
                // `se` is whole seconds: round up, so the token lives at least `ttl`.
                let until = unix_now_precise() + (*ttl).max(MIN_SAS_TTL);
                let expiry = until.as_secs() + u64::from(until.subsec_nanos() > 0);
                (
                    crate::sas::generate(resource, key, None, expiry),
                    Some(expiry),
                )
            }
            Credentials::Fixed { token, expiry } => (token.clone(), *expiry),
        }
    }

    fn renewable(&self) -> bool {
        matches!(self, Credentials::Key { .. })
    }
}

fn unix_now() -> u64 {
    unix_now_precise().as_secs()
}

fn unix_now_precise() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `DeviceClientType` and any value in the username: Python `quote(s, safe="")`.
fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl DeviceClient {
    /// Connects, subscribes to methods, twin responses and desired patches, and reads the twin.
    /// Retries unreachable hubs with backoff until `options.connect_timeout`; refused
    /// credentials and TLS failures end it at once.
    pub async fn connect(
        cs: &DeviceConnectionString,
        options: &DeviceClientOptions,
    ) -> Result<Connected, ConnectError> {
        let device_id = cs.device_id.clone();
        let credentials = match &cs.auth {
            DeviceAuth::SharedAccessKey(key) => Credentials::Key {
                key: key.clone(),
                resource: cs.resource_uri(),
                ttl: options.sas_ttl,
            },
            DeviceAuth::SharedAccessSignature(token) => {
                let expiry = crate::sas::SasToken::parse(token).ok().map(|t| t.expiry);
                if let Some(expiry) = expiry
                    && expiry <= unix_now()
                {
                    return Err(ConnectError::TokenExpired { device_id, expiry });
                }
                Credentials::Fixed {
                    token: token.clone(),
                    expiry,
                }
            }
            DeviceAuth::X509 => {
                return Err(ConnectError::Unsupported {
                    device_id,
                    what: "X.509 authentication (x509=true)",
                });
            }
        };

        let transport_host = cs.transport_host();
        let (mut mqtt, addr) = match options.transport {
            Transport::Mqtt => {
                let port = transport_host.port_or(MQTT_PORT);
                let mut mqtt = MqttOptions::new(cs.client_id(), transport_host.host(), port);
                mqtt.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                    options.tls.clone(),
                )));
                (mqtt, format!("{}:{port}", transport_host.host()))
            }
            Transport::MqttWebSocket => {
                let port = transport_host.port_or(WEBSOCKET_PORT);
                let url = format!("wss://{}:{port}{WEBSOCKET_PATH}", transport_host.host());
                let mut mqtt = MqttOptions::new(cs.client_id(), url.clone(), port);
                mqtt.set_transport(rumqttc::Transport::Wss(rumqttc::TlsConfiguration::Rustls(
                    options.tls.clone(),
                )));
                (mqtt, url)
            }
        };
        let client_type = url_encode(&options.product_info);
        let username = match &cs.module_id {
            Some(m) => format!(
                "{}/{}/{m}/?api-version={API_VERSION}&DeviceClientType={client_type}",
                cs.host_name, cs.device_id
            ),
            None => format!(
                "{}/{}/?api-version={API_VERSION}&DeviceClientType={client_type}",
                cs.host_name, cs.device_id
            ),
        };
        let (password, expiry) = credentials.password();
        mqtt.set_credentials(username.clone(), password)
            .set_clean_session(false)
            .set_keep_alive(options.keep_alive)
            .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE)
            .set_inflight(8)
            .set_request_channel_capacity(8);
        let (requests, mut eventloop) = AsyncClient::new(mqtt, 8);
        // rumqttc preallocates room for 100 buffered events (144 bytes each, ~14 KiB per client);
        // a device sees a handful at a time, so let the queue grow on demand instead.
        eventloop.state.events = std::collections::VecDeque::new();
        let mut network = eventloop.network_options();
        network.set_connection_timeout(options.connect_timeout.as_secs().clamp(1, 10));
        // A device's answers (PUBACKs, method responses) are small writes that must not wait for
        // the hub's delayed ACK: rumqttc leaves Nagle on by default, which held each direct
        // method's round trip at about 40 ms (attack_bench's baseline).
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);

        let shared = Arc::new(Shared {
            device_id: device_id.clone(),
            pending: Mutex::new(HashMap::new()),
            next_rid: AtomicU64::new(1),
            connects: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            token_expiry: AtomicU64::new(0),
        });
        let (methods_tx, methods_rx) = mpsc::channel(options.method_queue.max(1));
        let (desired_tx, desired_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(ConnectionStatus::Reconnecting {
            attempt: 0,
            error: String::new(),
        });
        let (first_twin_tx, first_twin_rx) = oneshot::channel();
        let shutdown = CancellationToken::new();

        let deadline = tokio::time::Instant::now() + options.connect_timeout;
        connection::first_connect(&mut eventloop, &shared, &addr, options, deadline).await?;

        let task = connection::Connection {
            eventloop,
            shared: shared.clone(),
            responder: requests.clone(),
            methods: methods_tx,
            desired: desired_tx,
            status: status_tx,
            credentials,
            token_expiry: expiry,
            ttl: options.sas_ttl,
            backoff: options.backoff,
            tracker: desired::DesiredTracker::default(),
            first_twin: Some(first_twin_tx),
            resync: None,
            resync_retry: None,
            resync_refusals: 0,
            subacks_due: 0,
            carry: Vec::new(),
            shutdown: shutdown.clone(),
            addr: addr.clone(),
        };
        let handle = tokio::spawn(task.run_connected());
        let client = DeviceClient {
            inner: Arc::new(Inner {
                shared,
                requests,
                status: status_rx,
                operation_timeout: options.operation_timeout,
                shutdown,
                done: Mutex::new(Some(handle)),
            }),
        };
        let twin = match tokio::time::timeout_at(
            deadline.max(tokio::time::Instant::now() + options.operation_timeout),
            first_twin_rx,
        )
        .await
        {
            Ok(Ok(twin)) => twin,
            Ok(Err(_)) | Err(_) => {
                client.inner.shutdown.cancel();
                let last_error = match &*client.inner.status.borrow() {
                    ConnectionStatus::Reconnecting { error, .. } if !error.is_empty() => {
                        error.clone()
                    }
                    ConnectionStatus::Closed { error: Some(error) } => error.clone(),
                    _ => "connected, but the twin could not be read".to_owned(),
                };
                return Err(ConnectError::Unreachable {
                    addr,
                    timeout: options.connect_timeout,
                    last_error,
                });
            }
        };
        Ok(Connected {
            client,
            methods: MethodRequests { rx: methods_rx },
            desired: DesiredPatches { rx: desired_rx },
            twin,
        })
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.inner.shared.device_id
    }

    /// Watches the connection status.
    pub fn status(&self) -> watch::Receiver<ConnectionStatus> {
        self.inner.status.clone()
    }

    /// How often it connected, renewed its token and was throttled reconnecting, and when the current token expires.
    pub fn stats(&self) -> ConnectionStats {
        let shared = &self.inner.shared;
        let expiry = shared.token_expiry.load(Ordering::Relaxed);
        ConnectionStats {
            connects: shared.connects.load(Ordering::Relaxed),
            renewals: shared.renewals.load(Ordering::Relaxed),
            throttled: shared.throttled.load(Ordering::Relaxed),
            token_expiry: (expiry != 0).then_some(expiry),
        }
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.inner.status.borrow(), ConnectionStatus::Connected)
    }

    /// Reads the twin (`$iothub/twin/GET`).
    pub async fn get_twin(&self) -> Result<TwinDocument, DeviceClientError> {
        let reply = self
            .request(
                "twin GET",
                |rid| Topic::TwinGet { rid }.to_string(),
                Bytes::from_static(b" "),
            )
            .await?;
        if reply.status != 200 {
            return Err(self.status_error("twin GET", reply.status));
        }
        TwinDocument::from_json(&reply.body).map_err(|detail| DeviceClientError::BadAnswer {
            device_id: self.device_id().to_owned(),
            what: "twin GET",
            detail,
        })
    }

    /// Patches reported properties; returns the new reported `$version`.
    pub async fn patch_reported(&self, patch: &Value) -> Result<u64, DeviceClientError> {
        let body = Bytes::from(patch.to_string());
        let reply = self
            .request(
                "reported patch",
                |rid| Topic::TwinPatchReported { rid }.to_string(),
                body,
            )
            .await?;
        if !(200..300).contains(&reply.status) {
            return Err(self.status_error("reported patch", reply.status));
        }
        reply.version.ok_or_else(|| DeviceClientError::BadAnswer {
            device_id: self.device_id().to_owned(),
            what: "reported patch",
            detail: "the answer carries no $version".into(),
        })
    }

    fn status_error(&self, what: &'static str, status: u16) -> DeviceClientError {
        DeviceClientError::Status {
            device_id: self.device_id().to_owned(),
            what,
            status,
        }
    }

    /// Sends a twin request and waits for its answer; a request lost to a reconnect is sent
    /// again on the new connection until the operation timeout runs out.
    async fn request(
        &self,
        what: &'static str,
        topic: impl Fn(String) -> String,
        body: Bytes,
    ) -> Result<TwinReply, DeviceClientError> {
        let timeout = self.inner.operation_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || DeviceClientError::Timeout {
            device_id: self.device_id().to_owned(),
            what,
            timeout,
        };
        let mut status = self.inner.status.clone();
        loop {
            if self.inner.shutdown.is_cancelled() {
                return Err(DeviceClientError::Closed {
                    device_id: self.device_id().to_owned(),
                });
            }
            // Wait for a connection rather than queueing into one that is down.
            // The watch guard must not live across the awaits below: reduce it to a bool here.
            let connected = tokio::time::timeout_at(
                deadline,
                status.wait_for(|s| {
                    matches!(
                        s,
                        ConnectionStatus::Connected | ConnectionStatus::Closed { .. }
                    )
                }),
            )
            .await
            .map(|r| r.map(|s| matches!(*s, ConnectionStatus::Connected)));
            match connected {
                Err(_) => return Err(timed_out()),
                Ok(Ok(true)) => {}
                Ok(Ok(false)) | Ok(Err(_)) => {
                    return Err(DeviceClientError::Closed {
                        device_id: self.device_id().to_owned(),
                    });
                }
            }
            let rid = self.inner.shared.next_rid.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.inner.shared.pending().insert(rid, tx);
            let send = self.inner.requests.publish(
                topic(rid.to_string()),
                QoS::AtLeastOnce,
                false,
                body.clone(),
            );
            let outcome = tokio::time::timeout_at(deadline, async {
                send.await.map_err(|_| None)?;
                rx.await.map_err(|_| None)?.map_err(Some)
            })
            .await;
            match outcome {
                Ok(Ok(reply)) => return Ok(reply),
                // Lost to a disconnect: try again on the next connection.
                Ok(Err(Some(Lost))) => continue,
                Ok(Err(None)) => {
                    return Err(DeviceClientError::Closed {
                        device_id: self.device_id().to_owned(),
                    });
                }
                Err(_) => {
                    self.inner.shared.pending().remove(&rid);
                    return Err(timed_out());
                }
            }
        }
    }

    /// Disconnects cleanly (MQTT DISCONNECT) and waits for the connection task to end.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        let handle = self
            .inner
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_margin_follows_the_sdks_and_scales_for_short_tokens() {
        let secs = Duration::from_secs;
        // The 3600 s default: renewed after 48 min, between Python (58 min) and Node (45 min).
        assert_eq!(renewal_margin(secs(3600)), secs(720));
        // Where 120 s is the earlier renewal.
        assert_eq!(renewal_margin(secs(300)), secs(120));
        // Short test tokens: halfway.
        assert_eq!(renewal_margin(secs(6)), secs(3));
        // Below the floor the floor's margin applies.
        assert_eq!(renewal_margin(secs(1)), renewal_margin(MIN_SAS_TTL));
        for ttl in [1, 5, 6, 30, 59, 60, 61, 239, 240, 600, 3600, 86_400] {
            let ttl = secs(ttl);
            let margin = renewal_margin(ttl);
            assert!(margin < ttl.max(MIN_SAS_TTL), "{ttl:?}: {margin:?}");
            assert!(margin >= ttl / 5, "{ttl:?}: {margin:?}");
        }
    }

    #[test]
    fn minted_tokens_live_at_least_the_ttl_and_at_least_the_floor() {
        let key = SharedKey::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec());
        let mint = |ttl: Duration| {
            let credentials = Credentials::Key {
                key: key.clone(),
                resource: "hub.example/devices/d".into(),
                ttl,
            };
            let before = unix_now_precise();
            let (token, expiry) = credentials.password();
            let expiry = expiry.expect("a minted token has an expiry");
            let parsed = crate::sas::SasToken::parse(&token).expect("parses");
            assert_eq!(parsed.expiry, expiry);
            Duration::from_secs(expiry).saturating_sub(before)
        };
        let life = mint(Duration::from_secs(6));
        assert!(
            life >= Duration::from_secs(6) && life <= Duration::from_secs(8),
            "{life:?}"
        );
        let life = mint(Duration::from_secs(1));
        assert!(life >= MIN_SAS_TTL, "{life:?}");
        // The old 60 s floor is gone.
        assert!(life < Duration::from_secs(10), "{life:?}");
    }
}
