//! The hub's shared state: the identity registry with each device's twin, the hub's access
//! policies, and the table of connected device sessions that methods and desired-property
//! notifications are routed through.
//!
//! Invariants: every change a caller is told about is in the [`Store`] first; the `state`
//! lock is taken before the `sessions` lock, never the other way round, and neither is held
//! across an `.await` (both are std mutexes); desired patches reach a session in version order
//! because they are queued while the state lock is held.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use hub_core::error::ErrorCode;
use hub_core::policy::{Permission, Permissions, Policy};
use hub_core::sas::SasToken;
use hub_core::topic::Topic;

use crate::store::{Store, StoreError, Write};
use crate::twins::{self, Section, TwinError};

/// The device every fresh hub has: the tutorial's `myDeviceId`.
pub const TUTORIAL_DEVICE_ID: &str = "myDeviceId";
/// Largest direct-method payload, each way.
pub const MAX_METHOD_PAYLOAD: usize = 128 * 1024;
/// Clock skew tolerated on SAS expiry.
pub const SAS_SKEW_SECS: u64 = 300;
/// How many messages may wait for one device session before the hub drops it.
pub const SESSION_QUEUE: usize = 64;

const DEFAULT_METHOD_RESPONSE_TIMEOUT: u64 = 30;

/// Formats a time as IoT Hub does in twins and identities (`2024-01-01T00:00:00.000Z`).
pub fn timestamp(at: OffsetDateTime) -> String {
    hub_core::timestamp::format_millis(at)
}

/// The zero time IoT Hub shows for "never".
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// A failure the service API reports with an IoT Hub error code.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No device with this id.
    #[error("Device {0} not registered")]
    DeviceNotFound(String),
    /// Create with an id that exists.
    #[error("A device with ID '{0}' is already registered.")]
    DeviceAlreadyExists(String),
    /// `If-Match` named another etag.
    #[error("Precondition failed: the etag does not match the current {what} etag of '{id}'.")]
    PreconditionFailed { what: &'static str, id: String },
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// A twin patch IoT Hub would refuse.
    #[error("{0}")]
    Twin(#[from] TwinError),
    /// The device did not connect (and subscribe to methods) within the connect timeout.
    #[error("Timed out waiting for device to connect.")]
    DeviceNotOnline { timeout_secs: u64 },
    /// The device did not answer within the response timeout.
    #[error("Timed out waiting for the response from device.")]
    GatewayTimeout,
    /// A payload over the limit.
    #[error("{0}")]
    MessageTooLarge(String),
    /// The device's session could not take the request.
    #[error("The device's connection is backed up; try again later.")]
    Throttled,
    /// Durable state could not be written; nothing changed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A batch could not be saved (the store's error, as text: every item of the batch gets it);
    /// nothing changed.
    #[error("the change was not saved: {0}")]
    NotSaved(String),
}

impl HubError {
    /// The IoT Hub error code this failure is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            HubError::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            HubError::DeviceAlreadyExists(_) => ErrorCode::DeviceAlreadyExists,
            HubError::PreconditionFailed { .. } => ErrorCode::PreconditionFailed,
            HubError::InvalidArgument(_) | HubError::Twin(_) => ErrorCode::ArgumentInvalid,
            HubError::DeviceNotOnline { .. } => ErrorCode::DeviceNotOnline,
            HubError::GatewayTimeout => ErrorCode::GatewayTimeout,
            HubError::MessageTooLarge(_) => ErrorCode::MessageTooLarge,
            HubError::Throttled => ErrorCode::ThrottlingException,
            HubError::Store(_) | HubError::NotSaved(_) => ErrorCode::ServerError,
        }
    }
}

/// Why a connection or request was not authorized. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token could not be parsed.
    #[error("malformed SharedAccessSignature: {0}")]
    Malformed(String),
    /// Token expired, wrong signature, unknown policy or device, wrong audience.
    #[error("{0}")]
    Refused(String),
    /// Valid credentials without the permission the operation needs.
    #[error("the credentials do not grant {0:?}")]
    MissingPermission(Permission),
    /// The device exists but is disabled.
    #[error("device {0} is disabled")]
    DeviceDisabled(String),
}

/// A shared access policy and its keys (`Debug` leaves the keys out).
#[derive(Clone, Serialize, Deserialize)]
pub struct PolicyKeys {
    /// Policy name (`iothubowner`, `service`, ...).
    pub name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    pub secondary_key: String,
}

impl std::fmt::Debug for PolicyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyKeys")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A device identity and its twin, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeviceRecord {
    device_id: String,
    generation_id: String,
    etag_seq: u64,
    status: String,
    status_reason: Option<String>,
    status_updated_time: String,
    auth_type: String,
    primary_key: Option<String>,
    secondary_key: Option<String>,
    primary_thumbprint: Option<String>,
    secondary_thumbprint: Option<String>,
    iot_edge: bool,
    #[serde(default)]
    device_scope: Option<String>,
    twin_version: u64,
    tags: Map<String, Value>,
    desired: Map<String, Value>,
    reported: Map<String, Value>,
    last_activity_time: String,
    #[serde(default)]
    model_id: String,
    /// The twin jobs whose patch this twin already has (newest last, bounded), saved with the
    /// twin itself so that a job resumed after a crash never applies its patch twice.
    #[serde(default)]
    twin_jobs_applied: Vec<String>,
    #[serde(skip)]
    connected: bool,
    #[serde(skip, default = "never")]
    connection_state_updated_time: String,
    #[serde(skip, default = "empty_doc")]
    doc: Arc<Value>,
}

fn never() -> String {
    NEVER.to_owned()
}

fn empty_doc() -> Arc<Value> {
    Arc::new(Value::Null)
}

fn etag_of(seq: u64) -> String {
    BASE64.encode(seq.to_string())
}

fn twin_etag_of(version: u64) -> String {
    BASE64.encode(version.to_be_bytes())
}

fn matches_etag(if_match: Option<&str>, current: &str) -> bool {
    match if_match.map(|v| v.trim().trim_start_matches("W/").trim_matches('"')) {
        None | Some("*") | Some("") => true,
        Some(given) => given == current,
    }
}

