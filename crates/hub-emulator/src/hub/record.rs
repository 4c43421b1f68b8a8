//! One device as the hub keeps it ([`DeviceRecord`]: identity, keys, twin sections, presence,
//! and its module identities as [`ModuleRecord`]s) and the documents built from them: the
//! registry's device and module, the service's twins, etags.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use hub_core::configuration::{ConfigurationInfo, ConfigurationStatus};
use hub_core::device::{
    Authentication, Capabilities, ConnectionState, Device, Module, SymmetricKey, X509Thumbprint,
};
use hub_core::twin::{Twin, TwinCollection, TwinProperties};
use time::OffsetDateTime;

/// The zero time IoT Hub shows for "never".
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// Formats a time as IoT Hub does in twins and identities (`2024-01-01T00:00:00.000Z`).
pub fn timestamp(at: OffsetDateTime) -> String {
    hub_core::timestamp::format_millis(at)
}

/// A device identity and its twin, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DeviceRecord {
    pub(super) device_id: String,
    pub(super) generation_id: String,
    pub(super) etag_seq: u64,
    pub(super) status: String,
    pub(super) status_reason: Option<String>,
    pub(super) status_updated_time: String,
    pub(super) auth_type: String,
    pub(super) primary_key: Option<String>,
    pub(super) secondary_key: Option<String>,
    pub(super) primary_thumbprint: Option<String>,
    pub(super) secondary_thumbprint: Option<String>,
    pub(super) iot_edge: bool,
    #[serde(default)]
    pub(super) device_scope: Option<String>,
    pub(super) twin_version: u64,
    pub(super) tags: Map<String, Value>,
    pub(super) desired: Map<String, Value>,
    pub(super) reported: Map<String, Value>,
    pub(super) last_activity_time: String,
    #[serde(default)]
    pub(super) model_id: String,
    /// The twin jobs whose patch this twin already has (newest last, bounded), saved with the
    /// twin itself so that a job resumed after a crash never applies its patch twice.
    #[serde(default)]
    pub(super) twin_jobs_applied: Vec<String>,
    /// The device's persistent MQTT session (CleanSession = 0), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) session: Option<super::Subscriptions>,
    /// The device's module identities by module id. Stored inside the device's record (older
    /// records have none), so a module is committed, locked and deleted with its device.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) modules: BTreeMap<String, ModuleRecord>,
    /// The automatic configurations targeting the twin and their status (the twin's
    /// `configurations`), set by the configurations' reconciler.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) configurations: BTreeMap<String, ConfigurationStatus>,
    #[serde(skip)]
    pub(super) connected: bool,
    #[serde(skip, default = "never")]
    pub(super) connection_state_updated_time: String,
    #[serde(skip, default = "empty_doc")]
    pub(super) doc: Arc<Value>,
}

fn never() -> String {
    NEVER.to_owned()
}

pub(super) fn empty_doc() -> Arc<Value> {
    Arc::new(Value::Null)
}

pub(super) fn etag_of(seq: u64) -> String {
    BASE64.encode(seq.to_string())
}

pub(super) fn twin_etag_of(version: u64) -> String {
    BASE64.encode(version.to_be_bytes())
}

pub(super) fn matches_etag(if_match: Option<&str>, current: &str) -> bool {
    match if_match.map(|v| v.trim().trim_start_matches("W/").trim_matches('"')) {
        None | Some("*") | Some("") => true,
        Some(given) => given == current,
    }
}

