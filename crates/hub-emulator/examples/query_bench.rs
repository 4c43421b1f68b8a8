//! What this shows: how fast the query evaluator scans a large twin collection. It builds 100,000
//! synthetic twins shaped like the hub's own twin documents (the same 16 top-level keys in the
//! same order, held as `Arc<Value>`), then times a WHERE over tags and reported properties as a
//! full scan (`query::filter_parallel`, what `POST /devices/query` uses, and the plain
//! sequential `Condition::matches` loop), a `COUNT()` and a `GROUP BY`. Every figure is the
//! median of several runs; the machine's load average is printed with it, since other
//! processes on a small machine change the wall-clock figures a lot.
//!
//! Then, through a running in-process hub over HTTPS (`--devices`, default 100,000; 0 skips
//! it): p50/p99/max latency of a sequential `GET /twins/{id}` reader, first alone, then while
//! `--queriers` (default 2) clients run full-registry queries back to back (a GROUP BY over a
//! tag, a WHERE matching nothing, a GROUP BY deviceId), with the queries' own latency and the
//! size of the largest query response.
//!
//! Run with: `cargo run --release -p hub-emulator --example query_bench -- --devices 100000
//! --seconds 5 --queriers 2`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hub_emulator::query::{self, Query};
use serde_json::{Value, json};

const DEVICES: usize = 100_000;
const ROUNDS: usize = 11;

fn twin(i: usize) -> Value {
    let regions = ["US", "EU", "APAC", "LATAM"];
    let statuses = ["Success", "Pending", "Error"];
    // Keys and order as `hub.rs` builds a twin document.
    json!({
        "deviceId": format!("device-{i:06}"),
        "etag": "AAAAAAAAAAM=",
        "deviceEtag": "MTIz",
        "status": if i.is_multiple_of(10) { "disabled" } else { "enabled" },
        "statusReason": "",
        "statusUpdateTime": "0001-01-01T00:00:00Z",
        "connectionState": if i.is_multiple_of(3) { "Connected" } else { "Disconnected" },
        "lastActivityTime": "2024-01-01T00:00:00.000Z",
        "cloudToDeviceMessageCount": 0,
        "authenticationType": "sas",
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
        "modelId": "",
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
                "connectivity": if i.is_multiple_of(2) { "wifi" } else { "wired" },
                "temperature": 15.0 + (i % 200) as f64 / 10.0,
                "firmware": format!("1.{}.{}", (i / 7) % 3, i % 10),
                "$version": 7
            }
        },
        "capabilities": {"iotEdge": false}
    })
}

/// Wall-clock times of `ROUNDS` runs (after one warm-up run), sorted, and the CPU time all
/// threads of the process spent on them, per run.
struct Runs(Vec<Duration>, Option<Duration>);

impl Runs {
    fn median(&self) -> Duration {
        self.0.get(self.0.len() / 2).copied().unwrap_or_default()
    }
}

/// Runs `f` once to warm up, then `ROUNDS` times; returns the sorted times and the last result.
fn timed<T>(mut f: impl FnMut() -> T) -> (Runs, T) {
    let mut result = f();
    let mut times = Vec::with_capacity(ROUNDS);
    let cpu_start = cpu_time();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        result = black_box(f());
        times.push(start.elapsed());
    }
    let cpu = cpu_time()
        .zip(cpu_start)
        .map(|(end, start)| end.saturating_sub(start) / ROUNDS as u32);
    times.sort();
    (Runs(times, cpu), result)
}

/// User + system CPU time of the whole process so far (`/proc/self/stat`, in clock ticks,
/// taken as 100 per second), which unlike wall-clock time does not count waiting for a core.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(label: &str, runs: &Runs, detail: &str) {
    let median = runs.median();
    let per_doc_ns = median.as_nanos() as f64 / DEVICES as f64;
    let (min, max) = (
        runs.0.first().copied().unwrap_or_default(),
        runs.0.last().copied().unwrap_or_default(),
    );
    let cpu = runs
        .1
        .map_or_else(|| "?".to_owned(), |cpu| format!("{:.0}", ms(cpu)));
    println!(
        "{label:<46} median {:>7.2} ms  (min {:>7.2}, max {:>7.2}; cpu {cpu:>4} ms; \
         {per_doc_ns:>6.1} ns/twin)  {detail}",
        ms(median),
        ms(min),
        ms(max)
    );
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() -> anyhow::Result<()> {
    let args = <BenchArgs as clap::Parser>::parse();
    evaluator()?;
    if args.devices > 0 {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(rest::run(&args))?;
    }
    Ok(())
}

/// Command line of the REST part.
#[derive(clap::Parser)]
struct BenchArgs {
    /// Devices registered in the hub for the REST part; 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    devices: usize,
    /// Length of each latency run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Clients running full-registry queries during the loaded run.
    #[arg(long, default_value_t = 2)]
    queriers: usize,
}

