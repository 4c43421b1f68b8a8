//! `schedule-job rollout` against a real hub-emulator with real MQTT devices: canary and waves at
//! the requested rate, abort at the threshold, retries per failure type, resume after the
//! process is killed mid-wave, the window, and a hub that allows one active job at S1's pace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use hub_core::job::{DeviceJob, JobRequest, JobResponse};
use hub_core::method::CloudToDeviceMethod;
use hub_core::tier::Tier;
use hub_emulator::faults::FaultSpec;
use serde_json::{Value, json};
use support::{Received, TestDevice, TestHub, collect, connect_many, run_binary};

/// `tags.fleet = 'NAME'`: the tutorial's myDeviceId stays out of the rollouts.
fn fleet_query(name: &str) -> String {
    format!("tags.fleet = '{name}'")
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

async fn register_fleet(hub: &TestHub, fleet: &str, ids: &[String]) {
    for id in ids {
        hub.register(id, Some(json!({ "fleet": fleet }))).await;
    }
}

/// A hub, a fleet `PREFIX00..` tagged `fleet = PREFIX` (connected, but for `offline`), and a
/// state directory for the rollout.
type Setup = (
    Arc<TestHub>,
    Vec<TestDevice>,
    tempfile::TempDir,
    String,
    String,
);

/// [`Setup`]: (hub, connected devices, state dir, its path, the fleet's query).
async fn setup(config: hub_emulator::Config, prefix: &str, n: usize, offline: &[&str]) -> Setup {
    let hub = Arc::new(TestHub::start_with(config).await);
    let fleet = ids(prefix, n);
    register_fleet(&hub, prefix, &fleet).await;
    let online: Vec<String> = fleet
        .iter()
        .filter(|id| !offline.contains(&id.as_str()))
        .cloned()
        .collect();
    let devices = connect_many(&hub, &online).await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    (hub, devices, state, state_dir, fleet_query(prefix))
}

fn fault(hub: &TestHub, id: &str, spec: Value) {
    hub.hub
        .hub()
        .set_fault(id, FaultSpec::from_json(&spec).expect("fault spec"))
        .expect("fault set");
}

/// The rollout's jobs on the hub, by id.
async fn rollout_jobs(hub: &TestHub) -> Vec<JobResponse> {
    let mut jobs: Vec<JobResponse> = hub
        .client
        .query_jobs(None, None)
        .try_collect()
        .await
        .expect("job query");
    jobs.retain(|j| j.job_id.starts_with("ro-"));
    jobs.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    jobs
}

/// Every device row of every rollout job, by device id.
async fn rows_by_device(hub: &TestHub) -> HashMap<String, Vec<DeviceJob>> {
    let mut by_device: HashMap<String, Vec<DeviceJob>> = HashMap::new();
    for job in rollout_jobs(hub).await {
        let rows: Vec<DeviceJob> = hub
            .client
            .device_jobs(&job.job_id)
            .try_collect()
            .await
            .expect("device jobs");
        for row in rows {
            by_device
                .entry(row.device_id.clone())
                .or_default()
                .push(row);
        }
    }
    by_device
}

fn methods(received: &[Received]) -> usize {
    received
        .iter()
        .filter(|r| matches!(r, Received::Method(name, _) if name == "lockDoor"))
        .count()
}

async fn calls_per_device(devices: &mut [TestDevice], within: Duration) -> Vec<usize> {
    let mut counts = Vec::new();
    for d in devices.iter_mut() {
        counts.push(methods(&collect(d, within).await));
    }
    counts
}

fn events<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == name).collect()
}

fn created_time(job: &JobResponse) -> time::OffsetDateTime {
    hub_core::timestamp::parse(job.created_time.as_deref().expect("createdTime")).expect("time")
}

/// The rollout id in one of its job ids (`ro-<id>-w..`).
fn rollout_of(job_id: &str) -> String {
    job_id["ro-".len()..].split("-w").next().unwrap().to_owned()
}

/// `rollout resume ID --state-dir DIR --output json`.
async fn resume(hub: &TestHub, id: &str, state_dir: &str) -> support::CliRun {
    hub.cli(&[
        "rollout",
        "resume",
        id,
        "--state-dir",
        state_dir,
        "--output",
        "json",
    ])
    .await
}

