//! Direct-method bodies of `POST /twins/{id}/methods` (reference §4.4) and of scheduled method jobs.
//!
//! `payload` keeps absent apart from `null`: Python sends `""`, Node `null`, others nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::device::present;

/// Default `responseTimeoutInSeconds` when the request has none.
pub const DEFAULT_RESPONSE_TIMEOUT_SECS: u64 = 30;
/// Smallest accepted `responseTimeoutInSeconds`.
pub const MIN_RESPONSE_TIMEOUT_SECS: u64 = 5;
/// Largest accepted `responseTimeoutInSeconds`.
pub const MAX_RESPONSE_TIMEOUT_SECS: u64 = 300;
/// Default `connectTimeoutInSeconds`: the device must already be connected.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 0;
/// Largest accepted `connectTimeoutInSeconds`.
pub const MAX_CONNECT_TIMEOUT_SECS: u64 = 300;
/// Largest request or response payload, in bytes of JSON text (128 KB).
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// Request body of a direct method (swagger `CloudToDeviceMethod`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudToDeviceMethod {
    /// `methodName`.
    pub method_name: String,
    /// `payload`: `None` = key absent, `Some(Value::Null)` = `null`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub payload: Option<Value>,
    /// `responseTimeoutInSeconds` (default 30, 5..=300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_timeout_in_seconds: Option<u64>,
    /// `connectTimeoutInSeconds` (default 0, ≤ 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_in_seconds: Option<u64>,
    /// Keys this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CloudToDeviceMethod {
    /// A call of `method_name` with no payload and default timeouts.
    pub fn new(method_name: impl Into<String>) -> Self {
        Self {
            method_name: method_name.into(),
            ..Self::default()
        }
    }

    /// Sets `payload`.
    pub fn with_payload(mut self, payload: Value) -> Self {
        self.payload = Some(payload);
        self
    }

    /// Sets both timeouts, in seconds.
    pub fn with_timeouts(mut self, response_secs: u64, connect_secs: u64) -> Self {
        self.response_timeout_in_seconds = Some(response_secs);
        self.connect_timeout_in_seconds = Some(connect_secs);
        self
    }

    /// `responseTimeoutInSeconds`, or the default 30 when absent.
    pub fn response_timeout_secs(&self) -> u64 {
        self.response_timeout_in_seconds
            .unwrap_or(DEFAULT_RESPONSE_TIMEOUT_SECS)
    }

    /// `connectTimeoutInSeconds`, or the default 0 when absent.
    pub fn connect_timeout_secs(&self) -> u64 {
        self.connect_timeout_in_seconds
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS)
    }

    /// The payload the device should receive: `null` when absent.
    pub fn payload_or_null(&self) -> &Value {
        self.payload.as_ref().unwrap_or(&Value::Null)
    }
}

/// Response body of a direct method (swagger `CloudToDeviceMethodResult`); also
/// `outcome.deviceMethodResponse` of a device job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CloudToDeviceMethodResult {
    /// `status`: the integer the device answered with (`$iothub/methods/res/{status}`).
    pub status: i32,
    /// `payload`: the device's JSON (`null` if it sent none).
    #[serde(default)]
    pub payload: Value,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

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
    fn python_full_request() {
        // Reference §7.5, invoke_device_method with every field.
        let m: CloudToDeviceMethod = round_trip(
            r#"{"methodName": "reboot", "payload": {"delay": 5}, "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 10}"#,
        );
        assert_eq!(m.method_name, "reboot");
        assert_eq!(m.payload, Some(json!({"delay": 5})));
        assert_eq!(m.response_timeout_secs(), 30);
        assert_eq!(m.connect_timeout_secs(), 10);
    }

    #[test]
    fn payload_absent_null_and_empty_string_stay_distinct() {
        // Python with no payload sends "" (§7.5); Node sends null (§7.6).
        let py: CloudToDeviceMethod = round_trip(r#"{"methodName": "ping", "payload": ""}"#);
        assert_eq!(py.payload, Some(json!("")));
        let node: CloudToDeviceMethod = round_trip(
            r#"{"methodName":"ping","payload":null,"responseTimeoutInSeconds":30,"connectTimeoutInSeconds":0}"#,
        );
        assert_eq!(node.payload, Some(Value::Null));
        let bare: CloudToDeviceMethod = round_trip(r#"{"methodName":"ping"}"#);
        assert_eq!(bare.payload, None);
        assert_eq!(bare.payload_or_null(), &Value::Null);
        assert_eq!(bare.response_timeout_secs(), DEFAULT_RESPONSE_TIMEOUT_SECS);
        assert_eq!(bare.connect_timeout_secs(), 0);
    }

    #[test]
    fn builder_serialises_like_python() {
        let m = CloudToDeviceMethod::new("reboot")
            .with_payload(json!({"delay": 5}))
            .with_timeouts(30, 10);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"methodName":"reboot","payload":{"delay":5},"responseTimeoutInSeconds":30,"connectTimeoutInSeconds":10}"#
        );
    }

    #[test]
    fn result_round_trips() {
        let r: CloudToDeviceMethodResult =
            round_trip(r#"{"status": 200, "payload": {"result": "ok", "name": "reboot"}}"#);
        assert_eq!(r.status, 200);
        let r: CloudToDeviceMethodResult = round_trip(r#"{"status": -1, "payload": null}"#);
        assert_eq!(r.payload, Value::Null);
        let r: CloudToDeviceMethodResult = serde_json::from_str(r#"{"status":404}"#).unwrap();
        assert_eq!(r.payload, Value::Null);
        assert!(serde_json::from_str::<CloudToDeviceMethodResult>(r#"{"status":"200"}"#).is_err());
    }

    #[test]
    fn method_name_is_required() {
        assert!(serde_json::from_str::<CloudToDeviceMethod>(r#"{"payload":1}"#).is_err());
    }

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC*") {
            let _ = serde_json::from_str::<CloudToDeviceMethod>(&s);
            let _ = serde_json::from_str::<CloudToDeviceMethodResult>(&s);
        }
    }
}
