//! Unit tests of the hub's state: registry, twins and method calls.

use serde_json::json;

use super::*;

fn hub() -> Hub {
    Hub::open(Store::in_memory(), vec!["localhost".into()]).expect("hub")
}

#[test]
fn fresh_hub_has_the_tutorial_device_with_keys() {
    let hub = hub();
    let device = hub.get_device(TUTORIAL_DEVICE_ID).expect("device");
    assert_eq!(device["status"], "enabled");
    assert_eq!(device["connectionState"], "Disconnected");
    assert!(
        device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .is_some_and(|k| k.len() == 44)
    );
    let owner = hub.policy_keys("iothubowner").expect("iothubowner");
    let debug = format!("{owner:?}");
    assert!(
        !debug.contains(&owner.primary_key) && !debug.contains(&owner.secondary_key),
        "Debug must not show keys: {debug}"
    );
}

#[tokio::test]
async fn create_update_delete_follow_etags() {
    let hub = hub();
    let created = hub
        .create_or_update_device("dev2", &json!({"deviceId": "dev2"}), None)
        .await
        .expect("create");
    let etag = created["etag"].as_str().expect("etag").to_owned();
    assert!(matches!(
        hub.create_or_update_device("dev2", &json!({"deviceId": "dev2"}), None)
            .await,
        Err(OperationError::DeviceAlreadyExists(_))
    ));
    assert!(matches!(
        hub.create_or_update_device("dev2", &json!({"status": "disabled"}), Some("\"bogus\""))
            .await,
        Err(OperationError::PreconditionFailed { .. })
    ));
    let updated = hub
        .create_or_update_device(
            "dev2",
            &json!({"status": "disabled"}),
            Some(&format!("\"{etag}\"")),
        )
        .await
        .expect("update");
    assert_eq!(updated["status"], "disabled");
    assert_eq!(
        updated["authentication"]["symmetricKey"]["primaryKey"],
        created["authentication"]["symmetricKey"]["primaryKey"],
        "keys are kept when an update does not give them"
    );
    hub.delete_device("dev2", Some("*")).await.expect("delete");
    assert!(matches!(
        hub.get_device("dev2"),
        Err(OperationError::DeviceNotFound(_))
    ));
}

#[tokio::test]
async fn twin_patch_versions_and_etag() {
    let hub = hub();
    let twin = hub.get_twin(TUTORIAL_DEVICE_ID).expect("twin");
    let etag = twin["etag"].as_str().expect("etag").to_owned();
    let patched = hub
        .update_twin(
            TUTORIAL_DEVICE_ID,
            &json!({"tags": {"building": "43"}, "properties": {"desired": {"floor": 3}}}),
            Some(&format!("\"{etag}\"")),
            false,
        )
        .await
        .expect("patch");
    assert_eq!(patched["properties"]["desired"]["floor"], 3);
    assert_eq!(patched["properties"]["desired"]["$version"], 2);
    assert_eq!(patched["tags"]["building"], "43");
    assert!(matches!(
        hub.update_twin(
            TUTORIAL_DEVICE_ID,
            &json!({"tags": {"a": 1}}),
            Some(&format!("\"{etag}\"")),
            false
        )
        .await,
        Err(OperationError::PreconditionFailed { .. })
    ));
    assert!(matches!(
        hub.update_twin(
            TUTORIAL_DEVICE_ID,
            &json!({"properties": {"reported": {"x": 1}}}),
            None,
            false
        )
        .await,
        Err(OperationError::Twin(
            crate::twins::TwinError::ReportedByService
        ))
    ));
}

#[tokio::test]
async fn a_twin_job_patch_is_applied_once_per_device() {
    let hub = hub();
    let patch = json!({"properties": {"desired": {"building": 43}}});
    let ids = [TUTORIAL_DEVICE_ID];
    let first = hub
        .update_twins_for_job(&ids, &patch, Some("*"), false, Some("job-1"))
        .await;
    let first = first[0].as_ref().expect("first apply");
    // A resumed job repeats the batch: the twin must not change again.
    let again = hub
        .update_twins_for_job(&ids, &patch, Some("*"), false, Some("job-1"))
        .await;
    let again = again[0].as_ref().expect("repeat");
    assert_eq!(again["version"], first["version"]);
    assert_eq!(
        again["properties"]["desired"]["$version"],
        first["properties"]["desired"]["$version"]
    );
    // Another job, or a plain update, still applies.
    let other = hub
        .update_twins_for_job(&ids, &patch, Some("*"), false, Some("job-2"))
        .await;
    let other = other[0].as_ref().expect("other job");
    assert_ne!(other["version"], first["version"]);
}

