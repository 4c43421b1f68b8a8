//! device_client
