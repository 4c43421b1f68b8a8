//! Device and module twins as the service REST API and queries send them (reference §4.3), and
//! the service-side patch body (`PATCH`/`PUT /twins/{id}`, `updateTwin` of a job).
//!
//! Desired/reported sections are JSON objects kept verbatim, `$version` and `$metadata` included.

use std::ops::{Deref, DerefMut};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::device::{
    AuthenticationType, Capabilities, ConnectionState, DeviceStatus, X509Thumbprint, present,
};

/// Key of the section version inside `desired` / `reported`.
pub const VERSION_KEY: &str = "$version";
/// Key of the metadata object inside `desired` / `reported`.
pub const METADATA_KEY: &str = "$metadata";
/// Metadata key holding the last update time.
pub const LAST_UPDATED_KEY: &str = "$lastUpdated";
/// Metadata key (desired only) holding the section version of the last update.
pub const LAST_UPDATED_VERSION_KEY: &str = "$lastUpdatedVersion";

/// A twin document (swagger model `Twin`). Unknown keys are kept in `extra`.
///
/// Fields the service may send as `null` are `Option<Option<_>>`: outer `None` = absent,
/// `Some(None)` = `null`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// `deviceId` (required).
    pub device_id: String,
    /// `moduleId`: `null` on device twins, set on module twins.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub module_id: Option<Option<String>>,
    /// `etag` of the whole twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `deviceEtag`: the etag of the device identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_etag: Option<String>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// `statusReason`; `Some(None)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub status_reason: Option<Option<String>>,
    /// `statusUpdateTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_update_time: Option<String>,
    /// `connectionState`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<ConnectionState>,
    /// `lastActivityTime`, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// `cloudToDeviceMessageCount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<u64>,
    /// `authenticationType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication_type: Option<AuthenticationType>,
    /// `x509Thumbprint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
    /// `modelId` (IoT Plug and Play; `""` when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// `version`: the twin document version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `tags`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// `properties` (`desired` and `reported`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
    /// `capabilities`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// `configurations`: the automatic configurations that target this twin and their status
    /// (read-only; set by the hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configurations:
        Option<std::collections::BTreeMap<String, crate::configuration::ConfigurationInfo>>,
    /// Keys this crate does not model, kept for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Twin {
    /// A twin with only `deviceId` set.
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

    /// `properties.desired`, if present.
    pub fn desired(&self) -> Option<&TwinCollection> {
        self.properties.as_ref().and_then(|p| p.desired.as_ref())
    }

    /// `properties.reported`, if present.
    pub fn reported(&self) -> Option<&TwinCollection> {
        self.properties.as_ref().and_then(|p| p.reported.as_ref())
    }

    /// `properties.desired.$version`, if present and an unsigned integer.
    pub fn desired_version(&self) -> Option<u64> {
        self.desired().and_then(TwinCollection::version)
    }

    /// `properties.reported.$version`, if present and an unsigned integer.
    pub fn reported_version(&self) -> Option<u64> {
        self.reported().and_then(TwinCollection::version)
    }
}

/// `properties` of a twin; also the body of a device-side twin GET response
/// (`{"desired": {..}, "reported": {..}}`, reference §3.7/§7.3).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TwinProperties {
    /// `desired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinCollection>,
    /// `reported`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<TwinCollection>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A desired or reported section: a JSON object whose user properties sit next to `$version` and
/// `$metadata`. Derefs to the underlying map; serialises as that object.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TwinCollection(pub Map<String, Value>);

impl TwinCollection {
    /// An empty section.
    pub fn new() -> Self {
        Self::default()
    }

    /// `$version`, if present and an unsigned integer.
    pub fn version(&self) -> Option<u64> {
        self.0.get(VERSION_KEY).and_then(Value::as_u64)
    }

    /// Sets `$version`.
    pub fn set_version(&mut self, version: u64) {
        self.0.insert(VERSION_KEY.to_owned(), Value::from(version));
    }

    /// `$metadata`, if present and an object.
    pub fn metadata(&self) -> Option<&Map<String, Value>> {
        self.0.get(METADATA_KEY).and_then(Value::as_object)
    }

    /// `$metadata.$lastUpdated`, if present and a string.
    pub fn last_updated(&self) -> Option<&str> {
        self.metadata()
            .and_then(|m| m.get(LAST_UPDATED_KEY))
            .and_then(Value::as_str)
    }

    /// The user properties: every top-level entry whose key does not start with `$`.
    pub fn user_properties(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter().filter(|(k, _)| !k.starts_with('$'))
    }