#[test]
fn method_call_validation() {
    assert!(
        MethodCall::from_request(
            &json!({"methodName": "lockDoor", "payload": {"lockTime": "10m"}})
        )
        .is_ok()
    );
    for bad in [
        json!({"payload": 1}),
        json!({"methodName": "a b"}),
        json!({"methodName": "x", "responseTimeoutInSeconds": 4}),
        json!({"methodName": "x", "responseTimeoutInSeconds": 301}),
        json!({"methodName": "x", "connectTimeoutInSeconds": -1}),
        json!("nope"),
    ] {
        assert!(MethodCall::from_request(&bad).is_err(), "{bad}");
    }
    let big = json!({"methodName": "x", "payload": "y".repeat(MAX_METHOD_PAYLOAD)});
    assert!(matches!(
        MethodCall::from_request(&big),
        Err(OperationError::MessageTooLarge(_))
    ));
}

fn durable_hub(dir: &std::path::Path) -> Hub {
    let store = Store::open(&dir.join("hub.db")).expect("store");
    Hub::open(store, vec!["localhost".into()]).expect("hub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_of_one_device_are_serialized_by_its_write_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = durable_hub(dir.path());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.patch_reported(TUTORIAL_DEVICE_ID, json!({ format!("k{i}"): i }))
                    .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.expect("task").expect("patch"));
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=65).collect::<Vec<u64>>(),
        "every patch got its own version"
    );
    let twin = hub.get_twin(TUTORIAL_DEVICE_ID).expect("twin");
    let reported = &twin["properties"]["reported"];
    assert_eq!(reported["$version"], 65);
    for i in 0..64 {
        assert_eq!(
            reported[format!("k{i}")],
            i,
            "no patch was lost: {reported}"
        );
    }
    drop(hub);
    let reopened = durable_hub(dir.path());
    assert_eq!(
        reopened.get_twin(TUTORIAL_DEVICE_ID).expect("twin")["properties"]["reported"],
        *reported,
        "what was acknowledged is what was committed"
    );
}

