//! The attack suite's harness: the real `hub-emulator` binary as a child process (durable data
//! dir, free ports, optionally a lowered open-file limit so that exhaustion is reachable in CI),
//! every line it prints kept for the `panicked` check, the legitimate device and service client
//! whose calls must keep working after every probe, and raw TLS/MQTT/HTTP pieces for the probes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use hub_core::connection_string::{DeviceConnectionString, ServiceConnectionString, SharedKey};
use hub_core::device_client::{DeviceClient, DeviceClientOptions};
use hub_core::sas;
use reqwest::{Method, StatusCode};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet as RawPacket, Publish, Subscribe};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A positive integer from the environment, else `default` (the suite's counts and bounds).
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The soft and hard open-file limits of this process, from `/proc/self/limits`.
pub fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.split_whitespace().skip(3);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Seconds since the epoch (SAS expiries).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Every line the hub printed, stdout and stderr interleaved as they arrived.
#[derive(Debug, Clone, Default)]
pub struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    /// The lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines[lines.len().saturating_sub(n)..].to_vec()
    }
}

/// The `hub-emulator` binary running in a child process; killed on drop.
#[derive(Debug)]
pub struct HubProcess {
    child: Child,
    pub data_dir: PathBuf,
    pub mqtt: SocketAddr,
    pub https: SocketAddr,
    pub service_cs: ServiceConnectionString,
    pub device_cs: DeviceConnectionString,
    pub ca_pem: String,
    pub output: Output,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HubProcess {
    /// Starts `bin` on free ports with its state in `data_dir` (durable), an open-file limit of
    /// `nofile` if given, and waits until it prints `hub-emulator ready`.
    pub fn spawn(bin: &Path, data_dir: &Path, nofile: Option<u64>, output: Output) -> HubProcess {
        let hub_args = [
            "--data-dir".as_ref(),
            data_dir.as_os_str(),
            "--mqtt-port".as_ref(),
            "0".as_ref(),
            "--https-port".as_ref(),
            "0".as_ref(),
        ];
        let mut command = match nofile {
            // `ulimit` in a shell that then execs the hub: the limit applies to the hub alone,
            // and the pid stays the hub's.
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"ulimit -n "$1" && shift && exec "$@""#)
                    .arg("sh")
                    .arg(n.to_string())
                    .arg(bin)
                    .args(hub_args);
                c
            }
            None => {
                let mut c = Command::new(bin);
                c.args(hub_args);
                c
            }
        };
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("hub stdout");
        let out = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Nobody listens once the hub is ready; the send then fails harmlessly.
                let _ = ready_tx.send(line.clone());
                out.push(line);
            }
        });
        let stderr = child.stderr.take().expect("hub stderr");
        let out = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                out.push(line);
            }
        });
        let mut env = BTreeMap::new();
        let mut addrs = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = ready_rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "the hub did not print `hub-emulator ready` within 60 s; it printed:\n{}",
                    output.tail(40).join("\n")
                )
            });
            if line == "hub-emulator ready" {
                break;
            }
            if let Some(rest) = line.strip_prefix("# written to ") {
                addrs = parse_addrs(rest);
            } else if let Some((k, v)) = line.split_once('=') {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        let (mqtt, https) = addrs.expect("the hub prints its MQTT and HTTPS addresses");
        let service_cs = env["IOTHUB_CONNECTION_STRING"]
            .parse()
            .expect("service connection string");
        let device_cs = env["IOTHUB_DEVICE_CONNECTION_STRING"]
            .parse()
            .expect("device connection string");
        let ca_pem = std::fs::read_to_string(&env["IOTHUB_CA_FILE"]).expect("CA file");
        HubProcess {
            child,
            data_dir: data_dir.to_owned(),
            mqtt,
            https,
            service_cs,
            device_cs,
            ca_pem,
            output,
        }
    }

    /// The hub's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the hub still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory (KiB) from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid()).unwrap_or(0)
    }

    /// Open file descriptors of the hub.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// The primary keys of the hub's policies, read from the store in `data_dir` while no hub runs
