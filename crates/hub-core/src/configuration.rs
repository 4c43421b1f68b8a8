//! IoT Hub's automatic device and module configurations (`/configurations`): the
//! [`Configuration`] document, its content, metrics and the `testQueries` shapes, and the pure
//! rules a configuration obeys (its id, its content's paths, which one of several wins a twin,
//! how many a tier holds). Sources: the REST swagger shipped with azure-iothub (Node,
//! `service/src/service.json`, `Configuration`, `ConfigurationContent`, `ConfigurationMetrics`,
//! `ConfigurationQueriesTestInput`, `ConfigurationQueriesTestResponse`); Microsoft Learn,
//! "Automatic IoT device and module management" (portal and CLI versions); azure-iot-sdk-csharp
//! `shared/src/ConfigurationInfo.cs` for the twin's `configurations` status. Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tier::Tier;

/// Longest configuration id (Microsoft Learn, "Automatic IoT device and module management",
/// Create a configuration).
pub const MAX_CONFIGURATION_ID_LENGTH: usize = 128;

/// Most custom metrics one configuration may define: five (Microsoft Learn, "Automatic IoT
/// device and module management", Specify metrics).
pub const MAX_CUSTOM_METRICS: usize = 5;

/// The system metric counting twins whose target condition matches.
pub const TARGETED_COUNT: &str = "targetedCount";
/// The system metric counting twins the configuration is applied to.
pub const APPLIED_COUNT: &str = "appliedCount";

/// The twin path prefix every device or module content key starts with: content sets desired
/// properties only (`properties.desired.chillerWaterSettings` in Microsoft Learn, "Automatic
/// IoT device and module management", Specify settings).
pub const DESIRED_PREFIX: &str = "properties.desired";

/// How many configurations a hub of `tier` holds: 100 on a standard hub, 10 on a free one
/// (Microsoft Learn, "Automatic IoT device and module management", Limits, and "IoT Hub quotas
/// and throttling"; the 2019 version of the latter said 20 for free); none on basic tiers,
/// which lack automatic device management ("Choose the right IoT Hub tier").
pub fn max_configurations(tier: Tier) -> usize {
    match tier {
        Tier::F1 => 10,
        Tier::B1 | Tier::B2 | Tier::B3 => 0,
        Tier::S1 | Tier::S2 | Tier::S3 => 100,
    }
}

/// An automatic device or module configuration, as created (`PUT /configurations/{id}`) and as
/// answered. Every field is optional on the way in: the SDKs send different subsets (C# sends
/// empty maps and zero times, Python only what is set, the CLI `etag: "*"` on create).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Configuration {
    /// `id`: lowercase, see [`validate_configuration_id`].
    #[serde(default)]
    pub id: String,
    /// `schemaVersion` (the SDKs send `1.0`; the CLI `2.0`).
    #[serde(default)]
    pub schema_version: Option<String>,
    /// `labels`: string pairs, for the user's own bookkeeping.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// `content`: what the configuration sets.
    #[serde(default)]
    pub content: Option<ConfigurationContent>,
    /// `contentType` (C# sends `assignment`; not in the swagger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `targetCondition`: a twin condition (`tags.environment='prod'`, `*`), or for module
    /// content `FROM devices.modules WHERE ...`.
    #[serde(default)]
    pub target_condition: Option<String>,
    /// `createdTimeUtc` (the hub's).
    #[serde(default)]
    pub created_time_utc: Option<String>,
    /// `lastUpdatedTimeUtc` (the hub's).
    #[serde(default)]
    pub last_updated_time_utc: Option<String>,
    /// `priority`: the higher number wins a twin targeted by several configurations.
    #[serde(default)]
    pub priority: Option<i64>,
    /// `systemMetrics`: `targetedCount` and `appliedCount`, filled in by the hub.
    #[serde(default)]
    pub system_metrics: Option<ConfigurationMetrics>,
    /// `metrics`: the user's queries and, as answered, their counts.
    #[serde(default)]
    pub metrics: Option<ConfigurationMetrics>,
    /// `etag` (the hub's; ignored on create).
    #[serde(default)]
    pub etag: Option<String>,
}

/// `content`: desired properties for device twins (`deviceContent`) or module twins
/// (`moduleContent`), each keyed by twin path; `modulesContent` is an IoT Edge deployment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationContent {
    /// `deviceContent`: `properties.desired.<path>` to value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_content: Option<Map<String, Value>>,
    /// `moduleContent`: the same, for module twins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_content: Option<Map<String, Value>>,
    /// `modulesContent`: an IoT Edge deployment (module name to its twin's content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_content: Option<Map<String, Value>>,
}

