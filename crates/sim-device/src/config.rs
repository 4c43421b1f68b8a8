//! Command-line flags and where the settings come from: flags, then environment variables, then
//! the local hub-emulator's `hub.env` (its default data directory, or `--hub-env`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use hub_core::connection_string::{
    ConnectionString, DeviceAuth, DeviceConnectionString, HostAddr, ServiceConnectionString,
};
use hub_core::device_client::{MIN_SAS_TTL, Transport};

use crate::SimError;

/// Environment variable with an extra CA (PEM file) to trust.
pub use hub_core::hub_env::ENV_CA_FILE;
/// Environment variable with the service connection string (fleet `--register`).
pub use hub_core::hub_env::ENV_CONNECTION_STRING as ENV_SERVICE_CONNECTION_STRING;
/// Environment variable with the device connection string (as in the Azure SDK samples).
pub use hub_core::hub_env::ENV_DEVICE_CONNECTION_STRING;

/// The tutorial's simulated device: answers the `lockDoor` direct method and logs desired-property
/// updates, acknowledging them in reported properties. Runs one device, or a fleet in one process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "sim-device",
    version,
    after_help = "Examples:
  sim-device                                   # the local hub-emulator's device, from its hub.env
  IOTHUB_DEVICE_CONNECTION_STRING='HostName=myhub.azure-devices.net;DeviceId=myDeviceId;SharedAccessKey=...' sim-device
  sim-device --ca-file ./hub/ca.pem --hub-env ./hub/hub.env
  sim-device --count 1000 --register           # 1000 devices (simDevice-1..1000), created if missing
  sim-device --count 50 --id-prefix door- --register -v   # a line per event besides the summaries
  IOTHUB_CONNECTION_STRING='HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=...' \\
    sim-device --count 100 --register          # a fleet needs only the hub's service connection string

Configuration, first found wins: flags; IOTHUB_DEVICE_CONNECTION_STRING, IOTHUB_CA_FILE and
IOTHUB_CONNECTION_STRING; the hub-emulator's hub.env (by default
~/.local/share/iothub-emulator/hub.env, or --hub-env PATH). Status goes to stdout, logs
(RUST_LOG) to stderr."
)]
pub struct Args {
    /// Device connection string (HostName=..;DeviceId=..;SharedAccessKey=..).
    /// Prefer the environment variable: flags end up in shell history.
    #[arg(long, value_name = "CS", env = ENV_DEVICE_CONNECTION_STRING, hide_env_values = true)]
    pub connection_string: Option<String>,
    /// Extra CA certificate (PEM) to trust besides the platform roots, e.g. the hub-emulator's ca.pem.
    #[arg(long, value_name = "PEM", env = ENV_CA_FILE, hide_env_values = true)]
    pub ca_file: Option<PathBuf>,
    /// The hub-emulator's hub.env to read settings from [default: DATA_DIR/iothub-emulator/hub.env].
    #[arg(long, value_name = "PATH")]
    pub hub_env: Option<PathBuf>,
    /// Service connection string, for --count (device keys) and --register.
    #[arg(long, value_name = "CS", env = ENV_SERVICE_CONNECTION_STRING, hide_env_values = true)]
    pub service_connection_string: Option<String>,
    /// Run N devices in this process, one MQTT connection each (ids: PREFIX1..PREFIXN).
    #[arg(long, value_name = "N")]
    pub count: Option<usize>,
    /// Device id prefix for --count.
    #[arg(long, value_name = "P", default_value = "simDevice-")]
    pub id_prefix: String,
    /// Create fleet devices that do not exist yet, 100 per bulk registry call (needs a service
    /// connection string with registry write).
    #[arg(long, requires = "count")]
    pub register: bool,
    /// MQTT over WebSocket (port 443 unless the host names one) instead of MQTT over TLS (8883).
    /// hub-emulator serves it on its HTTPS port: run it with --https-port 443, or name the port
    /// in HostName.
    #[arg(long)]
    pub websocket: bool,
    /// Give up if the hub cannot be reached within this time (e.g. 30s, 2m, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Lifetime of the SAS tokens minted from the device key (each device of a fleet too), at
    /// least 5s. Each token is renewed by reconnecting before it expires: 20% of the lifetime
    /// ahead, or 2 minutes, whichever is earlier (half the lifetime for very short ones).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub sas_ttl: Duration,
    /// How often the fleet prints its summary line.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub summary_interval: Duration,
    /// Print a line per event in fleet mode too.
    #[arg(short, long)]
    pub verbose: bool,
}

