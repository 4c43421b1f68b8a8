//! A local Azure IoT Hub that speaks IoT Hub's own MQTT device protocol and REST service API,
//! so that the official SDKs and our tools run against it unchanged.
//!
//! Module map:
//! - [`config`]: command-line flags and data directory.
//! - [`tls`]: the hub's local CA and server certificate.
//! - `listener`: the accept loop both ports share (pending and admitted connection budgets, TLS
//!   handshake in each connection's task, accept backoff, shutdown).
//! - [`limits`]: the open-file limit, raised at start, with the budgets fitted under it.
//! - [`store`]: durable state in SQLite.
//! - [`hub`]: registry, twins, policies and the device-session router (shared state).
//! - [`twins`]: twin sections, merge patches, `$version` and `$metadata`.
//! - [`mqtt`]: the device endpoint (MQTT 3.1.1 over TLS and over WebSocket).
//! - [`http`]: the service REST API (registry, twins, methods, query, jobs).
//! - [`query`]: the IoT Hub query language (parser and evaluator).
//! - [`throttle`]: the tier's operation throttles (traffic shaping, then 429).
//! - [`jobs`]: Jobs v2, scheduled direct methods and twin updates over a query.
//! - [`seed`]: the seed file (`--seed`), devices created or brought up to date at start.
//! - [`faults`]: injected device faults for users' own tests (slow, offline, failing methods,
//!   throttled twins), set with `--fault` or `/$emulator/faults`.
//!
//! [`start`] binds the listeners and returns a [`RunningHub`]; [`run`] is the binary's loop.

pub mod config;
pub mod dashboard;
pub mod faults;
pub mod feed;
pub mod http;
pub mod hub;
pub mod import_export;
pub mod jobs;
pub mod limits;
mod listener;
pub mod mqtt;
pub mod query;
pub mod seed;
pub mod store;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod twins;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Args, Config};
pub use hub::Hub;
pub use listener::{ConnectionBudget, PENDING_EVICTION_AGE};

