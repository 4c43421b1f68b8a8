//! The tier's throttles over real REST calls: a burst passes, then calls are shaped (served at
//! the tier's rate, later), then refused with IoT Hub's 429 ThrottlingException; no tier, no
//! throttles.

mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use hub_core::tier::Tier;
use hub_emulator::Config;
use reqwest::{Method, StatusCode};
use serde_json::json;

use support::TestHub;

/// Fires `n` queries at once and returns each one's status and how long it took.
async fn concurrent_queries(hub: &TestHub, n: usize) -> Vec<(support::Answer, Duration)> {
    let body = json!({ "query": "SELECT * FROM devices" });
    join_all((0..n).map(|_| async {
        let started = Instant::now();
        let answer = hub.call(Method::POST, "/devices/query", Some(&body)).await;
        (answer, started.elapsed())
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s1_a_query_burst_passes_then_is_shaped_then_refused_with_429001() {
    let hub = TestHub::start_with(Config {
        tier: Some(Tier::S1.with_units(1).expect("S1")),
        ..Config::ephemeral()
    })
    .await;
    // S1: 20 queries a minute. A minute's worth passes at once, then 10 s of queue at one
    // query every 3 s holds 3 more, and the rest is refused.
    let answers = concurrent_queries(&hub, 40).await;
    let ok: Vec<&Duration> = answers
        .iter()
        .filter(|(a, _)| a.status == StatusCode::OK)
        .map(|(_, took)| took)
        .collect();
    let refused: Vec<&support::Answer> = answers
        .iter()
        .filter(|(a, _)| a.status == StatusCode::TOO_MANY_REQUESTS)
        .map(|(a, _)| a)
        .collect();
    assert_eq!(ok.len() + refused.len(), 40, "only 200s and 429s");
    assert_eq!(ok.len(), 23, "20 at once + 3 shaped");
    let shaped = ok
        .iter()
        .filter(|took| ***took >= Duration::from_millis(2500))
        .count();
    assert_eq!(shaped, 3, "the shaped queries waited their turn: {ok:?}");
    for answer in refused {
        assert_eq!(
            answer.header("iothub-errorcode"),
            Some("ThrottlingException")
        );
        assert!(
            answer.header("retry-after").is_none(),
            "IoT Hub sends no Retry-After"
        );
        let message = answer.body["Message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("ErrorCode:ThrottlingException;"),
            "{message}"
        );
    }
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tier_nothing_is_throttled() {
    let hub = TestHub::start().await;
    let answers = concurrent_queries(&hub, 40).await;
    assert!(answers.iter().all(|(a, _)| a.status == StatusCode::OK));
    hub.running.shutdown().await;
}

/// Runs a twin job over every device (the tutorial device and `extra` more) and returns how long
/// it took from creation to `completed`.
async fn twin_job_over_all_devices(hub: &TestHub, extra: usize) -> Duration {
    for i in 0..extra {
        let id = format!("paced-{i:02}");
        hub.running
            .hub()
            .create_or_update_device(&id, &json!({ "deviceId": id }), None)
            .await
            .expect("register");
    }
    let now = hub_core::timestamp::format_millis(time::OffsetDateTime::now_utc());
    let body = json!({
        "jobId": "paced",
        "type": "scheduleUpdateTwin",
        "updateTwin": {"etag": "*", "properties": {"desired": {"paced": true}}},
        "queryCondition": "*",
        "startTime": now,
        "maxExecutionTimeInSeconds": 60,
    });
    let started = Instant::now();
    let created = hub.call(Method::PUT, "/jobs/v2/paced", Some(&body)).await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    loop {
        let job = hub.call(Method::GET, "/jobs/v2/paced", None).await;
        if job.body["status"] == "completed" {
            assert_eq!(job.body["deviceJobStatistics"]["succeededCount"], extra + 1);
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            job.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s1_a_job_runs_its_devices_at_ten_a_second() {
    let hub = TestHub::start_with(Config {
        tier: Some(Tier::S1.with_units(1).expect("S1")),
        ..Config::ephemeral()
    })
    .await;
    // 30 device operations at S1's 10/s: about 2.9 s (the first is due at once).
    let took = twin_job_over_all_devices(&hub, 29).await;
    assert!(
        took >= Duration::from_millis(2800) && took < Duration::from_secs(8),
        "30 devices took {took:?}"
    );
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tier_a_job_is_not_paced() {
    let hub = TestHub::start().await;
    let took = twin_job_over_all_devices(&hub, 29).await;
    assert!(
        took < Duration::from_millis(2800),
        "30 devices took {took:?}"
    );
    hub.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_basic_tier_serves_the_registry_and_refuses_twins_methods_jobs_with_403010() {
    let hub = TestHub::start_with(Config {
        tier: Some(Tier::B1.with_units(1).expect("B1")),
        ..Config::ephemeral()
    })
    .await;
    let created = hub
        .call(
            Method::PUT,
            "/devices/door1",
            Some(&json!({ "deviceId": "door1" })),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    let read = hub.call(Method::GET, "/devices/door1", None).await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
    let method = json!({ "methodName": "lockDoor", "responseTimeoutInSeconds": 5 });
    let job = json!({
        "jobId": "j1", "type": "scheduleDeviceMethod", "queryCondition": "*",
        "cloudToDeviceMethod": method, "startTime": "2026-01-01T00:00:00Z",
        "maxExecutionTimeInSeconds": 60
    });
    let query = json!({ "query": "SELECT * FROM devices" });
    let patch = json!({ "properties": { "desired": { "locked": true } } });
    for (method, path, body) in [
        (Method::GET, "/twins/door1", None),
        (Method::PATCH, "/twins/door1", Some(&patch)),
        (Method::POST, "/twins/door1/methods", Some(&method)),
        (Method::PUT, "/jobs/v2/j1", Some(&job)),
        (Method::GET, "/jobs/v2/query", None),
        (Method::POST, "/devices/query", Some(&query)),
    ] {
        let answer = hub.call(method.clone(), path, body).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(
            answer.header("iothub-errorcode"),
            Some("OperationNotValidForTier"),
            "{method} {path}"
        );
        let message = answer.body["Message"].as_str().unwrap_or_default();
        assert!(
            message.contains("not valid for the current IoT Hub tier (B1)"),
            "{method} {path}: {message}"
        );
    }
    hub.running.shutdown().await;
}