impl DeviceRecord {
    fn connection_state(&self) -> &'static str {
        if self.connected {
            "Connected"
        } else {
            "Disconnected"
        }
    }

    fn etag(&self) -> String {
        etag_of(self.etag_seq)
    }

    fn device_json(&self) -> Value {
        json!({
            "deviceId": self.device_id,
            "moduleId": null,
            "generationId": self.generation_id,
            "etag": self.etag(),
            "connectionState": self.connection_state(),
            "status": self.status,
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": self.connection_state_updated_time,
            "statusUpdatedTime": self.status_updated_time,
            "lastActivityTime": self.last_activity_time,
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key},
                "x509Thumbprint": {"primaryThumbprint": self.primary_thumbprint, "secondaryThumbprint": self.secondary_thumbprint},
                "type": self.auth_type,
            },
            "capabilities": {"iotEdge": self.iot_edge},
            "deviceScope": self.device_scope,
        })
    }

    fn twin_json(&self) -> Value {
        json!({
            "deviceId": self.device_id,
            "etag": twin_etag_of(self.twin_version),
            "deviceEtag": self.etag(),
            "status": self.status,
            "statusReason": self.status_reason,
            "statusUpdateTime": self.status_updated_time,
            "connectionState": self.connection_state(),
            "lastActivityTime": self.last_activity_time,
            "cloudToDeviceMessageCount": 0,
            "authenticationType": self.auth_type,
            "x509Thumbprint": {"primaryThumbprint": self.primary_thumbprint, "secondaryThumbprint": self.secondary_thumbprint},
            "modelId": self.model_id,
            "version": self.twin_version,
            "tags": self.tags,
            "properties": {"desired": self.desired, "reported": self.reported},
            "capabilities": {"iotEdge": self.iot_edge},
        })
    }

    fn refresh(&mut self) {
        self.doc = Arc::new(self.twin_json());
    }

    /// Records a connect or disconnect and brings the cached twin document up to date by
    /// changing only the fields a connection event changes (`connectionState` and
    /// `lastActivityTime`) instead of rebuilding it: this runs on every MQTT connect
    /// and disconnect, under the state lock. The result equals [`DeviceRecord::refresh`]; a
    /// document still shared with a query snapshot is copied first, so snapshots never change.
    fn set_connected(&mut self, connected: bool, now: String) {
        self.connected = connected;
        if connected {
            self.last_activity_time = now.clone();
        }
        self.connection_state_updated_time = now;
        let state = self.connection_state();
        if let Value::Object(doc) = Arc::make_mut(&mut self.doc) {
            doc.insert("connectionState".to_owned(), Value::from(state));
            // Also on disconnect: `touch` leaves the cached document's activity time stale.
            doc.insert(
                "lastActivityTime".to_owned(),
                Value::from(self.last_activity_time.as_str()),
            );
        } else {
            self.refresh();
        }
    }
}

/// What a device session is asked to send.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Publish on `topic`; the session picks the QoS its subscription was granted.
    Publish { topic: String, payload: Bytes },
}

/// Which hub-to-device streams a session has subscribed to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscriptions {
    /// `$iothub/methods/POST/#`.
    pub methods: bool,
    /// `$iothub/twin/PATCH/properties/desired/#`.
    pub desired: bool,
    /// `$iothub/twin/res/#`.
    pub twin_responses: bool,
    /// `devices/{id}/messages/devicebound/#`.
    pub c2d: bool,
}

struct SessionEntry {
    conn_id: u64,
    tx: mpsc::Sender<Outbound>,
    kill: CancellationToken,
    subscriptions: Subscriptions,
}

/// A connected session's registration; the session loop keeps it and passes it back.
#[derive(Debug)]
pub struct SessionTicket {
    /// The device this session speaks for.
    pub device_id: String,
    /// Unique per connection, so a replaced session cannot unregister its successor.
    pub conn_id: u64,
    /// Cancelled when the hub drops the session (replaced, backed up, or shutting down).
    pub kill: CancellationToken,
    /// What the hub sends this session.
    pub outbound: mpsc::Receiver<Outbound>,
    /// When the device's SAS token expires (Unix seconds), if it does.
    pub token_expiry: Option<u64>,
}

/// Where a device's answer to one method request arrives: its status and raw body.
type MethodReply = oneshot::Receiver<(i32, Bytes)>;

struct PendingMethod {
    device_id: String,
    reply: oneshot::Sender<(i32, Bytes)>,
}

/// The outcome of a direct method, as the service API returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodOutcome {
    /// The status the device answered with.
    pub status: i32,
    /// The device's payload (`null` when it sent none).
    pub payload: Value,
}

/// A direct-method call, validated.
#[derive(Debug, Clone)]
pub struct MethodCall {
    /// Method name.
    pub name: String,
    /// The JSON text to send (empty when the request had no payload).
    pub payload: Bytes,
    /// How long to wait for the device's answer.
    pub response_timeout: Duration,
    /// How long to wait for the device to come online.
    pub connect_timeout: Duration,
}

impl MethodCall {
    /// Validates a `POST /twins/{id}/methods` body (IoT Hub's ranges and limits).
    pub fn from_request(body: &Value) -> Result<MethodCall, HubError> {
        let Value::Object(map) = body else {
            return Err(HubError::InvalidArgument(
                "the method request must be a JSON object with methodName, payload, responseTimeoutInSeconds and connectTimeoutInSeconds".into(),
            ));
        };
        let name = match map.get("methodName") {
            Some(Value::String(name)) => name.clone(),
            Some(_) => {
                return Err(HubError::InvalidArgument(
                    "methodName must be a string".into(),
                ));
            }
            None => return Err(HubError::InvalidArgument("methodName is required".into())),
        };
        validate_method_name(&name)?;
        let seconds = |field: &str, default: u64, min: u64, max: u64| -> Result<u64, HubError> {
            match map.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => match v.as_u64() {
                    Some(n) if (min..=max).contains(&n) => Ok(n),
                    _ => Err(HubError::InvalidArgument(format!(
                        "{field} must be a whole number of seconds from {min} to {max}, got {v}"
                    ))),
                },
            }
        };
        let response = seconds(
            "responseTimeoutInSeconds",
            DEFAULT_METHOD_RESPONSE_TIMEOUT,
            5,
            300,
        )?;
        let connect = seconds("connectTimeoutInSeconds", 0, 0, 300)?;
        let payload = match map.get("payload") {
            None => Bytes::new(),
            Some(value) => Bytes::from(value.to_string()),
        };
        if payload.len() > MAX_METHOD_PAYLOAD {
            return Err(HubError::MessageTooLarge(format!(
                "the method payload is {} bytes; IoT Hub allows at most {MAX_METHOD_PAYLOAD}",
                payload.len()
            )));
        }
        Ok(MethodCall {
            name,
            payload,
            response_timeout: Duration::from_secs(response),
            connect_timeout: Duration::from_secs(connect),
        })
    }
}

