//! The tutorial's simulated device (simDevice.py) in Rust: answers the `lockDoor` direct method,
//! logs desired-property updates and acknowledges them in reported properties, and runs one
//! device or a fleet of thousands in one process (one MQTT connection each).
//!
//! Module map: [`config`] (flags, environment, hub.env), [`device`] (one device's behaviour),
//! this file (`run`: single device or fleet, summary lines, totals, errors).

/// Prints one line of program output, after the run's label.
macro_rules! say {
    ($config:expr, $($arg:tt)*) => {
        println!("{}{}", $config.label, format_args!($($arg)*))
    };
}

pub mod config;
pub mod device;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hub_core::bulk::{ExportImportDevice, ImportMode, MAX_BULK_DEVICES};
use hub_core::connection_string::{DeviceAuth, DeviceConnectionString, SharedKey};
use hub_core::device::{Authentication, AuthenticationType, Device, SymmetricKey};
use hub_core::device_client::{
    Backoff, ConnectError, DeviceClient, DeviceClientOptions, Transport,
};
use hub_core::error::ErrorCode;
use hub_core::service_client::{HubErrorKind, RetryPolicy, ServiceClient, ServiceError};
use hub_core::tls::{TlsError, TrustOptions};
use tokio_util::sync::CancellationToken;

pub use config::{Args, Config, Fleet};
pub use device::{METHODS, Stats};

/// How many fleet devices may be mid-connect (TCP + TLS + CONNACK + twin read) at once.
pub const CONNECT_CONCURRENCY: usize = 256;
/// How many registry calls a fleet makes at once.
const REGISTRY_CONCURRENCY: usize = 32;
/// How many bulk registry calls (up to [`MAX_BULK_DEVICES`] devices each) a fleet makes at
/// once: each is one registry operation for the hub's throttle but a hundred records for its
/// store, so a few in flight keep 10,000 devices' creation to seconds without a burst of 100.
const BULK_CONCURRENCY: usize = 4;
/// The fleet's registry calls: hub-core's client retries a 429 itself (so the fleet does not
/// retry again on top), but its default four attempts suit an interactive tool; a fleet
/// registering on S1, 100 registry operations a minute shared by [`REGISTRY_CONCURRENCY`]
/// calls in flight, must wait its turn for up to ~20 s. Twelve attempts, full jitter under a
/// ceiling doubling from 250 ms to 15 s, give each call about 45 s of patience.
const REGISTRY_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 12,
    base_delay: Duration::from_millis(250),
    max_delay: Duration::from_secs(15),
    max_retry_after: Duration::from_secs(60),
};
/// One legacy listing (`GET /devices?top=1000`) counts as one registry operation for up to
/// this many identities, where looking them up one by one costs one each.
const LISTING_MAX: u32 = 1000;
/// The new-connection rate of the slowest tiers (F1, B1, S1): 100 a second.
const SLOWEST_CONNECT_RATE: f64 = 100.0;
/// First retry of a fleet device's connect: within 150 ms (full jitter), so a refused device
/// comes back while the hub's shaping window is still near.
const FLEET_BACKOFF_INITIAL: Duration = Duration::from_millis(150);
/// The smallest ceiling of a fleet device's backoff.
const FLEET_BACKOFF_MIN_CAP: Duration = Duration::from_secs(2);

