//! The IoT Hub query language (hub-emulator `query`): full queries as `POST /devices/query`
//! takes them and job `queryCondition`s, parsed and run over a small fleet of twins. Reads: the
//! query text. Checks: no panic; the module's invariant `parse(&q.to_string()) == Ok(q)`; and
//! the fast scanner (`filter_parallel`, `first_matches`) agrees with `Condition::matches`.
#![no_main]

use std::sync::OnceLock;

use hub_emulator::query::{self, Condition};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// Forty twins (more than one of the scanner's batches of 32) shaped like `GET /twins/{id}`
/// answers (reference §4.3), with tags and properties of every JSON type.
fn twins() -> &'static [Value] {
    static TWINS: OnceLock<Vec<Value>> = OnceLock::new();
    TWINS.get_or_init(|| {
        (0..40)
            .map(|i| {
                let region = [json!("US"), json!("EU"), Value::Null][i % 3].clone();
                let mut twin = json!({
                    "deviceId": format!("simDevice-{i}"),
                    "etag": "AAAAAAAAAAE=",
                    "status": if i % 5 == 0 { "disabled" } else { "enabled" },
                    "connectionState": if i % 2 == 0 { "Connected" } else { "Disconnected" },
                    "lastActivityTime": "2024-01-01T00:00:00Z",
                    "version": i,
                    "tags": {"building": (40 + i % 4).to_string(), "floor": i % 7, "location": {"region": region}},
                    "properties": {
                        "desired": {"telemetryInterval": i * 10, "$version": 1},
                        "reported": {"fw": format!("1.{}", i % 3), "temp": i as f64 / 3.0, "ok": i % 2 == 0, "list": [i, "x"], "$version": 1},
                    },
                });
                if i % 4 == 0 {
                    twin["tags"] = json!({});
                }
                twin
            })
            .collect()
    })
}

fn check_scan(condition: &Condition, docs: &[Value]) {
    let expected: Vec<usize> = (0..docs.len())
        .filter(|&i| condition.matches(&docs[i]))
        .collect();
    assert_eq!(
        query::filter_parallel(condition, docs),
        expected,
        "{condition:?}"
    );
    let first: Vec<usize> = expected.iter().copied().take(3).collect();
    assert_eq!(
        query::first_matches(condition, docs, 3),
        first,
        "{condition:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let docs = twins();
    if let Ok(parsed) = query::parse(text) {
        let printed = parsed.to_string();
        assert_eq!(
            query::parse(&printed).as_ref(),
            Ok(&parsed),
            "{text:?} printed as {printed:?}"
        );
        let _ = query::execute(&parsed, docs);
        if let Some(condition) = &parsed.condition {
            check_scan(condition, docs);
        }
    }
    if let Ok(condition) = query::parse_condition(text) {
        check_scan(&condition, docs);
    }
});
