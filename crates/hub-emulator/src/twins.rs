//! Twin sections as IoT Hub keeps them: merge patches with `null` deletes, `$version`, and
//! `$metadata` (`$lastUpdated` at every object level, plus `$lastUpdatedVersion` for desired).
//!
//! Pure functions over JSON maps; the hub decides when to call them and persists the result.

use serde_json::{Map, Value};

/// Maximum nesting of twin objects (IoT Hub counts the section root as level 1).
pub const MAX_DEPTH: usize = 10;
/// Maximum size of `tags`.
pub const MAX_TAGS_BYTES: usize = 8 * 1024;
/// Maximum size of `properties.desired` or `properties.reported` (without `$` members).
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Maximum length of one string value.
pub const MAX_STRING_BYTES: usize = 4 * 1024;
/// Largest integer IoT Hub stores exactly.
pub const MAX_SAFE_INT: i64 = 4_503_599_627_370_495;

/// How error texts name the twin's parts: one spelling for REST updates, jobs and devices, so a
/// client sees the same words whichever way its update arrived.
pub const TAGS: &str = "tags";
/// See [`TAGS`].
pub const DESIRED: &str = "properties.desired";
/// See [`TAGS`].
pub const REPORTED: &str = "properties.reported";

/// A patch or document IoT Hub would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// A patch was not a JSON object.
    #[error("{section} must be a JSON object, got {found}")]
    NotAnObject {
        section: &'static str,
        found: &'static str,
    },
    /// A property name breaks IoT Hub's rules.
    #[error(
        "property name `{name}` in {section} is not allowed: names may not be empty or contain `.`, `$`, spaces or control characters"
    )]
    BadName { section: &'static str, name: String },
    /// The document nests too deeply.
    #[error("{section} nests deeper than {MAX_DEPTH} levels")]
    TooDeep { section: &'static str },
    /// The section is over its size limit.
    #[error("{section} would be {size} bytes, over IoT Hub's limit of {limit} bytes")]
    TooLarge {
        section: &'static str,
        size: usize,
        limit: usize,
    },
    /// A value is outside what IoT Hub stores.
    #[error("value of `{name}` in {section} is not allowed: {reason}")]
    BadValue {
        section: &'static str,
        name: String,
        reason: &'static str,
    },
    /// A service update tried to write what only the device writes.
    #[error(
        "{REPORTED} is written by the device; a service update may set only {TAGS} and {DESIRED}"
    )]
    ReportedByService,
    /// A service update with neither tags nor desired properties (refused where a change is
    /// required, e.g. a twin job).
    #[error("the twin update must set {TAGS} and/or {DESIRED}")]
    NothingToUpdate,
}

/// A JSON value's kind, for error messages (`an object`, `a string`, ...).
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks a patch (nulls allowed) against IoT Hub's name, depth and value rules.
pub fn validate_patch(section: &'static str, patch: &Value) -> Result<(), TwinError> {
    let Value::Object(map) = patch else {
        return Err(TwinError::NotAnObject {
            section,
            found: kind(patch),
        });
    };
    validate_map(section, map, 1)
}

fn validate_map(
    section: &'static str,
    map: &Map<String, Value>,
    depth: usize,
) -> Result<(), TwinError> {
    if depth > MAX_DEPTH {
        return Err(TwinError::TooDeep { section });
    }
    for (name, value) in map {
        if name.is_empty()
            || name.len() > 1024
            || name
                .chars()
                .any(|c| c == '.' || c == '$' || c == ' ' || c.is_control())
        {
            return Err(TwinError::BadName {
                section,
                name: name.clone(),
            });
        }
        validate_value(section, name, value, depth)?;
    }
    Ok(())
}