pub use hub_core::duration::parse as parse_duration;

/// A fleet of devices in one process.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// How many.
    pub count: usize,
    /// Id prefix; ids are `{prefix}{1..=count}`.
    pub id_prefix: String,
    /// Create missing identities.
    pub register: bool,
}

impl Fleet {
    /// The device ids.
    pub fn device_ids(&self) -> impl Iterator<Item = String> + '_ {
        (1..=self.count).map(|i| format!("{}{i}", self.id_prefix))
    }
}

/// Everything [`crate::run`] needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// The device (or, in fleet mode, the hub address and gateway to use).
    pub connection_string: DeviceConnectionString,
    /// Extra CA to trust.
    pub ca_file: Option<PathBuf>,
    /// Extra CA as PEM text (in-process tests).
    pub ca_pem: Option<String>,
    /// Service connection string (fleet mode).
    pub service_connection_string: Option<ServiceConnectionString>,
    /// Fleet mode.
    pub fleet: Option<Fleet>,
    /// MQTT over TLS or WebSocket.
    pub transport: Transport,
    /// Connect budget.
    pub connect_timeout: Duration,
    /// Lifetime of minted SAS tokens.
    pub sas_ttl: Duration,
    /// Fleet summary period.
    pub summary_interval: Duration,
    /// A line per event even in fleet mode.
    pub verbose: bool,
    /// Where settings came from, told to the user in one line (e.g. the hub.env path).
    pub source_note: Option<String>,
    /// Written before every line this run prints (empty for the binary; the one-process tutorial
    /// uses it to tell the device's output from the job service's).
    pub label: String,
}

impl Config {
    /// A single device with defaults (tests and examples).
    pub fn new(connection_string: DeviceConnectionString) -> Config {
        Config {
            connection_string,
            ca_file: None,
            ca_pem: None,
            service_connection_string: None,
            fleet: None,
            transport: Transport::Mqtt,
            connect_timeout: Duration::from_secs(30),
            sas_ttl: Duration::from_secs(3600),
            summary_interval: Duration::from_secs(10),
            verbose: false,
            source_note: None,
            label: String::new(),
        }
    }

