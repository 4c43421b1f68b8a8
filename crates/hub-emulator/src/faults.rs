//! Fault injection for users' own tests: which devices misbehave, how, and until when.
//!
//! A user testing a back end (a job service calling direct methods and twin updates) against
//! the emulator needs a named device to fail deterministically for a while, so that the back
//! end's error paths run. This module owns the fault table ([`Faults`], one active fault per
//! device id, each with an optional expiry), the fault kinds ([`FaultKind`]), and the two ways
//! users describe a fault: the JSON body of `PUT /$emulator/faults/{deviceId}`
//! ([`FaultSpec::from_json`]) and the `--fault DEVICE=KIND[:ARG][,for=DURATION]` flag
//! ([`parse_flag`]). The hub consults the table where it delivers methods and twin operations
//! (`hub/methods.rs`, `hub/twins.rs`, `hub/router.rs`, `mqtt/session.rs`); the REST routes are
//! in `http/faults.rs`. Documented for users in docs/faults.md.
//!
//! The table's lock is a leaf: nothing else is locked while it is held, and it is never held
//! across an `.await`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::time::Instant;

/// Most devices with an active fault at once, so a client cannot grow the table without limit.
pub const MAX_FAULTS: usize = 10_000;

/// How a device misbehaves. Each imitates an answer IoT Hub gives (docs/faults.md has the
/// table with sources).
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// Direct-method deliveries and twin operations of the device are `delay` late. Past a
    /// method's response timeout the call ends in 504101 GatewayTimeout, as for a device that
    /// answers too late (Microsoft Learn, "Understand and invoke direct methods from IoT Hub":
    /// "If the direct method times out [...] 504 GatewayTimeout").
    Slow {
        /// How late.
        delay: Duration,
    },
    /// The device's connection is closed and its reconnects are refused with CONNACK 3 (MQTT
    /// 3.1.1 §3.2.2.3, "server unavailable", which the SDKs retry); a method gets 404103
    /// DeviceNotOnline after its connect timeout (Microsoft Learn, "Understand and resolve
    /// Azure IoT Hub error codes"), as for any disconnected device.
    Offline,
    /// The hub answers direct methods itself with `status` and `payload`, without delivering
    /// them (only the method named `method`, when given): what a caller sees of a device
    /// whose handler fails, since IoT Hub passes the device's status and payload through.
    Failing {
        /// The status of the answer.
        status: i32,
        /// The payload of the answer.
        payload: Value,
        /// Only this method fails; others are delivered.
        method: Option<String>,
    },
    /// The device's twin operations are answered 429 ThrottlingException (429001), as IoT Hub
    /// answers twin reads and updates beyond its throttles (Microsoft Learn, "IoT Hub quotas
    /// and throttling").
    TwinThrottled,
}

impl FaultKind {
    /// The kind's name, as in the JSON body and the flag.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Slow { .. } => "slow",
            FaultKind::Offline => "offline",
            FaultKind::Failing { .. } => "failing",
            FaultKind::TwinThrottled => "twin-throttled",
        }
    }
}

/// The kinds users can name, for error messages.
const KINDS: &str = "slow, offline, failing or twin-throttled";

/// A fault as a user asks for it: its kind, and how long it lasts (`None`: until cleared).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// What the device does.
    pub kind: FaultKind,
    /// How long from when it is set.
    pub lasts: Option<Duration>,
}

/// Writes a duration the way `hub_core::duration::parse` reads it back (`300ms`, `2.5s`).
fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

fn parse_duration(field: &str, value: &Value) -> Result<Duration, String> {
    let Some(text) = value.as_str() else {
        return Err(format!(
            "`{field}` must be a duration string such as \"300ms\", \"30s\" or \"2m\", got {value}"
        ));
    };
    hub_core::duration::parse(text).map_err(|e| format!("`{field}`: {e}"))
}

/// A method answer's status: IoT Hub passes any integer the device sends; a status outside
/// 32-bit range cannot be sent by a device either.
fn parse_status(value: &Value) -> Result<i32, String> {
    value
        .as_i64()
        .and_then(|n| i32::try_from(n).ok())
        .ok_or_else(|| format!("`status` must be a whole number such as 500, got {value}"))
}

