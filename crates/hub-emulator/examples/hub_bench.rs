//! Hub benchmark: N devices connect over MQTT/TLS, then a direct method is invoked on every
//! device through the REST API, once per concurrency level (e.g. 16, 64 and 256 requests in
//! flight), so the throughput/latency curve shows where p99 crosses a latency target.
//!
//! Prints TLS connects/s (full handshakes unless `--tls-resume`), methods/s with p50/p90/p99/max
//! latency per level, the hub's resident memory per connected device, and for every phase the
//! CPU time the hub and this benchmark each used (per operation: load-independent, unlike
//! rates on a shared machine) and the load average when the phase started.
//!
//! The hub runs as a separate process (the `hub-emulator` binary next to this example, or
//! `--hub PATH`) so that its memory and CPU are measured alone. The clients are kept cheap so
//! that the hub is what is measured: each device is one task with a minimal MQTT client over
//! tokio-rustls (rumqttc's codec, no event loop), and REST requests reuse one precomputed SAS
//! header, body and URL per device.
//!
//! Run with: `cargo build --release -p hub-emulator --bins --examples &&
//! target/release/examples/hub_bench --devices 10000 --concurrency 16,64,256`. It raises its
//! open-file limit as far as it may (as root, to `fs.nr_open`; the hub inherits it), and spreads
//! its devices' source addresses over 127.0.1.x (`--source-ips`, by default one address per
//! 20,000 devices) so that 100,000 connections do not run out of ephemeral ports.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use futures_util::StreamExt as _;
use futures_util::stream;
use hub_core::connection_string::{ServiceConnectionString, SharedKey};
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsConnector;

const REGISTER_CONCURRENCY: usize = 64;
const METHOD_BODY: &str =
    r#"{"methodName":"lockDoor","payload":{"lockTime":"10m"},"responseTimeoutInSeconds":30}"#;
const METHOD_ANSWER: &[u8] = br#"{"Response":"ok"}"#;

/// Benchmark the hub-emulator binary: TLS connects, direct methods, memory.
#[derive(Debug, Parser)]
struct Args {
    /// How many devices to register and connect.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// The hub binary (default: `hub-emulator` in the target directory of this example).
    #[arg(long)]
    hub: Option<PathBuf>,
    /// Method requests in flight, one measured pass over all devices per level.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    concurrency: Vec<usize>,
    /// TLS handshakes (plus CONNECT and SUBSCRIBE) in flight during the connect phase.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Let clients resume TLS sessions (tickets from earlier connections) instead of doing a
    /// full handshake each; reports how many were resumed.
    #[arg(long)]
    tls_resume: bool,
    /// Source addresses to spread the devices over (127.0.1.1 to 127.0.1.N, at most 254);
    /// 0 picks one per 20,000 devices (each address has about 28,000 ephemeral ports).
    #[arg(long, default_value_t = 0)]
    source_ips: u8,
}

