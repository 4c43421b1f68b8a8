//! Automatic device and module configurations (`/configurations`): their definitions as stored
//! and checked (this file: create, update, read, list, delete, `testQueries`), how they reach
//! twins (`apply`: the reconciler that gives each twin its winning configuration's content and
//! its `configurations` status, now and whenever the twin changes later) and their metrics
//! (`metrics`, counted when a configuration is read).
//!
//! IoT Hub runs configurations "shortly after" a change and then every five minutes (Microsoft
//! Learn, "Automatic IoT device and module management"); this hub applies them within
//! [`apply::SETTLE`] of any change of a configuration or a twin, and sweeps every twin each
//! [`apply::SWEEP_EVERY`] for what a twin change does not announce (a connection state).

pub(super) mod apply;
mod metrics;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use hub_core::configuration::{
    self as wire, Configuration, ConfigurationContent, ConfigurationMetrics,
    ConfigurationQueriesTestInput, ConfigurationQueriesTestResponse, ContentKind, DesiredContent,
    MAX_CUSTOM_METRICS,
};
use hub_core::error::ErrorCode;

use super::record::{etag_of, matches_etag};
use super::{Hub, OperationError, lock};
use crate::query::{self, Condition, Query, Source};
use crate::store::Write;

pub use apply::SETTLE;

/// How many configurations a hub holds when no tier is set: a standard hub's.
const DEFAULT_MAX_CONFIGURATIONS: usize = 100;

/// How many configurations a hub on `tier` may hold: the tier's figure, or a standard hub's
/// without `--tier`. The one place REST, seed files and import jobs take their cap from.
pub fn max_configurations_on(tier: Option<hub_core::tier::Tier>) -> usize {
    tier.map_or(DEFAULT_MAX_CONFIGURATIONS, wire::max_configurations)
}

/// A configuration as stored: what its creator gave (content, condition, metrics, labels) and
/// the hub's own fields. Metrics' results are never stored; they are counted when read.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredConfiguration {
    id: String,
    schema_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    content: ConfigurationContent,
    content_type: Option<String>,
    target_condition: String,
    created: String,
    last_updated: String,
    priority: i64,
    metric_queries: BTreeMap<String, String>,
    etag_seq: u64,
}

/// A configuration ready to be applied: its stored form with its content, condition and
/// metric queries parsed.
#[derive(Debug)]
pub(super) struct Compiled {
    stored: StoredConfiguration,
    content: DesiredContent,
    /// `None`: the condition is empty and targets no twin.
    condition: Option<Condition>,
    metrics: Vec<(String, Query)>,
}

impl Compiled {
    fn compile(stored: StoredConfiguration) -> Result<Compiled, OperationError> {
        let content = DesiredContent::parse(Some(&stored.content))
            .map_err(|e| invalid(ErrorCode::InvalidConfigurationContent, e.to_string()))?;
        let condition = parse_target(content.kind, &stored.target_condition)
            .map_err(|message| invalid(ErrorCode::InvalidConfigurationTargetCondition, message))?;
        let metrics = parse_metrics(&stored.metric_queries)?;
        Ok(Compiled {
            stored,
            content,
            condition,
            metrics,
        })
    }

    pub(super) fn id(&self) -> &str {
        &self.stored.id
    }

    fn key(&self) -> (i64, &str, &str) {
        (self.stored.priority, &self.stored.created, &self.stored.id)
    }

    /// Whether the configuration targets the twin `doc`.
    pub(super) fn targets(&self, doc: &serde_json::Value) -> bool {
        self.condition.as_ref().is_some_and(|c| c.matches(doc))
    }
}

fn invalid(code: ErrorCode, message: String) -> OperationError {
    OperationError::ConfigurationInvalid { code, message }
}

/// Parses a target condition for content of `kind`: a device condition (`*` for every device,
/// empty for none), or `FROM devices.modules WHERE <condition>` for module content, where `*`
/// cannot stand for every module (Microsoft Learn, "Automatic IoT device and module
/// management", Target modules).
fn parse_target(kind: ContentKind, text: &str) -> Result<Option<Condition>, String> {
    let condition = match kind {
        ContentKind::Device => text.trim(),
        ContentKind::Module => {
            if text.trim().is_empty() {
                return Ok(None);
            }
            let rest = wire::module_condition(text).ok_or_else(|| {
                format!(
                    "the target condition `{text}` of a module configuration must start with \
                     `FROM devices.modules WHERE`"
                )
            })?;
            if rest.trim() == "*" {
                return Err(
                    "a module configuration cannot target every module with `*`; name a \
                     condition such as `FROM devices.modules WHERE moduleId = 'mymodule'`"
                        .into(),
                );
            }
            rest
        }
    };
    if condition.is_empty() {
        return Ok(None);
    }
    query::parse_condition(condition)
        .map(Some)
        .map_err(|e| format!("the target condition `{text}` is not valid: {e}"))
}

