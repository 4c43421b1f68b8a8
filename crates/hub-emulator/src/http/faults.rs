//! The fault-injection routes, under `/$emulator/`, a prefix IoT Hub's service API does not use
//! (IoT Hub's own routes are `/devices`, `/twins`, `/jobs`, `/statistics`, `/configurations`,
//! `/digitaltwins` and `/$iothub/websocket`): `PUT`, `GET` and `DELETE /$emulator/faults/{deviceId}`,
//! `GET /$emulator/faults` (every active fault) and `DELETE /$emulator/faults` (clear all).
//! Authorized like the service API (a policy SAS granting `ServiceConnect`, the permission for
//! twins and methods, which these faults change). The fault model is [`crate::faults`]; the
//! page for users is docs/faults.md.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use hub_core::error::ErrorCode;
use hub_core::policy::Permission;

use super::AppState;
use super::auth::require;
use super::error::ApiError;
use super::extract::{IdPath, JsonBody};
use crate::faults::{FaultError, FaultSpec};
use crate::hub::validate_device_id;

/// `PUT /$emulator/faults/{deviceId}`: sets (or replaces) the device's fault; answers with the
/// fault as `GET` lists it. The device need not be registered yet.
pub async fn put_fault(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    validate_device_id(&id)?;
    let spec = FaultSpec::from_json(&body).map_err(|problem| {
        ApiError::argument(format!(
            "{problem} (see docs/faults.md: PUT /$emulator/faults/{{deviceId}} takes e.g. \
             {{\"kind\": \"slow\", \"delay\": \"2s\", \"for\": \"30s\"}})"
        ))
    })?;
    state
        .hub
        .set_fault(&id, spec)
        .map_err(|error| match error {
            FaultError::TooMany { .. } => {
                ApiError::new(ErrorCode::IotHubQuotaExceeded, error.to_string())
            }
        })?;
    // A fault set with `for: 0s` is already over.
    Ok(Json(
        state.hub.faults().describe(&id).unwrap_or(Value::Null),
    ))
}

/// `GET /$emulator/faults/{deviceId}`: the device's active fault, or 404 when it has none.
pub async fn get_fault(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    state
        .hub
        .faults()
        .describe(&id)
        .map(Json)
        .ok_or_else(|| no_fault(&id))
}

/// `GET /$emulator/faults`: every active fault, by device id.
pub async fn list_faults(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    Ok(Json(Value::Array(state.hub.faults().list())))
}

/// `DELETE /$emulator/faults/{deviceId}`: the device behaves normally again (204), or 404 when
/// it had no active fault.
pub async fn delete_fault(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    if !state.hub.faults().clear(&id) {
        return Err(no_fault(&id));
    }
    tracing::info!(device_id = %id, "fault cleared");
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /$emulator/faults`: clears every fault; answers how many were active.
pub async fn clear_faults(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    let cleared = state.hub.faults().clear_all();
    tracing::info!(cleared, "faults cleared");
    Ok(Json(json!({ "cleared": cleared })).into_response())
}

/// 404 for a device without an active fault. Not `DeviceNotFound` (404001): the device may well
/// exist, and faults may name devices that do not; the code is `ArgumentInvalid`, as for a
/// route the hub does not have.
fn no_fault(id: &str) -> ApiError {
    ApiError::with_status(
        StatusCode::NOT_FOUND,
        ErrorCode::ArgumentInvalid,
        format!("device {id} has no active fault (it may have expired)"),
    )
}
