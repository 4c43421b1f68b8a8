//! `POST /devices/query` paging for every kind of query, through a real hub over HTTPS:
//! projections and aggregates page like `SELECT *` (at most 100 rows, `x-ms-continuation` while
//! more follow), tokens stay valid while devices come and go (no row or group twice, none that
//! existed throughout skipped), `TOP n` counts across pages, and scans that cross the hub's
//! lock-sized read chunks see every device once.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Answer, TestHub};

/// The device every new hub has (`myDeviceId`), which carries none of the tests' tags.
const TUTORIAL: &str = hub_emulator::hub::TUTORIAL_DEVICE_ID;

async fn query(hub: &TestHub, text: &str, page_size: Option<&str>, token: Option<&str>) -> Answer {
    let mut extra = Vec::new();
    if let Some(size) = page_size {
        extra.push(("x-ms-max-item-count", size));
    }
    if let Some(token) = token {
        extra.push(("x-ms-continuation", token));
    }
    let answer = hub
        .call_with(
            Method::POST,
            "/devices/query",
            Some(&json!({ "query": text })),
            &extra,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{text}: {}", answer.body);
    answer
}

/// One page's rows and the token for the next one.
fn page(answer: &Answer) -> (Vec<Value>, Option<String>) {
    let rows = answer.body.as_array().cloned().expect("a JSON array");
    (rows, answer.header("x-ms-continuation").map(str::to_owned))
}

/// Every page of `text` from the start; also checks each page's size and item type.
async fn all_pages(hub: &TestHub, text: &str, page_size: usize, item_type: &str) -> Vec<Value> {
    let size = page_size.to_string();
    let mut rows = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let answer = query(hub, text, Some(&size), token.as_deref()).await;
        assert_eq!(answer.header("x-ms-item-type"), Some(item_type), "{text}");
        let (page_rows, next) = page(&answer);
        assert!(
            page_rows.len() <= page_size,
            "{text}: page of {}",
            page_rows.len()
        );
        if next.is_some() {
            assert_eq!(
                page_rows.len(),
                page_size,
                "{text}: a short page before the last"
            );
        }
        rows.extend(page_rows);
        match next {
            Some(next) => token = Some(next),
            None => return rows,
        }
    }
}

/// Registers `ids` with `tags` each, straight through the hub (setup, not what is tested).
async fn register(hub: &TestHub, ids: impl IntoIterator<Item = (String, Value)>) {
    let handle = hub.running.hub();
    for (id, tags) in ids {
        handle
            .create_or_update_device(&id, &json!({ "deviceId": id }), None)
            .await
            .expect("register");
        handle
            .update_twin(&id, &json!({ "tags": tags }), None, false)
            .await
            .expect("tags");
    }
}

async fn delete(hub: &TestHub, id: &str) {
    hub.running
        .hub()
        .delete_device(id, None)
        .await
        .expect("delete");
}

fn device(i: usize) -> String {
    format!("dev-{i:04}")
}

fn texts(rows: &[Value], field: &str) -> Vec<String> {
    rows.iter()
        .map(|row| row[field].as_str().unwrap_or("<none>").to_owned())
        .collect()
}

#[tokio::test]
async fn projections_page_at_100_rows_like_select_star() {
    let hub = TestHub::start().await;
    register(&hub, (0..250).map(|i| (device(i), json!({ "n": i })))).await;

    // Default page size: 100 rows, then a token (today's code sent all 251 rows at once).
    let first = query(
        &hub,
        "SELECT deviceId, tags.n AS n FROM devices",
        None,
        None,
    )
    .await;
    let (rows, token) = page(&first);
    assert_eq!(rows.len(), 100);
    assert!(
        token.is_some(),
        "a projection with more rows has a continuation token"
    );
    assert_eq!(first.header("x-ms-item-type"), Some("Raw"));
    // IoT Hub's page maximum is 100 [reference §4.5]: asking for more gets 100.
    let big = query(&hub, "SELECT deviceId FROM devices", Some("1000"), None).await;
    assert_eq!(page(&big).0.len(), 100);

    let rows = all_pages(&hub, "SELECT deviceId, tags.n AS n FROM devices", 40, "Raw").await;
    let ids = texts(&rows, "deviceId");
    let mut expected: Vec<String> = (0..250).map(device).collect();
    expected.push(TUTORIAL.to_owned());
    expected.sort();
    assert_eq!(ids, expected, "every device once, in device-id order");
    assert_eq!(rows[0], json!({"deviceId": "dev-0000", "n": 0}));

    // A projection that leaves deviceId out still pages: the token names the document.
    let values = all_pages(
        &hub,
        "SELECT tags.n AS n FROM devices WHERE tags.n >= 0",
        33,
        "Raw",
    )
    .await;
    let ns: Vec<u64> = values.iter().filter_map(|r| r["n"].as_u64()).collect();
    assert_eq!(ns, (0..250).collect::<Vec<u64>>());
}

