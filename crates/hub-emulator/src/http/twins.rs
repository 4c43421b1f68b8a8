//! Twin and direct-method routes: `GET/PATCH/PUT /twins/{id}` (tags and desired properties,
//! optimistic concurrency through `If-Match`) and `POST /twins/{id}/methods`, and the same for
//! modules under `/twins/{id}/modules/{mid}`.
//! All need `ServiceConnect` (reference §2.3). Also the emulator's own read of a device's recent
//! telemetry, `GET /$emulator/devices/{id}/messages`.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use hub_core::error::ErrorCode;
use hub_core::policy::Permission;

use super::AppState;
use super::auth::require;
use super::error::ApiError;
use super::extract::{IdPath, JsonBody, ModulePath, if_match};
use super::registry::with_etag;
use crate::hub::MethodCall;

/// `GET /twins/{id}`.
pub async fn get_twin(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    Ok(with_etag(state.hub.read_twin(&id).await?))
}

/// `PATCH /twins/{id}`: merges tags and desired properties (`null` deletes).
pub async fn patch_twin(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    update(&state, &headers, &id, &body, false).await
}

/// `PUT /twins/{id}`: replaces tags and desired properties.
pub async fn replace_twin(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    update(&state, &headers, &id, &body, true).await
}

async fn update(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    body: &Value,
    replace: bool,
) -> Result<Response, ApiError> {
    require(state, headers, Permission::ServiceConnect)?;
    let twin = state
        .hub
        .update_twin(id, body, if_match(headers)?, replace)
        .await?;
    tracing::info!(device_id = %id, replace, "twin updated");
    Ok(with_etag(twin))
}

/// `POST /twins/{id}/methods`: waits for the device's answer (404103 when it does not come
/// online within `connectTimeoutInSeconds`, 504101 when it does not answer in time, 503001 when
/// the hub shuts down meanwhile).
pub async fn invoke_method(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    let call = MethodCall::from_request(&body)?;
    tracing::info!(device_id = %id, method = %call.name, "invoking direct method");
    // A call may wait up to 600 s (connect + response timeouts); at shutdown it ends at once
    // with 503 so the connection can drain instead of being cut at the deadline.
    let outcome = tokio::select! {
        outcome = state.hub.invoke_method(&id, &call) => outcome?,
        _ = state.shutdown.cancelled() => {
            return Err(ApiError::new(ErrorCode::ServiceUnavailable, "The hub is shutting down; retry the call later."));
        }
    };
    Ok(Json(
        json!({"status": outcome.status, "payload": outcome.payload}),
    ))
}

/// `GET /twins/{id}/modules/{mid}` (REST reference, "Modules - Get Twin").
pub async fn get_module_twin(
    State(state): State<AppState>,
    headers: HeaderMap,
    ModulePath(device_id, module_id): ModulePath,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    Ok(with_etag(
        state.hub.get_module_twin(&device_id, &module_id)?,
    ))
}

/// `PATCH /twins/{id}/modules/{mid}`: merges tags and desired properties.
pub async fn patch_module_twin(
    State(state): State<AppState>,
    headers: HeaderMap,
    ModulePath(device_id, module_id): ModulePath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    update_module(&state, &headers, &device_id, &module_id, &body, false).await
}

/// `PUT /twins/{id}/modules/{mid}`: replaces tags and desired properties.
pub async fn replace_module_twin(
    State(state): State<AppState>,
    headers: HeaderMap,
    ModulePath(device_id, module_id): ModulePath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    update_module(&state, &headers, &device_id, &module_id, &body, true).await
}

async fn update_module(
    state: &AppState,
    headers: &HeaderMap,
    device_id: &str,
    module_id: &str,
    body: &Value,
    replace: bool,
) -> Result<Response, ApiError> {
    require(state, headers, Permission::ServiceConnect)?;
    let twin = state
        .hub
        .update_module_twin(device_id, module_id, body, if_match(headers)?, replace)
        .await?;
    tracing::info!(%device_id, %module_id, replace, "module twin updated");
    Ok(with_etag(twin))
}

/// `POST /twins/{id}/modules/{mid}/methods` (REST reference, "Modules - Invoke Method"): as a
/// device's method, delivered to the module's session.
pub async fn invoke_module_method(
    State(state): State<AppState>,
    headers: HeaderMap,
    ModulePath(device_id, module_id): ModulePath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    let call = MethodCall::from_request(&body)?;
    tracing::info!(%device_id, %module_id, method = %call.name, "invoking module direct method");
    let outcome = tokio::select! {
        outcome = state.hub.invoke_module_method(&device_id, &module_id, &call) => outcome?,
        _ = state.shutdown.cancelled() => {
            return Err(ApiError::new(ErrorCode::ServiceUnavailable, "The hub is shutting down; retry the call later."));
        }
    };
    Ok(Json(
        json!({"status": outcome.status, "payload": outcome.payload}),
    ))
}

/// `GET /$emulator/devices/{id}/messages`: the device's recent telemetry (the emulator's own
/// route; see [`crate::telemetry`]). Reading messages is what `ServiceConnect` grants on IoT Hub.
pub async fn device_messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<Json<hub_core::telemetry::DeviceMessages>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    if !state.hub.device_exists(&id) {
        return Err(crate::hub::OperationError::DeviceNotFound(id).into());
    }
    Ok(Json(state.hub.telemetry().read(&id)))
}
