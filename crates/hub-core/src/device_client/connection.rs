//! The connection task: owns rumqttc's `EventLoop` and polls it continuously. It routes incoming
//! publishes (methods, twin answers, desired patches), resubscribes and re-reads the twin after
//! each CONNACK, renews SAS tokens, and reconnects with backoff. It never awaits the application:
//! channels are `try_send`/unbounded and its own publishes go straight into the event loop's queue.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    ConnectionError, Disconnect, Event, EventLoop, Outgoing, Packet, Publish, QoS, Request,
    Subscribe,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::desired::{DesiredTracker, Step};
use super::{
    Backoff, ConnectError, ConnectionStatus, Credentials, DesiredPatch, DeviceClientOptions,
    MethodRequest, Shared, TwinDocument, TwinReply, renewal_margin, unix_now_precise,
};
use crate::topic::{Topic, TopicFilter};

/// How a failed attempt is treated.
enum Failure {
    /// CONNACK 4/5.
    Refused(u8),
    /// Another CONNACK refusal that retrying will not fix (1, 2).
    Rejected(u8),
    /// Certificate or handshake failure.
    Tls(String),
    /// CONNACK 3, server unavailable: IoT Hub's answer to a connect beyond its new-connection
    /// throttle. Worth retrying, after a fully jittered backoff so a refused crowd spreads out.
    Unavailable,
    /// Worth retrying (network, timeout).
    Transient(String),
}

impl Failure {
    /// How the failure reads in logs and [`ConnectionStatus::Reconnecting`].
    fn describe(&self) -> String {
        match self {
            Failure::Refused(code) | Failure::Rejected(code) => {
                format!("CONNACK {code}: {}", connack_reason(*code))
            }
            Failure::Unavailable => format!("CONNACK 3: {}", connack_reason(3)),
            Failure::Tls(detail) => format!("TLS: {detail}"),
            Failure::Transient(text) => text.clone(),
        }
    }

    /// The wait before retry `attempt` (0-based) after this failure.
    fn backoff(&self, backoff: &Backoff, attempt: u32) -> Duration {
        match self {
            Failure::Unavailable => backoff.full_jitter(attempt),
            _ => backoff.delay(attempt),
        }
    }
}

fn connack_reason(code: u8) -> &'static str {
    match code {
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

fn classify(e: &ConnectionError) -> Failure {
    if let ConnectionError::ConnectionRefused(code) = e {
        let code = *code as u8;
        return match code {
            4 | 5 => Failure::Refused(code),
            3 => Failure::Unavailable,
            _ => Failure::Rejected(code),
        };
    }
    if let Some(tls) = crate::tls::find_rustls_error(e) {
        return Failure::Tls(tls.to_string());
    }
    Failure::Transient(chain(e))
}

fn refused(device_id: &str, addr: &str, code: u8) -> ConnectError {
    match code {
        4 | 5 => ConnectError::Refused {
            device_id: device_id.to_owned(),
            code,
            reason: connack_reason(code),
        },
        _ => ConnectError::Rejected {
            device_id: device_id.to_owned(),
            addr: addr.to_owned(),
            code,
            reason: connack_reason(code),
        },
    }
}

/// Polls until the first CONNACK, retrying transient failures with backoff until `deadline`;
/// CONNACK 3 refusals are counted in `shared` ([`super::ConnectionStats::throttled`]).
pub(super) async fn first_connect(
    eventloop: &mut EventLoop,
    shared: &Shared,
    addr: &str,
    options: &DeviceClientOptions,
    deadline: Instant,
) -> Result<(), ConnectError> {
    let device_id = shared.device_id.as_str();
    let mut attempt = 0;
    let mut last_error = String::from("no connection attempt finished");
    let unreachable = |last_error: String| ConnectError::Unreachable {
        addr: addr.to_owned(),
        timeout: options.connect_timeout,
        last_error,
    };
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return Err(unreachable(last_error)),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let failure = classify(&e);
                match &failure {
                    Failure::Refused(code) | Failure::Rejected(code) => {
                        return Err(refused(device_id, addr, *code));
                    }
                    Failure::Tls(detail) => {
                        return Err(ConnectError::Tls {
                            addr: addr.to_owned(),
                            detail: detail.clone(),
                        });
                    }
                    Failure::Unavailable | Failure::Transient(_) => {}
                }
                let text = failure.describe();
                if matches!(failure, Failure::Unavailable) {
                    shared.throttled.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(device_id, attempt, error = %text, "connect attempt failed");
                last_error = text;
                let wake = Instant::now() + failure.backoff(&options.backoff, attempt);
                if wake >= deadline {
                    return Err(unreachable(last_error));
                }
                tokio::time::sleep_until(wake).await;
                attempt += 1;
            }
        }
    }
}

