//! Identity registry routes: `PUT/GET/DELETE /devices/{id}`, `GET /devices?top=n`, the bulk
//! registry `POST /devices`, module identities (`PUT/GET/DELETE /devices/{id}/modules/{mid}`,
//! `GET /devices/{id}/modules`) and the statistics. IoT Hub answers 200 (never 201) on create and 204 on delete (reference §4.1).

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use hub_core::bulk::{BulkRegistryOperationResult, ExportImportDevice, MAX_BULK_DEVICES};
use hub_core::device::PurgeMessageQueueResult;
use hub_core::error::ErrorCode;
use hub_core::policy::Permission;

use super::AppState;
use super::auth::{Caller, require};
use super::error::ApiError;
use super::extract::{IdPath, JsonBody, ModulePath, if_match};
use crate::hub::{BulkRequestError, OperationError, check_bulk_request};

/// Most devices `GET /devices` returns (also its default).
pub const MAX_LIST: usize = 1000;

/// A JSON document with its `etag` field also sent as the `ETag` header.
pub(crate) fn with_etag(doc: Value) -> Response {
    let etag = doc
        .get("etag")
        .and_then(Value::as_str)
        .map(|e| format!("\"{e}\""));
    let mut response = Json(doc).into_response();
    if let Some(value) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// A device identity as `caller` may see it: the dashboard never gets keys.
pub(crate) fn for_caller(caller: Caller, mut device: Value) -> Value {
    if caller == Caller::Dashboard {
        crate::dashboard::redact_keys(&mut device);
    }
    device
}

/// `GET /devices/{id}`.
pub async fn get_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    get_device_named(&state, &headers, &id)
}

/// `PUT /devices/{id}`: create without `If-Match`, update with it.
pub async fn put_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    put_device_named(&state, &headers, &id, &body).await
}

/// `DELETE /devices/{id}`.
pub async fn delete_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<StatusCode, ApiError> {
    delete_device_named(&state, &headers, &id).await
}

