//! SAS tokens as devices (MQTT password) and services (`Authorization` header) send them
//! (hub-core `sas`), then every check the hub makes: signature, expiry, audience, identity.
//! Reads: a token string. Checks: no panic, and `to_header` output parses back to the same
//! token (the hub forwards tokens in that form).
#![no_main]

use hub_core::connection_string::SharedKey;
use hub_core::sas::SasToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(token) = SasToken::parse(text) else {
        return;
    };
    let header = token.to_header();
    assert_eq!(SasToken::parse(&header).as_ref(), Ok(&token), "{header:?}");
    let key = SharedKey::from_bytes(iothub_fuzz::DEVICE_KEY.as_bytes());
    let _ = token.verify_signature(&key);
    let _ = token.check_expiry(u64::MAX, u64::MAX);
    let _ = token.check_expiry(0, 300);
    let _ = token.check_audience("localhost", "/devices/dev1");
    let _ = token.covers("localhost:8443", "");
    let _ = token.device_identity();
    let _ = format!("{token:?}");
});