/// (the hub holds its database exclusively). The emulator prints only iothubowner's; the others
/// are what a user would copy from the portal.
pub fn policy_keys(data_dir: &Path) -> BTreeMap<String, SharedKey> {
    let db = rusqlite::Connection::open_with_flags(
        data_dir.join("hub.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open hub.db");
    let text: String = db
        .query_row("SELECT value FROM meta WHERE key = 'policies'", [], |r| {
            r.get(0)
        })
        .expect("policies record");
    let policies: Value = serde_json::from_str(&text).expect("policies JSON");
    policies
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let key = SharedKey::from_base64(p["primary_key"].as_str()?).ok()?;
            Some((p["name"].as_str()?.to_owned(), key))
        })
        .collect()
}

/// `{hub.env} (...); MQTT/TLS on A, HTTPS on B`.
fn parse_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.split_once("MQTT/TLS on ")?.1;
    let (mqtt, https) = rest.split_once(", HTTPS on ")?;
    Some((mqtt.trim().parse().ok()?, https.trim().parse().ok()?))
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A rustls client configuration trusting the hub's CA (TLS 1.2 and 1.3).
pub fn tls_config(ca_pem: &str) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in hub_core::tls::parse_ca_pem(ca_pem.as_bytes(), Path::new("ca.pem")).expect("CA") {
        roots.add(cert).expect("CA certificate");
    }
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The first flight of a TLS client (its ClientHello record), for handshakes sent slowly or
/// never finished.
pub fn client_hello(config: &Arc<ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::clone(config), name).expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("ClientHello");
    }
    hello
}

/// Writes acknowledged by the hub during the suite, to be read back at the end.
#[derive(Debug, Default)]
pub struct Ledger {
    /// `properties.desired.attack.{key}` acknowledged by `PATCH /twins` (200).
    pub desired: BTreeMap<String, u64>,
    /// `properties.reported.attack.{key}` acknowledged on `$iothub/twin/res/204`.
    pub reported: BTreeMap<String, u64>,
    /// Devices created (200 on `PUT /devices/{id}`).
    pub devices: Vec<String>,
}

impl Ledger {
    /// What of the ledger `twin` (of the legitimate device) and `devices` (ids the registry
    /// lists) lack.
    pub fn missing(&self, twin: &Value, devices: &[String]) -> Vec<String> {
        let mut missing = Vec::new();
        for (section, entries) in [("desired", &self.desired), ("reported", &self.reported)] {
            for (key, value) in entries {
                let found = &twin["properties"][section]["attack"][key];
                if found != &json!(value) {
                    missing.push(format!("{section}.attack.{key}={value} (found {found})"));
                }
            }
        }
        for id in &self.devices {
            if !devices.contains(id) {
                missing.push(format!("device {id}"));
            }
        }
        missing
    }
}

/// A REST answer: status and body text.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
}

/// The legitimate clients: a device (hub-core's `DeviceClient`, connected afresh for every
/// check) and a service caller whose every request opens a new TLS connection, so that a hub
/// that stops accepting is noticed rather than hidden by a pooled connection.
#[derive(Debug, Clone)]
pub struct Legit {
    http: reqwest::Client,
    pub base: String,
    /// The service audience (`localhost:<https>`).
    pub host: String,
    owner_key: SharedKey,
    pub device_cs: DeviceConnectionString,
    pub tls: Arc<ClientConfig>,
    /// How long one whole check may take.
    pub bound: Duration,
}

impl Legit {
    pub fn new(hub: &HubProcess, bound: Duration) -> Legit {
        let ca = reqwest::Certificate::from_pem(hub.ca_pem.as_bytes()).expect("CA PEM");
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .resolve("localhost", hub.https)
            .pool_max_idle_per_host(0)
            .http1_only()
            .connect_timeout(bound)
            .timeout(bound)
            .build()
            .expect("client");
        Legit {
            http,
            base: format!("https://localhost:{}", hub.https.port()),
            host: hub.service_cs.host_name.to_string(),
            owner_key: hub.service_cs.key.clone(),
            device_cs: hub.device_cs.clone(),
            tls: tls_config(&hub.ca_pem),
            bound,
        }
    }

    /// An iothubowner token for the REST API.
    pub fn owner_token(&self) -> String {
        sas::generate(
            &self.host,
            &self.owner_key,
            Some("iothubowner"),
            unix_now() + 3600,
        )
    }

