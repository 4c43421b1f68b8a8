//! Where the hub is: connection string and CA from flags, environment, or the local
//! hub-emulator's `hub.env`, in that order.

use std::path::{Path, PathBuf};

use hub_core::connection_string::ServiceConnectionString;
use hub_core::service_client::ServiceClient;
use hub_core::tier::{Quotas, Tier};

use crate::cli::HubArgs;
use crate::error::Error;

pub use hub_core::hub_env::{ENV_CA_FILE, ENV_CONNECTION_STRING, ENV_TIER, ENV_UNITS};

/// The resolved settings.
#[derive(Debug)]
pub struct HubSettings {
    /// The parsed connection string.
    pub connection: ServiceConnectionString,
    /// Extra CA file, if any.
    pub ca_file: Option<PathBuf>,
    /// Where the settings came from, said once on stderr.
    pub origin: String,
    /// Whether the connection string came from the hub-emulator's hub.env.
    pub from_hub_env: bool,
    /// The hub's tier, when known.
    pub tier: Option<KnownTier>,
}

/// A hub's tier and who said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownTier {
    /// The tier with its units.
    pub quotas: Quotas,
    /// `--tier`, `IOTHUB_TIER` or the hub.env file.
    pub origin: String,
}

/// Where the connection string was found.
struct Source {
    text: String,
    ca_file: Option<PathBuf>,
    origin: String,
    /// hub.env's tier; `None` for the other sources (or a hub.env without one).
    hub_env_tier: Option<Option<Quotas>>,
}

/// The local hub-emulator's hub.env: `DATA_DIR/iothub-emulator/hub.env`.
pub fn default_hub_env() -> Option<PathBuf> {
    hub_core::hub_env::default_path()
}

/// Resolves the connection: `--connection-string`, then `--hub-env`, then
/// `IOTHUB_CONNECTION_STRING`, then the default hub.env. The CA follows its connection string:
/// `--ca-file` always wins, then hub.env's `IOTHUB_CA_FILE` (when hub.env was used), then
/// the `IOTHUB_CA_FILE` variable.
pub fn resolve(args: &HubArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<HubSettings, Error> {
    let env_nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let from_variables = |text: String, origin: &str| Source {
        text,
        ca_file: env_nonempty(ENV_CA_FILE).map(PathBuf::from),
        origin: origin.to_owned(),
        hub_env_tier: None,
    };
    let source = if let Some(cs) = &args.connection_string {
        from_variables(cs.clone(), "--connection-string")
    } else if let Some(path) = &args.hub_env {
        from_hub_env(path)?
    } else if let Some(cs) = env_nonempty(ENV_CONNECTION_STRING) {
        from_variables(cs, ENV_CONNECTION_STRING)
    } else {
        match default_hub_env() {
            Some(path) if path.exists() => from_hub_env(&path)?,
            default_env => return Err(Error::NoConnectionString { default_env }),
        }
    };
    let connection = source
        .text
        .trim()
        .parse::<ServiceConnectionString>()
        .map_err(|source_error| Error::ConnectionString {
            origin: format!(" (from {})", source.origin),
            source: source_error,
        })?;
    let tier = resolve_tier(args, &env_nonempty, &source)?;
    Ok(HubSettings {
        connection,
        ca_file: args.ca_file.clone().or(source.ca_file),
        from_hub_env: source.hub_env_tier.is_some(),
        origin: source.origin,
        tier,
    })
}

/// The tier: `--tier` (with `--units`, else 1), then hub.env's when hub.env gave the
/// connection string (the emulator writes its `--tier` there), else `IOTHUB_TIER` (with
/// `--units`, else `IOTHUB_UNITS`, else 1). The variable is not consulted for hub.env's hub: an
/// emulator that wrote no tier does not throttle, whatever tier a real hub in the variables has.
fn resolve_tier(
    args: &HubArgs,
    env: &dyn Fn(&str) -> Option<String>,
    source: &Source,
) -> Result<Option<KnownTier>, Error> {
    let with_units = |tier: Tier, units: Option<u32>, origin: String| {
        tier.with_units(units.unwrap_or(1))
            .map(|quotas| Some(KnownTier { quotas, origin }))
            .map_err(|e| Error::Usage(e.to_string()))
    };
    if let Some(tier) = args.tier {
        return with_units(tier, args.units, "--tier".to_owned());
    }
    let found = match &source.hub_env_tier {
        Some(Some(quotas)) => with_units(
            quotas.tier,
            args.units.or(Some(quotas.units)),
            source.origin.clone(),
        )?,
        Some(None) => None,
        None => match env(ENV_TIER) {
            Some(text) => {
                let tier = text
                    .parse::<Tier>()
                    .map_err(|e| Error::Usage(format!("{ENV_TIER}: {e}")))?;
                let units = match (args.units, env(ENV_UNITS)) {
                    (Some(units), _) => Some(units),
                    (None, Some(text)) => Some(text.trim().parse::<u32>().map_err(|_| {
                        Error::Usage(format!("{ENV_UNITS}=`{text}` is not a unit count"))
                    })?),
                    (None, None) => None,
                };
                with_units(tier, units, ENV_TIER.to_owned())?
            }
            None => None,
        },
    };
    if found.is_none() && args.units.is_some() {
        return Err(Error::Usage(format!(
            "--units needs a tier: pass --tier (or set {ENV_TIER})"
        )));
    }
    Ok(found)
}

fn from_hub_env(path: &Path) -> Result<Source, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::HubEnv {
        path: path.to_owned(),
        source,
    })?;
    let settings = hub_core::hub_env::HubEnv::parse(&text, path.parent());
    let cs = settings.service_connection_string.ok_or_else(|| {
        Error::Usage(format!(
            "{} has no {ENV_CONNECTION_STRING}= line",
            path.display()
        ))
    })?;
    Ok(Source {
        text: cs,
        ca_file: settings.ca_file,
        origin: format!("the local hub-emulator's {}", path.display()),
        hub_env_tier: Some(settings.tier),
    })
}

