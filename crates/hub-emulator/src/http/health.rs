//! `GET /health`: the emulator's own readiness route for scripts that wait for the hub to come
//! up (CI, docker-compose health checks). IoT Hub has no such route on its service API; this
//! one is the emulator's, like `/$emulator/faults`. It needs no token and passes no throttle, so
//! a waiting script never spends the tier's quota nor needs the hub's keys.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// 200 `{"status":"ready"}` while the hub serves; 503 `{"status":"stopping"}` once its shutdown
/// has begun, so a script polling it stops sending work to a hub on its way out.
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.shutdown.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stopping"})),
        )
    } else {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    }
}