/// Parses custom metric queries: at most [`MAX_CUSTOM_METRICS`], each a full query over
/// `devices` or `devices.modules` whose result rows are counted.
fn parse_metrics(
    queries: &BTreeMap<String, String>,
) -> Result<Vec<(String, Query)>, OperationError> {
    if queries.len() > MAX_CUSTOM_METRICS {
        return Err(invalid(
            ErrorCode::InvalidConfigurationCustomMetricsQuery,
            format!(
                "the configuration has {} custom metrics; the most is {MAX_CUSTOM_METRICS}",
                queries.len()
            ),
        ));
    }
    queries
        .iter()
        .map(|(name, text)| {
            parse_metric(name, text)
                .map(|q| (name.clone(), q))
                .map_err(|message| {
                    invalid(ErrorCode::InvalidConfigurationCustomMetricsQuery, message)
                })
        })
        .collect()
}

fn parse_metric(name: &str, text: &str) -> Result<Query, String> {
    if name.is_empty() || name == wire::TARGETED_COUNT || name == wire::APPLIED_COUNT {
        return Err(format!(
            "`{name}` cannot name a custom metric; `{}` and `{}` are the system metrics",
            wire::TARGETED_COUNT,
            wire::APPLIED_COUNT
        ));
    }
    let parsed = query::parse(text)
        .map_err(|e| format!("custom metric `{name}`'s query is not valid: {e}"))?;
    if parsed.source == Source::DevicesJobs {
        return Err(format!(
            "custom metric `{name}` queries devices.jobs; metrics count twins (`FROM devices` or \
             `FROM devices.modules`)"
        ));
    }
    Ok(parsed)
}

/// The configurations in force, in precedence order (see [`wire::precedence`]).
#[derive(Debug, Default)]
pub(super) struct Configurations {
    by_id: BTreeMap<String, Arc<Compiled>>,
    ordered: Arc<Vec<Arc<Compiled>>>,
}

impl Configurations {
    fn set(&mut self, compiled: Option<Arc<Compiled>>, removed: Option<&str>) {
        if let Some(id) = removed {
            self.by_id.remove(id);
        }
        if let Some(compiled) = compiled {
            self.by_id.insert(compiled.id().to_owned(), compiled);
        }
        let mut ordered: Vec<Arc<Compiled>> = self.by_id.values().cloned().collect();
        ordered.sort_by(|a, b| wire::precedence(a.key(), b.key()));
        self.ordered = Arc::new(ordered);
    }

    pub(super) fn ordered(&self) -> Arc<Vec<Arc<Compiled>>> {
        Arc::clone(&self.ordered)
    }
}

/// Loads the stored configurations (at start).
pub(super) fn load_configurations(
    store: &crate::store::Store,
) -> Result<Configurations, OperationError> {
    let mut configurations = Configurations::default();
    for (id, doc) in store.load_configurations()? {
        let stored: StoredConfiguration = serde_json::from_str(&doc).map_err(|e| {
            OperationError::Unreadable(format!("stored configuration {id} is unreadable: {e}"))
        })?;
        let compiled = Compiled::compile(stored).map_err(|e| {
            OperationError::Unreadable(format!("stored configuration {id} is refused: {e}"))
        })?;
        configurations.by_id.insert(id, Arc::new(compiled));
    }
    configurations.set(None, None);
    Ok(configurations)
}

/// Whether a create or update asked with `If-Match`: IoT Hub's PUT creates without one (the
/// SDKs send none on create: azure-iot-sdk-csharp `HttpClientHelper` `CreateEntity`, azure-iothub
/// `addConfiguration`, azure-iot-hub-python `create_configuration`) and updates with one (the
/// configuration's etag, or `*` to force).
fn is_update(if_match: Option<&str>) -> bool {
    if_match.is_some_and(|v| !v.trim().is_empty())
}