#[tokio::test]
async fn group_by_pages_by_group_and_top_counts_across_pages() {
    let hub = TestHub::start().await;
    // 300 devices in 150 groups of two; the tutorial device has no bucket (its own group).
    register(
        &hub,
        (0..300).map(|i| (device(i), json!({ "bucket": i / 2 }))),
    )
    .await;
    let text = "SELECT tags.bucket AS bucket, COUNT() AS n FROM devices GROUP BY tags.bucket";

    let first = query(&hub, text, None, None).await;
    let (rows, token) = page(&first);
    assert_eq!(first.header("x-ms-item-type"), Some("Raw"));
    assert_eq!(
        rows.len(),
        100,
        "today's code sent all 151 groups in one page"
    );
    assert!(token.is_some());

    let rows = all_pages(&hub, text, 64, "Raw").await;
    assert_eq!(rows.len(), 151);
    // Groups in value order: the undefined group first (no `bucket` column), then 0..150.
    assert_eq!(rows[0], json!({"n": 1}));
    let buckets: Vec<u64> = rows[1..]
        .iter()
        .filter_map(|r| r["bucket"].as_u64())
        .collect();
    assert_eq!(buckets, (0..150).collect::<Vec<u64>>());
    assert!(rows[1..].iter().all(|r| r["n"] == 2), "{rows:?}");

    // TOP n counts rows over all pages, and the last page has no token.
    let top =
        "SELECT TOP 130 tags.bucket AS bucket, COUNT() AS n FROM devices GROUP BY tags.bucket";
    let rows = all_pages(&hub, top, 100, "Raw").await;
    assert_eq!(rows.len(), 130);
    let last = query(&hub, top, Some("100"), None).await;
    let (_, token) = page(&last);
    let second = query(&hub, top, Some("100"), token.as_deref()).await;
    let (rows, token) = page(&second);
    assert_eq!((rows.len(), token), (30, None));

    // Without GROUP BY an aggregate is one row, whatever the page size.
    let count = query(&hub, "SELECT COUNT() AS n FROM devices", Some("1"), None).await;
    assert_eq!(page(&count), (vec![json!({"n": 301})], None));
}

#[tokio::test]
async fn a_group_by_over_every_device_id_pages_with_bounded_responses() {
    let hub = TestHub::start().await;
    register(&hub, (0..1000).map(|i| (device(i), json!({})))).await;
    let text = "SELECT deviceId, COUNT() AS n FROM devices GROUP BY deviceId";
    let first = hub
        .call_with(
            Method::POST,
            "/devices/query",
            Some(&json!({ "query": text })),
            &[],
        )
        .await;
    let (rows, token) = page(&first);
    assert_eq!(rows.len(), 100);
    assert!(token.is_some());
    let bytes = serde_json::to_vec(&first.body).expect("JSON").len();
    assert!(
        bytes < 4_000,
        "a page of 100 small groups is small: {bytes} bytes"
    );

    let rows = all_pages(&hub, text, 100, "Raw").await;
    let ids = texts(&rows, "deviceId");
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (1001, 1001));
    assert!(rows.iter().all(|r| r["n"] == 1));
}