fn validate_value(
    section: &'static str,
    name: &str,
    value: &Value,
    depth: usize,
) -> Result<(), TwinError> {
    match value {
        Value::Object(inner) => validate_map(section, inner, depth + 1),
        Value::String(s) if s.len() > MAX_STRING_BYTES => Err(TwinError::BadValue {
            section,
            name: name.to_owned(),
            reason: "strings are limited to 4 KB",
        }),
        Value::Number(n)
            if n.as_i64()
                .is_some_and(|i| !(-MAX_SAFE_INT - 1..=MAX_SAFE_INT).contains(&i)) =>
        {
            Err(TwinError::BadValue {
                section,
                name: name.to_owned(),
                reason: "integers must lie within [-4503599627370496, 4503599627370495]",
            })
        }
        Value::Array(items) => {
            for item in items {
                validate_value(section, name, item, depth + 1)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// IoT Hub's size of a section, `$` members excluded.
///
/// Source: Microsoft Learn, "Understand and use device twins in IoT Hub", section "Device twin
/// size" (https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-device-twins#device-twin-size):
/// tags are limited to 8 KB and `properties/desired`, `properties/reported` to 32 KB each,
/// read-only elements (`$etag`, `$version`, `$metadata`) not counted; for each property the
/// length of its key and of its value are added up, keys as UTF-8 strings, simple values as
/// strings, numbers (8 bytes) or booleans (4 bytes), nested objects as the sum of what they
/// contain. The docs do not count JSON punctuation or whitespace, so neither does this.
///
/// Two points the docs leave open or that would let a twin grow without bound while weighing
/// nothing are decided here on the safe side (see [`value_size`]).
pub fn section_size(map: &Map<String, Value>) -> usize {
    map.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| k.len() + value_size(v))
        .sum()
}

/// The size of one value under the rule in [`section_size`].
///
/// - Strings count every character. The docs exclude Unicode control characters (C0 and C1)
///   from the count; the emulator counts them, since otherwise a string of 4 KB of control
///   characters weighs nothing and a section of such properties stores far over its limit (it
///   can only make the emulator refuse, earlier than IoT Hub, a twin made mostly of control
///   characters).
/// - Array elements have no key to carry a size and the docs' rule (written when twins had no
///   arrays) gives none, so each element weighs its value but at least 1: an array of `""`,
///   `{}` or `[]` grows with its length instead of staying free. A named property is already
///   bounded by its key (names are never empty), so `{"a": ""}` still weighs 1 as documented.
/// - `null`, which a stored section holds only inside arrays, weighs 1.
fn value_size(value: &Value) -> usize {
    match value {
        Value::Null => 1,
        Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(|item| value_size(item).max(1)).sum(),
        Value::Object(map) => section_size(map),
    }
}

/// Merges `patch` into `target` (JSON merge patch: `null` deletes, objects merge).
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => match target.get_mut(key) {
                Some(Value::Object(existing)) => merge(existing, inner),
                _ => {
                    let mut fresh = Map::new();
                    merge(&mut fresh, inner);
                    target.insert(key.clone(), Value::Object(fresh));
                }
            },
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

fn metadata_for(value: &Value, now: &str, version: Option<u64>) -> Value {
    let mut meta = Map::new();
    meta.insert("$lastUpdated".into(), Value::String(now.to_owned()));
    if let Some(v) = version {
        meta.insert("$lastUpdatedVersion".into(), Value::from(v));
    }
    if let Value::Object(map) = value {
        for (key, inner) in map {
            meta.insert(key.clone(), metadata_for(inner, now, version));
        }
    }
    Value::Object(meta)
}

fn merge_with_metadata(
    values: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                values.remove(key);
                meta.remove(key);
            }
            Value::Object(inner) if matches!(values.get(key), Some(Value::Object(_))) => {
                if let Some(Value::Object(existing)) = values.get_mut(key) {
                    let entry = meta
                        .entry(key.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if !entry.is_object() {
                        *entry = Value::Object(Map::new());
                    }
                    if let Value::Object(child_meta) = entry {
                        merge_with_metadata(existing, child_meta, inner, now, version);
                    }
                }
            }
            other => {
                let mut stored = other.clone();
                if let Value::Object(map) = &mut stored {
                    // A new object may itself contain nulls: they mean "absent".
                    let mut clean = Map::new();
                    merge(&mut clean, map);
                    *map = clean;
                }
                meta.insert(key.clone(), metadata_for(&stored, now, version));
                values.insert(key.clone(), stored);
            }
        }
    }
    meta.insert("$lastUpdated".into(), Value::String(now.to_owned()));
    if let Some(v) = version {
        meta.insert("$lastUpdatedVersion".into(), Value::from(v));
    }
}

/// Which twin section a patch targets; desired metadata carries `$lastUpdatedVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `properties.desired`, written by the service.
    Desired,
    /// `properties.reported`, written by the device.
    Reported,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::Desired => DESIRED,
            Section::Reported => REPORTED,
        }
    }
}

