//! The emulator's settings: command-line flags and where its data lives.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::Parser;

/// The MQTT/TLS port every IoT Hub device SDK uses.
pub const DEFAULT_MQTT_PORT: u16 = 8883;
/// The HTTPS port for the service API (443 needs privileges; Python and our tools take a port).
pub const DEFAULT_HTTPS_PORT: u16 = 8443;
/// Concurrent active jobs allowed by default: IoT Hub's S3 tier.
pub const DEFAULT_MAX_ACTIVE_JOBS: usize = 10;

/// A local Azure IoT Hub: device MQTT (TLS and WebSocket), the service REST API, the query
/// language and Jobs v2, with durable state.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hub-emulator",
    version,
    after_help = "Examples:
  hub-emulator                              # 127.0.0.1, MQTT on 8883, HTTPS on 8443
  hub-emulator --https-port 443             # for clients that cannot take a port (Node service SDK)
  hub-emulator --data-dir ./hub --hostname myhub.azure-devices.net
  hub-emulator --in-memory --mqtt-port 0 --https-port 0   # throwaway hub on free ports
  hub-emulator --fault dev1=offline,for=30s --fault dev2=slow:2s   # misbehaving devices
  hub-emulator --seed devices.json          # devices, keys, tags and desired properties from a file

Then, in other terminals: sim-device, and schedule-job. With the default data directory they
find the hub by themselves (through its hub.env, rewritten at every start, --in-memory too);
with --data-dir DIR, give them --hub-env DIR/hub.env. Logs: RUST_LOG (e.g. RUST_LOG=debug)."
)]
pub struct Args {
    /// Where the hub keeps its keys, CA, registry, twins and jobs
    /// [default: the user's data directory, e.g. ~/.local/share/iothub-emulator].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep the registry, twins and jobs in memory only (throwaway runs); the CA and hub.env
    /// are still written to the data directory.
    #[arg(long)]
    pub in_memory: bool,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub bind: IpAddr,
    /// MQTT over TLS port (0 picks a free one).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MQTT_PORT)]
    pub mqtt_port: u16,
    /// HTTPS port for the service API and MQTT over WebSocket (0 picks a free one).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_HTTPS_PORT)]
    pub https_port: u16,
    /// Extra host names clients may use (added to the certificate and accepted in SAS
    /// audiences); repeat it for several.
    #[arg(long = "hostname", value_name = "NAME")]
    pub hostnames: Vec<String>,
    /// How many jobs may be active at once [default: the tier's (1 on F1 and S1, 5 on S2, 10
    /// on S3), or 10 without --tier].
    #[arg(long, value_name = "N")]
    pub max_active_jobs: Option<usize>,
    /// Behave as an IoT Hub of this tier: F1, B1, B2, B3, S1, S2 or S3 (its throttles and job
    /// cap). Without it, no per-second throttles apply.
    #[arg(long, value_name = "TIER")]
    pub tier: Option<hub_core::tier::Tier>,
    /// Units of the tier (F1 has exactly one).
    #[arg(long, value_name = "N", default_value_t = 1, requires = "tier")]
    pub units: u32,
    /// How much of a throttle's rate passes at once before shaping starts, e.g. `1s` [default:
    /// 60s, IoT Hub's minute ranges]. Shrink it to reach shaping and 429s with a handful of
    /// calls in your own tests.
    #[arg(long, value_name = "DURATION", requires = "tier", value_parser = hub_core::duration::parse)]
    pub throttle_burst: Option<std::time::Duration>,
    /// How long shaped calls may queue before they are refused with 429, e.g. `0s` [default:
    /// 10s].
    #[arg(long, value_name = "DURATION", requires = "tier", value_parser = hub_core::duration::parse)]
    pub throttle_backlog: Option<std::time::Duration>,
    /// Most devices connected over MQTT/TLS at once; beyond it a device gets CONNACK 3 and
    /// retries [default: 200,000, lowered at start to fit the open-file limit].
    #[arg(long, value_name = "N")]
    pub max_device_connections: Option<usize>,
    /// Make a device misbehave from the start, for your own tests' error paths (repeat it for
    /// several devices): DEVICE=slow:DELAY, DEVICE=offline, DEVICE=failing:STATUS[,method=NAME]
    /// or DEVICE=twin-throttled, each with an optional ,for=DURATION (default: until cleared
    /// with DELETE /$emulator/faults/DEVICE). See docs/faults.md.
    #[arg(long = "fault", value_name = "DEVICE=KIND[:ARG][,for=DURATION]", value_parser = crate::faults::parse_flag)]
    pub faults: Vec<(String, crate::faults::FaultSpec)>,
    /// Do not serve the dashboard (the web page at https://localhost:8443/).
    #[arg(long)]
    pub no_dashboard: bool,
    /// The dashboard's token, instead of a random one per start (16-128 letters, digits, - or
    /// _). Anyone with it can act as iothubowner through the page: keep it as secret as a key.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HUB_DASHBOARD_TOKEN",
        hide_env_values = true
    )]
    pub dashboard_token: Option<String>,
    /// How many recent telemetry messages each device keeps for the dashboard and for
    /// GET /$emulator/devices/{id}/messages (0 keeps none; bodies are kept up to 1 KiB).
    #[arg(long, value_name = "N", default_value_t = crate::telemetry::DEFAULT_PER_DEVICE)]
    pub telemetry_ring: usize,
    /// Devices (id, status, keys, tags, desired properties) to create or bring up to date at
    /// every start, from a JSON file; a restart with the same file changes nothing. See
    /// docs/seed.md.
    #[arg(long, value_name = "FILE")]
    pub seed: Option<PathBuf>,
}