#[tokio::test]
async fn group_tokens_survive_devices_coming_and_going() {
    let hub = TestHub::start().await;
    // Groups "g-010" .. "g-209", two devices each.
    register(
        &hub,
        (0..400).map(|i| (device(i), json!({ "g": format!("g-{:03}", 10 + i / 2) }))),
    )
    .await;
    let text =
        "SELECT tags.g AS g, COUNT() AS n FROM devices WHERE IS_DEFINED(tags.g) GROUP BY tags.g";

    let first = query(&hub, text, Some("50"), None).await;
    let (page_one, token) = page(&first);
    let seen: Vec<String> = texts(&page_one, "g");
    assert_eq!(seen.first().map(String::as_str), Some("g-010"));
    assert_eq!(seen.last().map(String::as_str), Some("g-059"));

    // Meanwhile: every device of groups g-010 .. g-029 goes (groups before the cursor vanish),
    // a group appears before the cursor, one after it, and a group after the cursor loses a
    // device (it stays, with a smaller count).
    for i in 0..40 {
        delete(&hub, &device(i)).await;
    }
    register(
        &hub,
        [
            ("new-early".to_owned(), json!({ "g": "g-000" })),
            ("new-late".to_owned(), json!({ "g": "g-999" })),
        ],
    )
    .await;
    delete(&hub, &device(399)).await;

    let mut rest = Vec::new();
    let mut token = token;
    while let Some(current) = token {
        let answer = query(&hub, text, Some("50"), Some(&current)).await;
        let (rows, next) = page(&answer);
        rest.extend(rows);
        token = next;
    }
    let groups: BTreeMap<String, u64> = rest
        .iter()
        .map(|r| {
            (
                r["g"].as_str().unwrap_or_default().to_owned(),
                r["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(groups.len(), rest.len(), "no group twice");
    let mut expected: BTreeMap<String, u64> = (60..210).map(|g| (format!("g-{g:03}"), 2)).collect();
    expected.insert("g-209".to_owned(), 1);
    expected.insert("g-999".to_owned(), 1);
    assert_eq!(
        groups, expected,
        "nothing from page one again, nothing after it skipped"
    );
}

#[tokio::test]
async fn projection_tokens_survive_devices_coming_and_going() {
    let hub = TestHub::start().await;
    register(
        &hub,
        (0..300).map(|i| (device(i * 2), json!({ "on": true }))),
    )
    .await;
    let text = "SELECT deviceId FROM devices WHERE tags.on = true";
    let first = query(&hub, text, Some("100"), None).await;
    let (page_one, token) = page(&first);
    let seen = texts(&page_one, "deviceId");
    assert_eq!(seen.last().map(String::as_str), Some("dev-0198"));

    // A device before the cursor and the cursor's own device go, one joins before the cursor
    // (not shown: its place was passed) and one after it (shown).
    delete(&hub, &device(0)).await;
    delete(&hub, &device(198)).await;
    register(
        &hub,
        [
            (device(101), json!({ "on": true })),
            (device(201), json!({ "on": true })),
        ],
    )
    .await;

    let mut rest = Vec::new();
    let mut token = token;
    while let Some(current) = token {
        let (rows, next) = page(&query(&hub, text, Some("100"), Some(&current)).await);
        rest.extend(texts(&rows, "deviceId"));
        token = next;
    }
    let mut expected: Vec<String> = (100..300).map(|i| device(i * 2)).collect();
    expected.insert(0, device(201));
    expected.sort();
    assert_eq!(rest, expected);
}

#[tokio::test]
async fn scans_across_read_chunks_see_every_device_once() {
    let hub = TestHub::start().await;
    let count = 2 * hub_emulator::hub::TWIN_READ_CHUNK + 500;
    let handle = hub.running.hub();
    for i in 0..count {
        let id = format!("chunk-{i:05}");
        handle
            .create_or_update_device(&id, &json!({ "deviceId": id }), None)
            .await
            .expect("register");
    }
    // One device in 700 matches, spread over all three chunks; small pages cross chunk ends.
    let text = "SELECT deviceId FROM devices WHERE STARTSWITH(deviceId, 'chunk-') AND \
                (deviceId = 'chunk-00000' OR deviceId = 'chunk-04095' OR deviceId = 'chunk-04096' \
                OR deviceId = 'chunk-08191' OR deviceId = 'chunk-08192' OR deviceId = 'chunk-08691')";
    let rows = all_pages(&hub, text, 2, "Raw").await;
    assert_eq!(
        texts(&rows, "deviceId"),
        [
            "chunk-00000",
            "chunk-04095",
            "chunk-04096",
            "chunk-08191",
            "chunk-08192",
            "chunk-08691"
        ]
    );
    let counted = query(&hub, "SELECT COUNT() AS n FROM devices", None, None).await;
    assert_eq!(counted.body, json!([{ "n": count + 1 }]));
    let star = all_pages(
        &hub,
        "SELECT * FROM devices WHERE tags.none = 1",
        100,
        "Twin",
    )
    .await;
    assert!(star.is_empty());
}

#[tokio::test]
async fn foreign_or_mismatched_tokens_are_refused() {
    let hub = TestHub::start().await;
    register(&hub, (0..150).map(|i| (device(i), json!({ "bucket": i })))).await;
    let group = "SELECT tags.bucket AS b, COUNT() AS n FROM devices GROUP BY tags.bucket";
    let rows = "SELECT deviceId FROM devices";
    let (_, group_token) = page(&query(&hub, group, None, None).await);
    let (_, row_token) = page(&query(&hub, rows, None, None).await);
    let (group_token, row_token) = (group_token.expect("token"), row_token.expect("token"));
    for (text, token) in [
        (group, row_token.as_str()),
        (group, "bm9wZQ"),
        (group, "!!"),
        (rows, group_token.as_str()),
    ] {
        let answer = hub
            .call_with(
                Method::POST,
                "/devices/query",
                Some(&json!({ "query": text })),
                &[("x-ms-continuation", token)],
            )
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{text} with {token}: {}",
            answer.body
        );
        assert_eq!(answer.header("iothub-errorcode"), Some("ArgumentInvalid"));
    }
}
