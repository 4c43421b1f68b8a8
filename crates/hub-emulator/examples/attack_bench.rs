//! Resource-attack benchmark (issue 13): does a legitimate device and a legitimate REST client
//! keep working while thousands of half-open TLS connections and slow HTTP bodies are held
//! against the hub, and does the hub's memory stay bounded?
//!
//! Spawns the release `hub-emulator` (next to this example, or `--hub PATH`) on free ports with a
//! durable data dir, then runs the same measurement twice, side by side: a baseline, and while
//! `--tls` (2,000) half-open TLS connections (TCP connected, the first 100 bytes of a ClientHello
//! sent, never finished) are held on the MQTT port and `--bodies` (1,000) slow HTTP bodies (a
//! valid token, `Content-Length: 1000`, the body trickled a byte a second) on the HTTPS port. A
//! connection the hub drops is opened again, as an attacker would. Measured for `--seconds`
//! each: a connected device's direct-method round trip (REST in, MQTT out and back), a fresh
//! device connect (TLS, CONNECT, subscriptions, twin read), `GET /twins/{id}` on a pooled
//! client and on a new connection each time; p50/p99/max and failures (10 s per operation).
//! The hub's VmRSS is printed before, at the peak during, and after each attack.
//!
//! Run with: `ulimit -n "$(ulimit -Hn)"; cargo build --release -p hub-emulator --bins --examples
//! && target/release/examples/attack_bench --tls 2000 --bodies 1000 --seconds 15`
//! (the bench also raises its own soft open-file limit to the hard one through `prlimit`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/attack.rs"]
mod attack;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use attack::{
    HubProcess, Ledger, Legit, Output, client_hello, nofile_limits, percentiles, trickle,
};
use clap::Parser;
use hub_core::device_client::{DeviceClient, DeviceClientOptions};
use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long one legitimate operation may take before it counts as failed.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Legitimate-client latency and hub memory under half-open TLS and slow-body attacks.
#[derive(Debug, Parser)]
struct Args {
    /// Half-open TLS connections held on the MQTT port.
    #[arg(long, default_value_t = 2_000)]
    tls: usize,
    /// Slow HTTP bodies held on the HTTPS port.
    #[arg(long, default_value_t = 1_000)]
    bodies: usize,
    /// How long each phase (baseline, attack) measures.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// The hub binary (default: `hub-emulator` in this example's target directory).
    #[arg(long)]
    hub: Option<PathBuf>,
    /// Start the hub with this open-file limit (default: this process's, raised to the hard
    /// limit), e.g. below `--tls` + `--bodies` to see what exhaustion does.
    #[arg(long)]
    hub_nofile: Option<u64>,
    /// Spread attacking sockets over source addresses 127.0.0.2-127.0.0.251 (when one source
    /// address runs out of ephemeral ports).
    #[arg(long)]
    spread_sources: bool,
}

