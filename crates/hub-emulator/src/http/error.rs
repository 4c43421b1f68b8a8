//! [`ApiError`]: every failure of the service REST API, rendered the way IoT Hub renders it:
//! the classic `{"Message":"ErrorCode:<Name>;<text>","ExceptionMessage":"Tracking ID:..."}` body,
//! or (direct-method timeouts) the JSON-in-Message form with a numeric `errorCode`, both with the
//! `iothub-errorcode` header (reference §4.1).
//! Invariant: a 5xx answer is logged once, here, and never carries internal details to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;

use hub_core::error::{ErrorBody, ErrorCode, HEADER_ERROR_CODE};

use crate::hub::OperationError;

/// Which of IoT Hub's two error bodies to send.
#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// `{"Message":"ErrorCode:<Name>;<text>","ExceptionMessage":"Tracking ID:..."}`.
    Classic,
    /// `{"Message":"{\"errorCode\":404103,...,\"info\":{..}}","ExceptionMessage":""}`.
    JsonInMessage { info: Value },
}

/// A failed REST request: an IoT Hub error code, its HTTP status and a message for the caller.
/// Small (the text is boxed) so that `Result<_, ApiError>` stays cheap on the success path.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    detail: Box<Detail>,
}

#[derive(Debug, Clone)]
struct Detail {
    message: String,
    form: Form,
    /// What went wrong inside the hub (5xx only); logged, never sent.
    internal: Option<String>,
}

impl ApiError {
    /// An error with `code`; the HTTP status is the code's first three digits (404001 → 404).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let status = status_of(code);
        ApiError {
            status,
            code,
            detail: Box::new(Detail {
                message: message.into(),
                form: Form::Classic,
                internal: None,
            }),
        }
    }

    /// An error whose HTTP status differs from what its code implies (e.g. 405 for a route).
    pub fn with_status(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: Box::new(Detail {
                message: message.into(),
                form: Form::Classic,
                internal: None,
            }),
        }
    }

    /// 400 `ArgumentInvalid`: a malformed request, naming what is wrong.
    pub fn argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    /// 401 `IotHubUnauthorizedAccess`: missing, invalid or insufficient credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::with_status(
            StatusCode::UNAUTHORIZED,
            ErrorCode::IotHubUnauthorizedAccess,
            message,
        )
    }

    /// 413 `MessageTooLarge`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::MessageTooLarge,
            message,
        )
    }

    /// 500 `ServerError`: `detail` goes to the log only; the caller sees a tracking id.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let mut error = Self::new(
            ErrorCode::ServerError,
            "The hub failed to process the request.",
        );
        error.status = StatusCode::INTERNAL_SERVER_ERROR;
        error.detail.internal = Some(detail.to_string());
        error
    }

    /// The direct-method form: `Message` holds a JSON object with the numeric `errorCode`,
    /// `trackingId`, `message`, `info` and `timestampUtc`, as the live service sends for
    /// 404103 and 504101.
    pub fn method(code: ErrorCode, message: impl Into<String>, info: Value) -> Self {
        let mut error = Self::new(code, message);
        error.detail.form = Form::JsonInMessage { info };
        error
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The IoT Hub error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The caller-facing text (without the `ErrorCode:` prefix).
    pub fn message(&self) -> &str {
        &self.detail.message
    }

    fn body(&self, tracking_id: &str, now: OffsetDateTime) -> ErrorBody {
        match &self.detail.form {
            Form::Classic => {
                let stamp = now
                    .format(format_description!(
                        "[month]/[day]/[year] [hour]:[minute]:[second]"
                    ))
                    .unwrap_or_default();
                ErrorBody::classic(self.code, &self.detail.message, tracking_id, &stamp)
            }
            Form::JsonInMessage { info } => {
                let stamp = now
                    .format(format_description!(
                        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
                    ))
                    .unwrap_or_default();
                let info = info.as_object().cloned().unwrap_or_default();
                ErrorBody::json_in_message(
                    self.code,
                    &self.detail.message,
                    tracking_id,
                    info,
                    &stamp,
                )
            }
        }
    }
}

