//! Errors that stop schedule-job before or while it talks to the hub, with their exit codes.

use std::path::PathBuf;

use hub_core::service_client::ServiceError;

/// Why schedule-job could not do what was asked. Every variant exits with code 2: nothing was
/// left half-done (validation happens before anything is created).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value is unusable (JSON, times, durations, ids).
    #[error("{0}")]
    Usage(String),
    /// No connection string anywhere.
    #[error(
        "no IoT Hub connection string: pass --connection-string, set IOTHUB_CONNECTION_STRING, \
         or start hub-emulator (it writes {})",
        default_env.as_ref().map_or_else(|| "hub.env in its data directory".to_owned(), |p| p.display().to_string())
    )]
    NoConnectionString {
        /// Where the local hub's hub.env would be.
        default_env: Option<PathBuf>,
    },
    /// The connection string does not parse.
    #[error("invalid connection string{origin}")]
    ConnectionString {
        /// ` (from ...)` when it came from a file or variable.
        origin: String,
        /// The parser's reason (never contains the key).
        #[source]
        source: hub_core::connection_string::ConnectionStringError,
    },
    /// hub.env could not be read.
    #[error("cannot read {}", path.display())]
    HubEnv {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A device named on the command line is not in the registry.
    #[error(
        "device '{device_id}' is not registered in the hub {host}; create it first (the hub-emulator registers 'myDeviceId')"
    )]
    UnknownDevice {
        /// The device.
        device_id: String,
        /// The hub.
        host: String,
    },
    /// Several devices named on the command line are not in the registry.
    #[error("{} of the given devices are not registered in the hub {host}: {}", missing.len(), missing.join(", "))]
    UnknownDevices {
        /// The missing devices.
        missing: Vec<String>,
        /// The hub.
        host: String,
    },
    /// The hub refused the query condition.
    #[error("the hub rejected the query condition `{condition}`: {message}")]
    InvalidQuery {
        /// The WHERE clause.
        condition: String,
        /// The hub's message.
        message: String,
    },
    /// A rollout's state file cannot be read or written.
    #[error("rollout state {}: {reason}", path.display())]
    RolloutState {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The hub could not be reached or refused a request.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl Error {
    /// The process exit code for this error: 2 (usage, configuration or connection).
    pub fn exit_code(&self) -> u8 {
        2
    }
}
