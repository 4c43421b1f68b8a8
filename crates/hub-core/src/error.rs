//! IoT Hub's REST error body (reference §4.1) in both forms, the numeric [`ErrorCode`] table, and
//! a parser that never panics on whatever body a server sends.
//!
//! Classic: `{"Message":"ErrorCode:<Name>;<text>","ExceptionMessage":"Tracking ID:..-TimeStamp:.."}`.
//! JSON-in-Message (direct methods): `{"Message":"{\"errorCode\":404103,...}","ExceptionMessage":""}`.
//! Constructors are pure: the caller passes the tracking id and timestamp.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::device::UnknownValueError;

/// Response header that names the error code (`iothub-errorcode: DeviceNotFound`).
pub const HEADER_ERROR_CODE: &str = "iothub-errorcode";

/// Prefix of the code part of a classic `Message`.
const CLASSIC_PREFIX: &str = "ErrorCode:";

macro_rules! error_codes {
    ( $( $(#[$vmeta:meta])* $name:ident = $number:literal ),+ $(,)? ) => {
        /// An IoT Hub error code: a name and a six-digit number whose first three digits are
        /// the HTTP status. `Display` prints the name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum ErrorCode {
            $( $(#[$vmeta])* $name = $number ),+
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [Self] = &[$(Self::$name),+];

            /// The name, e.g. `DeviceNotFound`.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Self::$name => stringify!($name) ),+
                }
            }
        }
    };
}

error_codes! {
    /// 400004: a request argument is invalid.
    ArgumentInvalid = 400004,
    /// 400006: malformed request (bad JSON shape, bad method payload).
    IotHubFormatError = 400006,
    /// 400011: a bulk registry call names one device twice (Microsoft Learn, "Understand and
    /// resolve Azure IoT Hub errors": DeviceDefinedMultipleTimes).
    DeviceDefinedMultipleTimes = 400011,
    /// 400012: the body could not be deserialized.
    DeserializationError = 400012,
    /// 400023: the etag in the body does not match.
    EtagDoesNotMatch = 400023,
    /// 400401: a configuration's target condition is not a valid condition (Microsoft Learn, "Troubleshoot Azure IoT Hub error codes").
    InvalidConfigurationTargetCondition = 400401,
    /// 400402: a configuration's content is not valid (Microsoft Learn, "Troubleshoot Azure IoT Hub error codes").
    InvalidConfigurationContent = 400402,
    /// 400403: an update tried to change a configuration's content, which is immutable (Microsoft Learn, "Troubleshoot Azure IoT Hub error codes").
    CannotModifyImmutableConfigurationContent = 400403,
    /// 400404: a configuration's custom metric query is not valid (Microsoft Learn, "Troubleshoot Azure IoT Hub error codes").
    InvalidConfigurationCustomMetricsQuery = 400404,
    /// 401002: credentials rejected.
    IotHubUnauthorizedAccess = 401002,
    /// 401003: not authorized.
    IotHubUnauthorized = 401003,
    /// 403002: daily message quota exceeded.
    IotHubQuotaExceeded = 403002,
    /// 403003: too many jobs.
    JobQuotaExceeded = 403003,
    /// 403004: device queue full.
    DeviceMaximumQueueDepthExceeded = 403004,
    /// 403010: "This operation is not valid for the current IoT Hub tier" (Microsoft Learn, "IoT
    /// Hub API common error codes"): twins, direct methods and jobs on a basic tier. The number
    /// and text are Microsoft's; the name is not published (clients key on the number), so this
    /// one is ours, made from that text.
    OperationNotValidForTier = 403010,
    /// 403012: the device is disabled.
    DeviceDisabled = 403012,
    /// 404001: the device is not registered.
    DeviceNotFound = 404001,
    /// 404002: no such job.
    JobNotFound = 404002,
    /// 404010: no such module.
    ModuleNotFound = 404010,
    /// 404301: no such configuration (Microsoft Learn, "Troubleshoot Azure IoT Hub error codes").
    ConfigurationNotFound = 404301,
    /// 404103: the device did not connect within the connect timeout.
    DeviceNotOnline = 404103,
    /// 404104: the device closed its connection.
    DeviceConnectionClosedRemotely = 404104,
    /// 409001: the device already exists.
    DeviceAlreadyExists = 409001,
    /// 409104: a job with that id already exists.
    JobAlreadyExists = 409104,
    /// 409301: a module with that id already exists on the device (azure-iot-sdk-csharp
    /// `iothub/service/src/Exceptions/IotHubServiceErrorCode.cs`: returned by module creates).
    ModuleAlreadyExistsOnDevice = 409301,
    /// 409401: a configuration with this id exists (Microsoft Learn, "Troubleshoot Azure IoT Hub error codes").
    ConfigurationAlreadyExists = 409401,
    /// 412001: `If-Match` etag does not match.
    PreconditionFailed = 412001,
    /// 413001: message or payload too large.
    MessageTooLarge = 413001,
    /// 413003: too many modules on one device (Microsoft Learn, "Understand and resolve Azure
    /// IoT Hub errors"; azure-iot-sdk-csharp `RegistryManager` maps a module create's 413 to
    /// `TooManyModulesOnDeviceException`).
    TooManyModulesOnDevice = 413003,
    /// 413101: the hub holds as many configurations as its tier allows (Microsoft Learn, "Troubleshoot Azure IoT Hub error codes").
    ConfigurationCountLimitExceeded = 413101,
    /// 429000: too many requests.
    GenericTooManyRequests = 429000,
    /// 429001: throttled.
    ThrottlingException = 429001,
    /// 429002: throttle backlog limit exceeded.
    ThrottleBacklogLimitExceeded = 429002,
    /// 429003: throttle backlog timed out.
    ThrottlingBacklogTimeout = 429003,
    /// 429004: too many active jobs.
    ThrottlingMaxActiveJobCountExceeded = 429004,
    /// 429005: per-device throttle.
    DeviceThrottlingLimitExceeded = 429005,
    /// 500001: internal error.
    ServerError = 500001,
    /// 503001: service unavailable.
    ServiceUnavailable = 503001,
    /// 503005: server busy.
    ServerBusy = 503005,
    /// 504101: the device did not answer a direct method in time.
    GatewayTimeout = 504101,
}

impl ErrorCode {
    /// The six-digit number, e.g. 404001.
    pub const fn number(self) -> u32 {
        self as u32
    }

    /// The HTTP status that carries this code: the number's first three digits.
    pub const fn http_status(self) -> u16 {
        // Every number is six digits, so the quotient is 400..=504 and fits in u16.
        (self.number() / 1000) as u16
    }

    /// The code with this number.
    pub fn from_number(number: u64) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| u64::from(c.number()) == number)
    }

    /// The code with this name (ASCII case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.name().eq_ignore_ascii_case(name))
    }

    /// The code for a name or a decimal number, as either error form writes it.
    pub fn from_text(text: &str) -> Option<Self> {
        let text = text.trim();
        match text.parse::<u64>() {
            Ok(n) => Self::from_number(n),
            Err(_) => Self::from_name(text),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = UnknownValueError;

    /// Accepts a name (any ASCII case) or a number.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_text(s).ok_or_else(|| UnknownValueError::new("ErrorCode", s))
    }
}

