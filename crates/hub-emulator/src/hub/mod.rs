//! The hub's shared state behind one cheap handle ([`Hub`]): the identity registry with each
//! device's twin, the access policies, the sessions of connected devices and pending direct
//! methods. This file owns the handle, the locks and the order they are taken in; the rooms:
//!
//! - `auth`: policies and their keys, service and device authentication.
//! - `registry`: device identities (create, update, delete, read, list).
//! - `modules`: module identities and module twins, kept inside their device's record.
//! - `bulk`: the bulk registry (`POST /devices`), staged with `registry`'s own staging.
//! - `seed`: a seed file's devices applied at start, idempotently.
//! - `configurations`: automatic device and module configurations and the reconciler that
//!   applies them to twins.
//! - `twins`: service twin updates (one device or a job's batch) and device reported patches.
//! - `router`: device sessions, presence, the outbound queue, desired-patch delivery.
//! - `methods`: direct-method calls waiting for a device's answer.
//! - `record`: one device as stored, and the device and twin documents made from it.
//!
//! # Locks, in the order they are taken
//!
//! 1. **Device write locks** (`WriteLocks`, async, one per device id, taken in id order by
//!    `Hub::write_locks`): held by a change to device records from staging to applying, so
//!    two changes of one device never interleave, while other devices' changes and every read
//!    go on. Never taken while holding 2 or 3. A module has no lock of its own: it lives in its
//!    device's record, so its changes take its device's lock and commit its device's record.
//! 2. **`state`** (std mutex): the registry as committed. Held only to read, stage or apply, never
//!    across an `.await`, a commit or a serialization of records; a read of many twins (a query,
//!    a job's device selection) takes it once per [`TWIN_READ_CHUNK`] documents.
//! 3. **`sessions`** (std mutex), then **`pending`** (std mutex): never held across an `.await`.
//! 4. **`faults`** (the injected-fault table, [`Faults`]): a leaf, taken under any of the above
//!    (a connect checks it under `state`) and never holding another lock.
//!
//! # Invariants
//!
//! - Every change a caller is told about is committed to the [`Store`] first: a change is staged
//!   (under its device write locks, reading `state`), committed without any std lock held, then
//!   applied to `state` (`Hub::commit_devices`); readers only ever see committed records.
//! - Desired patches reach a session in version order: they are queued by
//!   `router::queue_desired_patch` while the device's write lock and `state` are held, in the
//!   order the versions were committed.
//! - A change, once queued for commit, is applied by the store's writer right after its commit
//!   (`Hub::commit_devices`), in commit order: a caller that goes away (a closed connection)
//!   cannot leave a commit on disk that `state` never saw.

mod auth;
mod bulk;
mod configurations;
mod error;
mod export;
mod methods;
mod modules;
mod record;
mod registry;
mod router;
mod seed;
mod twins;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio::sync::{Notify, OwnedMutexGuard, oneshot};

pub use auth::{DeviceGrant, PolicyKeys, SAS_SKEW_SECS};
pub use bulk::{BulkRequestError, check_bulk_request};
pub use configurations::{SETTLE as CONFIGURATION_SETTLE, max_configurations_on};
pub use error::{AuthError, OperationError};
pub use methods::{MAX_METHOD_PAYLOAD, MethodCall, MethodOutcome, validate_method_name};
pub use modules::{MAX_MODULES_PER_DEVICE, identity_key, validate_module_id};
pub use record::{NEVER, timestamp};
pub use registry::{TUTORIAL_DEVICE_ID, validate_device_id};
pub use router::{
    GrantedQos, OpenedSession, Outbound, SESSION_QUEUE, SessionTicket, Subscriptions,
};
pub use seed::{SeedDevice, SeedOutcome, SeedRefused};
pub use twins::TWIN_READ_CHUNK;

use crate::faults::{FaultError, FaultKind, FaultSpec, Faults};
use crate::feed::{Change, Feed};
use crate::store::{Store, Write};
use crate::telemetry::TelemetryRings;
use methods::PendingMethod;
use record::DeviceRecord;
use router::Sessions;

/// The registry as committed.
struct State {
    devices: BTreeMap<String, DeviceRecord>,
}

struct Inner {
    host_names: Vec<String>,
    policies: Vec<(PolicyKeys, hub_core::policy::Permissions)>,
    writes: WriteLocks,
    state: Mutex<State>,
    sessions: Mutex<Sessions>,
    pending: Mutex<HashMap<u64, PendingMethod>>,
    presence: Notify,
    next_id: AtomicU64,
    store: Store,
    faults: Faults,
    feed: Feed,
    telemetry: TelemetryRings,
    /// The configurations in force (a leaf lock: held only to read or replace the list).
    configurations: Mutex<configurations::Configurations>,
    /// Serializes configuration writes (create, update, delete) from check to apply.
    configuration_writes: tokio::sync::Mutex<()>,
    /// Whether any configuration exists: twin changes are only announced to the reconciler then.
    configurations_in_force: std::sync::atomic::AtomicBool,
    /// What the reconciler has yet to look at (a leaf lock).
    configurations_pending: Mutex<configurations::apply::Pending>,
    configurations_wake: Notify,
}