/// `systemMetrics` / `metrics`: named queries and, as answered, how many rows each returns.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationMetrics {
    /// `results`: metric name to count.
    #[serde(default)]
    pub results: Option<BTreeMap<String, u64>>,
    /// `queries`: metric name to query text.
    #[serde(default)]
    pub queries: Option<BTreeMap<String, String>>,
}

/// `POST /configurations/testQueries`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationQueriesTestInput {
    /// `targetCondition` to check.
    #[serde(default)]
    pub target_condition: Option<String>,
    /// `customMetricQueries` to check, by name.
    #[serde(default)]
    pub custom_metric_queries: Option<BTreeMap<String, String>>,
}

/// `POST /configurations/testQueries`'s answer: what is wrong with each query (empty when it
/// is valid).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationQueriesTestResponse {
    /// `targetConditionError`.
    #[serde(default)]
    pub target_condition_error: String,
    /// `customMetricQueryErrors`, by metric name.
    #[serde(default)]
    pub custom_metric_query_errors: BTreeMap<String, String>,
}

/// A configuration's state on one twin (the twin's read-only `configurations` map): `Targeted`
/// when its condition matches but a configuration of higher priority won, `Applied` when its
/// content was applied (azure-iot-sdk-csharp `shared/src/ConfigurationStatus.cs`, serialized by
/// name; the applied-count query compares with `'Applied'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfigurationStatus {
    /// Matches, not applied.
    Targeted,
    /// Applied.
    Applied,
}

/// One entry of a twin's `configurations` map: `{"status": "Applied"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigurationInfo {
    /// `status`.
    pub status: ConfigurationStatus,
}

/// What a configuration's content targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    /// Device twins (`deviceContent`).
    Device,
    /// Module twins (`moduleContent`).
    Module,
}

/// Why a configuration's id or content is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigurationRuleError {
    /// The id breaks IoT Hub's rules.
    #[error("{0}")]
    Id(String),
    /// The content is not what IoT Hub accepts.
    #[error("{0}")]
    Content(String),
}