/// An empty section at version 1 with metadata, as a new device's twin has.
pub fn new_section(now: &str, section: Section) -> Map<String, Value> {
    let version = matches!(section, Section::Desired).then_some(1);
    let mut map = Map::new();
    map.insert(
        "$metadata".into(),
        metadata_for(&Value::Object(Map::new()), now, version),
    );
    map.insert("$version".into(), Value::from(1u64));
    map
}

/// The section's `$version`.
pub fn version_of(section: &Map<String, Value>) -> u64 {
    section.get("$version").and_then(Value::as_u64).unwrap_or(1)
}

/// Applies `patch` to a section (keeping `$metadata`, bumping `$version`), checking limits.
/// Returns the new `$version`. On error the section is unchanged.
pub fn apply_patch(
    current: &mut Map<String, Value>,
    patch: &Value,
    section: Section,
    now: &str,
) -> Result<u64, TwinError> {
    validate_patch(section.name(), patch)?;
    let Value::Object(patch) = patch else {
        return Err(TwinError::NotAnObject {
            section: section.name(),
            found: kind(patch),
        });
    };
    let mut next = current.clone();
    let version = version_of(&next) + 1;
    let mut meta = match next.remove("$metadata") {
        Some(Value::Object(meta)) => meta,
        _ => Map::new(),
    };
    next.remove("$version");
    let meta_version = matches!(section, Section::Desired).then_some(version);
    merge_with_metadata(&mut next, &mut meta, patch, now, meta_version);
    let size = section_size(&next);
    if size > MAX_SECTION_BYTES {
        return Err(TwinError::TooLarge {
            section: section.name(),
            size,
            limit: MAX_SECTION_BYTES,
        });
    }
    next.insert("$metadata".into(), Value::Object(meta));
    next.insert("$version".into(), Value::from(version));
    *current = next;
    Ok(version)
}

/// Replaces a section's properties wholesale (service `PUT /twins`), bumping `$version`.
/// Returns the new version and the patch a connected device should receive (removed
/// properties as `null`).
pub fn replace_section(
    current: &mut Map<String, Value>,
    replacement: &Value,
    section: Section,
    now: &str,
) -> Result<(u64, Map<String, Value>), TwinError> {
    validate_patch(section.name(), replacement)?;
    let Value::Object(replacement) = replacement else {
        return Err(TwinError::NotAnObject {
            section: section.name(),
            found: kind(replacement),
        });
    };
    let mut patch: Map<String, Value> = replacement
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for key in current.keys().filter(|k| !k.starts_with('$')) {
        if !patch.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    let version = apply_patch(current, &Value::Object(patch.clone()), section, now)?;
    Ok((version, patch))
}

/// Merges a tags patch, checking names and the 8 KB limit. On error tags are unchanged.
pub fn apply_tags(tags: &mut Map<String, Value>, patch: &Value) -> Result<(), TwinError> {
    validate_patch(TAGS, patch)?;
    let Value::Object(patch) = patch else {
        return Err(TwinError::NotAnObject {
            section: TAGS,
            found: kind(patch),
        });
    };
    let mut next = tags.clone();
    merge(&mut next, patch);
    let size = section_size(&next);
    if size > MAX_TAGS_BYTES {
        return Err(TwinError::TooLarge {
            section: TAGS,
            size,
            limit: MAX_TAGS_BYTES,
        });
    }
    *tags = next;
    Ok(())
}

/// The parts of a service twin update (`PATCH`/`PUT /twins/{id}`, a job's `updateTwin`) that
/// change the twin; `null` or absent parts are `None`. Both are JSON objects when present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceUpdate<'a> {
    /// The `tags` patch or replacement.
    pub tags: Option<&'a Value>,
    /// The `properties.desired` patch or replacement.
    pub desired: Option<&'a Value>,
}

