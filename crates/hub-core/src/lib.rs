//! Azure IoT Hub protocol building blocks shared by our device and service tools and the emulator.
//!
//! Module map:
//! - protocol (pure: no I/O, no clock reads): [`connection_string`], [`sas`], [`policy`],
//!   [`topic`], [`timestamp`], and the wire model [`device`], [`twin`], [`method`], [`job`],
//!   [`query`], [`error`].
//! - clients (async I/O on tokio): [`tls`] (trust roots), [`device_client`] (MQTT),
//!   [`service_client`] (REST).
pub mod connection_string;
pub mod sas;
pub mod policy;
pub mod topic;
pub mod timestamp;
pub mod device;
pub mod twin;
pub mod method;
pub mod job;
pub mod query;
pub mod error;
pub mod tls;
pub mod device_client;
pub mod service_client;
