//! End to end: the three real binaries as processes, talking to each other the way the
//! tutorial's three terminals do, with zero configuration (the emulator's hub.env in the
//! default data directory, here a temporary `XDG_DATA_HOME`).
//!
//! Needs the binaries built: `cargo test --workspace` builds them before running this.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn binary(name: &str) -> PathBuf {
    // tests run from target/<profile>/deps/e2e-<hash>; the binaries sit in target/<profile>.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo test --workspace` (it builds every binary) or `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// A running process whose stdout lines are collected as they come.
struct Proc {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: mpsc::Receiver<()>,
}

impl Proc {
    fn spawn(name: &'static str, data_home: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(binary(name))
            .args(args)
            .env("XDG_DATA_HOME", data_home)
            .env_remove("IOTHUB_CONNECTION_STRING")
            .env_remove("IOTHUB_DEVICE_CONNECTION_STRING")
            .env_remove("IOTHUB_CA_FILE")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, new_line) = mpsc::channel();
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[{name}] {line}");
                sink.lock().expect("lines lock").push(line);
                let _ = tx.send(());
            }
        });
        Proc {
            name,
            child,
            lines,
            new_line,
        }
    }

    fn output(&self) -> String {
        self.lines.lock().expect("lines lock").join("\n")
    }

    /// Waits until some stdout line contains `needle`.
    fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .lines
                .lock()
                .expect("lines lock")
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} never printed {needle:?}; it printed:\n{}",
                self.name,
                self.output()
            );
            let _ = self
                .new_line
                .recv_timeout(left.min(Duration::from_millis(200)));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; it printed:\n{}",
                self.name,
                self.output()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.name);
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn three_terminals_with_zero_configuration() {
    let data_home = tempfile::tempdir().expect("temp dir");
    let mut hub = Proc::spawn(
        "hub-emulator",
        data_home.path(),
        &["--in-memory", "--mqtt-port", "0", "--https-port", "0"],
    );
    hub.wait_for("hub-emulator ready", Duration::from_secs(30));
    assert!(
        data_home.path().join("iothub-emulator/hub.env").exists(),
        "hub.env in the default data dir"
    );
    assert!(
        !hub.output().contains("SharedAccessKey=<"),
        "hub prints real connection strings for copy-paste"
    );

    let mut device = Proc::spawn("sim-device", data_home.path(), &[]);
    device.wait_for("waiting for commands", Duration::from_secs(30));
    let device_banner = device.output();
    assert!(
        device_banner.contains("myDeviceId"),
        "device names itself:\n{device_banner}"
    );
    assert!(
        !device_banner.contains("SharedAccessKey="),
        "the device never prints its key:\n{device_banner}"
    );

    let mut service = Proc::spawn(
        "schedule-job",
        data_home.path(),
        &[
            "--method-delay",
            "2s",
            "--twin-delay",
            "1s",
            "--status-interval",
            "1s",
        ],
    );
    let status = service.wait_exit(Duration::from_secs(90));
    let service_out = service.output();
    assert!(
        status.success(),
        "schedule-job failed ({status}):\n{service_out}"
    );
    assert!(
        service_out.contains("still running"),
        "status lines like the tutorial's:\n{service_out}"
    );
    assert!(
        service_out.contains("complete"),
        "both jobs reported complete:\n{service_out}"
    );

    device.wait_for("Locking Door!", Duration::from_secs(10));
    device.wait_for("Twin callback called with", Duration::from_secs(10));
    let device_out = device.output();
    assert!(
        device_out.contains("10m"),
        "the lockDoor payload is shown:\n{device_out}"
    );
    assert!(
        device_out.contains("\"building\":43") || device_out.contains("\"building\": 43"),
        "the twin patch is shown:\n{device_out}"
    );

    assert!(
        device.terminate().success(),
        "sim-device exits 0 on SIGTERM"
    );
    assert!(hub.terminate().success(), "hub-emulator exits 0 on SIGTERM");
}

#[test]
fn tools_without_a_hub_say_how_to_configure_them() {
    let data_home = tempfile::tempdir().expect("temp dir");
    for name in ["schedule-job", "sim-device"] {
        let output = Command::new(binary(name))
            .env("XDG_DATA_HOME", data_home.path())
            .env_remove("IOTHUB_CONNECTION_STRING")
            .env_remove("IOTHUB_DEVICE_CONNECTION_STRING")
            .env_remove("IOTHUB_CA_FILE")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{name}: configuration errors exit 2; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains("hub-emulator"),
            "{name} suggests starting the local hub:\n{stderr}"
        );
        assert!(
            stderr.contains("IOTHUB_"),
            "{name} names the environment variables:\n{stderr}"
        );
    }
}

#[test]
fn the_tutorial_example_runs_both_jobs_to_completion() {
    // `cargo test` builds the examples too: target/<profile>/examples/tutorial.
    let exe = std::env::current_exe().expect("test executable path");
    let example = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .join("examples/tutorial");
    assert!(
        example.exists(),
        "{} is not built; run `cargo test --workspace`",
        example.display()
    );
    let output = Command::new(&example)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run the tutorial example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tutorial failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let device_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("[simDevice]"))
        .collect();
    let service_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("[scheduleJobService]"))
        .collect();
    assert!(
        device_lines
            .iter()
            .any(|l| l.contains("Locking Door!") && l.contains("10m")),
        "{stdout}"
    );
    assert!(
        device_lines
            .iter()
            .any(|l| l.contains("Twin callback called with")),
        "{stdout}"
    );
    assert!(
        service_lines.iter().any(|l| l.contains("still running")),
        "{stdout}"
    );
    assert!(
        service_lines
            .iter()
            .filter(|l| l.contains("complete."))
            .count()
            >= 2,
        "{stdout}"
    );
    assert!(stdout.contains("Both jobs completed."), "{stdout}");
}