impl ServiceUpdate<'_> {
    /// Whether the update sets neither tags nor desired properties.
    pub fn is_empty(&self) -> bool {
        self.tags.is_none() && self.desired.is_none()
    }
}

/// Validates a service twin update: the one check behind REST twin updates, twin job requests
/// and twin job execution, so all three accept and refuse the same bodies with the same words.
/// Other members (`deviceId`, `etag`, `version`, ...) are ignored, as a full twin document is a
/// valid update. Size limits are checked on the parts alone here (a merge can only keep or add
/// to what the patch sets); the size after merging is checked when the update is applied.
pub fn parse_service_update(body: &Value) -> Result<ServiceUpdate<'_>, TwinError> {
    let Value::Object(map) = body else {
        return Err(TwinError::NotAnObject {
            section: "the twin update",
            found: kind(body),
        });
    };
    let tags = map.get("tags").filter(|v| !v.is_null());
    let desired = match map.get("properties").filter(|v| !v.is_null()) {
        None => None,
        Some(Value::Object(props)) => {
            // `reported: {}` is accepted, anything more is refused. Source: the official C#
            // service SDK (Azure/azure-iot-sdk-csharp shared/src/TwinProperties.cs creates
            // `Reported` as an empty collection and TwinJsonConverter.WriteJson writes it
            // whenever it is not null), so `RegistryManager.UpdateTwinAsync(id, new Twin{..})`
            // and `JobClient.ScheduleTwinUpdateAsync(.., twin, ..)` send `"reported": {}` in
            // every update; the SDK's e2e tests (e2e/test/iothub/twin/TwinE2ETests.cs) and
            // JobsSample do exactly that against IoT Hub. Python azure-iot-hub (msrest drops a
            // `reported` left as None) and Node azure-iothub (sends the caller's patch as is)
            // send it only if the caller does. Non-empty reported properties are refused: the
            // device owns them (reference iothub-protocol.md §4.3).
            if props
                .get("reported")
                .is_some_and(|r| !r.is_null() && r.as_object().is_none_or(|o| !o.is_empty()))
            {
                return Err(TwinError::ReportedByService);
            }
            props.get("desired").filter(|v| !v.is_null())
        }
        Some(other) => {
            return Err(TwinError::NotAnObject {
                section: "properties",
                found: kind(other),
            });
        }
    };
    for (section, part, limit) in [
        (TAGS, tags, MAX_TAGS_BYTES),
        (DESIRED, desired, MAX_SECTION_BYTES),
    ] {
        if let Some(part) = part {
            validate_patch(section, part)?;
            check_patch_size(section, part, limit)?;
        }
    }
    Ok(ServiceUpdate { tags, desired })
}

/// Refuses a patch whose own non-null content is over `limit`: merging keeps all of it, so the
/// section would be over the limit whatever it holds now.
fn check_patch_size(section: &'static str, patch: &Value, limit: usize) -> Result<(), TwinError> {
    let Value::Object(patch) = patch else {
        return Ok(());
    };
    let mut kept = Map::new();
    merge(&mut kept, patch);
    let size = section_size(&kept);
    if size > limit {
        return Err(TwinError::TooLarge {
            section,
            size,
            limit,
        });
    }
    Ok(())
}

/// Whether merging `patch` into `target` (as a twin PATCH merges tags or desired properties:
/// `null` removes, an object merges into an object, anything else replaces) would change it. A
/// seed applied again at restart uses it to leave an up-to-date twin's versions alone.
pub fn patch_changes(target: &Map<String, Value>, patch: &Map<String, Value>) -> bool {
    patch
        .iter()
        .any(|(name, value)| match (value, target.get(name)) {
            (Value::Null, current) => current.is_some(),
            (Value::Object(inner), Some(Value::Object(current))) => patch_changes(current, inner),
            (value, current) => current != Some(value),
        })
}