impl FaultSpec {
    /// Reads a `PUT /$emulator/faults/{deviceId}` body:
    /// `{"kind": "slow", "delay": "2s", "for": "30s"}`, `{"kind": "offline"}`,
    /// `{"kind": "failing", "status": 500, "payload": {..}, "method": "reboot"}` or
    /// `{"kind": "twin-throttled"}`. Every error names the field and what to send instead.
    pub fn from_json(body: &Value) -> Result<FaultSpec, String> {
        let Value::Object(map) = body else {
            return Err(format!(
                "the fault must be a JSON object such as {{\"kind\": \"offline\", \"for\": \"30s\"}}, got {body}"
            ));
        };
        let kind = match map.get("kind") {
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => return Err(format!("`kind` must be a string ({KINDS}), got {other}")),
            None => return Err(format!("the fault needs `kind`: {KINDS}")),
        };
        let allowed: &[&str] = match kind {
            "slow" => &["kind", "for", "delay"],
            "failing" => &["kind", "for", "status", "payload", "method"],
            "offline" | "twin-throttled" => &["kind", "for"],
            other => return Err(format!("unknown fault kind `{other}`; use {KINDS}")),
        };
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!(
                "unknown field `{unknown}` for a {kind} fault; it takes {}",
                allowed.join(", ")
            ));
        }
        let kind = match kind {
            "slow" => FaultKind::Slow {
                delay: parse_duration(
                    "delay",
                    map.get("delay")
                        .ok_or("a slow fault needs `delay`, e.g. \"2s\"")?,
                )?,
            },
            "failing" => FaultKind::Failing {
                status: parse_status(
                    map.get("status")
                        .ok_or("a failing fault needs `status`, e.g. 500")?,
                )?,
                payload: map.get("payload").cloned().unwrap_or(Value::Null),
                method: match map.get("method") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(name)) => {
                        crate::hub::validate_method_name(name)
                            .map_err(|e| format!("`method`: {e}"))?;
                        Some(name.clone())
                    }
                    Some(other) => {
                        return Err(format!("`method` must be a method name, got {other}"));
                    }
                },
            },
            "offline" => FaultKind::Offline,
            _ => FaultKind::TwinThrottled,
        };
        let lasts = match map.get("for") {
            None | Some(Value::Null) => None,
            Some(value) => Some(parse_duration("for", value)?),
        };
        Ok(FaultSpec { kind, lasts })
    }

    /// The JSON form [`FaultSpec::from_json`] reads (without `for`).
    fn kind_json(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("kind".into(), json!(self.kind.name()));
        match &self.kind {
            FaultKind::Slow { delay } => {
                map.insert("delay".into(), json!(format_duration(*delay)));
            }
            FaultKind::Failing {
                status,
                payload,
                method,
            } => {
                map.insert("status".into(), json!(status));
                map.insert("payload".into(), payload.clone());
                if let Some(method) = method {
                    map.insert("method".into(), json!(method));
                }
            }
            FaultKind::Offline | FaultKind::TwinThrottled => {}
        }
        map
    }
}