/// The task's state; see the module docs.
pub(super) struct Connection {
    pub(super) eventloop: EventLoop,
    pub(super) shared: std::sync::Arc<Shared>,
    pub(super) responder: rumqttc::AsyncClient,
    pub(super) methods: mpsc::Sender<Box<MethodRequest>>,
    pub(super) desired: mpsc::UnboundedSender<Box<DesiredPatch>>,
    pub(super) status: watch::Sender<ConnectionStatus>,
    pub(super) credentials: Credentials,
    pub(super) token_expiry: Option<u64>,
    pub(super) ttl: Duration,
    pub(super) backoff: Backoff,
    pub(super) tracker: DesiredTracker,
    pub(super) first_twin: Option<oneshot::Sender<TwinDocument>>,
    /// The `$rid` of the twin read in flight after a (re)connect.
    pub(super) resync: Option<String>,
    /// When to ask again for a twin read the hub refused (429 beyond its twin-read rate, 5xx),
    /// and how many were refused in a row: the retries back off with full jitter, so a fleet
    /// refused together does not ask again in lock step.
    pub(super) resync_retry: Option<Instant>,
    pub(super) resync_refusals: u32,
    pub(super) subacks_due: u8,
    /// Publishes to send again on the next connection (see [`Connection::keep_for_next`]).
    pub(super) carry: Vec<Request>,
    pub(super) shutdown: CancellationToken,
    pub(super) addr: String,
}

/// Resync request ids are `s{n}`; application requests are plain numbers.
const RESYNC_PREFIX: char = 's';
/// How long the hub gets to close the connection after our DISCONNECT on a token renewal
/// before we drop it ourselves. IoT Hub and the emulator close at once; this only bounds a hub
/// that does not.
const RENEW_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most publishes kept for the next connection: method answers, bounded in practice by the
/// method queue; the cap only guards against a hub that never comes back.
const MAX_CARRY: usize = 256;
/// `ConnectionStatus::Reconnecting::error` while a renewal reconnects.
const RENEWING: &str = "renewing the SAS token";

impl Connection {
    fn device_id(&self) -> &str {
        &self.shared.device_id
    }

    /// When to reconnect with a fresh token: [`renewal_margin`] before the current one expires.
    /// Computed from the wall clock (as `se` is) every time, so a suspended machine that wakes
    /// late renews at once.
    fn renew_at(&self) -> Option<Instant> {
        if !self.credentials.renewable() {
            return None;
        }
        let expiry = Duration::from_secs(self.token_expiry?);
        let left = expiry
            .saturating_sub(renewal_margin(self.ttl))
            .saturating_sub(unix_now_precise());
        Some(Instant::now() + left)
    }

    fn refresh_password(&mut self) {
        if self.credentials.renewable() {
            let (password, expiry) = self.credentials.password();
            let username = self
                .eventloop
                .mqtt_options
                .credentials()
                .map(|l| l.username)
                .unwrap_or_default();
            self.eventloop
                .mqtt_options
                .set_credentials(username, password);
            self.token_expiry = expiry;
        }
    }