/// CPU time (user + system) of a process so far, from `/proc/<pid>/stat` (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("read /proc stat")?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("stat field")
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("read /proc status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS not found")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn hub_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/hub_bench -> target/<profile>/hub-emulator
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("example path")?;
    let bin = dir.join("hub-emulator");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p hub-emulator --bins` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn tls_config(ca_pem: &str, resume: bool) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if resume {
        config.resumption = rustls::client::Resumption::in_memory_sessions(4096);
    } else {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// CPU used by the hub and by this process over one phase.
struct Phase {
    hub_pid: u32,
    started: Instant,
    hub_cpu: Duration,
    own_cpu: Duration,
    load: String,
}

impl Phase {
    fn start(hub_pid: u32) -> Result<Phase> {
        Ok(Phase {
            hub_pid,
            load: load_average(),
            hub_cpu: cpu_time(hub_pid)?,
            own_cpu: cpu_time(std::process::id())?,
            started: Instant::now(),
        })
    }

    /// Wall time, and a line with CPU per operation for `ops` operations.
    fn finish(&self, ops: usize) -> Result<(Duration, String)> {
        let elapsed = self.started.elapsed();
        let hub = cpu_time(self.hub_pid)? - self.hub_cpu;
        let own = cpu_time(std::process::id())? - self.own_cpu;
        let per = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
        let line = format!(
            "CPU: hub {:.2}s ({:.0} us/op, {:.2} cores), bench {:.2}s ({:.0} us/op); load average at start {}",
            hub.as_secs_f64(),
            per(hub),
            hub.as_secs_f64() / elapsed.as_secs_f64(),
            own.as_secs_f64(),
            per(own),
            self.load
        );
        Ok((elapsed, line))
    }
}

#[derive(Deserialize)]
struct MethodReply {
    status: i32,
}

struct Service {
    http: reqwest::Client,
    base: String,
    auth: String,
}

impl Service {
    async fn put_device(&self, id: &str) -> Result<String> {
        let response = self
            .http
            .put(format!("{}/devices/{id}?api-version=2021-04-12", self.base))
            .header("Authorization", &self.auth)
            .json(&serde_json::json!({"deviceId": id}))
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() {
            bail!("create {id}: {status} {body}");
        }
        body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .map(str::to_owned)
            .context("primary key")
    }

    async fn invoke(&self, url: reqwest::Url) -> Result<Duration> {
        let started = Instant::now();
        let response = self
            .http
            .post(url)
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .body(METHOD_BODY)
            .send()
            .await?;
        let status = response.status();
        let body = response.bytes().await?;
        let reply: Option<MethodReply> = serde_json::from_slice(&body).ok();
        if !status.is_success() || reply.is_none_or(|r| r.status != 200) {
            bail!("method: {status} {}", String::from_utf8_lossy(&body));
        }
        Ok(started.elapsed())
    }
}

/// One device: TLS, CONNECT, SUBSCRIBE to methods; reports its handshake kind once subscribed,
/// then answers every method request with 200 until the hub closes the connection.
async fn run_device(
    connector: TlsConnector,
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    connect: Connect,
    subscribed: mpsc::Sender<Result<HandshakeKind>>,
) {
    let mut tls = match handshake(&connector, addr, source, connect).await {
        Ok(tls) => tls,
        Err(e) => {
            let _ = subscribed.send(Err(e)).await;
            return;
        }
    };
    let kind = tls.get_ref().1.handshake_kind();
    let mut subscribed = Some(subscribed);
    let mut rbuf = BytesMut::with_capacity(256);
    let mut wbuf = BytesMut::with_capacity(128);
    loop {
        match Packet::read(&mut rbuf, 64 * 1024) {
            Ok(Packet::SubAck(_)) => {
                if let Some(tx) = subscribed.take() {
                    let _ = tx
                        .send(kind.context("handshake kind after the handshake"))
                        .await;
                }
            }
            Ok(Packet::Publish(publish)) => {
                let Some((_, rid)) = publish.topic.split_once("?$rid=") else {
                    continue;
                };
                let topic = format!("$iothub/methods/res/200/?$rid={rid}");
                let answer =
                    Publish::from_bytes(topic, QoS::AtMostOnce, Bytes::from_static(METHOD_ANSWER));
                let _ = Packet::Publish(answer).write(&mut wbuf, usize::MAX);
            }
            Ok(_) => {}
            Err(CodecError::InsufficientBytes(_)) => {
                if !wbuf.is_empty() {
                    if tls.write_all(&wbuf).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                    wbuf.clear();
                }
                rbuf.reserve(256);
                match tls.read_buf(&mut rbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            Err(e) => {
                eprintln!("device: bad packet from the hub: {e}");
                return;
            }
        }
    }
}

async fn handshake(
    connector: &TlsConnector,
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    connect: Connect,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    // Binding picks the port at bind time, a search that slows down as the address's ports
    // fill (without IP_BIND_ADDRESS_NO_PORT), so one source address is left to connect().
    if let Some(source) = source {
        socket
            .bind(SocketAddr::from((source, 0)))
            .with_context(|| format!("bind {source}"))?;
    }
    let tcp = socket.connect(addr).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    // CONNECT and SUBSCRIBE in one write: the hub reads packets sent right behind CONNECT.
    let mut wbuf = BytesMut::with_capacity(512);
    Packet::Connect(connect).write(&mut wbuf, usize::MAX)?;
    let subscribe = Subscribe::new("$iothub/methods/POST/#", QoS::AtMostOnce);
    Packet::Subscribe(subscribe).write(&mut wbuf, usize::MAX)?;
    tls.write_all(&wbuf).await?;
    tls.flush().await?;
    Ok(tls)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let devices = args.devices;
    let open_files = hub_emulator::limits::raise_open_file_limit();
    let source_ips = match args.source_ips {
        0 => u8::try_from(devices.div_ceil(20_000).clamp(1, 254)).unwrap_or(254),
        n => n.min(254),
    };
    let data_dir = tempfile::tempdir()?;
    let hub_path = hub_binary(args.hub.clone())?;
    let mut hub = tokio::process::Command::new(&hub_path)
        .args([
            "--in-memory",
            "--mqtt-port",
            "0",
            "--https-port",
            "0",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", hub_path.display()))?;
    let stdout = hub.stdout.take().context("hub stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut env = HashMap::new();
    while let Some(line) = lines.next_line().await? {
        if line == "hub-emulator ready" {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    let hub_pid = hub.id().context("hub pid")?;
    let cs: ServiceConnectionString = env
        .get("IOTHUB_CONNECTION_STRING")
        .context("service connection string")?
        .parse()?;
    let device_cs = env
        .get("IOTHUB_DEVICE_CONNECTION_STRING")
        .context("device connection string")?
        .clone();
    let mqtt_port: u16 = device_cs
        .split(';')
        .find_map(|p| p.strip_prefix("HostName=localhost:"))
        .and_then(|p| p.parse().ok())
        .context("MQTT port in HostName")?;
    let ca_pem = std::fs::read_to_string(data_dir.path().join("ca.pem"))?;
    let max_concurrency = args.concurrency.iter().copied().max().unwrap_or(1);
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .pool_max_idle_per_host(max_concurrency.max(REGISTER_CONCURRENCY))
        .http1_only()
        .build()?;
    let auth = hub_core::sas::generate(
        &cs.host_name.to_string(),
        &cs.key,
        Some(&cs.policy_name),
        now_unix() + 3600,
    );
    let service = Arc::new(Service {
        http,
        base: format!("https://{}", cs.host_name),
        auth,
    });

    println!(
        "hub-emulator benchmark: {devices} devices, {} cores, hub {} (pid {hub_pid})",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        hub_path.display()
    );
    println!(
        "open-file limit {}, {}",
        open_files.map_or("unknown".to_owned(), |n| n.to_string()),
        if source_ips > 1 {
            format!("devices spread over {source_ips} source addresses (127.0.1.1-{source_ips})")
        } else {
            "devices from 127.0.0.1".to_owned()
        }
    );
    let started = Instant::now();
    let ids: Vec<String> = (0..devices).map(|i| format!("bench-{i:05}")).collect();
    let keys: Vec<(String, String)> = stream::iter(ids.clone())
        .map(|id| {
            let service = Arc::clone(&service);
            async move { service.put_device(&id).await.map(|key| (id, key)) }
        })
        .buffer_unordered(REGISTER_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    println!("registered {devices} devices in {:.2?}", started.elapsed());

    // Everything a device sends is prepared before the clock starts.
    let host = format!("localhost:{mqtt_port}");
    let mut connects = Vec::with_capacity(devices);
    for (id, key) in &keys {
        let resource = hub_core::sas::device_resource_uri(&host, id, None);
        let key = SharedKey::from_base64(key)?;
        let password = hub_core::sas::generate(&resource, &key, None, now_unix() + 3600);
        let mut connect = Connect::new(id.clone());
        connect.keep_alive = 300;
        connect.clean_session = false;
        connect.set_login(format!("{host}/{id}/?api-version=2021-04-12"), password);
        connects.push(connect);
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], mqtt_port));
    let connector = TlsConnector::from(tls_config(&ca_pem, args.tls_resume)?);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(hub_pid)?;
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::channel::<Result<HandshakeKind>>(devices.max(1));
    let phase = Phase::start(hub_pid)?;
    let feeder = {
        let gate = Arc::clone(&gate);
        tokio::spawn(async move {
            for (n, connect) in connects.into_iter().enumerate() {
                let source = (source_ips > 1)
                    .then(|| Ipv4Addr::new(127, 0, 1, 1 + (n % usize::from(source_ips)) as u8));
                let Ok(permit) = Arc::clone(&gate).acquire_owned().await else {
                    return;
                };
                let (one_tx, mut one_rx) = mpsc::channel(1);
                tokio::spawn(run_device(connector.clone(), addr, source, connect, one_tx));
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let result = one_rx
                        .recv()
                        .await
                        .unwrap_or_else(|| Err(anyhow::anyhow!("closed before SUBACK")));
                    drop(permit);
                    let _ = done_tx.send(result).await;
                });
            }
        })
    };
    let mut resumed = 0usize;
    for _ in 0..devices {
        let result = tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .context("devices did not all connect within 120 s")?
            .context("connect tasks ended")?;
        if result? == HandshakeKind::Resumed {
            resumed += 1;
        }
    }
    let (connect_elapsed, cpu) = phase.finish(devices)?;
    feeder.await?;
    println!(
        "connected {devices} devices over TLS ({} in flight, {resumed} resumed handshakes) in {:.2?}: {:.0} connects/s",
        args.connect_concurrency,
        connect_elapsed,
        devices as f64 / connect_elapsed.as_secs_f64()
    );
    println!("  {cpu}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(hub_pid)?;
    println!(
        "hub resident memory: {rss_before} KiB before, {rss_after} KiB after: {:.1} KiB per connected device",
        (rss_after.saturating_sub(rss_before)) as f64 / devices as f64
    );

    let urls: Vec<reqwest::Url> = ids
        .iter()
        .map(|id| format!("{}/twins/{id}/methods?api-version=2021-04-12", service.base).parse())
        .collect::<Result<_, _>>()?;
    for &concurrency in &args.concurrency {
        let concurrency = concurrency.max(1);
        // Warm-up (not measured): opens the HTTPS connections this level keeps in its pool.
        let warmup = (2 * concurrency).min(devices);
        let _: Vec<Duration> = stream::iter(urls.iter().take(warmup).cloned())
            .map(|url| {
                let service = Arc::clone(&service);
                async move { service.invoke(url).await }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        let phase = Phase::start(hub_pid)?;
        let mut latencies: Vec<Duration> = stream::iter(urls.iter().cloned())
            .map(|url| {
                let service = Arc::clone(&service);
                async move { service.invoke(url).await }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        let (elapsed, cpu) = phase.finish(devices)?;
        latencies.sort();
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "methods at {concurrency:>4} in flight: {:.0} methods/s, p50 {:.2?}, p90 {:.2?}, p99 {:.2?}, max {:.2?} ({devices} in {:.2?})",
            devices as f64 / elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(1.0),
            elapsed
        );
        println!("  {cpu}");
    }
    println!(
        "hub resident memory after the methods: {} KiB",
        rss_kib(hub_pid)?
    );
    hub.start_kill()?;
    Ok(())
}