/// The error body as sent: `{"Message": .., "ExceptionMessage": ..}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `Message`: `ErrorCode:<Name>;<text>`, or a JSON object serialised into a string.
    #[serde(rename = "Message")]
    pub message: String,
    /// `ExceptionMessage`: tracking id and timestamp (classic) or `""` (JSON form); Node-style
    /// bodies omit it.
    #[serde(
        rename = "ExceptionMessage",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exception_message: Option<String>,
}

impl ErrorBody {
    /// The classic form: `Message` = `ErrorCode:<Name>;<text>`, `ExceptionMessage` =
    /// `Tracking ID:<tracking_id>-TimeStamp:<timestamp>` (timestamp text as given, e.g.
    /// `01/18/2017 08:11:45`). Send with header `iothub-errorcode: <Name>`.
    pub fn classic(code: ErrorCode, text: &str, tracking_id: &str, timestamp: &str) -> Self {
        Self {
            message: format!("{CLASSIC_PREFIX}{};{text}", code.name()),
            exception_message: Some(format!("Tracking ID:{tracking_id}-TimeStamp:{timestamp}")),
        }
    }

    /// The JSON-in-Message form the live service uses for direct methods: `Message` holds
    /// `{"errorCode":<number>,"trackingId":..,"message":..,"info":{..},"timestampUtc":..}` as a
    /// string, `ExceptionMessage` is `""`.
    pub fn json_in_message(
        code: ErrorCode,
        text: &str,
        tracking_id: &str,
        info: Map<String, Value>,
        timestamp_utc: &str,
    ) -> Self {
        let inner = JsonErrorMessage {
            error_code: u64::from(code.number()),
            tracking_id: tracking_id.to_owned(),
            message: text.to_owned(),
            info,
            timestamp_utc: timestamp_utc.to_owned(),
        };
        Self {
            message: inner.to_json_string(),
            exception_message: Some(String::new()),
        }
    }

