//! How configurations reach twins: a reconciler that, after any change of a configuration or a
//! twin, gives each affected twin its `configurations` status and its winning configuration's
//! content.
//!
//! For one twin (device content for device twins, module content for module twins): every
//! configuration whose target condition matches is `Targeted`, except the one that wins
//! ([`hub_core::configuration::precedence`]), which is `Applied`. When the winner changes, its
//! content is written into the twin's desired properties, once: a later change of the same
//! property (by a twin update or a job) stands until the winner changes again. When the
//! configuration that was applied stops targeting the twin, the settings it made are removed
//! and the next one, if any, applies ("If a device twin no longer meets the target condition,
//! the settings from this configuration are removed", Microsoft Learn, "Automatic IoT device
//! and module management", Modify a configuration); a deleted configuration's settings stay
//! (the same page: twins "take on their next highest priority configuration").
//!
//! Changes go through the registry's own staging and commit, as a twin update does, so a
//! connected twin gets its desired patch and every change is durable before it is seen.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use hub_core::configuration::{ConfigurationStatus, ContentKind, DesiredContent};

use super::Compiled;
use crate::hub::record::DeviceRecord;
use crate::hub::{DeviceChange, Hub, identity_key, lock};
use crate::twins::{self, Section};

/// How long the reconciler lets changes gather before it applies configurations: twins that
/// change together (a job, an import) are handled in one pass.
pub const SETTLE: Duration = Duration::from_millis(50);

/// How often every twin is checked even when nothing announced a change (a target condition on
/// `connectionState` changes with connections, which are not twin writes).
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Devices checked per hold of the `state` lock.
const CHECK_CHUNK: usize = 512;
/// Devices changed per commit (and write-lock batch).
const APPLY_BATCH: usize = 100;

/// What the reconciler has yet to look at.
#[derive(Debug, Default)]
pub(in crate::hub) struct Pending {
    all: bool,
    ids: BTreeSet<String>,
}

/// What one twin's configurations come to.
#[derive(Debug, PartialEq)]
struct TwinPlan {
    statuses: BTreeMap<String, ConfigurationStatus>,
    /// The desired patch to apply (content of the new winner, removals of the old one).
    patch: Option<Map<String, Value>>,
    winner: Option<String>,
}

/// Plans one twin: `doc` is its document, `desired` its desired section, `statuses` its current
/// `configurations`, `configurations` every configuration of its kind in precedence order.
fn plan_twin(
    doc: &Value,
    desired: &Map<String, Value>,
    statuses: &BTreeMap<String, ConfigurationStatus>,
    configurations: &[&Compiled],
) -> Option<TwinPlan> {
    let matching: Vec<&Compiled> = configurations
        .iter()
        .copied()
        .filter(|c| c.targets(doc))
        .collect();
    let next: BTreeMap<String, ConfigurationStatus> = matching
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let status = if i == 0 {
                ConfigurationStatus::Applied
            } else {
                ConfigurationStatus::Targeted
            };
            (c.id().to_owned(), status)
        })
        .collect();
    let winner = matching.first().copied();
    let previous = statuses
        .iter()
        .find(|(_, status)| **status == ConfigurationStatus::Applied)
        .map(|(id, _)| id.as_str());
    let mut patch = Map::new();
    if let Some(winner) = winner
        && previous != Some(winner.id())
    {
        content_patch(desired, &winner.content, &mut patch);
    }
    if let Some(previous) = previous
        && winner.map(Compiled::id) != Some(previous)
        && let Some(old) = configurations.iter().find(|c| c.id() == previous)
        && !old.targets(doc)
    {
        removal_patch(
            desired,
            &old.content,
            winner.map(|w| &w.content),
            &mut patch,
        );
    }
    let patch = (!patch.is_empty() && twins::patch_changes(desired, &patch)).then_some(patch);
    if next == *statuses && patch.is_none() {
        return None;
    }
    Some(TwinPlan {
        statuses: next,
        patch,
        winner: winner.map(|w| w.id().to_owned()),
    })
}