/// Why the simulated device stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No connection string anywhere.
    #[error(
        "no device to run: no connection string was given and no hub-emulator settings were found{}.\n\
         Configure it in one of three ways:\n  \
         1. export IOTHUB_DEVICE_CONNECTION_STRING='HostName=<hub>.azure-devices.net;DeviceId=<id>;SharedAccessKey=<key>' \
            (or pass --connection-string), plus IOTHUB_CA_FILE / --ca-file if the hub uses a private CA;\n  \
         2. start the local hub: `hub-emulator` (it writes hub.env to its data directory, which sim-device reads);\n  \
         3. point at a hub.env written elsewhere: --hub-env PATH",
        hub_env.as_ref().map(|p| format!(" (looked for {})", p.display())).unwrap_or_default()
    )]
    NotConfigured {
        /// Where hub.env was looked for.
        hub_env: Option<PathBuf>,
    },
    /// A flag combination that cannot work.
    #[error("{0}")]
    Usage(String),
    /// A connection string that does not parse or is of the wrong kind.
    #[error("the connection string from {origin} is not valid: {reason}")]
    ConnectionString {
        /// Where it came from (flag, variable or file).
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// hub.env could not be used.
    #[error("cannot use {}: {reason}", path.display())]
    HubEnv {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA file could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A device could not connect (refused credentials, TLS, unreachable hub).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The registry could not be used (fleet mode).
    #[error("{what}: {source}")]
    Service {
        /// What was being done.
        what: String,
        /// The service client's error.
        #[source]
        source: ServiceError,
    },
    /// A fleet device does not exist and `--register` was not given.
    #[error(
        "device {device_id} is not registered in the hub; pass --register to create the fleet's devices"
    )]
    NotRegistered {
        /// The device.
        device_id: String,
    },
    /// The hub refused to create a fleet device (one entry of a bulk registry call).
    #[error("creating device {device_id} failed: {status} ({code})")]
    NotCreated {
        /// The device.
        device_id: String,
        /// The hub's error code name, e.g. `ArgumentInvalid`.
        code: String,
        /// The hub's words.
        status: String,
    },
    /// A fleet device has no symmetric key.
    #[error(
        "device {device_id} has no symmetric key (an X.509 device?); sim-device authenticates with SAS keys"
    )]
    NoKey {
        /// The device.
        device_id: String,
    },
}

impl SimError {
    /// The process exit code: 2 for configuration problems, 1 for hub/connection failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            SimError::NotConfigured { .. }
            | SimError::Usage(_)
            | SimError::ConnectionString { .. }
            | SimError::HubEnv { .. }
            | SimError::Tls(_) => 2,
            _ => 1,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSummary {
    /// Devices run.
    pub devices: usize,
    /// Devices connected when the run ended.
    pub connected: usize,
    /// Direct methods answered.
    pub methods_answered: u64,
    /// Desired patches applied and acknowledged.
    pub patches_applied: u64,
    /// Reported-property updates that failed.
    pub report_errors: u64,
    /// What the hub throttled.
    pub throttled: Throttled,
}

/// How often the hub throttled a run; every throttled attempt was retried after a backoff.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttled {
    /// Connect attempts refused with CONNACK 3 (server unavailable), first connects and
    /// reconnects alike.
    pub connects: u64,
    /// Registry calls answered 429 (ThrottlingException).
    pub registry_calls: u64,
}

impl std::fmt::Display for Throttled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "throttled: {} connects (CONNACK 3), {} registry calls",
            self.connects, self.registry_calls
        )
    }
}

impl FleetSummary {
    /// The fleet's throttle line, e.g. `throttled: 312 connects (CONNACK 3), 0 registry calls;
    /// all 1000 devices connected`.
    pub fn throttle_line(&self) -> String {
        throttle_line(self.throttled, self.connected, self.devices)
    }
}

fn throttle_line(throttled: Throttled, connected: usize, devices: usize) -> String {
    if connected == devices {
        format!("{throttled}; all {devices} devices connected")
    } else {
        format!("{throttled}; {connected} of {devices} devices connected")
    }
}

/// A fleet device's connect backoff (CONNACK 3 is retried with full jitter, other transient
/// failures with equal jitter; hub-core's client does both until the connect timeout). The
/// ceiling is the time the whole fleet needs at the slowest tier's connect rate, so the
/// fleet's retries stay near that rate instead of growing with its size, at least 2 s and at
/// most a quarter of the connect timeout, which leaves a device several tries before it.
pub fn fleet_backoff(count: usize, connect_timeout: Duration) -> Backoff {
    let whole_fleet = Duration::from_secs_f64(count as f64 / SLOWEST_CONNECT_RATE);
    let cap = whole_fleet
        .min(connect_timeout / 4)
        .max(FLEET_BACKOFF_MIN_CAP);
    Backoff {
        initial: FLEET_BACKOFF_INITIAL,
        max: cap,
    }
}