/// A cheap handle to the hub's shared state.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("host_names", &self.inner.host_names)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a hub lock is a bug already reported; the data is still consistent
    // because every change is staged and committed before it is applied.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Per-device write locks (lock 1 of the module's order), made on first use and dropped when
/// nobody holds or waits for them, so memory follows the devices being written, not the fleet.
#[derive(Default)]
struct WriteLocks {
    held: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The write locks of a set of devices; released (and forgotten when unused) on drop.
struct WriteGuard {
    hub: Hub,
    ids: Vec<String>,
    waiting: Vec<Arc<tokio::sync::Mutex<()>>>,
    guards: Vec<OwnedMutexGuard<()>>,
}

impl Hub {
    /// Takes the write locks of `ids` in id order (so two batches never deadlock); tokio's mutex
    /// is fair, so a device's changes are applied in the order they asked.
    async fn write_locks(&self, ids: impl IntoIterator<Item = &str>) -> WriteGuard {
        let mut ids: Vec<String> = ids.into_iter().map(str::to_owned).collect();
        ids.sort_unstable();
        ids.dedup();
        let waiting: Vec<_> = {
            let mut held = lock(&self.inner.writes.held);
            ids.iter()
                .map(|id| Arc::clone(held.entry(id.clone()).or_default()))
                .collect()
        };
        // The guard owns everything before the first await: if this future is dropped midway,
        // its drop still releases and forgets what it took.
        let mut guard = WriteGuard {
            hub: self.clone(),
            guards: Vec::with_capacity(ids.len()),
            ids,
            waiting,
        };
        guard.waiting.reverse();
        while let Some(mutex) = guard.waiting.pop() {
            let taken = mutex.lock_owned().await;
            guard.guards.push(taken);
        }
        guard
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.guards.clear();
        self.waiting.clear();
        let mut held = lock(&self.hub.inner.writes.held);
        for id in &self.ids {
            if held.get(id).is_some_and(|m| Arc::strong_count(m) == 1) {
                held.remove(id);
            }
        }
    }
}

/// A staged change of device records: what to put (with the desired patch its device should
/// receive), what to delete, the desired patches of modules (by identity key, see
/// [`identity_key`]), and whose sessions to close once it is applied (identity keys; a device's
/// key also closes its modules' sessions). Made under the devices' write locks from committed
/// records.
#[derive(Default)]
struct DeviceChange {
    put: Vec<(DeviceRecord, Option<Map<String, Value>>)>,
    delete: Vec<String>,
    module_desired: Vec<(String, Map<String, Value>)>,
    close_sessions: Vec<String>,
    /// Made by the configurations' reconciler: not announced back to it.
    from_configurations: bool,
}

impl Hub {
    /// Opens the hub over `store`: loads its policies (creating keys on first start), its devices,
    /// and creates the tutorial device on a new hub. `host_names` are the names clients may use
    /// in SAS audiences (the first is the primary one). Blocking: call it before serving.
    pub fn open(store: Store, host_names: Vec<String>) -> Result<Hub, OperationError> {
        let policies = auth::load_policies(&store)?;
        let devices = registry::load_devices(&store)?;
        let configurations = configurations::load_configurations(&store)?;
        let in_force = !configurations.ordered().is_empty();
        let hub = Hub {
            inner: Arc::new(Inner {
                host_names,
                policies,
                writes: WriteLocks::default(),
                state: Mutex::new(State { devices }),
                sessions: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                presence: Notify::new(),
                next_id: AtomicU64::new(1),
                store,
                faults: Faults::default(),
                feed: Feed::default(),
                telemetry: TelemetryRings::new(crate::telemetry::DEFAULT_PER_DEVICE),
                configurations: Mutex::new(configurations),
                configuration_writes: tokio::sync::Mutex::new(()),
                configurations_in_force: std::sync::atomic::AtomicBool::new(in_force),
                configurations_pending: Mutex::new(configurations::apply::Pending::default()),
                configurations_wake: Notify::new(),
            }),
        };
        if hub.inner.store.meta("created")?.is_none() {
            hub.create_tutorial_device()?;
            hub.inner.store.write(&[Write::PutMeta {
                key: "created".into(),
                value: hub.now(),
            }])?;
        }
        Ok(hub)
    }

    /// The durable store (jobs keep their records there too).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The injected faults (see [`crate::faults`]).
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// What changed, for watchers (see [`crate::feed`]).
    pub fn feed(&self) -> &Feed {
        &self.inner.feed
    }

