//! What the fuzz targets share: one tokio runtime and one in-memory hub per fuzzing process, a
//! device they can authenticate as, and the check that the hub only ever writes valid MQTT.
//!
//! The hub is opened once (opening one per input would dominate the run time), so inputs can
//! leave state behind (a reported property, a device); targets undo what they create.

use std::sync::OnceLock;

use bytes::BytesMut;
use hub_core::connection_string::SharedKey;
use hub_emulator::Hub;
use hub_emulator::store::Store;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::json;
use tokio::runtime::Runtime;

pub use hub_emulator;

/// The device of the captured Python session (reference §7.1, §7.3), registered with the key
/// the capture used, so that seeds built from the capture authenticate.
pub const DEVICE_ID: &str = "dev1";
/// Its primary key (reference §7.1).
pub const DEVICE_KEY: &str = "ZGV2aWNlLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMw==";
/// The host name in the capture's MQTT username and SAS audience.
pub const HOST: &str = "localhost";
/// The expiry of the seeds' SAS tokens (2100-01-01): far enough to stay valid.
pub const SEED_EXPIRY: u64 = 4_102_444_800;

struct Fixture {
    runtime: Runtime,
    hub: Hub,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // A broken fixture is a bug in this crate, not a finding: panicking here is intended.
        #[allow(clippy::expect_used)]
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        #[allow(clippy::expect_used)]
        let hub = Hub::open(Store::in_memory(), vec![HOST.to_owned()]).expect("an in-memory hub");
        let body = json!({
            "deviceId": DEVICE_ID,
            "authentication": {
                "type": "sas",
                "symmetricKey": {"primaryKey": DEVICE_KEY, "secondaryKey": DEVICE_KEY},
            },
        });
        #[allow(clippy::expect_used)]
        runtime
            .block_on(hub.create_or_update_device(DEVICE_ID, &body, None))
            .expect("the fuzzing device is registered");
        Fixture { runtime, hub }
    })
}

/// The process's hub (in memory; devices `myDeviceId` and [`DEVICE_ID`]).
pub fn hub() -> &'static Hub {
    &fixture().hub
}

/// Runs `future` to completion on the process's runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    fixture().runtime.block_on(future)
}

/// A CONNECT as the Python SDK sends it (reference §7.3: level 4, username + password, keep-alive
/// 60), for [`DEVICE_ID`] with a token valid until [`SEED_EXPIRY`], and CleanSession 1 so that
/// one input's subscriptions are not restored into the next.
pub fn connect_packet() -> Vec<u8> {
    let key = match SharedKey::from_base64(DEVICE_KEY) {
        Ok(key) => key,
        Err(e) => panic!("the fixed device key is base64: {e}"),
    };
    let resource = hub_core::sas::device_resource_uri(HOST, DEVICE_ID, None);
    let password = hub_core::sas::generate(&resource, &key, None, SEED_EXPIRY);
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(DEVICE_ID);
    connect.keep_alive = 60;
    connect.clean_session = true;
    connect.set_login(
        format!("{HOST}/{DEVICE_ID}/?api-version=2021-04-12"),
        password,
    );
    let mut buf = BytesMut::new();
    if let Err(e) = Packet::Connect(connect).write(&mut buf, usize::MAX) {
        panic!("the fixed CONNECT encodes: {e:?}");
    }
    buf.to_vec()
}

/// Asserts that `written` (what the hub sent on one connection) is a sequence of whole MQTT
/// 3.1.1 packets the device side can decode: the hub must never emit a malformed packet.
pub fn assert_valid_mqtt(written: &[u8]) {
    let mut buf = BytesMut::from(written);
    while !buf.is_empty() {
        if let Err(e) = Packet::read(&mut buf, usize::MAX) {
            panic!(
                "the hub wrote bytes that are not MQTT: {e:?} ({} left)",
                buf.len()
            );
        }
    }
}