impl Hub {
    /// `PUT /configurations/{id}`: creates the configuration (no `If-Match`) or updates it
    /// (`If-Match` its etag or `*`). An update may change the target condition, priority,
    /// labels and metrics; its content is immutable ("Configuration identifier and Content
    /// cannot be updated", the REST swagger's `Configuration_CreateOrUpdate`), and a changed
    /// one is refused with 400403. `max` is the tier's count of configurations.
    pub async fn put_configuration(
        &self,
        id: &str,
        body: Configuration,
        if_match: Option<&str>,
        max: usize,
    ) -> Result<Configuration, OperationError> {
        wire::validate_configuration_id(id)
            .map_err(|e| OperationError::InvalidArgument(e.to_string()))?;
        if !body.id.is_empty() && body.id != id {
            return Err(OperationError::InvalidArgument(format!(
                "the body's id `{}` is not the id `{id}` in the path",
                body.id
            )));
        }
        let _writing = self.inner.configuration_writes.lock().await;
        let current = lock(&self.inner.configurations).by_id.get(id).cloned();
        let now = self.now();
        let metric_queries = body
            .metrics
            .as_ref()
            .and_then(|m| m.queries.clone())
            .unwrap_or_default();
        let stored = if is_update(if_match) {
            let current =
                current.ok_or_else(|| OperationError::ConfigurationNotFound(id.to_owned()))?;
            let etag = etag_of(current.stored.etag_seq);
            if !matches_etag(if_match, &etag) {
                return Err(OperationError::PreconditionFailed {
                    what: "configuration",
                    id: id.to_owned(),
                });
            }
            if let Some(content) = &body.content {
                let given = DesiredContent::parse(Some(content))
                    .map_err(|e| invalid(ErrorCode::InvalidConfigurationContent, e.to_string()))?;
                if given != current.content {
                    return Err(invalid(
                        ErrorCode::CannotModifyImmutableConfigurationContent,
                        format!(
                            "the content of configuration {id} cannot change once it is \
                             created; create a new configuration (and delete this one) instead"
                        ),
                    ));
                }
            }
            StoredConfiguration {
                id: id.to_owned(),
                schema_version: body
                    .schema_version
                    .clone()
                    .or_else(|| current.stored.schema_version.clone()),
                labels: body.labels.clone(),
                content: current.stored.content.clone(),
                content_type: body
                    .content_type
                    .clone()
                    .or_else(|| current.stored.content_type.clone()),
                target_condition: body.target_condition.clone().unwrap_or_default(),
                created: current.stored.created.clone(),
                last_updated: now,
                priority: body.priority.unwrap_or(0),
                metric_queries,
                etag_seq: current.stored.etag_seq + 1,
            }
        } else {
            if current.is_some() {
                return Err(OperationError::ConfigurationAlreadyExists(id.to_owned()));
            }
            let count = lock(&self.inner.configurations).by_id.len();
            if count >= max {
                return Err(OperationError::TooManyConfigurations { max });
            }
            StoredConfiguration {
                id: id.to_owned(),
                schema_version: body.schema_version.clone().or_else(|| Some("1.0".into())),
                labels: body.labels.clone(),
                content: body.content.clone().unwrap_or_default(),
                content_type: body.content_type.clone(),
                target_condition: body.target_condition.clone().unwrap_or_default(),
                created: now.clone(),
                last_updated: now,
                priority: body.priority.unwrap_or(0),
                metric_queries,
                etag_seq: 1,
            }
        };
        let compiled = Arc::new(Compiled::compile(stored)?);
        let doc = serde_json::to_string(&compiled.stored)
            .map_err(|e| OperationError::Internal(format!("cannot encode a configuration: {e}")))?;
        self.inner
            .store
            .commit(vec![Write::PutConfiguration {
                id: id.to_owned(),
                doc,
            }])
            .await?;
        lock(&self.inner.configurations).set(Some(Arc::clone(&compiled)), None);
        self.configurations_changed();
        tracing::info!(configuration = %id, "configuration saved");
        Ok(self.configuration_document(&compiled, &metrics::Twins::read(self)))
    }

