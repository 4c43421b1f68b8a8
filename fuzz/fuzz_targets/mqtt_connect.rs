//! The first bytes of a device connection: CONNECT decoding (rumqttc's codec under the hub's
//! 16 KB pre-authentication limit), the username and SAS password checks, and whatever follows a
//! successful CONNECT. Reads: a whole connection's bytes. Checks: no panic, valid MQTT written.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let hub = iothub_fuzz::hub().clone();
    let written = iothub_fuzz::block_on(iothub_fuzz::hub_emulator::mqtt::fuzz_session(hub, data));
    iothub_fuzz::assert_valid_mqtt(&written);
});
