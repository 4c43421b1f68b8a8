//! The router to connected device and module sessions: the session table (one per identity,
//! keyed by its MQTT client id, `{deviceId}` or `{deviceId}/{moduleId}`, with what it
//! subscribed to), presence (connection state in the registry, the wake-up for calls waiting on
//! an identity), and the outbound queue each session reads. A module's session is its own: it
//! neither replaces nor is replaced by its device's (IoT Hub: "each module identity ... gets
//! its own connection", Microsoft Learn, "Understand and use module twins in IoT Hub").

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use hub_core::topic::Topic;

use serde::{Deserialize, Serialize};

use super::auth::DeviceGrant;
use super::modules::split_key;
use super::{AuthError, DeviceChange, Hub, State, lock};
use crate::feed::{Change, Feed};

/// How many messages may wait for one device session before the hub drops it.
pub const SESSION_QUEUE: usize = 64;

/// What a device session is asked to send.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Publish on `topic`; the session picks the QoS its subscription was granted.
    Publish { topic: String, payload: Bytes },
}

/// The QoS IoT Hub grants a subscription: 0 or 1 (a request for 2 is granted 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GrantedQos {
    /// QoS 0.
    AtMostOnce,
    /// QoS 1.
    AtLeastOnce,
}

/// Which hub-to-device streams a session subscribed to, with the QoS granted for each (`None`:
/// not subscribed). Stored with the device for a session opened with CleanSession = 0, so that
/// it outlives the connection and the hub process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscriptions {
    /// `$iothub/methods/POST/#`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<GrantedQos>,
    /// `$iothub/twin/PATCH/properties/desired/#`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<GrantedQos>,
    /// `$iothub/twin/res/#`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_responses: Option<GrantedQos>,
    /// `devices/{id}/messages/devicebound/#` (or `#`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c2d: Option<GrantedQos>,
}

pub(super) struct SessionEntry {
    pub(super) conn_id: u64,
    pub(super) tx: mpsc::Sender<Outbound>,
    pub(super) kill: CancellationToken,
    pub(super) subscriptions: Subscriptions,
}

/// A session being opened: its ticket, and the subscriptions of the persistent session it
/// resumes (`None`: a new or clean session; CONNACK's session-present flag is `restored.is_some()`).
#[derive(Debug)]
pub struct OpenedSession {
    /// The session's registration.
    pub ticket: SessionTicket,
    /// What the resumed session had subscribed to.
    pub restored: Option<Subscriptions>,
}

/// A connected session's registration; the session loop keeps it and passes it back.
#[derive(Debug)]
pub struct SessionTicket {
    /// The identity's key in the session table: its MQTT client id, `{deviceId}` or
    /// `{deviceId}/{moduleId}`.
    pub key: String,
    /// The device this session speaks for (the module's device, for a module).
    pub device_id: String,
    /// The module this session speaks for, if it is a module's.
    pub module_id: Option<String>,
    /// Unique per connection, so a replaced session cannot unregister its successor.
    pub conn_id: u64,
    /// Cancelled when the hub drops the session (replaced, backed up, or shutting down).
    pub kill: CancellationToken,
    /// What the hub sends this session.
    pub outbound: mpsc::Receiver<Outbound>,
    /// When the device's SAS token expires (Unix seconds), if it does.
    pub token_expiry: Option<u64>,
    /// Whether the device connected with CleanSession = 1 (nothing of the session is kept).
    pub clean_session: bool,
}

/// The sessions table: identity key (client id) to its one live session.
pub(super) type Sessions = HashMap<String, SessionEntry>;

/// Queues a desired-properties patch (with its `$version`) to the device's session, if it
/// subscribed to them. The caller holds the state and sessions locks and the device's write lock
/// and calls this in the order the versions were committed: that is what makes a device see its
/// desired patches in version order.
pub(super) fn queue_desired_patch(sessions: &Sessions, key: &str, patch: Map<String, Value>) {
    let Some(session) = sessions
        .get(key)
        .filter(|s| s.subscriptions.desired.is_some())
    else {
        return;
    };
    let version = patch
        .get("$version")
        .and_then(Value::as_u64)
        .unwrap_or_default();
    let message = Outbound::Publish {
        topic: Topic::TwinDesiredPatch { version }.to_string(),
        payload: Bytes::from(Value::Object(patch).to_string()),
    };
    if session.tx.try_send(message).is_err() {
        // The device is not reading; dropping it makes it reconnect and re-read its twin, which
        // is how IoT Hub devices catch up on missed patches.
        session.kill.cancel();
    }
}

