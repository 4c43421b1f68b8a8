//! The attack suite (issue 13): hostile clients against the real `hub-emulator` binary, each probe
//! bounded in time, and after every probe a legitimate device (connect, direct method) and a
//! legitimate service caller (GET + PATCH twin) must still be served within a bound. At the end
//! the hub must be alive, must have printed no line with `panicked`, and, after `kill -9` and a
//! restart on the same data dir, must still hold every write it acknowledged.
//!
//! The hub runs with a lowered open-file limit (`ATTACK_HUB_NOFILE`, 1024) so that the resource
//! probes (`ATTACK_FLOOD` connections each, 1100) reach exhaustion on a CI runner. Other knobs:
//! `ATTACK_HOLD_SECS` (6, how long each resource attack is held), `ATTACK_LEGIT_BOUND_SECS` (5),
//! `ATTACK_PROBE_BOUND_SECS` (5, how long a probe's expected answer may take),
//! `ATTACK_GROUP_DEVICES` (200), `ATTACK_MAX_RSS_MIB` (256, the hub's peak resident memory
//! allowed during a resource attack), `ATTACK_PROBES` (comma-separated name fragments: run only those).
//! Run with: `cargo test -p hub-emulator --test attack -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hub_core::connection_string::SharedKey;
use hub_core::sas;
use reqwest::{Method, StatusCode};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Packet as RawPacket;
use rustls::ClientConfig;
use serde_json::{Value, json};
use support::attack::{
    HubProcess, Ledger, Legit, Output, client_hello, closed_within, connect_packet, env_usize,
    lock, mqtt_session, nofile_limits, percentiles, policy_keys, publish_packet, read_packet,
    subscribe_packet, tls_connect, trickle, unix_now,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// The suite's settings, from the environment (see the module comment).
#[derive(Debug, Clone)]
struct Knobs {
    hub_nofile: u64,
    flood: usize,
    hold: Duration,
    legit_bound: Duration,
    probe_bound: Duration,
    group_devices: usize,
    max_rss_mib: u64,
    only: Vec<String>,
}

impl Knobs {
    /// Whether `ATTACK_PROBES` (if set) selects the probe `name`.
    fn selected(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }

    fn from_env() -> Knobs {
        Knobs {
            hub_nofile: env_usize("ATTACK_HUB_NOFILE", 1024) as u64,
            flood: env_usize("ATTACK_FLOOD", 1100),
            hold: Duration::from_secs(env_usize("ATTACK_HOLD_SECS", 6) as u64),
            legit_bound: Duration::from_secs(env_usize("ATTACK_LEGIT_BOUND_SECS", 5) as u64),
            probe_bound: Duration::from_secs(env_usize("ATTACK_PROBE_BOUND_SECS", 5) as u64),
            group_devices: env_usize("ATTACK_GROUP_DEVICES", 200),
            max_rss_mib: env_usize("ATTACK_MAX_RSS_MIB", 256) as u64,
            only: std::env::var("ATTACK_PROBES")
                .map(|v| v.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }
}

/// What every probe can reach.
struct Ctx {
    knobs: Knobs,
    hub: Mutex<HubProcess>,
    mqtt: SocketAddr,
    https: SocketAddr,
    legit: Legit,
    ledger: Mutex<Ledger>,
    tls: Arc<ClientConfig>,
    /// The MQTT HostName (`localhost:<port>`), the device SAS audience's host.
    mqtt_host: String,
    /// A registered device the probes act as (its key).
    attacker: (String, String),
    /// A registered device whose topics the attacker reaches for.
    victim: (String, String),
    /// The hub's policies' primary keys.
    policies: BTreeMap<String, SharedKey>,
}

/// One probe's outcome.
struct Verdict {
    name: String,
    probe: Result<String, String>,
    after: Result<String, String>,
}

type ProbeResult = Result<String, String>;

impl Ctx {
    fn bound(&self) -> Duration {
        self.knobs.probe_bound
    }

    fn device_token(&self, id: &str, key: &str, expiry: u64) -> String {
        let key = SharedKey::from_base64(key).expect("base64 key");
        sas::generate(
            &sas::device_resource_uri(&self.mqtt_host, id, None),
            &key,
            None,
            expiry,
        )
    }

    /// A CONNECTed MQTT session as the attacker device.
    async fn attacker_session(
        &self,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, BytesMut), String> {
        let (id, key) = &self.attacker;
        let token = self.device_token(id, key, unix_now() + 3600);
        mqtt_session(
            self.mqtt,
            &self.tls,
            &self.mqtt_host,
            id,
            &token,
            self.bound(),
        )
        .await
    }

    /// A policy token for the REST API.
    fn policy_token(&self, policy: &str, expiry: u64) -> String {
        let key = &self.policies[policy];
        sas::generate(&self.legit.host, key, Some(policy), expiry)
    }

    /// The legitimate check, as a probe result.
    async fn legit_check(&self, tag: &str) -> Result<Duration, String> {
        self.legit.check(tag, &self.ledger).await
    }

    /// After a probe: the legitimate clients are served, the hub is alive and printed no panic.
    async fn after(&self, name: &str) -> Result<String, String> {
        let legit = self.legit_check(name).await;
        let mut hub = lock(&self.hub);
        if !hub.alive() {
            return Err(format!(
                "the hub exited; last output:\n{}",
                hub.output.tail(30).join("\n")
            ));
        }
        let panics = hub.output.lines_with("panicked");
        if !panics.is_empty() {
            return Err(format!("the hub printed: {}", panics.join(" | ")));
        }
        let rss = hub.rss_kib();
        drop(hub);
        legit.map(|took| format!("legit {took:.0?}, hub RSS {} MiB", rss / 1024))
    }
}

/// Runs `probe` within its bound and then the after-probe checks; prints one line.
async fn step<F: Future<Output = ProbeResult>>(
    ctx: &Ctx,
    verdicts: &mut Vec<Verdict>,
    name: &str,
    probe: F,
) {
    if !ctx.knobs.selected(name) {
        return;
    }
    // Resource probes hold their attack for `hold` and set it up first: give them room.
    let bound = ctx.bound() * 4 + ctx.knobs.hold * 3 + ctx.knobs.legit_bound * 3;
    let started = Instant::now();
    let outcome = match timeout(bound, probe).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("the probe did not finish within {bound:?}")),
    };
    let took = started.elapsed();
    let after = ctx.after(name).await;
    let mark = if outcome.is_ok() && after.is_ok() {
        "ok  "
    } else {
        "FAIL"
    };
    println!(
        "{mark} {name:<58} {took:>7.1?}  {}  [{}]",
        match &outcome {
            Ok(note) => note.clone(),
            Err(e) => format!("PROBE: {e}"),
        },
        match &after {
            Ok(note) => note.clone(),
            Err(e) => format!("AFTER: {e}"),
        }
    );
    verdicts.push(Verdict {
        name: name.to_owned(),
        probe: outcome,
        after,
    });
}

fn hub_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hub-emulator"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_suite() {
    let mut knobs = Knobs::from_env();
    // This process holds the attacking connections: keep room for them under its own limit.
    if let Some((soft, _)) = nofile_limits() {
        let room = usize::try_from(soft.saturating_sub(300)).unwrap_or(usize::MAX);
        if knobs.flood > room {
            println!(
                "attack suite: open-file limit {soft} here: {} connections per resource probe \
                 instead of {} (raise it with `ulimit -n \"$(ulimit -Hn)\"`)",
                room, knobs.flood
            );
            knobs.flood = room;
        }
    }
    let suite_started = Instant::now();
    let data_dir = tempfile::tempdir().expect("data dir");
    // A first start creates the policies; they are read while no hub holds the store.
    let mut first = HubProcess::spawn(hub_binary(), data_dir.path(), None, Output::default());
    first.kill();
    drop(first);
    let policies = policy_keys(data_dir.path());
    let output = Output::default();
    let hub = HubProcess::spawn(
        hub_binary(),
        data_dir.path(),
        Some(knobs.hub_nofile),
        output.clone(),
    );
    let legit = Legit::new(&hub, knobs.legit_bound);
    let ledger = Mutex::new(Ledger::default());
    let attacker_key = legit
        .create_device("attack-a", &ledger)
        .await
        .expect("attacker device");
    let victim_key = legit
        .create_device("attack-b", &ledger)
        .await
        .expect("victim device");
    let ctx = Ctx {
        mqtt: hub.mqtt,
        https: hub.https,
        tls: legit.tls.clone(),
        mqtt_host: legit.device_cs.host_name.to_string(),
        legit,
        ledger,
        hub: Mutex::new(hub),
        attacker: ("attack-a".to_owned(), attacker_key),
        victim: ("attack-b".to_owned(), victim_key),
        policies,
        knobs,
    };
    ctx.legit_check("baseline")
        .await
        .expect("the legitimate clients work before any attack");
    println!(
        "attack suite: hub pid {}, open-file limit {}, {} connections per resource probe, held {:?}",
        lock(&ctx.hub).pid(),
        ctx.knobs.hub_nofile,
        ctx.knobs.flood,
        ctx.knobs.hold
    );

    // Stalled connections the hub must drop by itself (timeouts), watched while the rest runs.
    let watchers = start_watchers(&ctx);

    let mut v = Vec::new();
    mqtt_probes(&ctx, &mut v).await;
    mqtt_token_probes(&ctx, &mut v).await;
    rest_token_probes(&ctx, &mut v).await;
    body_probes(&ctx, &mut v).await;
    query_probes(&ctx, &mut v).await;
    resource_probes(&ctx, &mut v).await;

    for (name, watcher) in watchers {
        let outcome = watcher.await.unwrap_or_else(|e| Err(format!("task: {e}")));
        step(&ctx, &mut v, &name, async { outcome }).await;
    }

    // Nothing acknowledged may be lost: kill -9, restart on the same data dir, read it all back.
    let durability = durability_check(&ctx, data_dir.path()).await;
    println!(
        "{} durability after kill -9 and restart: {}",
        if durability.is_ok() { "ok  " } else { "FAIL" },
        match &durability {
            Ok(n) => n.clone(),
            Err(e) => e.clone(),
        }
    );

    let failed: Vec<String> = v
        .iter()
        .filter(|x| x.probe.is_err() || x.after.is_err())
        .map(|x| {
            format!(
                "{}: {}",
                x.name,
                [&x.probe, &x.after]
                    .iter()
                    .filter_map(|r| r.as_ref().err().cloned())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
        .chain(durability.err())
        .collect();
    println!(
        "attack suite: {} probes (durability included), {} held, {} failed, in {:.1?}",
        v.len() + 1,
        v.len() + 1 - failed.len(),
        failed.len(),
        suite_started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "{} probe(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Kills the hub (SIGKILL), restarts it on the same data dir and reads back every write the
/// ledger holds.
async fn durability_check(ctx: &Ctx, data_dir: &Path) -> Result<String, String> {
    let output = {
        let mut hub = lock(&ctx.hub);
        hub.kill();
        hub.output.clone()
    };
    let mut restarted = HubProcess::spawn(hub_binary(), data_dir, None, Output::default());
    let legit = Legit::new(&restarted, ctx.knobs.legit_bound);
    let id = legit.device_cs.device_id.clone();
    let twin = legit
        .owner(Method::GET, &format!("/twins/{id}"), None)
        .await?;
    let twin: Value = serde_json::from_str(&twin.body).map_err(|e| e.to_string())?;
    let listed = legit.owner(Method::GET, "/devices?top=1000", None).await?;
    let listed: Vec<String> = serde_json::from_str::<Value>(&listed.body)
        .map_err(|e| e.to_string())?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["deviceId"].as_str().map(str::to_owned))
        .collect();
    let ledger = lock(&ctx.ledger);
    let missing = ledger.missing(&twin, &listed);
    let panics: Vec<String> = output
        .lines_with("panicked")
        .into_iter()
        .chain(restarted.output.lines_with("panicked"))
        .collect();
    let alive = restarted.alive();
    if !missing.is_empty() {
        return Err(format!(
            "{} acknowledged writes lost: {}",
            missing.len(),
            missing.join(", ")
        ));
    }
    if !panics.is_empty() || !alive {
        return Err(format!("alive {alive}, panics: {}", panics.join(" | ")));
    }
    Ok(format!(
        "{} desired, {} reported, {} devices read back",
        ledger.desired.len(),
        ledger.reported.len(),
        ledger.devices.len()
    ))
}

// ---------------------------------------------------------------------------------------------
// Malformed MQTT and cross-device topics.

/// Sends `bytes` on a fresh TLS connection and expects the hub to close it within the bound;
/// Ok(what it answered before closing).
async fn expect_close_after(ctx: &Ctx, bytes: &[u8]) -> ProbeResult {
    let mut stream = tls_connect(ctx.mqtt, &ctx.tls, ctx.bound()).await?;
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let _ = stream.flush().await;
    let answered = closed_within(&mut stream, ctx.bound()).await?;
    Ok(format!("closed after {} answer bytes", answered.len()))
}

/// Expects the hub to close the connection without granting anything: no packet at all, or a
/// CONNACK that refuses.
fn no_grant(answered: &[u8]) -> ProbeResult {
    let mut buf = BytesMut::from(answered);
    match RawPacket::read(&mut buf, 1024) {
        Err(_) if answered.is_empty() => Ok("closed, no answer".to_owned()),
        Ok(RawPacket::ConnAck(ack))
            if ack.code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success =>
        {
            Ok(format!("CONNACK {:?}, closed", ack.code))
        }
        other => Err(format!("the hub answered {other:?} before closing")),
    }
}

/// Sends `bytes` on a fresh TLS connection to the MQTT port; the hub must close it without
/// granting anything ([`no_grant`]).
async fn expect_refused_bytes(ctx: &Ctx, bytes: &[u8]) -> ProbeResult {
    let mut stream = tls_connect(ctx.mqtt, &ctx.tls, ctx.bound()).await?;
    // The hub may close before all of it is written: a failed write is a close, which the read
    // below sees.
    let _ = stream.write_all(bytes).await;
    no_grant(&closed_within(&mut stream, ctx.bound()).await?)
}

/// Sends on a CONNECTed attacker session and expects a close (no PUBACK/SUBACK granted).
async fn expect_session_close(ctx: &Ctx, bytes: &[u8]) -> ProbeResult {
    let (mut stream, _) = ctx.attacker_session().await?;
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let answered = closed_within(&mut stream, ctx.bound()).await?;
    let mut buf = BytesMut::from(&answered[..]);
    match RawPacket::read(&mut buf, 1024 * 1024) {
        Ok(RawPacket::PubAck(_)) => Err("the hub acknowledged it (PUBACK)".to_owned()),
        Ok(RawPacket::SubAck(ack))
            if ack
                .return_codes
                .iter()
                .any(|c| !matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure)) =>
        {
            Err(format!("the hub granted it: {ack:?}"))
        }
        _ => Ok(format!("closed after {} answer bytes", answered.len())),
    }
}

/// Sends on a CONNECTed attacker session; the hub may answer or close, but must do one of them
/// (a PINGREQ after the packet must get its PINGRESP or a close within the bound).
async fn expect_answer_or_close(ctx: &Ctx, bytes: &[u8]) -> ProbeResult {
    let (mut stream, mut buf) = ctx.attacker_session().await?;
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let _ = stream.write_all(&[0xc0, 0x00]).await;
    let mut seen = Vec::new();
    loop {
        match read_packet(&mut stream, &mut buf, ctx.bound()).await? {
            None => return Ok(format!("closed after {seen:?}")),
            Some(RawPacket::PingResp) => return Ok(format!("served: {seen:?}")),
            Some(p) => seen.push(packet_kind(&p)),
        }
    }
}

fn packet_kind(p: &RawPacket) -> String {
    match p {
        RawPacket::Publish(p) => format!("PUBLISH {}", p.topic),
        other => format!("{other:?}").chars().take(40).collect(),
    }
}

/// The twin response status a twin request on the attacker's session gets (None: closed).
async fn twin_status(ctx: &Ctx, topic: &str, payload: &[u8]) -> Result<Option<u16>, String> {
    let (mut stream, mut buf) = ctx.attacker_session().await?;
    stream
        .write_all(&subscribe_packet("$iothub/twin/res/#", 1))
        .await
        .map_err(|e| format!("send: {e}"))?;
    // A packet over the hub's limit is refused by closing the connection, possibly while it is
    // still being written: that is the hub's answer, not a failed probe.
    match stream
        .write_all(&publish_packet(topic, QoS::AtMostOnce, 0, payload))
        .await
    {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("send: {e}")),
    }
    loop {
        match read_packet(&mut stream, &mut buf, ctx.bound() * 2).await? {
            None => return Ok(None),
            Some(RawPacket::Publish(p)) => {
                let status = p
                    .topic
                    .strip_prefix("$iothub/twin/res/")
                    .and_then(|r| r.split('/').next())
                    .and_then(|s| s.parse().ok());
                return Ok(status);
            }
            Some(_) => {}
        }
    }
}

/// A twin request that must be refused: a 4xx status or a close.
async fn expect_twin_refused(ctx: &Ctx, topic: &str, payload: &[u8]) -> ProbeResult {
    match twin_status(ctx, topic, payload).await? {
        None => Ok("closed".to_owned()),
        Some(s) if (400..500).contains(&s) => Ok(format!("status {s}")),
        Some(s) => Err(format!("answered status {s}")),
    }
}

/// A variable-length MQTT remaining length (up to 4 bytes; [MQTT-2.2.3]).
fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

/// A nested JSON text `depth` levels deep: `[[[...]]]`.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut text = vec![b'['; depth];
    text.extend(std::iter::repeat_n(b']', depth));
    text
}

/// A JSON object nested `depth` levels deep: `{"a":{"a":...1...}}`.
fn nested_objects(depth: usize) -> String {
    let mut text = "{\"a\":".repeat(depth);
    text.push('1');
    text.push_str(&"}".repeat(depth));
    text
}

async fn mqtt_probes(ctx: &Ctx, v: &mut Vec<Verdict>) {
    let (me, _) = &ctx.attacker;
    let (other, _) = &ctx.victim;
    let good_connect = connect_packet(
        &ctx.mqtt_host,
        me,
        &ctx.device_token(me, &ctx.attacker.1, unix_now() + 3600),
    );

    step(ctx, v, "mqtt: garbage after the TLS handshake", async {
        let answered =
            expect_close_after(ctx, b"\xff\xff\xff\xff\xff GET / HTTP/1.1\r\n\r\n").await?;
        Ok(answered)
    })
    .await;
    // [MQTT-2.2.3] the remaining length has at most 4 bytes.
    step(ctx, v, "mqtt: 5-byte remaining length", async {
        expect_close_after(ctx, &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]).await
    })
    .await;
    // [MQTT-3.1.2-1] protocol name must be "MQTT"; [MQTT-3.1.2-2] level 4 (3.1.1, the only
    // version IoT Hub speaks, DOCS mqtt).
    for (name, from, to) in [
        (
            "mqtt: CONNECT with protocol name MQTX",
            &b"\x00\x04MQTT"[..],
            &b"\x00\x04MQTX"[..],
        ),
        (
            "mqtt: CONNECT with protocol level 3",
            &b"MQTT\x04"[..],
            &b"MQTT\x03"[..],
        ),
        (
            "mqtt: CONNECT with protocol level 5",
            &b"MQTT\x04"[..],
            &b"MQTT\x05"[..],
        ),
    ] {
        let mut packet = good_connect.clone();
        let at = packet
            .windows(from.len())
            .position(|w| w == from)
            .expect("protocol name in CONNECT");
        packet[at..at + to.len()].copy_from_slice(to);
        step(ctx, v, name, async {
            expect_refused_bytes(ctx, &packet).await
        })
        .await;
    }
    step(ctx, v, "mqtt: CONNECT announcing 200 MB", async {
        let mut packet = vec![0x10];
        packet.extend(remaining_length(200 * 1024 * 1024));
        packet.extend_from_slice(&good_connect[2..]);
        expect_refused_bytes(ctx, &packet).await
    })
    .await;
    step(
        ctx,
        v,
        "mqtt: CONNECT with a client-id length past the packet",
        async {
            // Variable header of a 3.1.1 CONNECT, then a client id claiming 65,535 bytes.
            let body = b"\x00\x04MQTT\x04\x02\x00\x3c\xff\xffabc";
            let mut packet = vec![0x10];
            packet.extend(remaining_length(body.len()));
            packet.extend_from_slice(body);
            expect_refused_bytes(ctx, &packet).await
        },
    )
    .await;
    step(ctx, v, "mqtt: CONNECT with a 60 KB username", async {
        let huge = "u".repeat(60 * 1024);
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(me.as_str());
        connect.set_login(huge, "x");
        let mut buf = BytesMut::new();
        connect.write(&mut buf).map_err(|e| format!("{e:?}"))?;
        expect_refused_bytes(ctx, &buf).await
    })
    .await;
    // [MQTT-3.1.0-1] the first packet from the client must be CONNECT.
    for (name, packet) in [
        (
            "mqtt: PUBLISH before CONNECT",
            publish_packet(
                &format!("devices/{me}/messages/events/"),
                QoS::AtLeastOnce,
                1,
                b"x",
            ),
        ),
        (
            "mqtt: SUBSCRIBE before CONNECT",
            subscribe_packet("$iothub/methods/POST/#", 1),
        ),
        ("mqtt: PINGREQ before CONNECT", vec![0xc0, 0x00]),
    ] {
        step(ctx, v, name, async {
            expect_refused_bytes(ctx, &packet).await
        })
        .await;
    }
    // [MQTT-3.1.0-2] a second CONNECT is a protocol violation: disconnect.
    step(ctx, v, "mqtt: second CONNECT on a session", async {
        expect_session_close(ctx, &good_connect).await
    })
    .await;
    step(
        ctx,
        v,
        "mqtt: PUBLISH announcing 300 KiB after CONNECT",
        async {
            let mut packet = vec![0x30];
            packet.extend(remaining_length(300 * 1024));
            packet.extend_from_slice(&[0x00, 0x01, b'x']);
            expect_session_close(ctx, &packet).await
        },
    )
    .await;
    step(
        ctx,
        v,
        "mqtt: malformed PUBLISH (topic length past the packet)",
        async { expect_session_close(ctx, &[0x30, 0x04, 0xff, 0xff, b'a', b'b']).await },
    )
    .await;
    step(ctx, v, "mqtt: reserved packet type 15", async {
        expect_session_close(ctx, &[0xf0, 0x00]).await
    })
    .await;
    // Reference §3.3 (DOCS mqtt: MQTT terminates the connection for most errors): a device may
    // only use its own topics.
    for topic in [
        format!("devices/{other}/messages/events/"),
        format!("devices/{other}/messages/events/$.ct=application%2Fjson"),
        format!("devices/{other}/modules/m1/messages/events/"),
    ] {
        step(ctx, v, &format!("mqtt: PUBLISH to {topic}"), async {
            expect_session_close(ctx, &publish_packet(&topic, QoS::AtLeastOnce, 7, b"{}")).await
        })
        .await;
    }
    for filter in [
        format!("devices/{other}/messages/devicebound/#"),
        format!("devices/{other}/messages/events/"),
        "devices/+/messages/devicebound/#".to_owned(),
    ] {
        step(ctx, v, &format!("mqtt: SUBSCRIBE to {filter}"), async {
            expect_session_close(ctx, &subscribe_packet(&filter, 3)).await
        })
        .await;
    }
    // Property bags and `$rid`s are the device's own text: garbage must be refused or ignored,
    // never crash the hub or hang the session.
    for (name, topic) in [
        (
            "mqtt: property bag with bad percent escapes",
            format!("devices/{me}/messages/events/%ZZ%%&&==&$.ct=%FF%FE&a=b=c&"),
        ),
        (
            "mqtt: property bag of 200 KB",
            format!("devices/{me}/messages/events/{}", "k=v&".repeat(50_000)),
        ),
        (
            "mqtt: method response with a non-numeric status",
            "$iothub/methods/res/abc/?$rid=zz".to_owned(),
        ),
        (
            "mqtt: twin GET with a garbage $rid",
            "$iothub/twin/GET/?$rid=%FF%FE&$rid=&&".to_owned(),
        ),
    ] {
        step(ctx, v, name, async {
            expect_answer_or_close(ctx, &publish_packet(&topic, QoS::AtLeastOnce, 9, b"{}")).await
        })
        .await;
    }
    step(ctx, v, "mqtt: topic that is not UTF-8", async {
        // [MQTT-1.5.3-1] ill-formed UTF-8 in a topic: the server closes the connection.
        let mut packet = vec![0x30, 0x06, 0x00, 0x04, 0xff, 0xfe, 0xc0, 0x80];
        packet.truncate(8);
        expect_session_close(ctx, &packet).await
    })
    .await;
    let reported = "$iothub/twin/PATCH/properties/reported/?$rid=1";
    step(ctx, v, "mqtt: reported patch of 100,000 nested [", async {
        expect_twin_refused(ctx, reported, &nested_arrays(100_000)).await
    })
    .await;
    step(
        ctx,
        v,
        "mqtt: reported patch of 100,000 nested objects",
        async { expect_twin_refused(ctx, reported, nested_objects(100_000).as_bytes()).await },
    )
    .await;
    // DOCS twins: desired and reported are 32 KB each; depth at most 10.
    step(ctx, v, "mqtt: reported patch over 32 KB", async {
        let big = json!({"big": "x".repeat(4000), "more": (0..9).map(|i| (format!("s{i}"), json!("y".repeat(4000)))).collect::<serde_json::Map<String, Value>>()});
        expect_twin_refused(ctx, reported, big.to_string().as_bytes()).await
    })
    .await;
    step(ctx, v, "mqtt: reported patch 12 levels deep", async {
        expect_twin_refused(ctx, reported, nested_objects(12).as_bytes()).await
    })
    .await;
    step(ctx, v, "mqtt: reported patch that is not JSON", async {
        expect_twin_refused(ctx, reported, b"\xff\xfe{not json").await
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Forged, expired and mis-scoped tokens.

/// A CONNECT as `id` with `password` must be refused (CONNACK 4/5 or a close).
async fn expect_connect_refused(ctx: &Ctx, id: &str, password: &str) -> ProbeResult {
    match mqtt_session(
        ctx.mqtt,
        &ctx.tls,
        &ctx.mqtt_host,
        id,
        password,
        ctx.bound(),
    )
    .await
    {
        Ok(_) => Err("the hub accepted the CONNECT".to_owned()),
        Err(e) if e.contains("CONNACK") || e.contains("closed") => Ok(e),
        Err(e) => Err(e),
    }
}

async fn mqtt_token_probes(ctx: &Ctx, v: &mut Vec<Verdict>) {
    let (me, my_key) = &ctx.attacker;
    let (other, other_key) = &ctx.victim;
    let key = SharedKey::from_base64(my_key).expect("key");
    let in_an_hour = unix_now() + 3600;
    // DOCS sas (reference §2.3): device tokens must be scoped to one device.
    for audience in [ctx.mqtt_host.clone(), format!("{}/devices", ctx.mqtt_host)] {
        let token = sas::generate(&audience, &key, None, in_an_hour);
        step(
            ctx,
            v,
            &format!("mqtt token: device key scoped to `{audience}`"),
            async { expect_connect_refused(ctx, me, &token).await },
        )
        .await;
    }
    step(ctx, v, "mqtt token: expired an hour ago", async {
        let token = ctx.device_token(me, my_key, unix_now() - 3600);
        expect_connect_refused(ctx, me, &token).await
    })
    .await;
    step(ctx, v, "mqtt token: forged signature", async {
        let forged =
            SharedKey::from_base64("Zm9yZ2VkLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMw==").expect("key");
        let token = sas::generate(
            &sas::device_resource_uri(&ctx.mqtt_host, me, None),
            &forged,
            None,
            in_an_hour,
        );
        expect_connect_refused(ctx, me, &token).await
    })
    .await;
    step(ctx, v, "mqtt token: another device's token", async {
        let token = ctx.device_token(other, other_key, in_an_hour);
        expect_connect_refused(ctx, me, &token).await
    })
    .await;
    step(
        ctx,
        v,
        "mqtt token: own token, CONNECT as another device",
        async {
            let token = ctx.device_token(me, my_key, in_an_hour);
            expect_connect_refused(ctx, other, &token).await
        },
    )
    .await;
    // DOCS sas: the service policy has ServiceConnect only, not DeviceConnect.
    step(ctx, v, "mqtt token: service policy token", async {
        let token = ctx.policy_token("service", in_an_hour);
        expect_connect_refused(ctx, me, &token).await
    })
    .await;
    step(ctx, v, "mqtt token: garbage password", async {
        expect_connect_refused(ctx, me, "SharedAccessSignature sr=&sig=%ZZ&se=-1&se=9&skn=").await
    })
    .await;
}

/// A REST call with `auth` must answer 401.
async fn expect_401(
    ctx: &Ctx,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> ProbeResult {
    let reply = ctx
        .legit
        .rest(
            method,
            path,
            auth,
            body.map(|b| serde_json::to_vec(&b).expect("JSON")),
        )
        .await?;
    if reply.status == StatusCode::UNAUTHORIZED {
        Ok("401".to_owned())
    } else {
        Err(format!("answered {} {}", reply.status, reply.body))
    }
}

async fn rest_token_probes(ctx: &Ctx, v: &mut Vec<Verdict>) {
    let twin = format!("/twins/{}", ctx.legit.device_cs.device_id);
    let in_an_hour = unix_now() + 3600;
    let patch = json!({"properties": {"desired": {"intruder": 1}}});
    step(ctx, v, "rest token: none", async {
        expect_401(ctx, Method::GET, &twin, None, None).await
    })
    .await;
    step(ctx, v, "rest token: forged signature", async {
        let forged =
            SharedKey::from_base64("Zm9yZ2VkLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMw==").expect("key");
        let token = sas::generate(&ctx.legit.host, &forged, Some("iothubowner"), in_an_hour);
        expect_401(ctx, Method::GET, &twin, Some(&token), None).await
    })
    .await;
    step(ctx, v, "rest token: expired an hour ago", async {
        let token = ctx.policy_token("iothubowner", unix_now() - 3600);
        expect_401(ctx, Method::GET, &twin, Some(&token), None).await
    })
    .await;
    step(ctx, v, "rest token: another hub's audience", async {
        let key = &ctx.policies["iothubowner"];
        let token = sas::generate(
            "evil.azure-devices.net",
            key,
            Some("iothubowner"),
            in_an_hour,
        );
        expect_401(ctx, Method::GET, &twin, Some(&token), None).await
    })
    .await;
    // DOCS sas (reference §2.3): each operation needs its permission; IoT Hub answers 401
    // (IotHubUnauthorizedAccess) to a valid token without it.
    for (name, policy, method, path, body) in [
        (
            "rest token: registryRead patching a twin",
            "registryRead",
            Method::PATCH,
            twin.clone(),
            Some(patch.clone()),
        ),
        (
            "rest token: service creating a device",
            "service",
            Method::PUT,
            "/devices/intruder".to_owned(),
            Some(json!({"deviceId": "intruder"})),
        ),
        (
            "rest token: device policy reading a twin",
            "device",
            Method::GET,
            twin.clone(),
            None,
        ),
        (
            "rest token: registryReadWrite invoking a method",
            "registryReadWrite",
            Method::POST,
            format!("{twin}/methods"),
            Some(json!({"methodName": "x", "payload": null})),
        ),
    ] {
        step(ctx, v, name, async {
            let token = ctx.policy_token(policy, in_an_hour);
            expect_401(ctx, method, &path, Some(&token), body).await
        })
        .await;
    }
    step(
        ctx,
        v,
        "rest token: device-key token on the service API",
        async {
            let (id, key) = &ctx.attacker;
            let key = SharedKey::from_base64(key).expect("key");
            let token = sas::generate(
                &sas::device_resource_uri(&ctx.legit.host, id, None),
                &key,
                None,
                in_an_hour,
            );
            expect_401(
                ctx,
                Method::GET,
                &format!("/twins/{id}"),
                Some(&token),
                None,
            )
            .await
        },
    )
    .await;
    step(ctx, v, "rest token: 60 KB Authorization header", async {
        let garbage = format!("SharedAccessSignature sr={}", "a".repeat(60 * 1024));
        let reply = ctx
            .legit
            .rest(Method::GET, &twin, Some(&garbage), None)
            .await;
        match reply {
            Ok(r) if r.status.is_client_error() => Ok(r.status.to_string()),
            // A hub that closes on oversized headers refuses too.
            Err(e) if !e.contains("timed out") => Ok(format!("refused: {e}")),
            Ok(r) => Err(format!("answered {}", r.status)),
            Err(e) => Err(e),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Oversized and deeply nested bodies.

/// The head of an HTTP/1.1 request to the hub.
fn request_head(method: &str, path: &str, auth: Option<&str>, extra: &str) -> String {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path}?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\n{auth}\
         Content-Type: application/json\r\n{extra}\r\n"
    )
}

/// The status line's code of what the hub answered, if any.
fn status_of(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A new HTTPS connection on which `head` and then `body` were sent.
async fn send_head(
    ctx: &Ctx,
    head: &str,
    body: &[u8],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut stream = tls_connect(ctx.https, &ctx.tls, ctx.bound()).await?;
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("send the request head: {e}"))?;
    stream
        .write_all(body)
        .await
        .map_err(|e| format!("send the body: {e}"))?;
    Ok(stream)
}

/// Reads the hub's answer (status) within `bound`, on a raw connection.
async fn read_status<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    bound: Duration,
) -> Result<Option<u16>, String> {
    let mut buf = Vec::new();
    let reading = async {
        let mut chunk = [0_u8; 2048];
        loop {
            if let Some(s) = status_of(&buf) {
                return Some(s);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    timeout(bound, reading)
        .await
        .map_err(|_| format!("no answer within {bound:?}"))
}

/// A PATCH twin whose body must be refused with one of `expected`.
async fn expect_body_refused(
    ctx: &Ctx,
    path: &str,
    body: Vec<u8>,
    expected: &[u16],
) -> ProbeResult {
    let reply = ctx
        .legit
        .owner_bytes(Method::PATCH, path, Some(body))
        .await?;
    if expected.contains(&reply.status.as_u16()) {
        Ok(reply.status.to_string())
    } else {
        Err(format!(
            "answered {} {}",
            reply.status,
            reply.body.chars().take(200).collect::<String>()
        ))
    }
}

async fn body_probes(ctx: &Ctx, v: &mut Vec<Verdict>) {
    let id = ctx.legit.device_cs.device_id.clone();
    let twin = format!("/twins/{id}");
    step(
        ctx,
        v,
        "rest body: Content-Length 10 MB, only 1 KB sent",
        async {
            let token = ctx.legit.owner_token();
            let head = request_head("PATCH", &twin, Some(&token), "Content-Length: 10485760\r\n");
            let mut stream = send_head(ctx, &head, &[b' '; 1024]).await?;
            match read_status(&mut stream, ctx.bound()).await? {
                Some(413) => Ok("413 before the body".to_owned()),
                other => Err(format!("answered {other:?} (IoT Hub: 413 MessageTooLarge)")),
            }
        },
    )
    .await;
    step(ctx, v, "rest body: chunked, 1 MB", async {
        let token = ctx.legit.owner_token();
        let mut stream = tls_connect(ctx.https, &ctx.tls, ctx.bound()).await?;
        let head = request_head(
            "PATCH",
            &twin,
            Some(&token),
            "Transfer-Encoding: chunked\r\n",
        );
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
        for _ in 0..16 {
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        match read_status(&mut stream, ctx.bound()).await? {
            Some(413) => Ok("413".to_owned()),
            None => Ok("closed".to_owned()),
            other => Err(format!("answered {other:?}")),
        }
    })
    .await;
    step(
        ctx,
        v,
        "rest body: 100,000 nested [ as a twin patch",
        async { expect_body_refused(ctx, &twin, nested_arrays(100_000), &[400]).await },
    )
    .await;
    // 40,000 levels stay under the 256 KiB body limit, so the parser is what is probed.
    step(
        ctx,
        v,
        "rest body: 40,000 nested objects in desired",
        async {
            let body = format!(
                "{{\"properties\":{{\"desired\":{}}}}}",
                nested_objects(40_000)
            );
            expect_body_refused(ctx, &twin, body.into_bytes(), &[400]).await
        },
    )
    .await;
    step(ctx, v, "rest body: desired 12 levels deep", async {
        let body = format!("{{\"properties\":{{\"desired\":{}}}}}", nested_objects(12));
        expect_body_refused(ctx, &twin, body.into_bytes(), &[400]).await
    })
    .await;
    // DOCS twins: desired is at most 32 KB, tags 8 KB (reference §6.2).
    step(ctx, v, "rest body: desired patch of 40 KB", async {
        let desired: serde_json::Map<String, Value> = (0..10)
            .map(|i| (format!("s{i}"), json!("y".repeat(4000))))
            .collect();
        let body = json!({"properties": {"desired": desired}});
        expect_body_refused(ctx, &twin, body.to_string().into_bytes(), &[400, 413]).await
    })
    .await;
    step(ctx, v, "rest body: tags of 10 KB", async {
        let tags: serde_json::Map<String, Value> = (0..3)
            .map(|i| (format!("t{i}"), json!("y".repeat(3500))))
            .collect();
        let body = json!({"tags": tags});
        expect_body_refused(ctx, &twin, body.to_string().into_bytes(), &[400, 413]).await
    })
    .await;
    // 120 KB of JSON; the emulator counts each element at least 1 byte (twins.rs), so 40,000
    // elements weigh over 32 KB whichever way they are counted.
    step(ctx, v, "rest body: 40,000 empty arrays in desired", async {
        let body = json!({"properties": {"desired": {"many": vec![json!([]); 40_000]}}});
        expect_body_refused(ctx, &twin, body.to_string().into_bytes(), &[400, 413]).await
    })
    .await;
    step(ctx, v, "rest body: twin patch that is not UTF-8", async {
        expect_body_refused(
            ctx,
            &twin,
            b"{\"tags\":{\"a\":\"\xff\xfe\"}}".to_vec(),
            &[400],
        )
        .await
    })
    .await;
    step(
        ctx,
        v,
        "rest body: method payload of 100,000 nested [",
        async {
            let mut body = br#"{"methodName":"x","responseTimeoutInSeconds":5,"payload":"#.to_vec();
            body.extend(nested_arrays(100_000));
            body.push(b'}');
            let reply = ctx
                .legit
                .owner_bytes(Method::POST, &format!("{twin}/methods"), Some(body))
                .await?;
            match reply.status.as_u16() {
                400 | 413 => Ok(reply.status.to_string()),
                s => Err(format!("answered {s} {}", reply.body)),
            }
        },
    )
    .await;
    step(ctx, v, "rest body: device PUT of 100,000 nested [", async {
        let reply = ctx
            .legit
            .owner_bytes(Method::PUT, "/devices/nested", Some(nested_arrays(100_000)))
            .await?;
        match reply.status.as_u16() {
            400 => Ok("400".to_owned()),
            s => Err(format!("answered {s} {}", reply.body)),
        }
    })
    .await;
    step(ctx, v, "rest body: job request with a 100,000-deep queryCondition", async {
        let condition = format!("{}deviceId = 'x'{}", "(".repeat(100_000), ")".repeat(100_000));
        let body = json!({
            "jobId": "nested", "type": "scheduleUpdateTwin", "queryCondition": condition,
            "updateTwin": {"properties": {"desired": {"a": 1}}}, "startTime": "2026-01-01T00:00:00Z",
            "maxExecutionTimeInSeconds": 60,
        });
        let reply = ctx.legit.owner_bytes(Method::PUT, "/jobs/v2/nested", Some(body.to_string().into_bytes())).await?;
        match reply.status.as_u16() {
            400 => Ok("400".to_owned()),
            s => Err(format!("answered {s} {}", reply.body)),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Hostile queries.

/// `POST /devices/query` with `query`; Ok(status).
async fn query_status(ctx: &Ctx, body: Vec<u8>) -> Result<(u16, String), String> {
    let reply = ctx
        .legit
        .owner_bytes(Method::POST, "/devices/query", Some(body))
        .await?;
    Ok((reply.status.as_u16(), reply.body))
}

async fn expect_query_refused(ctx: &Ctx, query: String) -> ProbeResult {
    let body = json!({ "query": query }).to_string().into_bytes();
    match query_status(ctx, body).await? {
        (400, _) => Ok("400".to_owned()),
        (s, body) => Err(format!(
            "answered {s} {}",
            body.chars().take(200).collect::<String>()
        )),
    }
}

/// `prefix` + `unit` repeated + `middle` + `close` repeated as often as `unit`, at most 8,192
/// characters in all (IoT Hub's query length limit, DOCS query-twins); `close` empty means
/// no closing units.
fn fill(prefix: &str, unit: &str, middle: &str, close: &str) -> String {
    let room = 8192 - prefix.len() - middle.len();
    let n = room / (unit.len() + close.len());
    format!("{prefix}{}{middle}{}", unit.repeat(n), close.repeat(n))
}

async fn query_probes(ctx: &Ctx, v: &mut Vec<Verdict>) {
    // DOCS query-twins: a query is at most 8,192 characters.
    step(ctx, v, "query: 200 KB of text", async {
        expect_query_refused(
            ctx,
            format!(
                "SELECT * FROM devices WHERE deviceId = '{}'",
                "x".repeat(200_000)
            ),
        )
        .await
    })
    .await;
    // The rest fit in 8,192 characters, so that the lexer, parser and evaluator are what is
    // probed (each answer must come, 200 or 400, and the hub must survive).
    for (name, query) in [
        (
            "query: 4,000 nested parentheses",
            fill("SELECT * FROM devices WHERE ", "(", "1 = 1", ")"),
        ),
        (
            "query: AND chain of 1,000 (8 KB)",
            fill("SELECT * FROM devices WHERE ", "a = 1 AND ", "a = 1", ""),
        ),
        (
            "query: + chain of 4,000",
            fill("SELECT * FROM devices WHERE ", "1+", "1 = 3", ""),
        ),
        (
            "query: NOT x 2,000",
            fill("SELECT * FROM devices WHERE ", "NOT ", "true", ""),
        ),
        (
            "query: 1,300 nested function calls",
            fill("SELECT * FROM devices WHERE ", "LOWER(", "deviceId", ")"),
        ),
        (
            "query: OR chain over twin paths",
            fill(
                "SELECT * FROM devices WHERE ",
                "properties.reported.a.b.c = 'x' OR ",
                "true",
                "",
            ),
        ),
        (
            "query: projection of 800 fields",
            fill("SELECT ", "deviceId, ", "deviceId", " FROM devices"),
        ),
        (
            "query: GROUP BY 500 expressions",
            fill(
                "SELECT COUNT() AS n FROM devices GROUP BY ",
                "properties.reported.x, ",
                "deviceId",
                "",
            ),
        ),
    ] {
        step(ctx, v, name, async {
            let body = json!({ "query": query }).to_string().into_bytes();
            match query_status(ctx, body).await? {
                (s @ (200 | 400), _) => Ok(s.to_string()),
                (s, body) => Err(format!(
                    "answered {s} {}",
                    body.chars().take(200).collect::<String>()
                )),
            }
        })
        .await;
    }
    step(ctx, v, "query: body that is not UTF-8", async {
        match query_status(
            ctx,
            b"{\"query\":\"SELECT * FROM devices WHERE deviceId = '\xff\xfe'\"}".to_vec(),
        )
        .await?
        {
            (400, _) => Ok("400".to_owned()),
            (s, body) => Err(format!("answered {s} {body}")),
        }
    })
    .await;
    step(
        ctx,
        v,
        "query: unterminated string and stray bytes",
        async {
            expect_query_refused(
                ctx,
                "SELECT * FROM devices WHERE deviceId = 'x\u{0}\u{1}".to_owned(),
            )
            .await
        },
    )
    .await;
    step(
        ctx,
        v,
        "query: GROUP BY deviceId over many devices",
        async {
            // Registration is setup, not the probe: it is bounded by the same budget.
            let ids: Vec<String> = (0..ctx.knobs.group_devices)
                .map(|i| format!("group-{i:04}"))
                .collect();
            let mut set = JoinSet::new();
            for chunk in ids.chunks(ids.len().div_ceil(8).max(1)) {
                let chunk = chunk.to_vec();
                let legit = ctx.legit.clone();
                set.spawn(async move {
                    let ledger = Mutex::new(Ledger::default());
                    for id in &chunk {
                        legit.create_device(id, &ledger).await?;
                    }
                    Ok::<_, String>(
                        ledger
                            .into_inner()
                            .unwrap_or_else(|e| e.into_inner())
                            .devices,
                    )
                });
            }
            while let Some(done) = set.join_next().await {
                let created = done.map_err(|e| e.to_string())??;
                lock(&ctx.ledger).devices.extend(created);
            }
            let started = Instant::now();
            let body =
                json!({"query": "SELECT deviceId, COUNT() AS n FROM devices GROUP BY deviceId"})
                    .to_string();
            let (status, answer) = query_status(ctx, body.into_bytes()).await?;
            let took = started.elapsed();
            if status == 200 || status == 400 {
                Ok(format!("{status} in {took:.0?}, {} bytes", answer.len()))
            } else {
                Err(format!("answered {status} {answer}"))
            }
        },
    )
    .await;
    step(ctx, v, "query: jobs query with hostile parameters", async {
        let reply = ctx
            .legit
            .owner_bytes(
                Method::GET,
                "/jobs/v2/query?jobType=%FF%FE&jobStatus=((((",
                None,
            )
            .await?;
        if reply.status.is_server_error() {
            Err(format!("answered {}", reply.status))
        } else {
            Ok(reply.status.to_string())
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Resource attacks: many connections held, slow handshakes, slow headers and bodies, a flood.

/// An MQTT-over-WebSocket upgrade as the device SDKs send it (reference §3.1: path
/// `/$iothub/websocket`, subprotocol `mqtt`).
const WEBSOCKET_UPGRADE: &str = "GET /$iothub/websocket HTTP/1.1\r\nHost: localhost\r\n\
    Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

/// What one attacking connection does once it is connected, until the hold ends.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// TCP connected, the first `n` bytes of a ClientHello sent, then nothing.
    HalfOpenTls(usize),
    /// The TLS handshake done, then nothing (MQTT: no CONNECT).
    IdleTls,
    /// An MQTT-over-WebSocket upgrade (101), then no CONNECT.
    IdleWebSocket,
    /// TLS done, request headers trickled a byte a second.
    SlowHeaders,
    /// TLS done, headers with a valid token and `Content-Length: 1000`, body a byte a second.
    SlowBody { token: bool },
}

/// Opens `count` connections doing `attack` to `addr` and holds them until `stop`; returns the
/// connections that were set up and how many of those the hub closed during the hold.
async fn hold(
    ctx: &Ctx,
    addr: SocketAddr,
    count: usize,
    attack: Attack,
    stop: CancellationToken,
) -> JoinSet<Result<bool, String>> {
    let mut set = JoinSet::new();
    let hello = Arc::new(client_hello(&ctx.tls));
    // Setup concurrency: enough to build the crowd in a few seconds, few enough that the
    // benchmark client does not itself starve the 2 cores.
    let gate = Arc::new(tokio::sync::Semaphore::new(32));
    for _ in 0..count {
        let (tls, hello, gate, stop) = (ctx.tls.clone(), hello.clone(), gate.clone(), stop.clone());
        let token = ctx.legit.owner_token();
        let path = format!("/twins/{}", ctx.legit.device_cs.device_id);
        let bound = ctx.bound() * 2;
        set.spawn(async move {
            let permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let until = Instant::now() + Duration::from_secs(3600);
            let closed = match attack {
                Attack::HalfOpenTls(n) => {
                    let mut tcp = timeout(bound, TcpStream::connect(addr))
                        .await
                        .map_err(|_| "TCP connect timed out".to_owned())?
                        .map_err(|e| format!("TCP connect: {e}"))?;
                    tcp.write_all(&hello[..n.min(hello.len())])
                        .await
                        .map_err(|e| e.to_string())?;
                    drop(permit);
                    tokio::select! {
                        _ = stop.cancelled() => false,
                        r = closed_within(&mut tcp, Duration::from_secs(3600)) => r.is_ok(),
                    }
                }
                Attack::IdleTls | Attack::IdleWebSocket => {
                    let mut s = tls_connect(addr, &tls, bound).await?;
                    if matches!(attack, Attack::IdleWebSocket) {
                        s.write_all(WEBSOCKET_UPGRADE.as_bytes())
                            .await
                            .map_err(|e| format!("send the upgrade: {e}"))?;
                        match read_status(&mut s, bound).await? {
                            Some(101) => {}
                            other => return Err(format!("upgrade answered {other:?}")),
                        }
                    }
                    drop(permit);
                    tokio::select! {
                        _ = stop.cancelled() => false,
                        r = closed_within(&mut s, Duration::from_secs(3600)) => r.is_ok(),
                    }
                }
                Attack::SlowHeaders | Attack::SlowBody { .. } => {
                    let mut s = tls_connect(addr, &tls, bound).await?;
                    drop(permit);
                    let data = match attack {
                        Attack::SlowHeaders => {
                            request_head("GET", &path, Some(&token), "").into_bytes()
                        }
                        Attack::SlowBody { token: with } => {
                            let auth = with.then_some(token.as_str());
                            let mut d =
                                request_head("PATCH", &path, auth, "Content-Length: 1000\r\n")
                                    .into_bytes();
                            let head = d.len();
                            d.extend(std::iter::repeat_n(b' ', 1000));
                            // Headers at once, then the body trickles.
                            s.write_all(&d[..head]).await.map_err(|e| e.to_string())?;
                            d.drain(..head);
                            d
                        }
                        _ => unreachable!("matched above"),
                    };
                    tokio::select! {
                        _ = stop.cancelled() => false,
                        closed = trickle(&mut s, &data, 1, Duration::from_secs(1), until) => closed,
                    }
                }
            };
            Ok(closed)
        });
    }
    set
}

/// Holds `count` connections doing `attack` against `addr` for the hold time, running the
/// legitimate check twice meanwhile; reports the hub's RSS and open files at the peak.
async fn resource_probe(
    ctx: &Ctx,
    addr: SocketAddr,
    count: usize,
    attack: Attack,
    tag: &str,
) -> ProbeResult {
    let rss_before = lock(&ctx.hub).rss_kib();
    let stop = CancellationToken::new();
    let mut set = hold(ctx, addr, count, attack, stop.clone()).await;
    // Let the crowd build up: the setup gate opens 32 at a time.
    let setup = Instant::now();
    tokio::time::sleep(ctx.knobs.hold.min(Duration::from_secs(3))).await;
    let mut during = Vec::new();
    let hold_until = Instant::now() + ctx.knobs.hold;
    let mut peak_rss = 0;
    let mut peak_fds = 0;
    let mut n = 0;
    while Instant::now() < hold_until || n < 2 {
        n += 1;
        {
            let hub = lock(&ctx.hub);
            peak_rss = peak_rss.max(hub.rss_kib());
            peak_fds = peak_fds.max(hub.open_fds());
        }
        during.push(ctx.legit_check(&format!("{tag}-during-{n}")).await);
        if n >= 2 && Instant::now() >= hold_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    let (mut held, mut closed, mut failed) = (0, 0, Vec::new());
    while let Some(done) = set.join_next().await {
        match done.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(true) => {
                held += 1;
                closed += 1;
            }
            Ok(false) => held += 1,
            Err(e) => failed.push(e),
        }
    }
    let rss_after = lock(&ctx.hub).rss_kib();
    let summary = format!(
        "{held}/{count} set up ({} failed{}), {closed} closed by the hub during the hold, setup+hold {:.1?}; \
         hub RSS {} -> peak {} -> {} MiB, peak {peak_fds} fds",
        failed.len(),
        failed.first().map(|e| format!(": {e}")).unwrap_or_default(),
        setup.elapsed(),
        rss_before / 1024,
        peak_rss / 1024,
        rss_after / 1024
    );
    let mut bad: Vec<String> = during.into_iter().filter_map(Result::err).collect();
    if peak_rss / 1024 > ctx.knobs.max_rss_mib {
        bad.push(format!(
            "hub RSS peaked at {} MiB (bound {} MiB)",
            peak_rss / 1024,
            ctx.knobs.max_rss_mib
        ));
    }
    if bad.is_empty() {
        Ok(summary)
    } else {
        Err(format!("during the hold: {}; {summary}", bad.join("; ")))
    }
}

async fn resource_probes(ctx: &Ctx, v: &mut Vec<Verdict>) {
    let flood = ctx.knobs.flood;
    step(
        ctx,
        v,
        "slow TLS: 200 ClientHellos a byte every 250 ms on MQTT",
        async {
            let stop = CancellationToken::new();
            let hello = Arc::new(client_hello(&ctx.tls));
            let mut set = JoinSet::new();
            for _ in 0..200 {
                let (hello, stop) = (hello.clone(), stop.clone());
                let addr = ctx.mqtt;
                set.spawn(async move {
                    let Ok(mut tcp) = TcpStream::connect(addr).await else {
                        return;
                    };
                    let until = Instant::now() + Duration::from_secs(3600);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = trickle(&mut tcp, &hello, 1, Duration::from_millis(250), until) => {}
                    }
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let checks = [
                ctx.legit_check("slow-tls-1").await,
                ctx.legit_check("slow-tls-2").await,
            ];
            stop.cancel();
            while set.join_next().await.is_some() {}
            let bad: Vec<String> = checks
                .iter()
                .filter_map(|c| c.as_ref().err().cloned())
                .collect();
            if bad.is_empty() {
                Ok("legit served meanwhile".to_owned())
            } else {
                Err(bad.join("; "))
            }
        },
    )
    .await;
    step(
        ctx,
        v,
        &format!("half-open TLS x{flood} on MQTT (ClientHello cut at 100 bytes)"),
        async {
            resource_probe(
                ctx,
                ctx.mqtt,
                flood,
                Attack::HalfOpenTls(100),
                "halfopen-mqtt",
            )
            .await
        },
    )
    .await;
    step(
        ctx,
        v,
        &format!("TLS without CONNECT x{flood} on MQTT"),
        async { resource_probe(ctx, ctx.mqtt, flood, Attack::IdleTls, "idle-mqtt").await },
    )
    .await;
    step(
        ctx,
        v,
        &format!("WebSocket upgrades without CONNECT x{flood}"),
        async { resource_probe(ctx, ctx.https, flood, Attack::IdleWebSocket, "idle-ws").await },
    )
    .await;
    step(ctx, v, &format!("half-open TLS x{flood} on HTTPS"), async {
        resource_probe(
            ctx,
            ctx.https,
            flood,
            Attack::HalfOpenTls(100),
            "halfopen-https",
        )
        .await
    })
    .await;
    step(ctx, v, &format!("slow HTTP headers x{flood}"), async {
        resource_probe(ctx, ctx.https, flood, Attack::SlowHeaders, "slow-headers").await
    })
    .await;
    step(
        ctx,
        v,
        &format!("slow HTTP bodies with a valid token x{flood}"),
        async {
            resource_probe(
                ctx,
                ctx.https,
                flood,
                Attack::SlowBody { token: true },
                "slow-bodies",
            )
            .await
        },
    )
    .await;
    step(
        ctx,
        v,
        &format!("slow HTTP bodies without a token x{flood}"),
        async {
            resource_probe(
                ctx,
                ctx.https,
                flood,
                Attack::SlowBody { token: false },
                "slow-bodies-401",
            )
            .await
        },
    )
    .await;
    step(
        ctx,
        v,
        "slow HTTP body without a token: 401 before the body",
        async {
            let twin = format!("/twins/{}", ctx.legit.device_cs.device_id);
            let head = request_head("PATCH", &twin, None, "Content-Length: 1000\r\n");
            let mut stream = send_head(ctx, &head, &[]).await?;
            match read_status(&mut stream, ctx.bound()).await? {
                Some(401) => Ok("401".to_owned()),
                other => Err(format!("answered {other:?}")),
            }
        },
    )
    .await;
    step(ctx, v, "reported-patch flood from one device", async {
        flood_probe(ctx).await
    })
    .await;
}

/// One device pipelines reported patches as fast as its socket takes them, never reading the
/// answers, while the legitimate device's method round trips are timed: the flooder must slow
/// itself (backpressure on its own connection), not the hub.
async fn flood_probe(ctx: &Ctx) -> ProbeResult {
    let (mut flooder, _) = ctx.attacker_session().await?;
    let stop = CancellationToken::new();
    let flooding = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0_u64;
            let mut rid = 0_u64;
            while !stop.is_cancelled() {
                rid += 1;
                let patch = format!(r#"{{"flood":{{"n":{rid}}}}}"#);
                let packet = publish_packet(
                    &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                    QoS::AtMostOnce,
                    0,
                    patch.as_bytes(),
                );
                match timeout(Duration::from_millis(200), flooder.write_all(&packet)).await {
                    Ok(Ok(())) => sent += 1,
                    Ok(Err(_)) => break,
                    // Blocked: the hub stopped reading this device, as it should.
                    Err(_) => {}
                }
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A long-lived legitimate device, timed per round trip.
    let legit = &ctx.legit;
    let mut options = hub_core::device_client::DeviceClientOptions::new(legit.tls.clone());
    options.connect_timeout = legit.bound;
    let connected = hub_core::device_client::DeviceClient::connect(&legit.device_cs, &options)
        .await
        .map_err(|e| format!("legit device connect during the flood: {e}"))?;
    let mut methods = connected.methods;
    let responder = tokio::spawn(async move {
        while let Some(request) = methods.recv().await {
            let _ = request.respond(200, &json!({"ok": true})).await;
        }
    });
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    let until = Instant::now() + ctx.knobs.hold;
    let id = legit.device_cs.device_id.clone();
    let call = json!({"methodName": "ping", "payload": null, "responseTimeoutInSeconds": 5});
    while Instant::now() < until {
        let started = Instant::now();
        match legit
            .owner(Method::POST, &format!("/twins/{id}/methods"), Some(&call))
            .await
        {
            Ok(r) if r.status == StatusCode::OK => samples.push(started.elapsed()),
            Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
            Err(e) => failures.push(e),
        }
    }
    stop.cancel();
    let sent = flooding.await.unwrap_or(0);
    connected.client.close().await;
    responder.abort();
    let (p50, p99, max) = percentiles(&mut samples);
    let bound = Duration::from_millis(env_usize("ATTACK_FLOOD_P99_MS", 500) as u64);
    let summary = format!(
        "{sent} patches pushed by the flooder; legit methods n={} p50 {p50:.1?} p99 {p99:.1?} max {max:.1?}, {} failed",
        samples.len(),
        failures.len()
    );
    if failures.is_empty() && p99 <= bound && !samples.is_empty() {
        Ok(summary)
    } else {
        Err(format!(
            "{summary} (bound p99 {bound:?}) {}",
            failures.first().cloned().unwrap_or_default()
        ))
    }
}

/// A stalled connection: name, address, bytes sent at once after connecting, bytes trickled a
/// byte a second, whether TLS is done first, and the deadline (s) for the hub to drop it.
type Stall = (&'static str, SocketAddr, Vec<u8>, Vec<u8>, bool, u64);

/// Stalled connections started before the probes; each must be dropped by the hub within its
/// deadline (a hardened server's header, body, handshake and idle timeouts).
fn start_watchers(ctx: &Ctx) -> Vec<(String, tokio::task::JoinHandle<ProbeResult>)> {
    let mut watchers = Vec::new();
    let hello = client_hello(&ctx.tls);
    let twin = format!("/twins/{}", ctx.legit.device_cs.device_id);
    let token = ctx.legit.owner_token();
    let cases: Vec<Stall> = vec![
        (
            "stalled: MQTT ClientHello a byte a second, dropped within 30 s",
            ctx.mqtt,
            Vec::new(),
            hello.clone(),
            false,
            30,
        ),
        (
            "stalled: MQTT TLS without CONNECT, dropped within 30 s",
            ctx.mqtt,
            Vec::new(),
            Vec::new(),
            true,
            30,
        ),
        (
            "stalled: HTTPS ClientHello a byte a second, dropped within 30 s",
            ctx.https,
            Vec::new(),
            hello,
            false,
            30,
        ),
        (
            "stalled: HTTPS headers a byte a second, dropped within 60 s",
            ctx.https,
            Vec::new(),
            request_head("GET", &twin, Some(&token), "").into_bytes(),
            true,
            60,
        ),
        (
            "stalled: HTTPS body (valid token) a byte a second, dropped within 60 s",
            ctx.https,
            request_head("PATCH", &twin, Some(&token), "Content-Length: 100000\r\n").into_bytes(),
            vec![b' '; 100_000],
            true,
            60,
        ),
    ];
    for (name, addr, first, slow, tls, deadline) in cases {
        if !ctx.knobs.selected(name) {
            continue;
        }
        let config = ctx.tls.clone();
        let handle = tokio::spawn(async move {
            let started = Instant::now();
            let deadline = Duration::from_secs(deadline);
            let until = started + deadline;
            let closed = if tls {
                let mut s = tls_connect(addr, &config, Duration::from_secs(10)).await?;
                s.write_all(&first).await.map_err(|e| e.to_string())?;
                if slow.is_empty() {
                    closed_within(&mut s, deadline).await.is_ok()
                } else {
                    trickle(&mut s, &slow, 1, Duration::from_secs(1), until).await
                }
            } else {
                let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                trickle(&mut s, &slow, 1, Duration::from_secs(1), until).await
            };
            if closed {
                Ok(format!("dropped after {:.1?}", started.elapsed()))
            } else {
                Err(format!("still open after {deadline:?}"))
            }
        });
        watchers.push((name.to_owned(), handle));
    }
    watchers
}
