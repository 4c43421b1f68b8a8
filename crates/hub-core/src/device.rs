//! Device identity as the registry REST API sends it (`GET/PUT /devices/{id}`, reference §4.2).
//!
//! Also home of the wire-model plumbing shared by `twin`, `method`, `job` and `query`: the
//! string-enum macros, [`UnknownValueError`] and the serde helper that keeps `null` apart from
//! an absent key. Timestamps stay `String`s so they round-trip byte for byte.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// An enum value that is not one of the spellings IoT Hub uses for that type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {type_name} value `{value}`")]
pub struct UnknownValueError {
    /// The Rust type that was being parsed, e.g. `DeviceStatus`.
    pub type_name: &'static str,
    /// The text that did not match.
    pub value: String,
}

impl UnknownValueError {
    /// Builds the error for `value` rejected by `type_name`.
    pub fn new(type_name: &'static str, value: &str) -> Self {
        Self {
            type_name,
            value: value.to_owned(),
        }
    }
}

/// Serde `deserialize_with` helper: wraps whatever is present, so with `#[serde(default)]` an
/// absent key gives `None` and a present one (even `null`) gives `Some(..)`.
///
/// On `Option<Value>` fields `null` becomes `Some(Value::Null)`; on `Option<Option<T>>` fields
/// `null` becomes `Some(None)`. Paired with `skip_serializing_if = "Option::is_none"` the field
/// serialises back exactly as received.
pub(crate) fn present<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// Declares a closed string enum: `as_str`, `ALL`, `Display`, `FromStr` (exact spelling) and
/// serde as the wire string; anything else is rejected.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in the order of the reference tables.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling on the wire.
            pub const fn as_str(&self) -> &'static str {
                match self {
                    $( Self::$variant => $wire ),+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::device::UnknownValueError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $wire => Ok(Self::$variant), )+
                    _ => Err($crate::device::UnknownValueError::new(stringify!($name), s)),
                }
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl ::serde::de::Visitor<'_> for Visitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " string"))
                    }
                    fn visit_str<E: ::serde::de::Error>(self, s: &str) -> Result<$name, E> {
                        match s {
                            $( $wire => Ok($name::$variant), )+
                            _ => Err(E::unknown_variant(s, &[$($wire),+])),
                        }
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }
    };
}

/// Declares an open string enum: like `wire_enum!` plus an `Other(String)` variant that keeps
/// any spelling we do not know, so newer service values parse and serialise back unchanged.
macro_rules! open_wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this crate does not know, kept verbatim.
            Other(String),
        }

        impl $name {
            /// Every known variant, in the order of the reference tables.
            pub const KNOWN: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $wire, )+
                    Self::Other(s) => s,
                }
            }

            /// Parses a wire spelling; unknown text becomes `Other`.
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $( $wire => Self::$variant, )+
                    other => Self::Other(other.to_owned()),
                }
            }

            /// False for `Other(..)`.
            pub fn is_known(&self) -> bool {
                !matches!(self, Self::Other(_))
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = ::std::convert::Infallible;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok(Self::from_wire(s))
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl ::serde::de::Visitor<'_> for Visitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " string"))
                    }
                    fn visit_str<E: ::serde::de::Error>(self, s: &str) -> Result<$name, E> {
                        Ok($name::from_wire(s))
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }
    };
}
pub(crate) use open_wire_enum;

wire_enum! {
    /// `status` of a device identity (and of a twin): lower case on the wire.
    pub enum DeviceStatus {
        /// `enabled`: the device may connect.
        Enabled => "enabled",
        /// `disabled`: connections are refused.
        Disabled => "disabled",
    }
}

wire_enum! {
    /// `connectionState` of a device: capitalised on the wire.
    pub enum ConnectionState {
        /// `Disconnected`.
        Disconnected => "Disconnected",
        /// `Connected`.
        Connected => "Connected",
    }
}

wire_enum! {
    /// `authentication.type` of a device (and `authenticationType` of a twin).
    pub enum AuthenticationType {
        /// `sas`: shared access keys.
        Sas => "sas",
        /// `selfSigned`: X.509 thumbprints.
        SelfSigned => "selfSigned",
        /// `certificateAuthority`: X.509 chained to a registered CA.
        CertificateAuthority => "certificateAuthority",
        /// `none`: no credentials (modules managed by Edge).
        None => "none",
    }
}

