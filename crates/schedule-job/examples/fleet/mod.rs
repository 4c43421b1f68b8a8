//! Shared by the examples: a fleet of real MQTT/TLS devices (hub-core's DeviceClient) in this
//! process, each answering every method with 200.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hub_core::connection_string::DeviceConnectionString;
use hub_core::device::Device;
use hub_core::device_client::{DeviceClient, DeviceClientOptions};
use hub_core::service_client::ServiceClient;
use hub_core::tls::TrustOptions;
use serde_json::json;

/// The examples' error type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An in-process hub writing into `dir`, a service client with `pool` idle connections, and
/// only the bench devices to come in the registry (the tutorial's myDeviceId is deleted, so a
/// job can target '*').
pub async fn start_hub(
    dir: &std::path::Path,
    pool: usize,
) -> Result<(hub_emulator::RunningHub, ServiceClient), BoxError> {
    let hub = hub_emulator::start(hub_emulator::Config {
        data_dir: Some(dir.to_owned()),
        durable: false,
        ..hub_emulator::Config::ephemeral()
    })
    .await?;
    let service = hub.env.service_connection_string.parse()?;
    let client = ServiceClient::builder(service)
        .ca_pem(hub.env.ca_pem.as_bytes())?
        .pool_max_idle(pool)
        .build()?;
    client.delete_device("myDeviceId", None).await?;
    Ok((hub, client))
}

/// Registers and connects `n` devices as DeviceClients in this process.
pub async fn in_process_devices(
    hub: &hub_emulator::RunningHub,
    client: &ServiceClient,
    n: usize,
) -> Result<Vec<DeviceClient>, BoxError> {
    let ids: Vec<String> = (1..=n).map(|i| format!("bench-{i}")).collect();
    let keys: Vec<Result<(String, String), BoxError>> = futures_util::stream::iter(ids)
        .map(|id| {
            let client = client.clone();
            async move {
                let d = client.create_device(&Device::new(&id)).await?;
                let key = d
                    .symmetric_key()
                    .and_then(|k| k.primary())
                    .ok_or("no key")?
                    .to_owned();
                Ok((id, key))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let tls = hub_core::tls::client_config(&TrustOptions::with_ca_pem(hub.env.ca_pem.clone()))?;
    let mut options = DeviceClientOptions::new(tls);
    options.connect_timeout = Duration::from_secs(120);
    let options = Arc::new(options);
    let mqtt_port = hub.mqtt_addr.port();
    let devices: Vec<Result<DeviceClient, BoxError>> = futures_util::stream::iter(keys)
        .map(|k| {
            let options = options.clone();
            async move {
                let (id, key) = k?;
                let cs: DeviceConnectionString =
                    format!("HostName=localhost:{mqtt_port};DeviceId={id};SharedAccessKey={key}")
                        .parse()?;
                let connected = DeviceClient::connect(&cs, &options).await?;
                let mut methods = connected.methods;
                let desired = connected.desired;
                tokio::spawn(async move {
                    let _desired = desired;
                    while let Some(request) = methods.recv().await {
                        let _ = request.respond(200, &json!({ "result": "locked" })).await;
                    }
                });
                Ok(connected.client)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    devices.into_iter().collect()
}