#[tokio::test]
async fn a_change_whose_caller_goes_away_is_still_applied_after_its_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = durable_hub(dir.path());
    // Polled once (the change starts), then dropped, as when a REST client hangs up. The store's
    // writer thread may commit before that one poll returns (then the change completed, and
    // nothing was abandoned): try again with the next value until one is left in flight.
    let mut abandoned_floor = None;
    for floor in 1..=50 {
        let patch = json!({"properties": {"desired": {"floor": floor}}});
        let first_poll = futures_util::FutureExt::now_or_never(hub.update_twin(
            TUTORIAL_DEVICE_ID,
            &patch,
            None,
            false,
        ));
        if first_poll.is_none() {
            abandoned_floor = Some(floor);
            break;
        }
    }
    let floor = abandoned_floor.expect("an update still in flight after its first poll");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let twin = loop {
        let twin = hub.get_twin(TUTORIAL_DEVICE_ID).expect("twin");
        if twin["properties"]["desired"]["floor"] == floor {
            break twin;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the committed change never reached the state: {twin}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    // A later change of the same device waits for the abandoned one's write lock.
    hub.update_twin(TUTORIAL_DEVICE_ID, &json!({"tags": {}}), None, false)
        .await
        .expect("a later update");
    drop(hub);
    let reopened = durable_hub(dir.path());
    let stored = reopened.get_twin(TUTORIAL_DEVICE_ID).expect("twin");
    assert_eq!(
        stored["properties"]["desired"], twin["properties"]["desired"],
        "memory and disk agree"
    );
}

/// Panics seen on any store writer thread of this test process.
static WRITER_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_writer_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("hub-store-writer") {
                WRITER_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

#[tokio::test]
async fn the_writer_can_drop_the_last_handle_to_the_hub() {
    count_writer_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = durable_hub(dir.path());
    // The change is queued and its caller goes away; then the caller's handle goes too, so the
    // writer's step holds the last one and closes the store from the writer thread itself. On a
    // busy machine the writer may finish a commit within the one poll: then it is tried again.
    let mut floor = 0;
    let in_flight = (1..=20).any(|n| {
        floor = n;
        let patch = json!({"properties": {"desired": {"floor": n}}});
        futures_util::FutureExt::now_or_never(hub.update_twin(
            TUTORIAL_DEVICE_ID,
            &patch,
            None,
            false,
        ))
        .is_none()
    });
    assert!(in_flight, "the update must still be in flight");
    drop(hub);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let reopened = loop {
        match Store::open(&dir.path().join("hub.db")) {
            Ok(store) => break Hub::open(store, vec!["localhost".into()]).expect("hub"),
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the store never closed: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    assert_eq!(
        reopened.get_twin(TUTORIAL_DEVICE_ID).expect("twin")["properties"]["desired"]["floor"],
        floor,
        "the abandoned change was committed"
    );
    assert_eq!(
        WRITER_PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the writer must not wait for itself"
    );
}

/// A device token for `id` signed with its primary key, valid for an hour.
fn device_login(hub: &Hub, id: &str) -> (String, String, u64) {
    let key = hub.device_primary_key(id).expect("registered device");
    let key = hub_core::connection_string::SharedKey::from_base64(&key).expect("base64 key");
    let now = 1_700_000_000;
    let token = hub_core::sas::generate(
        &hub_core::sas::device_resource_uri("localhost", id, None),
        &key,
        None,
        now + 3600,
    );
    (
        format!("localhost/{id}/?api-version=2021-04-12"),
        token,
        now,
    )
}

#[tokio::test]
async fn a_device_disabled_deleted_or_rekeyed_after_authenticating_gets_no_session() {
    let hub = hub();
    let changes: [(&str, Option<Value>); 3] = [
        ("disabled", Some(json!({"status": "disabled"}))),
        (
            "rekeyed",
            Some(json!({"authentication": {"symmetricKey": {
            "primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "secondaryKey": "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA="}}})),
        ),
        ("deleted", None),
    ];
    for (id, change) in changes {
        hub.create_or_update_device(id, &json!({"deviceId": id}), None)
            .await
            .expect("create");
        let (username, password, now) = device_login(&hub, id);
        let grant = hub
            .authenticate_device(id, &username, &password, now)
            .expect("the token is valid");
        // The registry changes between CONNECT's authentication and the session's registration.
        match change {
            Some(update) => {
                hub.create_or_update_device(id, &update, Some("*"))
                    .await
                    .expect("update");
            }
            None => hub.delete_device(id, None).await.expect("delete"),
        }
        let attached = hub.attach_session(id, &grant, true).await;
        assert!(attached.is_err(), "{id}: a session was registered");
        assert!(
            !lock(&hub.inner.sessions).contains_key(id),
            "{id}: the session table has it"
        );
    }
    // Unchanged, the same sequence registers the session.
    let (username, password, now) = device_login(&hub, TUTORIAL_DEVICE_ID);
    let grant = hub
        .authenticate_device(TUTORIAL_DEVICE_ID, &username, &password, now)
        .expect("the token is valid");
    let opened = hub.attach_session(TUTORIAL_DEVICE_ID, &grant, true).await;
    assert!(opened.is_ok());
    assert_eq!(
        hub.get_device(TUTORIAL_DEVICE_ID).expect("device")["connectionState"],
        "Connected"
    );
}

#[tokio::test]
async fn module_documents_resume_across_chunks_and_cursors_in_id_order() {
    let hub = hub();
    for device in ["a", "b", "c", "d"] {
        hub.create_or_update_device(device, &json!({}), None)
            .await
            .expect("device");
    }
    for (device, module) in [
        ("a", "m1"),
        ("a", "m2"),
        ("c", "m1"),
        ("d", "x"),
        ("d", "y"),
    ] {
        hub.create_or_update_module(device, module, &json!({}), None)
            .await
            .expect("module");
    }
    let pairs = |docs: Vec<Arc<Value>>| -> Vec<String> {
        docs.iter()
            .map(|d| {
                format!(
                    "{}/{}",
                    d["deviceId"].as_str().unwrap_or(""),
                    d["moduleId"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let all = ["a/m1", "a/m2", "c/m1", "d/x", "d/y"];
    for chunk in [1, 2, 3, TWIN_READ_CHUNK] {
        assert_eq!(
            pairs(hub.module_documents_chunked(None, usize::MAX, chunk)),
            all,
            "chunk {chunk}"
        );
        assert_eq!(
            pairs(hub.module_documents_chunked(Some(("a", "m1")), usize::MAX, chunk)),
            &all[1..],
            "chunk {chunk}"
        );
        assert_eq!(
            pairs(hub.module_documents_chunked(Some(("a", "m2")), 2, chunk)),
            ["c/m1", "d/x"],
            "chunk {chunk}"
        );
        assert_eq!(
            pairs(hub.module_documents_chunked(Some(("b", "zz")), usize::MAX, chunk)),
            &all[2..],
            "chunk {chunk}: a cursor in a device without modules"
        );
        assert!(
            hub.module_documents_chunked(Some(("d", "y")), 10, chunk)
                .is_empty()
        );
    }
}

#[tokio::test]
async fn a_module_record_is_stored_with_its_device_and_old_records_load_without_modules() {
    let hub = hub();
    hub.create_or_update_device("dev", &json!({}), None)
        .await
        .expect("device");
    hub.create_or_update_module("dev", "m", &json!({"managedBy": "IotEdge"}), None)
        .await
        .expect("module");
    let record = lock(&hub.inner.state)
        .devices
        .get("dev")
        .cloned()
        .expect("record");
    let text = serde_json::to_string(&record).expect("encode");
    let mut back: record::DeviceRecord = serde_json::from_str(&text).expect("decode");
    back.refresh_all();
    assert_eq!(back.modules["m"].managed_by.as_deref(), Some("IotEdge"));
    assert_eq!(back.modules["m"].doc["moduleId"], "m");
    // A record written before modules existed has no `modules` member.
    let mut old: Value = serde_json::from_str(&text).expect("JSON");
    old.as_object_mut().expect("object").remove("modules");
    let old: record::DeviceRecord = serde_json::from_value(old).expect("old record loads");
    assert!(old.modules.is_empty());
    // And a record without modules writes none.
    let plain = lock(&hub.inner.state)
        .devices
        .get(TUTORIAL_DEVICE_ID)
        .cloned()
        .expect("record");
    assert!(
        !serde_json::to_string(&plain)
            .expect("encode")
            .contains("\"modules\"")
    );
}

#[tokio::test]
async fn module_sessions_are_keyed_apart_from_their_device() {
    let hub = hub();
    hub.create_or_update_device("dev", &json!({}), None)
        .await
        .expect("device");
    hub.create_or_update_module("dev", "m", &json!({}), None)
        .await
        .expect("module");
    let device = hub
        .attach_session("dev", &DeviceGrant::for_tests(), true)
        .await
        .expect("device session");
    let module = hub
        .attach_session("dev/m", &DeviceGrant::for_tests(), true)
        .await
        .expect("module session");
    assert_eq!(module.ticket.device_id, "dev");
    assert_eq!(module.ticket.module_id.as_deref(), Some("m"));
    assert!(
        !device.ticket.kill.is_cancelled(),
        "the module replaced the device"
    );
    assert_eq!(hub.connected_count(), 2);
    assert_eq!(
        hub.get_module("dev", "m").expect("module")["connectionState"],
        "Connected"
    );
    hub.detach_session(&module.ticket);
    assert_eq!(
        hub.get_module("dev", "m").expect("module")["connectionState"],
        "Disconnected"
    );
    assert_eq!(
        hub.get_device("dev").expect("device")["connectionState"],
        "Connected"
    );
    // A session for a module that does not exist is refused.
    assert!(
        hub.attach_session("dev/ghost", &DeviceGrant::for_tests(), true)
            .await
            .is_err()
    );
}