    /// Code and text of this body, as [`parse_error_body`] would find them.
    pub fn parse(&self) -> ParsedError {
        parse_message_text(&self.message, self.exception_message.as_deref())
    }
}

/// The object inside `Message` of the JSON-in-Message form.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JsonErrorMessage {
    /// `errorCode`: the six-digit number.
    pub error_code: u64,
    /// `trackingId`.
    #[serde(default)]
    pub tracking_id: String,
    /// `message`.
    #[serde(default)]
    pub message: String,
    /// `info`, e.g. `{"timeout":"00:00:10"}` for 404103, `{}` otherwise.
    #[serde(default)]
    pub info: Map<String, Value>,
    /// `timestampUtc`, verbatim.
    #[serde(default)]
    pub timestamp_utc: String,
}

impl JsonErrorMessage {
    /// Compact JSON text with the service's key order.
    pub fn to_json_string(&self) -> String {
        // Built through `Value` because its `Display` cannot fail (unlike `to_string`).
        let mut map = Map::new();
        map.insert("errorCode".into(), Value::from(self.error_code));
        map.insert("trackingId".into(), Value::from(self.tracking_id.as_str()));
        map.insert("message".into(), Value::from(self.message.as_str()));
        map.insert("info".into(), Value::Object(self.info.clone()));
        map.insert(
            "timestampUtc".into(),
            Value::from(self.timestamp_utc.as_str()),
        );
        Value::Object(map).to_string()
    }
}

/// What an error body says, in whichever form it came.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedError {
    /// The code, if the body named one this crate knows.
    pub code: Option<ErrorCode>,
    /// The code exactly as the body wrote it (name or number), known or not.
    pub raw_code: Option<String>,
    /// The human-readable text (for garbage bodies: the trimmed body itself).
    pub message: String,
}

impl ParsedError {
    /// Fills `code` from an `iothub-errorcode` header value when the body named none.
    pub fn or_header_code(mut self, header: Option<&str>) -> Self {
        let header = header.map(str::trim).filter(|h| !h.is_empty());
        match header {
            Some(h) if self.code.is_none() => {
                self.code = ErrorCode::from_text(h);
                self.raw_code.get_or_insert_with(|| h.to_owned());
            }
            _ => {}
        }
        self
    }
}

/// Turns any error response body into code and message; never fails, never panics.
///
/// Understands the classic and JSON-in-Message forms, Node-style bodies without
/// `ExceptionMessage`, a bare `{"errorCode":..,"message":..}` object, a lower-case `message`
/// key, and plain `ErrorCode:<Name>;<text>` text. Anything else becomes the message as is.
pub fn parse_error_body(body: &str) -> ParsedError {
    let trimmed = body.trim();
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(map)) => parse_object(&map).unwrap_or_else(|| ParsedError {
            message: trimmed.to_owned(),
            ..ParsedError::default()
        }),
        Ok(Value::String(text)) => parse_message_text(&text, None),
        _ => parse_message_text(trimmed, None),
    }
}