fn evaluator() -> anyhow::Result<()> {
    let build = Instant::now();
    let twins: Vec<Arc<Value>> = (0..DEVICES).map(|i| Arc::new(twin(i))).collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "built {DEVICES} twins in {:?}; {cores} cores; load average {} before timing; \
         each figure is the median of {ROUNDS} runs",
        build.elapsed(),
        load()
    );

    let where_text = "tags.location.region = 'US' AND properties.reported.telemetryConfig.status = 'Success' \
         AND properties.reported.temperature > 20.5 AND STARTSWITH(properties.reported.firmware, '1.1')";
    let select: Query = query::parse(&format!("SELECT * FROM devices WHERE {where_text}"))?;
    let condition = select
        .condition
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the query has a WHERE clause"))?;

    // The figure the issue asks for: WHERE over tags + reported on 100,000 twins.
    let (runs_where, matched) = timed(|| query::filter_parallel(&condition, &twins).len());
    let load_after = load();
    report(
        "WHERE (filter_parallel, full scan)",
        &runs_where,
        &format!("{matched} matches"),
    );

    let (runs_seq, matched_seq) = timed(|| twins.iter().filter(|t| condition.matches(t)).count());
    report(
        "WHERE (Condition::matches loop, 1 thread)",
        &runs_seq,
        &format!("{matched_seq} matches"),
    );
    anyhow::ensure!(
        matched == matched_seq,
        "parallel and sequential scans disagree"
    );

    // The same twin over and over: evaluator cost alone, without cache misses across documents.
    let hot = &twins[0];
    let (runs, hits) = timed(|| {
        (0..DEVICES)
            .filter(|_| condition.matches(black_box(hot)))
            .count()
    });
    report(
        "WHERE on one cached twin, 100,000 times",
        &runs,
        &format!("{hits} matches"),
    );

    let (runs, rows) =
        timed(|| query::execute(&select, twins.iter().map(|t| t.as_ref())).map(|rows| rows.len()));
    report(
        "SELECT * ... WHERE (execute, 1 thread, clones)",
        &runs,
        &format!("{} rows", rows?),
    );

    let count = query::parse(&format!(
        "SELECT COUNT() AS n FROM devices WHERE {where_text}"
    ))?;
    let (runs, rows) = timed(|| query::execute(&count, twins.iter().map(|t| t.as_ref())));
    report(
        "SELECT COUNT() ... WHERE (execute, 1 thread)",
        &runs,
        &Value::Array(rows?).to_string(),
    );

    let group = query::parse(
        "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS n \
         FROM devices WHERE status = 'enabled' GROUP BY properties.reported.telemetryConfig.status",
    )?;
    let (runs, rows) = timed(|| query::execute(&group, twins.iter().map(|t| t.as_ref())));
    report(
        "GROUP BY reported status (execute, 1 thread)",
        &runs,
        &Value::Array(rows?).to_string(),
    );

    let no_match = query::parse_condition("tags.location.region = 'MARS'")?;
    let (runs, rows) = timed(|| query::filter_parallel(&no_match, &twins).len());
    report(
        "WHERE with no match (filter_parallel)",
        &runs,
        &format!("{rows} rows"),
    );

    println!(
        "\nissue figure: WHERE over tags + reported properties on {DEVICES} twins: \
         {:.1} ms per query (median of {ROUNDS}, filter_parallel on {cores} cores; \
         {} ms CPU per query; 1 thread: {:.1} ms); load average {load_after} when measured",
        ms(runs_where.median()),
        runs_where
            .1
            .map_or_else(|| "?".to_owned(), |cpu| format!("{:.0}", ms(cpu))),
        ms(runs_seq.median()),
    );
    Ok(())
}

/// The REST part: a real hub, a sequential twin reader, and clients running full scans.
mod rest {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use hub_core::connection_string::ServiceConnectionString;
    use hub_emulator::Config;
    use serde_json::json;

    use super::{BenchArgs, load, ms};

    /// The queries the load clients cycle through: each reads every twin of the registry.
    const QUERIES: [&str; 3] = [
        "SELECT tags.location.region AS region, COUNT() AS n FROM devices GROUP BY tags.location.region",
        "SELECT * FROM devices WHERE tags.location.region = 'MARS'",
        "SELECT deviceId, COUNT() AS n FROM devices GROUP BY deviceId",
    ];

    #[derive(Clone)]
    struct Client {
        http: reqwest::Client,
        base: String,
        auth: String,
    }

    pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
        let running = hub_emulator::start(Config::ephemeral()).await?;
        let hub = running.hub().clone();
        let started = Instant::now();
        let regions = ["US", "EU", "APAC", "LATAM"];
        for i in 0..args.devices {
            let id = format!("device-{i:06}");
            hub.create_or_update_device(&id, &json!({"deviceId": id}), None)
                .await?;
            let tags = json!({"tags": {"location": {"region": regions[i % regions.len()]}, "floor": i % 7}});
            hub.update_twin(&id, &tags, None, false).await?;
        }
        println!(
            "\nREST: registered {} devices (in memory) in {:.2?}",
            args.devices,
            started.elapsed()
        );

        let cs: ServiceConnectionString = running.env.service_connection_string.parse()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let auth = hub_core::sas::generate(
            &cs.host_name.to_string(),
            &cs.key,
            Some(&cs.policy_name),
            now + 7200,
        );
        let ca = reqwest::Certificate::from_pem(running.env.ca_pem.as_bytes())?;
        let client = || -> anyhow::Result<Client> {
            Ok(Client {
                http: reqwest::Client::builder()
                    .use_rustls_tls()
                    .tls_built_in_root_certs(false)
                    .add_root_certificate(ca.clone())
                    .resolve("localhost", running.https_addr)
                    .timeout(Duration::from_secs(300))
                    .build()?,
                base: format!("https://localhost:{}", running.https_addr.port()),
                auth: auth.clone(),
            })
        };
        let reader = client()?;
        let read_id = format!("device-{:06}", args.devices / 2);
        let seconds = Duration::from_secs(args.seconds.max(1));
        read_loop(&reader, &read_id, Duration::from_millis(200)).await?;
        let baseline = read_loop(&reader, &read_id, seconds).await?;
        report("GET /twins/{id}, no other load", baseline);

        let stop = Arc::new(AtomicBool::new(false));
        let largest = Arc::new(AtomicUsize::new(0));
        let mut queriers = Vec::new();
        for q in 0..args.queriers {
            let (client, stop, largest) = (client()?, stop.clone(), largest.clone());
            queriers.push(tokio::spawn(async move {
                query_loop(client, q, stop, largest).await
            }));
        }
        let loaded = read_loop(&reader, &read_id, seconds).await?;
        stop.store(true, Ordering::Relaxed);
        let mut query_times = Vec::new();
        for querier in queriers {
            query_times.extend(querier.await??);
        }
        report(
            &format!("GET /twins/{{id}}, {} clients querying", args.queriers),
            loaded,
        );
        report("  the full-registry queries themselves", query_times);
        println!(
            "  largest query response: {} bytes; load average {}",
            largest.load(Ordering::Relaxed),
            load()
        );
        Ok(())
    }

    async fn read_loop(
        client: &Client,
        id: &str,
        duration: Duration,
    ) -> anyhow::Result<Vec<Duration>> {
        let url = format!("{}/twins/{id}?api-version=2021-04-12", client.base);
        let mut latencies = Vec::new();
        let started = Instant::now();
        while started.elapsed() < duration {
            let sent = Instant::now();
            let response = client
                .http
                .get(&url)
                .header("Authorization", &client.auth)
                .send()
                .await?;
            anyhow::ensure!(response.status().is_success(), "GET twin: {response:?}");
            response.bytes().await?;
            latencies.push(sent.elapsed());
        }
        Ok(latencies)
    }

    /// Runs the first page of each of [`QUERIES`] in turn (starting at `first`) until `stop`.
    async fn query_loop(
        client: Client,
        first: usize,
        stop: Arc<AtomicBool>,
        largest: Arc<AtomicUsize>,
    ) -> anyhow::Result<Vec<Duration>> {
        let url = format!("{}/devices/query?api-version=2021-04-12", client.base);
        let mut latencies = Vec::new();
        let mut next = first;
        while !stop.load(Ordering::Relaxed) {
            let text = QUERIES[next % QUERIES.len()];
            next += 1;
            let sent = Instant::now();
            let response = client
                .http
                .post(&url)
                .header("Authorization", &client.auth)
                .json(&json!({ "query": text }))
                .send()
                .await?;
            anyhow::ensure!(response.status().is_success(), "query {text}: {response:?}");
            let body = response.bytes().await?;
            latencies.push(sent.elapsed());
            largest.fetch_max(body.len(), Ordering::Relaxed);
        }
        Ok(latencies)
    }

    fn report(label: &str, mut latencies: Vec<Duration>) {
        latencies.sort();
        if latencies.is_empty() {
            println!("{label:<46} no samples");
            return;
        }
        let at = |p: f64| {
            let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
            latencies[rank - 1]
        };
        println!(
            "{label:<46} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} requests)",
            ms(at(0.50)),
            ms(at(0.99)),
            ms(at(1.0)),
            latencies.len()
        );
    }
}
