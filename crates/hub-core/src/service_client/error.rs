//! What can go wrong talking to the hub's REST API, typed so callers can act on it.
//!
//! A [`HubError`] keeps the hub's own code and message; [`ServiceError`] adds the transport
//! failures (unreachable hub, untrusted certificate, timeout) with a hint saying what to do.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ErrorCode;

/// The class of an error answered by the hub, from its error code (else the HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HubErrorKind {
    /// 404001: the device is not registered.
    DeviceNotFound,
    /// 404103: the device is not connected (or not subscribed to methods).
    DeviceNotOnline,
    /// 504101: the device did not answer the method in time.
    GatewayTimeout,
    /// 412 / 400023: the `If-Match` etag does not match.
    PreconditionFailed,
    /// 429: the hub is throttling this client; see [`HubError::retry_after`].
    Throttled,
    /// 401: bad or expired credentials.
    Unauthorized,
    /// 403: the policy lacks a permission, or a quota is exhausted.
    Forbidden,
    /// 404002: no job with that id.
    JobNotFound,
    /// 409104: a job with that id already exists.
    JobAlreadyExists,
    /// 409001: a device with that id already exists.
    DeviceAlreadyExists,
    /// 400: the request was rejected as invalid (bad query, payload, time...).
    ArgumentInvalid,
    /// 413: a payload is too large.
    MessageTooLarge,
    /// 503: the hub is busy or unavailable.
    ServiceUnavailable,
    /// 500 and other 5xx: the hub failed.
    ServerError,
    /// 404 without a more precise code.
    NotFound,
    /// Anything else.
    Other,
}

impl HubErrorKind {
    /// Classifies by IoT Hub error code name or number, falling back to the HTTP status.
    pub fn classify(status: u16, code_name: Option<&str>, code_number: Option<u32>) -> Self {
        let by_name = match code_name.unwrap_or_default() {
            "DeviceNotFound" => Some(Self::DeviceNotFound),
            "DeviceNotOnline" => Some(Self::DeviceNotOnline),
            "GatewayTimeout" => Some(Self::GatewayTimeout),
            "PreconditionFailed" | "EtagDoesNotMatch" => Some(Self::PreconditionFailed),
            "JobNotFound" => Some(Self::JobNotFound),
            "JobAlreadyExists" => Some(Self::JobAlreadyExists),
            "DeviceAlreadyExists" => Some(Self::DeviceAlreadyExists),
            "ArgumentInvalid"
            | "ArgumentNull"
            | "IotHubFormatError"
            | "DeserializationError"
            | "InvalidProtocolVersion" => Some(Self::ArgumentInvalid),
            "MessageTooLarge" => Some(Self::MessageTooLarge),
            "IotHubUnauthorizedAccess" | "IotHubUnauthorized" => Some(Self::Unauthorized),
            _ => None,
        };
        let by_number = code_number.and_then(|n| match n {
            404001 => Some(Self::DeviceNotFound),
            404103 => Some(Self::DeviceNotOnline),
            504101 => Some(Self::GatewayTimeout),
            412001 | 400023 => Some(Self::PreconditionFailed),
            404002 => Some(Self::JobNotFound),
            409104 => Some(Self::JobAlreadyExists),
            409001 => Some(Self::DeviceAlreadyExists),
            400000..=400999 => Some(Self::ArgumentInvalid),
            413000..=413999 => Some(Self::MessageTooLarge),
            401000..=401999 => Some(Self::Unauthorized),
            429000..=429999 => Some(Self::Throttled),
            _ => None,
        });
        by_name.or(by_number).unwrap_or(match status {
            400 => Self::ArgumentInvalid,
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            409 => Self::Other,
            412 => Self::PreconditionFailed,
            413 => Self::MessageTooLarge,
            429 => Self::Throttled,
            503 => Self::ServiceUnavailable,
            504 => Self::GatewayTimeout,
            500..=599 => Self::ServerError,
            _ => Self::Other,
        })
    }
}

/// An error answered by the hub: HTTP status, IoT Hub code and the hub's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubError {
    /// What the client was doing, e.g. `GET /devices/dev1`.
    pub request: String,
    /// The HTTP status.
    pub status: u16,
    /// The class of the error.
    pub kind: HubErrorKind,
    /// The IoT Hub error code, from the body or `iothub-errorcode`, when this crate knows it.
    pub code: Option<ErrorCode>,
    /// The code exactly as the hub wrote it (name or number), known or not.
    pub raw_code: Option<String>,
    /// The hub's message, verbatim.
    pub message: String,
    /// `Retry-After`, when the hub sent one.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: ", self.request)?;
        if self.message.is_empty() {
            write!(f, "HTTP {}", self.status)?;
        } else {
            write!(f, "{}", self.message)?;
        }
        match (self.code, &self.raw_code) {
            (Some(code), _) => write!(f, " ({code} {}, HTTP {})", code.number(), self.status)?,
            (None, Some(raw)) => write!(f, " ({raw}, HTTP {})", self.status)?,
            (None, None) if !self.message.is_empty() => write!(f, " (HTTP {})", self.status)?,
            (None, None) => {}
        }
        if let Some(after) = self.retry_after {
            write!(f, "; retry after {} s", after.as_secs_f64())?;
        }
        Ok(())
    }
}

impl std::error::Error for HubError {}

