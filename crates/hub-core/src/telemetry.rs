//! Device-to-cloud messages as the emulator keeps them for reading back: the body of its own
//! `GET /$emulator/devices/{id}/messages` route (IoT Hub has no such route; its messages leave
//! through the Event Hubs-compatible endpoint, which the emulator does not serve).

use serde::{Deserialize, Serialize};

/// A device's most recent messages, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMessages {
    /// The device.
    pub device_id: String,
    /// How many messages the device has sent since the hub started (also those no longer kept).
    pub total: u64,
    /// The kept messages, oldest first.
    pub messages: Vec<ReceivedMessage>,
}

/// One device-to-cloud message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceivedMessage {
    /// Its number among the device's messages since the hub started, from 1.
    pub sequence_number: u64,
    /// When the hub took it (RFC 3339, UTC).
    pub enqueued_time_utc: String,
    /// The body's size in bytes as sent.
    pub size: usize,
    /// The body (cut at the hub's limit when `truncated`), as text if it is UTF-8.
    pub body: String,
    /// `utf8`, or `base64` for a body that is not UTF-8.
    pub body_encoding: String,
    /// Whether `body` holds only the first part of the message.
    pub truncated: bool,
    /// The topic's property bag: system (`$.ct`, `$.mid`, ...) and application properties.
    pub properties: Vec<(String, String)>,
}
