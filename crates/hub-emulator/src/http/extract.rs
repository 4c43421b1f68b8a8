//! Request extractors whose rejections are IoT Hub errors instead of axum's plain-text ones:
//! a JSON body ([`JsonBody`]), a path id ([`IdPath`]) and the `If-Match` header.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::IF_MATCH;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

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

/// The single `{id}` segment of a route, percent-decoded.
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
                    "the device id in the URL is invalid: {}",
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