/// Why a connection to the hub could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectProblem {
    /// Nothing listens there (or a firewall said no).
    Refused,
    /// The host name does not resolve.
    Dns,
    /// TLS failed, most often an untrusted certificate.
    Tls,
    /// Opening the connection took too long.
    Timeout,
    /// Another transport failure.
    Other,
}

/// Everything [`super::ServiceClient`] can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The CA file could not be read or holds no certificate.
    #[error("cannot use the CA file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The extra CA could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTPS client")]
    Client(#[source] reqwest::Error),
    /// The hub could not be reached.
    #[error("cannot reach the hub at {url}: {detail}{}", hint(*problem, url))]
    Connect {
        /// The hub's base URL.
        url: String,
        /// The class of failure.
        problem: ConnectProblem,
        /// The transport's own words (the innermost cause).
        detail: String,
        /// The transport error (its text is `detail`, so it is not repeated as a source).
        cause: reqwest::Error,
    },
    /// The hub did not answer in time.
    #[error("{request} timed out after {} s without an answer from the hub", timeout.as_secs())]
    Timeout {
        /// The request.
        request: String,
        /// The limit that was reached.
        timeout: Duration,
    },
    /// The connection broke after the request may have been sent.
    #[error("{request}: the connection to the hub broke: {detail}")]
    Transport {
        /// The request.
        request: String,
        /// The transport's own words (the innermost cause).
        detail: String,
        /// The transport error (its text is `detail`, so it is not repeated as a source).
        cause: reqwest::Error,
    },
    /// The hub answered with an error.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The hub answered 2xx with a body this client cannot read.
    #[error("{request}: unexpected answer from the hub: {detail}")]
    Decode {
        /// The request.
        request: String,
        /// What did not parse.
        detail: String,
    },
    /// An argument was rejected before anything was sent.
    #[error("{0}")]
    InvalidArgument(String),
}

fn hint(problem: ConnectProblem, url: &str) -> &'static str {
    let local = ["://localhost", "://127.", "://[::1]"]
        .iter()
        .any(|p| url.contains(p));
    match problem {
        ConnectProblem::Refused | ConnectProblem::Timeout if local => {
            " (is hub-emulator running, and on this port?)"
        }
        ConnectProblem::Refused | ConnectProblem::Timeout => {
            " (check HostName in the connection string and the network)"
        }
        ConnectProblem::Dns => " (check HostName in the connection string)",
        ConnectProblem::Tls if local => {
            " (trust the hub-emulator's CA: its ca.pem, named IOTHUB_CA_FILE in hub.env)"
        }
        ConnectProblem::Tls => " (is the hub's CA trusted? pass its PEM file as the extra CA)",
        ConnectProblem::Other => "",
    }
}

impl ServiceError {
    /// The hub's error, when the hub answered with one.
    pub fn hub(&self) -> Option<&HubError> {
        match self {
            Self::Hub(e) => Some(e),
            _ => None,
        }
    }

    /// The class of the hub's error, when the hub answered with one.
    pub fn hub_kind(&self) -> Option<HubErrorKind> {
        self.hub().map(|e| e.kind)
    }

    /// Whether the hub could not be reached at all (connection or timeout).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Transport { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_prefers_code_then_status() {
        use HubErrorKind as K;
        let cases: &[(u16, Option<&str>, Option<u32>, K)] = &[
            (404, Some("DeviceNotFound"), None, K::DeviceNotFound),
            (404, None, Some(404103), K::DeviceNotOnline),
            (
                404,
                Some("DeviceNotOnline"),
                Some(404103),
                K::DeviceNotOnline,
            ),
            (504, None, Some(504101), K::GatewayTimeout),
            (412, None, None, K::PreconditionFailed),
            (412, Some("PreconditionFailed"), None, K::PreconditionFailed),
            (429, Some("ThrottlingException"), Some(429001), K::Throttled),
            (401, Some("IotHubUnauthorizedAccess"), None, K::Unauthorized),
            (404, Some("JobNotFound"), None, K::JobNotFound),
            (409, Some("JobAlreadyExists"), None, K::JobAlreadyExists),
            (
                400,
                Some("ArgumentInvalid"),
                Some(400004),
                K::ArgumentInvalid,
            ),
            (400, None, None, K::ArgumentInvalid),
            (503, Some("ServerBusy"), Some(503005), K::ServiceUnavailable),
            (500, None, None, K::ServerError),
            (404, None, None, K::NotFound),
            (418, None, None, K::Other),
        ];
        for &(status, name, number, want) in cases {
            assert_eq!(
                HubErrorKind::classify(status, name, number),
                want,
                "{status} {name:?} {number:?}"
            );
        }
    }

    #[test]
    fn display_keeps_the_hub_message_and_code() {
        let e = HubError {
            request: "POST /twins/dev1/methods".into(),
            status: 404,
            kind: HubErrorKind::DeviceNotOnline,
            code: Some(ErrorCode::DeviceNotOnline),
            raw_code: Some("404103".into()),
            message: "Timed out waiting for device to connect.".into(),
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            "POST /twins/dev1/methods failed: Timed out waiting for device to connect. (DeviceNotOnline 404103, HTTP 404)"
        );
    }

    #[test]
    fn local_hub_hint_names_the_emulator() {
        assert!(hint(ConnectProblem::Refused, "https://localhost:8443").contains("hub-emulator"));
        assert!(!hint(ConnectProblem::Refused, "https://h.azure-devices.net").contains("emulator"));
    }
}
