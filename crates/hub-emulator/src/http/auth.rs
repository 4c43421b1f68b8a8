//! Service-API authorization: the `Authorization` SAS of a shared access policy, checked by
//! [`Hub::authorize_service`](crate::hub::Hub::authorize_service) against the current time.
//! Every refusal is 401 `IotHubUnauthorizedAccess`, as IoT Hub answers; the token is never logged.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use hub_core::policy::Permission;

use super::AppState;
use super::error::ApiError;
use crate::hub::AuthError;

/// Checks that the request carries a valid policy token that grants `needed`.
///
/// Which permission each operation needs (reference §2.3): reading identities `RegistryRead`,
/// creating/updating/deleting them `RegistryWrite`; twins, methods, queries and jobs
/// `ServiceConnect`. Device-key tokens (no `skn`) are refused: they only grant `DeviceConnect`.
pub fn require(state: &AppState, headers: &HeaderMap, needed: Permission) -> Result<(), ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "the Authorization header is missing; send `SharedAccessSignature sr=...&sig=...&se=...&skn=<policy>`",
        ));
    };
    let Ok(value) = value.to_str() else {
        return Err(ApiError::unauthorized(
            "the Authorization header is not a SharedAccessSignature",
        ));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    state
        .hub
        .authorize_service(value, needed, now)
        .map_err(|error| {
            tracing::debug!(reason = %error, "service request refused");
            let message = match error {
                AuthError::MissingPermission(permission) => {
                    format!(
                        "the shared access policy does not grant {}, which this operation needs",
                        permission.as_str()
                    )
                }
                other => format!("the SharedAccessSignature was refused: {other}"),
            };
            ApiError::unauthorized(message)
        })
}
