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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rest_class_has_its_own_s1_throttle_and_methods_are_metered_in_4_kb_steps() {
    // A one-second burst and no queue: each class passes one second of its rate at once.
    let hub = TestHub::start_with(Config {
        tier: Some(Tier::S1.with_units(1).expect("S1")),
        throttle_shaping: (Duration::from_secs(1), Duration::ZERO),
        ..Config::ephemeral()
    })
    .await;
    let throttled = |answer: &support::Answer| {
        answer.status == StatusCode::TOO_MANY_REQUESTS
            && answer.header("iothub-errorcode") == Some("ThrottlingException")
    };
    // Registry: 100 a minute is 1.67 a second, so one call fits the burst and the next does not.
    let created = hub
        .call(
            Method::PUT,
            "/devices/d1",
            Some(&json!({ "deviceId": "d1" })),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    let again = hub.call(Method::GET, "/devices/d1", None).await;
    assert!(throttled(&again), "registry: {:?}", again.status);
    // Twin reads (100/s) and updates (50/s) are other classes: the registry's refusal leaves
    // them whole. Each passes its burst (a second's worth), plus what the rate refills while the
    // calls arrive, then refuses.
    let (ok, refused, elapsed) = until_refused(&hub, Method::GET, "/twins/d1", None).await;
    let refill = (elapsed.as_secs_f64() * 100.0).ceil() as usize;
    assert!(
        (100..=100 + refill + WORKERS).contains(&ok),
        "twin reads passed: {ok} in {elapsed:?}"
    );
    assert!(!refused.is_empty() && refused.iter().all(throttled));
    let patch = json!({ "tags": { "floor": 1 } });
    let (ok, refused, elapsed) =
        until_refused(&hub, Method::PATCH, "/twins/d1", Some(&patch)).await;
    let refill = (elapsed.as_secs_f64() * 50.0).ceil() as usize;
    assert!(
        (50..=50 + refill + WORKERS).contains(&ok),
        "twin updates passed: {ok} in {elapsed:?}"
    );
    assert!(!refused.is_empty() && refused.iter().all(throttled));
    // Direct methods: 40 meter steps of 4 KB a second. A 100 KB payload is 25 steps: it fits;
    // a second one does not (50 > 40), but a small call (1 step) still does. The device is
    // offline, so a method that passes the throttle is answered 404103.
    let big = json!({
        "methodName": "lockDoor",
        "payload": { "blob": "x".repeat(100 * 1024) },
        "connectTimeoutInSeconds": 0,
        "responseTimeoutInSeconds": 5
    });
    let small = json!({ "methodName": "lockDoor", "connectTimeoutInSeconds": 0 });
    let first = hub
        .call(Method::POST, "/twins/d1/methods", Some(&big))
        .await;
    assert_eq!(first.status, StatusCode::NOT_FOUND, "{:?}", first.body);
    let second = hub
        .call(Method::POST, "/twins/d1/methods", Some(&big))
        .await;
    assert!(
        throttled(&second),
        "a second 25-step call: {:?}",
        second.status
    );
    let third = hub
        .call(Method::POST, "/twins/d1/methods", Some(&small))
        .await;
    assert_eq!(
        third.status,
        StatusCode::NOT_FOUND,
        "a 1-step call: {:?}",
        third.body
    );
    // Jobs operations: 100 a minute, like the registry, but their own throttle.
    let listed = hub.call(Method::GET, "/jobs/v2/query", None).await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    let again = hub.call(Method::GET, "/jobs/v2/query", None).await;
    assert!(throttled(&again), "jobs operations: {:?}", again.status);
    hub.running.shutdown().await;
}

/// Callers that [`until_refused`] runs at once, each one call after another.
const WORKERS: usize = 8;

/// Calls `path` from [`WORKERS`] callers at once, each sequentially, until one is answered with
/// anything but 200 (at most 5,000 calls). Returns how many were answered 200, the other
/// answers, and how long it took: bounds that hold however slowly the calls arrive.
async fn until_refused(
    hub: &TestHub,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (usize, Vec<support::Answer>, Duration) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = AtomicBool::new(false);
    let ok = AtomicUsize::new(0);
    let started = Instant::now();
    let refused = join_all((0..WORKERS).map(|_| async {
        let mut refused = Vec::new();
        while !stop.load(Ordering::SeqCst) && ok.load(Ordering::SeqCst) < 5_000 {
            let answer = hub.call(method.clone(), path, body).await;
            if answer.status == StatusCode::OK {
                ok.fetch_add(1, Ordering::SeqCst);
            } else {
                stop.store(true, Ordering::SeqCst);
                refused.push(answer);
            }
        }
        refused
    }))
    .await;
    (
        ok.load(Ordering::SeqCst),
        refused.into_iter().flatten().collect(),
        started.elapsed(),
    )
}
