//! The REST API's side of the tier's throttles ([`crate::throttle`]): which operation class a
//! request belongs to, and the middleware that passes it through that class's shaper (after
//! authentication, so a refused caller spends nothing of the hub's quota). A refusal is 429
//! `ThrottlingException` (429001) in IoT Hub's error body, with its `iothub-errorcode` header and
//! no `Retry-After` (IoT Hub sends none). On a basic tier, what the tier lacks (twins, direct
//! methods, Jobs v2, queries over twins, configurations) is refused here with 403010, as IoT Hub refuses it.

use axum::body::HttpBody as _;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use hub_core::error::ErrorCode;
use hub_core::tier::{Operation, Tier, method_meter_steps};

use super::AppState;
use super::error::ApiError;

/// The throttled operation a request is, and what it costs (meter steps for direct methods).
pub fn classify(method: &Method, path: &str, content_length: usize) -> Option<(Operation, u64)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let operation = match (segments.as_slice(), method) {
        (["devices", "query"], &Method::POST) => Operation::Query,
        (["configurations", ..] | ["devices", _, "applyConfigurationContent"], _) => {
            Operation::Configurations
        }
        (["devices", ..] | ["statistics", ..], _) => Operation::Registry,
        // Module twins and module methods share the device ones' throttles ("Twin reads
        // (device and module)", and direct methods by payload whoever answers them).
        (["twins", _, "methods"] | ["twins", _, "modules", _, "methods"], _) => {
            return Some((Operation::DirectMethod, method_meter_steps(content_length)));
        }
        (["twins", _] | ["twins", _, "modules", _], &Method::GET) => Operation::TwinRead,
        (["twins", _] | ["twins", _, "modules", _], _) => Operation::TwinUpdate,
        // Jobs v2, and import/export jobs (IoT Hub's "Jobs operations (create, update, list,
        // delete)" throttle covers both).
        (["jobs", ..], _) => Operation::JobsOperation,
        _ => return None,
    };
    Some((operation, 1))
}

/// Middleware (inside authentication): waits for, or refuses, the request's throttle.
pub async fn throttle(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // The body is already read whole (`read_body` runs first), so its size is exact even for a
    // chunked request without Content-Length.
    let content_length = request
        .body()
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let Some((operation, cost)) = classify(request.method(), request.uri().path(), content_length)
    else {
        return Ok(next.run(request).await);
    };
    if let Some(quotas) = state.throttles.quotas()
        && quotas.rate(operation).is_none()
    {
        // Basic tiers have import/export jobs (Microsoft Learn, "Choose the right IoT Hub tier":
        // identity registry operations, bulk import/export, are in every tier), not Jobs v2.
        if is_import_export(request.uri().path()) {
            return Ok(next.run(request).await);
        }
        return Err(not_in_tier(quotas.tier, operation));
    }
    if let Err(throttled) = state.throttles.pass(operation, cost).await {
        return Err(ApiError::new(
            ErrorCode::ThrottlingException,
            throttled.to_string(),
        ));
    }
    Ok(next.run(request).await)
}

/// Whether `path` is an import/export job route (`/jobs/create`, `/jobs`, `/jobs/{id}`), not
/// Jobs v2's (`/jobs/v2/...`).
fn is_import_export(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(segments.as_slice(), ["jobs"] | ["jobs", _]) && segments.get(1) != Some(&"v2")
}

/// IoT Hub's refusal of a feature the hub's tier lacks: 403 with 403010 ("This operation is not
/// valid for the current IoT Hub tier", Microsoft Learn, "IoT Hub API common error codes").
pub fn not_in_tier(tier: Tier, operation: Operation) -> ApiError {
    ApiError::new(
        ErrorCode::OperationNotValidForTier,
        format!(
            "This operation is not valid for the current IoT Hub tier ({tier}): {} need a \
             standard tier (F1 or S1-S3); this hub-emulator runs with --tier {tier}, so start it \
             with a standard tier or without --tier",
            operation.name()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_export_routes_are_told_from_jobs_v2() {
        for path in ["/jobs/create", "/jobs", "/jobs/abc"] {
            assert!(is_import_export(path), "{path}");
        }
        for path in ["/jobs/v2", "/jobs/v2/job1", "/jobs/v2/query", "/devices"] {
            assert!(!is_import_export(path), "{path}");
        }
    }

    #[test]
    fn requests_map_to_the_throttle_microsoft_lists_them_under() {
        let cases = [
            (Method::GET, "/devices/dev1", Some((Operation::Registry, 1))),
            (Method::GET, "/devices", Some((Operation::Registry, 1))),
            // A bulk call is one registry operation, whatever its device count.
            (Method::POST, "/devices", Some((Operation::Registry, 1))),
            (Method::POST, "/devices/query", Some((Operation::Query, 1))),
            (
                Method::GET,
                "/devices/query",
                Some((Operation::Registry, 1)),
            ),
            (
                Method::GET,
                "/statistics/devices",
                Some((Operation::Registry, 1)),
            ),
            (Method::GET, "/twins/dev1", Some((Operation::TwinRead, 1))),
            (
                Method::PATCH,
                "/twins/dev1",
                Some((Operation::TwinUpdate, 1)),
            ),
            (Method::PUT, "/twins/dev1", Some((Operation::TwinUpdate, 1))),
            (
                Method::PUT,
                "/jobs/v2/job1",
                Some((Operation::JobsOperation, 1)),
            ),
            (
                Method::GET,
                "/jobs/v2/query",
                Some((Operation::JobsOperation, 1)),
            ),
            (
                Method::POST,
                "/jobs/create",
                Some((Operation::JobsOperation, 1)),
            ),
            (
                Method::GET,
                "/twins/dev1/modules/m1",
                Some((Operation::TwinRead, 1)),
            ),
            (
                Method::PATCH,
                "/twins/dev1/modules/m1",
                Some((Operation::TwinUpdate, 1)),
            ),
            (
                Method::PUT,
                "/configurations/c1",
                Some((Operation::Configurations, 1)),
            ),
            (
                Method::GET,
                "/configurations",
                Some((Operation::Configurations, 1)),
            ),
            (
                Method::POST,
                "/configurations/testQueries",
                Some((Operation::Configurations, 1)),
            ),
            (
                Method::POST,
                "/devices/dev1/applyConfigurationContent",
                Some((Operation::Configurations, 1)),
            ),
            (Method::GET, "/$iothub/websocket", None),
        ];
        for (method, path, expected) in cases {
            assert_eq!(classify(&method, path, 10), expected, "{method} {path}");
        }
        assert_eq!(
            classify(&Method::POST, "/twins/dev1/methods", 9000),
            Some((Operation::DirectMethod, 3))
        );
        assert_eq!(
            classify(&Method::POST, "/twins/dev1/modules/m1/methods", 100),
            Some((Operation::DirectMethod, 1))
        );
    }
}