/// A device identity (swagger model `Device`); modules use the same shape plus `moduleId`.
///
/// Fields the service may send as `null` are `Option<Option<_>>`: outer `None` = absent,
/// `Some(None)` = `null`. Unknown keys are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// `deviceId` (required).
    pub device_id: String,
    /// `moduleId`: set on module identities; devices may send it as `null`, `Some(None)`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub module_id: Option<Option<String>>,
    /// `generationId`: hub-generated, distinguishes re-created devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    /// `etag` (unquoted, as in the body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `connectionState`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// `statusReason` (≤ 128 chars); `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub status_reason: Option<Option<String>>,
    /// `connectionStateUpdatedTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state_updated_time: Option<String>,
    /// `statusUpdatedTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_updated_time: Option<String>,
    /// `lastActivityTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// `cloudToDeviceMessageCount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    /// `authentication`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// `capabilities`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// `deviceScope` (Edge parent scope of this device); `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub device_scope: Option<Option<String>>,
    /// `parentScopes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_scopes: Option<Vec<String>>,
    /// Keys this crate does not model, kept for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Device {
    /// A device with only `deviceId` set.
    pub fn new(device_id: impl Into<String>) -> Self {
        Self {
            device_id: device_id.into(),
            ..Self::default()
        }
    }

    /// `moduleId` flattened: `None` when absent or `null`.
    pub fn module_id(&self) -> Option<&str> {
        self.module_id.as_ref().and_then(Option::as_deref)
    }

    /// `statusReason` flattened: `None` when absent or `null`.
    pub fn status_reason(&self) -> Option<&str> {
        self.status_reason.as_ref().and_then(Option::as_deref)
    }

    /// `authentication.type`, if present.
    pub fn authentication_type(&self) -> Option<AuthenticationType> {
        self.authentication.as_ref().and_then(|a| a.auth_type)
    }

    /// `authentication.symmetricKey`, if present.
    pub fn symmetric_key(&self) -> Option<&SymmetricKey> {
        self.authentication
            .as_ref()
            .and_then(|a| a.symmetric_key.as_ref())
    }

    /// `capabilities.iotEdge`, false when absent.
    pub fn is_iot_edge(&self) -> bool {
        self.capabilities.as_ref().is_some_and(|c| c.iot_edge)
    }
}

/// `authentication` of a device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    /// `symmetricKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKey>,
    /// `x509Thumbprint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
    /// `type`; Node creates devices without it (the hub then assumes `sas`).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<AuthenticationType>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `authentication.symmetricKey`: base64 key text as sent. `Debug` redacts the keys.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    /// `primaryKey`; `Some(None)` = `null` (X.509 devices, or "hub, generate one").
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub primary_key: Option<Option<String>>,
    /// `secondaryKey`; `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub secondary_key: Option<Option<String>>,
}

impl SymmetricKey {
    /// Both keys set.
    pub fn new(primary: impl Into<String>, secondary: impl Into<String>) -> Self {
        Self {
            primary_key: Some(Some(primary.into())),
            secondary_key: Some(Some(secondary.into())),
        }
    }

    /// `primaryKey` flattened: `None` when absent, `null` or empty.
    pub fn primary(&self) -> Option<&str> {
        self.primary_key
            .as_ref()
            .and_then(Option::as_deref)
            .filter(|k| !k.is_empty())
    }

    /// `secondaryKey` flattened: `None` when absent, `null` or empty.
    pub fn secondary(&self) -> Option<&str> {
        self.secondary_key
            .as_ref()
            .and_then(Option::as_deref)
            .filter(|k| !k.is_empty())
    }
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: show only whether each one is set.
        let shown = |k: Option<&str>| if k.is_some() { "<redacted>" } else { "<none>" };
        f.debug_struct("SymmetricKey")
            .field("primary_key", &shown(self.primary()))
            .field("secondary_key", &shown(self.secondary()))
            .finish()
    }
}

/// `x509Thumbprint` (device authentication and twin root).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    /// `primaryThumbprint`; `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub primary_thumbprint: Option<Option<String>>,
    /// `secondaryThumbprint`; `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub secondary_thumbprint: Option<Option<String>>,
}

impl X509Thumbprint {
    /// Both thumbprints present as `null`, as the hub shows SAS devices.
    pub fn nulls() -> Self {
        Self {
            primary_thumbprint: Some(None),
            secondary_thumbprint: Some(None),
        }
    }
}

