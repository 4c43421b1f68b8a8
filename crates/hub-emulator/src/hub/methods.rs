//! Direct methods: a validated call ([`MethodCall`]), the table of requests waiting for a
//! device's or module's answer, and the wait for it to come online and subscribe. Calls are
//! addressed by identity key (`{deviceId}` or `{deviceId}/{moduleId}`, see `modules`).

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;

use hub_core::topic::Topic;

use super::modules::split_key;
use super::router::Outbound;
use super::{Hub, OperationError, lock};
use crate::faults::MethodFault;

/// Largest direct-method payload, each way.
pub const MAX_METHOD_PAYLOAD: usize = 128 * 1024;

const DEFAULT_METHOD_RESPONSE_TIMEOUT: u64 = 30;

/// Where a device's answer to one method request arrives: its status and raw body.
type MethodReply = oneshot::Receiver<(i32, Bytes)>;

pub(super) struct PendingMethod {
    /// The identity asked (see `modules::identity_key`): only its session may answer.
    key: String,
    reply: oneshot::Sender<(i32, Bytes)>,
}

/// The outcome of a direct method, as the service API returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodOutcome {
    /// The status the device answered with.
    pub status: i32,
    /// The device's payload (`null` when it sent none).
    pub payload: Value,
}

/// A direct-method call, validated.
#[derive(Debug, Clone)]
pub struct MethodCall {
    /// Method name.
    pub name: String,
    /// The JSON text to send (empty when the request had no payload).
    pub payload: Bytes,
    /// How long to wait for the device's answer.
    pub response_timeout: Duration,
    /// How long to wait for the device to come online.
    pub connect_timeout: Duration,
}

impl MethodCall {
    /// Validates a `POST /twins/{id}/methods` body (IoT Hub's ranges and limits).
    pub fn from_request(body: &Value) -> Result<MethodCall, OperationError> {
        let Value::Object(map) = body else {
            return Err(OperationError::InvalidArgument(
                "the method request must be a JSON object with methodName, payload, responseTimeoutInSeconds and connectTimeoutInSeconds".into(),
            ));
        };
        let name = match map.get("methodName") {
            Some(Value::String(name)) => name.clone(),
            Some(_) => {
                return Err(OperationError::InvalidArgument(
                    "methodName must be a string".into(),
                ));
            }
            None => {
                return Err(OperationError::InvalidArgument(
                    "methodName is required".into(),
                ));
            }
        };
        validate_method_name(&name)?;
        let seconds =
            |field: &str, default: u64, min: u64, max: u64| -> Result<u64, OperationError> {
                match map.get(field) {
                    None | Some(Value::Null) => Ok(default),
                    Some(v) => match v.as_u64() {
                        Some(n) if (min..=max).contains(&n) => Ok(n),
                        _ => Err(OperationError::InvalidArgument(format!(
                            "{field} must be a whole number of seconds from {min} to {max}, got {v}"
                        ))),
                    },
                }
            };
        let response = seconds(
            "responseTimeoutInSeconds",
            DEFAULT_METHOD_RESPONSE_TIMEOUT,
            5,
            300,
        )?;
        let connect = seconds("connectTimeoutInSeconds", 0, 0, 300)?;
        let payload = match map.get("payload") {
            None => Bytes::new(),
            Some(value) => Bytes::from(value.to_string()),
        };
        if payload.len() > MAX_METHOD_PAYLOAD {
            return Err(OperationError::MessageTooLarge(format!(
                "the method payload is {} bytes; IoT Hub allows at most {MAX_METHOD_PAYLOAD}",
                payload.len()
            )));
        }
        Ok(MethodCall {
            name,
            payload,
            response_timeout: Duration::from_secs(response),
            connect_timeout: Duration::from_secs(connect),
        })
    }
}

