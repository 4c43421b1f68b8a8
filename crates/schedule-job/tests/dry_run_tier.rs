//! `--dry-run` predicts how long a job takes on the hub's tier, from `--tier` or from the
//! emulator's hub.env, says "unknown" without one, and the emulator's pace bears it out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use hub_core::tier::Tier;
use serde_json::json;
use support::{FAST, TestHub};

const DEVICES: usize = 20;

async fn hub_with_devices(tier: Option<Tier>) -> TestHub {
    let hub = TestHub::start_with(hub_emulator::Config {
        tier: tier.map(|t| t.with_units(1).expect("tier")),
        ..hub_emulator::Config::ephemeral()
    })
    .await;
    for i in 0..DEVICES {
        hub.register(&format!("door-{i:02}"), Some(json!({ "building": "43" })))
            .await;
    }
    hub
}

/// A twin job over the test's devices, with `extra` flags (`--dry-run`, `--tier`, ...).
fn twin_job(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec![
        "twin",
        "--desired",
        r#"{"floor":3}"#,
        "--query",
        "tags.building = '43'",
    ];
    args.extend(extra);
    args
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_tier_the_duration_is_unknown_and_the_hint_names_tier() {
    let hub = hub_with_devices(None).await;
    let env = std::fs::read_to_string(&hub.env_path).unwrap();
    assert!(!env.contains("IOTHUB_TIER"), "{env}");
    let run = hub.cli(&twin_job(&["--dry-run"])).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("20 device(s) match"), "{}", run.stdout);
    assert!(
        run.stdout.contains("job duration: unknown")
            && run.stdout.contains("started without --tier")
            && run.stdout.contains("--tier S1"),
        "{}",
        run.stdout
    );
    let doc = hub
        .cli(&twin_job(&["--dry-run", "--output", "json"]))
        .await
        .json();
    assert_eq!(doc["deviceCount"], 20);
    assert!(
        doc["tier"].is_null() && doc["estimatedSeconds"].is_null(),
        "{doc}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tier_flag_predicts_the_duration_and_the_single_job_cap() {
    let hub = hub_with_devices(None).await;
    let mut args = vec!["--tier", "S1"];
    args.extend(twin_job(&["--dry-run"]));
    let run = hub.cli(&args).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout.contains(
            "job duration on S1 with 1 unit (from --tier): at least 2.0 s for 20 device(s), at 10 device operations a second"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("S1 allows one active job at a time"),
        "{}",
        run.stdout
    );
    // Per subcommand too, with units: S3 runs 50 a second per unit.
    let doc = hub
        .cli(&twin_job(&[
            "--dry-run",
            "--tier",
            "s3",
            "--units",
            "2",
            "--output",
            "json",
        ]))
        .await
        .json();
    assert_eq!(doc["tier"]["name"], "S3");
    assert_eq!(doc["tier"]["units"], 2);
    assert_eq!(doc["estimatedSeconds"], 0.2);
    assert_eq!(doc["maxActiveJobs"], 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s1_emulator_says_its_tier_in_hub_env_and_the_job_takes_as_long_as_predicted() {
    let hub = hub_with_devices(Some(Tier::S1)).await;
    let env = std::fs::read_to_string(&hub.env_path).unwrap();
    assert!(env.contains("IOTHUB_TIER=S1\nIOTHUB_UNITS=1\n"), "{env}");
    let doc = hub
        .cli(&twin_job(&["--dry-run", "--output", "json"]))
        .await
        .json();
    assert_eq!(doc["estimatedSeconds"], 2.0, "{doc}");
    assert!(
        doc["tier"]["origin"]
            .as_str()
            .is_some_and(|o| o.contains("hub.env")),
        "{doc}"
    );

    // The emulator paces the job as the prediction says: 20 devices at 10 a second.
    let started = Instant::now();
    let run = hub.cli(&twin_job(&["--wait"])).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_800),
        "predicted at least 2 s, took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tutorial_hub_jobs_on_a_known_single_job_tier_defers_the_twin_job_up_front() {
    // The hub itself would take both jobs at once (no cap set): only --tier S1 says it may not.
    let hub = TestHub::start().await;
    let _device = hub.connect("myDeviceId").await;
    let mut args = vec!["--tier", "S1", "--hub-jobs"];
    args.extend(FAST);
    let run = hub.cli(&args).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(
        run.stdout
            .contains("S1 allows one active job at a time (from --tier): the device twin job"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("the device answered 200"),
        "{}",
        run.stdout
    );
}
