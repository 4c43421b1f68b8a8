//! hub-core's ServiceClient against a real hub-emulator: registry and twin etags, typed errors,
//! query paging, jobs v2, authentication and transport failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::TryStreamExt;
use hub_core::device::Device;
use hub_core::job::{DeviceJob, JobRequest, JobStatus, JobType};
use hub_core::method::CloudToDeviceMethod;
use hub_core::service_client::{
    ConnectProblem, HubErrorKind, RetryPolicy, ServiceClient, ServiceError,
};
use hub_core::twin::{Twin, TwinPatch};
use serde_json::json;
use support::TestHub;

fn kind<T: std::fmt::Debug>(r: Result<T, ServiceError>) -> HubErrorKind {
    match r {
        Err(e) => e
            .hub_kind()
            .unwrap_or_else(|| panic!("not a hub error: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_and_twins_with_etags() {
    let hub = TestHub::start().await;
    let c = &hub.client;
    let created = c.create_device(&Device::new("reg-1")).await.unwrap();
    assert_eq!(created.device_id, "reg-1");
    assert_eq!(
        kind(c.create_device(&Device::new("reg-1")).await),
        HubErrorKind::DeviceAlreadyExists
    );
    let etag = created.etag.clone().unwrap();
    assert_eq!(
        c.get_device("reg-1").await.unwrap().etag.as_deref(),
        Some(etag.as_str())
    );
    assert_eq!(
        kind(c.update_device(&created, Some("bm9wZQ==")).await),
        HubErrorKind::PreconditionFailed
    );
    c.update_device(&created, Some(&etag)).await.unwrap();
    assert!(
        c.list_devices(Some(10))
            .await
            .unwrap()
            .iter()
            .any(|d| d.device_id == "reg-1")
    );

    let twin = c.get_twin("reg-1").await.unwrap();
    let patch = TwinPatch::new().with_desired(json!({"floor": 3}).as_object().unwrap().clone());
    assert_eq!(
        kind(c.update_twin("reg-1", &patch, Some("bm9wZQ==")).await),
        HubErrorKind::PreconditionFailed
    );
    let patched = c
        .update_twin("reg-1", &patch, twin.etag.as_deref())
        .await
        .unwrap();
    assert_eq!(patched.desired().unwrap().0["floor"], 3);
    let replaced = c
        .replace_twin(
            "reg-1",
            &json!({"tags": {"a": 1}, "properties": {"desired": {"y": 2}}}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(replaced.tags.as_ref().unwrap()["a"], 1);
    assert!(replaced.desired().unwrap().0.get("floor").is_none());

    assert_eq!(
        kind(c.delete_device("reg-1", Some("bm9wZQ==")).await),
        HubErrorKind::PreconditionFailed
    );
    c.delete_device("reg-1", None).await.unwrap();
    let err = c.get_device("reg-1").await.unwrap_err();
    assert_eq!(err.hub_kind(), Some(HubErrorKind::DeviceNotFound));
    assert!(err.to_string().contains("DeviceNotFound 404001"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn method_errors_are_typed() {
    let hub = TestHub::start().await;
    let c = &hub.client;
    let call = CloudToDeviceMethod::new("lockDoor")
        .with_payload(json!({"lockTime": "10m"}))
        .with_timeouts(5, 0);
    let err = c.invoke_method("myDeviceId", &call).await.unwrap_err();
    let h = err.hub().unwrap();
    assert_eq!(
        (h.kind, h.status, h.code.map(|c| c.number())),
        (HubErrorKind::DeviceNotOnline, 404, Some(404103))
    );
    assert!(
        h.message
            .contains("Timed out waiting for device to connect"),
        "{h}"
    );
    assert_eq!(
        kind(c.invoke_method("ghost", &call).await),
        HubErrorKind::DeviceNotFound
    );

    let mut device = hub.connect("myDeviceId").await;
    let r = c.invoke_method("myDeviceId", &call).await.unwrap();
    assert_eq!(
        (r.status, r.payload.clone()),
        (200, json!({"result": "locked"}))
    );
    drop(device.received.recv().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn query_stream_follows_continuations() {
    let hub = TestHub::start().await;
    for i in 0..250 {
        hub.register(&format!("q-{i:03}"), Some(json!({"kind": "q"})))
            .await;
    }
    let page = hub
        .client
        .query_page::<Twin>(
            "SELECT * FROM devices WHERE tags.kind = 'q'",
            None,
            Some(100),
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 100);
    assert!(page.continuation.is_some());
    assert_eq!(page.item_type.as_deref(), Some("Twin"));
    let all: Vec<Twin> = hub
        .client
        .query_twins("tags.kind = 'q'")
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 250);
    let everyone: Vec<Twin> = hub.client.query_twins("*").try_collect().await.unwrap();
    assert_eq!(everyone.len(), 251, "plus myDeviceId");
    let bad: Result<Vec<Twin>, _> = hub
        .client
        .query_twins("tags.kind = = 'q'")
        .try_collect()
        .await;
    assert_eq!(kind(bad), HubErrorKind::ArgumentInvalid);
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_create_get_cancel_query_and_device_rows() {
    let hub = TestHub::start().await;
    let c = &hub.client;
    let _device = hub.connect("myDeviceId").await;
    let now = time::OffsetDateTime::now_utc();
    let method = CloudToDeviceMethod::new("lockDoor")
        .with_payload(json!({"lockTime": "10m"}))
        .with_timeouts(10, 0);
    let req = JobRequest::schedule_device_method(
        "j-now",
        "deviceId = 'myDeviceId'",
        method,
        hub_core::timestamp::format_millis(now),
        60,
    );
    c.create_job(&req).await.unwrap();
    assert_eq!(
        kind(c.create_job(&req).await),
        HubErrorKind::JobAlreadyExists
    );
    let done = loop {
        let job = c.get_job("j-now").await.unwrap();
        if job.is_terminal() {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.status, Some(JobStatus::Completed));
    let rows: Vec<DeviceJob> = c.device_jobs("j-now").try_collect().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].method_response().map(|r| r.status), Some(200));

    let later = JobRequest::schedule_update_twin(
        "j-later",
        "*",
        TwinPatch::new().with_desired(json!({"x": 1}).as_object().unwrap().clone()),
        hub_core::timestamp::format_millis(now + Duration::from_secs(3600)),
        60,
    );
    c.create_job(&later).await.unwrap();
    assert_eq!(
        c.cancel_job("j-later").await.unwrap().status,
        Some(JobStatus::Cancelled)
    );
    let twin_jobs: Vec<_> = c
        .query_jobs(Some(JobType::ScheduleUpdateTwin), None)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(twin_jobs.len(), 1);
    let completed: Vec<_> = c
        .query_jobs(None, Some(JobStatus::Completed))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        completed
            .iter()
            .map(|j| j.job_id.as_str())
            .collect::<Vec<_>>(),
        ["j-now"]
    );
    assert_eq!(kind(c.get_job("missing").await), HubErrorKind::JobNotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_key_untrusted_ca_and_unreachable_hub() {
    let hub = TestHub::start().await;
    let mut wrong = hub.service.clone();
    wrong.key = hub_core::connection_string::SharedKey::from_bytes(b"not-the-key".to_vec());
    let c = ServiceClient::builder(wrong)
        .ca_pem(hub.hub.env.ca_pem.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        kind(c.get_device("myDeviceId").await),
        HubErrorKind::Unauthorized
    );

    // Platform roots only: the emulator's CA is not trusted.
    let c = ServiceClient::builder(hub.service.clone())
        .retry(RetryPolicy::never())
        .build()
        .unwrap();
    match c.get_device("myDeviceId").await {
        Err(ServiceError::Connect {
            problem: ConnectProblem::Tls,
            ..
        }) => {}
        other => panic!("expected a TLS problem, got {other:?}"),
    }

    let missing = hub.dir.path().join("nope.pem");
    let err = ServiceClient::builder(hub.service.clone())
        .ca_file(&missing)
        .unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
    let not_pem = hub.dir.path().join("hub.env");
    let err = ServiceClient::builder(hub.service.clone())
        .ca_file(&not_pem)
        .unwrap_err();
    assert!(err.to_string().contains("not PEM"), "{err}");

    let mut closed = hub.service.clone();
    closed.host_name = "localhost:9".parse().unwrap();
    let c = ServiceClient::builder(closed)
        .retry(RetryPolicy::never())
        .build()
        .unwrap();
    let err = c.get_device("x").await.unwrap_err();
    assert!(err.is_unreachable());
    let text = err.to_string();
    assert!(
        text.starts_with("cannot reach the hub at https://localhost:9:")
            && text.contains("is hub-emulator running"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn throttled_creations_are_retried_because_the_hub_did_not_run_them() {
    // S1's registry throttle (100 a minute) with no burst and no queue: back-to-back creations
    // are refused with 429 ThrottlingException until 0.6 s has passed.
    let hub = TestHub::start_with(hub_emulator::Config {
        tier: Some(hub_core::tier::Tier::S1.with_units(1).unwrap()),
        throttle_shaping: (Duration::ZERO, Duration::ZERO),
        ..hub_emulator::Config::ephemeral()
    })
    .await;
    let patient = ServiceClient::builder(hub.service.clone())
        .ca_pem(hub.hub.env.ca_pem.as_bytes())
        .unwrap()
        .retry(RetryPolicy {
            max_attempts: 12,
            base_delay: Duration::from_millis(300),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    for id in ["thr-1", "thr-2", "thr-3"] {
        patient
            .create_device(&Device::new(id))
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    // Without retries the second of two back-to-back creations is refused, with IoT Hub's code.
    let impatient = ServiceClient::builder(hub.service.clone())
        .ca_pem(hub.hub.env.ca_pem.as_bytes())
        .unwrap()
        .retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    impatient
        .create_device(&Device::new("thr-4"))
        .await
        .unwrap();
    let refused = impatient.create_device(&Device::new("thr-5")).await;
    assert_eq!(kind(refused), HubErrorKind::Throttled);
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_registry_reads_per_device_failures_as_an_answer_and_whole_refusals_as_errors() {
    use hub_core::bulk::{ExportImportDevice, ImportMode, MAX_BULK_DEVICES};
    use hub_core::error::ErrorCode;
    let hub = TestHub::start().await;
    let c = &hub.client;
    let created = c
        .bulk_registry(&[
            ExportImportDevice::new("bulk-1", ImportMode::Create),
            ExportImportDevice::new("bulk-2", ImportMode::Create),
        ])
        .await
        .unwrap();
    assert!(
        created.is_successful && created.errors.is_empty(),
        "{created:?}"
    );
    assert_eq!(c.get_device("bulk-2").await.unwrap().device_id, "bulk-2");
    // The hub answers 400 with the failures; the others apply.
    let mixed = c
        .bulk_registry(&[
            ExportImportDevice::new("bulk-1", ImportMode::Create),
            ExportImportDevice::new("bulk-3", ImportMode::Create),
            ExportImportDevice::new("bulk-2", ImportMode::Delete),
        ])
        .await
        .unwrap();
    assert!(!mixed.is_successful);
    let failed: Vec<(&str, &str)> = mixed
        .errors
        .iter()
        .map(|e| (e.device_id.as_str(), e.error_code.as_str()))
        .collect();
    assert_eq!(failed, [("bulk-1", "DeviceAlreadyExists")]);
    assert_eq!(
        kind(c.get_device("bulk-2").await),
        HubErrorKind::DeviceNotFound
    );
    // A call refused whole is an error with the hub's code.
    let twice = c
        .bulk_registry(&[
            ExportImportDevice::new("bulk-4", ImportMode::Create),
            ExportImportDevice::new("bulk-4", ImportMode::Create),
        ])
        .await;
    match twice {
        Err(ServiceError::Hub(h)) => {
            assert_eq!(h.status, 400);
            assert_eq!(h.code, Some(ErrorCode::DeviceDefinedMultipleTimes));
        }
        other => panic!("expected DeviceDefinedMultipleTimes, got {other:?}"),
    }
    // Too many is refused before anything is sent.
    let many: Vec<ExportImportDevice> = (0..=MAX_BULK_DEVICES)
        .map(|i| ExportImportDevice::new(format!("many-{i}"), ImportMode::Create))
        .collect();
    assert!(matches!(
        c.bulk_registry(&many).await,
        Err(ServiceError::InvalidArgument(_))
    ));
    assert_eq!(
        kind(c.get_device("many-0").await),
        HubErrorKind::DeviceNotFound
    );
}