    /// The user properties as a new object (no `$version`, no `$metadata`).
    pub fn without_system_keys(&self) -> Map<String, Value> {
        self.user_properties()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The underlying object.
    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

impl Deref for TwinCollection {
    type Target = Map<String, Value>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for TwinCollection {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl From<Map<String, Value>> for TwinCollection {
    fn from(map: Map<String, Value>) -> Self {
        Self(map)
    }
}

/// Body of a service twin update: `PATCH /twins/{id}` (partial merge, `null` deletes),
/// `PUT /twins/{id}` (replace) and `updateTwin` of a `scheduleUpdateTwin` job.
///
/// `null` values inside `tags` / `desired` are kept, because they delete. Anything else the
/// client sent (e.g. `deviceId`) lands in `extra`; a forbidden `properties.reported` lands in
/// [`TwinPatchProperties::extra`] so the receiver can reject it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinPatch {
    /// `etag` (jobs carry it in the body, usually `"*"`; REST uses `If-Match` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `tags`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// `properties` (only `desired` is writable by the service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinPatchProperties>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TwinPatch {
    /// An empty patch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `etag`.
    pub fn with_etag(mut self, etag: impl Into<String>) -> Self {
        self.etag = Some(etag.into());
        self
    }

    /// Sets `tags`.
    pub fn with_tags(mut self, tags: Map<String, Value>) -> Self {
        self.tags = Some(tags);
        self
    }

    /// Sets `properties.desired`.
    pub fn with_desired(mut self, desired: Map<String, Value>) -> Self {
        self.properties
            .get_or_insert_with(TwinPatchProperties::default)
            .desired = Some(desired);
        self
    }

    /// `properties.desired`, if present.
    pub fn desired(&self) -> Option<&Map<String, Value>> {
        self.properties.as_ref().and_then(|p| p.desired.as_ref())
    }

    /// True if the body tries to write `properties.reported`, which the service may not.
    pub fn touches_reported(&self) -> bool {
        self.properties
            .as_ref()
            .is_some_and(|p| p.extra.contains_key("reported"))
    }
}

/// `properties` of a [`TwinPatch`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TwinPatchProperties {
    /// `desired` (partial for PATCH; `null` values delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
    /// Anything else (e.g. `reported`), kept so the receiver can reject it.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Reference §4.3, twin JSON.
    const GET_TWIN: &str = r#"{
      "deviceId": "dev1", "moduleId": null,
      "etag": "AAAAAAAAAAE=", "deviceEtag": "MTIzNDU2Nzg=",
      "status": "enabled", "statusReason": null, "statusUpdateTime": "0001-01-01T00:00:00Z",
      "connectionState": "Disconnected", "lastActivityTime": "0001-01-01T00:00:00Z",
      "cloudToDeviceMessageCount": 0, "authenticationType": "sas",
      "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
      "modelId": "", "version": 2,
      "tags": {"building": "43"},
      "properties": {
        "desired": {
          "telemetryInterval": 10,
          "$metadata": {"$lastUpdated": "2024-01-01T00:00:00.000Z", "$lastUpdatedVersion": 1,
                        "telemetryInterval": {"$lastUpdated": "2024-01-01T00:00:00.000Z", "$lastUpdatedVersion": 1}},
          "$version": 1
        },
        "reported": {"$metadata": {"$lastUpdated": "2024-01-01T00:00:00.000Z"}, "$version": 1}
      },
      "capabilities": {"iotEdge": false}
    }"#;

    fn round_trip<T>(text: &str) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let original: Value = serde_json::from_str(text).unwrap();
        let parsed: T = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), original, "{text}");
        parsed
    }

    #[test]
    fn get_twin_round_trips() {
        let t: Twin = round_trip(GET_TWIN);
        assert_eq!(t.device_id, "dev1");
        assert_eq!(t.module_id, Some(None));
        assert_eq!(t.module_id(), None);
        assert_eq!(t.status_reason(), None);
        assert_eq!(t.version, Some(2));
        assert_eq!(t.model_id.as_deref(), Some(""));
        assert_eq!(t.authentication_type, Some(AuthenticationType::Sas));
        assert_eq!(t.desired_version(), Some(1));
        assert_eq!(t.reported_version(), Some(1));
        let desired = t.desired().unwrap();
        assert_eq!(desired.last_updated(), Some("2024-01-01T00:00:00.000Z"));
        let user: Vec<_> = desired.user_properties().map(|(k, _)| k.as_str()).collect();
        assert_eq!(user, ["telemetryInterval"]);
        assert_eq!(
            Value::Object(desired.without_system_keys()),
            json!({"telemetryInterval": 10})
        );
        assert_eq!(desired.get("telemetryInterval"), Some(&json!(10)));
        assert_eq!(t.tags.as_ref().unwrap().get("building"), Some(&json!("43")));
    }

    #[test]
    fn module_twin_and_unknown_keys() {
        let t: Twin = round_trip(
            r#"{"deviceId":"dev1","moduleId":"mod1","deviceScope":"ms-azure-iot-edge://p-1","parentScopes":[],"properties":{"desired":{"$version":3},"reported":{"$version":9}},"futureField":{"a":[1,2]}}"#,
        );
        assert_eq!(t.module_id(), Some("mod1"));
        assert_eq!(t.extra.len(), 3);
        assert_eq!(t.reported_version(), Some(9));
    }

    #[test]
    fn device_side_twin_get_body_is_twin_properties() {
        // Reference §7.3, hub answer to $iothub/twin/GET.
        let p: TwinProperties = round_trip(
            r#"{"desired": {"telemetryInterval": 10, "$version": 4}, "reported": {"fw": "1.0", "$version": 7}}"#,
        );
        assert_eq!(
            p.desired.as_ref().and_then(TwinCollection::version),
            Some(4)
        );
        assert_eq!(
            p.reported.as_ref().and_then(TwinCollection::version),
            Some(7)
        );
        // Desired-patch body (§7.3) is a bare collection.
        let c: TwinCollection = round_trip(r#"{"telemetryInterval": 30, "$version": 5}"#);
        assert_eq!(c.version(), Some(5));
        assert_eq!(c.metadata(), None);
    }

    #[test]
    fn version_helpers() {
        let mut c = TwinCollection::new();
        assert_eq!(c.version(), None);
        c.set_version(12);
        c.insert("x".into(), json!(1));
        assert_eq!(c.version(), Some(12));
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"$version": 12, "x": 1})
        );
        let c: TwinCollection = serde_json::from_str(r#"{"$version":"7"}"#).unwrap();
        assert_eq!(c.version(), None);
        assert_eq!(Twin::new("d").desired_version(), None);
    }

    #[test]
    fn python_patch_bodies_round_trip_with_nulls() {
        // Reference §7.5 update_twin / replace_twin bodies.
        let p: TwinPatch = round_trip(
            r#"{"tags": {"building": "44"}, "properties": {"desired": {"telemetryInterval": 20, "old": null}}}"#,
        );
        assert_eq!(p.desired().unwrap().get("old"), Some(&Value::Null));
        assert_eq!(p.tags.as_ref().unwrap().get("building"), Some(&json!("44")));
        let p: TwinPatch = round_trip(r#"{"properties": {"desired": {"x": 1}}}"#);
        assert!(p.tags.is_none());
        let p: TwinPatch = round_trip(r#"{"tags": {"a": 1}, "properties": {"desired": {"y": 2}}}"#);
        assert!(!p.touches_reported());
    }

    #[test]
    fn patch_keeps_reported_and_extra_for_rejection() {
        let p: TwinPatch = round_trip(
            r#"{"deviceId":"dev1","etag":"*","properties":{"desired":{"a":null},"reported":{"b":1}}}"#,
        );
        assert!(p.touches_reported());
        assert_eq!(p.etag.as_deref(), Some("*"));
        assert_eq!(p.extra.get("deviceId"), Some(&json!("dev1")));
    }

    #[test]
    fn patch_builder() {
        let mut tags = Map::new();
        tags.insert("building".into(), json!("43"));
        let mut desired = Map::new();
        desired.insert("telemetryInterval".into(), json!(60));
        let p = TwinPatch::new()
            .with_etag("*")
            .with_tags(tags)
            .with_desired(desired);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"etag": "*", "tags": {"building": "43"}, "properties": {"desired": {"telemetryInterval": 60}}})
        );
    }

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC*") {
            let _ = serde_json::from_str::<Twin>(&s);
            let _ = serde_json::from_str::<TwinProperties>(&s);
            let _ = serde_json::from_str::<TwinCollection>(&s);
            let _ = serde_json::from_str::<TwinPatch>(&s);
        }

        #[test]
        fn mutated_fixture_never_panics(cut in 0usize..1100, junk in "[{}\\[\\]\":, a-z0-9nul$-]{0,8}") {
            let mut text: String = GET_TWIN.chars().take(cut).collect();
            text.push_str(&junk);
            text.extend(GET_TWIN.chars().skip(cut));
            if let Ok(t) = serde_json::from_str::<Twin>(&text) {
                let _ = t.desired_version();
                let _ = t.desired().map(TwinCollection::last_updated);
            }
        }
    }
}
