//! Azure IoT Hub protocol building blocks shared by our device and service tools and the emulator.
//!
//! Module map:
//! - protocol (pure: no I/O, no clock reads): [`connection_string`], [`sas`], [`policy`],
//!   [`topic`], [`timestamp`], and the wire model [`device`], [`bulk`], [`configuration`], [`twin`], [`method`],
//!   [`job`], [`query`], [`error`]; [`hub_env`] (the local hub's settings file); [`tier`] (tiers and
//!   their quotas).
//! - clients (async I/O on tokio): [`tls`] (trust roots), [`device_client`] (MQTT),
//!   [`service_client`] (REST); [`shutdown`] (Ctrl-C/SIGTERM) and [`duration`] (`20s`, `2m`) for
//!   our binaries.
#![warn(missing_docs)]

pub mod bulk;
pub mod configuration;
pub mod connection_string;
pub mod device;
pub mod device_client;
pub mod duration;
pub mod error;
pub mod hub_env;
pub mod import_export;
pub mod job;
pub mod method;
pub mod policy;
pub mod query;
pub mod sas;
pub mod service_client;
pub mod shutdown;
pub mod telemetry;
pub mod tier;
pub mod timestamp;
pub mod tls;
pub mod topic;
pub mod twin;