impl std::fmt::Display for FleetSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} device{}, {} connected at exit, {} methods answered, {} twin patches applied",
            self.devices,
            if self.devices == 1 { "" } else { "s" },
            self.connected,
            self.methods_answered,
            self.patches_applied
        )?;
        if self.report_errors > 0 {
            write!(
                f,
                ", {} reported-property updates failed",
                self.report_errors
            )?;
        }
        Ok(())
    }
}

fn protocol_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Mqtt => "MQTT",
        Transport::MqttWebSocket => "MQTT_WS",
    }
}

/// Runs the device (or fleet) until `shutdown` is cancelled, then disconnects and returns totals.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<FleetSummary, SimError> {
    if let Some(note) = &config.source_note {
        say!(config, "{note}");
    }
    let trust = TrustOptions {
        ca_file: config.ca_file.clone(),
        ca_pem: config.ca_pem.clone(),
        no_platform_roots: false,
    };
    let tls = hub_core::tls::client_config(&trust)?;
    let mut options = DeviceClientOptions::new(tls);
    options.transport = config.transport;
    options.connect_timeout = config.connect_timeout;
    options.sas_ttl = config.sas_ttl;
    let summary = match &config.fleet {
        None => run_single(&config, &options, shutdown).await?,
        Some(fleet) => {
            options.backoff = fleet_backoff(fleet.count, config.connect_timeout);
            let summary = run_fleet(&config, fleet, &options, shutdown).await?;
            say!(config, "{}", summary.throttle_line());
            summary
        }
    };
    say!(config, "Totals: {summary}");
    say!(config, "IoTHubClient sample stopped");
    Ok(summary)
}

async fn run_single(
    config: &Config,
    options: &DeviceClientOptions,
    shutdown: CancellationToken,
) -> Result<FleetSummary, SimError> {
    let cs = &config.connection_string;
    say!(
        config,
        "Starting the IoT Hub Rust jobs sample (simulated device)..."
    );
    say!(config, "    Protocol {}", protocol_name(config.transport));
    match &cs.gateway_host_name {
        Some(gw) => say!(
            config,
            "    Hub {} (via gateway {gw}), device {}",
            cs.host_name,
            cs.device_id
        ),
        None => say!(config, "    Hub {}, device {}", cs.host_name, cs.device_id),
    }
    let connected = tokio::select! {
        _ = shutdown.cancelled() => return Ok(FleetSummary { devices: 1, ..FleetSummary::default() }),
        connected = DeviceClient::connect(cs, options) => connected?,
    };
    say!(config, "Direct method initialized.");
    say!(config, "Device twin callback initialized.");
    say!(
        config,
        "IoTHubClient waiting for commands, press Ctrl-C to exit"
    );
    let stats = Arc::new(Stats::default());
    let client = connected.client.clone();
    let voice = device::Voice {
        events: true,
        prefix: config.label.clone(),
    };
    // The device gets its own token so "connected at exit" is read before it disconnects.
    let device_stop = CancellationToken::new();
    let serving = device::serve(connected, stats.clone(), voice, device_stop.clone());
    tokio::pin!(serving);
    let connected_at_exit = tokio::select! {
        _ = &mut serving => client.is_connected(),
        _ = shutdown.cancelled() => {
            let connected = client.is_connected();
            device_stop.cancel();
            serving.await;
            connected
        }
    };
    Ok(FleetSummary {
        devices: 1,
        connected: usize::from(connected_at_exit),
        methods_answered: stats.methods_answered.load(Ordering::Relaxed),
        patches_applied: stats.patches_applied.load(Ordering::Relaxed),
        report_errors: stats.report_errors.load(Ordering::Relaxed),
        throttled: Throttled {
            connects: client.stats().throttled,
            registry_calls: 0,
        },
    })
}

