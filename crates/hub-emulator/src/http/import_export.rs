//! Import/export job routes ([`crate::import_export`]): `POST /jobs/create`, `GET /jobs`,
//! `GET /jobs/{id}`, `DELETE /jobs/{id}`. Each answers 200 with the job document (or a list of
//! them); a cancel answers 204, which the SDKs accept (azure-iot-hub-python 2.7.0
//! `jobs_operations.py` `cancel_import_export_job` takes 200 or 204; Node takes any 2xx).
//! Exporting reads the registry (`RegistryRead`); importing and cancelling write it
//! (`RegistryWrite`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};

use hub_core::error::ErrorCode;
use hub_core::import_export::{ImportExportJob, ImportExportType};
use hub_core::policy::Permission;

use super::AppState;
use super::auth::{Caller, require};
use super::error::ApiError;
use super::extract::JsonBody;
use crate::import_export::ImportExportError;

impl From<ImportExportError> for ApiError {
    fn from(error: ImportExportError) -> Self {
        let message = error.to_string();
        match error {
            ImportExportError::Invalid(_) => ApiError::argument(message),
            ImportExportError::OneAtATime(_) => ApiError::new(ErrorCode::JobQuotaExceeded, message),
            ImportExportError::NotFound(_) => ApiError::new(ErrorCode::JobNotFound, message),
        }
    }
}

/// `POST /jobs/create`.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<ImportExportJob>,
) -> Result<Json<ImportExportJob>, ApiError> {
    let needed = match request.job_type {
        Some(ImportExportType::Export) => Permission::RegistryRead,
        _ => Permission::RegistryWrite,
    };
    let caller = require(&state, &headers, needed)?;
    if caller == Caller::Dashboard {
        // No key leaves through the page, not even by way of a blob it names.
        request.exclude_keys_in_export = Some(true);
    }
    let job = state
        .import_export
        .create(request, super::configurations::max_count(&state))?;
    Ok(Json(for_caller(caller, job)))
}

/// A job as `caller` may see it: container URIs carry storage credentials (SAS), which the
/// dashboard's page does not get.
fn for_caller(caller: Caller, mut job: ImportExportJob) -> ImportExportJob {
    if caller == Caller::Dashboard {
        for uri in [
            &mut job.input_blob_container_uri,
            &mut job.output_blob_container_uri,
        ]
        .into_iter()
        .flatten()
        {
            if let Some((base, _sas)) = uri.split_once('?') {
                *uri = format!("{base}?(SAS hidden)");
            }
        }
    }
    job
}

/// `GET /jobs`: the jobs the hub remembers, oldest first.
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<ImportExportJob>>, ApiError> {
    let caller = require(&state, &headers, Permission::RegistryRead)?;
    let jobs = state.import_export.list();
    Ok(Json(
        jobs.into_iter().map(|j| for_caller(caller, j)).collect(),
    ))
}

/// `GET /jobs/{id}`.
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ImportExportJob>, ApiError> {
    let caller = require(&state, &headers, Permission::RegistryRead)?;
    Ok(Json(for_caller(caller, state.import_export.get(&id)?)))
}

/// `DELETE /jobs/{id}`: cancels the job if it is still active.
pub async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(&state, &headers, Permission::RegistryWrite)?;
    state.import_export.cancel(&id)?;
    Ok(StatusCode::NO_CONTENT)
}
