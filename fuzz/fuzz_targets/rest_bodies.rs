//! The service REST API's JSON bodies, decoded as the hub's `JsonBody` extractor does and
//! handed to the code behind each route: `PUT /devices/{id}` (create and update), `PATCH` and
//! `PUT /twins/{id}` (through `twins::parse_service_update` and the merge), `POST
//! /twins/{id}/methods` (`MethodCall::from_request`) and `PUT /jobs/v2/{id}`
//! (`jobs::parse_request`, with its `queryCondition` and `startTime`). Reads: one selector byte,
//! then the body. Checks: no panic.
#![no_main]

use hub_emulator::hub::{MethodCall, TUTORIAL_DEVICE_ID};
use hub_emulator::{jobs, twins};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use time::OffsetDateTime;

/// The device `PUT /devices/{id}` bodies create (and delete again).
const NEW_DEVICE: &str = "fuzzNew";
/// The device `PUT /devices/{id}` bodies update (created on first use).
const UPDATED_DEVICE: &str = "fuzzUpdated";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    // As `http::JsonBody`: an all-blank body is refused before JSON decoding.
    if body.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let hub = iothub_fuzz::hub();
    match selector % 6 {
        0 => iothub_fuzz::block_on(async {
            if hub
                .create_or_update_device(NEW_DEVICE, &body, None)
                .await
                .is_ok()
            {
                let _ = hub.delete_device(NEW_DEVICE, Some("*")).await;
            }
        }),
        1 => iothub_fuzz::block_on(async {
            if !hub.device_exists(UPDATED_DEVICE) {
                let _ = hub
                    .create_or_update_device(
                        UPDATED_DEVICE,
                        &Value::Object(Default::default()),
                        None,
                    )
                    .await;
            }
            let _ = hub
                .create_or_update_device(UPDATED_DEVICE, &body, Some("*"))
                .await;
        }),
        2 | 3 => {
            let _ = twins::parse_service_update(&body);
            let replace = selector % 6 == 3;
            let _ = iothub_fuzz::block_on(hub.update_twin(
                TUTORIAL_DEVICE_ID,
                &body,
                Some("*"),
                replace,
            ));
        }
        4 => {
            let _ = MethodCall::from_request(&body);
        }
        _ => {
            // 2026-12-01T00:00:00Z: a fixed "now" keeps runs reproducible.
            let now = OffsetDateTime::from_unix_timestamp(1_796_083_200)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            let id = body
                .get("jobId")
                .and_then(Value::as_str)
                .unwrap_or("fuzz-job");
            let _ = jobs::parse_request(id, &body, now);
        }
    }
});