impl Hub {
    /// Registers a newly authenticated session, replacing (and closing) any earlier one.
    ///
    /// MQTT 3.1.1 sessions as IoT Hub keeps them ([DOCS mqtt] "Receive cloud-to-device
    /// messages"; the SDKs connect with CleanSession = 0 and the Python and Node device clients
    /// rely on the hub's session instead of subscribing again after a reconnect):
    /// with `clean_session == false` the device's stored session, if any, is resumed: its
    /// subscriptions are routed to at once [MQTT-3.1.2-4] and returned for CONNACK's
    /// session-present flag [MQTT-3.2.2-2]. With `clean_session == true` a stored session is
    /// discarded durably first [MQTT-3.1.2-6]. A session is stored from the first subscription
    /// made on a CleanSession = 0 connection (a device that never subscribed has none, as IoT
    /// Hub does not know its preference yet); IoT Hub documents no expiry, so none is applied.
    ///
    /// `grant` is checked again under the state lock (project issue 13): a device disabled,
    /// deleted or re-keyed after its CONNECT was authenticated is refused here instead of keeping
    /// a session the registry change already tried to close.
    pub async fn attach_session(
        &self,
        key: &str,
        grant: &DeviceGrant,
        clean_session: bool,
    ) -> Result<OpenedSession, AuthError> {
        if clean_session {
            self.store_session(key, None).await;
        }
        let (device_id, module_id) = split_key(key);
        let conn_id = self.next_id();
        let (tx, outbound) = mpsc::channel(SESSION_QUEUE);
        let kill = CancellationToken::new();
        let now = self.now();
        // The session table and the registry's connection state change under both locks (state
        // first), so a detach racing with a newer attach cannot leave the device `Disconnected`.
        let mut state = lock(&self.inner.state);
        grant.still_valid(key, state.devices.get(device_id))?;
        // Checked under the state lock: a fault set meanwhile closes this session through
        // `kill_session`, which waits for this lock, so no connect slips past an offline fault.
        // Faults name a device's own session (`crate::faults`); a module's key names none.
        if self.inner.faults.is_offline(key) {
            return Err(AuthError::HeldOffline(key.to_owned()));
        }
        let restored = if clean_session {
            None
        } else {
            stored_session(&state, key)
        };
        let entry = SessionEntry {
            conn_id,
            tx,
            kill: kill.clone(),
            subscriptions: restored.unwrap_or_default(),
        };
        let previous = lock(&self.inner.sessions).insert(key.to_owned(), entry);
        if let Some(device) = state.devices.get_mut(device_id) {
            match module_id {
                None => device.set_connected(true, now),
                Some(module_id) => {
                    if let Some(module) = device.modules.get_mut(module_id) {
                        module.set_connected(device_id, true, now);
                    }
                }
            }
        }
        drop(state);
        self.inner.feed.publish(|| Change::Device(device_id.into()));
        if let Some(previous) = previous {
            previous.kill.cancel();
        }
        if restored.is_some() {
            // Calls waiting for this device to subscribe can go now.
            self.inner.presence.notify_waiters();
        }
        Ok(OpenedSession {
            ticket: SessionTicket {
                key: key.to_owned(),
                device_id: device_id.to_owned(),
                module_id: module_id.map(str::to_owned),
                conn_id,
                kill,
                outbound,
                token_expiry: grant.expiry,
                clean_session,
            },
            restored,
        })
    }

    /// Stores (`Some`) or discards (`None`) the identity's persistent session, if that changes
    /// it. A failed commit is logged: the connection goes on with what it has in memory.
    async fn store_session(&self, key: &str, session: Option<Subscriptions>) {
        let (device_id, module_id) = split_key(key);
        let writing = self.write_locks([device_id]).await;
        let Some(mut record) = ({
            let state = lock(&self.inner.state);
            let changes = stored_session(&state, key) != session;
            state.devices.get(device_id).filter(|_| changes).cloned()
        }) else {
            return;
        };
        match module_id {
            None => record.session = session,
            Some(module_id) => match record.modules.get_mut(module_id) {
                Some(module) => module.session = session,
                None => return,
            },
        }
        let change = DeviceChange {
            put: vec![(record, None)],
            ..DeviceChange::default()
        };
        if let Err(error) = self.commit_devices(writing, change).await {
            tracing::error!(identity = %key, %error, "could not save the MQTT session");
        }
    }

    /// Unregisters a session that ended (a no-op if it was already replaced).
    pub fn detach_session(&self, ticket: &SessionTicket) {
        let now = self.now();
        let mut state = lock(&self.inner.state);
        let removed = {
            let mut sessions = lock(&self.inner.sessions);
            match sessions.get(&ticket.key) {
                Some(entry) if entry.conn_id == ticket.conn_id => {
                    sessions.remove(&ticket.key).is_some()
                }
                _ => false,
            }
        };
        if removed {
            mark_disconnected(&self.inner.feed, &mut state, &ticket.key, now);
        }
    }