/// Builds the service client for these settings (no request is sent).
/// `pool` is how many idle connections to keep (the fan-out's concurrency).
pub fn client(settings: &HubSettings, pool: usize) -> Result<ServiceClient, Error> {
    let mut builder = ServiceClient::builder(settings.connection.clone()).pool_max_idle(pool);
    if let Some(ca) = &settings.ca_file {
        builder = builder.ca_file(ca)?;
    }
    Ok(builder.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: &str = "HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VydmljZS1rZXktMDEyMzQ1Njc4OWFiY2RlZjAxMjM=";

    fn args(cs: Option<&str>, hub_env: Option<&Path>) -> HubArgs {
        HubArgs {
            connection_string: cs.map(str::to_owned),
            ca_file: None,
            hub_env: hub_env.map(Path::to_owned),
            tier: None,
            units: None,
        }
    }

    #[test]
    fn flag_wins_and_env_ca_follows_it() {
        let env = |k: &str| (k == ENV_CA_FILE).then(|| "/ca.pem".to_owned());
        let s = resolve(&args(Some(CS), None), &env);
        assert!(
            s.is_ok_and(|s| s.ca_file == Some(PathBuf::from("/ca.pem"))
                && s.origin == "--connection-string")
        );
    }

    #[test]
    fn hub_env_file_is_read() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("hub.env");
        std::fs::write(
            &path,
            format!(
                "IOTHUB_CONNECTION_STRING={CS}\nIOTHUB_DEVICE_CONNECTION_STRING=x\nIOTHUB_CA_FILE=/d/ca.pem\n"
            ),
        )?;
        let env =
            |_: &str| Some("HostName=other;SharedAccessKeyName=a;SharedAccessKey=YQ==".to_owned());
        let s = resolve(&args(None, Some(&path)), &env)?;
        assert_eq!(s.connection.host_name.to_string(), "localhost:8443");
        assert_eq!(s.ca_file, Some(PathBuf::from("/d/ca.pem")));
        Ok(())
    }

    #[test]
    fn tier_from_flag_then_hub_env_then_variable() -> Result<(), Box<dyn std::error::Error>> {
        let s3x2 = Tier::S3.with_units(2)?;
        let vars = |k: &str| match k {
            ENV_TIER => Some("s3".to_owned()),
            ENV_UNITS => Some("2".to_owned()),
            _ => None,
        };
        let tier_of = |args: &HubArgs, env: &dyn Fn(&str) -> Option<String>| {
            resolve(args, env).map(|s| s.tier.map(|t| (t.quotas, t.origin)))
        };
        assert_eq!(
            tier_of(&args(Some(CS), None), &vars)?,
            Some((s3x2, ENV_TIER.to_owned()))
        );
        let mut flagged = args(Some(CS), None);
        flagged.tier = Some(Tier::S1);
        assert_eq!(
            tier_of(&flagged, &vars)?,
            Some((Tier::S1.with_units(1)?, "--tier".to_owned()))
        );
        assert_eq!(tier_of(&args(Some(CS), None), &|_| None)?, None);

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("hub.env");
        std::fs::write(&path, format!("IOTHUB_CONNECTION_STRING={CS}\n"))?;
        // An emulator without --tier does not throttle: the variable is not its tier.
        assert_eq!(tier_of(&args(None, Some(&path)), &vars)?, None);
        std::fs::write(
            &path,
            format!("IOTHUB_CONNECTION_STRING={CS}\nIOTHUB_TIER=S1\nIOTHUB_UNITS=1\n"),
        )?;
        let from_file = tier_of(&args(None, Some(&path)), &vars)?;
        assert!(
            from_file
                .as_ref()
                .is_some_and(|(q, origin)| *q == Tier::S1.with_units(1).expect("S1")
                    && origin.contains("hub.env")),
            "{from_file:?}"
        );
        Ok(())
    }

    #[test]
    fn bad_tiers_and_lone_units_are_usage_errors() {
        let mut units_alone = args(Some(CS), None);
        units_alone.units = Some(2);
        assert!(resolve(&units_alone, &|_| None).is_err_and(|e| e.to_string().contains("--tier")));
        let mut free_x2 = args(Some(CS), None);
        free_x2.tier = Some(Tier::F1);
        free_x2.units = Some(2);
        assert!(resolve(&free_x2, &|_| None).is_err());
        let bad = |k: &str| (k == ENV_TIER).then(|| "S9".to_owned());
        assert!(
            resolve(&args(Some(CS), None), &bad).is_err_and(|e| e.to_string().contains(ENV_TIER))
        );
    }

    #[test]
    fn malformed_string_is_reported_without_the_key() {
        let err = resolve(
            &args(Some("HostName=x;SharedAccessKey=c2VjcmV0"), None),
            &|_| None,
        );
        assert!(err.is_err_and(|e| {
            let text = e.to_string();
            text.contains("invalid connection string") && !text.contains("c2VjcmV0")
        }));
    }

    #[test]
    fn missing_hub_env_is_named() {
        let err = resolve(
            &args(None, Some(Path::new("/nonexistent/hub.env"))),
            &|_| None,
        );
        assert!(err.is_err_and(|e| e.to_string().contains("/nonexistent/hub.env")));
    }
}