/// `hh:mm:ss`, as IoT Hub writes `info.timeout` (300 s → `00:05:00`).
pub fn hh_mm_ss(seconds: u64) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        (seconds / 60) % 60,
        seconds % 60
    )
}

fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code.name(),
            self.detail.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<OperationError> for ApiError {
    fn from(error: OperationError) -> Self {
        let code = error.code();
        match error {
            OperationError::DeviceNotOnline { timeout_secs } => ApiError::method(
                code,
                error.to_string(),
                json!({"timeout": hh_mm_ss(timeout_secs)}),
            ),
            OperationError::GatewayTimeout => ApiError::method(code, error.to_string(), json!({})),
            OperationError::MessageTooLarge(message) => ApiError::too_large(message),
            OperationError::Store(source) => {
                ApiError::internal(format!("the hub store failed: {source}"))
            }
            OperationError::NotSaved(message) => {
                ApiError::internal(format!("the hub store failed: {message}"))
            }
            OperationError::Internal(message) | OperationError::Unreadable(message) => {
                ApiError::internal(message)
            }
            other => ApiError::new(code, other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let tracking_id = uuid::Uuid::new_v4().simple().to_string();
        if self.status.is_server_error() {
            match &self.detail.internal {
                Some(detail) => tracing::error!(
                    tracking_id = %tracking_id, code = self.code.name(), error = %detail, "request failed"
                ),
                None => tracing::warn!(
                    tracking_id = %tracking_id, code = self.code.name(), message = %self.detail.message, "request failed"
                ),
            }
        }
        let body = self.body(&tracking_id, OffsetDateTime::now_utc());
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if let Ok(value) = HeaderValue::from_str(self.code.name()) {
            headers.insert(HEADER_ERROR_CODE, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_hh_mm_ss() {
        assert_eq!(hh_mm_ss(0), "00:00:00");
        assert_eq!(hh_mm_ss(10), "00:00:10");
        assert_eq!(hh_mm_ss(300), "00:05:00");
        assert_eq!(hh_mm_ss(3661), "01:01:01");
    }

    #[test]
    fn classic_body_names_the_code() {
        let error = ApiError::new(ErrorCode::DeviceNotFound, "Device dev9 not registered");
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        let body = error.body("abc", OffsetDateTime::UNIX_EPOCH);
        assert_eq!(
            body.message,
            "ErrorCode:DeviceNotFound;Device dev9 not registered"
        );
        assert_eq!(
            body.exception_message.as_deref(),
            Some("Tracking ID:abc-TimeStamp:01/01/1970 00:00:00")
        );
    }

    #[test]
    fn method_timeout_uses_json_in_message() {
        let error = ApiError::from(OperationError::DeviceNotOnline { timeout_secs: 10 });
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        let body = error.body("abc", OffsetDateTime::UNIX_EPOCH);
        let inner: Value = serde_json::from_str(&body.message).unwrap_or_default();
        assert_eq!(inner["errorCode"], 404103);
        assert_eq!(inner["info"]["timeout"], "00:00:10");
        assert_eq!(inner["message"], "Timed out waiting for device to connect.");
        assert_eq!(inner["timestampUtc"], "1970-01-01T00:00:00.0000000Z");
        assert_eq!(body.exception_message.as_deref(), Some(""));
        assert_eq!(body.parse().code, Some(ErrorCode::DeviceNotOnline));
    }

    #[test]
    fn unsaved_changes_are_server_errors() {
        let error = ApiError::from(OperationError::NotSaved("disk I/O error".into()));
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.code(), ErrorCode::ServerError);
        assert!(!error.message().contains("disk"));
    }

    #[test]
    fn internals_are_not_sent() {
        let error = ApiError::internal("disk full at /secret/path");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = error.body("abc", OffsetDateTime::UNIX_EPOCH);
        assert!(!body.message.contains("secret"));
    }
}
