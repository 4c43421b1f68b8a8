//! A local Azure IoT Hub.
pub mod query;
