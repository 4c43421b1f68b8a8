//! The local hub-emulator's `hub.env`: the `KEY=value` lines that tell our tools (and people)
//! how to reach a local hub, and where it is written by default.
//!
//! Pure text handling; reading and writing the file is the caller's business.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::tier::{Quotas, Tier};

/// The variable holding the service (policy) connection string, as the Azure SDK samples name it.
pub const ENV_CONNECTION_STRING: &str = "IOTHUB_CONNECTION_STRING";
/// The variable holding the device connection string.
pub const ENV_DEVICE_CONNECTION_STRING: &str = "IOTHUB_DEVICE_CONNECTION_STRING";
/// The variable holding the path of an extra CA certificate (PEM) to trust.
pub const ENV_CA_FILE: &str = "IOTHUB_CA_FILE";
/// The variable holding the hub's tier (`F1`, `S1`, ...), written by an emulator started with
/// `--tier`; for a real hub, users set it themselves (our tools cannot ask Azure).
pub const ENV_TIER: &str = "IOTHUB_TIER";
/// The variable holding the tier's unit count (1 when absent).
pub const ENV_UNITS: &str = "IOTHUB_UNITS";
/// The file's name inside the hub's data directory.
pub const FILE_NAME: &str = "hub.env";
/// The hub's data directory name inside the user's data directory.
pub const DATA_DIR_NAME: &str = "iothub-emulator";

/// The hub-emulator's default data directory: `$XDG_DATA_HOME/iothub-emulator` (usually
/// `~/.local/share/iothub-emulator`) or the platform's equivalent.
pub fn default_data_dir() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join(DATA_DIR_NAME))
}

/// Where the hub-emulator writes `hub.env` by default.
pub fn default_path() -> Option<PathBuf> {
    default_data_dir().map(|d| d.join(FILE_NAME))
}

/// The settings a `hub.env` holds. `Debug` hides the connection strings (they carry keys).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HubEnv {
    /// `IOTHUB_CONNECTION_STRING`.
    pub service_connection_string: Option<String>,
    /// `IOTHUB_DEVICE_CONNECTION_STRING`.
    pub device_connection_string: Option<String>,
    /// `IOTHUB_CA_FILE`.
    pub ca_file: Option<PathBuf>,
    /// `IOTHUB_TIER` with `IOTHUB_UNITS`: the hub's tier, when it throttles as one.
    pub tier: Option<Quotas>,
}

impl fmt::Debug for HubEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("HubEnv")
            .field(
                "service_connection_string",
                &shown(&self.service_connection_string),
            )
            .field(
                "device_connection_string",
                &shown(&self.device_connection_string),
            )
            .field("ca_file", &self.ca_file)
            .field("tier", &self.tier)
            .finish()
    }
}