    /// Records what a session is subscribed to now; a CleanSession = 0 session also stores it
    /// with the device (before the caller answers SUBACK), so a reconnect or a restarted hub
    /// resumes it.
    pub async fn set_subscriptions(&self, ticket: &SessionTicket, subscriptions: Subscriptions) {
        let current = {
            let mut sessions = lock(&self.inner.sessions);
            match sessions.get_mut(&ticket.key) {
                Some(entry) if entry.conn_id == ticket.conn_id => {
                    entry.subscriptions = subscriptions;
                    true
                }
                _ => false,
            }
        };
        self.inner.presence.notify_waiters();
        if current && !ticket.clean_session {
            self.store_session(&ticket.key, Some(subscriptions)).await;
        }
    }

    /// Updates the identity's last activity time (kept in memory; not user data).
    pub fn touch(&self, key: &str) {
        let now = self.now();
        let (device_id, module_id) = split_key(key);
        if let Some(device) = lock(&self.inner.state).devices.get_mut(device_id) {
            // The cached document is refreshed on the next twin change or connection event;
            // rebuilding it on every packet would cost more than the query freshness is worth.
            match module_id {
                None => device.last_activity_time = now,
                Some(module_id) => {
                    if let Some(module) = device.modules.get_mut(module_id) {
                        module.last_activity_time = now;
                    }
                }
            }
        }
    }

    /// Queues `message` for the session of `ticket` after `delay` (a slow device's twin answer,
    /// see `crate::faults`), without holding up the session's loop meanwhile. Dropped if the
    /// session ends first.
    pub fn send_later(
        &self,
        ticket: &SessionTicket,
        delay: std::time::Duration,
        message: Outbound,
    ) {
        let tx = lock(&self.inner.sessions)
            .get(&ticket.key)
            .filter(|entry| entry.conn_id == ticket.conn_id)
            .map(|entry| entry.tx.clone());
        let Some(tx) = tx else { return };
        let ended = ticket.kill.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {
                    // A full queue means the device is not reading; the answer is lost, as an
                    // answer to a backed-up device is.
                    let _ = tx.try_send(message);
                }
                () = ended.cancelled() => {}
            }
        });
    }

    /// Closes the session of an identity (a device id, or `{deviceId}/{moduleId}`), if any
    /// (deleted, disabled or re-keyed).
    pub fn kill_session(&self, key: &str) {
        let now = self.now();
        let mut state = lock(&self.inner.state);
        let removed = lock(&self.inner.sessions).remove(key);
        if let Some(entry) = removed {
            // The session's own detach will find its entry gone: record the disconnect here.
            mark_disconnected(&self.inner.feed, &mut state, key, now);
            entry.kill.cancel();
        }
        drop(state);
        self.inner.presence.notify_waiters();
    }

    /// Closes every session (shutdown).
    pub fn kill_all_sessions(&self) {
        let now = self.now();
        let mut state = lock(&self.inner.state);
        for (device_id, entry) in lock(&self.inner.sessions).drain() {
            mark_disconnected(&self.inner.feed, &mut state, &device_id, now.clone());
            entry.kill.cancel();
        }
    }

    /// How many device and module sessions are connected.
    pub fn connected_count(&self) -> usize {
        lock(&self.inner.sessions).len()
    }

    /// How many devices are connected, their modules' sessions left out (`GET
    /// /statistics/service`'s `connectedDeviceCount`). Walks the session table: for that rare
    /// call only.
    pub fn connected_device_count(&self) -> usize {
        lock(&self.inner.sessions)
            .keys()
            .filter(|key| !key.contains('/'))
            .count()
    }

    /// Whether the identity (a device id, or `{deviceId}/{moduleId}`) is connected and
    /// subscribed to method requests.
    pub fn method_ready(&self, key: &str) -> bool {
        lock(&self.inner.sessions)
            .get(key)
            .is_some_and(|s| s.subscriptions.methods.is_some())
    }
}

fn mark_disconnected(feed: &Feed, state: &mut State, key: &str, now: String) {
    let (device_id, module_id) = split_key(key);
    if let Some(device) = state.devices.get_mut(device_id) {
        match module_id {
            None => device.set_connected(false, now),
            Some(module_id) => {
                if let Some(module) = device.modules.get_mut(module_id) {
                    module.set_connected(device_id, false, now);
                }
            }
        }
        feed.publish(|| Change::Device(device_id.into()));
    }
}

/// The persistent session stored with an identity, if any.
fn stored_session(state: &State, key: &str) -> Option<Subscriptions> {
    let (device_id, module_id) = split_key(key);
    let device = state.devices.get(device_id)?;
    match module_id {
        None => device.session,
        Some(module_id) => device.modules.get(module_id)?.session,
    }
}