/// `capabilities` of a device or twin.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// `iotEdge`: false when absent.
    #[serde(default)]
    pub iot_edge: bool,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A module identity on a device (swagger model `Module`, `GET/PUT /devices/{id}/modules/{mid}`;
/// the field list of azure-iot-sdk-python `azure-iot-hub/azure/iot/hub/protocol/models/module.py`
/// and the REST reference "Modules - Get Identity"). Unlike a device it has no `status` or
/// `capabilities`, and it has `managedBy`. Unknown keys are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Module {
    /// `moduleId` (required).
    pub module_id: String,
    /// `managedBy`: who manages the module (`"IotEdge"` for Edge-deployed modules);
    /// `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub managed_by: Option<Option<String>>,
    /// `deviceId` (required).
    pub device_id: String,
    /// `generationId`: hub-generated, distinguishes re-created modules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    /// `etag` (unquoted, as in the body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `connectionState`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    /// `connectionStateUpdatedTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state_updated_time: Option<String>,
    /// `lastActivityTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// `cloudToDeviceMessageCount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    /// `authentication`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Keys this crate does not model, kept for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The answer to `DELETE /devices/{id}/commands` (purge the device's cloud-to-device queue),
/// as the REST reference's `PurgeMessageQueueResult` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PurgeMessageQueueResult {
    /// How many queued messages were deleted.
    pub total_messages_purged: u64,
    /// The device whose queue was purged.
    pub device_id: String,
    /// The module, for a module's queue (`null` for a device).
    #[serde(default)]
    pub module_id: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn modules_round_trip_with_managed_by_null() {
        let text = r#"{"moduleId":"m1","managedBy":null,"deviceId":"d1","etag":"MQ==","connectionState":"Disconnected","cloudToDeviceMessageCount":0}"#;
        let module: Module = serde_json::from_str(text).unwrap();
        assert_eq!(module.module_id, "m1");
        assert_eq!(module.managed_by, Some(None));
        assert_eq!(module.connection_state, Some(ConnectionState::Disconnected));
        let back = serde_json::to_value(&module).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(text).unwrap());
    }
    use proptest::prelude::*;
    use serde_json::json;

    /// Reference §4.2, device JSON.
    const GET_DEVICE: &str = r#"{
      "deviceId": "dev1",
      "generationId": "638000000000000000",
      "etag": "MTIzNDU2Nzg=",
      "connectionState": "Disconnected",
      "status": "enabled",
      "statusReason": null,
      "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
      "statusUpdatedTime": "0001-01-01T00:00:00Z",
      "lastActivityTime": "0001-01-01T00:00:00Z",
      "cloudToDeviceMessageCount": 0,
      "authentication": {
        "symmetricKey": {"primaryKey": "<b64>", "secondaryKey": "<b64>"},
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
        "type": "sas"
      },
      "capabilities": {"iotEdge": false},
      "deviceScope": "...", "parentScopes": ["..."]
    }"#;

    /// Reference §7.5, Python `create_device_with_sas` body.
    const PY_CREATE: &str = r#"{"deviceId": "dev2", "status": "enabled", "authentication": {"symmetricKey": {"primaryKey": "cHJpbWFyeQ==", "secondaryKey": "c2Vjb25kYXJ5"}, "type": "sas"}, "capabilities": {"iotEdge": false}}"#;

    /// Reference §7.6, Node `registry.create` body (no capabilities).
    const NODE_CREATE: &str = r#"{"deviceId":"dev2","status":"enabled","authentication":{"symmetricKey":{"primaryKey":"cHJpbWFyeQ==","secondaryKey":"c2Vjb25kYXJ5"},"type":"sas"}}"#;

    fn round_trip(text: &str) -> Device {
        let original: Value = serde_json::from_str(text).unwrap();
        let device: Device = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&device).unwrap(), original, "{text}");
        device
    }

    #[test]
    fn get_device_round_trips() {
        let d = round_trip(GET_DEVICE);
        assert_eq!(d.device_id, "dev1");
        assert_eq!(d.status, Some(DeviceStatus::Enabled));
        assert_eq!(d.connection_state, Some(ConnectionState::Disconnected));
        assert_eq!(d.status_reason, Some(None));
        assert_eq!(d.status_reason(), None);
        assert_eq!(d.authentication_type(), Some(AuthenticationType::Sas));
        assert_eq!(
            d.symmetric_key().and_then(SymmetricKey::primary),
            Some("<b64>")
        );
        assert_eq!(d.generation_id.as_deref(), Some("638000000000000000"));
        assert!(!d.is_iot_edge());
        assert!(d.extra.is_empty());
        assert_eq!(d.module_id, None);
        // The emulator and some SDKs send `moduleId: null` on devices; it must come back.
        let d = round_trip(r#"{"deviceId":"dev1","moduleId":null,"deviceScope":null}"#);
        assert_eq!(d.module_id, Some(None));
        assert_eq!(d.module_id(), None);
        assert_eq!(d.device_scope, Some(None));
    }

    #[test]
    fn sdk_create_bodies_round_trip() {
        let py = round_trip(PY_CREATE);
        assert_eq!(py.status_reason, None);
        assert!(py.capabilities.is_some());
        let node = round_trip(NODE_CREATE);
        assert!(node.capabilities.is_none());
    }

    #[test]
    fn unknown_fields_are_kept() {
        let text = r#"{"deviceId":"d","moduleId":"m","managedBy":"iotEdge","authentication":{"type":"selfSigned","x509Thumbprint":{"primaryThumbprint":"AB","secondaryThumbprint":null},"symmetricKey":{"primaryKey":null,"secondaryKey":null},"future":1},"capabilities":{"iotEdge":true,"x":[1]}}"#;
        let d = round_trip(text);
        assert_eq!(d.module_id(), Some("m"));
        assert_eq!(d.extra.get("managedBy"), Some(&json!("iotEdge")));
        assert!(d.is_iot_edge());
        assert_eq!(
            d.authentication_type(),
            Some(AuthenticationType::SelfSigned)
        );
        assert_eq!(d.symmetric_key().and_then(SymmetricKey::primary), None);
    }

    #[test]
    fn enum_spellings() {
        for (v, s) in [
            (DeviceStatus::Enabled, "enabled"),
            (DeviceStatus::Disabled, "disabled"),
        ] {
            assert_eq!(serde_json::to_value(v).unwrap(), json!(s));
            assert_eq!(s.parse::<DeviceStatus>().unwrap(), v);
        }
        for (v, s) in [
            (ConnectionState::Disconnected, "Disconnected"),
            (ConnectionState::Connected, "Connected"),
        ] {
            assert_eq!(serde_json::to_value(v).unwrap(), json!(s));
            assert_eq!(v.to_string(), s);
        }
        let auth: Vec<&str> = AuthenticationType::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(auth, ["sas", "selfSigned", "certificateAuthority", "none"]);
        for a in AuthenticationType::ALL {
            let back: AuthenticationType = serde_json::from_value(json!(a.as_str())).unwrap();
            assert_eq!(back, *a);
        }
        // Spellings are exact: the service never sends other casings.
        assert!("Enabled".parse::<DeviceStatus>().is_err());
        assert!("connected".parse::<ConnectionState>().is_err());
        assert!(serde_json::from_str::<Device>(r#"{"deviceId":"d","status":"on"}"#).is_err());
        let err = "SAS".parse::<AuthenticationType>().unwrap_err();
        assert_eq!(err.to_string(), "unknown AuthenticationType value `SAS`");
    }

    #[test]
    fn debug_redacts_keys() {
        let d: Device = serde_json::from_str(PY_CREATE).unwrap();
        let shown = format!("{d:?}");
        assert!(!shown.contains("cHJpbWFyeQ=="), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn missing_device_id_is_an_error() {
        assert!(serde_json::from_str::<Device>(r#"{"status":"enabled"}"#).is_err());
    }

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC*") {
            let _ = serde_json::from_str::<Device>(&s);
            let _ = serde_json::from_str::<Authentication>(&s);
            let _ = s.parse::<DeviceStatus>();
        }

        #[test]
        fn mutated_fixture_never_panics(cut in 0usize..700, junk in "[{}\\[\\]\":, a-z0-9nul-]{0,8}") {
            let mut text: String = GET_DEVICE.chars().take(cut).collect();
            text.push_str(&junk);
            text.extend(GET_DEVICE.chars().skip(cut));
            let _ = serde_json::from_str::<Device>(&text);
        }
    }
}