/// Reads one `--fault` value: `DEVICE=KIND[:ARG][,for=DURATION][,method=NAME]`, e.g.
/// `dev1=slow:2s`, `dev1=offline,for=30s`, `dev1=failing:500,method=reboot`,
/// `dev1=twin-throttled`. A failing fault from the flag answers with a `null` payload (the REST
/// body can give one).
pub fn parse_flag(text: &str) -> Result<(String, FaultSpec), String> {
    let usage = "use DEVICE=KIND[:ARG][,for=DURATION], e.g. dev1=slow:2s, dev1=offline,for=30s, \
                 dev1=failing:500,method=reboot or dev1=twin-throttled";
    let Some((device_id, rest)) = text.split_once('=') else {
        return Err(format!("`{text}` names no device; {usage}"));
    };
    crate::hub::validate_device_id(device_id).map_err(|e| format!("`{text}`: {e}"))?;
    let mut parts = rest.split(',');
    let head = parts.next().unwrap_or_default();
    let (kind, arg) = match head.split_once(':') {
        Some((kind, arg)) => (kind, Some(arg)),
        None => (head, None),
    };
    let mut body = Map::new();
    body.insert("kind".into(), json!(kind));
    match (kind, arg) {
        ("slow", Some(delay)) => {
            body.insert("delay".into(), json!(delay));
        }
        ("slow", None) => return Err(format!("`{text}`: slow needs a delay, e.g. slow:2s")),
        ("failing", Some(status)) => {
            let status: i64 = status
                .parse()
                .map_err(|_| format!("`{text}`: the status `{status}` is not a whole number"))?;
            body.insert("status".into(), json!(status));
        }
        ("failing", None) => {
            return Err(format!(
                "`{text}`: failing needs a status, e.g. failing:500"
            ));
        }
        (_, Some(arg)) => {
            return Err(format!(
                "`{text}`: {kind} takes no argument (`:{arg}`); {usage}"
            ));
        }
        (_, None) => {}
    }
    for option in parts {
        match option.split_once('=') {
            Some(("for", duration)) => {
                body.insert("for".into(), json!(duration));
            }
            Some(("method", name)) => {
                body.insert("method".into(), json!(name));
            }
            _ => return Err(format!("`{text}`: unknown option `{option}`; {usage}")),
        }
    }
    let spec = FaultSpec::from_json(&Value::Object(body)).map_err(|e| format!("`{text}`: {e}"))?;
    Ok((device_id.to_owned(), spec))
}

/// Why a fault could not be set.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The table holds [`MAX_FAULTS`] other devices' faults.
    #[error(
        "{limit} devices already have a fault, the most this hub keeps; clear some \
         (DELETE /$emulator/faults/{{deviceId}} or DELETE /$emulator/faults) first"
    )]
    TooMany { limit: usize },
}

struct ActiveFault {
    spec: FaultSpec,
    expires: Option<Instant>,
}

impl ActiveFault {
    fn is_active(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

/// What a direct method to a faulty device does instead of the usual delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodFault {
    /// Delivered this much late.
    Delay(Duration),
    /// Not delivered: the hub answers with this status and payload.
    Answer { status: i32, payload: Value },
}

/// What a twin operation of a faulty device does instead of the usual answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TwinFault {
    /// Answered this much late.
    Delay(Duration),
    /// Refused with 429 ThrottlingException.
    Throttled,
}

/// The fault table: device id to its active fault.
pub struct Faults {
    table: Mutex<HashMap<String, ActiveFault>>,
    limit: usize,
}

impl Default for Faults {
    /// The hub's table: at most [`MAX_FAULTS`] faults.
    fn default() -> Faults {
        Faults::with_limit(MAX_FAULTS)
    }
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").finish_non_exhaustive()
    }
}