    /// Resolves flags, environment (already folded in by clap) and hub.env.
    pub fn from_args(args: Args) -> Result<Config, SimError> {
        let explicit_env = args.hub_env.is_some();
        let env_path = args.hub_env.clone().or_else(default_hub_env);
        let need_env = explicit_env
            || args.connection_string.is_none()
            || (args.count.is_some() && args.service_connection_string.is_none());
        let hub_env = match (&env_path, need_env) {
            (Some(path), true) if explicit_env || path.exists() => Some(HubEnvFile::read(path)?),
            _ => None,
        };

        let service_text = args.service_connection_string.clone().or_else(|| {
            hub_env
                .as_ref()
                .and_then(|e| e.settings.service_connection_string.clone())
        });
        let service_connection_string = match service_text {
            Some(text) => Some(parse_service_cs(&text)?),
            None => None,
        };
        // hub.env's device connection string belongs to the local hub: a fleet given its own
        // service connection string (flag or variable) goes to that string's hub instead.
        let fleet_of_given_service =
            args.count.is_some() && args.service_connection_string.is_some() && !explicit_env;
        let device_text = args.connection_string.clone().or_else(|| {
            hub_env
                .as_ref()
                .filter(|_| !fleet_of_given_service)
                .and_then(|e| e.settings.device_connection_string.clone())
        });
        // A fleet only needs the hub's host from a device connection string (each device's key
        // comes from the registry), so a user of a real hub who has only its service connection
        // string, as the Azure portal gives it, can run one: the devices connect to the same
        // host on MQTT's own port.
        let fleet_host_only = args.count.is_some() && device_text.is_none();
        let mut note = None;
        let connection_string = match (&service_connection_string, fleet_host_only) {
            (Some(service), true) => fleet_base(service)?,
            _ => {
                let (cs_text, cs_origin) = match (&args.connection_string, &hub_env) {
                    (Some(cs), _) => (
                        cs.clone(),
                        "--connection-string / IOTHUB_DEVICE_CONNECTION_STRING".to_owned(),
                    ),
                    (None, Some(env)) => match &env.settings.device_connection_string {
                        Some(cs) => {
                            note = Some(format!(
                                "using the local hub-emulator's settings from {}",
                                env.path.display()
                            ));
                            (cs.clone(), env.path.display().to_string())
                        }
                        None => {
                            return Err(SimError::HubEnv {
                                path: env.path.clone(),
                                reason: format!("it has no {ENV_DEVICE_CONNECTION_STRING} line"),
                            });
                        }
                    },
                    (None, None) => return Err(SimError::NotConfigured { hub_env: env_path }),
                };
                parse_device_cs(&cs_text, &cs_origin)?
            }
        };

        // The CA from hub.env only goes with hub.env's own hub: a user-supplied connection
        // string for Azure must not silently trust the emulator's CA.
        let ca_file = args.ca_file.clone().or_else(|| {
            hub_env
                .as_ref()
                .filter(|_| args.connection_string.is_none() || explicit_env)
                .and_then(|e| e.settings.ca_file.clone())
        });
        let fleet = match args.count {
            Some(0) => return Err(SimError::Usage("--count must be at least 1".into())),
            Some(count) => Some(Fleet {
                count,
                id_prefix: args.id_prefix.clone(),
                register: args.register,
            }),
            None => None,
        };
        if args.sas_ttl < MIN_SAS_TTL {
            return Err(SimError::Usage(format!(
                "--sas-ttl must be at least {}s: a token must outlive the reconnect that renews it",
                MIN_SAS_TTL.as_secs()
            )));
        }
        if fleet.is_some() && service_connection_string.is_none() {
            return Err(SimError::Usage(format!(
                "--count needs a service connection string to look up (or, with --register, create) the devices' keys: \
                 set {ENV_SERVICE_CONNECTION_STRING} or pass --service-connection-string"
            )));
        }
        Ok(Config {
            connection_string,
            ca_file,
            ca_pem: None,
            service_connection_string,
            fleet,
            transport: if args.websocket {
                Transport::MqttWebSocket
            } else {
                Transport::Mqtt
            },
            connect_timeout: args.connect_timeout,
            sas_ttl: args.sas_ttl,
            summary_interval: args.summary_interval.max(Duration::from_millis(100)),
            verbose: args.verbose,
            source_note: note,
            label: String::new(),
        })
    }
}

/// The connection string a fleet's devices share when only the service connection string is
/// known: the service's host (without an HTTPS port; MQTT uses its own) and no secret, since
/// each device's key is looked up in the registry ([`crate::run`] replaces id and key).
fn fleet_base(service: &ServiceConnectionString) -> Result<DeviceConnectionString, SimError> {
    let host =
        HostAddr::new(service.host_name.host(), None).map_err(|e| SimError::ConnectionString {
            origin: "the service connection string (IOTHUB_CONNECTION_STRING)".to_owned(),
            reason: e.to_string(),
        })?;
    Ok(DeviceConnectionString {
        host_name: host,
        device_id: String::new(),
        module_id: None,
        auth: DeviceAuth::X509,
        gateway_host_name: None,
    })
}