pub(crate) fn get_device_named(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<Response, ApiError> {
    let caller = require(state, headers, Permission::RegistryRead)?;
    Ok(with_etag(for_caller(caller, state.hub.get_device(id)?)))
}

pub(crate) async fn put_device_named(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    body: &Value,
) -> Result<Response, ApiError> {
    let caller = require(state, headers, Permission::RegistryWrite)?;
    let device = state
        .hub
        .create_or_update_device(id, body, if_match(headers)?)
        .await?;
    tracing::info!(device_id = %id, "device saved");
    Ok(with_etag(for_caller(caller, device)))
}

pub(crate) async fn delete_device_named(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<StatusCode, ApiError> {
    require(state, headers, Permission::RegistryWrite)?;
    state.hub.delete_device(id, if_match(headers)?).await?;
    tracing::info!(device_id = %id, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /devices/{id}/modules/{mid}` (RegistryRead, as a device read).
pub async fn get_module(
    State(state): State<AppState>,
    headers: HeaderMap,
    ModulePath(device_id, module_id): ModulePath,
) -> Result<Response, ApiError> {
    let caller = require(&state, &headers, Permission::RegistryRead)?;
    Ok(with_etag(for_caller(
        caller,
        state.hub.get_module(&device_id, &module_id)?,
    )))
}

/// `PUT /devices/{id}/modules/{mid}`: create without `If-Match`, update with it (REST
/// reference, "Modules - Create Or Update Identity"); 200 either way, as for devices.
pub async fn put_module(
    State(state): State<AppState>,
    headers: HeaderMap,
    ModulePath(device_id, module_id): ModulePath,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let caller = require(&state, &headers, Permission::RegistryWrite)?;
    let module = state
        .hub
        .create_or_update_module(&device_id, &module_id, &body, if_match(&headers)?)
        .await?;
    tracing::info!(%device_id, %module_id, "module saved");
    Ok(with_etag(for_caller(caller, module)))
}

/// `DELETE /devices/{id}/modules/{mid}`: 204, which azure-iot-hub-python's
/// `protocol/operations/modules_operations.py` requires (reference §4.1).
pub async fn delete_module(
    State(state): State<AppState>,
    headers: HeaderMap,
    ModulePath(device_id, module_id): ModulePath,
) -> Result<StatusCode, ApiError> {
    require(&state, &headers, Permission::RegistryWrite)?;
    state
        .hub
        .delete_module(&device_id, &module_id, if_match(&headers)?)
        .await?;
    tracing::info!(%device_id, %module_id, "module deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /devices/{id}/modules`: the device's modules (REST reference, "Modules - Get Modules
/// On Device"); 404 DeviceNotFound for an unknown device.
pub async fn list_modules(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(device_id): IdPath,
) -> Result<Json<Vec<Value>>, ApiError> {
    let caller = require(&state, &headers, Permission::RegistryRead)?;
    let modules = state.hub.list_modules(&device_id)?;
    Ok(Json(
        modules.into_iter().map(|m| for_caller(caller, m)).collect(),
    ))
}

/// `POST /devices`: the bulk registry ("Bulk Registry - Update Registry" in the REST
/// reference). Needs RegistryWrite, as `PUT /devices/{id}` does. Answers IoT Hub's
/// `BulkRegistryOperationResult`: 200 when every device succeeded, 400 with an error per failed
/// device otherwise (the reference lists that body for both statuses, and azure-iot-hub-python
/// `protocol/operations/bulk_registry_operations.py` accepts exactly 200 and 400 and reads it
/// from either). A call that is malformed as a whole (not an array, more than 100 devices, one
/// device twice) is refused with IoT Hub's classic error body before anything changes.
pub async fn bulk_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::RegistryWrite)?;
    let Value::Array(items) = body else {
        return Err(ApiError::argument(format!(
            "the bulk registry body must be a JSON array of devices \
             ([{{\"id\": \"dev1\", \"importMode\": \"create\"}}, ...]), got {}",
            crate::twins::kind(&body)
        )));
    };
    // Counted before each entry is parsed: the body's size is bounded, its entries' work too.
    if items.len() > MAX_BULK_DEVICES {
        return Err(ApiError::argument(
            BulkRequestError::TooMany {
                count: items.len(),
                max: MAX_BULK_DEVICES,
            }
            .to_string(),
        ));
    }
    let devices = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            serde_json::from_value::<ExportImportDevice>(item).map_err(|e| {
                ApiError::argument(format!(
                    "device [{index}] of the bulk registry call is invalid: {e}"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_bulk_request(&devices).map_err(|error| match error {
        BulkRequestError::Duplicate(_) => {
            ApiError::new(ErrorCode::DeviceDefinedMultipleTimes, error.to_string())
        }
        other => ApiError::argument(other.to_string()),
    })?;
    let errors = state.hub.bulk_registry(&devices).await?;
    tracing::info!(
        devices = devices.len(),
        failed = errors.len(),
        "bulk registry call"
    );
    let result = BulkRegistryOperationResult {
        is_successful: errors.is_empty(),
        errors,
        warnings: Vec::new(),
    };
    let status = if result.is_successful {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, Json(result)).into_response())
}

/// `DELETE /devices/{id}/commands`: purges the device's cloud-to-device queue, as the service
/// SDKs' `purge_c2d_message_queue` / `purgeMessageQueue` call it over HTTPS (REST reference,
/// "Purge Cloud To Device Message Queue"; needs ServiceConnect). Sending cloud-to-device
/// messages takes AMQP on IoT Hub, which this hub does not speak, so a queue is always empty
/// here: the answer says 0 messages were purged.
pub async fn purge_commands(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<Json<PurgeMessageQueueResult>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    if !state.hub.device_exists(&id) {
        return Err(OperationError::DeviceNotFound(id).into());
    }
    Ok(Json(PurgeMessageQueueResult {
        total_messages_purged: 0,
        device_id: id,
        module_id: None,
    }))
}

/// `GET /devices?top=n`: the first `n` devices by id (default and maximum 1000).
pub async fn list_devices(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Value>>, ApiError> {
    let caller = require(&state, &headers, Permission::RegistryRead)?;
    let top = top_param(query.as_deref(), MAX_LIST)?;
    let devices = state.hub.list_devices(top);
    Ok(Json(
        devices.into_iter().map(|d| for_caller(caller, d)).collect(),
    ))
}

/// `GET /statistics/devices`.
pub async fn device_statistics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Permission::RegistryRead)?;
    let docs = state.hub.twin_documents_after(None);
    let enabled = docs
        .iter()
        .filter(|d| d.get("status").and_then(Value::as_str) == Some("enabled"))
        .count();
    Ok(Json(json!({
        "totalDeviceCount": docs.len(),
        "enabledDeviceCount": enabled,
        "disabledDeviceCount": docs.len() - enabled,
    })))
}

/// `GET /statistics/service`.
pub async fn service_statistics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    Ok(Json(
        json!({"connectedDeviceCount": state.hub.connected_device_count()}),
    ))
}

/// The `top` parameter of a list route: `max` when absent, clamped to 1..=`max`, 400 when it is
/// not a number.
pub(super) fn top_param(query: Option<&str>, max: usize) -> Result<usize, ApiError> {
    match query_param(query, "top") {
        None => Ok(max),
        Some(text) => text
            .parse::<usize>()
            .map(|top| top.clamp(1, max))
            .map_err(|_| {
                ApiError::argument(format!(
                    "top must be a whole number from 1 to {max}, got `{text}`"
                ))
            }),
    }
}

/// The value of `name` in a raw query string (`top=5&api-version=...`), percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            percent_encoding::percent_decode_str(value)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn finds_query_parameters() {
        assert_eq!(
            query_param(Some("top=5&api-version=2021-04-12"), "top").as_deref(),
            Some("5")
        );
        assert_eq!(
            query_param(Some("api-version=2021-04-12&top=7"), "top").as_deref(),
            Some("7")
        );
        assert_eq!(query_param(Some("api-version=2021-04-12"), "top"), None);
        assert_eq!(query_param(None, "top"), None);
    }
}
