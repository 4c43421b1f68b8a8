//! The `sim-device` binary itself: hub.env discovery, the tutorial's lines on stdout, lockDoor,
//! SIGTERM with totals and exit 0, and the error exits (bad connection string, bad CA file,
//! refused credentials, unreachable hub, nothing configured).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const BIN: &str = env!("CARGO_BIN_EXE_sim-device");

/// The binary with a clean environment: no IOTHUB_* variables, data directory under `data_home`.
fn sim_device(data_home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("IOTHUB_DEVICE_CONNECTION_STRING")
        .env_remove("IOTHUB_CONNECTION_STRING")
        .env_remove("IOTHUB_CA_FILE")
        .env("XDG_DATA_HOME", data_home)
        .env("HOME", data_home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn read_until(
    lines: &mut Lines<BufReader<ChildStdout>>,
    seen: &mut Vec<String>,
    needle: &str,
) {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "no line with {needle:?} in stdout:\n{}",
        seen.join("\n")
    );
}

async fn output_of(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("exits")
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test]
async fn reads_hub_env_answers_lock_door_and_exits_0_with_totals_on_sigterm() {
    init_tracing();
    let home = tempfile::tempdir().expect("tempdir");
    let data_dir = home.path().join("iothub-emulator");
    let config = hub_emulator::Config {
        data_dir: Some(data_dir.clone()),
        ..hub_emulator::Config::ephemeral()
    };
    let running = hub_emulator::start(config).await.expect("hub");
    assert!(data_dir.join("hub.env").exists());

    let mut child = sim_device(home.path()).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    read_until(&mut lines, &mut seen, "waiting for commands").await;
    let text = seen.join("\n");
    assert!(
        text.contains(&format!(
            "using the local hub-emulator's settings from {}",
            data_dir.join("hub.env").display()
        )),
        "{text}"
    );
    assert!(text.contains("Protocol MQTT"), "{text}");
    assert!(text.contains("device myDeviceId"), "{text}");
    assert!(
        text.contains("Direct method initialized.")
            && text.contains("Device twin callback initialized."),
        "{text}"
    );
    let key = running.hub().device_primary_key(DEVICE).expect("key");
    assert!(!text.contains(&key), "the key must never be printed");

    wait_method_ready(running.hub(), DEVICE).await;
    let outcome = invoke(
        running.hub(),
        DEVICE,
        "lockDoor",
        Some(json!({"lockTime": "10m"})),
    )
    .await;
    assert_eq!(outcome.status, 200);
    read_until(&mut lines, &mut seen, "Locking Door!").await;
    assert!(seen.last().is_some_and(|l| l.contains("10m")), "{seen:?}");

    set_desired(running.hub(), DEVICE, json!({"building": 43, "floor": 3})).await;
    read_until(&mut lines, &mut seen, "Twin callback called with:").await;
    read_until(&mut lines, &mut seen, "\"building\":43").await;

    sigterm(&child);
    read_until(&mut lines, &mut seen, "Totals:").await;
    let totals = seen.last().cloned().unwrap_or_default();
    assert!(
        totals.contains("1 connected at exit")
            && totals.contains("1 methods answered")
            && totals.contains("1 twin patches applied"),
        "{totals}"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn nothing_configured_explains_the_three_ways() {
    let home = tempfile::tempdir().expect("tempdir");
    let (code, _, stderr) = output_of(&mut sim_device(home.path())).await;
    assert_eq!(code, Some(2), "{stderr}");
    for needle in [
        "IOTHUB_DEVICE_CONNECTION_STRING",
        "hub-emulator",
        "--hub-env",
        "hub.env",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from: {stderr}");
    }
}

#[tokio::test]
async fn bad_connection_string_exits_2_naming_the_problem() {
    let home = tempfile::tempdir().expect("tempdir");
    let mut cmd = sim_device(home.path());
    cmd.env(
        "IOTHUB_DEVICE_CONNECTION_STRING",
        "HostName=localhost;DeviceId=dev1",
    );
    let (code, _, stderr) = output_of(&mut cmd).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("connection string") && stderr.contains("not valid"),
        "{stderr}"
    );
}

#[tokio::test]
async fn bad_ca_file_exits_2_naming_the_path() {
    let home = tempfile::tempdir().expect("tempdir");
    let not_pem = home.path().join("ca.der");
    std::fs::write(&not_pem, [0x30u8, 0x82, 0x01, 0x0a]).expect("write");
    let mut cmd = sim_device(home.path());
    cmd.env(
        "IOTHUB_DEVICE_CONNECTION_STRING",
        "HostName=localhost;DeviceId=dev1;SharedAccessKey=a2V5",
    )
    .arg("--ca-file")
    .arg(&not_pem);
    let (code, _, stderr) = output_of(&mut cmd).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&not_pem.display().to_string()) && stderr.contains("not PEM"),
        "{stderr}"
    );

    let mut cmd = sim_device(home.path());
    cmd.env(
        "IOTHUB_DEVICE_CONNECTION_STRING",
        "HostName=localhost;DeviceId=dev1;SharedAccessKey=a2V5",
    )
    .env("IOTHUB_CA_FILE", home.path().join("missing.pem"));
    let (code, _, stderr) = output_of(&mut cmd).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");
}

#[tokio::test]
async fn refused_credentials_exit_1_saying_which_device() {
    let running = start_hub().await;
    let home = tempfile::tempdir().expect("tempdir");
    let ca = home.path().join("ca.pem");
    std::fs::write(&ca, &running.env.ca_pem).expect("write ca");
    let cs = device_cs(&running);
    let wrong = format!(
        "HostName={};DeviceId={DEVICE};SharedAccessKey=d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=",
        cs.host_name
    );
    let mut cmd = sim_device(home.path());
    cmd.env("IOTHUB_DEVICE_CONNECTION_STRING", wrong)
        .env("IOTHUB_CA_FILE", &ca);
    let (code, _, stderr) = output_of(&mut cmd).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("refused the credentials for device myDeviceId"),
        "{stderr}"
    );
}

#[tokio::test]
async fn unreachable_hub_exits_1_after_the_connect_timeout() {
    let home = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cmd = sim_device(home.path());
    cmd.env(
        "IOTHUB_DEVICE_CONNECTION_STRING",
        format!("HostName=localhost:{port};DeviceId=dev1;SharedAccessKey=a2V5"),
    )
    .args(["--connect-timeout", "1s"]);
    let started = std::time::Instant::now();
    let (code, _, stderr) = output_of(&mut cmd).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach the hub") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn help_shows_examples() {
    let home = tempfile::tempdir().expect("tempdir");
    let mut cmd = sim_device(home.path());
    cmd.arg("--help");
    let (code, stdout, _) = output_of(&mut cmd).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("Examples:") && stdout.contains("--count") && stdout.contains("--register"),
        "{stdout}"
    );
}