    /// A REST call with `auth` (None: no header) and a raw body.
    pub async fn rest(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{separator}api-version=2021-04-12", self.base);
        let mut request = self.http.request(method.clone(), url);
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {path}: {e:#}"))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| format!("{method} {path}: body: {e:#}"))?;
        Ok(Reply { status, body })
    }

    /// A REST call as iothubowner with a JSON body.
    pub async fn owner(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, String> {
        let body = body.map(|b| serde_json::to_vec(b).expect("JSON"));
        self.owner_bytes(method, path, body).await
    }

    /// A REST call as iothubowner with a raw body.
    pub async fn owner_bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        self.rest(method, path, Some(&self.owner_token()), body)
            .await
    }

    /// Registers `id`; returns its primary key.
    pub async fn create_device(&self, id: &str, ledger: &Mutex<Ledger>) -> Result<String, String> {
        let reply = self
            .owner(
                Method::PUT,
                &format!("/devices/{id}"),
                Some(&json!({"deviceId": id})),
            )
            .await?;
        if reply.status != StatusCode::OK {
            return Err(format!(
                "PUT /devices/{id}: {} {}",
                reply.status, reply.body
            ));
        }
        let body: Value = serde_json::from_str(&reply.body).map_err(|e| e.to_string())?;
        lock(ledger).devices.push(id.to_owned());
        body["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no key in {body}"))
    }

    /// The legitimate device and service at work, all within `self.bound`: the device connects
    /// (TLS, CONNECT, subscriptions, twin read), answers a direct method invoked through REST,
    /// the service reads and patches the twin, the device patches its reported properties.
    /// Acknowledged writes go into `ledger` under `tag`. Returns how long it took.
    pub async fn check(&self, tag: &str, ledger: &Mutex<Ledger>) -> Result<Duration, String> {
        let started = Instant::now();
        match timeout(self.bound, self.check_unbounded(tag, ledger)).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(format!("legit ({:.1?}): {e}", started.elapsed())),
            Err(_) => Err(format!("legit: not done within {:?}", self.bound)),
        }
    }

    async fn check_unbounded(&self, tag: &str, ledger: &Mutex<Ledger>) -> Result<(), String> {
        let id = self.device_cs.device_id.clone();
        let mut options = DeviceClientOptions::new(Arc::clone(&self.tls));
        options.connect_timeout = self.bound;
        options.operation_timeout = self.bound;
        let connected = DeviceClient::connect(&self.device_cs, &options)
            .await
            .map_err(|e| format!("device connect: {e}"))?;
        let client = connected.client;
        let mut methods = connected.methods;
        let responder = tokio::spawn(async move {
            while let Some(request) = methods.recv().await {
                let payload = request.json().ok().flatten().unwrap_or(Value::Null);
                let _ = request.respond(200, &json!({"echo": payload})).await;
            }
        });
        let outcome = async {
            let call = json!({
                "methodName": "ping",
                "payload": {"tag": tag},
                "responseTimeoutInSeconds": 10,
                "connectTimeoutInSeconds": 0,
            });
            let reply = self
                .owner(Method::POST, &format!("/twins/{id}/methods"), Some(&call))
                .await?;
            let body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
            if reply.status != StatusCode::OK || body["payload"]["echo"]["tag"] != tag {
                return Err(format!("method: {} {}", reply.status, reply.body));
            }
            let reply = self
                .owner(Method::GET, &format!("/twins/{id}"), None)
                .await?;
            if reply.status != StatusCode::OK {
                return Err(format!("GET twin: {} {}", reply.status, reply.body));
            }
            let n = next_write();
            let key = format!("k{n}");
            let patch = json!({"properties": {"desired": {"attack": {&key: n}}}});
            let reply = self
                .owner(Method::PATCH, &format!("/twins/{id}"), Some(&patch))
                .await?;
            if reply.status != StatusCode::OK {
                return Err(format!("PATCH twin: {} {}", reply.status, reply.body));
            }
            lock(ledger).desired.insert(key.clone(), n);
            client
                .patch_reported(&json!({"attack": {&key: n}}))
                .await
                .map_err(|e| format!("reported patch: {e}"))?;
            lock(ledger).reported.insert(key, n);
            Ok(())
        }
        .await;
        client.close().await;
        responder.abort();
        outcome
    }
}

/// A number unique in this process, for ledger keys.
fn next_write() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A std mutex guard; never held across `.await` (the ledger's critical sections are inserts).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TLS connection to `addr` trusting `config`, within `bound`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    bound: Duration,
) -> Result<TlsStream<TcpStream>, String> {
    let connecting = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("TCP connect {addr}: {e}"))?;
        let name = ServerName::try_from("localhost").expect("server name");
        TlsConnector::from(Arc::clone(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))
    };
    timeout(bound, connecting)
        .await
        .map_err(|_| format!("TLS connect to {addr}: not done within {bound:?}"))?
}