/// The fleet's registry client: the service connection string and CA of `config`, patient
/// with throttled calls ([`REGISTRY_RETRY`]).
fn fleet_service_client(config: &Config) -> Result<ServiceClient, SimError> {
    let Some(scs) = config.service_connection_string.clone() else {
        return Err(SimError::Usage(
            "--count needs a service connection string (IOTHUB_CONNECTION_STRING)".into(),
        ));
    };
    let service_error = |source| SimError::Service {
        what: "the service client".into(),
        source,
    };
    let mut builder = ServiceClient::builder(scs).retry(REGISTRY_RETRY);
    if let Some(ca) = &config.ca_file {
        builder = builder.ca_file(ca).map_err(service_error)?;
    }
    if let Some(pem) = &config.ca_pem {
        builder = builder.ca_pem(pem.as_bytes()).map_err(service_error)?;
    }
    builder.build().map_err(service_error)
}

/// A device's primary symmetric key, if it has one that decodes.
fn primary_key(device: &Device) -> Option<SharedKey> {
    device
        .symmetric_key()
        .and_then(|k| k.primary_key.clone().flatten())
        .and_then(|k| SharedKey::from_base64(&k).ok())
}

/// The keys of the fleet's devices among the first [`LISTING_MAX`] of the registry, in one
/// registry operation. Best effort: a hub that refuses the legacy listing only costs the fleet
/// its per-device lookups.
async fn listed_fleet_keys(service: &ServiceClient, fleet: &Fleet) -> HashMap<String, SharedKey> {
    let is_fleet_id = |id: &str| {
        id.strip_prefix(fleet.id_prefix.as_str())
            .filter(|n| !n.starts_with('0'))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| (1..=fleet.count).contains(&n))
    };
    match service.list_devices(Some(LISTING_MAX)).await {
        Ok(devices) => devices
            .iter()
            .filter(|d| is_fleet_id(&d.device_id))
            .filter_map(|d| Some((d.device_id.clone(), primary_key(d)?)))
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "listing the registry failed; looking devices up one by one");
            HashMap::new()
        }
    }
}

/// Looks up (or, with `register`, creates) one fleet device and returns its key.
async fn fleet_device_key(
    service: &ServiceClient,
    fleet: &Fleet,
    id: &str,
) -> Result<SharedKey, SimError> {
    let device = match service.get_device(id).await {
        Ok(device) => device,
        Err(e) if e.hub_kind() == Some(HubErrorKind::DeviceNotFound) && fleet.register => service
            .create_device(&Device::new(id.to_owned()))
            .await
            .map_err(|source| SimError::Service {
                what: format!("creating device {id}"),
                source,
            })?,
        Err(e) if e.hub_kind() == Some(HubErrorKind::DeviceNotFound) => {
            return Err(SimError::NotRegistered {
                device_id: id.to_owned(),
            });
        }
        Err(source) => {
            return Err(SimError::Service {
                what: format!("looking up device {id}"),
                source,
            });
        }
    };
    primary_key(&device).ok_or_else(|| SimError::NoKey {
        device_id: id.to_owned(),
    })
}

/// A new random device key: 32 bytes (two v4 UUIDs' worth of the OS's randomness).
fn random_key() -> SharedKey {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    SharedKey::from_bytes(bytes)
}

/// Creates `ids` with bulk registry calls of [`MAX_BULK_DEVICES`] and returns the keys of those
/// created. The keys are made here and sent with the devices, as a bulk answer carries none. A
/// device that exists already (beyond the listing, or created meanwhile) is left out, to be
/// looked up; any other refusal is an error naming the device. A throttled call is retried by
/// the client ([`REGISTRY_RETRY`]).
async fn create_fleet_devices(
    service: &ServiceClient,
    ids: &[String],
) -> Result<HashMap<String, SharedKey>, SimError> {
    // The calls are made before they are streamed: a closure mapping the chunks inside the
    // stream leaves the future's lifetimes too general for `tokio::spawn` to see it as Send.
    let calls: Vec<_> = ids
        .chunks(MAX_BULK_DEVICES)
        .map(|chunk| create_fleet_chunk(service, chunk))
        .collect();
    let calls = futures_util::stream::iter(calls).buffer_unordered(BULK_CONCURRENCY);
    tokio::pin!(calls);
    let mut created = HashMap::with_capacity(ids.len());
    while let Some(batch) = calls.next().await {
        created.extend(batch?);
    }
    Ok(created)
}