/// Checks a configuration id: 1 to 128 characters, lowercase ASCII letters, digits and
/// `- + % _ * ! '` (Microsoft Learn, "Automatic IoT device and module management", Create a
/// configuration: up to 128 lowercase letters and those special characters, no spaces; digits
/// appear in the Azure CLI's own test ids). The CLI lowercases an id before sending it, which it
/// would not need to if the hub took uppercase.
///
/// # Errors
///
/// [`ConfigurationRuleError::Id`] naming the offending character.
pub fn validate_configuration_id(id: &str) -> Result<(), ConfigurationRuleError> {
    if id.is_empty() {
        return Err(ConfigurationRuleError::Id(
            "the configuration id is empty; give 1 to 128 lowercase letters, digits or -+%_*!'"
                .into(),
        ));
    }
    let length = id.chars().count();
    if length > MAX_CONFIGURATION_ID_LENGTH {
        return Err(ConfigurationRuleError::Id(format!(
            "the configuration id is {length} characters long; the maximum is \
             {MAX_CONFIGURATION_ID_LENGTH}"
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-+%_*!'".contains(*c)))
    {
        let hint = if bad.is_ascii_uppercase() {
            " (configuration ids are lowercase)"
        } else {
            ""
        };
        return Err(ConfigurationRuleError::Id(format!(
            "the configuration id `{id}` contains `{bad}`{hint}; use lowercase letters, digits \
             and -+%_*!'"
        )));
    }
    Ok(())
}

/// The content a configuration applies: which twins (device or module) and, per content key,
/// the path under `properties.desired` and its value (`null` removes the property).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredContent {
    /// Device or module twins.
    pub kind: ContentKind,
    /// Each key's path below `properties.desired` (at least one segment) and value.
    pub settings: Vec<(Vec<String>, Value)>,
}

impl DesiredContent {
    /// Reads `content`: exactly one of `deviceContent` and `moduleContent` with at least one
    /// key, each key `properties.desired.<path>`; empty sibling maps are ignored (the C# SDK
    /// sends all three). A non-empty `modulesContent` is an IoT Edge deployment, which the
    /// emulator does not run.
    ///
    /// # Errors
    ///
    /// [`ConfigurationRuleError::Content`] naming the key or section at fault.
    pub fn parse(content: Option<&ConfigurationContent>) -> Result<Self, ConfigurationRuleError> {
        let fail = |message: String| Err(ConfigurationRuleError::Content(message));
        let Some(content) = content else {
            return fail(
                "the configuration has no content; give content.deviceContent (or \
                 content.moduleContent) with properties.desired.<name> keys"
                    .into(),
            );
        };
        let non_empty =
            |map: &Option<Map<String, Value>>| map.as_ref().is_some_and(|m| !m.is_empty());
        if non_empty(&content.modules_content) {
            return fail(
                "content.modulesContent is an IoT Edge deployment, which hub-emulator does not \
                 run; use content.deviceContent or content.moduleContent"
                    .into(),
            );
        }
        let (kind, map) = match (
            non_empty(&content.device_content),
            non_empty(&content.module_content),
        ) {
            (true, true) => {
                return fail(
                    "the configuration has both content.deviceContent and content.moduleContent; \
                     a configuration targets device twins or module twins, not both"
                        .into(),
                );
            }
            (true, false) => (ContentKind::Device, &content.device_content),
            (false, true) => (ContentKind::Module, &content.module_content),
            (false, false) => {
                return fail(
                    "the configuration's content is empty; give content.deviceContent (or \
                     content.moduleContent) with properties.desired.<name> keys"
                        .into(),
                );
            }
        };
        let section = match kind {
            ContentKind::Device => "deviceContent",
            ContentKind::Module => "moduleContent",
        };
        let mut settings = Vec::new();
        for (key, value) in map.iter().flatten() {
            let path = desired_path(key).ok_or_else(|| {
                ConfigurationRuleError::Content(format!(
                    "content.{section} key `{key}` is not a desired property path; keys are \
                     `properties.desired.<name>` (dots separate nested names)"
                ))
            })?;
            settings.push((path, value.clone()));
        }
        // In path order, so that content sent again with its keys in another order compares
        // equal (an update must not change it).
        settings.sort_by(|a, b| a.0.cmp(&b.0));
        // Two keys where one is a prefix of the other would set the same property twice.
        for (i, (a, _)) in settings.iter().enumerate() {
            for (b, _) in &settings[i + 1..] {
                let n = a.len().min(b.len());
                if a[..n] == b[..n] {
                    return fail(format!(
                        "content.{section} sets `properties.desired.{}` and \
                         `properties.desired.{}`, and one contains the other; keep one",
                        a.join("."),
                        b.join(".")
                    ));
                }
            }
        }
        Ok(DesiredContent { kind, settings })
    }
}

/// The segments of `key` below `properties.desired`, if it is `properties.desired.<a>[.<b>...]`
/// with no empty segment.
fn desired_path(key: &str) -> Option<Vec<String>> {
    let rest = key.strip_prefix(DESIRED_PREFIX)?.strip_prefix('.')?;
    let segments: Vec<String> = rest.split('.').map(str::to_owned).collect();
    if segments.iter().any(String::is_empty) {
        return None;
    }
    Some(segments)
}

/// The text of a module target condition after its `FROM devices.modules WHERE` (case and
/// spacing as IoT Hub reads them), or `None` when it does not start so: a module
/// configuration's condition starts with `from devices.modules where` (Microsoft Learn,
/// "Automatic IoT device and module management", Target modules; the Azure CLI checks the same
/// prefix case-insensitively).
pub fn module_condition(target_condition: &str) -> Option<&str> {
    let mut rest = target_condition.trim_start();
    for word in ["from", "devices.modules", "where"] {
        let head = rest.get(..word.len())?;
        if !head.eq_ignore_ascii_case(word) {
            return None;
        }
        rest = &rest[word.len()..];
        if !rest.starts_with(char::is_whitespace) {
            return None;
        }
        rest = rest.trim_start();
    }
    Some(rest)
}

/// The system metrics' queries IoT Hub shows for a configuration (the shape of the ones in
/// Microsoft's samples: `select deviceId from devices where configurations.[[id]].status =
/// 'Applied'`).
pub fn system_metric_queries(
    id: &str,
    kind: ContentKind,
    target_condition: &str,
) -> BTreeMap<String, String> {
    let (select, from) = match kind {
        ContentKind::Device => ("deviceId", "devices"),
        ContentKind::Module => ("deviceId, moduleId", "devices.modules"),
    };
    let condition = match kind {
        ContentKind::Device => target_condition.trim(),
        ContentKind::Module => module_condition(target_condition).unwrap_or_default(),
    };
    let targeted = if condition.is_empty() {
        String::new()
    } else if condition == "*" {
        format!("select {select} from {from}")
    } else {
        format!("select {select} from {from} where {condition}")
    };
    BTreeMap::from([
        (TARGETED_COUNT.to_owned(), targeted),
        (
            APPLIED_COUNT.to_owned(),
            format!("select {select} from {from} where configurations.[[{id}]].status = 'Applied'"),
        ),
    ])
}

/// Orders two configurations that both target a twin: the one that wins comes first. The
/// highest priority is applied, and of equal priorities the one created most recently
/// (Microsoft Learn, "Automatic IoT device and module management", Priority; azure-iothub
/// `configuration.ts` documents `priority` the same way). Creation times are IoT Hub's
/// `2024-01-01T00:00:00.000Z` strings (text order is time order); ids break exact ties so the
/// order is total.
pub fn precedence(
    (a_priority, a_created, a_id): (i64, &str, &str),
    (b_priority, b_created, b_id): (i64, &str, &str),
) -> std::cmp::Ordering {
    b_priority
        .cmp(&a_priority)
        .then_with(|| b_created.cmp(a_created))
        .then_with(|| a_id.cmp(b_id))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_follow_iot_hubs_rules() {
        for good in ["firmware-update", "c12", "a+b%c_d*e!f'g", &"a".repeat(128)] {
            assert!(validate_configuration_id(good).is_ok(), "{good}");
        }
        let upper = validate_configuration_id("Firmware")
            .unwrap_err()
            .to_string();
        assert!(
            upper.contains("`F`") && upper.contains("lowercase"),
            "{upper}"
        );
        for bad in ["", "a b", "a/b", "a[b", &"a".repeat(129)] {
            assert!(validate_configuration_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn content_is_read_as_desired_paths() {
        let content: ConfigurationContent = serde_json::from_value(json!({
            "deviceContent": {
                "properties.desired.firmware": {"version": "2.0"},
                "properties.desired.chiller.temperature": 66,
            },
            "moduleContent": {},
            "modulesContent": {},
        }))
        .unwrap();
        let parsed = DesiredContent::parse(Some(&content)).unwrap();
        assert_eq!(parsed.kind, ContentKind::Device);
        assert_eq!(
            parsed.settings,
            vec![
                (
                    vec!["chiller".to_owned(), "temperature".to_owned()],
                    json!(66)
                ),
                (vec!["firmware".to_owned()], json!({"version": "2.0"})),
            ]
        );
    }

    #[test]
    fn bad_content_is_refused_with_the_key_named() {
        let refused = |content: Value| {
            let content: ConfigurationContent = serde_json::from_value(content).unwrap();
            DesiredContent::parse(Some(&content))
                .unwrap_err()
                .to_string()
        };
        assert!(refused(json!({"deviceContent": {"tags.x": 1}})).contains("`tags.x`"));
        assert!(refused(json!({"deviceContent": {"properties.desired": 1}})).contains("path"));
        assert!(refused(json!({"deviceContent": {"properties.desired..a": 1}})).contains("path"));
        assert!(refused(json!({})).contains("empty"));
        assert!(refused(json!({"modulesContent": {"$edgeAgent": {}}})).contains("IoT Edge"));
        assert!(
            refused(json!({"deviceContent": {"properties.desired.a": 1},
                           "moduleContent": {"properties.desired.b": 1}}))
            .contains("both")
        );
        assert!(
            refused(json!({"deviceContent": {"properties.desired.a": {"b": 1},
                                             "properties.desired.a.b": 2}}))
            .contains("contains the other")
        );
        assert!(DesiredContent::parse(None).is_err());
    }

    #[test]
    fn module_conditions_need_their_prefix() {
        assert_eq!(
            module_condition("FROM devices.modules WHERE moduleId = 'm'"),
            Some("moduleId = 'm'")
        );
        assert_eq!(
            module_condition("  from  devices.modules\twhere tags.a = 1"),
            Some("tags.a = 1")
        );
        assert_eq!(module_condition("tags.a = 1"), None);
        assert_eq!(module_condition("from devices where tags.a = 1"), None);
        assert_eq!(module_condition("from devices.moduleswhere x"), None);
    }

    #[test]
    fn higher_priority_then_newer_wins() {
        use std::cmp::Ordering::{Greater, Less};
        let old = "2024-01-01T00:00:00.000Z";
        let new = "2024-06-01T00:00:00.000Z";
        assert_eq!(precedence((10, old, "a"), (5, new, "b")), Less);
        assert_eq!(precedence((5, old, "a"), (5, new, "b")), Greater);
        assert_eq!(precedence((5, new, "a"), (5, new, "b")), Less);
    }

    #[test]
    fn system_metric_queries_name_the_configuration() {
        let queries = system_metric_queries("fw", ContentKind::Device, "tags.env='prod'");
        assert_eq!(
            queries[TARGETED_COUNT],
            "select deviceId from devices where tags.env='prod'"
        );
        assert_eq!(
            queries[APPLIED_COUNT],
            "select deviceId from devices where configurations.[[fw]].status = 'Applied'"
        );
        let modules = system_metric_queries(
            "m",
            ContentKind::Module,
            "FROM devices.modules WHERE moduleId='x'",
        );
        assert!(
            modules[TARGETED_COUNT].starts_with("select deviceId, moduleId from devices.modules")
        );
        assert_eq!(
            system_metric_queries("e", ContentKind::Device, "")[TARGETED_COUNT],
            ""
        );
    }

    #[test]
    fn a_twins_status_is_written_by_name() {
        let info = ConfigurationInfo {
            status: ConfigurationStatus::Applied,
        };
        assert_eq!(
            serde_json::to_value(info).unwrap(),
            json!({"status": "Applied"})
        );
    }
}