impl DeviceRecord {
    pub(super) fn connection_state(&self) -> &'static str {
        if self.connected {
            "Connected"
        } else {
            "Disconnected"
        }
    }

    pub(super) fn etag(&self) -> String {
        etag_of(self.etag_seq)
    }

    pub(super) fn device_json(&self) -> Value {
        let thumbprint = X509Thumbprint {
            primary_thumbprint: Some(self.primary_thumbprint.clone()),
            secondary_thumbprint: Some(self.secondary_thumbprint.clone()),
        };
        let device = Device {
            device_id: self.device_id.clone(),
            module_id: Some(None),
            generation_id: Some(self.generation_id.clone()),
            etag: Some(self.etag()),
            connection_state: Some(if self.connected {
                ConnectionState::Connected
            } else {
                ConnectionState::Disconnected
            }),
            // Status and auth type are validated on every write, so they always parse.
            status: self.status.parse().ok(),
            status_reason: Some(self.status_reason.clone()),
            connection_state_updated_time: Some(self.connection_state_updated_time.clone()),
            status_updated_time: Some(self.status_updated_time.clone()),
            last_activity_time: Some(self.last_activity_time.clone()),
            cloud_to_device_message_count: Some(0),
            authentication: Some(Authentication {
                symmetric_key: Some(SymmetricKey {
                    primary_key: Some(self.primary_key.clone()),
                    secondary_key: Some(self.secondary_key.clone()),
                }),
                x509_thumbprint: Some(thumbprint),
                auth_type: self.auth_type.parse().ok(),
                extra: Map::new(),
            }),
            capabilities: Some(Capabilities {
                iot_edge: self.iot_edge,
                extra: Map::new(),
            }),
            device_scope: Some(self.device_scope.clone()),
            parent_scopes: None,
            extra: Map::new(),
        };
        // Plain strings, numbers and string-keyed maps: serializing cannot fail.
        serde_json::to_value(device).unwrap_or(Value::Null)
    }

    pub(super) fn twin_json(&self) -> Value {
        let twin = Twin {
            device_id: self.device_id.clone(),
            module_id: None,
            etag: Some(twin_etag_of(self.twin_version)),
            device_etag: Some(self.etag()),
            // Status and auth type are validated on every write, so they always parse.
            status: self.status.parse().ok(),
            status_reason: Some(self.status_reason.clone()),
            status_update_time: Some(self.status_updated_time.clone()),
            connection_state: Some(if self.connected {
                ConnectionState::Connected
            } else {
                ConnectionState::Disconnected
            }),
            last_activity_time: Some(self.last_activity_time.clone()),
            cloud_to_device_message_count: Some(0),
            authentication_type: self.auth_type.parse().ok(),
            x509_thumbprint: Some(X509Thumbprint {
                primary_thumbprint: Some(self.primary_thumbprint.clone()),
                secondary_thumbprint: Some(self.secondary_thumbprint.clone()),
            }),
            model_id: Some(self.model_id.clone()),
            version: Some(self.twin_version),
            tags: Some(self.tags.clone()),
            properties: Some(TwinProperties {
                desired: Some(TwinCollection(self.desired.clone())),
                reported: Some(TwinCollection(self.reported.clone())),
                extra: Map::new(),
            }),
            capabilities: Some(Capabilities {
                iot_edge: self.iot_edge,
                extra: Map::new(),
            }),
            configurations: twin_configurations(&self.configurations),
            extra: Map::new(),
        };
        // Plain strings, numbers and string-keyed maps: serializing cannot fail.
        serde_json::to_value(twin).unwrap_or(Value::Null)
    }

    pub(super) fn refresh(&mut self) {
        self.doc = Arc::new(self.twin_json());
    }

    /// The twin document's etag.
    pub(super) fn twin_etag(&self) -> String {
        twin_etag_of(self.twin_version)
    }

    /// Takes over what connection events changed on `current` (kept in memory, not under the
    /// device's write lock) while this record was being staged and committed, so applying a
    /// staged change never reverts a connect, a disconnect or a newer activity time.
    pub(super) fn keep_presence_of(&mut self, current: &DeviceRecord) {
        self.connected = current.connected;
        self.connection_state_updated_time = current.connection_state_updated_time.clone();
        // Both are `2024-01-01T00:00:00.000Z` strings (or `NEVER`): text order is time order.
        if current.last_activity_time > self.last_activity_time {
            self.last_activity_time = current.last_activity_time.clone();
        }
        for (id, module) in &mut self.modules {
            if let Some(now) = current.modules.get(id) {
                module.keep_presence_of(&self.device_id, now);
            }
        }
    }

    /// Builds the cached twin documents of the device and of every module (after a load).
    pub(super) fn refresh_all(&mut self) {
        self.refresh();
        let device_id = self.device_id.clone();
        for module in self.modules.values_mut() {
            module.refresh(&device_id);
        }
    }

    /// Records a connect or disconnect and brings the cached twin document up to date by
    /// changing only the fields a connection event changes (`connectionState` and
    /// `lastActivityTime`) instead of rebuilding it: this runs on every MQTT connect
    /// and disconnect, under the state lock. The result equals [`DeviceRecord::refresh`]; a
    /// document still shared with a query snapshot is copied first, so snapshots never change.
    pub(super) fn set_connected(&mut self, connected: bool, now: String) {
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

/// A module identity of a device and its module twin, as stored inside its [`DeviceRecord`].
/// A module has no status of its own (the REST reference's `Module` has none): it is served
/// while its device is enabled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ModuleRecord {
    pub(super) module_id: String,
    pub(super) generation_id: String,
    pub(super) etag_seq: u64,
    pub(super) auth_type: String,
    pub(super) primary_key: Option<String>,
    pub(super) secondary_key: Option<String>,
    pub(super) primary_thumbprint: Option<String>,
    pub(super) secondary_thumbprint: Option<String>,
    #[serde(default)]
    pub(super) managed_by: Option<String>,
    pub(super) twin_version: u64,
    pub(super) tags: Map<String, Value>,
    pub(super) desired: Map<String, Value>,
    pub(super) reported: Map<String, Value>,
    pub(super) last_activity_time: String,
    /// The module's persistent MQTT session (CleanSession = 0), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) session: Option<super::Subscriptions>,
    /// As [`DeviceRecord::configurations`], for module configurations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(super) configurations: BTreeMap<String, ConfigurationStatus>,
    #[serde(skip)]
    pub(super) connected: bool,
    #[serde(skip, default = "never")]
    pub(super) connection_state_updated_time: String,
    #[serde(skip, default = "empty_doc")]
    pub(super) doc: Arc<Value>,
}