/// How long shutdown waits for sessions and requests to finish.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(4);

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A port could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}{hint}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    /// The certificates could not be prepared.
    #[error(transparent)]
    Tls(#[from] tls::CertificateError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The stored state could not be loaded.
    #[error("cannot load the hub's state: {0}")]
    State(#[from] hub::OperationError),
    /// The seed file could not be applied.
    #[error(transparent)]
    Seed(#[from] seed::SeedError),
    /// A `--fault` could not be set.
    #[error("--fault: {0}")]
    Fault(#[from] faults::FaultError),
    /// `--dashboard-token` is not a usable token.
    #[error("--dashboard-token: {0}")]
    DashboardToken(#[from] dashboard::InvalidToken),
    /// hub.env could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Env {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What clients need to reach this hub (also written to `DATA_DIR/hub.env`).
#[derive(Clone)]
pub struct ConnectionInfo {
    /// `IOTHUB_CONNECTION_STRING`: the iothubowner policy.
    pub service_connection_string: String,
    /// `IOTHUB_DEVICE_CONNECTION_STRING`: the tutorial device `myDeviceId`.
    pub device_connection_string: String,
    /// `IOTHUB_CA_FILE`, when the hub has a data directory.
    pub ca_file: Option<PathBuf>,
    /// The CA certificate (PEM) clients must trust.
    pub ca_pem: String,
    /// `IOTHUB_TIER` and `IOTHUB_UNITS`, when the hub throttles as a tier (`--tier`), so our
    /// tools can predict what the tier allows (e.g. how long a job takes).
    pub tier: Option<hub_core::tier::Quotas>,
}

impl std::fmt::Debug for ConnectionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionInfo")
            .field("ca_file", &self.ca_file)
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

impl ConnectionInfo {
    /// The `KEY=value` lines of hub.env.
    pub fn to_env_lines(&self) -> String {
        hub_core::hub_env::HubEnv {
            service_connection_string: Some(self.service_connection_string.clone()),
            device_connection_string: Some(self.device_connection_string.clone()),
            ca_file: self.ca_file.clone(),
            tier: self.tier,
        }
        .to_lines()
    }
}

/// A started hub: its addresses, what clients need, and a handle to stop it.
#[derive(Debug)]
pub struct RunningHub {
    /// Where MQTT over TLS listens.
    pub mqtt_addr: SocketAddr,
    /// Where HTTPS (REST and MQTT over WebSocket) listens.
    pub https_addr: SocketAddr,
    /// Connection strings and CA.
    pub env: ConnectionInfo,
    /// The dashboard's link, with this start's token (None: `--no-dashboard`).
    pub dashboard_url: Option<String>,
    hub: Hub,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl RunningHub {
    /// The shared state (for in-process tests and benchmarks).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Stops accepting, closes sessions, and waits (up to the drain deadline) for tasks to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.hub.kill_all_sessions();
        self.tracker.close();
        if tokio::time::timeout(DRAIN_DEADLINE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some connections did not close within {DRAIN_DEADLINE:?}; exiting anyway"
            );
        }
    }
}

impl Drop for RunningHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| {
        let hint = match source.kind() {
            io::ErrorKind::AddrInUse => {
                "; another program (or another hub-emulator) uses this port: stop it, or pick another port with --mqtt-port/--https-port"
            }
            io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need privileges (e.g. sudo setcap 'cap_net_bind_service=+ep' on the binary)"
            }
            _ => "",
        };
        StartError::Bind { what, addr, hint, source }
    })
}

/// Both ports' budgets from `config`, fitted under the open-file limit (raised first).
fn connection_budgets(config: &Config) -> (ConnectionBudget, ConnectionBudget) {
    let mqtt = ConnectionBudget {
        admitted: config.max_mqtt_connections.max(1),
        pending: config.max_pending_mqtt_connections.max(1),
        evict_after: config.pending_eviction_age,
    };
    let https = ConnectionBudget {
        admitted: config.max_https_connections.max(1),
        pending: config.max_pending_https_connections.max(1),
        evict_after: config.pending_eviction_age,
    };
    let open_files = limits::raise_open_file_limit();
    let (mqtt, https, lowered) = limits::fit_budgets(mqtt, https, open_files);
    // The default budget (200,000 devices) is meant to be cut to the limit of an unprivileged
    // process, so that is no warning; a budget asked for and not granted is.
    let asked = config.max_mqtt_connections != crate::mqtt::MAX_CONNECTIONS;
    if lowered && asked {
        tracing::warn!(
            open_files = open_files.unwrap_or_default(),
            mqtt_sessions = mqtt.admitted,
            https_connections = https.admitted,
            "the open-file limit is too low for the configured connection budgets; they were \
             lowered to fit (raise the hard limit, e.g. `ulimit -Hn` or LimitNOFILE=, for more)"
        );
    } else if lowered {
        tracing::info!(
            open_files = open_files.unwrap_or_default(),
            mqtt_sessions = mqtt.admitted,
            https_connections = https.admitted,
            "connection budgets fitted to the open-file limit (raise the hard limit, e.g. \
             `ulimit -Hn` or LimitNOFILE=, for more devices)"
        );
    }
    (mqtt, https)
}

fn host_with_port(host: &str, port: u16, default_port: u16) -> String {
    if port == default_port {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

/// Opens the state, prepares TLS, binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<RunningHub, StartError> {
    if let Some(dir) = &config.data_dir {
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })?;
    }
    // The store first: it refuses a data directory another hub is using before anything in it
    // (certificates, hub.env) is rewritten.
    let store = match (&config.data_dir, config.durable) {
        (Some(dir), true) => store::Store::open(&dir.join("hub.db"))?,
        _ => store::Store::in_memory(),
    };
    let tls = tls::load_or_create(config.data_dir.as_deref(), &config.hostnames)?;
    let mut host_names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    host_names.extend(config.hostnames.iter().cloned());
    let hub = Hub::open(store, host_names)?;
    hub.telemetry().set_per_device(config.telemetry_ring);
    let dashboard = match &config.dashboard {
        Some(dashboard) => Some(dashboard::Dashboard::new(
            dashboard.token.clone(),
            hub.policy_permissions(dashboard::DASHBOARD_POLICY)
                .unwrap_or(hub_core::policy::Permissions::NONE),
        )?),
        None => None,
    };
    for (device_id, spec) in &config.faults {
        hub.set_fault(device_id, spec.clone())?;
    }
    if let Some(seed) = &config.seed {
        let max_configurations = hub::max_configurations_on(config.tier.map(|q| q.tier));
        let outcome = seed.apply(&hub, max_configurations).await?;
        tracing::info!(
            file = %seed.path().display(),
            created = outcome.created,
            updated = outcome.updated,
            unchanged = outcome.unchanged,
            configurations = seed.configuration_count(),
            "seed applied"
        );
    }

    let mqtt_listener = bind(
        "MQTT over TLS",
        SocketAddr::new(config.bind, config.mqtt_port),
    )
    .await?;
    let https_listener = bind("HTTPS", SocketAddr::new(config.bind, config.https_port)).await?;
    let mqtt_addr = mqtt_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "MQTT over TLS",
            addr: SocketAddr::new(config.bind, config.mqtt_port),
            hint: "",
            source,
        })?;
    let https_addr = https_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "HTTPS",
            addr: SocketAddr::new(config.bind, config.https_port),
            hint: "",
            source,
        })?;

    let (mqtt_budget, https_budget) = connection_budgets(&config);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (burst, backlog) = config.throttle_shaping;
    let throttles = config
        .tier
        .map_or_else(throttle::Throttles::unlimited, |quotas| {
            throttle::Throttles::shaped(quotas, burst, backlog)
        });
    let jobs = jobs::Jobs::open(hub.clone(), config.active_job_cap(), throttles.job_pace())?;
    jobs.spawn(shutdown.clone(), &tracker);
    hub.spawn_configurations(shutdown.clone(), &tracker);
    let acceptor = TlsAcceptor::from(tls.server_config.clone());
    tracker.spawn(mqtt::serve(
        mqtt_listener,
        acceptor.clone(),
        mqtt_budget,
        hub.clone(),
        throttles.clone(),
        shutdown.clone(),
        tracker.clone(),
    ));
    let router = http::router(http::AppState {
        body_read_timeout: config.body_read_timeout,
        throttles,
        dashboard: dashboard.clone(),
        ..http::AppState::new(hub.clone(), jobs.clone(), shutdown.clone(), tracker.clone())
    });
    tracker.spawn(http::serve(
        https_listener,
        acceptor,
        https_budget,
        router,
        shutdown.clone(),
        tracker.clone(),
    ));

    let owner = hub
        .policy_keys("iothubowner")
        .map(|k| k.primary_key)
        .unwrap_or_default();
    let device_key = hub
        .device_primary_key(hub::TUTORIAL_DEVICE_ID)
        .unwrap_or_default();
    let env = ConnectionInfo {
        service_connection_string: format!(
            "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey={owner}",
            host_with_port("localhost", https_addr.port(), 443)
        ),
        device_connection_string: format!(
            "HostName={};DeviceId={};SharedAccessKey={device_key}",
            host_with_port("localhost", mqtt_addr.port(), config::DEFAULT_MQTT_PORT),
            hub::TUTORIAL_DEVICE_ID
        ),
        ca_file: tls.ca_file.clone(),
        ca_pem: tls.ca_pem.clone(),
        tier: config.tier,
    };
    if let Some(dir) = &config.data_dir {
        let path = dir.join(hub_core::hub_env::FILE_NAME);
        write_secret_file(&path, &env.to_env_lines())
            .map_err(|source| StartError::Env { path, source })?;
    }
    let dashboard_url = dashboard.map(|dashboard| {
        format!(
            "https://localhost:{}{}",
            https_addr.port(),
            dashboard.login_path()
        )
    });
    Ok(RunningHub {
        mqtt_addr,
        https_addr,
        env,
        dashboard_url,
        hub,
        shutdown,
        tracker,
    })
}