/// The default data directory: `$XDG_DATA_HOME/iothub-emulator` or its platform equivalent.
pub fn default_data_dir() -> Option<PathBuf> {
    hub_core::hub_env::default_data_dir()
}

/// Everything `start` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where keys, CA and hub.env are written (None: nothing is written at all).
    pub data_dir: Option<PathBuf>,
    /// Whether the registry, twins and jobs persist in `data_dir`.
    pub durable: bool,
    /// Listen address.
    pub bind: IpAddr,
    /// MQTT/TLS port (0 = any free port).
    pub mqtt_port: u16,
    /// HTTPS port (0 = any free port).
    pub https_port: u16,
    /// Extra host names.
    pub hostnames: Vec<String>,
    /// Active job cap, if set apart from the tier's ([`Config::active_job_cap`]).
    pub max_active_jobs: usize,
    /// The tier and units whose throttles apply (None: no throttles).
    pub tier: Option<hub_core::tier::Quotas>,
    /// How much of a throttle's rate passes at once, and how long shaped requests may queue
    /// (defaults [`crate::throttle::BURST`], [`crate::throttle::BACKLOG`]; tests shrink them).
    pub throttle_shaping: (std::time::Duration, std::time::Duration),
    /// Most authenticated MQTT-over-TLS sessions held at once (default
    /// [`crate::mqtt::MAX_CONNECTIONS`]); beyond it a device gets CONNACK 3 and retries. Lowered
    /// at start to fit the open-file limit. Tests set it small.
    pub max_mqtt_connections: usize,
    /// Most MQTT-over-TLS connections not authenticated yet (default
    /// [`crate::mqtt::MAX_PENDING_CONNECTIONS`]); beyond it the oldest is closed.
    pub max_pending_mqtt_connections: usize,
    /// Most authenticated HTTPS connections held at once, MQTT-over-WebSocket sessions included
    /// (default [`crate::http::MAX_CONNECTIONS`]); beyond it requests are answered and their
    /// connection closed.
    pub max_https_connections: usize,
    /// Most HTTPS connections not authenticated yet (default
    /// [`crate::http::MAX_PENDING_CONNECTIONS`]); beyond it the oldest is closed.
    pub max_pending_https_connections: usize,
    /// How long a connection that has not authenticated is safe from eviction when the pending
    /// budget is full (default [`crate::PENDING_EVICTION_AGE`]).
    pub pending_eviction_age: std::time::Duration,
    /// How long an authenticated REST request's body may take to arrive (default
    /// [`crate::http::BODY_READ_TIMEOUT`]). Tests set it short.
    pub body_read_timeout: std::time::Duration,
    /// Faults injected at start (`--fault`), by device id; their `for` counts from the start.
    pub faults: Vec<(String, crate::faults::FaultSpec)>,
    /// The seed file (`--seed`), read and checked; applied by `start` once the state is open.
    pub seed: Option<crate::seed::Seed>,
    /// The dashboard (None: not served).
    pub dashboard: Option<DashboardConfig>,
    /// Recent telemetry messages kept per device ([`crate::telemetry`]).
    pub telemetry_ring: usize,
}

/// How the dashboard is served.
#[derive(Debug, Clone, Default)]
pub struct DashboardConfig {
    /// Its token (None: random per start).
    pub token: Option<String>,
}