fn parse_device_cs(text: &str, origin: &str) -> Result<DeviceConnectionString, SimError> {
    match ConnectionString::from_str(text.trim()) {
        Ok(ConnectionString::Device(cs)) => Ok(cs),
        Ok(ConnectionString::Service(_)) => Err(SimError::ConnectionString {
            origin: origin.to_owned(),
            reason: "this is a service (policy) connection string; a device needs HostName=..;DeviceId=..;SharedAccessKey=..".into(),
        }),
        Err(e) => Err(SimError::ConnectionString { origin: origin.to_owned(), reason: e.to_string() }),
    }
}

fn parse_service_cs(text: &str) -> Result<ServiceConnectionString, SimError> {
    let origin = "the service connection string (IOTHUB_CONNECTION_STRING)".to_owned();
    match ConnectionString::from_str(text.trim()) {
        Ok(ConnectionString::Service(cs)) => Ok(cs),
        Ok(ConnectionString::Device(_)) => Err(SimError::ConnectionString {
            origin,
            reason: "this is a device connection string; --register needs HostName=..;SharedAccessKeyName=..;SharedAccessKey=..".into(),
        }),
        Err(e) => Err(SimError::ConnectionString { origin, reason: e.to_string() }),
    }
}

/// `DATA_DIR/iothub-emulator/hub.env`, where the hub-emulator writes it by default.
pub fn default_hub_env() -> Option<PathBuf> {
    hub_core::hub_env::default_path()
}

/// The `KEY=value` file the hub-emulator writes, and where it was read from.
/// (`Debug` hides the connection strings: they carry keys.)
#[derive(Debug, Clone, Default)]
pub struct HubEnvFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// What it says.
    pub settings: hub_core::hub_env::HubEnv,
}

impl HubEnvFile {
    /// Reads and parses the file.
    pub fn read(path: &Path) -> Result<HubEnvFile, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::HubEnv {
            path: path.to_owned(),
            reason: format!("{e}; start hub-emulator (it writes this file) or pass --hub-env PATH"),
        })?;
        Ok(HubEnvFile::parse(path, &text))
    }

    /// Parses `KEY=value` lines (see [`hub_core::hub_env::HubEnv::parse`]).
    pub fn parse(path: &Path, text: &str) -> HubEnvFile {
        HubEnvFile {
            path: path.to_owned(),
            settings: hub_core::hub_env::HubEnv::parse(text, path.parent()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn a_fleet_needs_only_the_service_connection_string_of_its_hub() {
        let args = Args::try_parse_from([
            "sim-device",
            "--count",
            "3",
            "--service-connection-string",
            "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5",
        ])
        .expect("flags parse");
        let config = Config::from_args(args).expect("a fleet from the service connection string");
        assert_eq!(
            config.connection_string.host_name.to_string(),
            "myhub.azure-devices.net"
        );
        assert_eq!(config.connection_string.host_name.port(), None);
        assert_eq!(config.fleet.map(|f| f.count), Some(3));
        assert!(config.service_connection_string.is_some());

        // One device still needs its own connection string.
        let args = Args::try_parse_from([
            "sim-device",
            "--hub-env",
            "/nonexistent/hub.env",
            "--service-connection-string",
            "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5",
        ])
        .expect("flags parse");
        assert!(Config::from_args(args).is_err());
    }

    #[test]
    fn hub_env_lines() {
        let env = HubEnvFile::parse(
            Path::new("/data/hub.env"),
            "# comment\nIOTHUB_CONNECTION_STRING=HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5==\n\
             IOTHUB_DEVICE_CONNECTION_STRING=HostName=localhost;DeviceId=myDeviceId;SharedAccessKey=a2V5\nIOTHUB_CA_FILE=ca.pem\n",
        );
        assert_eq!(
            env.settings.service_connection_string.as_deref(),
            Some("HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5==")
        );
        assert!(env.settings.device_connection_string.is_some());
        assert_eq!(env.settings.ca_file, Some(PathBuf::from("/data/ca.pem")));
    }
}