/// A top-level object: a `Message` wrapper or a bare JSON error. `None` if neither.
fn parse_object(map: &Map<String, Value>) -> Option<ParsedError> {
    if map.contains_key("errorCode") {
        return Some(parse_json_error(map));
    }
    let exception = lookup(map, "ExceptionMessage").and_then(Value::as_str);
    match lookup(map, "Message")? {
        Value::String(text) => Some(parse_message_text(text, exception)),
        Value::Object(inner) if inner.contains_key("errorCode") => Some(parse_json_error(inner)),
        other => Some(ParsedError {
            message: other.to_string(),
            ..ParsedError::default()
        }),
    }
}

/// `key` exactly, else the first key equal to it ignoring ASCII case.
fn lookup<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// The text of a `Message` (either form), with `ExceptionMessage` as the fallback text.
fn parse_message_text(text: &str, exception_message: Option<&str>) -> ParsedError {
    let trimmed = text.trim();
    let inner = trimmed
        .starts_with('{')
        .then(|| serde_json::from_str::<Value>(trimmed).ok())
        .flatten();
    match inner {
        Some(Value::Object(inner)) if inner.contains_key("errorCode") => {
            return parse_json_error(&inner);
        }
        _ => {}
    }
    let mut parsed = parse_classic(trimmed);
    // Only a body with neither code nor text falls back to ExceptionMessage.
    let fallback = exception_message.map(str::trim).filter(|e| !e.is_empty());
    match fallback {
        Some(e) if parsed.message.is_empty() && parsed.raw_code.is_none() => {
            parsed.message = e.to_owned();
        }
        _ => {}
    }
    parsed
}

/// `ErrorCode:<Name>;<text>` (the code part may sit anywhere among the `;` parts, as C# allows);
/// text without a code part is all message.
fn parse_classic(text: &str) -> ParsedError {
    let mut raw_code = None;
    let mut rest = Vec::new();
    for part in text.split(';') {
        let head = part.trim_start();
        let is_code = raw_code.is_none()
            && head
                .get(..CLASSIC_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(CLASSIC_PREFIX));
        match head.get(CLASSIC_PREFIX.len()..) {
            Some(name) if is_code => raw_code = Some(name.trim().to_owned()),
            _ => rest.push(part),
        }
    }
    let Some(raw) = raw_code else {
        return ParsedError {
            message: text.to_owned(),
            ..ParsedError::default()
        };
    };
    ParsedError {
        code: ErrorCode::from_text(&raw),
        raw_code: Some(raw).filter(|r| !r.is_empty()),
        message: rest.join(";").trim().to_owned(),
    }
}

