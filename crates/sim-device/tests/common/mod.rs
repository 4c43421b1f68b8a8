//! Test support: a real hub-emulator on free loopback ports, and small polling helpers.
#![allow(dead_code)]

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use hub_core::connection_string::{ConnectionString, DeviceConnectionString};
use hub_core::device_client::{Backoff, DeviceClientOptions};
use hub_core::tls::TrustOptions;
use hub_emulator::hub::{MethodCall, MethodOutcome};
use hub_emulator::{Hub, RunningHub};
use serde_json::{Value, json};

/// The tutorial device the emulator creates.
pub const DEVICE: &str = "myDeviceId";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub async fn start_hub() -> RunningHub {
    init_tracing();
    match hub_emulator::start(hub_emulator::Config::ephemeral()).await {
        Ok(hub) => hub,
        Err(e) => panic!("hub-emulator did not start: {e}"),
    }
}

pub fn device_cs(running: &RunningHub) -> DeviceConnectionString {
    match ConnectionString::from_str(&running.env.device_connection_string) {
        Ok(ConnectionString::Device(cs)) => cs,
        other => panic!("device connection string: {other:?}"),
    }
}

/// Client options trusting the hub's CA, with quick reconnects.
pub fn client_options(running: &RunningHub) -> DeviceClientOptions {
    let trust = TrustOptions {
        ca_pem: Some(running.env.ca_pem.clone()),
        no_platform_roots: true,
        ..TrustOptions::default()
    };
    let tls = match hub_core::tls::client_config(&trust) {
        Ok(tls) => tls,
        Err(e) => panic!("tls: {e}"),
    };
    let mut options = DeviceClientOptions::new(tls);
    options.connect_timeout = Duration::from_secs(10);
    options.operation_timeout = Duration::from_secs(10);
    options.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(800),
    };
    options
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_method_ready(hub: &Hub, device: &str) {
    eventually(
        &format!("{device} to subscribe to methods"),
        Duration::from_secs(15),
        || async { hub.method_ready(device).then_some(()) },
    )
    .await
}

pub async fn invoke(hub: &Hub, device: &str, name: &str, payload: Option<Value>) -> MethodOutcome {
    let mut body = json!({ "methodName": name, "responseTimeoutInSeconds": 10 });
    if let Some(payload) = payload {
        body["payload"] = payload;
    }
    let call = match MethodCall::from_request(&body) {
        Ok(call) => call,
        Err(e) => panic!("method call: {e}"),
    };
    match hub.invoke_method(device, &call).await {
        Ok(outcome) => outcome,
        Err(e) => panic!("invoke {name} on {device}: {e}"),
    }
}

pub async fn set_desired(hub: &Hub, device: &str, desired: Value) -> Value {
    match hub
        .update_twin(
            device,
            &json!({ "properties": { "desired": desired } }),
            None,
            false,
        )
        .await
    {
        Ok(twin) => twin,
        Err(e) => panic!("update twin of {device}: {e}"),
    }
}

pub fn twin(hub: &Hub, device: &str) -> Value {
    match hub.get_twin(device) {
        Ok(twin) => twin,
        Err(e) => panic!("get twin of {device}: {e}"),
    }
}
