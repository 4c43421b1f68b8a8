//! The recent device-to-cloud messages of each device, kept in a bounded ring so they can be
//! seen (the dashboard) and read back (`GET /$emulator/devices/{id}/messages`, for tests). IoT
//! Hub would route them to its Event Hubs-compatible endpoint, which this hub does not serve.
//!
//! Memory is bounded by what the operator chose, never by what devices send: at most
//! `per_device` messages per device, each body cut at [`KEPT_BODY_BYTES`]; a device's ring is
//! made by its first message and goes with the device.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hub_core::telemetry::{DeviceMessages, ReceivedMessage};

/// How many recent messages a device keeps by default (`--telemetry-ring`).
pub const DEFAULT_PER_DEVICE: usize = 10;
/// How much of a body is kept; the rest is dropped and the message marked `truncated`. 1 KiB
/// shows a JSON reading whole and keeps 10,000 chatty devices under ~110 MB.
pub const KEPT_BODY_BYTES: usize = 1024;

#[derive(Debug, Default)]
struct Ring {
    total: u64,
    messages: VecDeque<ReceivedMessage>,
}

/// Every device's ring.
#[derive(Debug)]
pub struct TelemetryRings {
    per_device: AtomicUsize,
    rings: Mutex<HashMap<String, Ring>>,
}

impl TelemetryRings {
    /// Rings of `per_device` messages each (0 keeps none, and reads answer empty).
    pub fn new(per_device: usize) -> TelemetryRings {
        TelemetryRings {
            per_device: AtomicUsize::new(per_device),
            rings: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps `per_device` messages per device from now (`--telemetry-ring`; 0 keeps none and
    /// forgets what was kept).
    pub fn set_per_device(&self, per_device: usize) {
        self.per_device.store(per_device, Ordering::Relaxed);
        if per_device == 0 {
            self.rings.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Keeps one message the hub took from `device_id` at `now`.
    pub fn record(
        &self,
        device_id: &str,
        body: &[u8],
        properties: &[(String, String)],
        now: String,
    ) {
        let per_device = self.per_device.load(Ordering::Relaxed);
        if per_device == 0 {
            return;
        }
        let kept = &body[..body.len().min(KEPT_BODY_BYTES)];
        let (text, encoding) = match std::str::from_utf8(kept) {
            Ok(text) => (text.to_owned(), "utf8"),
            // A cut may fall inside a character: keep the whole characters before it as text.
            Err(error) if error.error_len().is_none() && kept.len() < body.len() => (
                String::from_utf8_lossy(&kept[..error.valid_up_to()]).into_owned(),
                "utf8",
            ),
            Err(_) => (BASE64.encode(kept), "base64"),
        };
        // The property bag shares the body's budget: a topic may carry 64 KB of properties.
        let mut budget = KEPT_BODY_BYTES;
        let mut kept_properties = Vec::new();
        let mut properties_cut = false;
        for (name, value) in properties {
            let size = name.len() + value.len();
            if size > budget {
                properties_cut = true;
                break;
            }
            budget -= size;
            kept_properties.push((name.clone(), value.clone()));
        }
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        if !rings.contains_key(device_id) {
            rings.insert(device_id.to_owned(), Ring::default());
        }
        let Some(ring) = rings.get_mut(device_id) else {
            return;
        };
        ring.total += 1;
        while ring.messages.len() >= per_device {
            ring.messages.pop_front();
        }
        ring.messages.push_back(ReceivedMessage {
            sequence_number: ring.total,
            enqueued_time_utc: now,
            size: body.len(),
            body: text,
            body_encoding: encoding.to_owned(),
            truncated: kept.len() < body.len() || properties_cut,
            properties: kept_properties,
        });
    }

    /// The device's kept messages, oldest first (none for a device that sent nothing).
    pub fn read(&self, device_id: &str) -> DeviceMessages {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let ring = rings.get(device_id);
        DeviceMessages {
            device_id: device_id.to_owned(),
            total: ring.map_or(0, |r| r.total),
            messages: ring
                .map(|r| r.messages.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// Forgets a deleted device's messages.
    pub fn forget(&self, device_id: &str) {
        self.rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(device_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_messages_and_cuts_long_bodies() {
        let rings = TelemetryRings::new(2);
        for n in 1..=3 {
            rings.record("d", format!("m{n}").as_bytes(), &[], format!("t{n}"));
        }
        let read = rings.read("d");
        assert_eq!(read.total, 3);
        let bodies: Vec<_> = read.messages.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, ["m2", "m3"]);
        assert_eq!(read.messages[1].sequence_number, 3);

        rings.record("d", &vec![b'x'; KEPT_BODY_BYTES + 10], &[], "t".into());
        let last = rings.read("d").messages.pop().expect("kept");
        assert!(last.truncated);
        assert_eq!(last.size, KEPT_BODY_BYTES + 10);
        assert_eq!(last.body.len(), KEPT_BODY_BYTES);

        // A cut inside a multi-byte character keeps the text before it.
        let mut body = vec![b'a'; KEPT_BODY_BYTES - 1];
        body.extend("é".as_bytes());
        rings.record("d", &body, &[], "t".into());
        let last = rings.read("d").messages.pop().expect("kept");
        assert_eq!(
            (last.body_encoding.as_str(), last.body.len()),
            ("utf8", KEPT_BODY_BYTES - 1)
        );

        rings.record("d", &[0xff, 0xfe], &[], "t".into());
        let last = rings.read("d").messages.pop().expect("kept");
        assert_eq!(
            (last.body_encoding.as_str(), last.body.as_str()),
            ("base64", "//4=")
        );

        let long = vec![("p".to_owned(), "v".repeat(KEPT_BODY_BYTES))];
        rings.record("d", b"m", &long, "t".into());
        let last = rings.read("d").messages.pop().expect("kept");
        assert!(
            last.truncated && last.properties.is_empty(),
            "properties share the budget"
        );

        rings.forget("d");
        assert_eq!(rings.read("d").total, 0);
    }

    #[test]
    fn a_ring_of_zero_keeps_nothing() {
        let rings = TelemetryRings::new(0);
        rings.record("d", b"m", &[], "t".into());
        assert!(rings.read("d").messages.is_empty());
    }
}