/// The value at `path` in a desired section.
fn value_at<'a>(desired: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = desired.get(first)?;
    for segment in rest {
        value = value.as_object()?.get(segment)?;
    }
    Some(value)
}

/// Puts `value` at `path` in a patch, making the objects on the way.
fn insert_at(patch: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut map = patch;
    for segment in parents {
        let entry = map
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(inner) = entry else {
            return;
        };
        map = inner;
    }
    map.insert(last.clone(), value);
}

/// The merge patch that turns `current` into `new`: a configuration sets a property to its
/// value (an object's other members go), where a twin patch would merge into it.
fn replacement(current: Option<&Value>, new: &Value) -> Value {
    match (current, new) {
        (Some(Value::Object(current)), Value::Object(new)) => {
            let mut patch: Map<String, Value> = current
                .keys()
                .filter(|k| !new.contains_key(*k))
                .map(|k| (k.clone(), Value::Null))
                .collect();
            for (k, v) in new {
                patch.insert(k.clone(), replacement(current.get(k), v));
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

fn content_patch(
    desired: &Map<String, Value>,
    content: &DesiredContent,
    patch: &mut Map<String, Value>,
) {
    for (path, value) in &content.settings {
        insert_at(patch, path, replacement(value_at(desired, path), value));
    }
}

/// Removes the settings `old` made, except where `keep` sets the same property (or one
/// containing or inside it).
fn removal_patch(
    desired: &Map<String, Value>,
    old: &DesiredContent,
    keep: Option<&DesiredContent>,
    patch: &mut Map<String, Value>,
) {
    for (path, _) in &old.settings {
        let kept = keep.is_some_and(|keep| {
            keep.settings.iter().any(|(other, _)| {
                let n = other.len().min(path.len());
                other[..n] == path[..n]
            })
        });
        if !kept && value_at(desired, path).is_some() {
            insert_at(patch, path, Value::Null);
        }
    }
}

/// The configurations of each kind, in precedence order.
struct ByKind<'a> {
    device: Vec<&'a Compiled>,
    module: Vec<&'a Compiled>,
}

impl<'a> ByKind<'a> {
    fn new(all: &'a [Arc<Compiled>]) -> Self {
        let (device, module) = all
            .iter()
            .map(|c| &**c)
            .partition(|c| c.content.kind == ContentKind::Device);
        ByKind { device, module }
    }

    /// Whether a pass would change anything on `record` (its twin or a module's).
    fn would_change(&self, record: &DeviceRecord) -> bool {
        plan_twin(
            &record.doc,
            &record.desired,
            &record.configurations,
            &self.device,
        )
        .is_some()
            || record
                .modules
                .values()
                .any(|m| plan_twin(&m.doc, &m.desired, &m.configurations, &self.module).is_some())
    }
}

/// What staging one device record produced.
struct Staged {
    changed: bool,
    device_patch: Option<Map<String, Value>>,
    module_patches: Vec<(String, Map<String, Value>)>,
}

/// Applies a plan's patch to a desired section; returns the patch a session should get (with
/// its `$version`), or why it could not be applied.
fn apply_plan_patch(
    desired: &mut Map<String, Value>,
    patch: Map<String, Value>,
    now: &str,
) -> Result<Map<String, Value>, twins::TwinError> {
    let value = Value::Object(patch);
    let version = twins::apply_patch(desired, &value, Section::Desired, now)?;
    let Value::Object(mut patch) = value else {
        return Ok(Map::new());
    };
    patch.insert("$version".into(), Value::from(version));
    Ok(patch)
}

/// Stages the configurations' outcome on a copy of a committed record.
fn stage(record: &mut DeviceRecord, kinds: &ByKind<'_>, now: &str) -> Staged {
    let mut staged = Staged {
        changed: false,
        device_patch: None,
        module_patches: Vec::new(),
    };
    if let Some(mut plan) = plan_twin(
        &record.doc,
        &record.desired,
        &record.configurations,
        &kinds.device,
    ) {
        if let Some(patch) = plan.patch.take() {
            match apply_plan_patch(&mut record.desired, patch, now) {
                Ok(patch) => {
                    record.twin_version += 1;
                    staged.device_patch = Some(patch);
                }
                Err(error) => not_applied(&mut plan, &record.device_id, None, &error),
            }
        }
        record.configurations = plan.statuses;
        record.refresh();
        staged.changed = true;
    }
    let device_id = record.device_id.clone();
    for module in record.modules.values_mut() {
        let Some(mut plan) = plan_twin(
            &module.doc,
            &module.desired,
            &module.configurations,
            &kinds.module,
        ) else {
            continue;
        };
        if let Some(patch) = plan.patch.take() {
            match apply_plan_patch(&mut module.desired, patch, now) {
                Ok(patch) => {
                    module.twin_version += 1;
                    staged
                        .module_patches
                        .push((identity_key(&device_id, Some(&module.module_id)), patch));
                }
                Err(error) => not_applied(&mut plan, &device_id, Some(&module.module_id), &error),
            }
        }
        module.configurations = plan.statuses;
        module.refresh(&device_id);
        staged.changed = true;
    }
    staged
}

/// A winner whose content the twin cannot take (its desired section would pass IoT Hub's
/// limits) stays `Targeted`, and is tried again when the twin next changes.
fn not_applied(plan: &mut TwinPlan, device: &str, module: Option<&str>, error: &twins::TwinError) {
    if let Some(winner) = &plan.winner {
        tracing::warn!(
            configuration = %winner,
            device = %device,
            module = module.unwrap_or(""),
            %error,
            "configuration content not applied"
        );
        plan.statuses
            .insert(winner.clone(), ConfigurationStatus::Targeted);
    }
}

impl Hub {
    /// Tells the reconciler that configurations changed: every twin is looked at again.
    pub(in crate::hub) fn configurations_changed(&self) {
        let in_force = !lock(&self.inner.configurations).ordered().is_empty();
        self.inner
            .configurations_in_force
            .store(in_force, Ordering::Relaxed);
        lock(&self.inner.configurations_pending).all = true;
        self.inner.configurations_wake.notify_one();
    }

    /// Tells the reconciler that these devices' twins (or their modules') changed. Costs one
    /// atomic load while no configuration exists.
    pub(in crate::hub) fn twins_changed<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        if !self.inner.configurations_in_force.load(Ordering::Relaxed) {
            return;
        }
        let mut pending = lock(&self.inner.configurations_pending);
        let before = pending.ids.len();
        if !pending.all {
            pending.ids.extend(ids.into_iter().map(str::to_owned));
        }
        let added = pending.ids.len() > before;
        drop(pending);
        if added {
            self.inner.configurations_wake.notify_one();
        }
    }

    /// Applies every configuration to every twin now, before returning: a seeded hub serves
    /// its configurations' content from its first request. Called before the reconciler runs.
    pub async fn settle_configurations(&self) -> usize {
        self.configurations_changed();
        self.apply_configurations().await
    }

    /// Runs the reconciler until `shutdown`.
    pub fn spawn_configurations(&self, shutdown: CancellationToken, tracker: &TaskTracker) {
        let hub = self.clone();
        // Twins loaded at start (and seeded ones) are checked once against what is stored.
        if !lock(&self.inner.configurations).ordered().is_empty() {
            self.configurations_changed();
        }
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = hub.inner.configurations_wake.notified() => {}
                    () = tokio::time::sleep(SWEEP_EVERY) => {
                        if hub.inner.configurations_in_force.load(Ordering::Relaxed) {
                            lock(&hub.inner.configurations_pending).all = true;
                        }
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(SETTLE) => {}
                }
                hub.apply_configurations().await;
            }
        });
    }

    /// One pass of the reconciler over what changed since the last: returns how many device
    /// records it changed.
    pub(in crate::hub) async fn apply_configurations(&self) -> usize {
        let (all, ids) = {
            let mut pending = lock(&self.inner.configurations_pending);
            (
                std::mem::take(&mut pending.all),
                std::mem::take(&mut pending.ids),
            )
        };
        if !all && ids.is_empty() {
            return 0;
        }
        let configurations = lock(&self.inner.configurations).ordered();
        let kinds = ByKind::new(&configurations);
        let candidates = if all {
            self.devices_to_change(&kinds)
        } else {
            let ids: Vec<String> = ids.into_iter().collect();
            let mut out = Vec::new();
            for chunk in ids.chunks(CHECK_CHUNK) {
                let state = lock(&self.inner.state);
                out.extend(
                    chunk
                        .iter()
                        .filter(|id| {
                            state
                                .devices
                                .get(*id)
                                .is_some_and(|r| kinds.would_change(r))
                        })
                        .cloned(),
                );
            }
            out
        };
        let mut changed = 0;
        for batch in candidates.chunks(APPLY_BATCH) {
            changed += self.apply_to(batch, &kinds).await;
        }
        changed
    }

    /// Every device a pass would change, reading the registry [`CHECK_CHUNK`] records per hold
    /// of the state lock.
    fn devices_to_change(&self, kinds: &ByKind<'_>) -> Vec<String> {
        let mut out = Vec::new();
        let mut resume: Option<String> = None;
        loop {
            let state = lock(&self.inner.state);
            let range = match &resume {
                Some(after) => state
                    .devices
                    .range::<str, _>((Bound::Excluded(after.as_str()), Bound::Unbounded)),
                None => state.devices.range::<str, _>(..),
            };
            let mut read = 0;
            for (id, record) in range.take(CHECK_CHUNK) {
                read += 1;
                if kinds.would_change(record) {
                    out.push(id.clone());
                }
                resume = Some(id.clone());
            }
            drop(state);
            if read < CHECK_CHUNK {
                return out;
            }
        }
    }

    /// Stages and commits the configurations' outcome on `ids`, under their write locks.
    async fn apply_to(&self, ids: &[String], kinds: &ByKind<'_>) -> usize {
        let writing = self.write_locks(ids.iter().map(String::as_str)).await;
        let current: Vec<DeviceRecord> = {
            let state = lock(&self.inner.state);
            ids.iter()
                .filter_map(|id| state.devices.get(id).cloned())
                .collect()
        };
        let now = self.now();
        let mut change = DeviceChange {
            from_configurations: true,
            ..DeviceChange::default()
        };
        for mut record in current {
            let staged = stage(&mut record, kinds, &now);
            if staged.changed {
                change.module_desired.extend(staged.module_patches);
                change.put.push((record, staged.device_patch));
            }
        }
        let changed = change.put.len();
        if changed == 0 {
            return 0;
        }
        if let Err(error) = self.commit_devices(writing, change).await {
            tracing::warn!(%error, devices = changed, "configurations not applied; will retry");
            lock(&self.inner.configurations_pending)
                .ids
                .extend(ids.iter().cloned());
            return 0;
        }
        changed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn content(v: Value) -> DesiredContent {
        let content = serde_json::from_value(json!({ "deviceContent": v })).unwrap();
        DesiredContent::parse(Some(&content)).unwrap()
    }

    #[test]
    fn a_configuration_replaces_the_property_it_sets() {
        let desired = map(json!({"fw": {"version": "1.0", "url": "old"}, "other": 1}));
        let mut patch = Map::new();
        content_patch(
            &desired,
            &content(
                json!({"properties.desired.fw": {"version": "2.0"}, "properties.desired.a.b": 3}),
            ),
            &mut patch,
        );
        assert_eq!(
            Value::Object(patch),
            json!({"fw": {"version": "2.0", "url": null}, "a": {"b": 3}})
        );
    }

    #[test]
    fn removal_spares_what_the_next_winner_sets() {
        let desired = map(json!({"fw": 1, "mode": "eco", "x": {"y": 2}}));
        let old = content(
            json!({"properties.desired.fw": 1, "properties.desired.mode": "eco",
                                 "properties.desired.x.y": 2, "properties.desired.gone": 0}),
        );
        let next = content(json!({"properties.desired.fw": 2}));
        let mut patch = Map::new();
        removal_patch(&desired, &old, Some(&next), &mut patch);
        assert_eq!(
            Value::Object(patch),
            json!({"mode": null, "x": {"y": null}})
        );
    }
}