impl Config {
    /// An in-memory hub on free loopback ports that writes nothing (tests, examples).
    pub fn ephemeral() -> Config {
        Config {
            data_dir: None,
            durable: false,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mqtt_port: 0,
            https_port: 0,
            hostnames: Vec::new(),
            max_active_jobs: DEFAULT_MAX_ACTIVE_JOBS,
            tier: None,
            throttle_shaping: (crate::throttle::BURST, crate::throttle::BACKLOG),
            max_mqtt_connections: crate::mqtt::MAX_CONNECTIONS,
            max_pending_mqtt_connections: crate::mqtt::MAX_PENDING_CONNECTIONS,
            max_https_connections: crate::http::MAX_CONNECTIONS,
            max_pending_https_connections: crate::http::MAX_PENDING_CONNECTIONS,
            pending_eviction_age: crate::listener::PENDING_EVICTION_AGE,
            body_read_timeout: crate::http::BODY_READ_TIMEOUT,
            faults: Vec::new(),
            dashboard: Some(DashboardConfig::default()),
            telemetry_ring: crate::telemetry::DEFAULT_PER_DEVICE,
            seed: None,
        }
    }

    /// How many jobs may be active at once: `max_active_jobs`, at least one (`--max-active-jobs
    /// 0` would refuse every job with a 429 that no wait can clear).
    pub fn active_job_cap(&self) -> usize {
        self.max_active_jobs.max(1)
    }
}

impl TryFrom<Args> for Config {
    type Error = String;

    fn try_from(args: Args) -> Result<Config, String> {
        let data_dir = match args.data_dir {
            // Absolute, so that hub.env's IOTHUB_CA_FILE works from any directory.
            Some(dir) => std::path::absolute(&dir)
                .map_err(|e| format!("--data-dir {}: {e}", dir.display()))?,
            None => default_data_dir().ok_or(
                "cannot tell where the user's data directory is; pass --data-dir DIR".to_owned(),
            )?,
        };
        for name in &args.hostnames {
            if name.is_empty() || name.contains(['/', ' ', ':']) {
                return Err(format!(
                    "--hostname `{name}` is not a host name (no port, path or spaces)"
                ));
            }
        }
        // Read and checked before anything is opened, so a bad file is a usage error that
        // leaves the data directory as it was.
        let seed = match &args.seed {
            Some(path) => Some(crate::seed::Seed::load(path).map_err(|e| e.to_string())?),
            None => None,
        };
        let tier = match args.tier {
            Some(tier) => Some(
                tier.with_units(args.units)
                    .map_err(|e| format!("--units: {e}"))?,
            ),
            None => None,
        };
        Ok(Config {
            data_dir: Some(data_dir),
            durable: !args.in_memory,
            bind: args.bind,
            mqtt_port: args.mqtt_port,
            https_port: args.https_port,
            hostnames: args.hostnames,
            max_active_jobs: args
                .max_active_jobs
                .or(tier.map(|q| q.max_active_jobs()))
                .unwrap_or(DEFAULT_MAX_ACTIVE_JOBS),
            tier,
            throttle_shaping: (
                args.throttle_burst.unwrap_or(crate::throttle::BURST),
                args.throttle_backlog.unwrap_or(crate::throttle::BACKLOG),
            ),
            max_mqtt_connections: crate::mqtt::MAX_CONNECTIONS,
            max_pending_mqtt_connections: crate::mqtt::MAX_PENDING_CONNECTIONS,
            max_https_connections: crate::http::MAX_CONNECTIONS,
            max_pending_https_connections: crate::http::MAX_PENDING_CONNECTIONS,
            pending_eviction_age: crate::listener::PENDING_EVICTION_AGE,
            body_read_timeout: crate::http::BODY_READ_TIMEOUT,
            faults: args.faults,
            dashboard: (!args.no_dashboard).then_some(DashboardConfig {
                token: args.dashboard_token,
            }),
            telemetry_ring: args.telemetry_ring,
            seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultKind;

    #[test]
    fn fault_flags_reach_the_config() {
        let args = Args::try_parse_from([
            "hub-emulator",
            "--data-dir",
            "/tmp/hub-emulator-config-test",
            "--fault",
            "dev1=offline,for=30s",
            "--fault",
            "dev2=slow:250ms",
        ])
        .expect("flags parse");
        let config = Config::try_from(args).expect("config");
        let faults: Vec<(&str, &FaultKind, Option<std::time::Duration>)> = config
            .faults
            .iter()
            .map(|(id, spec)| (id.as_str(), &spec.kind, spec.lasts))
            .collect();
        assert_eq!(
            faults,
            [
                (
                    "dev1",
                    &FaultKind::Offline,
                    Some(std::time::Duration::from_secs(30))
                ),
                (
                    "dev2",
                    &FaultKind::Slow {
                        delay: std::time::Duration::from_millis(250)
                    },
                    None
                ),
            ]
        );
    }

    #[test]
    fn a_bad_fault_flag_is_refused_with_its_problem() {
        let error =
            Args::try_parse_from(["hub-emulator", "--fault", "dev1=sleepy"]).expect_err("refused");
        assert!(
            error.to_string().contains("unknown fault kind `sleepy`"),
            "{error}"
        );
    }
}
