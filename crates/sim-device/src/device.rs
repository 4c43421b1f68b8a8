//! One simulated device: answers `lockDoor` (404 for anything else), applies desired properties
//! and acknowledges them in reported properties. Counts what it did in the shared [`Stats`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hub_core::device_client::{Connected, DesiredPatch, DeviceClient, MethodRequest};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// The methods this device knows.
pub const METHODS: &[&str] = &["lockDoor"];

/// Counters shared by every device of a run.
#[derive(Debug, Default)]
pub struct Stats {
    /// Direct methods answered (any status).
    pub methods_answered: AtomicU64,
    /// Desired-property patches applied (including the one on connect, if any).
    pub patches_applied: AtomicU64,
    /// Reported-property updates that failed.
    pub report_errors: AtomicU64,
}

/// Whether to print a line per event, and with which prefix.
#[derive(Debug, Clone)]
pub struct Voice {
    /// Print events at all.
    pub events: bool,
    /// `[deviceId] ` in fleet mode, empty for one device.
    pub prefix: String,
}

impl Voice {
    fn say(&self, line: impl std::fmt::Display) {
        if self.events {
            println!("{}{line}", self.prefix);
        }
    }
}

fn now() -> String {
    hub_core::timestamp::format_millis(OffsetDateTime::now_utc())
}

/// Serves one connected device until `shutdown`, then disconnects: applies the desired state read
/// on connect (once), answers methods and applies desired patches.
pub async fn serve(
    connected: Connected,
    stats: Arc<Stats>,
    voice: Voice,
    shutdown: CancellationToken,
) {
    let Connected {
        client,
        mut methods,
        mut desired,
        twin,
    } = connected;
    apply_initial(&client, &twin.desired, &twin.reported, &stats, &voice).await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            request = methods.recv() => match request {
                Some(request) => on_method(&client, request, &stats, &voice).await,
                None => break,
            },
            patch = desired.recv() => match patch {
                Some(patch) => on_desired(&client, patch, &stats, &voice).await,
                None => break,
            },
        }
    }
    client.close().await;
}

/// The desired state read on connect is applied once: unless reported already acknowledges it.
async fn apply_initial(
    client: &DeviceClient,
    desired: &Value,
    reported: &Value,
    stats: &Stats,
    voice: &Voice,
) {
    let version = desired.get("$version").and_then(Value::as_u64).unwrap_or(0);
    let settings = settings_of(desired);
    let acked = reported
        .pointer("/desiredAck/version")
        .and_then(Value::as_u64);
    if settings.is_empty() || acked == Some(version) {
        return;
    }
    voice.say(format_args!(
        "Applying the desired properties read on connect ($version {version}):"
    ));
    voice.say(format_args!("payload: {desired}"));
    apply(client, settings, version, stats, voice).await;
}

async fn on_desired(client: &DeviceClient, patch: DesiredPatch, stats: &Stats, voice: &Voice) {
    voice.say("");
    voice.say("Twin callback called with:");
    if patch.full {
        voice.say(format_args!(
            "payload: {} (full desired state after a reconnect)",
            patch.patch
        ));
    } else {
        voice.say(format_args!("payload: {}", patch.patch));
    }
    apply(
        client,
        settings_of(&patch.patch),
        patch.version,
        stats,
        voice,
    )
    .await;
}

/// The settings in a desired document: everything but `$`-prefixed members.
fn settings_of(desired: &Value) -> Map<String, Value> {
    match desired {
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| !k.starts_with('$'))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        _ => Map::new(),
    }
}

/// Reports the applied settings (IoT Hub's desired/reported pattern) with an acknowledgement
/// naming the desired `$version`.
async fn apply(
    client: &DeviceClient,
    settings: Map<String, Value>,
    version: u64,
    stats: &Stats,
    voice: &Voice,
) {
    let mut reported = settings;
    reported.insert(
        "desiredAck".into(),
        json!({ "version": version, "status": "applied", "at": now() }),
    );
    match client.patch_reported(&Value::Object(reported)).await {
        Ok(reported_version) => {
            stats.patches_applied.fetch_add(1, Ordering::Relaxed);
            voice.say(format_args!(
                "Applied desired $version {version}; reported properties now at $version {reported_version}"
            ));
        }
        Err(e) => {
            stats.report_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(device_id = client.device_id(), error = %e, "could not acknowledge desired properties");
        }
    }
}

async fn on_method(client: &DeviceClient, request: MethodRequest, stats: &Stats, voice: &Voice) {
    let name = request.name.clone();
    let payload_text = if request.payload.iter().all(u8::is_ascii_whitespace) {
        "(none)".to_owned()
    } else {
        String::from_utf8_lossy(&request.payload).into_owned()
    };
    let parsed = request.json();
    let (status, body, door) = match (name.as_str(), parsed) {
        ("lockDoor", Ok(payload)) => {
            voice.say("");
            voice.say(format_args!("Locking Door! payload: {payload_text}"));
            let lock_time = payload
                .as_ref()
                .and_then(|p| p.get("lockTime"))
                .cloned()
                .unwrap_or(Value::Null);
            let door =
                json!({ "door": { "locked": true, "lockTime": lock_time, "lockedAt": now() } });
            (
                200,
                json!({ "Response": "lockDoor called successfully" }),
                Some(door),
            )
        }
        ("lockDoor", Err(e)) => {
            voice.say(format_args!(
                "lockDoor called with a payload that is not JSON ({e}): {payload_text}"
            ));
            (
                400,
                json!({ "message": format!("lockDoor: the payload is not JSON: {e}") }),
                None,
            )
        }
        (other, _) => {
            voice.say(format_args!(
                "Unknown method {other:?} (payload: {payload_text}); answering 404"
            ));
            let message = format!(
                "this device has no method `{other}`; it knows: {}",
                METHODS.join(", ")
            );
            (404, json!({ "message": message, "methods": METHODS }), None)
        }
    };
    match request.respond(status, &body).await {
        Ok(()) => {
            stats.methods_answered.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::warn!(device_id = client.device_id(), method = %name, error = %e, "could not answer")
        }
    }
    if let Some(door) = door {
        match client.patch_reported(&door).await {
            Ok(_) => voice.say("Door state reported."),
            Err(e) => {
                stats.report_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device_id = client.device_id(), error = %e, "could not report the door state");
            }
        }
    }
}