/// Checks a method name against IoT Hub's rules (printable ASCII without separators).
pub fn validate_method_name(name: &str) -> Result<(), OperationError> {
    const FORBIDDEN: &str = "$()<>@,;:\\\"/[]?={} \t";
    if name.is_empty() || name.len() > 128 {
        return Err(OperationError::InvalidArgument(format!(
            "method name must be 1 to 128 characters, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || FORBIDDEN.contains(*c))
    {
        return Err(OperationError::InvalidArgument(format!(
            "method name `{name}` contains `{c}`; use printable ASCII without $()<>@,;:\\\"/[]?={{}} or spaces"
        )));
    }
    Ok(())
}

impl Hub {
    /// Invokes a direct method and waits for the device's answer, as `POST /twins/{id}/methods`.
    ///
    /// An injected fault ([`crate::faults`]) of the device applies here, so the REST API and the
    /// jobs engine see it alike: a failing device's call is answered by the hub without being
    /// delivered; a slow device's request is delivered `delay` late, and that time counts
    /// against the response timeout (a delay at least as long ends in 504101 GatewayTimeout
    /// once the timeout is over, as a device that answers too late does); an offline device is
    /// really disconnected, so the call takes the usual 404103 path.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        call: &MethodCall,
    ) -> Result<MethodOutcome, OperationError> {
        self.invoke_identity(device_id, call).await
    }

    /// Invokes a direct method on a module and waits for its answer, as
    /// `POST /twins/{id}/modules/{mid}/methods` (REST reference, "Modules - Invoke Method"):
    /// delivered to the module's own session on the same `$iothub/methods/POST/...` topic,
    /// with the same timeouts and errors as a device's.
    pub async fn invoke_module_method(
        &self,
        device_id: &str,
        module_id: &str,
        call: &MethodCall,
    ) -> Result<MethodOutcome, OperationError> {
        super::validate_module_id(module_id)?;
        self.invoke_identity(&super::identity_key(device_id, Some(module_id)), call)
            .await
    }

    /// Whether the identity exists: `Ok`, or the 404 it is reported with.
    fn identity_registered(&self, key: &str) -> Result<(), OperationError> {
        let (device_id, module_id) = split_key(key);
        let state = lock(&self.inner.state);
        let Some(device) = state.devices.get(device_id) else {
            return Err(OperationError::DeviceNotFound(device_id.to_owned()));
        };
        match module_id {
            Some(module_id) if !device.modules.contains_key(module_id) => {
                Err(OperationError::ModuleNotFound {
                    device: device_id.to_owned(),
                    module: module_id.to_owned(),
                })
            }
            _ => Ok(()),
        }
    }

    /// [`Hub::invoke_method`] for an identity key (faults are a device's: a module's key
    /// names none).
    async fn invoke_identity(
        &self,
        key: &str,
        call: &MethodCall,
    ) -> Result<MethodOutcome, OperationError> {
        self.identity_registered(key)?;
        let deadline = tokio::time::Instant::now() + call.connect_timeout;
        let mut response_timeout = call.response_timeout;
        match self.inner.faults.method(key, &call.name) {
            Some(MethodFault::Answer { status, payload }) => {
                tracing::debug!(identity = %key, method = %call.name, status, "answered by an injected fault");
                return Ok(MethodOutcome { status, payload });
            }
            Some(MethodFault::Delay(delay)) => {
                // Online first: an unreachable slow device still gets 404103, not 504101.
                self.wait_for_method_session(key, call, deadline, || {
                    Ok(self.method_ready(key).then_some(()))
                })
                .await?;
                if delay >= response_timeout {
                    tokio::time::sleep(response_timeout).await;
                    return Err(OperationError::GatewayTimeout);
                }
                tokio::time::sleep(delay).await;
                response_timeout -= delay;
            }
            None => {}
        }
        // Fast path: a connected, subscribed device needs no presence wait. (Registering with
        // `presence` takes its lock twice, for every call, from every REST connection.)
        let sent = self.try_send_method(key, call)?;
        let (rid, reply) = if let Some(sent) = sent {
            sent
        } else {
            self.wait_for_method_session(key, call, deadline, || self.try_send_method(key, call))
                .await?
        };
        let answer = tokio::time::timeout(response_timeout, reply).await;
        lock(&self.inner.pending).remove(&rid);
        let (status, body) = match answer {
            Ok(Ok(answer)) => answer,
            // No answer in time. A request outlives its session on purpose: a device that
            // reconnects may still answer it (the SDKs keep unanswered requests), so a dropped
            // connection is not a failure until the response timeout says so.
            Ok(Err(_)) | Err(_) => return Err(OperationError::GatewayTimeout),
        };
        if body.len() > MAX_METHOD_PAYLOAD {
            return Err(OperationError::MessageTooLarge(format!(
                "the device answered with {} bytes; IoT Hub allows at most {MAX_METHOD_PAYLOAD}",
                body.len()
            )));
        }
        let payload = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        Ok(MethodOutcome { status, payload })
    }

    /// Waits (up to `deadline`) for the device to connect and subscribe to methods, retrying
    /// `attempt` (which sends, or checks) at every change of presence until it gives `Some`.
    async fn wait_for_method_session<T>(
        &self,
        key: &str,
        call: &MethodCall,
        deadline: tokio::time::Instant,
        mut attempt: impl FnMut() -> Result<Option<T>, OperationError>,
    ) -> Result<T, OperationError> {
        loop {
            // Registered before the check, so a subscription between the check and the wait
            // still wakes this call.
            let notified = self.inner.presence.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(done) = attempt()? {
                return Ok(done);
            }
            self.identity_registered(key)?;
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(OperationError::DeviceNotOnline {
                    timeout_secs: call.connect_timeout.as_secs(),
                });
            }
        }
    }

    fn try_send_method(
        &self,
        key: &str,
        call: &MethodCall,
    ) -> Result<Option<(u64, MethodReply)>, OperationError> {
        let sessions = lock(&self.inner.sessions);
        let Some(session) = sessions
            .get(key)
            .filter(|s| s.subscriptions.methods.is_some())
        else {
            return Ok(None);
        };
        let rid = self.next_id();
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.inner.pending).insert(
            rid,
            PendingMethod {
                key: key.to_owned(),
                reply: reply_tx,
            },
        );
        let topic = Topic::MethodRequest {
            name: call.name.clone(),
            rid: rid.to_string(),
        }
        .to_string();
        match session.tx.try_send(Outbound::Publish {
            topic,
            payload: call.payload.clone(),
        }) {
            Ok(()) => Ok(Some((rid, reply_rx))),
            Err(_) => {
                lock(&self.inner.pending).remove(&rid);
                Err(OperationError::Throttled)
            }
        }
    }

    /// An identity's answer to a method request (`key` is its session's, `{deviceId}` or
    /// `{deviceId}/{moduleId}`); ignored unless that identity was asked, so a device cannot
    /// answer its module's calls nor a module its device's.
    pub fn method_response(&self, key: &str, rid: &str, status: i32, body: Bytes) {
        let Ok(rid) = rid.parse::<u64>() else { return };
        let mut pending = lock(&self.inner.pending);
        if pending.get(&rid).is_some_and(|p| p.key == key)
            && let Some(waiter) = pending.remove(&rid)
        {
            let _ = waiter.reply.send((status, body));
        }
    }
}