    /// Every device's recent telemetry (see [`crate::telemetry`]).
    pub fn telemetry(&self) -> &TelemetryRings {
        &self.inner.telemetry
    }

    /// Keeps a device-to-cloud message the hub took from `device_id`, and tells watchers.
    pub fn record_telemetry(&self, device_id: &str, body: &[u8], properties: &[(String, String)]) {
        self.inner
            .telemetry
            .record(device_id, body, properties, self.now());
        self.inner
            .feed
            .publish(|| Change::Telemetry(Arc::from(device_id)));
    }

    /// Makes the device misbehave as `spec` says, from now. An offline fault also closes the
    /// device's connection now (its reconnects are refused while the fault lasts). The device
    /// need not be registered yet: a test may set up its faults before its devices.
    pub fn set_fault(&self, device_id: &str, spec: FaultSpec) -> Result<(), FaultError> {
        let offline = spec.kind == FaultKind::Offline;
        tracing::info!(%device_id, kind = spec.kind.name(), lasts = ?spec.lasts, "fault injected");
        self.inner.faults.set(device_id, spec)?;
        if offline {
            self.kill_session(device_id);
        }
        Ok(())
    }

    /// The hub's primary host name.
    pub fn host_name(&self) -> &str {
        self.inner
            .host_names
            .first()
            .map(String::as_str)
            .unwrap_or("localhost")
    }

    fn now(&self) -> String {
        timestamp(OffsetDateTime::now_utc())
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Commits a staged change, then (on the store's writer, in commit order, even if the caller
    /// stops waiting) applies it to `state`, queues its desired patches, closes the sessions it
    /// names and releases `writing`, the write locks of every device in it. No std lock is held
    /// here while records are serialized or committed.
    async fn commit_devices(
        &self,
        writing: WriteGuard,
        change: DeviceChange,
    ) -> Result<(), OperationError> {
        let mut writes = Vec::new();
        if self.inner.store.is_durable() {
            writes.reserve(change.put.len() + change.delete.len());
            for (record, _) in &change.put {
                let doc = serde_json::to_string(record).map_err(|e| {
                    OperationError::Internal(format!("cannot encode a device: {e}"))
                })?;
                writes.push(Write::PutDevice {
                    id: record.device_id.clone(),
                    doc,
                });
            }
            writes.extend(
                change
                    .delete
                    .iter()
                    .map(|id| Write::DeleteDevice { id: id.clone() }),
            );
        }
        let (done, outcome) = oneshot::channel();
        let hub = self.clone();
        self.inner.store.commit_then(writes, move |committed| {
            if committed.is_ok() {
                hub.apply_devices(change);
            }
            // Released before the caller hears back: once it has, the writer holds no handle
            // to the hub, so the caller's handle can be the last one (and close the store).
            drop(writing);
            drop(hub);
            let _ = done.send(committed);
        });
        match outcome.await {
            Ok(committed) => Ok(committed?),
            Err(_) => Err(OperationError::Internal(
                "the store dropped a commit without answering".into(),
            )),
        }
    }

    /// Applies a committed change (see [`Hub::commit_devices`]).
    fn apply_devices(&self, change: DeviceChange) {
        if !change.from_configurations {
            self.twins_changed(change.put.iter().map(|(r, _)| r.device_id.as_str()));
        }
        let mut state = lock(&self.inner.state);
        {
            let sessions = lock(&self.inner.sessions);
            for (mut record, desired_patch) in change.put {
                if let Some(current) = state.devices.get(&record.device_id) {
                    record.keep_presence_of(current);
                }
                if let Some(patch) = desired_patch {
                    router::queue_desired_patch(&sessions, &record.device_id, patch);
                }
                self.inner
                    .feed
                    .publish(|| Change::Device(Arc::from(record.device_id.as_str())));
                state.devices.insert(record.device_id.clone(), record);
            }
            for (key, patch) in change.module_desired {
                router::queue_desired_patch(&sessions, &key, patch);
            }
        }
        // A device's sessions to close include its modules' (those it has now, or had before
        // its deletion below).
        let mut close: Vec<String> = Vec::with_capacity(change.close_sessions.len());
        for key in change.close_sessions {
            if let Some(device) = state.devices.get(&key) {
                close.extend(device.modules.keys().map(|m| identity_key(&key, Some(m))));
            }
            close.push(key);
        }
        for id in &change.delete {
            if let Some(removed) = state.devices.remove(id) {
                close.extend(removed.modules.keys().map(|m| identity_key(id, Some(m))));
            }
            self.inner.telemetry.forget(id);
            self.inner
                .feed
                .publish(|| Change::Device(Arc::from(id.as_str())));
        }
        drop(state);
        for key in &close {
            self.kill_session(key);
        }
    }
}

#[cfg(test)]
mod tests;
