//! The service REST API over HTTPS: registry, twins, direct methods, query and statistics here,
//! Jobs v2 from [`crate::jobs`], MQTT over WebSocket from [`crate::mqtt`]. Every route accepts
//! any `api-version` (or none); every failure is an [`ApiError`] in IoT Hub's error form.
//!
//! Module map: `server` (the HTTPS port's connection handler: HTTP/1.1 with upgrades, graceful
//! shutdown), [`error`] ([`ApiError`]),
//! [`auth`] (SAS checks), `extract` (JSON body / path / `If-Match`), `throttle` (the tier's
//! throttles per request), `registry`, `twins`, `query`, `configurations`, `import_export`, `faults` (the emulator's own
//! fault-injection routes under `/$emulator/faults`), `health` (the emulator's own
//! unauthenticated `GET /health`).

pub mod auth;
mod configurations;
pub mod error;
mod extract;
mod faults;
mod health;
mod import_export;
mod query;
mod registry;
mod server;
mod throttle;
mod twins;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use hub_core::error::ErrorCode;

pub use error::ApiError;
pub use extract::{IdPath, JsonBody, ModulePath};
pub use server::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_PENDING_CONNECTIONS, serve};

use crate::hub::Hub;
use crate::jobs::Jobs;

/// Largest request body any route accepts; bigger bodies get 413 `MessageTooLarge`. Covers a
/// 128 KB method payload plus its envelope; twin and payload limits are checked more precisely
/// by the hub.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// How long an authenticated request's body may take to arrive, from its headers; a body still
/// trickling in after it gets 408 and the connection is closed. IoT Hub documents no figure; 30 s
/// is far beyond what a 256 KB body needs and short enough that trickling clients cannot pile up.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What every request handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Registry, twins, sessions.
    pub hub: Hub,
    /// The jobs engine.
    pub jobs: Jobs,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// Tracks upgraded connections (MQTT over WebSocket).
    pub tracker: TaskTracker,
    /// How long an authenticated request's body may take to arrive ([`BODY_READ_TIMEOUT`]).
    pub body_read_timeout: std::time::Duration,
    /// The tier's throttles (none without `--tier`).
    pub throttles: crate::throttle::Throttles,
    /// The dashboard's secrets (None: `--no-dashboard`, or a router built without one).
    pub dashboard: Option<crate::dashboard::Dashboard>,
    /// Import and export jobs.
    pub import_export: crate::import_export::ImportExportJobs,
}

impl AppState {
    /// Bundles the shared handles.
    pub fn new(hub: Hub, jobs: Jobs, shutdown: CancellationToken, tracker: TaskTracker) -> Self {
        let import_export = crate::import_export::ImportExportJobs::new(
            hub.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        AppState {
            import_export,
            hub,
            jobs,
            shutdown,
            tracker,
            body_read_timeout: BODY_READ_TIMEOUT,
            throttles: crate::throttle::Throttles::unlimited(),
            dashboard: None,
        }
    }
}

/// The REST API's routes, with the MQTT-over-WebSocket and Jobs v2 routes merged in.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/devices",
            get(registry::list_devices).post(registry::bulk_devices),
        )
        // `/devices/query` is a static route and wins over `/devices/{id}`; the extra methods keep
        // a device that is really named `query` reachable.
        .route(
            "/devices/query",
            post(query::query_devices)
                .get(device_named_query)
                .put(device_named_query)
                .delete(device_named_query),
        )
        .route(
            "/devices/{id}",
            get(registry::get_device)
                .put(registry::put_device)
                .delete(registry::delete_device),
        )
        .route("/devices/{id}/modules", get(registry::list_modules))
        .route(
            "/devices/{id}/modules/{mid}",
            get(registry::get_module)
                .put(registry::put_module)
                .delete(registry::delete_module),
        )
        .route(
            "/devices/{id}/applyConfigurationContent",
            post(configurations::apply_on_edge_device),
        )
        .route("/configurations", get(configurations::list))
        // A static route: wins over `/configurations/{id}` (whose ids cannot be `testQueries`,
        // which has capitals).
        .route(
            "/configurations/testQueries",
            post(configurations::test_queries),
        )
        .route(
            "/configurations/{id}",
            get(configurations::get)
                .put(configurations::put)
                .delete(configurations::delete),
        )
        .route(
            "/devices/{id}/commands",
            axum::routing::delete(registry::purge_commands),
        )
        .route("/statistics/devices", get(registry::device_statistics))
        .route("/statistics/service", get(registry::service_statistics))
        .route(
            "/twins/{id}",
            get(twins::get_twin)
                .patch(twins::patch_twin)
                .put(twins::replace_twin),
        )
        .route("/twins/{id}/methods", post(twins::invoke_method))
        .route(
            "/twins/{id}/modules/{mid}",
            get(twins::get_module_twin)
                .patch(twins::patch_module_twin)
                .put(twins::replace_module_twin),
        )
        .route(
            "/twins/{id}/modules/{mid}/methods",
            post(twins::invoke_module_method),
        )
        .merge(crate::jobs::routes())
        .route("/jobs/create", post(import_export::create))
        .route("/jobs", get(import_export::list))
        .route(
            "/jobs/{id}",
            get(import_export::get).delete(import_export::cancel),
        )
        // The emulator's own routes (not IoT Hub's): fault injection for users' tests.
        .route(
            "/$emulator/faults",
            get(faults::list_faults).delete(faults::clear_faults),
        )
        .route(
            "/$emulator/devices/{id}/messages",
            get(twins::device_messages),
        )
        .route(
            "/$emulator/faults/{id}",
            get(faults::get_fault)
                .put(faults::put_fault)
                .delete(faults::delete_fault),
        )
        // Innermost: the tier's throttle, once the body is in (a method's cost is its size).
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            throttle::throttle,
        ))
        // Inner layer: once authenticated, the body is read whole within BODY_READ_TIMEOUT.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            extract::read_body,
        ))
        // Every service route above authenticates before its handler reads the body; the
        // WebSocket route is exempt (its device authenticates in the MQTT CONNECT), and so are
        // the fallbacks (an unknown route or method is 404/405 whoever asks).
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .merge(crate::mqtt::websocket::routes())
        .merge(crate::dashboard::routes(state.clone()))
        // The emulator's own readiness route (IoT Hub has none), added after the layers above
        // so that it is neither authenticated nor throttled.
        .route("/health", get(health::health))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// `GET/PUT/DELETE /devices/query`: the device whose id is `query`.
async fn device_named_query(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    const ID: &str = "query";
    match method {
        Method::GET => registry::get_device_named(&state, &headers, ID),
        Method::DELETE => registry::delete_device_named(&state, &headers, ID)
            .await
            .map(IntoResponse::into_response),
        _ => {
            let body: Value = serde_json::from_slice(&body).map_err(|e| {
                ApiError::argument(format!("the request body is not valid JSON: {e}"))
            })?;
            registry::put_device_named(&state, &headers, ID, &body).await
        }
    }
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::with_status(
        StatusCode::NOT_FOUND,
        ErrorCode::ArgumentInvalid,
        format!(
            "{method} {} is not an IoT Hub service API route",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::with_status(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::ArgumentInvalid,
        format!("{} does not accept {method}", uri.path()),
    )
}

/// One span per request with method, path (no query string, no headers: tokens stay out of
/// logs) and the answer's status.
async fn trace_request(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        status = tracing::field::Empty,
    );
    async move {
        let response = next.run(request).await;
        tracing::Span::current().record("status", response.status().as_u16());
        tracing::debug!("answered");
        response
    }
    .instrument(span)
    .await
}