/// A section without its `$metadata` (what devices receive in a GET twin answer keeps it out).
pub fn without_metadata(section: &Map<String, Value>) -> Map<String, Value> {
    section
        .iter()
        .filter(|(k, _)| k.as_str() != "$metadata")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn a_patch_changes_a_section_unless_it_holds_the_patch_already() {
        let current = obj(json!({"a": 1, "b": {"c": "x", "d": [1, 2]}, "$version": 4}));
        let unchanged = [
            json!({}),
            json!({"a": 1}),
            json!({"b": {"c": "x"}}),
            json!({"b": {"d": [1, 2]}, "gone": null}),
        ];
        for patch in unchanged {
            assert!(!patch_changes(&current, &obj(patch.clone())), "{patch}");
        }
        let changes = [
            json!({"a": 2}),
            json!({"a": null}),
            json!({"b": {"c": "y"}}),
            json!({"b": {"e": 1}}),
            json!({"b": {"c": null}}),
            json!({"a": {"x": 1}}),
            json!({"new": {}}),
            json!({"b": 5}),
        ];
        for patch in changes {
            assert!(patch_changes(&current, &obj(patch.clone())), "{patch}");
        }
    }

    #[test]
    fn desired_patch_bumps_version_and_records_metadata_at_every_level() {
        let mut desired = new_section("t0", Section::Desired);
        let v = apply_patch(
            &mut desired,
            &json!({"a": {"b": 1}, "c": 2}),
            Section::Desired,
            "t1",
        )
        .expect("patch");
        assert_eq!(v, 2);
        assert_eq!(desired["a"], json!({"b": 1}));
        assert_eq!(desired["$metadata"]["$lastUpdated"], "t1");
        assert_eq!(desired["$metadata"]["$lastUpdatedVersion"], 2);
        assert_eq!(desired["$metadata"]["a"]["b"]["$lastUpdated"], "t1");
        assert_eq!(desired["$metadata"]["a"]["$lastUpdatedVersion"], 2);

        let v = apply_patch(
            &mut desired,
            &json!({"a": {"d": 3}, "c": null}),
            Section::Desired,
            "t2",
        )
        .expect("patch");
        assert_eq!(v, 3);
        assert_eq!(desired["a"], json!({"b": 1, "d": 3}));
        assert!(desired.get("c").is_none());
        assert!(desired["$metadata"].get("c").is_none());
        assert_eq!(
            desired["$metadata"]["a"]["b"]["$lastUpdated"], "t1",
            "untouched leaf keeps its time"
        );
        assert_eq!(desired["$metadata"]["a"]["d"]["$lastUpdated"], "t2");
    }

    #[test]
    fn reported_metadata_has_no_version() {
        let mut reported = new_section("t0", Section::Reported);
        apply_patch(
            &mut reported,
            &json!({"fw": "1.1"}),
            Section::Reported,
            "t1",
        )
        .expect("patch");
        assert!(reported["$metadata"].get("$lastUpdatedVersion").is_none());
        assert_eq!(version_of(&reported), 2);
    }

    #[test]
    fn invalid_patches_are_refused_and_change_nothing() {
        let mut desired = new_section("t0", Section::Desired);
        let before = desired.clone();
        let cases = [
            json!([1, 2]),
            json!({"a.b": 1}),
            json!({"$x": 1}),
            json!({"has space": 1}),
            json!({"big": 4_503_599_627_370_496_i64}),
            json!({"s": "x".repeat(5000)}),
            json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":1}}}}}}}}}}}),
        ];
        for case in cases {
            assert!(
                apply_patch(&mut desired, &case, Section::Desired, "t1").is_err(),
                "{case}"
            );
            assert_eq!(desired, before);
        }
        let mut huge = Map::new();
        for i in 0..20 {
            huge.insert(format!("k{i}"), Value::String("x".repeat(4000)));
        }
        let err = apply_patch(&mut desired, &Value::Object(huge), Section::Desired, "t1")
            .expect_err("too large");
        assert!(matches!(err, TwinError::TooLarge { .. }));
    }

    #[test]
    fn replace_yields_a_patch_with_nulls_for_removed_properties() {
        let mut desired = new_section("t0", Section::Desired);
        apply_patch(
            &mut desired,
            &json!({"a": 1, "b": 2}),
            Section::Desired,
            "t1",
        )
        .expect("patch");
        let (v, patch) = replace_section(
            &mut desired,
            &json!({"b": 3, "c": 4}),
            Section::Desired,
            "t2",
        )
        .expect("replace");
        assert_eq!(v, 3);
        assert_eq!(Value::Object(patch), json!({"b": 3, "c": 4, "a": null}));
        assert_eq!(
            Value::Object(without_metadata(&desired)),
            json!({"b": 3, "c": 4, "$version": 3})
        );
    }

    #[test]
    fn service_update_returns_tags_and_desired_and_ignores_other_members() {
        // What the C# SDK's `new Twin(id)` with one tag serializes to.
        let body = json!({"deviceId": "d1", "etag": null, "version": null,
                          "tags": {"building": "43"},
                          "properties": {"desired": {}, "reported": {}}});
        let update = parse_service_update(&body).expect("C# twin update");
        assert_eq!(update.tags, Some(&json!({"building": "43"})));
        assert_eq!(update.desired, Some(&json!({})));
        let nulls = json!({"tags": null, "properties": {"desired": null, "reported": null}});
        let update = parse_service_update(&nulls).expect("nulls mean absent");
        assert!(update.is_empty());
        assert!(parse_service_update(&json!({})).expect("empty").is_empty());
    }

    #[test]
    fn service_update_refuses_with_one_wording() {
        let cases = [
            (
                json!([1]),
                "the twin update must be a JSON object, got an array",
            ),
            (
                json!({"properties": 1}),
                "properties must be a JSON object, got a number",
            ),
            (
                json!({"tags": "x"}),
                "tags must be a JSON object, got a string",
            ),
            (
                json!({"properties": {"desired": [1]}}),
                "properties.desired must be a JSON object, got an array",
            ),
            (
                json!({"properties": {"reported": {"x": 1}}}),
                "properties.reported is written by the device; a service update may set only tags and properties.desired",
            ),
            (
                json!({"properties": {"reported": 1}}),
                "properties.reported is written by the device; a service update may set only tags and properties.desired",
            ),
            (
                json!({"properties": {"desired": {"$version": 3}}}),
                "property name `$version` in properties.desired is not allowed: names may not be empty or contain `.`, `$`, spaces or control characters",
            ),
            (
                json!({"tags": {"a.b": 1}}),
                "property name `a.b` in tags is not allowed: names may not be empty or contain `.`, `$`, spaces or control characters",
            ),
            (
                json!({"tags": {"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":1}}}}}}}}}}}}),
                "tags nests deeper than 10 levels",
            ),
        ];
        for (body, expected) in cases {
            let err = parse_service_update(&body).expect_err(expected);
            assert_eq!(err.to_string(), expected, "{body}");
        }
        let big =
            json!({"tags": {"a": "x".repeat(4000), "b": "x".repeat(4000), "c": "x".repeat(500)}});
        assert!(matches!(
            parse_service_update(&big),
            Err(TwinError::TooLarge { section: TAGS, .. })
        ));
        // Deletes cost nothing: a patch of nulls is within any limit.
        let mut deletes = Map::new();
        for i in 0..10_000 {
            deletes.insert(format!("k{i}"), Value::Null);
        }
        let body = json!({"properties": {"desired": Value::Object(deletes)}});
        parse_service_update(&body).expect("deletes only");
    }

    #[test]
    fn device_reported_patches_follow_the_same_property_rules() {
        let mut reported = new_section("t0", Section::Reported);
        for (patch, expected) in [
            (
                json!({"$x": 1}),
                "property name `$x` in properties.reported is not allowed: names may not be empty or contain `.`, `$`, spaces or control characters",
            ),
            (
                json!(1),
                "properties.reported must be a JSON object, got a number",
            ),
        ] {
            let err =
                apply_patch(&mut reported, &patch, Section::Reported, "t1").expect_err("refused");
            assert_eq!(err.to_string(), expected);
        }
        // The desired twin of the same patch fails with the same text but its own section.
        let err = parse_service_update(&json!({"properties": {"desired": {"$x": 1}}}))
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "property name `$x` in properties.desired is not allowed: names may not be empty or contain `.`, `$`, spaces or control characters"
        );
    }

    #[test]
    fn empty_array_elements_and_control_characters_add_up() {
        // Each element of an array weighs at least 1, whatever it holds.
        for element in [json!(""), json!({}), json!([]), json!(null)] {
            let items = vec![element.clone(); 10_000];
            let tags = obj(json!({ "a": items }));
            assert_eq!(section_size(&tags), 1 + 10_000, "{element}");
        }
        // Control characters count like any other character.
        let tags = obj(json!({"a": "\u{1}\u{9f}".repeat(10)}));
        assert_eq!(section_size(&tags), 1 + 20);
        // Named properties weigh their key even with an empty value, as documented.
        assert_eq!(section_size(&obj(json!({"ab": "", "c": {}, "d": []}))), 4);
        assert_eq!(
            section_size(&obj(json!({"a": 1, "b": true, "c": "xyz"}))),
            18
        );
    }

    #[test]
    fn patches_of_empty_values_are_refused_over_the_limit() {
        let mut tags = Map::new();
        let empties = json!({"a": vec![json!({}); 10_000]});
        assert!(matches!(
            apply_tags(&mut tags, &empties),
            Err(TwinError::TooLarge {
                section: TAGS,
                size: 10_001,
                limit: MAX_TAGS_BYTES
            })
        ));
        let body = json!({"properties": {"desired": {"a": vec![json!(""); 40_000]}}});
        assert!(matches!(
            parse_service_update(&body),
            Err(TwinError::TooLarge {
                section: DESIRED,
                ..
            })
        ));
        let mut reported = new_section("t0", Section::Reported);
        let controls = json!({"a": "\u{1}".repeat(4096), "b": "\u{1}".repeat(4096),
                              "c": "\u{1}".repeat(4096), "d": "\u{1}".repeat(4096),
                              "e": "\u{1}".repeat(4096), "f": "\u{1}".repeat(4096),
                              "g": "\u{1}".repeat(4096), "h": "\u{1}".repeat(4096)});
        assert!(matches!(
            apply_patch(&mut reported, &controls, Section::Reported, "t1"),
            Err(TwinError::TooLarge {
                section: REPORTED,
                ..
            })
        ));
        assert!(tags.is_empty());
        assert_eq!(version_of(&reported), 1);
    }

    #[test]
    fn sections_at_the_limit_pass_and_one_byte_over_fails() {
        // Tags: 1 + 4095 + 1 + 4095 elements = 8192 bytes exactly.
        let at = json!({"a": "x".repeat(4095), "b": vec![json!(""); 4095]});
        let mut tags = Map::new();
        apply_tags(&mut tags, &at).expect("at the limit");
        assert_eq!(section_size(&tags), MAX_TAGS_BYTES);
        let over = json!({"b": vec![json!(""); 4096]});
        assert!(matches!(
            apply_tags(&mut tags, &over),
            Err(TwinError::TooLarge { size: 8193, .. })
        ));
        // Desired: 8 x (1 + 4095) = 32768 bytes exactly, then one more array element.
        let mut patch = Map::new();
        for name in ["a", "b", "c", "d", "e", "f", "g"] {
            patch.insert(name.into(), Value::String("x".repeat(4095)));
        }
        patch.insert("h".into(), json!(vec![json!({}); 4095]));
        let mut desired = new_section("t0", Section::Desired);
        apply_patch(&mut desired, &Value::Object(patch), Section::Desired, "t1")
            .expect("at the limit");
        assert_eq!(section_size(&desired), MAX_SECTION_BYTES);
        let err = apply_patch(
            &mut desired,
            &json!({"h": vec![json!({}); 4096]}),
            Section::Desired,
            "t2",
        )
        .expect_err("one byte over");
        assert_eq!(
            err,
            TwinError::TooLarge {
                section: DESIRED,
                size: MAX_SECTION_BYTES + 1,
                limit: MAX_SECTION_BYTES
            }
        );
    }

    #[test]
    fn tags_merge_and_limit() {
        let mut tags = obj(json!({"building": "43", "floor": 1}));
        apply_tags(&mut tags, &json!({"floor": null, "region": {"name": "eu"}})).expect("tags");
        assert_eq!(
            Value::Object(tags.clone()),
            json!({"building": "43", "region": {"name": "eu"}})
        );
        let big = json!({"a": "x".repeat(4000), "b": "x".repeat(4000), "c": "x".repeat(500)});
        assert!(matches!(
            apply_tags(&mut tags, &big),
            Err(TwinError::TooLarge { .. })
        ));
    }
}