impl HubEnv {
    /// Parses `KEY=value` lines (split at the first `=`; values may be wrapped in quotes;
    /// `export ` prefixes, blank lines, `#` comments and unknown keys are ignored). A relative
    /// `IOTHUB_CA_FILE` is taken relative to `dir`, the file's directory. A tier or unit count
    /// that does not parse counts as absent, like an unknown key: the tier only informs
    /// predictions, and a tool that lacks it says how to give it.
    pub fn parse(text: &str, dir: Option<&Path>) -> HubEnv {
        let mut env = HubEnv::default();
        let (mut tier, mut units) = (None, None);
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            if value.is_empty() {
                continue;
            }
            match key.trim().trim_start_matches("export ").trim() {
                ENV_CONNECTION_STRING => env.service_connection_string = Some(value.to_owned()),
                ENV_DEVICE_CONNECTION_STRING => {
                    env.device_connection_string = Some(value.to_owned());
                }
                ENV_CA_FILE => {
                    let ca = PathBuf::from(value);
                    env.ca_file = Some(match dir {
                        Some(dir) if ca.is_relative() => dir.join(ca),
                        _ => ca,
                    });
                }
                ENV_TIER => tier = value.parse::<Tier>().ok(),
                ENV_UNITS => units = value.parse::<u32>().ok(),
                _ => {}
            }
        }
        env.tier = tier.and_then(|t| t.with_units(units.unwrap_or(1)).ok());
        env
    }

    /// The file's text: one `KEY=value` line per setting that is present.
    pub fn to_lines(&self) -> String {
        let mut text = String::new();
        if let Some(cs) = &self.service_connection_string {
            text.push_str(&format!("{ENV_CONNECTION_STRING}={cs}\n"));
        }
        if let Some(cs) = &self.device_connection_string {
            text.push_str(&format!("{ENV_DEVICE_CONNECTION_STRING}={cs}\n"));
        }
        if let Some(ca) = &self.ca_file {
            text.push_str(&format!("{ENV_CA_FILE}={}\n", ca.display()));
        }
        if let Some(quotas) = &self.tier {
            text.push_str(&format!("{ENV_TIER}={}\n", quotas.tier));
            text.push_str(&format!("{ENV_UNITS}={}\n", quotas.units));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str =
        "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VydmljZQ==";
    const DEVICE: &str = "HostName=localhost;DeviceId=myDeviceId;SharedAccessKey=ZGV2aWNl";

    #[test]
    fn round_trips_what_the_emulator_writes() {
        let env = HubEnv {
            service_connection_string: Some(SERVICE.into()),
            device_connection_string: Some(DEVICE.into()),
            ca_file: Some(PathBuf::from("/data/ca.pem")),
            tier: Some(Tier::S3.with_units(2).expect("S3")),
        };
        let text = env.to_lines();
        assert!(text.contains("IOTHUB_TIER=S3\nIOTHUB_UNITS=2\n"), "{text}");
        assert_eq!(HubEnv::parse(&text, None), env);
    }

    #[test]
    fn no_tier_writes_no_tier_lines_and_bad_ones_count_as_absent() {
        let env = HubEnv {
            service_connection_string: Some(SERVICE.into()),
            ..HubEnv::default()
        };
        assert!(!env.to_lines().contains(ENV_TIER));
        assert_eq!(
            HubEnv::parse("IOTHUB_TIER=s1\n", None).tier,
            Some(Tier::S1.with_units(1).expect("S1"))
        );
        for bad in [
            "IOTHUB_TIER=S4",
            "IOTHUB_TIER=F1\nIOTHUB_UNITS=2",
            "IOTHUB_UNITS=2",
        ] {
            assert_eq!(HubEnv::parse(bad, None).tier, None, "{bad}");
        }
    }

    #[test]
    fn tolerates_what_people_write() {
        let text = format!(
            "# local hub\n\nexport IOTHUB_CONNECTION_STRING=\"{SERVICE}\"\nIOTHUB_DEVICE_CONNECTION_STRING='{DEVICE}'\nIOTHUB_CA_FILE=ca.pem\nOTHER=1\nnot a pair\nIOTHUB_CA_FILE_X=\n"
        );
        let env = HubEnv::parse(&text, Some(Path::new("/hub")));
        assert_eq!(env.service_connection_string.as_deref(), Some(SERVICE));
        assert_eq!(env.device_connection_string.as_deref(), Some(DEVICE));
        assert_eq!(env.ca_file, Some(PathBuf::from("/hub/ca.pem")));
    }

    #[test]
    fn empty_values_count_as_absent_and_debug_hides_keys() {
        let env = HubEnv::parse("IOTHUB_CONNECTION_STRING=\n", None);
        assert_eq!(env, HubEnv::default());
        let shown = format!(
            "{:?}",
            HubEnv::parse(&format!("IOTHUB_CONNECTION_STRING={SERVICE}"), None)
        );
        assert!(!shown.contains("c2VydmljZQ"), "{shown}");
    }
}