/// One bulk registry call of [`create_fleet_devices`]: the ids created, with their keys.
async fn create_fleet_chunk(
    service: &ServiceClient,
    chunk: &[String],
) -> Result<Vec<(String, SharedKey)>, SimError> {
    let mut keys = Vec::with_capacity(chunk.len());
    let mut devices = Vec::with_capacity(chunk.len());
    for id in chunk {
        let key = random_key();
        devices.push(ExportImportDevice {
            authentication: Some(Authentication {
                symmetric_key: Some(SymmetricKey::new(key.to_base64(), random_key().to_base64())),
                auth_type: Some(AuthenticationType::Sas),
                ..Authentication::default()
            }),
            ..ExportImportDevice::new(id.clone(), ImportMode::Create)
        });
        keys.push((id.clone(), key));
    }
    let result = match service.bulk_registry(&devices).await {
        Ok(result) => result,
        Err(source) => {
            return Err(SimError::Service {
                what: format!(
                    "creating devices {} to {}",
                    chunk.first().map(String::as_str).unwrap_or_default(),
                    chunk.last().map(String::as_str).unwrap_or_default()
                ),
                source,
            });
        }
    };
    let mut exists = std::collections::HashSet::with_capacity(result.errors.len());
    for error in result.errors {
        if error.error_code != ErrorCode::DeviceAlreadyExists.name() {
            return Err(SimError::NotCreated {
                device_id: error.device_id,
                code: error.error_code,
                status: error.error_status,
            });
        }
        exists.insert(error.device_id);
    }
    keys.retain(|(id, _)| !exists.contains(id));
    Ok(keys)
}

/// Finds (or, with `register`, creates) each fleet device and returns its connection string:
/// one listing first; with `register`, bulk creations of 100 of the devices it did not hold;
/// then one lookup per device still unknown. A new fleet of up to a thousand costs two registry
/// operations of the hub's rate (S1: 100 a minute) plus one per hundred devices, instead of two
/// per device.
async fn fleet_connection_strings(
    config: &Config,
    fleet: &Fleet,
    service: &ServiceClient,
    shutdown: &CancellationToken,
) -> Result<Vec<DeviceConnectionString>, SimError> {
    let mut known = tokio::select! {
        _ = shutdown.cancelled() => return Ok(Vec::new()),
        listed = listed_fleet_keys(service, fleet) => listed,
    };
    if fleet.register {
        let missing: Vec<String> = fleet
            .device_ids()
            .filter(|id| !known.contains_key(id))
            .collect();
        if !missing.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Vec::new()),
                created = create_fleet_devices(service, &missing) => known.extend(created?),
            }
        }
    }
    let base = &config.connection_string;
    let known = &known;
    let lookups = futures_util::stream::iter(fleet.device_ids())
        .map(|id| async move {
            let key = match known.get(&id) {
                Some(key) => key.clone(),
                None => fleet_device_key(service, fleet, &id).await?,
            };
            Ok::<_, SimError>(DeviceConnectionString {
                host_name: base.host_name.clone(),
                device_id: id,
                module_id: None,
                auth: DeviceAuth::SharedAccessKey(key),
                gateway_host_name: base.gateway_host_name.clone(),
            })
        })
        .buffered(REGISTRY_CONCURRENCY);
    tokio::pin!(lookups);
    let mut out = Vec::with_capacity(fleet.count);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(out),
            next = lookups.next() => match next {
                Some(cs) => out.push(cs?),
                None => return Ok(out),
            },
        }
    }
}