    /// Runs after `first_connect` returned a CONNACK, until shutdown or a fatal refusal.
    pub(super) async fn run_connected(mut self) {
        self.on_connack();
        let mut attempt: u32 = 0;
        // Set while a renewal's DISCONNECT waits for the hub to close the connection.
        let mut renewing: Option<Instant> = None;
        loop {
            let renew_at = self.renew_at();
            // Only a live connection is renewed: cancelling `poll` mid-connect would waste the
            // attempt, and each attempt already uses a freshly minted token.
            let may_renew =
                renew_at.is_some() && renewing.is_none() && self.eventloop.network.is_some();
            let event = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                _ = sleep_until_opt(renew_at), if may_renew => {
                    // A new password needs a new connection (MQTT 3.1.1 has no re-auth), as in
                    // the Python SDK. DISCONNECT goes after what is already queued; the hub
                    // closes the socket after it, and reading until then still delivers what
                    // the hub sent before it saw the DISCONNECT. The error path below then
                    // reconnects at once with the new token, well before the old one expires.
                    tracing::debug!(device_id = self.device_id(), "renewing the SAS token");
                    self.shared.renewals.fetch_add(1, Ordering::Relaxed);
                    self.refresh_password();
                    self.eventloop.pending.push_back(Request::Disconnect(Disconnect));
                    renewing = Some(Instant::now() + RENEW_CLOSE_TIMEOUT);
                    continue;
                }
                // Like a renewal, only on a live connection (see `may_renew`).
                _ = sleep_until_opt(self.resync_retry), if self.resync_retry.is_some() && self.eventloop.network.is_some() => {
                    self.send_twin_get();
                    continue;
                }
                _ = sleep_until_opt(renewing), if renewing.is_some() => {
                    // The hub did not close after our DISCONNECT: drop the connection ourselves.
                    // `clean` moves unacknowledged publishes back to `pending`, as an error does.
                    self.eventloop.clean();
                    Err(ConnectionError::NetworkTimeout)
                }
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    attempt = 0;
                    self.on_connack();
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.on_publish(publish),
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    self.subacks_due = self.subacks_due.saturating_sub(1);
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::warn!(
                            device_id = self.device_id(),
                            "the hub refused a subscription"
                        );
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.shared.fail_pending();
                    self.tracker.on_disconnect();
                    self.resync = None;
                    // The next CONNACK reads the twin anew.
                    self.resync_retry = None;
                    self.keep_for_next();
                    let renewal = renewing.take().is_some() && attempt == 0;
                    let failure = classify(&e);
                    let text = failure.describe();
                    if matches!(failure, Failure::Unavailable) {
                        self.shared.throttled.fetch_add(1, Ordering::Relaxed);
                    }
                    if matches!(failure, Failure::Refused(_)) && !self.credentials.renewable() {
                        tracing::warn!(device_id = self.device_id(), error = %text, "the hub refused the given SAS token; giving up");
                        self.status
                            .send_replace(ConnectionStatus::Closed { error: Some(text) });
                        return;
                    }
                    if renewal {
                        tracing::debug!(
                            device_id = self.device_id(),
                            "reconnecting with the new token"
                        );
                        self.status.send_replace(ConnectionStatus::Reconnecting {
                            attempt,
                            error: RENEWING.to_owned(),
                        });
                    } else {
                        tracing::info!(device_id = self.device_id(), attempt, error = %text, "connection lost; reconnecting");
                        self.status.send_replace(ConnectionStatus::Reconnecting {
                            attempt,
                            error: text,
                        });
                        let delay = failure.backoff(&self.backoff, attempt);
                        tokio::select! {
                            _ = self.shutdown.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        // A token minted before the backoff may be close to expiry by now.
                        self.refresh_password();
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
        self.close().await;
    }

    /// After a connection ended: keeps the publishes that must survive it and drops the rest
    /// from rumqttc's queue. rumqttc clears that queue on a CONNACK without `session_present`
    /// (the emulator never sets it; IoT Hub may not), which would lose method answers the
    /// application gave around the reconnect, though the hub still waits for them (a method
    /// request outlives its session until its response timeout). Twin requests are dropped:
    /// [`super::DeviceClient::request`] sends them again under a new `$rid`, and the connect
    /// resync sends its own GET. Subscriptions are made anew on each CONNACK.
    fn keep_for_next(&mut self) {
        for request in self.eventloop.pending.drain(..) {
            let Request::Publish(mut publish) = request else {
                continue;
            };
            if publish.topic.starts_with("$iothub/twin/") {
                continue;
            }
            if self.carry.len() >= MAX_CARRY {
                tracing::warn!(
                    device_id = %self.shared.device_id,
                    topic = %publish.topic,
                    "too many messages waiting for a connection; dropping one"
                );
                continue;
            }
            // A new session: the old packet id means nothing there and could collide.
            publish.pkid = 0;
            publish.dup = false;
            self.carry.push(Request::Publish(publish));
        }
    }

    async fn close(&mut self) {
        self.shared.fail_pending();
        if self.eventloop.network.is_some() {
            self.eventloop
                .pending
                .push_front(Request::Disconnect(Disconnect));
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        self.eventloop.network = None;
        self.status
            .send_replace(ConnectionStatus::Closed { error: None });
    }

    /// Subscribes (ahead of anything queued) and reads the twin to catch up on desired changes.
    fn on_connack(&mut self) {
        tracing::debug!(device_id = self.device_id(), addr = %self.addr, "connected");
        let rid = format!(
            "{RESYNC_PREFIX}{}",
            self.shared.next_rid.fetch_add(1, Ordering::Relaxed)
        );
        let mut first = vec![
            Request::Subscribe(Subscribe::new(
                TopicFilter::Methods.to_string(),
                QoS::AtLeastOnce,
            )),
            Request::Subscribe(Subscribe::new(
                TopicFilter::TwinResponses.to_string(),
                QoS::AtLeastOnce,
            )),
            Request::Subscribe(Subscribe::new(
                TopicFilter::TwinDesired.to_string(),
                QoS::AtLeastOnce,
            )),
            Request::Publish(Publish::new(
                Topic::TwinGet { rid: rid.clone() }.to_string(),
                QoS::AtLeastOnce,
                " ",
            )),
        ];
        self.subacks_due = 3;
        // Subscriptions and the resync GET first, then what the last connection left unsent.
        first.append(&mut self.carry);
        while let Some(request) = first.pop() {
            self.eventloop.pending.push_front(request);
        }
        if self.first_twin.is_none() {
            self.tracker.begin_resync();
        }
        self.resync = Some(rid);
        self.shared.connects.fetch_add(1, Ordering::Relaxed);
        self.shared
            .token_expiry
            .store(self.token_expiry.unwrap_or(0), Ordering::Relaxed);
        self.status.send_replace(ConnectionStatus::Connected);
    }

    fn send_twin_get(&mut self) {
        // This read replaces any retry still waiting.
        self.resync_retry = None;
        let rid = format!(
            "{RESYNC_PREFIX}{}",
            self.shared.next_rid.fetch_add(1, Ordering::Relaxed)
        );
        self.eventloop
            .pending
            .push_back(Request::Publish(Publish::new(
                Topic::TwinGet { rid: rid.clone() }.to_string(),
                QoS::AtLeastOnce,
                " ",
            )));
        self.resync = Some(rid);
    }

    fn respond_now(&mut self, rid: String, status: i32, body: Value) {
        let topic = Topic::MethodResponse { status, rid }.to_string();
        self.eventloop
            .pending
            .push_back(Request::Publish(Publish::new(
                topic,
                QoS::AtLeastOnce,
                body.to_string(),
            )));
    }

    fn on_publish(&mut self, publish: Publish) {
        let topic = match Topic::parse(&publish.topic) {
            Ok(topic) => topic,
            Err(e) => {
                tracing::debug!(device_id = self.device_id(), topic = %publish.topic, error = %e, "ignoring a publish on an unknown topic");
                return;
            }
        };
        match topic {
            Topic::MethodRequest { name, rid } => self.on_method(name, rid, publish.payload),
            Topic::TwinResponse {
                status,
                rid,
                version,
            } => self.on_twin_response(status, rid, version, publish.payload),
            Topic::TwinDesiredPatch { version } => self.on_desired(Some(version), publish.payload),
            other => {
                tracing::debug!(device_id = self.device_id(), topic = %other, "ignoring a publish");
            }
        }
    }

    fn on_method(&mut self, name: String, rid: String, payload: Bytes) {
        let request = Box::new(MethodRequest {
            name,
            rid,
            payload,
            responder: self.responder.clone(),
        });
        if let Err(e) = self.methods.try_send(request) {
            let (request, why) = match e {
                mpsc::error::TrySendError::Full(r) => {
                    (r, "the device is busy: too many method calls are waiting")
                }
                mpsc::error::TrySendError::Closed(r) => {
                    (r, "the device does not handle direct methods")
                }
            };
            tracing::warn!(device_id = self.device_id(), method = %request.name, "{why}; answering 503");
            self.respond_now(request.rid, 503, json!({ "message": why }));
        }
    }

    fn on_twin_response(&mut self, status: u16, rid: String, version: Option<u64>, body: Bytes) {
        if self.resync.as_deref() == Some(rid.as_str()) {
            self.resync = None;
            let twin = if status == 200 {
                TwinDocument::from_json(&body)
            } else {
                Err(format!("status {status}"))
            };
            match twin {
                Ok(twin) => {
                    self.resync_refusals = 0;
                    let first = self.first_twin.is_some();
                    let patches = self.tracker.on_twin(&twin.desired, first);
                    if let Some(tx) = self.first_twin.take() {
                        let _ = tx.send(twin);
                    }
                    self.deliver(patches);
                }
                Err(e) => {
                    // 429/5xx: ask again after a backoff; at once, a throttled fleet would
                    // spin against the hub's twin-read rate.
                    let delay = self.backoff.full_jitter(self.resync_refusals);
                    self.resync_refusals = self.resync_refusals.saturating_add(1);
                    tracing::debug!(device_id = self.device_id(), error = %e, ?delay, "twin read after connect failed; retrying");
                    self.resync_retry = Some(Instant::now() + delay);
                }
            }
            return;
        }
        let Some(number) = rid.parse::<u64>().ok() else {
            tracing::debug!(
                device_id = self.device_id(),
                rid,
                "twin answer for an unknown request"
            );
            return;
        };
        let waiter = self.shared.pending().remove(&number);
        if let Some(waiter) = waiter {
            let _ = waiter.send(Ok(TwinReply {
                status,
                version,
                body,
            }));
        }
    }

    fn on_desired(&mut self, version: Option<u64>, body: Bytes) {
        let patch: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(device_id = self.device_id(), error = %e, "desired patch is not JSON; re-reading the twin");
                self.tracker.begin_resync();
                self.send_twin_get();
                return;
            }
        };
        let Some(version) = version.or_else(|| patch.get("$version").and_then(Value::as_u64))
        else {
            tracing::warn!(
                device_id = self.device_id(),
                "desired patch without $version; re-reading the twin"
            );
            self.tracker.begin_resync();
            self.send_twin_get();
            return;
        };
        match self.tracker.on_notification(version, patch) {
            Step::Deliver(patches) => self.deliver(patches),
            Step::Resync => {
                tracing::debug!(
                    device_id = self.device_id(),
                    version,
                    "desired versions missing; re-reading the twin"
                );
                self.send_twin_get();
            }
        }
    }

    fn deliver(&mut self, patches: Vec<DesiredPatch>) {
        for patch in patches {
            // Unbounded: desired changes are rare and small; the hub throttles them.
            let _ = self.desired.send(Box::new(patch));
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
