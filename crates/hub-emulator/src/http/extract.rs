//! Request extractors whose rejections are IoT Hub errors instead of axum's plain-text ones:
//! a JSON body ([`JsonBody`]), a path id ([`IdPath`]), a device and module id pair
//! ([`ModulePath`]) and the `If-Match` header; and
//! [`read_body`], the middleware that reads an authenticated request's body under a deadline.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::header::{CONNECTION, IF_MATCH};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use hub_core::error::ErrorCode;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;

/// A JSON request body. Malformed JSON is 400 `ArgumentInvalid` naming the problem (line and
/// column); a body over the route's limit is 413 `MessageTooLarge`. Any content type is accepted,
/// as SDKs differ in the charset they declare.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!(
                    "the request body is larger than the {} bytes this operation accepts",
                    super::MAX_BODY_BYTES
                ))
            } else {
                ApiError::argument(format!(
                    "the request body could not be read: {}",
                    rejection.body_text()
                ))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::argument(
                "the request body is empty; a JSON document is required",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::argument(format!("the request body is not valid JSON: {e}")))
    }
}

/// Middleware (inside authentication): reads the whole body, at most
/// [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES), within [`BODY_READ_TIMEOUT`](super::BODY_READ_TIMEOUT)
/// of the headers, so no handler ever waits on a client that trickles its body (project issue
/// 13). Too large: 413 `MessageTooLarge`; too slow: 408, and the connection closes (its unread
/// rest cannot be skipped).
pub async fn read_body(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    // A declared length over the limit is refused from the headers: waiting for a body that
    // will be refused anyway would let a client hold the request open.
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > super::MAX_BODY_BYTES as u64) {
        let mut response = ApiError::too_large(format!(
            "the request body is larger than the {} bytes this operation accepts",
            super::MAX_BODY_BYTES
        ))
        .into_response();
        // Its unread body cannot be skipped: the connection ends with this answer.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return Ok(response);
    }
    let read = axum::body::to_bytes(body, super::MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(state.body_read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                ApiError::too_large(format!(
                    "the request body is larger than the {} bytes this operation accepts",
                    super::MAX_BODY_BYTES
                ))
            } else {
                ApiError::argument(format!("the request body could not be read: {error}"))
            });
        }
        Err(_) => {
            let mut response = ApiError::with_status(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::ArgumentInvalid,
                format!(
                    "the request body did not arrive within {:?} of its headers",
                    state.body_read_timeout
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return Ok(response);
        }
    };
    Ok(next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await)
}

/// The single `{id}` segment of a route (a device's or a configuration's id), percent-decoded.
#[derive(Debug)]
pub struct IdPath(pub String);

impl<S> FromRequestParts<S> for IdPath
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| IdPath(id))
            .map_err(|rejection| {
                ApiError::argument(format!(
                    "the id in the URL is invalid (percent-encode it as one path segment): {}",
                    rejection.body_text()
                ))
            })
    }
}

/// The `{id}` and `{mid}` segments of a module route, percent-decoded.
#[derive(Debug)]
pub struct ModulePath(pub String, pub String);

impl<S> FromRequestParts<S> for ModulePath
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map(|Path((device, module))| ModulePath(device, module))
            .map_err(|rejection| {
                ApiError::argument(format!(
                    "the device or module id in the URL is invalid: {}",
                    rejection.body_text()
                ))
            })
    }
}

/// The `If-Match` header as sent (`"etag"`, `W/"etag"`, `*`); the hub strips the quoting.
pub fn if_match(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    headers
        .get(IF_MATCH)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::argument("the If-Match header is not an ASCII etag"))
        })
        .transpose()
}
