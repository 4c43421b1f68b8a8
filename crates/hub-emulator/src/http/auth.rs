//! Service-API authorization: the `Authorization` SAS of a shared access policy, checked by
//! [`Hub::authorize_service`](crate::hub::Hub::authorize_service) against the current time.
//! Every refusal is 401 `IotHubUnauthorizedAccess`, as IoT Hub answers; the token is never logged.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONNECTION};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use hub_core::policy::Permission;

use super::AppState;
use super::error::ApiError;
use crate::hub::AuthError;
use crate::listener::Admission;

/// Middleware on every service route: refuses a request without a valid policy token with 401
/// before the handler runs, so before any byte of its body is read or parsed (the body
/// extractors run in the handler). Which permission the operation needs is still checked by the
/// handler through [`require`]. The credential is the header alone ("HTTPS implements
/// authentication by including a valid token in the **Authorization** request header",
/// Microsoft Learn, "Control access to IoT Hub with shared access signatures", Protocol
/// specifics), so nothing in the body is needed to refuse a request. Checking it first (project
/// issue 13) means an unauthenticated client gets 401 `IotHubUnauthorizedAccess`, never a 400
/// about its body, and cannot make the hub read and parse up to
/// [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES).
///
/// A request that passes also admits its connection into the port's authenticated budget
/// ([`Admission::admit`]); when that budget is full the request is still answered, with
/// `Connection: close` so the connection does not linger in the evictable pending budget.
pub async fn authenticate(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check(&state, request.headers(), None)?;
    // In-process routers (tests driving the router without a listener) carry no admission.
    let admitted = request
        .extensions()
        .get::<Admission>()
        .is_none_or(|admission| admission.admit().is_ok());
    let mut response = next.run(request).await;
    if !admitted {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// Who made an authorized request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A service client with a shared access policy's SAS token.
    Policy,
    /// The dashboard page, with its cookie (see [`crate::dashboard`]): device keys are blanked
    /// in what it reads.
    Dashboard,
}

/// Checks that the request carries a valid policy token that grants `needed`.
///
/// Which permission each operation needs (reference §2.3): reading identities `RegistryRead`,
/// creating/updating/deleting them `RegistryWrite`; twins, methods, queries and jobs
/// `ServiceConnect`. Device-key tokens (no `skn`) are refused: they only grant `DeviceConnect`.
pub fn require(
    state: &AppState,
    headers: &HeaderMap,
    needed: Permission,
) -> Result<Caller, ApiError> {
    check(state, headers, Some(needed))
}

/// The token check: with `needed`, also that the policy grants it.
fn check(
    state: &AppState,
    headers: &HeaderMap,
    needed: Option<Permission>,
) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        // The dashboard's page holds a cookie instead of a token; the same permission applies.
        if let Some(authorized) = state
            .dashboard
            .as_ref()
            .and_then(|dashboard| dashboard.authorize(headers, needed))
        {
            return authorized.map(|()| Caller::Dashboard);
        }
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
    let checked = match needed {
        Some(needed) => state.hub.authorize_service(value, needed, now),
        None => state.hub.authenticate_service(value, now).map(|_| ()),
    };
    checked.map(|()| Caller::Policy).map_err(|error| {
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