/// Checks a method name against IoT Hub's rules (printable ASCII without separators).
pub fn validate_method_name(name: &str) -> Result<(), HubError> {
    const FORBIDDEN: &str = "$()<>@,;:\\\"/[]?={} \t";
    if name.is_empty() || name.len() > 128 {
        return Err(HubError::InvalidArgument(format!(
            "method name must be 1 to 128 characters, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || FORBIDDEN.contains(*c))
    {
        return Err(HubError::InvalidArgument(format!(
            "method name `{name}` contains `{c}`; use printable ASCII without $()<>@,;:\\\"/[]?={{}} or spaces"
        )));
    }
    Ok(())
}

/// Checks a device id against IoT Hub's rules (shared with the clients in hub-core).
pub fn validate_device_id(id: &str) -> Result<(), HubError> {
    hub_core::connection_string::validate_device_id(id)
        .map_err(|e| HubError::InvalidArgument(e.to_string()))
}

fn random_key() -> String {
    let mut bytes = [0u8; 32];
    fill_random(&mut bytes);
    BASE64.encode(bytes)
}

fn fill_random(bytes: &mut [u8]) {
    use ring::rand::SecureRandom as _;
    // The system RNG only fails when the OS has none; nothing secure can be made then.
    #[allow(clippy::expect_used)]
    ring::rand::SystemRandom::new()
        .fill(bytes)
        .expect("the operating system's random number generator failed");
}

fn generation_id() -> String {
    let mut bytes = [0u8; 8];
    fill_random(&mut bytes);
    format!(
        "638{:015}",
        u64::from_le_bytes(bytes) % 1_000_000_000_000_000
    )
}

/// How many twin-job ids a twin remembers: more than the active-job cap (the default is 10), so
/// a resumed job always finds its own.
const TWIN_JOBS_REMEMBERED: usize = 32;

/// One device's place in a twin batch: its staged change, or the twin as it is.
enum Staged {
    Index(usize),
    AlreadyApplied(Value),
}

struct State {
    devices: BTreeMap<String, DeviceRecord>,
}

struct Inner {
    host_names: Vec<String>,
    policies: Vec<(PolicyKeys, Permissions)>,
    state: Mutex<State>,
    sessions: Mutex<HashMap<String, SessionEntry>>,
    pending: Mutex<HashMap<u64, PendingMethod>>,
    presence: Notify,
    next_id: AtomicU64,
    store: Store,
}

/// A cheap handle to the hub's shared state.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("host_names", &self.inner.host_names)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a hub lock is a bug already reported; the data is still consistent
    // because every mutation is computed before it is stored.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    /// Opens the hub over `store`: loads its policies (creating keys on first start), its devices,
    /// and creates the tutorial device on a new hub. `host_names` are the names clients may use
    /// in SAS audiences (the first is the primary one).
    pub fn open(store: Store, host_names: Vec<String>) -> Result<Hub, HubError> {
        let policies: Vec<PolicyKeys> = match store.meta("policies")? {
            Some(text) => serde_json::from_str(&text).map_err(|e| {
                HubError::InvalidArgument(format!(
                    "the hub store's policy record is unreadable: {e}"
                ))
            })?,
            None => {
                let fresh: Vec<PolicyKeys> = Policy::defaults()
                    .iter()
                    .map(|p| PolicyKeys {
                        name: p.name.to_string(),
                        primary_key: random_key(),
                        secondary_key: random_key(),
                    })
                    .collect();
                let text = serde_json::to_string(&fresh)
                    .map_err(|e| HubError::InvalidArgument(e.to_string()))?;
                store.write(&[Write::PutMeta {
                    key: "policies",
                    value: &text,
                }])?;
                fresh
            }
        };
        let defaults = Policy::defaults();
        let policies = policies
            .into_iter()
            .map(|keys| {
                let permissions = defaults
                    .iter()
                    .find(|p| p.name == keys.name)
                    .map(|p| p.permissions)
                    .unwrap_or_default();
                (keys, permissions)
            })
            .collect();
        let mut devices = BTreeMap::new();
        for (id, text) in store.load_devices()? {
            let mut record: DeviceRecord = serde_json::from_str(&text).map_err(|e| {
                HubError::InvalidArgument(format!(
                    "the hub store's record of device {id} is unreadable: {e}"
                ))
            })?;
            record.refresh();
            devices.insert(id, record);
        }
        let fresh_hub = store.meta("created")?.is_none();
        let hub = Hub {
            inner: Arc::new(Inner {
                host_names,
                policies,
                state: Mutex::new(State { devices }),
                sessions: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                presence: Notify::new(),
                next_id: AtomicU64::new(1),
                store,
            }),
        };
        if fresh_hub {
            if hub.get_device(TUTORIAL_DEVICE_ID).is_err() {
                hub.create_or_update_device(
                    TUTORIAL_DEVICE_ID,
                    &json!({"deviceId": TUTORIAL_DEVICE_ID}),
                    None,
                )?;
            }
            let now = timestamp(OffsetDateTime::now_utc());
            hub.inner.store.write(&[Write::PutMeta {
                key: "created",
                value: &now,
            }])?;
        }
        Ok(hub)
    }

    /// The durable store (jobs keep their records there too).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The hub's primary host name.
    pub fn host_name(&self) -> &str {
        self.inner
            .host_names
            .first()
            .map(String::as_str)
            .unwrap_or("localhost")
    }

    /// The keys of a policy, for writing connection strings.
    pub fn policy_keys(&self, name: &str) -> Option<PolicyKeys> {
        self.inner
            .policies
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(k, _)| k.clone())
    }

    /// A device's primary key (for writing its connection string).
    pub fn device_primary_key(&self, id: &str) -> Option<String> {
        lock(&self.inner.state)
            .devices
            .get(id)
            .and_then(|d| d.primary_key.clone())
    }

    fn audience_ok(&self, token: &SasToken, path: &str) -> bool {
        self.inner
            .host_names
            .iter()
            .any(|host| token.covers(host, path))
    }

    /// Checks a service request's `Authorization` header and that its policy grants `needed`.
    pub fn authorize_service(
        &self,
        header: &str,
        needed: Permission,
        now_unix: u64,
    ) -> Result<(), AuthError> {
        let token = SasToken::parse(header).map_err(|e| AuthError::Malformed(e.to_string()))?;
        token
            .check_expiry(now_unix, SAS_SKEW_SECS)
            .map_err(|e| AuthError::Refused(e.to_string()))?;
        let Some(policy_name) = token.key_name.as_deref() else {
            return Err(AuthError::Refused(
                "a device token cannot call service APIs; use a shared access policy (skn)".into(),
            ));
        };
        let Some((keys, permissions)) = self
            .inner
            .policies
            .iter()
            .find(|(k, _)| k.name == policy_name)
        else {
            return Err(AuthError::Refused(format!(
                "unknown shared access policy `{policy_name}`"
            )));
        };
        self.verify_with_keys(&token, &keys.primary_key, &keys.secondary_key)?;
        if !self.audience_ok(&token, "") {
            return Err(AuthError::Refused(format!(
                "the token's audience `{}` is not this hub ({})",
                token.resource,
                self.host_name()
            )));
        }
        if !permissions.contains(needed) {
            return Err(AuthError::MissingPermission(needed));
        }
        Ok(())
    }

    fn verify_with_keys(
        &self,
        token: &SasToken,
        primary: &str,
        secondary: &str,
    ) -> Result<(), AuthError> {
        for key in [primary, secondary] {
            // A device without symmetric keys (X.509, `none`) has empty ones here: an HMAC with
            // an empty key is one anybody can compute, so it must never authenticate.
            if let Ok(key) = hub_core::connection_string::SharedKey::from_base64(key)
                && !key.as_bytes().is_empty()
                && token.verify_signature(&key).is_ok()
            {
                return Ok(());
            }
        }
        Err(AuthError::Refused(
            "the signature does not match the key".into(),
        ))
    }

    /// Authenticates an MQTT CONNECT: client id, username and SAS password.
    /// Returns the token's expiry (Unix seconds).
    pub fn authenticate_device(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
        now_unix: u64,
    ) -> Result<u64, AuthError> {
        let device_id = client_id;
        // Username is `{host}/{deviceId}/?api-version=...`; any api-version is accepted.
        let mut parts = username.splitn(3, '/');
        let (_host, user_device) = (parts.next(), parts.next());
        if user_device != Some(device_id) {
            return Err(AuthError::Refused(format!(
                "the MQTT username must be `{{host}}/{device_id}/?api-version=...`"
            )));
        }
        let token = SasToken::parse(password).map_err(|e| AuthError::Malformed(e.to_string()))?;
        token
            .check_expiry(now_unix, SAS_SKEW_SECS)
            .map_err(|e| AuthError::Refused(e.to_string()))?;
        let path = format!("devices/{device_id}");
        if !self.audience_ok(&token, &path) {
            return Err(AuthError::Refused(format!(
                "the token's audience `{}` does not cover {}/{path}",
                token.resource,
                self.host_name()
            )));
        }
        let (primary, secondary, enabled) = {
            let state = lock(&self.inner.state);
            let Some(device) = state.devices.get(device_id) else {
                return Err(AuthError::Refused(format!(
                    "device {device_id} is not registered"
                )));
            };
            (
                device.primary_key.clone(),
                device.secondary_key.clone(),
                device.status == "enabled",
            )
        };
        match token.key_name.as_deref() {
            Some(policy) => {
                let Some((keys, permissions)) =
                    self.inner.policies.iter().find(|(k, _)| k.name == policy)
                else {
                    return Err(AuthError::Refused(format!(
                        "unknown shared access policy `{policy}`"
                    )));
                };
                self.verify_with_keys(&token, &keys.primary_key, &keys.secondary_key)?;
                if !permissions.contains(Permission::DeviceConnect) {
                    return Err(AuthError::MissingPermission(Permission::DeviceConnect));
                }
            }
            None => self.verify_with_keys(
                &token,
                primary.as_deref().unwrap_or_default(),
                secondary.as_deref().unwrap_or_default(),
            )?,
        }
        if !enabled {
            return Err(AuthError::DeviceDisabled(device_id.to_owned()));
        }
        Ok(token.expiry)
    }

    fn now(&self) -> String {
        timestamp(OffsetDateTime::now_utc())
    }

    fn persist(&self, record: &DeviceRecord) -> Result<(), HubError> {
        if !self.inner.store.is_durable() {
            return Ok(());
        }
        let doc =
            serde_json::to_string(record).map_err(|e| HubError::InvalidArgument(e.to_string()))?;
        self.inner.store.write(&[Write::PutDevice {
            id: &record.device_id,
            doc: &doc,
        }])?;
        Ok(())
    }

    /// `PUT /devices/{id}`: creates a device (no `If-Match`) or updates one.
    pub fn create_or_update_device(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, HubError> {
        validate_device_id(id)?;
        if let Some(body_id) = body.get("deviceId").and_then(Value::as_str)
            && body_id != id
        {
            return Err(HubError::InvalidArgument(format!(
                "the body's deviceId `{body_id}` does not match the URL's `{id}`"
            )));
        }
        let status = match body.get("status") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "enabled" || s == "disabled" => Some(s.clone()),
            Some(other) => {
                return Err(HubError::InvalidArgument(format!(
                    "status must be \"enabled\" or \"disabled\", got {other}"
                )));
            }
        };
        let status_reason = body
            .get("statusReason")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let auth = body.get("authentication");
        let auth_type = auth
            .and_then(|a| a.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("sas")
            .to_owned();
        if !["sas", "selfSigned", "certificateAuthority", "none"].contains(&auth_type.as_str()) {
            return Err(HubError::InvalidArgument(format!(
                "authentication.type must be sas, selfSigned, certificateAuthority or none, got `{auth_type}`"
            )));
        }
        let key = |name: &str| -> Result<Option<String>, HubError> {
            match auth
                .and_then(|a| a.get("symmetricKey"))
                .and_then(|k| k.get(name))
            {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => {
                    let decoded = BASE64.decode(s).map_err(|_| {
                        HubError::InvalidArgument(format!(
                            "authentication.symmetricKey.{name} is not valid base64"
                        ))
                    })?;
                    if !(16..=64).contains(&decoded.len()) {
                        return Err(HubError::InvalidArgument(format!(
                            "authentication.symmetricKey.{name} must decode to 16 to 64 bytes, got {}",
                            decoded.len()
                        )));
                    }
                    Ok(Some(s.clone()))
                }
                Some(other) => Err(HubError::InvalidArgument(format!(
                    "authentication.symmetricKey.{name} must be a base64 string, got {other}"
                ))),
            }
        };
        let (primary, secondary) = (key("primaryKey")?, key("secondaryKey")?);
        let thumb = |name: &str| {
            auth.and_then(|a| a.get("x509Thumbprint"))
                .and_then(|k| k.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let iot_edge = body
            .get("capabilities")
            .and_then(|c| c.get("iotEdge"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let now = self.now();

        let mut state = lock(&self.inner.state);
        let record = match state.devices.get(id) {
            None => {
                if if_match.is_some_and(|m| m.trim() != "*") {
                    // Python sends `If-Match: "*"`-less creates; an etag on a missing device
                    // can only be a stale update.
                    return Err(HubError::DeviceNotFound(id.to_owned()));
                }
                let (primary, secondary) = if auth_type == "sas" {
                    (
                        Some(primary.unwrap_or_else(random_key)),
                        Some(secondary.unwrap_or_else(random_key)),
                    )
                } else {
                    (primary, secondary)
                };
                let mut record = DeviceRecord {
                    device_id: id.to_owned(),
                    generation_id: generation_id(),
                    etag_seq: 1,
                    status: status.unwrap_or_else(|| "enabled".into()),
                    status_reason,
                    status_updated_time: NEVER.into(),
                    auth_type,
                    primary_key: primary,
                    secondary_key: secondary,
                    primary_thumbprint: thumb("primaryThumbprint"),
                    secondary_thumbprint: thumb("secondaryThumbprint"),
                    iot_edge,
                    device_scope: None,
                    twin_version: 1,
                    tags: Map::new(),
                    desired: twins::new_section(&now, Section::Desired),
                    reported: twins::new_section(&now, Section::Reported),
                    last_activity_time: NEVER.into(),
                    model_id: String::new(),
                    twin_jobs_applied: Vec::new(),
                    connected: false,
                    connection_state_updated_time: NEVER.into(),
                    doc: empty_doc(),
                };
                record.refresh();
                record
            }
            Some(existing) => {
                if if_match.is_none() {
                    return Err(HubError::DeviceAlreadyExists(id.to_owned()));
                }
                if !matches_etag(if_match, &existing.etag()) {
                    return Err(HubError::PreconditionFailed {
                        what: "device",
                        id: id.to_owned(),
                    });
                }
                let mut record = existing.clone();
                if let Some(status) = status
                    && status != record.status
                {
                    record.status = status;
                    record.status_updated_time = now.clone();
                }
                record.status_reason = status_reason;
                record.auth_type = auth_type;
                if record.auth_type == "sas" {
                    record.primary_key = Some(
                        primary
                            .or(record.primary_key.take())
                            .unwrap_or_else(random_key),
                    );
                    record.secondary_key = Some(
                        secondary
                            .or(record.secondary_key.take())
                            .unwrap_or_else(random_key),
                    );
                } else {
                    record.primary_key = primary;
                    record.secondary_key = secondary;
                }
                record.primary_thumbprint = thumb("primaryThumbprint");
                record.secondary_thumbprint = thumb("secondaryThumbprint");
                record.iot_edge = iot_edge;
                record.etag_seq += 1;
                record.refresh();
                record
            }
        };
        self.persist(&record)?;
        let disabled = record.status != "enabled";
        let out = record.device_json();
        state.devices.insert(id.to_owned(), record);
        drop(state);
        if disabled {
            self.kill_session(id);
        }
        Ok(out)
    }

    /// `GET /devices/{id}`.
    pub fn get_device(&self, id: &str) -> Result<Value, HubError> {
        lock(&self.inner.state)
            .devices
            .get(id)
            .map(DeviceRecord::device_json)
            .ok_or_else(|| HubError::DeviceNotFound(id.to_owned()))
    }

    /// Whether a device is registered.
    pub fn device_exists(&self, id: &str) -> bool {
        lock(&self.inner.state).devices.contains_key(id)
    }

    /// `GET /devices?top=n`: the first `top` devices by id.
    pub fn list_devices(&self, top: usize) -> Vec<Value> {
        lock(&self.inner.state)
            .devices
            .values()
            .take(top)
            .map(DeviceRecord::device_json)
            .collect()
    }

    /// `DELETE /devices/{id}`.
    pub fn delete_device(&self, id: &str, if_match: Option<&str>) -> Result<(), HubError> {
        let mut state = lock(&self.inner.state);
        let Some(existing) = state.devices.get(id) else {
            return Err(HubError::DeviceNotFound(id.to_owned()));
        };
        if !matches_etag(if_match, &existing.etag()) {
            return Err(HubError::PreconditionFailed {
                what: "device",
                id: id.to_owned(),
            });
        }
        self.inner.store.write(&[Write::DeleteDevice { id }])?;
        state.devices.remove(id);
        drop(state);
        self.kill_session(id);
        Ok(())
    }

    /// `GET /twins/{id}`.
    pub fn get_twin(&self, id: &str) -> Result<Value, HubError> {
        lock(&self.inner.state)
            .devices
            .get(id)
            .map(|d| (*d.doc).clone())
            .ok_or_else(|| HubError::DeviceNotFound(id.to_owned()))
    }

    /// Twin documents in device-id order, starting after `after`: a consistent snapshot for
    /// queries and jobs (documents are shared, not copied).
    pub fn twin_documents_after(&self, after: Option<&str>) -> Vec<Arc<Value>> {
        let state = lock(&self.inner.state);
        let range = match after {
            Some(after) => state
                .devices
                .range::<str, _>((Bound::Excluded(after), Bound::Unbounded)),
            None => state.devices.range::<str, _>(..),
        };
        range.map(|(_, d)| Arc::clone(&d.doc)).collect()
    }

    /// `PATCH /twins/{id}` (`replace == false`) or `PUT /twins/{id}` (`replace == true`):
    /// tags and desired properties; reported properties are the device's and are refused.
    pub fn update_twin(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
    ) -> Result<Value, HubError> {
        let mut results = self.update_twins(&[id], body, if_match, replace);
        results
            .pop()
            .unwrap_or_else(|| Err(HubError::DeviceNotFound(id.to_owned())))
    }

    /// Applies one twin update to many devices in one durable transaction (used by twin jobs).
    /// Returns one result per id, in order.
    pub fn update_twins(
        &self,
        ids: &[&str],
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
    ) -> Vec<Result<Value, HubError>> {
        self.update_twins_for_job(ids, body, if_match, replace, None)
    }

    /// [`Hub::update_twins`] on behalf of twin job `job_id`: a twin that already has this job's
    /// patch is left as it is (and reported as updated), which makes resuming a job after a
    /// crash apply its patch at most once per device.
    pub fn update_twins_for_job(
        &self,
        ids: &[&str],
        body: &Value,
        if_match: Option<&str>,
        replace: bool,
        job_id: Option<&str>,
    ) -> Vec<Result<Value, HubError>> {
        let parsed = twins::parse_service_update(body);
        let now = self.now();
        let mut state = lock(&self.inner.state);
        let mut staged: Vec<(DeviceRecord, Option<Map<String, Value>>)> = Vec::new();
        let mut results: Vec<Result<Staged, HubError>> = Vec::with_capacity(ids.len());
        for id in ids {
            let outcome = (|| {
                let twins::ServiceUpdate { tags, desired } =
                    parsed.as_ref().map_err(|e| HubError::Twin(e.clone()))?;
                let current = state
                    .devices
                    .get(*id)
                    .ok_or_else(|| HubError::DeviceNotFound((*id).to_owned()))?;
                if !matches_etag(if_match, &twin_etag_of(current.twin_version)) {
                    return Err(HubError::PreconditionFailed {
                        what: "twin",
                        id: (*id).to_owned(),
                    });
                }
                if let Some(job) = job_id
                    && current.twin_jobs_applied.iter().any(|j| j == job)
                {
                    return Ok(Staged::AlreadyApplied((*current.doc).clone()));
                }
                let mut record = current.clone();
                if let Some(job) = job_id {
                    if record.twin_jobs_applied.len() >= TWIN_JOBS_REMEMBERED {
                        record.twin_jobs_applied.remove(0);
                    }
                    record.twin_jobs_applied.push(job.to_owned());
                }
                let mut notify = None;
                if let Some(tags) = tags {
                    if replace {
                        twins::validate_patch("tags", tags)?;
                        record.tags = tags.as_object().cloned().unwrap_or_default();
                        if twins::section_size(&record.tags) > twins::MAX_TAGS_BYTES {
                            return Err(TwinError::TooLarge {
                                section: "tags",
                                size: twins::section_size(&record.tags),
                                limit: twins::MAX_TAGS_BYTES,
                            }
                            .into());
                        }
                    } else {
                        twins::apply_tags(&mut record.tags, tags)?;
                    }
                }
                if let Some(desired) = desired {
                    let (version, patch) = if replace {
                        twins::replace_section(
                            &mut record.desired,
                            desired,
                            Section::Desired,
                            &now,
                        )?
                    } else {
                        let version = twins::apply_patch(
                            &mut record.desired,
                            desired,
                            Section::Desired,
                            &now,
                        )?;
                        (version, desired.as_object().cloned().unwrap_or_default())
                    };
                    let mut patch = patch;
                    patch.insert("$version".into(), Value::from(version));
                    notify = Some(patch);
                }
                record.twin_version += 1;
                record.refresh();
                staged.push((record, notify));
                Ok(Staged::Index(staged.len() - 1))
            })();
            results.push(outcome);
        }
        // One transaction for the whole batch: either every staged change is durable or none is.
        let docs: Vec<Result<String, serde_json::Error>> = if self.inner.store.is_durable() {
            staged
                .iter()
                .map(|(r, _)| serde_json::to_string(r))
                .collect()
        } else {
            Vec::new()
        };
        let write_result = (|| -> Result<(), HubError> {
            let docs = docs
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| HubError::InvalidArgument(e.to_string()))?;
            let writes: Vec<Write<'_>> = staged
                .iter()
                .zip(&docs)
                .map(|((r, _), doc)| Write::PutDevice {
                    id: &r.device_id,
                    doc,
                })
                .collect();
            self.inner.store.write(&writes)?;
            Ok(())
        })();
        if let Err(e) = write_result {
            let message = e.to_string();
            return ids
                .iter()
                .map(|_| Err(HubError::NotSaved(message.clone())))
                .collect();
        }
        let sessions = lock(&self.inner.sessions);
        let mut applied: Vec<Value> = Vec::with_capacity(staged.len());
        for (record, notify) in staged {
            if let Some(patch) = notify
                && let Some(session) = sessions.get(&record.device_id)
                && session.subscriptions.desired
            {
                let version = patch
                    .get("$version")
                    .and_then(Value::as_u64)
                    .unwrap_or_default();
                let topic = Topic::TwinDesiredPatch { version }.to_string();
                let message = Outbound::Publish {
                    topic,
                    payload: Bytes::from(Value::Object(patch).to_string()),
                };
                if session.tx.try_send(message).is_err() {
                    // The device is not reading; dropping it makes it reconnect and re-read its
                    // twin, which is how IoT Hub devices catch up on missed patches.
                    session.kill.cancel();
                }
            }
            applied.push((*record.doc).clone());
            state.devices.insert(record.device_id.clone(), record);
        }
        results
            .into_iter()
            .map(|r| {
                r.map(|staged| match staged {
                    Staged::Index(index) => applied[index].clone(),
                    Staged::AlreadyApplied(doc) => doc,
                })
            })
            .collect()
    }

    /// The device's twin GET answer: `{"desired": {...}, "reported": {...}}` without metadata.
    pub fn device_twin(&self, id: &str) -> Option<Value> {
        let state = lock(&self.inner.state);
        let device = state.devices.get(id)?;
        Some(json!({
            "desired": twins::without_metadata(&device.desired),
            "reported": twins::without_metadata(&device.reported),
        }))
    }

    /// A device's reported-properties patch. Returns the new reported `$version`.
    pub fn patch_reported(&self, id: &str, patch: &Value) -> Result<u64, HubError> {
        let now = self.now();
        let mut state = lock(&self.inner.state);
        let current = state
            .devices
            .get(id)
            .ok_or_else(|| HubError::DeviceNotFound(id.to_owned()))?;
        let mut record = current.clone();
        let version = twins::apply_patch(&mut record.reported, patch, Section::Reported, &now)?;
        record.twin_version += 1;
        record.last_activity_time = now;
        record.refresh();
        self.persist(&record)?;
        state.devices.insert(id.to_owned(), record);
        Ok(version)
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a newly authenticated session, replacing (and closing) any earlier one.
    pub fn attach_session(&self, device_id: &str, token_expiry: Option<u64>) -> SessionTicket {
        let conn_id = self.next_id();
        let (tx, outbound) = mpsc::channel(SESSION_QUEUE);
        let kill = CancellationToken::new();
        let entry = SessionEntry {
            conn_id,
            tx,
            kill: kill.clone(),
            subscriptions: Subscriptions::default(),
        };
        let now = self.now();
        // The session table and the registry's connection state change under both locks (state
        // first), so a detach racing with a newer attach cannot leave the device `Disconnected`.
        let mut state = lock(&self.inner.state);
        let previous = lock(&self.inner.sessions).insert(device_id.to_owned(), entry);
        if let Some(device) = state.devices.get_mut(device_id) {
            device.set_connected(true, now);
        }
        drop(state);
        if let Some(previous) = previous {
            previous.kill.cancel();
        }
        SessionTicket {
            device_id: device_id.to_owned(),
            conn_id,
            kill,
            outbound,
            token_expiry,
        }
    }

    /// Unregisters a session that ended (a no-op if it was already replaced).
    pub fn detach_session(&self, ticket: &SessionTicket) {
        let now = self.now();
        let mut state = lock(&self.inner.state);
        let removed = {
            let mut sessions = lock(&self.inner.sessions);
            match sessions.get(&ticket.device_id) {
                Some(entry) if entry.conn_id == ticket.conn_id => {
                    sessions.remove(&ticket.device_id).is_some()
                }
                _ => false,
            }
        };
        if removed {
            mark_disconnected(&mut state, &ticket.device_id, now);
        }
    }

    /// Records that a session subscribed to a hub-to-device stream.
    pub fn set_subscriptions(
        &self,
        ticket: &SessionTicket,
        update: impl FnOnce(&mut Subscriptions),
    ) {
        if let Some(entry) = lock(&self.inner.sessions).get_mut(&ticket.device_id)
            && entry.conn_id == ticket.conn_id
        {
            update(&mut entry.subscriptions);
        }
        self.inner.presence.notify_waiters();
    }

    /// Updates the device's last activity time (kept in memory; not user data).
    pub fn touch(&self, device_id: &str) {
        let now = self.now();
        if let Some(device) = lock(&self.inner.state).devices.get_mut(device_id) {
            device.last_activity_time = now;
            // The cached document is refreshed on the next twin change or connection event;
            // rebuilding it on every packet would cost more than the query freshness is worth.
        }
    }

    /// Closes a device's session, if any (device deleted or disabled).
    pub fn kill_session(&self, device_id: &str) {
        let now = self.now();
        let mut state = lock(&self.inner.state);
        let removed = lock(&self.inner.sessions).remove(device_id);
        if let Some(entry) = removed {
            // The session's own detach will find its entry gone: record the disconnect here.
            mark_disconnected(&mut state, device_id, now);
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
            mark_disconnected(&mut state, &device_id, now.clone());
            entry.kill.cancel();
        }
    }

    /// How many device sessions are connected.
    pub fn connected_count(&self) -> usize {
        lock(&self.inner.sessions).len()
    }

    /// Whether the device is connected and subscribed to method requests.
    pub fn method_ready(&self, device_id: &str) -> bool {
        lock(&self.inner.sessions)
            .get(device_id)
            .is_some_and(|s| s.subscriptions.methods)
    }

    /// Invokes a direct method and waits for the device's answer, as `POST /twins/{id}/methods`.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        call: &MethodCall,
    ) -> Result<MethodOutcome, HubError> {
        if !self.device_exists(device_id) {
            return Err(HubError::DeviceNotFound(device_id.to_owned()));
        }
        let deadline = tokio::time::Instant::now() + call.connect_timeout;
        // Fast path: a connected, subscribed device needs no presence wait. (Registering with
        // `presence` takes its lock twice, for every call, from every REST connection.)
        let sent = self.try_send_method(device_id, call)?;
        let (rid, reply) = if let Some(sent) = sent {
            sent
        } else {
            self.wait_and_send_method(device_id, call, deadline).await?
        };
        let answer = tokio::time::timeout(call.response_timeout, reply).await;
        lock(&self.inner.pending).remove(&rid);
        let (status, body) = match answer {
            Ok(Ok(answer)) => answer,
            // No answer in time. A request outlives its session on purpose: a device that
            // reconnects may still answer it (the SDKs keep unanswered requests), so a dropped
            // connection is not a failure until the response timeout says so.
            Ok(Err(_)) | Err(_) => return Err(HubError::GatewayTimeout),
        };
        if body.len() > MAX_METHOD_PAYLOAD {
            return Err(HubError::MessageTooLarge(format!(
                "the device answered with {} bytes; IoT Hub allows at most {MAX_METHOD_PAYLOAD}",
                body.len()
            )));
        }
        let payload = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        Ok(MethodOutcome { status, payload })
    }

    /// Waits (up to `deadline`) for the device to connect and subscribe to methods, then sends.
    async fn wait_and_send_method(
        &self,
        device_id: &str,
        call: &MethodCall,
        deadline: tokio::time::Instant,
    ) -> Result<(u64, MethodReply), HubError> {
        loop {
            // Registered before the check, so a subscription between the check and the wait
            // still wakes this call.
            let notified = self.inner.presence.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(sent) = self.try_send_method(device_id, call)? {
                return Ok(sent);
            }
            if !self.device_exists(device_id) {
                return Err(HubError::DeviceNotFound(device_id.to_owned()));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(HubError::DeviceNotOnline {
                    timeout_secs: call.connect_timeout.as_secs(),
                });
            }
        }
    }

    fn try_send_method(
        &self,
        device_id: &str,
        call: &MethodCall,
    ) -> Result<Option<(u64, MethodReply)>, HubError> {
        let sessions = lock(&self.inner.sessions);
        let Some(session) = sessions.get(device_id).filter(|s| s.subscriptions.methods) else {
            return Ok(None);
        };
        let rid = self.next_id();
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.inner.pending).insert(
            rid,
            PendingMethod {
                device_id: device_id.to_owned(),
                reply: reply_tx,
            },
        );
        let topic = Topic::MethodRequest {
            name: call.name.clone(),
            rid: rid.to_string(),
        }
        .to_string();
        match session.tx.try_send(Outbound::Publish {
            topic,
            payload: call.payload.clone(),
        }) {
            Ok(()) => Ok(Some((rid, reply_rx))),
            Err(_) => {
                lock(&self.inner.pending).remove(&rid);
                Err(HubError::Throttled)
            }
        }
    }

    /// A device's answer to a method request; ignored unless that device was asked.
    pub fn method_response(&self, device_id: &str, rid: &str, status: i32, body: Bytes) {
        let Ok(rid) = rid.parse::<u64>() else { return };
        let mut pending = lock(&self.inner.pending);
        if pending.get(&rid).is_some_and(|p| p.device_id == device_id)
            && let Some(waiter) = pending.remove(&rid)
        {
            let _ = waiter.reply.send((status, body));
        }
    }
}

fn mark_disconnected(state: &mut State, device_id: &str, now: String) {
    if let Some(device) = state.devices.get_mut(device_id) {
        device.set_connected(false, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::open(Store::in_memory(), vec!["localhost".into()]).expect("hub")
    }

    #[test]
    fn fresh_hub_has_the_tutorial_device_with_keys() {
        let hub = hub();
        let device = hub.get_device(TUTORIAL_DEVICE_ID).expect("device");
        assert_eq!(device["status"], "enabled");
        assert_eq!(device["connectionState"], "Disconnected");
        assert!(
            device["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .is_some_and(|k| k.len() == 44)
        );
        let owner = hub.policy_keys("iothubowner").expect("iothubowner");
        let debug = format!("{owner:?}");
        assert!(
            !debug.contains(&owner.primary_key) && !debug.contains(&owner.secondary_key),
            "Debug must not show keys: {debug}"
        );
    }

    #[test]
    fn create_update_delete_follow_etags() {
        let hub = hub();
        let created = hub
            .create_or_update_device("dev2", &json!({"deviceId": "dev2"}), None)
            .expect("create");
        let etag = created["etag"].as_str().expect("etag").to_owned();
        assert!(matches!(
            hub.create_or_update_device("dev2", &json!({"deviceId": "dev2"}), None),
            Err(HubError::DeviceAlreadyExists(_))
        ));
        assert!(matches!(
            hub.create_or_update_device("dev2", &json!({"status": "disabled"}), Some("\"bogus\"")),
            Err(HubError::PreconditionFailed { .. })
        ));
        let updated = hub
            .create_or_update_device(
                "dev2",
                &json!({"status": "disabled"}),
                Some(&format!("\"{etag}\"")),
            )
            .expect("update");
        assert_eq!(updated["status"], "disabled");
        assert_eq!(
            updated["authentication"]["symmetricKey"]["primaryKey"],
            created["authentication"]["symmetricKey"]["primaryKey"],
            "keys are kept when an update does not give them"
        );
        hub.delete_device("dev2", Some("*")).expect("delete");
        assert!(matches!(
            hub.get_device("dev2"),
            Err(HubError::DeviceNotFound(_))
        ));
    }

    #[test]
    fn twin_patch_versions_and_etag() {
        let hub = hub();
        let twin = hub.get_twin(TUTORIAL_DEVICE_ID).expect("twin");
        let etag = twin["etag"].as_str().expect("etag").to_owned();
        let patched = hub
            .update_twin(
                TUTORIAL_DEVICE_ID,
                &json!({"tags": {"building": "43"}, "properties": {"desired": {"floor": 3}}}),
                Some(&format!("\"{etag}\"")),
                false,
            )
            .expect("patch");
        assert_eq!(patched["properties"]["desired"]["floor"], 3);
        assert_eq!(patched["properties"]["desired"]["$version"], 2);
        assert_eq!(patched["tags"]["building"], "43");
        assert!(matches!(
            hub.update_twin(
                TUTORIAL_DEVICE_ID,
                &json!({"tags": {"a": 1}}),
                Some(&format!("\"{etag}\"")),
                false
            ),
            Err(HubError::PreconditionFailed { .. })
        ));
        assert!(matches!(
            hub.update_twin(
                TUTORIAL_DEVICE_ID,
                &json!({"properties": {"reported": {"x": 1}}}),
                None,
                false
            ),
            Err(HubError::Twin(TwinError::ReportedByService))
        ));
    }

    #[test]
    fn a_twin_job_patch_is_applied_once_per_device() {
        let hub = hub();
        let patch = json!({"properties": {"desired": {"building": 43}}});
        let ids = [TUTORIAL_DEVICE_ID];
        let first = hub.update_twins_for_job(&ids, &patch, Some("*"), false, Some("job-1"));
        let first = first[0].as_ref().expect("first apply");
        // A resumed job repeats the batch: the twin must not change again.
        let again = hub.update_twins_for_job(&ids, &patch, Some("*"), false, Some("job-1"));
        let again = again[0].as_ref().expect("repeat");
        assert_eq!(again["version"], first["version"]);
        assert_eq!(
            again["properties"]["desired"]["$version"],
            first["properties"]["desired"]["$version"]
        );
        // Another job, or a plain update, still applies.
        let other = hub.update_twins_for_job(&ids, &patch, Some("*"), false, Some("job-2"));
        let other = other[0].as_ref().expect("other job");
        assert_ne!(other["version"], first["version"]);
    }

    #[test]
    fn method_call_validation() {
        assert!(
            MethodCall::from_request(
                &json!({"methodName": "lockDoor", "payload": {"lockTime": "10m"}})
            )
            .is_ok()
        );
        for bad in [
            json!({"payload": 1}),
            json!({"methodName": "a b"}),
            json!({"methodName": "x", "responseTimeoutInSeconds": 4}),
            json!({"methodName": "x", "responseTimeoutInSeconds": 301}),
            json!({"methodName": "x", "connectTimeoutInSeconds": -1}),
            json!("nope"),
        ] {
            assert!(MethodCall::from_request(&bad).is_err(), "{bad}");
        }
        let big = json!({"methodName": "x", "payload": "y".repeat(MAX_METHOD_PAYLOAD)});
        assert!(matches!(
            MethodCall::from_request(&big),
            Err(HubError::MessageTooLarge(_))
        ));
    }
}
