//! The schedule-job binary against a real hub-emulator with real MQTT devices.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use hub_core::job::JobResponse;
use serde_json::{Value, json};
use support::{FAST, Received, TestHub, collect, connect_many, run_binary};

async fn jobs_on_hub(hub: &TestHub) -> Vec<JobResponse> {
    hub.client
        .query_jobs(None, None)
        .try_collect()
        .await
        .expect("job query")
}

#[tokio::test(flavor = "multi_thread")]
async fn tutorial_flow_locks_the_door_and_updates_the_twin() {
    let hub = TestHub::start().await;
    let mut device = hub.connect("myDeviceId").await;
    let run = hub.cli(FAST).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("Direct method called with Job Id: "));
    assert!(run.stdout.contains("Device twin called with Job Id: "));
    assert!(
        run.stdout.contains("still running."),
        "the status is posted while waiting"
    );
    assert!(
        run.stdout.matches("complete.").count() >= 2,
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("Job status posted, press Ctrl-C to exit")
    );
    assert!(
        run.stdout
            .contains(r#"the device answered 200 {"result":"locked"}"#),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("Device twin updated: desired $version"));
    let got = collect(&mut device, Duration::from_millis(500)).await;
    assert!(
        got.contains(&Received::Method(
            "lockDoor".into(),
            Some(json!({"lockTime": "10m"}))
        )),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|r| matches!(r, Received::Desired(p) if p["building"] == 43 && p["floor"] == 3)),
        "{got:?}"
    );
    let twin = hub.client.get_twin("myDeviceId").await.unwrap();
    let desired = twin.desired().unwrap();
    assert_eq!(desired.0["building"], 43);
    assert_eq!(desired.0["floor"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn tutorial_json_output_is_json_lines() {
    let hub = TestHub::start().await;
    let _device = hub.connect("myDeviceId").await;
    let mut args = FAST.to_vec();
    args.extend(["--output", "json"]);
    let run = hub.cli(&args).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines = run.json_lines();
    assert_eq!(lines[0]["event"], "scheduled");
    assert!(lines.iter().any(|l| l["event"] == "status"));
    let done = lines.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["ok"], true);
    assert_eq!(done["method"]["status"], 200);
    assert_eq!(done["method"]["payload"], json!({"result": "locked"}));
    assert!(done["twin"]["version"].as_u64().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn tutorial_as_hub_jobs() {
    let hub = TestHub::start().await;
    let mut device = hub.connect("myDeviceId").await;
    let mut args = FAST.to_vec();
    args.push("--hub-jobs");
    let run = hub.cli(&args).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout.contains("the device answered 200"),
        "{}",
        run.stdout
    );
    let got = collect(&mut device, Duration::from_millis(500)).await;
    assert!(
        got.contains(&Received::Method(
            "lockDoor".into(),
            Some(json!({"lockTime": "10m"}))
        )),
        "{got:?}"
    );
    let jobs = jobs_on_hub(&hub).await;
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs.iter()
            .all(|j| j.status.as_ref().map(|s| s.as_str()) == Some("completed")),
        "{jobs:?}"
    );
}

/// Runs the tutorial's pair as hub jobs on `hub` and checks that both jobs completed: the method
/// answered, the device got the desired patch, the hub holds two completed jobs.
async fn tutorial_pair_completes(hub: &TestHub, what: &str) -> Vec<Value> {
    let mut device = hub.connect("myDeviceId").await;
    let mut args = FAST.to_vec();
    args.extend(["--hub-jobs", "--output", "json"]);
    let run = hub.cli(&args).await;
    assert_eq!(run.code, Some(0), "{what}: {run:#?}");
    let lines = run.json_lines();
    let done = lines.last().cloned().unwrap_or_default();
    assert_eq!(done["ok"], true, "{what}: {done}");
    assert_eq!(done["method"]["status"], 200, "{what}: {done}");
    let got = collect(&mut device, Duration::from_millis(500)).await;
    assert!(
        got.iter()
            .any(|r| matches!(r, Received::Desired(p) if p["building"] == 43)),
        "{what}: {got:?}"
    );
    let jobs = jobs_on_hub(hub).await;
    assert_eq!(jobs.len(), 2, "{what}: {jobs:?}");
    assert!(
        jobs.iter()
            .all(|j| j.status.as_ref().map(|s| s.as_str()) == Some("completed")),
        "{what}: {jobs:?}"
    );
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn tutorial_as_hub_jobs_runs_both_jobs_on_a_hub_that_allows_one_active_job() {
    // F1 and S1: one active job at a time. The twin job used to fail with 429004.
    let hub = TestHub::start_with(hub_emulator::Config {
        max_active_jobs: 1,
        ..hub_emulator::Config::ephemeral()
    })
    .await;
    let lines = tutorial_pair_completes(&hub, "one active job").await;
    let scheduled: Vec<&Value> = lines.iter().filter(|l| l["event"] == "scheduled").collect();
    assert_eq!(
        scheduled.len(),
        2,
        "the twin job is scheduled later: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tutorial_as_hub_jobs_completes_both_jobs_on_f1_and_s1_with_their_throttles() {
    for tier in [hub_core::tier::Tier::F1, hub_core::tier::Tier::S1] {
        let quotas = tier.with_units(1).expect("tier");
        let hub = TestHub::start_with(hub_emulator::Config {
            tier: Some(quotas),
            max_active_jobs: quotas.max_active_jobs(),
            ..hub_emulator::Config::ephemeral()
        })
        .await;
        tutorial_pair_completes(&hub, &tier.to_string()).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_device_is_refused_before_anything_runs() {
    let hub = TestHub::start().await;
    let run = hub
        .cli(&[
            "--device-id",
            "ghost",
            "--method-delay",
            "0s",
            "--twin-delay",
            "0s",
        ])
        .await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains("device 'ghost' is not registered"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("Job Id"), "nothing was scheduled");
    let run = hub.cli(&["--device-id", "ghost", "--hub-jobs"]).await;
    assert_eq!(run.code, Some(2));
    assert!(jobs_on_hub(&hub).await.is_empty(), "no job was created");
}

#[tokio::test(flavor = "multi_thread")]
async fn device_offline_when_the_method_fires() {
    let hub = TestHub::start().await;
    hub.register("sleepy", None).await;
    let mut args = FAST.to_vec();
    args.extend(["--device-id", "sleepy"]);
    let run = hub.cli(&args).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(
        run.stdout.contains("Direct method lockDoor failed"),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("DeviceNotOnline"), "{}", run.stderr);
    // The twin half still happened.
    let twin = hub.client.get_twin("sleepy").await.unwrap();
    assert_eq!(twin.desired().unwrap().0["floor"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_job_over_a_tag_query_on_100_devices() {
    let hub = Arc::new(TestHub::start().await);
    let ids: Vec<String> = (0..100).map(|i| format!("lock-{i:03}")).collect();
    for id in &ids {
        hub.register(id, Some(json!({"building": "43"}))).await;
    }
    hub.register("elsewhere", Some(json!({"building": "44"})))
        .await;
    let mut devices = connect_many(&hub, &ids).await;

    let dry = hub
        .cli(&[
            "method",
            "lockDoor",
            "--query",
            "tags.building = '43'",
            "--dry-run",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(dry.code, Some(0), "{dry:#?}");
    let doc = dry.json();
    assert_eq!(doc["deviceCount"], 100);
    assert!(
        !doc["devices"]
            .as_array()
            .unwrap()
            .contains(&json!("elsewhere"))
    );
    assert!(
        jobs_on_hub(&hub).await.is_empty(),
        "a dry run creates nothing"
    );

    let run = hub
        .cli(&[
            "method",
            "lockDoor",
            "--payload",
            r#"{"lockTime":"10m"}"#,
            "--query",
            "tags.building = '43'",
            "--job-id",
            "lock-all",
            "--wait",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines = run.json_lines();
    assert_eq!(lines[0]["event"], "created");
    assert!(lines.iter().any(|l| l["event"] == "progress"));
    let done = lines.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["summary"]["total"], 100);
    assert_eq!(done["summary"]["succeeded"], 100);
    assert_eq!(done["job"]["deviceJobStatistics"]["succeededCount"], 100);
    for d in &mut devices {
        let got = collect(d, Duration::from_millis(50)).await;
        assert!(got.contains(&Received::Method(
            "lockDoor".into(),
            Some(json!({"lockTime": "10m"}))
        )));
    }

    let results = hub.cli(&["results", "lock-all", "--output", "json"]).await;
    assert_eq!(results.code, Some(0));
    let doc = results.json();
    assert_eq!(doc["devices"].as_array().unwrap().len(), 100);
    assert_eq!(
        doc["devices"][0]["methodStatus"]
            .as_i64()
            .or(doc["devices"][0]["method_status"].as_i64()),
        Some(200)
    );

    let human = hub.cli(&["results", "lock-all"]).await;
    assert!(
        human
            .stdout
            .contains("100 device(s): 100 succeeded, 0 failed"),
        "{}",
        human.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twin_job_waits_and_reports_failures_and_cancel_works() {
    let hub = Arc::new(TestHub::start().await);
    for id in ["t1", "t2"] {
        hub.register(id, None).await;
    }
    let run = hub
        .cli(&[
            "twin",
            "--desired",
            r#"{"floor":7}"#,
            "--tags",
            r#"{"zone":"b"}"#,
            "--device-id",
            "t1",
            "--device-id",
            "t2",
            "--wait",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout.contains("2 device(s): 2 succeeded"),
        "{}",
        run.stdout
    );
    let twin = hub.client.get_twin("t2").await.unwrap();
    assert_eq!(twin.tags.unwrap()["zone"], "b");

    // A method job on an offline device: it fails, the summary says why, exit 1.
    let run = hub
        .cli(&["method", "lockDoor", "--device-id", "t1", "--wait"])
        .await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stdout.contains("1 failed"), "{}", run.stdout);
    assert!(
        run.stdout.contains("t1:"),
        "the first failures are listed: {}",
        run.stdout
    );

    // Schedule far ahead, then cancel.
    let run = hub
        .cli(&[
            "twin",
            "--desired",
            r#"{"x":1}"#,
            "--query",
            "*",
            "--start-in",
            "1h",
            "--job-id",
            "later",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.json()["jobId"], "later");
    let cancel = hub.cli(&["cancel", "later", "--output", "json"]).await;
    assert_eq!(cancel.code, Some(0), "{cancel:#?}");
    assert_eq!(cancel.json()["status"], "cancelled");
    let status = hub.cli(&["status", "later"]).await;
    assert!(status.stdout.contains("cancelled"), "{}", status.stdout);
    let list = hub
        .cli(&["list", "--status", "cancelled", "--output", "json"])
        .await;
    let jobs = list.json();
    assert_eq!(jobs.as_array().map(Vec::len), Some(1), "{jobs}");
    let list = hub
        .cli(&["list", "--type", "twin", "--output", "json"])
        .await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_one_clear_message_and_creates_nothing() {
    let hub = TestHub::start().await;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "method",
                "lockDoor",
                "--query",
                "*",
                "--payload",
                "{lockTime:10m}",
            ],
            "not valid JSON",
        ),
        (
            vec!["twin", "--desired", "[1,2]", "--query", "*"],
            "expected a JSON object",
        ),
        (
            vec!["method", "lockDoor", "--query", "tags.building = = '43'"],
            "the hub rejected the query condition",
        ),
        (
            vec![
                "method",
                "lockDoor",
                "--query",
                "*",
                "--start-at",
                "2001-01-01T00:00:00Z",
            ],
            "is in the past",
        ),
        (
            vec!["method", "lockDoor", "--device-id", "ghost"],
            "device 'ghost' is not registered",
        ),
        (
            vec![
                "method",
                "lockDoor",
                "--query",
                "*",
                "--response-timeout",
                "1s",
            ],
            "--response-timeout must be between",
        ),
        (vec!["status", "no-such-job"], "JobNotFound"),
    ];
    for (args, needle) in cases {
        let run = hub.cli(&args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:#?}");
        assert!(
            run.stderr.contains(needle),
            "{args:?} should say {needle:?}: {}",
            run.stderr
        );
        assert!(
            run.stdout.is_empty(),
            "{args:?} printed results: {}",
            run.stdout
        );
    }
    assert!(jobs_on_hub(&hub).await.is_empty(), "no job was created");

    let run = run_binary(vec![
        "--connection-string".into(),
        "HostName=x;SharedAccessKey=c2VjcmV0".into(),
        "list".into(),
    ])
    .await;
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("invalid connection string") && !run.stderr.contains("c2VjcmV0"),
        "{}",
        run.stderr
    );

    // Nothing listens on port 9 of localhost.
    let cs = format!(
        "HostName=localhost:9;SharedAccessKeyName=iothubowner;SharedAccessKey={}",
        "c2VjcmV0c2VjcmV0"
    );
    let run = run_binary(vec!["--connection-string".into(), cs, "list".into()]).await;
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr
            .contains("cannot reach the hub at https://localhost:9")
            && run.stderr.contains("hub-emulator running"),
        "{}",
        run.stderr
    );

    let run = run_binary(vec!["list".into()]).await;
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("no IoT Hub connection string"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_side_fan_out_reports_each_device() {
    let hub = Arc::new(TestHub::start().await);
    let ids: Vec<String> = (0..20).map(|i| format!("cs-{i:02}")).collect();
    for id in &ids {
        hub.register(id, Some(json!({"fleet": "cs"}))).await;
    }
    let _devices = connect_many(&hub, &ids[..19]).await;
    let run = hub
        .cli(&[
            "method",
            "lockDoor",
            "--query",
            "tags.fleet = 'cs'",
            "--client-side",
            "--concurrency",
            "8",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(run.code, Some(1), "one device is offline: {run:#?}");
    let doc = run.json();
    assert_eq!(doc["summary"]["succeeded"], 19);
    assert_eq!(doc["summary"]["failed"], 1);
    let failure = &doc["summary"]["first_failures"][0];
    assert_eq!(failure["device_id"], "cs-19");
    assert_eq!(failure["error_code"], "DeviceNotOnline");
    assert!(doc["devicesPerSecond"].as_f64().unwrap() > 0.0);
    let _: Value = doc;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_stops_early_and_says_what_was_left_undone() {
    use clap::Parser;
    let hub = TestHub::start().await;
    let env = hub.env_path.display().to_string();
    let args = schedule_job::Args::try_parse_from([
        "schedule-job",
        "--hub-env",
        &env,
        "--method-delay",
        "30s",
        "--twin-delay",
        "30s",
    ])
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.cancel();
    });
    let outcome = schedule_job::run(args, shutdown).await.unwrap();
    match outcome {
        schedule_job::Outcome::Failed(reason) => {
            assert!(reason.contains("stopped by Ctrl-C"), "{reason}");
            assert_eq!(reason.matches("was not started").count(), 2, "{reason}");
        }
        other => panic!("expected an interrupted run, got {other:?}"),
    }
    let twin = hub.client.get_twin("myDeviceId").await.unwrap();
    assert!(
        twin.desired().unwrap().0.get("building").is_none(),
        "the twin was not touched"
    );
}