/// Writes `contents` (connection strings with keys) to `path`, readable by its owner only.
///
/// The mode given to `open` applies only to a file it creates (std `OpenOptionsExt::mode`: "If a
/// new file is created as part of an `OpenOptions::open` call then this specified mode will be
/// used as the permission bits for the new file"), so a hub.env left from an earlier run or made
/// by hand with looser permissions is tightened to 0600 before the keys go in (project issue 13).
fn write_secret_file(path: &std::path::Path, contents: &str) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents.as_bytes())
    }
    #[cfg(not(unix))]
    {
        std::fs::write(path, contents)
    }
}

/// The binary's body: start, print what clients need, serve until `shutdown`, then drain.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let durable = config.durable;
    let data_dir = config.data_dir.clone();
    let tier = config.tier;
    let active_jobs = config.active_job_cap();
    let faults: Vec<String> = config
        .faults
        .iter()
        .map(|(device_id, spec)| format!("{device_id} ({})", spec.kind.name()))
        .collect();
    let running = start(config).await?;
    // These lines are the hub's interface to people and scripts: keep them stable.
    println!(
        "IOTHUB_CONNECTION_STRING={}",
        running.env.service_connection_string
    );
    println!(
        "IOTHUB_DEVICE_CONNECTION_STRING={}",
        running.env.device_connection_string
    );
    if let Some(ca) = &running.env.ca_file {
        println!("IOTHUB_CA_FILE={}", ca.display());
    }
    if let Some(dir) = &data_dir {
        println!(
            "# written to {} ({}); MQTT/TLS on {}, HTTPS on {}",
            dir.join("hub.env").display(),
            if durable {
                "state kept in hub.db"
            } else {
                "in memory: state is not kept"
            },
            running.mqtt_addr,
            running.https_addr
        );
    }
    match &tier {
        Some(quotas) if quotas.tier.is_basic() => println!(
            "# tier {quotas}: IoT Hub's throttles for it apply (bursts pass, then calls are \
             shaped, then refused with 429); twins, direct methods and jobs are refused with \
             403010, as a basic tier refuses them"
        ),
        Some(quotas) => println!(
            "# tier {quotas}: IoT Hub's throttles for it apply (bursts pass, then calls are \
             shaped, then refused with 429); active jobs at once: {active_jobs}"
        ),
        None => println!(
            "# no tier: IoT Hub's per-second throttles are not enforced (--tier S1 to enforce \
             them); active jobs at once: {active_jobs}"
        ),
    }
    if !faults.is_empty() {
        println!(
            "# faults injected (--fault): {}; list and clear them at /$emulator/faults (docs/faults.md)",
            faults.join(", ")
        );
    }
    if let Some(url) = &running.dashboard_url {
        // The token in it lets a browser act as iothubowner: it is printed for the person who
        // started the hub, like a notebook server's, and never logged.
        println!("# dashboard: {url}");
    }
    println!("hub-emulator ready");
    shutdown.cancelled().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
