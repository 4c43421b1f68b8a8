//! hub.env, the local hub's `KEY=value` settings file (hub-core `hub_env`). Reads: the file's
//! text. Checks: no panic, and settings the hub could have written (values with no surrounding
//! blanks or quotes and no line breaks) survive `to_lines` and a second parse unchanged.
#![no_main]

use std::path::Path;

use hub_core::hub_env::HubEnv;
use libfuzzer_sys::fuzz_target;

/// Whether `to_lines` can write `value` so that `parse` reads it back as is: `parse` trims
/// blanks and one pair of quotes from a value, and reads line by line.
fn writable(value: &str) -> bool {
    let edge = |c: char| c.is_whitespace() || c == '"' || c == '\'';
    !value.starts_with(edge) && !value.ends_with(edge) && !value.contains(['\n', '\r'])
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = Path::new("/data");
    let env = HubEnv::parse(text, Some(dir));
    let ca = env.ca_file.as_ref().map(|p| p.display().to_string());
    let values = [
        env.service_connection_string.as_deref(),
        env.device_connection_string.as_deref(),
        ca.as_deref(),
    ];
    if values.into_iter().flatten().all(writable) {
        let lines = env.to_lines();
        assert_eq!(HubEnv::parse(&lines, Some(dir)), env, "{lines:?}");
    }
});