impl ModuleRecord {
    pub(super) fn etag(&self) -> String {
        etag_of(self.etag_seq)
    }

    pub(super) fn twin_etag(&self) -> String {
        twin_etag_of(self.twin_version)
    }

    fn connection_state(&self) -> ConnectionState {
        if self.connected {
            ConnectionState::Connected
        } else {
            ConnectionState::Disconnected
        }
    }

    /// The registry's `Module` document.
    pub(super) fn module_json(&self, device_id: &str) -> Value {
        let module = Module {
            module_id: self.module_id.clone(),
            managed_by: Some(self.managed_by.clone()),
            device_id: device_id.to_owned(),
            generation_id: Some(self.generation_id.clone()),
            etag: Some(self.etag()),
            connection_state: Some(self.connection_state()),
            connection_state_updated_time: Some(self.connection_state_updated_time.clone()),
            last_activity_time: Some(self.last_activity_time.clone()),
            cloud_to_device_message_count: Some(0),
            authentication: Some(Authentication {
                symmetric_key: Some(SymmetricKey {
                    primary_key: Some(self.primary_key.clone()),
                    secondary_key: Some(self.secondary_key.clone()),
                }),
                x509_thumbprint: Some(X509Thumbprint {
                    primary_thumbprint: Some(self.primary_thumbprint.clone()),
                    secondary_thumbprint: Some(self.secondary_thumbprint.clone()),
                }),
                auth_type: self.auth_type.parse().ok(),
                extra: Map::new(),
            }),
            extra: Map::new(),
        };
        // Plain strings, numbers and string-keyed maps: serializing cannot fail.
        serde_json::to_value(module).unwrap_or(Value::Null)
    }

    /// The module twin: a twin document with `moduleId` set and `deviceEtag` the module
    /// identity's etag; no `status` or `capabilities`, which modules do not have.
    pub(super) fn twin_json(&self, device_id: &str) -> Value {
        let twin = Twin {
            device_id: device_id.to_owned(),
            module_id: Some(Some(self.module_id.clone())),
            etag: Some(self.twin_etag()),
            device_etag: Some(self.etag()),
            connection_state: Some(self.connection_state()),
            last_activity_time: Some(self.last_activity_time.clone()),
            cloud_to_device_message_count: Some(0),
            authentication_type: self.auth_type.parse().ok(),
            x509_thumbprint: Some(X509Thumbprint {
                primary_thumbprint: Some(self.primary_thumbprint.clone()),
                secondary_thumbprint: Some(self.secondary_thumbprint.clone()),
            }),
            model_id: Some(String::new()),
            version: Some(self.twin_version),
            tags: Some(self.tags.clone()),
            properties: Some(TwinProperties {
                desired: Some(TwinCollection(self.desired.clone())),
                reported: Some(TwinCollection(self.reported.clone())),
                extra: Map::new(),
            }),
            configurations: twin_configurations(&self.configurations),
            ..Twin::default()
        };
        // Plain strings, numbers and string-keyed maps: serializing cannot fail.
        serde_json::to_value(twin).unwrap_or(Value::Null)
    }

    pub(super) fn refresh(&mut self, device_id: &str) {
        self.doc = Arc::new(self.twin_json(device_id));
    }

    /// As [`DeviceRecord::keep_presence_of`], for a module; the cached twin is rebuilt when
    /// the presence it shows changed meanwhile.
    fn keep_presence_of(&mut self, device_id: &str, current: &ModuleRecord) {
        let changed = self.connected != current.connected
            || current.last_activity_time > self.last_activity_time;
        self.connected = current.connected;
        self.connection_state_updated_time = current.connection_state_updated_time.clone();
        if current.last_activity_time > self.last_activity_time {
            self.last_activity_time = current.last_activity_time.clone();
        }
        if changed {
            self.refresh(device_id);
        }
    }

    /// Records a connect or disconnect (see [`DeviceRecord::set_connected`]).
    pub(super) fn set_connected(&mut self, device_id: &str, connected: bool, now: String) {
        self.connected = connected;
        if connected {
            self.last_activity_time = now.clone();
        }
        self.connection_state_updated_time = now;
        self.refresh(device_id);
    }
}

/// A twin's `configurations` map as IoT Hub shows it (left out while no configuration
/// targets the twin).
fn twin_configurations(
    statuses: &BTreeMap<String, ConfigurationStatus>,
) -> Option<BTreeMap<String, ConfigurationInfo>> {
    (!statuses.is_empty()).then(|| {
        statuses
            .iter()
            .map(|(id, status)| (id.clone(), ConfigurationInfo { status: *status }))
            .collect()
    })
}

pub(super) fn random_key() -> String {
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

pub(super) fn generation_id() -> String {
    let mut bytes = [0u8; 8];
    fill_random(&mut bytes);
    format!(
        "638{:015}",
        u64::from_le_bytes(bytes) % 1_000_000_000_000_000
    )
}