impl Faults {
    /// A table of at most `limit` faults (tests use small ones; the hub [`MAX_FAULTS`]).
    pub fn with_limit(limit: usize) -> Faults {
        Faults {
            table: Mutex::default(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ActiveFault>> {
        // The table is always consistent (every change is one insert or remove).
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets (or replaces) the device's fault, lasting from now. Expired faults are dropped
    /// first, so only active ones count against the limit.
    pub fn set(&self, device_id: &str, spec: FaultSpec) -> Result<(), FaultError> {
        let now = Instant::now();
        let limit = self.limit;
        let mut table = self.lock();
        if !table.contains_key(device_id) && table.len() >= limit {
            table.retain(|_, fault| fault.is_active(now));
            if table.len() >= limit {
                return Err(FaultError::TooMany { limit });
            }
        }
        let expires = spec.lasts.map(|lasts| now + lasts);
        table.insert(device_id.to_owned(), ActiveFault { spec, expires });
        Ok(())
    }

    /// Clears the device's fault; whether it had an active one.
    pub fn clear(&self, device_id: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .remove(device_id)
            .is_some_and(|fault| fault.is_active(now))
    }

    /// Clears every fault; how many were active.
    pub fn clear_all(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .drain()
            .filter(|(_, fault)| fault.is_active(now))
            .count()
    }

    /// The device's active fault kind, if any (an expired one is dropped).
    pub fn active(&self, device_id: &str) -> Option<FaultKind> {
        let now = Instant::now();
        let mut table = self.lock();
        let fault = table.get(device_id)?;
        if fault.is_active(now) {
            return Some(fault.spec.kind.clone());
        }
        table.remove(device_id);
        None
    }

    /// Whether the device is held offline now.
    pub fn is_offline(&self, device_id: &str) -> bool {
        matches!(self.active(device_id), Some(FaultKind::Offline))
    }

    /// What a call of method `name` on the device does instead of the usual delivery.
    pub fn method(&self, device_id: &str, name: &str) -> Option<MethodFault> {
        match self.active(device_id)? {
            FaultKind::Slow { delay } => Some(MethodFault::Delay(delay)),
            FaultKind::Failing {
                status,
                payload,
                method,
            } if method.as_deref().is_none_or(|m| m == name) => {
                Some(MethodFault::Answer { status, payload })
            }
            _ => None,
        }
    }

    /// What a twin operation of the device (device side or service side) does instead.
    pub fn twin(&self, device_id: &str) -> Option<TwinFault> {
        match self.active(device_id)? {
            FaultKind::Slow { delay } => Some(TwinFault::Delay(delay)),
            FaultKind::TwinThrottled => Some(TwinFault::Throttled),
            _ => None,
        }
    }

    /// The active faults by device id, each as its JSON body plus `deviceId` and
    /// `remainingMs` (`null`: until cleared), for `GET /$emulator/faults`.
    pub fn list(&self) -> Vec<Value> {
        let now = Instant::now();
        let mut table = self.lock();
        table.retain(|_, fault| fault.is_active(now));
        let mut listed: Vec<(&String, &ActiveFault)> = table.iter().collect();
        listed.sort_unstable_by_key(|(id, _)| id.as_str());
        listed
            .into_iter()
            .map(|(id, fault)| fault_json(id, fault, now))
            .collect()
    }

    /// One device's active fault as [`Faults::list`] shows it.
    pub fn describe(&self, device_id: &str) -> Option<Value> {
        let now = Instant::now();
        let table = self.lock();
        table
            .get(device_id)
            .filter(|fault| fault.is_active(now))
            .map(|fault| fault_json(device_id, fault, now))
    }
}

fn fault_json(device_id: &str, fault: &ActiveFault, now: Instant) -> Value {
    let mut map = Map::new();
    map.insert("deviceId".into(), json!(device_id));
    map.extend(fault.spec.kind_json());
    let remaining = fault
        .expires
        .map(|at| u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX));
    map.insert("remainingMs".into(), json!(remaining));
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(body: Value) -> FaultSpec {
        FaultSpec::from_json(&body).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    #[test]
    fn every_kind_reads_from_json() {
        assert_eq!(
            spec(json!({"kind": "slow", "delay": "300ms", "for": "2s"})),
            FaultSpec {
                kind: FaultKind::Slow {
                    delay: Duration::from_millis(300)
                },
                lasts: Some(Duration::from_secs(2)),
            }
        );
        assert_eq!(spec(json!({"kind": "offline"})).kind, FaultKind::Offline);
        assert_eq!(
            spec(
                json!({"kind": "failing", "status": 503, "payload": {"a": 1}, "method": "reboot"})
            )
            .kind,
            FaultKind::Failing {
                status: 503,
                payload: json!({"a": 1}),
                method: Some("reboot".into()),
            }
        );
        assert_eq!(
            spec(json!({"kind": "twin-throttled", "for": null})),
            FaultSpec {
                kind: FaultKind::TwinThrottled,
                lasts: None
            }
        );
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        let cases = [
            (json!({"kind": "broken"}), "unknown fault kind `broken`"),
            (json!({}), "needs `kind`"),
            (json!({"kind": 3}), "`kind` must be a string"),
            (json!({"kind": "slow"}), "needs `delay`"),
            (json!({"kind": "slow", "delay": "fast"}), "`delay`"),
            (json!({"kind": "offline", "for": "3 weeks"}), "`for`"),
            (
                json!({"kind": "offline", "for": 30}),
                "`for` must be a duration",
            ),
            (json!({"kind": "failing"}), "needs `status`"),
            (json!({"kind": "failing", "status": "500"}), "`status`"),
            (
                json!({"kind": "offline", "delay": "1s"}),
                "unknown field `delay`",
            ),
            (
                json!({"kind": "failing", "status": 500, "method": "a b"}),
                "`method`",
            ),
            (json!([1]), "JSON object"),
        ];
        for (body, expected) in cases {
            let error = FaultSpec::from_json(&body).expect_err("refused");
            assert!(error.contains(expected), "{body}: {error}");
        }
    }

    #[test]
    fn flags_read_like_the_json_body() {
        let (id, parsed) = parse_flag("dev1=slow:2s,for=30s").expect("slow");
        assert_eq!(id, "dev1");
        assert_eq!(
            parsed,
            spec(json!({"kind": "slow", "delay": "2s", "for": "30s"}))
        );
        assert_eq!(
            parse_flag("dev1=failing:500,method=reboot")
                .expect("failing")
                .1,
            spec(json!({"kind": "failing", "status": 500, "method": "reboot"}))
        );
        assert_eq!(
            parse_flag("d=twin-throttled").expect("throttled").1.kind,
            FaultKind::TwinThrottled
        );
        for (flag, expected) in [
            ("offline", "names no device"),
            ("dev1=slow", "needs a delay"),
            ("dev1=offline:5s", "takes no argument"),
            ("dev1=failing:x", "not a whole number"),
            ("dev1=offline,until=5s", "unknown option"),
            ("dev1=sleepy", "unknown fault kind"),
            ("dev1=offline,for=soon", "`for`"),
        ] {
            let error = parse_flag(flag).expect_err(flag);
            assert!(error.contains(expected), "{flag}: {error}");
        }
    }

    #[test]
    fn the_table_is_bounded_and_forgets_expired_faults() {
        let faults = Faults::with_limit(2);
        let offline = spec(json!({"kind": "offline"}));
        let brief = spec(json!({"kind": "offline", "for": "0s"}));
        faults.set("a", offline.clone()).expect("a");
        faults.set("b", brief).expect("b");
        assert!(!faults.is_offline("b"), "a 0 s fault is over at once");
        // `b` expired, so `c` fits; then the table is full.
        faults.set("c", offline.clone()).expect("c");
        assert!(matches!(
            faults.set("d", offline.clone()),
            Err(FaultError::TooMany { limit: 2 })
        ));
        // Replacing a device's own fault is always allowed.
        faults.set("a", offline).expect("replace a");
        assert_eq!(faults.list().len(), 2);
        assert!(faults.clear("a"));
        assert!(!faults.clear("a"));
        assert_eq!(faults.clear_all(), 1);
        assert!(faults.list().is_empty());
    }

    #[test]
    fn method_filters_and_twin_faults_follow_the_kind() {
        let faults = Faults::default();
        faults
            .set(
                "f",
                spec(json!({"kind": "failing", "status": 500, "method": "reboot"})),
            )
            .expect("set");
        assert_eq!(
            faults.method("f", "reboot"),
            Some(MethodFault::Answer {
                status: 500,
                payload: Value::Null
            })
        );
        assert_eq!(faults.method("f", "ping"), None);
        assert_eq!(faults.twin("f"), None);
        faults
            .set("s", spec(json!({"kind": "slow", "delay": "1s"})))
            .expect("set");
        assert_eq!(
            faults.twin("s"),
            Some(TwinFault::Delay(Duration::from_secs(1)))
        );
        let listed = faults.describe("s").expect("listed");
        assert_eq!(listed["delay"], "1s");
        assert_eq!(listed["remainingMs"], Value::Null);
    }
}