    /// `GET /configurations/{id}`, with its metrics counted now.
    pub fn get_configuration(&self, id: &str) -> Result<Configuration, OperationError> {
        let compiled = lock(&self.inner.configurations)
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| OperationError::ConfigurationNotFound(id.to_owned()))?;
        Ok(self.configuration_document(&compiled, &metrics::Twins::read(self)))
    }

    /// `GET /configurations?top=N`: up to `top` configurations in id order, with their metrics.
    pub fn list_configurations(&self, top: usize) -> Vec<Configuration> {
        let all: Vec<Arc<Compiled>> = lock(&self.inner.configurations)
            .by_id
            .values()
            .take(top)
            .cloned()
            .collect();
        if all.is_empty() {
            return Vec::new();
        }
        let twins = metrics::Twins::read(self);
        all.iter()
            .map(|c| self.configuration_document(c, &twins))
            .collect()
    }

    /// Whether the hub holds configuration `id` (without counting its metrics, as a `GET` does).
    pub fn configuration_exists(&self, id: &str) -> bool {
        lock(&self.inner.configurations).by_id.contains_key(id)
    }

    /// How many configurations the hub holds.
    pub fn configuration_count(&self) -> usize {
        lock(&self.inner.configurations).by_id.len()
    }

    /// `DELETE /configurations/{id}`: without `If-Match` (as azure-iothub sends it) or with `*`
    /// unconditionally, else if the etag matches. Twins it was applied to keep the desired
    /// properties it set and take their next configuration, if any ("any device twins take on
    /// their next highest priority configuration", Microsoft Learn, "Automatic IoT device and
    /// module management", Delete a configuration).
    pub async fn delete_configuration(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), OperationError> {
        let writing = self.inner.configuration_writes.lock().await;
        let current = lock(&self.inner.configurations)
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| OperationError::ConfigurationNotFound(id.to_owned()))?;
        if !matches_etag(if_match, &etag_of(current.stored.etag_seq)) {
            return Err(OperationError::PreconditionFailed {
                what: "configuration",
                id: id.to_owned(),
            });
        }
        self.inner
            .store
            .commit(vec![Write::DeleteConfiguration { id: id.to_owned() }])
            .await?;
        lock(&self.inner.configurations).set(None, Some(id));
        self.configurations_changed();
        drop(writing);
        // The twins drop the deleted id from their `configurations` before the answer: a
        // configuration created again under the same id (within the reconciler's settle time,
        // or by a seed before the reconciler starts) would otherwise find twins saying its id
        // is `Applied` already, and its new content would never reach them.
        self.apply_configurations().await;
        tracing::info!(configuration = %id, "configuration deleted");
        Ok(())
    }

    /// `POST /configurations/testQueries`: what is wrong with a target condition and custom
    /// metric queries, without saving anything. A device condition is checked unless it starts
    /// `FROM devices.modules WHERE`, which is checked as a module condition.
    pub fn test_configuration_queries(
        &self,
        input: &ConfigurationQueriesTestInput,
    ) -> ConfigurationQueriesTestResponse {
        let mut response = ConfigurationQueriesTestResponse::default();
        if let Some(text) = &input.target_condition {
            let kind = if wire::module_condition(text).is_some() {
                ContentKind::Module
            } else {
                ContentKind::Device
            };
            if let Err(message) = parse_target(kind, text) {
                response.target_condition_error = message;
            }
        }
        for (name, text) in input.custom_metric_queries.iter().flatten() {
            if let Err(message) = parse_metric(name, text) {
                response
                    .custom_metric_query_errors
                    .insert(name.clone(), message);
            }
        }
        response
    }

    /// The wire document of a configuration, with its metrics counted over `twins`.
    fn configuration_document(&self, compiled: &Compiled, twins: &metrics::Twins) -> Configuration {
        let stored = &compiled.stored;
        let (system, custom) = twins.count(compiled);
        Configuration {
            id: stored.id.clone(),
            schema_version: stored.schema_version.clone(),
            labels: stored.labels.clone(),
            content: Some(stored.content.clone()),
            content_type: stored.content_type.clone(),
            target_condition: Some(stored.target_condition.clone()),
            created_time_utc: Some(stored.created.clone()),
            last_updated_time_utc: Some(stored.last_updated.clone()),
            priority: Some(stored.priority),
            system_metrics: Some(ConfigurationMetrics {
                results: Some(system),
                queries: Some(wire::system_metric_queries(
                    &stored.id,
                    compiled.content.kind,
                    &stored.target_condition,
                )),
            }),
            metrics: Some(ConfigurationMetrics {
                results: Some(custom),
                queries: Some(stored.metric_queries.clone()),
            }),
            etag: Some(etag_of(stored.etag_seq)),
        }
    }
}
