//! A configuration's metrics, counted when it is read: the system metrics (`targetedCount`:
//! twins its condition matches; `appliedCount`: twins whose `configurations.[[id]].status` is
//! `Applied`) and its custom metric queries (the number of rows each returns). IoT Hub counts
//! them each time it runs the configuration (every five minutes); counting at read time gives
//! the same figures without the wait.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use hub_core::configuration::{self as wire, ContentKind};

use super::Compiled;
use crate::hub::Hub;
use crate::query::{self, Source};

/// A snapshot of the twins metrics are counted over; module twins are read only if asked for.
pub(in crate::hub) struct Twins {
    devices: Vec<Arc<Value>>,
    modules: std::sync::OnceLock<Vec<Arc<Value>>>,
    hub: Hub,
}

impl Twins {
    /// Reads every device twin (documents are shared, not copied).
    pub(in crate::hub) fn read(hub: &Hub) -> Twins {
        Twins {
            devices: hub.twin_documents_after(None),
            modules: std::sync::OnceLock::new(),
            hub: hub.clone(),
        }
    }

    fn of(&self, source: Source) -> &[Arc<Value>] {
        match source {
            Source::DevicesModules => self
                .modules
                .get_or_init(|| self.hub.module_documents_from(None, usize::MAX)),
            Source::Devices | Source::DevicesJobs => &self.devices,
        }
    }

    /// The configuration's system and custom metric results.
    pub(in crate::hub) fn count(
        &self,
        compiled: &Compiled,
    ) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let twins = self.of(match compiled.content.kind {
            ContentKind::Device => Source::Devices,
            ContentKind::Module => Source::DevicesModules,
        });
        let targeted = twins.iter().filter(|doc| compiled.targets(doc)).count();
        let applied = twins
            .iter()
            .filter(|doc| status_of(doc, compiled.id()) == Some("Applied"))
            .count();
        let system = BTreeMap::from([
            (wire::TARGETED_COUNT.to_owned(), targeted as u64),
            (wire::APPLIED_COUNT.to_owned(), applied as u64),
        ]);
        let custom = compiled
            .metrics
            .iter()
            .map(|(name, query)| (name.clone(), self.rows(query)))
            .collect();
        (system, custom)
    }

    /// How many rows `query` returns over the snapshot.
    fn rows(&self, query: &query::Query) -> u64 {
        let twins = self.of(query.source);
        if !query.is_aggregate() {
            let limit = query.top.unwrap_or(u64::MAX);
            let matching = twins.iter().filter(|doc| query.matches(doc)).count() as u64;
            return matching.min(limit);
        }
        // Parsed queries always execute; an error would be a bug, counted as no rows.
        query::execute(query, twins.iter().map(|doc| &**doc))
            .map(|rows| rows.len() as u64)
            .unwrap_or(0)
    }
}

/// A twin document's status for configuration `id`.
pub(super) fn status_of<'a>(doc: &'a Value, id: &str) -> Option<&'a str> {
    doc.get("configurations")?.get(id)?.get("status")?.as_str()
}