/// `rollout method lockDoor --query QUERY` and the words of `more`.
fn lock_door<'a>(query: &'a str, more: &'a str) -> Vec<&'a str> {
    let mut all = vec!["rollout", "method", "lockDoor", "--query", query];
    all.extend(more.split_whitespace());
    all
}

fn args<'a>(base: &[&'a str], state_dir: &'a str) -> Vec<&'a str> {
    let mut all = base.to_vec();
    all.extend(["--state-dir", state_dir, "--output", "json"]);
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_then_waves_at_the_requested_rate() {
    let (hub, mut devices, _state, state_dir, query) =
        setup(hub_emulator::Config::ephemeral(), "c", 12, &[]).await;
    let base = lock_door(
        &query,
        r#"--payload {"lockTime":"10m"} --canary 2 --max-per-minute 600 --wave-size 5"#,
    );
    let run = hub.cli(&args(&base, &state_dir)).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines = run.json_lines();
    let started: Vec<u64> = events(&lines, "wave-started")
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .collect();
    assert_eq!(started, [2, 5, 5], "canary, then waves of --wave-size");
    assert_eq!(events(&lines, "wave-started")[0]["canary"], true);
    assert_eq!(events(&lines, "wave-finished").len(), 3);
    let done = events(&lines, "done")[0];
    assert_eq!(done["ending"], "completed");
    assert_eq!(done["counts"]["succeeded"], 12);

    // One job per wave, named after the rollout and the wave, created at the rate: 600/min is
    // 10 devices a second, so 2 devices hold the next job back 0.2 s and 5 devices 0.5 s.
    let jobs = rollout_jobs(&hub).await;
    let id = done["rolloutId"].as_str().unwrap();
    let names: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("ro-{id}-w00-a0-p01"),
            format!("ro-{id}-w01-a0-p01"),
            format!("ro-{id}-w02-a0-p01")
        ]
    );
    let gaps: Vec<f64> = jobs
        .windows(2)
        .map(|w| (created_time(&w[1]) - created_time(&w[0])).as_seconds_f64())
        .collect();
    assert!(gaps[0] >= 0.19, "canary to wave 2: {gaps:?}");
    assert!(gaps[1] >= 0.49, "wave 2 to wave 3: {gaps:?}");
    assert!(
        jobs[0].query_condition.as_deref() == Some("deviceId IN ['c00', 'c01']"),
        "{:?}",
        jobs[0].query_condition
    );
    assert_eq!(
        calls_per_device(&mut devices, Duration::from_millis(300)).await,
        vec![1; 12]
    );

    // Re-running the same command derives the same rollout: nothing runs again.
    let again = hub.cli(&args(&base, &state_dir)).await;
    assert_eq!(again.code, Some(0), "{again:#?}");
    assert!(
        again.stderr.contains(&format!("rollout {id} exists")),
        "{}",
        again.stderr
    );
    assert!(events(&again.json_lines(), "job-created").is_empty());
    assert_eq!(rollout_jobs(&hub).await.len(), 3);

    // status shows the waves and their counts.
    let status = hub
        .cli(&["rollout", "status", id, "--state-dir", &state_dir])
        .await;
    assert_eq!(status.code, Some(0), "{status:#?}");
    assert!(
        status.stdout.contains("wave  1 (canary)"),
        "{}",
        status.stdout
    );
    assert!(status.stdout.contains("12 succeeded"), "{}", status.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn aborts_at_the_threshold_with_the_devices_reached() {
    let (hub, mut devices, _state, state_dir, query) =
        setup(hub_emulator::Config::ephemeral(), "a", 10, &[]).await;
    for id in ["a02", "a03", "a04"] {
        fault(
            &hub,
            id,
            json!({ "kind": "failing", "status": 500, "payload": {"error": "jammed"} }),
        );
    }
    let base = lock_door(
        &query,
        "--canary 2 --max-per-minute 6000 --wave-size 4 --abort-when failed>20% --abort-min-executed 4",
    );
    let run = hub.cli(&args(&base, &state_dir)).await;
    assert_eq!(run.code, Some(1), "an abort exits 1: {run:#?}");
    let lines = run.json_lines();
    let aborted = events(&lines, "aborted");
    assert_eq!(aborted.len(), 1, "{lines:#?}");
    let aborted = aborted[0];
    assert_eq!(aborted["rule"], "failed>20%");
    assert_eq!(aborted["percent"], 50.0, "3 of 6 executed failed");
    assert_eq!(aborted["executed"], 6);
    assert_eq!(aborted["threshold"], 20.0);
    let reached: Vec<&str> = aborted["reached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(reached, ["a00", "a01", "a02", "a03", "a04", "a05"]);
    assert_eq!(events(&lines, "done")[0]["ending"], "aborted");
    assert!(
        run.stderr.contains("aborted: failed>20% measured 50.0%"),
        "{}",
        run.stderr
    );
    // No job was created for the third wave, and its devices got nothing.
    assert_eq!(rollout_jobs(&hub).await.len(), 2);
    let rows = rows_by_device(&hub).await;
    for id in ["a06", "a07", "a08", "a09"] {
        assert!(!rows.contains_key(id), "{id} was not to be reached");
    }
    let mut got = HashMap::new();
    for d in devices.iter_mut() {
        let id = d.client.device_id().to_owned();
        got.insert(id, methods(&collect(d, Duration::from_millis(200)).await));
    }
    for id in ["a06", "a07", "a08", "a09"] {
        assert_eq!(got[id], 0, "{id}");
    }
    assert_eq!(got["a00"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_each_failure_type_up_to_its_cap() {
    // r01 always fails, r02 is offline at first, r03 answers too late at first.
    let (hub, _devices, _state, state_dir, query) =
        setup(hub_emulator::Config::ephemeral(), "r", 6, &["r02"]).await;
    fault(&hub, "r01", json!({ "kind": "failing", "status": 500 }));
    fault(
        &hub,
        "r03",
        json!({ "kind": "slow", "delay": "7s", "for": "4s" }),
    );
    let base = lock_door(
        &query,
        "--response-timeout 5s --max-per-minute 6000 --retry failed:2,timed-out:1,offline:3 --retry-after 1s",
    );
    let hub2 = hub.clone();
    // r02 connects once its first attempt has failed (DeviceNotOnline).
    let late = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = rows_by_device(&hub2).await;
            if rows
                .get("r02")
                .is_some_and(|r| r.iter().any(|row| row.status.as_str() == "failed"))
            {
                return hub2.connect("r02").await;
            }
            assert!(Instant::now() < deadline, "r02 never failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let run = hub.cli(&args(&base, &state_dir)).await;
    let _r02 = late.await.unwrap();
    assert_eq!(
        run.code,
        Some(1),
        "r01 still fails after its retries: {run:#?}"
    );
    let lines = run.json_lines();
    let retries = events(&lines, "retry-scheduled");
    assert_eq!(retries.len(), 2, "{lines:#?}");
    assert_eq!(
        retries[0]["byType"],
        json!({ "failed": 1, "offline": 1, "timed-out": 1 })
    );
    assert_eq!(retries[1]["byType"], json!({ "failed": 1 }));
    let done = events(&lines, "done")[0];
    assert_eq!(done["counts"]["succeeded"], 5);
    assert_eq!(done["counts"]["failed"], 1);
    // The retries are jobs over just the failed devices.
    let rows = rows_by_device(&hub).await;
    assert_eq!(rows["r01"].len(), 3, "1 attempt + 2 retries");
    assert_eq!(rows["r02"].len(), 2);
    assert_eq!(rows["r03"].len(), 2);
    for id in ["r00", "r04", "r05"] {
        assert_eq!(rows[id].len(), 1, "{id} succeeded once and was left alone");
    }
    let jobs = rollout_jobs(&hub).await;
    assert!(
        jobs.iter().any(|j| j.job_id.ends_with("-w00-a2-p01")),
        "{jobs:?}"
    );
}

/// S1 with one unit: its pace, 10 jobs device operations a second.
fn s1() -> hub_emulator::Config {
    hub_emulator::Config {
        tier: Some(Tier::S1.with_units(1).unwrap()),
        ..hub_emulator::Config::ephemeral()
    }
}

/// The first rollout job `pick` takes, polled for up to 20 s.
async fn wait_for_job(hub: &TestHub, pick: impl Fn(&JobResponse) -> bool) -> Option<JobResponse> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = rollout_jobs(hub).await.into_iter().find(|j| pick(j));
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        // S1 allows 100 jobs operations a minute: poll gently.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Spawns the binary (the test kills it); its stderr is piped when `stderr` says so.
fn spawn_binary(hub: &TestHub, args: &[&str], stderr: bool) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_schedule-job"))
        .arg("--hub-env")
        .arg(&hub.env_path)
        .args(args)
        .env_remove("IOTHUB_CONNECTION_STRING")
        .env_remove("IOTHUB_CA_FILE")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(if stderr {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .spawn()
        .expect("schedule-job starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn resumes_after_the_process_is_killed_mid_wave_without_running_a_device_twice() {
    // S1's pace (10 device operations a second) makes each wave of 8 take most of a second.
    let config = s1();
    let (hub, mut devices, _state, state_dir, query) = setup(config, "k", 24, &[]).await;
    let base = lock_door(&query, "--max-per-minute 600 --wave-size 8");
    let mut child = spawn_binary(&hub, &args(&base, &state_dir), false);
    // Kill it while the second wave's job runs.
    let found = wait_for_job(&hub, |j| j.job_id.contains("-w01-")).await;
    child.kill().expect("kill");
    child.wait().expect("wait");
    let killed_during = found.expect("the second wave never started");
    let id = rollout_of(&killed_during.job_id);
    let run = resume(&hub, &id, &state_dir).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines = run.json_lines();
    assert!(
        events(&lines, "rollout-started")[0]["jobsOnHub"]
            .as_u64()
            .unwrap()
            >= 2
    );
    assert_eq!(events(&lines, "done")[0]["counts"]["succeeded"], 24);
    // The killed run's jobs were followed, not created again.
    let created: Vec<&str> = events(&lines, "job-created")
        .iter()
        .map(|e| e["jobId"].as_str().unwrap())
        .collect();
    assert!(
        !created.contains(&killed_during.job_id.as_str()),
        "{created:?}"
    );
    assert_eq!(rollout_jobs(&hub).await.len(), 3);
    assert_eq!(
        calls_per_device(&mut devices, Duration::from_millis(300)).await,
        vec![1; 24],
        "every device was called exactly once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waits_for_the_running_job_on_a_hub_that_allows_one_active_job() {
    let config = hub_emulator::Config {
        max_active_jobs: 1,
        ..s1()
    };
    let (hub, mut devices, state, state_dir, query) = setup(config, "s", 10, &[]).await;
    let base = lock_door(
        &query,
        "--canary 20% --max-per-minute 6000 --wave-size 4 --tier S1",
    );

    // The plan on S1: the rate is clamped to 600/min, and 10 devices take at least 1 s.
    let plan = hub
        .cli(
            &[
                &base[..],
                &["--dry-run", "--state-dir", &state_dir, "--output", "json"],
            ]
            .concat(),
        )
        .await;
    assert_eq!(plan.code, Some(0), "{plan:#?}");
    let doc = plan.json();
    let sizes: Vec<u64> = doc["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [2, 4, 4]);
    assert!(
        doc["waves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["perMinute"] == 600.0)
    );
    assert!(
        (doc["estimatedSeconds"].as_f64().unwrap() - 1.0).abs() < 1e-6,
        "{doc}"
    );
    assert!(
        rollout_jobs(&hub).await.is_empty(),
        "a dry run creates nothing"
    );
    assert_eq!(
        std::fs::read_dir(state.path()).unwrap().count(),
        0,
        "nor state"
    );

    // Someone else's job holds the hub's only active slot for a second.
    let other = JobRequest::schedule_device_method(
        "someone-elses-job",
        "deviceId = 'myDeviceId'",
        CloudToDeviceMethod::new("ping").with_timeouts(5, 0),
        hub_core::timestamp::format_millis(
            time::OffsetDateTime::now_utc() + Duration::from_secs(1),
        ),
        60,
    );
    hub.client.create_job(&other).await.expect("other job");
    let mut human = base.to_vec();
    human.extend(["--state-dir", &state_dir]);
    let run = hub.cli(&human).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout.contains("at its cap on active jobs"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("wave 1/3 (canary): 2 device(s) at 600/min"),
        "{}",
        run.stdout
    );
    let jobs = rollout_jobs(&hub).await;
    assert_eq!(jobs.len(), 3);
    assert!(
        jobs.iter()
            .all(|j| j.status.as_ref().map(|s| s.as_str()) == Some("completed"))
    );
    assert_eq!(
        calls_per_device(&mut devices, Duration::from_millis(300)).await,
        vec![1; 10]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stops_at_the_window_end_and_resumes_in_the_next_window() {
    // Twin jobs reach offline devices too: nobody needs to be connected.
    let all = ["w00", "w01", "w02", "w03", "w04", "w05"];
    let (hub, _devices, _state, state_dir, query) =
        setup(hub_emulator::Config::ephemeral(), "w", 6, &all).await;
    // The window opens in 0.5 s and closes 1.5 s later; at 120/min (a device every half
    // second) it holds some of the six.
    let now = time::OffsetDateTime::now_utc();
    let start_at = now + Duration::from_millis(500);
    let start = hub_core::timestamp::format_millis(start_at);
    let stop = hub_core::timestamp::format_millis(now + Duration::from_millis(2000));
    let base = [
        "rollout",
        "twin",
        "--desired",
        r#"{"fw":"2.1"}"#,
        "--query",
        &query,
        "--max-per-minute",
        "120",
        "--wave-size",
        "1",
    ];
    let mut first = args(&base, &state_dir);
    first.extend(["--start-at", &start, "--stop-starting-at", &stop]);
    let run = hub.cli(&first).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    let done = events(&run.json_lines(), "done")[0].clone();
    assert_eq!(done["ending"], "window-ended");
    let reached = done["counts"]["succeeded"].as_u64().unwrap();
    assert!((1..6).contains(&reached), "{done}");
    let id = done["rolloutId"].as_str().unwrap().to_owned();
    let first_job = &rollout_jobs(&hub).await[0];
    assert!(
        created_time(first_job) >= start_at,
        "no job before --start-at"
    );

    let run = resume(&hub, &id, &state_dir).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(
        events(&run.json_lines(), "done")[0]["counts"]["succeeded"],
        6
    );
    let rows = rows_by_device(&hub).await;
    for id in &ids("w", 6) {
        assert_eq!(rows[id].len(), 1, "{id} was updated once");
        let twin = hub.client.get_twin(id).await.unwrap();
        assert_eq!(twin.desired().unwrap().0["fw"], "2.1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_before_anything_is_created() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    let refusals = [
        ("--max-per-minute 10 --abort-when failed>150%", "below 100%"),
        ("--max-per-minute 10 --retry failed:20", "0 to 10"),
        (
            "--base-rate 10 --increment-factor 9 --rate-increase-after notified:5",
            "1.1 and 5",
        ),
        ("--max-per-minute 10 --canary 0", "at least one device"),
        ("--max-per-minute 10 --tier B1", "basic tiers have no jobs"),
        (
            "--max-per-minute 10 --stop-starting-at 2001-01-01T00:00:00Z",
            "not in the future",
        ),
        ("--max-per-minute 10 --id no_spaces,please", "rollout id"),
        ("--canary 2", "--max-per-minute"),
    ];
    for (bad, says) in refusals {
        let mut all = lock_door("*", bad);
        all.extend(["--state-dir", &state_dir]);
        let run = hub.cli(&all).await;
        assert_eq!(run.code, Some(2), "{bad:?}: {run:#?}");
        assert!(run.stderr.contains(says), "{bad:?}: {}", run.stderr);
    }
    assert!(rollout_jobs(&hub).await.is_empty());
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
    let run = run_binary(vec![
        "--hub-env".into(),
        hub.env_path.display().to_string(),
        "rollout".into(),
        "resume".into(),
        "nosuchrollout".into(),
        "--state-dir".into(),
        state_dir.clone(),
    ])
    .await;
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("no rollout nosuchrollout"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exponential_rate_grows_by_the_devices_that_succeeded() {
    let (hub, _devices, _state, state_dir, query) =
        setup(hub_emulator::Config::ephemeral(), "e", 6, &[]).await;
    fault(&hub, "e03", json!({ "kind": "failing", "status": 409 }));
    // Steps of 2 devices: after the first wave's 2 successes the rate doubles; the second wave
    // has a failure, so 3 successes in all make one step still, and the third wave keeps 1200.
    let base = lock_door(
        &query,
        "--base-rate 600 --increment-factor 2 --rate-increase-after succeeded:2",
    );
    let run = hub.cli(&args(&base, &state_dir)).await;
    assert_eq!(run.code, Some(1), "e03 failed: {run:#?}");
    let lines = run.json_lines();
    let rates: Vec<f64> = events(&lines, "wave-started")
        .iter()
        .map(|e| e["perMinute"].as_f64().unwrap())
        .collect();
    assert_eq!(rates, [600.0, 1200.0, 1200.0]);
    let done = events(&lines, "done")[0];
    assert_eq!(done["counts"]["succeeded"], 5);
    assert_eq!(done["counts"]["failed"], 1, "a non-2xx answer is a failure");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_leaves_the_running_job_to_the_hub_and_says_how_to_resume() {
    let config = s1();
    let (hub, mut devices, _state, state_dir, query) = setup(config, "i", 10, &[]).await;
    // One job of 10 devices at S1's 10 device operations a second: about a second.
    let base = lock_door(&query, "--max-per-minute 600");
    let child = spawn_binary(&hub, &args(&base, &state_dir), true);
    let job = wait_for_job(&hub, |_| true).await;
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    let out = child.wait_with_output().expect("wait");
    let job = job.expect("the rollout created its job");
    assert!(interrupted.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("schedule-job rollout resume"), "{stderr}");
    let id = rollout_of(&job.job_id);
    let run = resume(&hub, &id, &state_dir).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        events(&run.json_lines(), "job-created").is_empty(),
        "the job was followed, not made again"
    );
    assert_eq!(
        calls_per_device(&mut devices, Duration::from_millis(300)).await,
        vec![1; 10]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_window_end_cancels_the_running_job_and_the_next_window_runs_the_rest() {
    let (hub, mut devices, _state, state_dir, query) = setup(s1(), "x", 30, &[]).await;
    // One job of 30 devices at S1's 10 device operations a second: 3 s; the window ends after 1.
    let stop = hub_core::timestamp::format_millis(
        time::OffsetDateTime::now_utc() + Duration::from_millis(1200),
    );
    let mut first = args(
        &lock_door(&query, "--max-per-minute 600 --retry-after 100ms"),
        &state_dir,
    );
    first.extend(["--stop-starting-at", &stop, "--at-window-end", "cancel"]);
    let run = hub.cli(&first).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    let done = events(&run.json_lines(), "done")[0].clone();
    assert_eq!(done["ending"], "window-ended");
    let canceled = done["counts"]["canceled"].as_u64().unwrap();
    assert!(canceled > 0, "the running job was cancelled: {done}");
    let jobs = rollout_jobs(&hub).await;
    assert_eq!(
        jobs[0].status.as_ref().map(|s| s.as_str()),
        Some("cancelled")
    );

    let id = done["rolloutId"].as_str().unwrap().to_owned();
    let run = resume(&hub, &id, &state_dir).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines = run.json_lines();
    let rerun = events(&lines, "retry-scheduled");
    assert_eq!(rerun[0]["byType"], json!({ "canceled": canceled }));
    assert_eq!(events(&lines, "done")[0]["counts"]["succeeded"], 30);
    assert_eq!(
        calls_per_device(&mut devices, Duration::from_millis(300)).await,
        vec![1; 30],
        "the devices the cancelled job had reached were left alone"
    );
}
