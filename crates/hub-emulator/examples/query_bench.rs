//! What this shows: how fast the query evaluator scans a large twin collection. It builds 100,000
//! synthetic twins (tags + reported properties), then times a WHERE over tags and reported
//! properties as a full scan, a `COUNT()` and a `GROUP BY`, and prints the figures.
//!
//! Run with: `cargo run --release -p hub-emulator --example query_bench`

use std::hint::black_box;
use std::time::{Duration, Instant};

use hub_emulator::query::{self, Query};
use serde_json::{Value, json};

const DEVICES: usize = 100_000;
const ROUNDS: u32 = 5;

fn twin(i: usize) -> Value {
    let regions = ["US", "EU", "APAC", "LATAM"];
    let statuses = ["Success", "Pending", "Error"];
    json!({
        "deviceId": format!("device-{i:06}"),
        "etag": "AAAAAAAAAAE=",
        "status": if i % 10 == 0 { "disabled" } else { "enabled" },
        "connectionState": if i % 3 == 0 { "Connected" } else { "Disconnected" },
        "lastActivityTime": "2024-01-01T00:00:00.000Z",
        "version": 3,
        "tags": {
            "location": {"region": regions[i % regions.len()], "plant": format!("plant-{}", i % 50)},
            "building": format!("{}", i % 100),
            "floor": i % 7,
        },
        "properties": {
            "desired": {"telemetryInterval": 10 + i % 5, "$version": 2},
            "reported": {
                "telemetryConfig": {"status": statuses[i % statuses.len()]},
                "connectivity": if i % 2 == 0 { "wifi" } else { "wired" },
                "temperature": 15.0 + (i % 200) as f64 / 10.0,
                "firmware": format!("1.{}.{}", (i / 7) % 3, i % 10),
                "$version": 7
            }
        }
    })
}

/// Runs `f` `ROUNDS` times and returns the fastest run and its result.
fn fastest<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut result = f();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        result = black_box(f());
        best = best.min(start.elapsed());
    }
    (best, result)
}

fn report(label: &str, elapsed: Duration, detail: &str) {
    let per_doc_ns = elapsed.as_nanos() as f64 / DEVICES as f64;
    println!(
        "{label:<44} {:>8.2} ms  ({per_doc_ns:>6.1} ns/twin)  {detail}",
        elapsed.as_secs_f64() * 1e3
    );
}

fn main() -> anyhow::Result<()> {
    let build = Instant::now();
    let twins: Vec<Value> = (0..DEVICES).map(twin).collect();
    println!("built {DEVICES} twins in {:?}", build.elapsed());

    let where_text = "tags.location.region = 'US' AND properties.reported.telemetryConfig.status = 'Success' \
         AND properties.reported.temperature > 20.5 AND STARTSWITH(properties.reported.firmware, '1.1')";
    let select: Query = query::parse(&format!("SELECT * FROM devices WHERE {where_text}"))?;
    let condition = select
        .condition
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the query has a WHERE clause"))?;

    let (elapsed, matched) = fastest(|| twins.iter().filter(|t| condition.matches(t)).count());
    report(
        "WHERE (Condition::matches, full scan)",
        elapsed,
        &format!("{matched} matches"),
    );

    // The same twin over and over: evaluator cost alone, without cache misses across documents.
    let hot = &twins[0];
    let (elapsed, hits) = fastest(|| {
        (0..DEVICES)
            .filter(|_| condition.matches(black_box(hot)))
            .count()
    });
    report(
        "WHERE on one cached twin, 100,000 times",
        elapsed,
        &format!("{hits} matches"),
    );

    let (elapsed, rows) = fastest(|| query::execute(&select, &twins).map(|rows| rows.len()));
    report(
        "SELECT * ... WHERE (execute, clones rows)",
        elapsed,
        &format!("{} rows", rows?),
    );

    let count = query::parse(&format!(
        "SELECT COUNT() AS n FROM devices WHERE {where_text}"
    ))?;
    let (elapsed, rows) = fastest(|| query::execute(&count, &twins));
    report(
        "SELECT COUNT() ... WHERE",
        elapsed,
        &Value::Array(rows?).to_string(),
    );

    let group = query::parse(
        "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS n \
         FROM devices WHERE status = 'enabled' GROUP BY properties.reported.telemetryConfig.status",
    )?;
    let (elapsed, rows) = fastest(|| query::execute(&group, &twins));
    report(
        "GROUP BY reported status",
        elapsed,
        &Value::Array(rows?).to_string(),
    );

    let no_match = query::parse("SELECT * FROM devices WHERE tags.location.region = 'MARS'")?;
    let (elapsed, rows) = fastest(|| query::execute(&no_match, &twins).map(|rows| rows.len()));
    report(
        "WHERE with no match (pure scan)",
        elapsed,
        &format!("{} rows", rows?),
    );
    Ok(())
}