/// Reads until the peer closes; Ok(bytes received) if it closed within `bound`.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    bound: Duration,
) -> Result<Vec<u8>, String> {
    let mut received = Vec::new();
    let reading = async {
        let mut buf = [0_u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    // Enough to show what was answered; the rest is not looked at.
                    if received.len() > 64 * 1024 {
                        received.truncate(64 * 1024);
                    }
                }
            }
        }
    };
    match timeout(bound, reading).await {
        Ok(()) => Ok(received),
        Err(_) => Err(format!("the hub kept the connection open for {bound:?}")),
    }
}

/// The bytes of an MQTT CONNECT for `id` with `password` as IoT Hub expects it.
pub fn connect_packet(host: &str, id: &str, password: &str) -> Vec<u8> {
    let mut connect = Connect::new(id);
    connect.keep_alive = 60;
    connect.clean_session = false;
    connect.set_login(format!("{host}/{id}/?api-version=2021-04-12"), password);
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode CONNECT");
    buf.to_vec()
}

/// The bytes of a PUBLISH.
pub fn publish_packet(topic: &str, qos: QoS, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut publish = Publish::new(topic, qos, payload.to_vec());
    publish.pkid = pkid;
    let mut buf = BytesMut::new();
    publish.write(&mut buf).expect("encode PUBLISH");
    buf.to_vec()
}

/// The bytes of a SUBSCRIBE to one filter.
pub fn subscribe_packet(filter: &str, pkid: u16) -> Vec<u8> {
    let mut subscribe = Subscribe::new(filter, QoS::AtLeastOnce);
    subscribe.pkid = pkid;
    let mut buf = BytesMut::new();
    subscribe.write(&mut buf).expect("encode SUBSCRIBE");
    buf.to_vec()
}

/// Reads one MQTT packet within `bound`: Ok(None) when the hub closed the connection.
pub async fn read_packet(
    stream: &mut TlsStream<TcpStream>,
    buf: &mut BytesMut,
    bound: Duration,
) -> Result<Option<RawPacket>, String> {
    let reading = async {
        loop {
            if let Ok(packet) = RawPacket::read(buf, 1024 * 1024) {
                return Some(packet);
            }
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    timeout(bound, reading)
        .await
        .map_err(|_| format!("neither an answer nor a close within {bound:?}"))
}

/// A device MQTT session over raw TLS: CONNECT sent, CONNACK read. Ok(stream) when accepted;
/// Err with the CONNACK code or the failure otherwise.
pub async fn mqtt_session(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    host: &str,
    id: &str,
    password: &str,
    bound: Duration,
) -> Result<(TlsStream<TcpStream>, BytesMut), String> {
    let mut stream = tls_connect(addr, config, bound).await?;
    stream
        .write_all(&connect_packet(host, id, password))
        .await
        .map_err(|e| format!("send CONNECT: {e}"))?;
    let mut buf = BytesMut::new();
    match read_packet(&mut stream, &mut buf, bound).await? {
        Some(RawPacket::ConnAck(ack))
            if ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
        {
            Ok((stream, buf))
        }
        Some(RawPacket::ConnAck(ack)) => Err(format!("CONNACK {:?}", ack.code)),
        Some(other) => Err(format!("expected CONNACK, got {other:?}")),
        None => Err("closed before CONNACK".to_owned()),
    }
}

/// Sends `data` one chunk of `chunk` bytes every `every`, until done or `until`; Ok(true) when
/// the hub closed the connection first (a write or a read saw it).
pub async fn trickle<S: tokio::io::AsyncWrite + tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    data: &[u8],
    chunk: usize,
    every: Duration,
    until: Instant,
) -> bool {
    let mut sent = 0;
    let mut scratch = [0_u8; 1024];
    while Instant::now() < until {
        if sent < data.len() {
            let end = (sent + chunk).min(data.len());
            if stream.write_all(&data[sent..end]).await.is_err() || stream.flush().await.is_err() {
                return true;
            }
            sent = end;
        }
        // Waiting by reading notices a close at once; anything answered is ignored.
        match timeout(every, stream.read(&mut scratch)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    false
}

/// Percentiles of latencies (sorted in place): (p50, p99, max).
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.50), at(0.99), samples[samples.len() - 1])
}