/// The JSON-in-Message object: numeric (or textual) `errorCode` plus `message`.
fn parse_json_error(map: &Map<String, Value>) -> ParsedError {
    let raw_code = match map.get("errorCode") {
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(s)) => Some(s.trim().to_owned()),
        _ => None,
    };
    let message = match lookup(map, "message") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    ParsedError {
        code: raw_code.as_deref().and_then(ErrorCode::from_text),
        raw_code,
        message,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Reference §4.1, classic form (issue cs#37).
    const CLASSIC: &str = r#"{"Message":"ErrorCode:DeviceNotOnline;Timed out waiting for device to connect.","ExceptionMessage":"Tracking ID:...-G:5-TimeStamp:01/18/2017 08:11:45"}"#;

    /// Reference §4.1, JSON-in-Message form (issue iotedge#98).
    const JSON_IN_MESSAGE: &str = r#"{"Message":"{\"errorCode\":404103,\"trackingId\":\"...\",\"message\":\"Timed out waiting for device to connect.\",\"info\":{\"timeout\":\"00:00:10\"},\"timestampUtc\":\"2018-11-12T19:35:33.5194825Z\"}","ExceptionMessage":""}"#;

    /// Reference §7.6, Node-style body without ExceptionMessage.
    const NODE_STYLE: &str =
        r#"{"Message":"ErrorCode:DeviceNotFound;Device missing not registered"}"#;

    #[test]
    fn table_matches_reference() {
        let expected = [
            ("ArgumentInvalid", 400004),
            ("IotHubFormatError", 400006),
            ("DeviceDefinedMultipleTimes", 400011),
            ("DeserializationError", 400012),
            ("EtagDoesNotMatch", 400023),
            ("InvalidConfigurationTargetCondition", 400401),
            ("InvalidConfigurationContent", 400402),
            ("CannotModifyImmutableConfigurationContent", 400403),
            ("InvalidConfigurationCustomMetricsQuery", 400404),
            ("IotHubUnauthorizedAccess", 401002),
            ("IotHubUnauthorized", 401003),
            ("IotHubQuotaExceeded", 403002),
            ("JobQuotaExceeded", 403003),
            ("DeviceMaximumQueueDepthExceeded", 403004),
            ("OperationNotValidForTier", 403010),
            ("DeviceDisabled", 403012),
            ("DeviceNotFound", 404001),
            ("JobNotFound", 404002),
            ("ModuleNotFound", 404010),
            ("ConfigurationNotFound", 404301),
            ("DeviceNotOnline", 404103),
            ("DeviceConnectionClosedRemotely", 404104),
            ("DeviceAlreadyExists", 409001),
            ("JobAlreadyExists", 409104),
            ("ModuleAlreadyExistsOnDevice", 409301),
            ("ConfigurationAlreadyExists", 409401),
            ("PreconditionFailed", 412001),
            ("MessageTooLarge", 413001),
            ("TooManyModulesOnDevice", 413003),
            ("ConfigurationCountLimitExceeded", 413101),
            ("GenericTooManyRequests", 429000),
            ("ThrottlingException", 429001),
            ("ThrottleBacklogLimitExceeded", 429002),
            ("ThrottlingBacklogTimeout", 429003),
            ("ThrottlingMaxActiveJobCountExceeded", 429004),
            ("DeviceThrottlingLimitExceeded", 429005),
            ("ServerError", 500001),
            ("ServiceUnavailable", 503001),
            ("ServerBusy", 503005),
            ("GatewayTimeout", 504101),
        ];
        assert_eq!(ErrorCode::ALL.len(), expected.len());
        for (code, (name, number)) in ErrorCode::ALL.iter().zip(expected) {
            assert_eq!(code.name(), name);
            assert_eq!(code.to_string(), name);
            assert_eq!(code.number(), number);
            assert_eq!(u32::from(code.http_status()), number / 1000);
            assert_eq!(ErrorCode::from_number(u64::from(number)), Some(*code));
            assert_eq!(ErrorCode::from_name(name), Some(*code));
            assert_eq!(name.parse::<ErrorCode>().unwrap(), *code);
            assert_eq!(number.to_string().parse::<ErrorCode>().unwrap(), *code);
        }
        assert_eq!(ErrorCode::DeviceNotFound.http_status(), 404);
        assert_eq!(ErrorCode::GatewayTimeout.http_status(), 504);
        assert_eq!(
            ErrorCode::from_name("devicenotfound"),
            Some(ErrorCode::DeviceNotFound)
        );
        assert_eq!(ErrorCode::from_number(404999), None);
        assert!("NoSuchCode".parse::<ErrorCode>().is_err());
        assert_eq!(HEADER_ERROR_CODE, "iothub-errorcode");
    }

    #[test]
    fn classic_body_parses_and_round_trips() {
        let p = parse_error_body(CLASSIC);
        assert_eq!(p.code, Some(ErrorCode::DeviceNotOnline));
        assert_eq!(p.raw_code.as_deref(), Some("DeviceNotOnline"));
        assert_eq!(p.message, "Timed out waiting for device to connect.");

        let body: ErrorBody = serde_json::from_str(CLASSIC).unwrap();
        let original: Value = serde_json::from_str(CLASSIC).unwrap();
        assert_eq!(serde_json::to_value(&body).unwrap(), original);
        assert_eq!(body.parse(), p);
    }

    #[test]
    fn json_in_message_body_parses_and_round_trips() {
        let p = parse_error_body(JSON_IN_MESSAGE);
        assert_eq!(p.code, Some(ErrorCode::DeviceNotOnline));
        assert_eq!(p.raw_code.as_deref(), Some("404103"));
        assert_eq!(p.message, "Timed out waiting for device to connect.");

        let body: ErrorBody = serde_json::from_str(JSON_IN_MESSAGE).unwrap();
        let original: Value = serde_json::from_str(JSON_IN_MESSAGE).unwrap();
        assert_eq!(serde_json::to_value(&body).unwrap(), original);
        let inner: JsonErrorMessage = serde_json::from_str(&body.message).unwrap();
        assert_eq!(inner.error_code, 404103);
        assert_eq!(inner.info.get("timeout"), Some(&json!("00:00:10")));
        assert_eq!(inner.timestamp_utc, "2018-11-12T19:35:33.5194825Z");
    }

    #[test]
    fn node_style_body() {
        let p = parse_error_body(NODE_STYLE);
        assert_eq!(p.code, Some(ErrorCode::DeviceNotFound));
        assert_eq!(p.message, "Device missing not registered");
        let body: ErrorBody = serde_json::from_str(NODE_STYLE).unwrap();
        assert_eq!(body.exception_message, None);
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::from_str::<Value>(NODE_STYLE).unwrap()
        );
    }

    #[test]
    fn constructors_produce_the_reference_shapes() {
        let classic = ErrorBody::classic(
            ErrorCode::DeviceNotOnline,
            "Timed out waiting for device to connect.",
            "...-G:5",
            "01/18/2017 08:11:45",
        );
        assert_eq!(
            serde_json::to_value(&classic).unwrap(),
            serde_json::from_str::<Value>(CLASSIC).unwrap()
        );

        let mut info = Map::new();
        info.insert("timeout".into(), json!("00:00:10"));
        let modern = ErrorBody::json_in_message(
            ErrorCode::DeviceNotOnline,
            "Timed out waiting for device to connect.",
            "...",
            info,
            "2018-11-12T19:35:33.5194825Z",
        );
        // Byte-identical, key order included.
        assert_eq!(serde_json::to_string(&modern).unwrap(), JSON_IN_MESSAGE);

        let timeout = ErrorBody::json_in_message(
            ErrorCode::GatewayTimeout,
            "Timed out waiting for the response from device.",
            "t1",
            Map::new(),
            "2024-01-01T00:00:00.000Z",
        );
        let p = timeout.parse();
        assert_eq!(p.code, Some(ErrorCode::GatewayTimeout));
        assert_eq!(p.message, "Timed out waiting for the response from device.");
        assert!(timeout.message.contains(r#""info":{}"#));
    }

    #[test]
    fn odd_and_garbage_bodies() {
        let cases: &[(&str, Option<ErrorCode>, Option<&str>, &str)] = &[
            ("", None, None, ""),
            ("   ", None, None, ""),
            ("not json at all", None, None, "not json at all"),
            (
                "<html>502 Bad Gateway</html>",
                None,
                None,
                "<html>502 Bad Gateway</html>",
            ),
            ("null", None, None, "null"),
            ("[1,2]", None, None, "[1,2]"),
            ("{}", None, None, "{}"),
            (r#"{"Message":null}"#, None, None, "null"),
            (r#"{"Message":""}"#, None, None, ""),
            (
                r#"{"Message":"","ExceptionMessage":"boom"}"#,
                None,
                None,
                "boom",
            ),
            (r#"{"message":"lower case"}"#, None, None, "lower case"),
            (
                r#"{"Message":"ErrorCode:IotHubNotFound;hub gone"}"#,
                None,
                Some("IotHubNotFound"),
                "hub gone",
            ),
            (
                r#"{"Message":"ErrorCode:JobNotFound"}"#,
                Some(ErrorCode::JobNotFound),
                Some("JobNotFound"),
                "",
            ),
            (r#"{"Message":"ErrorCode:;x"}"#, None, None, "x"),
            (
                r#"{"Message":"a;ErrorCode:ArgumentInvalid;b;c"}"#,
                Some(ErrorCode::ArgumentInvalid),
                Some("ArgumentInvalid"),
                "a;b;c",
            ),
            (
                "ErrorCode:ServerBusy;try later",
                Some(ErrorCode::ServerBusy),
                Some("ServerBusy"),
                "try later",
            ),
            (
                r#""ErrorCode:ServerBusy;quoted""#,
                Some(ErrorCode::ServerBusy),
                Some("ServerBusy"),
                "quoted",
            ),
            (
                r#"{"errorCode":409104,"message":"exists"}"#,
                Some(ErrorCode::JobAlreadyExists),
                Some("409104"),
                "exists",
            ),
            (
                r#"{"Message":"{\"errorCode\":\"504101\"}"}"#,
                Some(ErrorCode::GatewayTimeout),
                Some("504101"),
                "",
            ),
            (
                r#"{"Message":"{\"errorCode\":999999,\"message\":\"new\"}"}"#,
                None,
                Some("999999"),
                "new",
            ),
            (r#"{"Message":"{not json"}"#, None, None, "{not json"),
            (
                r#"{"Message":{"errorCode":404001,"message":"nested"}}"#,
                Some(ErrorCode::DeviceNotFound),
                Some("404001"),
                "nested",
            ),
            (
                r#"{"Message":"ErrorCode:DéviceNotFound;ü"}"#,
                None,
                Some("DéviceNotFound"),
                "ü",
            ),
        ];
        for (body, code, raw, message) in cases {
            let p = parse_error_body(body);
            assert_eq!(p.code, *code, "{body}");
            assert_eq!(p.raw_code.as_deref(), *raw, "{body}");
            assert_eq!(p.message, *message, "{body}");
        }
    }

    #[test]
    fn header_fills_missing_code() {
        let p = parse_error_body("{}").or_header_code(Some("DeviceNotFound"));
        assert_eq!(p.code, Some(ErrorCode::DeviceNotFound));
        let p = parse_error_body(NODE_STYLE).or_header_code(Some("ServerBusy"));
        assert_eq!(p.code, Some(ErrorCode::DeviceNotFound));
        let p = parse_error_body("x").or_header_code(Some("  "));
        assert_eq!((p.code, p.raw_code), (None, None));
    }

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC*") {
            let _ = parse_error_body(&s);
            let _ = s.parse::<ErrorCode>();
            let _ = serde_json::from_str::<ErrorBody>(&s);
            let _ = serde_json::from_str::<JsonErrorMessage>(&s);
            let _ = ErrorBody { message: s.clone(), exception_message: Some(s.clone()) }.parse();
        }

        #[test]
        fn json_shaped_text_never_panics(s in "[{}\\[\\]\":;, a-zA-Z0-9\\\\é-]{0,80}") {
            let _ = parse_error_body(&s);
            let wrapped = json!({"Message": s}).to_string();
            let _ = parse_error_body(&wrapped);
            let _ = parse_error_body(&format!("ErrorCode:{s}"));
        }

        #[test]
        fn constructed_bodies_parse_back(idx in 0usize..29, text in "[^;]{0,40}") {
            let code = ErrorCode::ALL[idx % ErrorCode::ALL.len()];
            let classic = serde_json::to_string(&ErrorBody::classic(code, &text, "t", "ts")).unwrap();
            let p = parse_error_body(&classic);
            prop_assert_eq!(p.code, Some(code));
            prop_assert_eq!(p.message, text.trim());
            let modern = serde_json::to_string(
                &ErrorBody::json_in_message(code, &text, "t", Map::new(), "ts"),
            ).unwrap();
            let p = parse_error_body(&modern);
            prop_assert_eq!(p.code, Some(code));
            prop_assert_eq!(p.message, text);
        }
    }
}
