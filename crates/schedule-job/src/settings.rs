//! Where the hub is: connection string and CA from flags, environment, or the local
//! hub-emulator's `hub.env`, in that order.

use std::path::{Path, PathBuf};

use hub_core::connection_string::ServiceConnectionString;
use hub_core::service_client::ServiceClient;

use crate::cli::HubArgs;
use crate::error::Error;

pub use hub_core::hub_env::{ENV_CA_FILE, ENV_CONNECTION_STRING};

/// The resolved settings.
#[derive(Debug)]
pub struct HubSettings {
    /// The parsed connection string.
    pub connection: ServiceConnectionString,
    /// Extra CA file, if any.
    pub ca_file: Option<PathBuf>,
    /// Where the settings came from, said once on stderr.
    pub origin: String,
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
    let (text, ca_file, origin) = if let Some(cs) = &args.connection_string {
        (
            cs.clone(),
            env_nonempty(ENV_CA_FILE).map(PathBuf::from),
            "--connection-string".to_owned(),
        )
    } else if let Some(path) = &args.hub_env {
        from_hub_env(path)?
    } else if let Some(cs) = env_nonempty(ENV_CONNECTION_STRING) {
        (
            cs,
            env_nonempty(ENV_CA_FILE).map(PathBuf::from),
            ENV_CONNECTION_STRING.to_owned(),
        )
    } else {
        match default_hub_env() {
            Some(path) if path.exists() => from_hub_env(&path)?,
            default_env => return Err(Error::NoConnectionString { default_env }),
        }
    };
    let connection = text
        .trim()
        .parse::<ServiceConnectionString>()
        .map_err(|source| Error::ConnectionString {
            origin: format!(" (from {origin})"),
            source,
        })?;
    Ok(HubSettings {
        connection,
        ca_file: args.ca_file.clone().or(ca_file),
        origin,
    })
}

fn from_hub_env(path: &Path) -> Result<(String, Option<PathBuf>, String), Error> {
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
    let ca = settings.ca_file;
    Ok((
        cs,
        ca,
        format!("the local hub-emulator's {}", path.display()),
    ))
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
