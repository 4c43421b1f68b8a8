//! The packets after an accepted CONNECT, through the real session loop: PUBLISH on every
//! `$iothub` and telemetry topic (twin GET, reported patches, method responses), SUBSCRIBE,
//! UNSUBSCRIBE, PUBACK, PINGREQ, DISCONNECT and every packet IoT Hub refuses. Reads: the bytes a
//! device sends after a valid CONNECT (prepended here). Checks: no panic, valid MQTT written.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static CONNECT: OnceLock<Vec<u8>> = OnceLock::new();
    let connect = CONNECT.get_or_init(iothub_fuzz::connect_packet);
    let mut bytes = Vec::with_capacity(connect.len() + data.len());
    bytes.extend_from_slice(connect);
    bytes.extend_from_slice(data);
    let hub = iothub_fuzz::hub().clone();
    let written = iothub_fuzz::block_on(iothub_fuzz::hub_emulator::mqtt::fuzz_session(hub, &bytes));
    // The fixed CONNECT is valid: anything but CONNACK 0 (accepted, no session) would mean the
    // fuzzer is only exercising the refusal path.
    assert!(
        written.starts_with(&[0x20, 0x02, 0x00, 0x00]),
        "CONNECT refused: {:02x?}",
        &written[..written.len().min(4)]
    );
    iothub_fuzz::assert_valid_mqtt(&written);
});