async fn run_fleet(
    config: &Config,
    fleet: &Fleet,
    options: &DeviceClientOptions,
    shutdown: CancellationToken,
) -> Result<FleetSummary, SimError> {
    say!(
        config,
        "Starting the IoT Hub Rust jobs sample (simulated device fleet)..."
    );
    say!(config, "    Protocol {}", protocol_name(config.transport));
    say!(
        config,
        "    Hub {}, {} devices {}1..{}{}, one connection each",
        config.connection_string.host_name,
        fleet.count,
        fleet.id_prefix,
        fleet.id_prefix,
        fleet.count
    );
    let started = Instant::now();
    let service = fleet_service_client(config)?;
    let devices = fleet_connection_strings(config, fleet, &service, &shutdown).await?;
    if shutdown.is_cancelled() {
        return Ok(FleetSummary {
            devices: fleet.count,
            ..FleetSummary::default()
        });
    }
    let throttled_registry_calls = service.throttled();
    say!(
        config,
        "{} device identities {} in {:.1}s ({throttled_registry_calls} registry calls throttled); connecting",
        devices.len(),
        if fleet.register {
            "ready (created where missing)"
        } else {
            "found"
        },
        started.elapsed().as_secs_f64()
    );

    let stats = Arc::new(Stats::default());
    let clients: Arc<Mutex<Vec<DeviceClient>>> =
        Arc::new(Mutex::new(Vec::with_capacity(devices.len())));
    let fatal: Arc<Mutex<Option<SimError>>> = Arc::new(Mutex::new(None));
    // Not a child of `shutdown`: "connected at exit" is counted before the devices disconnect.
    let stop = CancellationToken::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let tracker = tokio_util::task::TaskTracker::new();
    let connect_started = Instant::now();
    for cs in devices {
        let (options, stats, clients, fatal, stop, permits) = (
            options.clone(),
            stats.clone(),
            clients.clone(),
            fatal.clone(),
            stop.clone(),
            permits.clone(),
        );
        let voice = device::Voice {
            events: config.verbose,
            prefix: format!("{}[{}] ", config.label, cs.device_id),
        };
        tracker.spawn(async move {
            let connected = {
                let Ok(_permit) = permits.acquire().await else {
                    return;
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    // Boxed: the connect future is large and only needed once.
                    connected = Box::pin(DeviceClient::connect(&cs, &options)) => connected,
                }
            };
            match connected {
                Ok(connected) => {
                    lock(&clients).push(connected.client.clone());
                    device::serve(connected, stats, voice, stop).await;
                }
                Err(e) => {
                    let mut slot = lock(&fatal);
                    if slot.is_none() {
                        *slot = Some(SimError::Connect(e));
                    }
                    stop.cancel();
                }
            }
        });
    }
    tracker.close();

    let mut ticker = tokio::time::interval(config.summary_interval);
    ticker.tick().await;
    let mut all_connected_reported = false;
    // Connected devices and the CONNACK 3 refusals they met; a device still connecting adds
    // its refusals once it is through.
    let status_now = || {
        let clients = lock(&clients);
        let connected = clients.iter().filter(|c| c.is_connected()).count();
        let throttled = Throttled {
            connects: clients.iter().map(|c| c.stats().throttled).sum(),
            registry_calls: throttled_registry_calls,
        };
        (connected, throttled)
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = stop.cancelled() => break,
            _ = tracker.wait() => break,
            _ = ticker.tick() => {
                let (connected, throttled) = status_now();
                say!(config,
                    "{}/{} connected, {} methods answered, {} twin patches applied; {throttled}",
                    connected,
                    fleet.count,
                    stats.methods_answered.load(Ordering::Relaxed),
                    stats.patches_applied.load(Ordering::Relaxed),
                );
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if !all_connected_reported => {
                let (connected, throttled) = status_now();
                if connected == fleet.count {
                    all_connected_reported = true;
                    say!(config,
                        "all {} devices connected in {:.2}s ({throttled}); waiting for commands, press Ctrl-C to exit",
                        fleet.count,
                        connect_started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    let (connected, throttled) = status_now();
    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some devices did not disconnect within 10s");
    }
    if let Some(error) = lock(&fatal).take() {
        return Err(error);
    }
    Ok(FleetSummary {
        devices: fleet.count,
        connected,
        methods_answered: stats.methods_answered.load(Ordering::Relaxed),
        patches_applied: stats.patches_applied.load(Ordering::Relaxed),
        report_errors: stats.report_errors.load(Ordering::Relaxed),
        throttled,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoning only follows a panic elsewhere; the data (a list, a slot) is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