fn hub_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .context("example path")?
        .join("hub-emulator");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p hub-emulator --bins` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// Raises the soft open-file limit to the hard one with util-linux `prlimit` (the workspace
/// forbids `unsafe`, so no direct `setrlimit`); the hub inherits it.
fn raise_nofile() -> Option<(u64, u64)> {
    if let Some((soft, hard)) = nofile_limits()
        && soft < hard
    {
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .status();
    }
    nofile_limits()
}

/// Latency samples and failures of one kind of operation in one phase.
#[derive(Debug, Default)]
struct Series {
    samples: Vec<Duration>,
    failures: usize,
    first_error: Option<String>,
}

impl Series {
    /// Records an operation that took `took` (Ok) or failed.
    fn record(&mut self, outcome: Result<Duration, String>) {
        match outcome {
            Ok(took) => self.samples.push(took),
            Err(e) => {
                self.failures += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn cell(&mut self) -> String {
        let (p50, p99, max) = percentiles(&mut self.samples);
        format!(
            "{:>5} {:>8.1?} {:>8.1?} {:>8.1?} {:>4}",
            self.samples.len(),
            p50,
            p99,
            max,
            self.failures
        )
    }
}

/// One phase's figures.
#[derive(Debug, Default)]
struct Phase {
    method: Series,
    connect: Series,
    get_pooled: Series,
    get_fresh: Series,
    rss_before: u64,
    rss_peak: u64,
    rss_after: u64,
    fds_peak: usize,
}

/// Times `f`, bounded by [`OP_TIMEOUT`].
async fn op<F: std::future::Future<Output = Result<(), String>>>(f: F) -> Result<Duration, String> {
    let started = Instant::now();
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("not done within {OP_TIMEOUT:?}")),
    }
}

/// Runs the four legitimate loops for `seconds`, sampling the hub's memory.
async fn measure(
    hub: &HubProcess,
    legit: &Legit,
    fresh: &Legit,
    pooled: &reqwest::Client,
    seconds: u64,
) -> Result<Phase> {
    let mut phase = Phase {
        rss_before: hub.rss_kib(),
        ..Phase::default()
    };
    let until = Instant::now() + Duration::from_secs(seconds);
    let id = legit.device_cs.device_id.clone();

    // The connected device: one connection for the whole phase, answering every method.
    let mut options = DeviceClientOptions::new(legit.tls.clone());
    options.connect_timeout = OP_TIMEOUT;
    let connected = DeviceClient::connect(&legit.device_cs, &options)
        .await
        .context("the legitimate device connects")?;
    let mut methods = connected.methods;
    let responder = tokio::spawn(async move {
        while let Some(request) = methods.recv().await {
            let _ = request.respond(200, &json!({"ok": true})).await;
        }
    });

    let method_loop = async {
        let mut series = Series::default();
        let call = json!({"methodName": "ping", "payload": null, "responseTimeoutInSeconds": 5});
        while Instant::now() < until {
            let outcome = op(async {
                let r = pooled
                    .post(format!(
                        "{}/twins/{id}/methods?api-version=2021-04-12",
                        legit.base
                    ))
                    .header("Authorization", legit.owner_token())
                    .json(&call)
                    .send()
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let status = r.status();
                let body = r.text().await.map_err(|e| format!("{e:#}"))?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("{status} {body}"))
                }
            })
            .await;
            series.record(outcome);
        }
        series
    };
    let connect_loop = async {
        let mut series = Series::default();
        let mut options = DeviceClientOptions::new(fresh.tls.clone());
        options.connect_timeout = OP_TIMEOUT;
        while Instant::now() < until {
            let mut connected = None;
            let outcome = op(async {
                connected = Some(
                    DeviceClient::connect(&fresh.device_cs, &options)
                        .await
                        .map_err(|e| e.to_string())?,
                );
                Ok(())
            })
            .await;
            if let Some(c) = connected {
                c.client.close().await;
            }
            series.record(outcome);
            // Paced, so that the loop is not a connect flood itself.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        series
    };
    let pooled_loop = async {
        let mut series = Series::default();
        let url = format!("{}/twins/{id}?api-version=2021-04-12", legit.base);
        while Instant::now() < until {
            let outcome = op(async {
                let r = pooled
                    .get(&url)
                    .header("Authorization", legit.owner_token())
                    .send()
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                let status = r.status();
                r.bytes().await.map_err(|e| format!("{e:#}"))?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(status.to_string())
                }
            })
            .await;
            series.record(outcome);
        }
        series
    };
    let fresh_loop = async {
        let mut series = Series::default();
        while Instant::now() < until {
            let outcome = op(async {
                let r = legit
                    .owner(Method::GET, &format!("/twins/{id}"), None)
                    .await?;
                if r.status.is_success() {
                    Ok(())
                } else {
                    Err(r.status.to_string())
                }
            })
            .await;
            series.record(outcome);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        series
    };
    let sampler = async {
        let (mut peak, mut fds) = (0, 0);
        while Instant::now() < until {
            peak = hub.rss_kib().max(peak);
            fds = hub.open_fds().max(fds);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (peak, fds)
    };
    let (method, connect, get_pooled, get_fresh, (peak, fds)) =
        tokio::join!(method_loop, connect_loop, pooled_loop, fresh_loop, sampler);
    connected.client.close().await;
    responder.abort();
    phase.method = method;
    phase.connect = connect;
    phase.get_pooled = get_pooled;
    phase.get_fresh = get_fresh;
    phase.rss_peak = peak;
    phase.fds_peak = fds;
    Ok(phase)
}

/// Attack counters.
#[derive(Debug, Default)]
struct Crowd {
    held: AtomicUsize,
    opened: AtomicU64,
    dropped_by_hub: AtomicU64,
    refused: AtomicU64,
}

impl Crowd {
    /// Counts a connection as held while `until_dropped` runs (until `stop`); true when the hub
    /// dropped it.
    async fn hold(
        &self,
        stop: &CancellationToken,
        until_dropped: impl std::future::Future<Output = bool>,
    ) -> bool {
        self.held.fetch_add(1, Ordering::Relaxed);
        let dropped = tokio::select! {
            _ = stop.cancelled() => false,
            dropped = until_dropped => dropped,
        };
        self.held.fetch_sub(1, Ordering::Relaxed);
        dropped
    }
}

/// A TCP connection to `addr`, from 127.0.0.(2..=251) when `spread`.
async fn tcp_from(addr: SocketAddr, slot: usize, spread: bool) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if spread {
        let last = 2 + (slot % 250) as u8;
        socket.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))?;
    }
    socket.connect(addr).await
}

/// Holds `count` attacking connections until `stop`, reopening those the hub drops.
#[allow(clippy::too_many_arguments)]
fn start_crowd(
    set: &mut JoinSet<()>,
    crowd: &Arc<Crowd>,
    count: usize,
    addr: SocketAddr,
    hello: &Arc<Vec<u8>>,
    body: Option<(Arc<rustls::ClientConfig>, Arc<Vec<u8>>)>,
    spread: bool,
    stop: &CancellationToken,
) {
    // Setup concurrency: enough to build the crowd in seconds without starving the legitimate
    // loops of the same 2 cores.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    for slot in 0..count {
        let (crowd, hello, body, stop, gate) = (
            Arc::clone(crowd),
            Arc::clone(hello),
            body.clone(),
            stop.clone(),
            Arc::clone(&gate),
        );
        set.spawn(async move {
            while !stop.is_cancelled() {
                let Ok(permit) = gate.clone().acquire_owned().await else {
                    return;
                };
                crowd.opened.fetch_add(1, Ordering::Relaxed);
                let setup = tokio::time::timeout(OP_TIMEOUT, tcp_from(addr, slot, spread)).await;
                let Ok(Ok(mut tcp)) = setup else {
                    crowd.refused.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                };
                let until = Instant::now() + Duration::from_secs(3600);
                let dropped = match &body {
                    None => {
                        if tcp.write_all(&hello[..100.min(hello.len())]).await.is_err() {
                            true
                        } else {
                            drop(permit);
                            let closed = attack::closed_within(&mut tcp, Duration::from_secs(3600));
                            crowd.hold(&stop, async { closed.await.is_ok() }).await
                        }
                    }
                    Some((tls, head)) => {
                        let name =
                            rustls_pki_types::ServerName::try_from("localhost").expect("name");
                        let tls = tokio_rustls::TlsConnector::from(Arc::clone(tls));
                        match tokio::time::timeout(OP_TIMEOUT, tls.connect(name, tcp)).await {
                            Ok(Ok(mut s)) => {
                                if s.write_all(head).await.is_err() {
                                    true
                                } else {
                                    drop(permit);
                                    let body = [b' '; 1000];
                                    let trickled =
                                        trickle(&mut s, &body, 1, Duration::from_secs(1), until);
                                    crowd.hold(&stop, trickled).await
                                }
                            }
                            _ => true,
                        }
                    }
                };
                if dropped {
                    crowd.dropped_by_hub.fetch_add(1, Ordering::Relaxed);
                    // Reopen at a bounded rate: a refused slot retrying in a tight loop would
                    // measure the benchmark's CPU, not the hub.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        });
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let limits = raise_nofile();
    let hub_path = hub_binary(args.hub.clone())?;
    let data_dir = tempfile::tempdir()?;
    let hub = HubProcess::spawn(
        &hub_path,
        data_dir.path(),
        args.hub_nofile,
        Output::default(),
    );
    let legit = Legit::new(&hub, OP_TIMEOUT);
    let ledger = std::sync::Mutex::new(Ledger::default());
    let fresh_key = legit
        .create_device("bench-fresh", &ledger)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut fresh = legit.clone();
    fresh.device_cs = format!(
        "HostName={};DeviceId=bench-fresh;SharedAccessKey={fresh_key}",
        legit.device_cs.host_name
    )
    .parse()
    .context("bench-fresh connection string")?;
    let pooled = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(hub.ca_pem.as_bytes())?)
        .resolve("localhost", hub.https)
        .http1_only()
        .timeout(OP_TIMEOUT)
        .build()?;
    println!(
        "attack benchmark: {} half-open TLS on MQTT + {} slow bodies on HTTPS, {} s per phase; \
         hub {} (pid {}, open-file limit {}), here soft/hard {:?}, {} cores, load {}",
        args.tls,
        args.bodies,
        args.seconds,
        hub_path.display(),
        hub.pid(),
        args.hub_nofile
            .map_or_else(|| "inherited".to_owned(), |n| n.to_string()),
        limits,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let baseline = measure(&hub, &legit, &fresh, &pooled, args.seconds).await?;

    let stop = CancellationToken::new();
    let crowd = Arc::new(Crowd::default());
    let mut set = JoinSet::new();
    let hello = Arc::new(client_hello(&legit.tls));
    let rss_before_attack = hub.rss_kib();
    let head = format!(
        "PATCH /twins/{}?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
        legit.device_cs.device_id,
        legit.owner_token()
    );
    start_crowd(
        &mut set,
        &crowd,
        args.tls,
        hub.mqtt,
        &hello,
        None,
        args.spread_sources,
        &stop,
    );
    start_crowd(
        &mut set,
        &crowd,
        args.bodies,
        hub.https,
        &hello,
        Some((legit.tls.clone(), Arc::new(head.into_bytes()))),
        args.spread_sources,
        &stop,
    );
    // Let the crowd build (up to 30 s) before measuring.
    let building = Instant::now();
    while crowd.held.load(Ordering::Relaxed) < (args.tls + args.bodies) * 95 / 100
        && building.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "attack: {} connections held after {:.1?} ({} opened, {} refused)",
        crowd.held.load(Ordering::Relaxed),
        building.elapsed(),
        crowd.opened.load(Ordering::Relaxed),
        crowd.refused.load(Ordering::Relaxed)
    );
    let mut attacked = measure(&hub, &legit, &fresh, &pooled, args.seconds).await?;
    attacked.rss_before = rss_before_attack;
    let held_at_end = crowd.held.load(Ordering::Relaxed);
    stop.cancel();
    while set.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(3)).await;
    attacked.rss_after = hub.rss_kib();

    println!(
        "attack: held {held_at_end} at the end of the phase; {} connections opened in all, {} dropped by the hub, {} refused",
        crowd.opened.load(Ordering::Relaxed),
        crowd.dropped_by_hub.load(Ordering::Relaxed),
        crowd.refused.load(Ordering::Relaxed)
    );
    println!();
    println!(
        "{:<34} | {:^40} | {:^40}",
        "",
        "baseline",
        format!("{} half-open TLS + {} slow bodies", args.tls, args.bodies)
    );
    println!(
        "{:<34} | {:>5} {:>8} {:>8} {:>8} {:>4} | {:>5} {:>8} {:>8} {:>8} {:>4}",
        "operation", "n", "p50", "p99", "max", "fail", "n", "p50", "p99", "max", "fail"
    );
    let mut baseline = baseline;
    for (name, b, a) in [
        (
            "device method round trip",
            &mut baseline.method,
            &mut attacked.method,
        ),
        (
            "device connect (fresh)",
            &mut baseline.connect,
            &mut attacked.connect,
        ),
        (
            "REST GET twin (pooled)",
            &mut baseline.get_pooled,
            &mut attacked.get_pooled,
        ),
        (
            "REST GET twin (new connection)",
            &mut baseline.get_fresh,
            &mut attacked.get_fresh,
        ),
    ] {
        println!("{name:<34} | {} | {}", b.cell(), a.cell());
    }
    println!(
        "{:<34} | {:>40} | {:>40}",
        "hub RSS before / peak / after",
        format!(
            "{} / {} MiB",
            baseline.rss_before / 1024,
            baseline.rss_peak / 1024
        ),
        format!(
            "{} / {} / {} MiB",
            attacked.rss_before / 1024,
            attacked.rss_peak / 1024,
            attacked.rss_after / 1024
        )
    );
    println!(
        "{:<34} | {:>40} | {:>40}",
        "hub open files (peak)", baseline.fds_peak, attacked.fds_peak
    );
    for (name, s) in [
        ("device method", &attacked.method),
        ("device connect", &attacked.connect),
        ("REST pooled", &attacked.get_pooled),
        ("REST new connection", &attacked.get_fresh),
    ] {
        if let Some(e) = &s.first_error {
            println!("first failure under attack, {name}: {e}");
        }
    }
    Ok(())
}
