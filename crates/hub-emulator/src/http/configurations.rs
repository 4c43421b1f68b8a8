//! Automatic device and module configuration routes ([`crate::hub`]'s configurations):
//! `GET /configurations[?top=n]`, `PUT/GET/DELETE /configurations/{id}`,
//! `POST /configurations/testQueries`, and `POST /devices/{id}/applyConfigurationContent`, which
//! is IoT Edge's and refused here. Reading needs `RegistryRead`, writing `RegistryWrite`
//! (Microsoft Learn, "Automatic IoT device and module management": "the policy needs Registry
//! Write permission"). A create or update answers 200 with the saved document and its `ETag`,
//! a delete 204: azure-iot-hub-python 2.7.0 `protocol/operations/configuration_operations.py`
//! accepts 200/201 and 204, azure-iothub's `Registry` any 2xx.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use hub_core::configuration::{
    Configuration, ConfigurationQueriesTestInput, ConfigurationQueriesTestResponse,
};
use hub_core::error::ErrorCode;
use hub_core::policy::Permission;

use super::AppState;
use super::auth::require;
use super::error::ApiError;
use super::extract::{IdPath, JsonBody, if_match};
use super::registry::{top_param, with_etag};

/// How many configurations this hub may hold: its tier's figure under `--tier`, else the
/// standard tiers' 100.
pub(super) fn max_count(state: &AppState) -> usize {
    crate::hub::max_configurations_on(state.throttles.quotas().map(|q| q.tier))
}

/// `GET /configurations?top=n`: the hub's configurations in id order. IoT Hub does not page
/// this list; a `top` beyond the hub's maximum count is lowered to it (REST reference,
/// "Configuration - Get Configurations": "Value will be overridden if greater than the maximum
/// deployment count for the IoT hub").
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Configuration>>, ApiError> {
    require(&state, &headers, Permission::RegistryRead)?;
    // At least 1: `top_param` clamps to 1..=max (a basic tier's 0 is refused before this).
    let max = max_count(&state).max(1);
    let top = top_param(query.as_deref(), max)?;
    Ok(Json(state.hub.list_configurations(top)))
}

/// `GET /configurations/{id}`, with its metrics counted now.
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::RegistryRead)?;
    let configuration = state.hub.get_configuration(&id)?;
    Ok(with_etag(to_value(configuration)?))
}

/// `PUT /configurations/{id}`: creates it without `If-Match`, updates it with one.
pub async fn put(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Configuration>,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::RegistryWrite)?;
    let max = max_count(&state);
    let saved = state
        .hub
        .put_configuration(&id, body, if_match(&headers)?, max)
        .await?;
    Ok(with_etag(to_value(saved)?))
}

/// `DELETE /configurations/{id}`: 204.
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    require(&state, &headers, Permission::RegistryWrite)?;
    state
        .hub
        .delete_configuration(&id, if_match(&headers)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /configurations/testQueries`: what is wrong with a target condition and custom metric
/// queries; 200 with empty errors when nothing is.
pub async fn test_queries(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<ConfigurationQueriesTestInput>,
) -> Result<Json<ConfigurationQueriesTestResponse>, ApiError> {
    require(&state, &headers, Permission::RegistryRead)?;
    Ok(Json(state.hub.test_configuration_queries(&input)))
}

/// `POST /devices/{id}/applyConfigurationContent`: IoT Hub applies an IoT Edge deployment's
/// `modulesContent` to one Edge device. The emulator runs no IoT Edge runtime, so it refuses
/// the call the way it refuses `modulesContent` in a configuration, rather than pretending.
pub async fn apply_on_edge_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(device_id): IdPath,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::RegistryWrite)?;
    Err(ApiError::new(
        ErrorCode::InvalidConfigurationContent,
        format!(
            "applyConfigurationContent on device {device_id} deploys IoT Edge modulesContent, \
             and this emulator runs no IoT Edge runtime; target the device with a configuration \
             whose content is deviceContent or moduleContent instead"
        ),
    ))
}

fn to_value(configuration: Configuration) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(configuration).map_err(|e| {
        ApiError::new(
            ErrorCode::ServerError,
            format!("cannot encode the configuration: {e}"),
        )
    })
}
