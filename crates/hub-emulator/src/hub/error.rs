//! The hub's failures: [`OperationError`] for service and device operations, each with the IoT Hub
//! error code it is reported with, and [`AuthError`] for refused credentials.

use hub_core::error::ErrorCode;
use hub_core::policy::Permission;

use crate::store::StoreError;
use crate::twins::TwinError;

/// A failure the service API reports with an IoT Hub error code.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// No device with this id.
    #[error("Device {0} not registered")]
    DeviceNotFound(String),
    /// Create with an id that exists.
    #[error("A device with ID '{0}' is already registered.")]
    DeviceAlreadyExists(String),
    /// No module with this id on the device.
    #[error("Module {module} on device {device} not registered")]
    ModuleNotFound { device: String, module: String },
    /// Module create with an id that exists on the device.
    #[error("A module with ID '{module}' is already registered on device '{device}'.")]
    ModuleAlreadyExists { device: String, module: String },
    /// A module create beyond the per-device cap.
    #[error("Device {device} already has {max} modules, the most this hub allows on one device.")]
    TooManyModules { device: String, max: usize },
    /// No configuration with this id.
    #[error("Configuration {0} not found.")]
    ConfigurationNotFound(String),
    /// Create with a configuration id that exists.
    #[error(
        "A configuration with ID '{0}' already exists; update it with If-Match, or delete it first."
    )]
    ConfigurationAlreadyExists(String),
    /// A configuration IoT Hub would refuse: its id, content, target condition or metrics
    /// (`code` says which).
    #[error("{message}")]
    ConfigurationInvalid { code: ErrorCode, message: String },
    /// A create beyond the tier's count of configurations.
    #[error(
        "The hub already has {max} configurations, the most its tier allows; delete one first."
    )]
    TooManyConfigurations { max: usize },
    /// `If-Match` named another etag.
    #[error("Precondition failed: the etag does not match the current {what} etag of '{id}'.")]
    PreconditionFailed { what: &'static str, id: String },
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// A twin patch IoT Hub would refuse.
    #[error("{0}")]
    Twin(#[from] TwinError),
    /// The device did not connect (and subscribe to methods) within the connect timeout.
    #[error("Timed out waiting for device to connect.")]
    DeviceNotOnline { timeout_secs: u64 },
    /// The device did not answer within the response timeout.
    #[error("Timed out waiting for the response from device.")]
    GatewayTimeout,
    /// A payload over the limit.
    #[error("{0}")]
    MessageTooLarge(String),
    /// The device's session could not take the request.
    #[error("The device's connection is backed up; try again later.")]
    Throttled,
    /// The device's twin operations are throttled by an injected `twin-throttled` fault
    /// (see `crate::faults`); answered as IoT Hub answers a throttled twin operation.
    #[error(
        "Twin operations of device {0} are throttled (hub-emulator fault injection: twin-throttled); retry later."
    )]
    TwinThrottled(String),
    /// Durable state could not be written; nothing changed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The hub could not encode its own state (a bug, reported as 500); nothing changed.
    #[error("internal error: {0}")]
    Internal(String),
    /// A stored record could not be read at startup.
    #[error("{0}")]
    Unreadable(String),
    /// A batch could not be saved (the store's error, as text: every item of the batch gets it);
    /// nothing changed.
    #[error("the change was not saved: {0}")]
    NotSaved(String),
}

impl OperationError {
    /// The IoT Hub error code this failure is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            OperationError::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            OperationError::DeviceAlreadyExists(_) => ErrorCode::DeviceAlreadyExists,
            OperationError::ModuleNotFound { .. } => ErrorCode::ModuleNotFound,
            OperationError::ModuleAlreadyExists { .. } => ErrorCode::ModuleAlreadyExistsOnDevice,
            OperationError::TooManyModules { .. } => ErrorCode::TooManyModulesOnDevice,
            OperationError::ConfigurationNotFound(_) => ErrorCode::ConfigurationNotFound,
            OperationError::ConfigurationAlreadyExists(_) => ErrorCode::ConfigurationAlreadyExists,
            OperationError::ConfigurationInvalid { code, .. } => *code,
            OperationError::TooManyConfigurations { .. } => {
                ErrorCode::ConfigurationCountLimitExceeded
            }
            OperationError::PreconditionFailed { .. } => ErrorCode::PreconditionFailed,
            OperationError::InvalidArgument(_) | OperationError::Twin(_) => {
                ErrorCode::ArgumentInvalid
            }
            OperationError::DeviceNotOnline { .. } => ErrorCode::DeviceNotOnline,
            OperationError::GatewayTimeout => ErrorCode::GatewayTimeout,
            OperationError::MessageTooLarge(_) => ErrorCode::MessageTooLarge,
            OperationError::Throttled | OperationError::TwinThrottled(_) => {
                ErrorCode::ThrottlingException
            }
            OperationError::Store(_)
            | OperationError::NotSaved(_)
            | OperationError::Internal(_)
            | OperationError::Unreadable(_) => ErrorCode::ServerError,
        }
    }
}

/// Why a connection or request was not authorized. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token could not be parsed.
    #[error("malformed SharedAccessSignature: {0}")]
    Malformed(String),
    /// Token expired, wrong signature, unknown policy or device, wrong audience.
    #[error("{0}")]
    Refused(String),
    /// Valid credentials without the permission the operation needs.
    #[error("the credentials do not grant {0:?}")]
    MissingPermission(Permission),
    /// The device exists but is disabled.
    #[error("device {0} is disabled")]
    DeviceDisabled(String),
    /// The device is held offline by an injected fault (see `crate::faults`): its credentials
    /// are fine, the hub refuses the connection for now (CONNACK 3, which devices retry).
    #[error(
        "device {0} is held offline by an injected fault (hub-emulator fault injection: offline); it may connect once the fault ends"
    )]
    HeldOffline(String),
}
