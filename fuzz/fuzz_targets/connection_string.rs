//! Connection strings, service and device forms (hub-core `connection_string`), and the
//! `HostName` `host[:port]` parser. Reads: a connection string. Checks: no panic, and a parsed
//! string written with its secret (as hub.env stores it) parses back to the same value.
#![no_main]

use hub_core::connection_string::{ConnectionString, HostAddr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = text.parse::<ConnectionString>() {
        let written = parsed.to_secret_string();
        assert_eq!(
            written.parse::<ConnectionString>().as_ref(),
            Ok(&parsed),
            "{written:?}"
        );
        // Display redacts; it must still not fail.
        let _ = parsed.to_string();
    }
    let _ = text.parse::<HostAddr>();
    let _ = hub_core::connection_string::validate_device_id(text);
});
