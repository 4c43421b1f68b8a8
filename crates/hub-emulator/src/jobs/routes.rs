//! `/jobs/v2/...` over REST (reference §4.6): create, get, cancel and query jobs, each needing
//! `ServiceConnect`. The job query answers a JSON array with paging in headers, as the live
//! service does (not the swagger's object), and omits `x-ms-continuation` on the last page.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;

use hub_core::error::ErrorCode;
use hub_core::job::{JobResponse, JobStatus, JobType};
use hub_core::policy::Permission;

use super::JobError;
use crate::http::AppState;
use crate::http::auth::require;
use crate::http::error::ApiError;

/// Jobs returned per query page when the client does not say (`x-ms-max-item-count`).
pub const DEFAULT_PAGE: usize = 100;
/// Largest page a client may ask for.
pub const MAX_PAGE: usize = 1000;

/// The `/jobs/v2` routes (merged into the REST router).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs/v2/query", get(query_jobs))
        .route("/jobs/v2/{job_id}", get(get_job).put(create_job))
        .route("/jobs/v2/{job_id}/cancel", post(cancel_job))
}

impl From<JobError> for ApiError {
    fn from(error: JobError) -> Self {
        let message = error.to_string();
        match error {
            JobError::InvalidArgument(_) => ApiError::argument(message),
            JobError::NotFound(_) => ApiError::new(ErrorCode::JobNotFound, message),
            JobError::AlreadyExists(_) => ApiError::new(ErrorCode::JobAlreadyExists, message),
            JobError::TooManyActive { .. } => {
                ApiError::new(ErrorCode::ThrottlingMaxActiveJobCountExceeded, message)
            }
            JobError::Store(e) => ApiError::internal(format!("the jobs store failed: {e}")),
            JobError::Internal(detail) => ApiError::internal(detail),
        }
    }
}

async fn create_job(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<JobResponse>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::argument(format!("the job request is not valid JSON: {e}")))?;
    Ok(axum::Json(state.jobs.create(&job_id, &body).await?))
}

async fn get_job(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<JobResponse>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    Ok(axum::Json(state.jobs.get(&job_id)?))
}

async fn cancel_job(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<JobResponse>, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    Ok(axum::Json(state.jobs.cancel(&job_id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobQuery {
    job_type: Option<String>,
    job_status: Option<String>,
    /// Legacy paging parameters the docs still mention.
    page_size: Option<String>,
    continuation_token: Option<String>,
}

fn parse_filter<T>(
    name: &str,
    value: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
    allowed: &str,
) -> Result<Option<T>, ApiError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse(v)
            .map(Some)
            .ok_or_else(|| ApiError::argument(format!("{name} `{v}` is not one of {allowed}"))),
    }
}

fn job_type_named(name: &str) -> Option<JobType> {
    [JobType::ScheduleDeviceMethod, JobType::ScheduleUpdateTwin]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(name))
}

fn job_status_named(name: &str) -> Option<JobStatus> {
    if name.eq_ignore_ascii_case("canceled") {
        return Some(JobStatus::Cancelled);
    }
    [
        JobStatus::Scheduled,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ]
    .into_iter()
    .find(|s| s.as_str().eq_ignore_ascii_case(name))
}

async fn query_jobs(
    State(state): State<AppState>,
    Query(params): Query<JobQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require(&state, &headers, Permission::ServiceConnect)?;
    let job_type = parse_filter(
        "jobType",
        params.job_type.as_deref(),
        job_type_named,
        "scheduleDeviceMethod, scheduleUpdateTwin",
    )?;
    let job_status = parse_filter(
        "jobStatus",
        params.job_status.as_deref(),
        job_status_named,
        "scheduled, queued, running, completed, failed, cancelled",
    )?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let limit = match header("x-ms-max-item-count").or(params.page_size) {
        None => DEFAULT_PAGE,
        Some(text) => match text.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n.min(MAX_PAGE),
            _ => {
                return Err(ApiError::argument(format!(
                    "x-ms-max-item-count `{text}` is not a positive number"
                )));
            }
        },
    };
    let after = match header("x-ms-continuation")
        .or(params.continuation_token)
        .filter(|t| !t.is_empty())
    {
        None => None,
        Some(token) => Some(
            URL_SAFE_NO_PAD
                .decode(token.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    ApiError::argument("x-ms-continuation is not a token this hub issued")
                })?,
        ),
    };
    let (page, more) = state
        .jobs
        .query(job_type, job_status, after.as_deref(), limit);
    let next = more
        .then(|| page.last().map(|j| URL_SAFE_NO_PAD.encode(&j.job_id)))
        .flatten();
    let mut response = axum::Json(page).into_response();
    let out = response.headers_mut();
    out.insert("x-ms-item-type", HeaderValue::from_static("JobResponse"));
    if let Some(next) = next
        && let Ok(value) = HeaderValue::from_str(&next)
    {
        out.insert("x-ms-continuation", value);
    }
    Ok(response)
}
