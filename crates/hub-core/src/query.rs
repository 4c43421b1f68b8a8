//! Query API wire pieces (`POST /devices/query`, `GET /jobs/v2/query`, reference §4.5): the body,
//! the paging headers and the `x-ms-item-type` values.
//!
//! Responses are JSON arrays; a page is last when `x-ms-continuation` is absent (never empty).

use serde::{Deserialize, Serialize};

use crate::device::UnknownValueError;

/// Request/response header carrying the continuation token; omit it on the last page.
pub const HEADER_CONTINUATION: &str = "x-ms-continuation";
/// Request header with the page size hint.
pub const HEADER_MAX_ITEM_COUNT: &str = "x-ms-max-item-count";
/// Response header naming the item type ([`QueryItemType`]).
pub const HEADER_ITEM_TYPE: &str = "x-ms-item-type";
/// Page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size served (current docs: ≤ 100 per page).
pub const MAX_PAGE_SIZE: usize = 100;

/// Body of `POST /devices/query`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QuerySpecification {
    /// `query`: the IoT Hub SQL text.
    pub query: String,
}

impl QuerySpecification {
    /// A body for `query`.
    pub fn new(query: impl Into<String>) -> Self {
        Self {
            query: query.into(),
        }
    }
}

/// Value of the `x-ms-item-type` response header. Sent PascalCase (C# parses it
/// case-sensitively); parsed case-insensitively (services and SDKs differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryItemType {
    /// `Twin`: `SELECT * FROM devices` / `devices.modules`.
    Twin,
    /// `DeviceJob`: `FROM devices.jobs`.
    DeviceJob,
    /// `JobResponse`: `/jobs/v2/query`.
    JobResponse,
    /// `Raw`: projections and aggregates.
    Raw,
}

impl QueryItemType {
    /// Every variant.
    pub const ALL: &'static [Self] = &[Self::Twin, Self::DeviceJob, Self::JobResponse, Self::Raw];

    /// The PascalCase header value.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Twin => "Twin",
            Self::DeviceJob => "DeviceJob",
            Self::JobResponse => "JobResponse",
            Self::Raw => "Raw",
        }
    }
}

impl std::fmt::Display for QueryItemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueryItemType {
    type Err = UnknownValueError;

    /// Case-insensitive: `twin`, `Twin` and `TWIN` all parse; surrounding spaces are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.as_str().eq_ignore_ascii_case(trimmed))
            .ok_or_else(|| UnknownValueError::new("QueryItemType", s))
    }
}

impl Serialize for QueryItemType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for QueryItemType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The page size to serve for an `x-ms-max-item-count` header value: absent, unparsable or 0
/// gives [`DEFAULT_PAGE_SIZE`]; anything larger than [`MAX_PAGE_SIZE`] is clamped.
pub fn page_size(max_item_count: Option<&str>) -> usize {
    match max_item_count.and_then(|v| v.trim().parse::<u64>().ok()) {
        None | Some(0) => DEFAULT_PAGE_SIZE,
        Some(n) => usize::try_from(n).map_or(MAX_PAGE_SIZE, |n| n.min(MAX_PAGE_SIZE)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    #[test]
    fn query_bodies_round_trip() {
        // Reference §7.5 query_iot_hub bodies.
        for text in [
            r#"{"query": "SELECT * FROM devices WHERE tags.building = '43'"}"#,
            r#"{"query": "SELECT * FROM devices"}"#,
        ] {
            let original: Value = serde_json::from_str(text).unwrap();
            let q: QuerySpecification = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_value(&q).unwrap(), original);
        }
        assert_eq!(
            serde_json::to_string(&QuerySpecification::new("SELECT * FROM devices.jobs")).unwrap(),
            r#"{"query":"SELECT * FROM devices.jobs"}"#
        );
        assert!(serde_json::from_str::<QuerySpecification>("{}").is_err());
        // Unknown keys are ignored.
        let q: QuerySpecification = serde_json::from_str(r#"{"query":"q","x":1}"#).unwrap();
        assert_eq!(q.query, "q");
    }

    #[test]
    fn item_type_is_pascal_case_out_and_any_case_in() {
        let out: Vec<String> = QueryItemType::ALL.iter().map(|t| t.to_string()).collect();
        assert_eq!(out, ["Twin", "DeviceJob", "JobResponse", "Raw"]);
        for (text, want) in [
            ("twin", QueryItemType::Twin),
            ("Twin", QueryItemType::Twin),
            ("deviceJob", QueryItemType::DeviceJob),
            ("DEVICEJOB", QueryItemType::DeviceJob),
            ("jobResponse", QueryItemType::JobResponse),
            (" raw ", QueryItemType::Raw),
        ] {
            assert_eq!(text.parse::<QueryItemType>().unwrap(), want, "{text}");
        }
        assert!("unknown".parse::<QueryItemType>().is_err());
        assert!("".parse::<QueryItemType>().is_err());
        assert_eq!(
            serde_json::to_value(QueryItemType::JobResponse).unwrap(),
            json!("JobResponse")
        );
        let t: QueryItemType = serde_json::from_value(json!("deviceJob")).unwrap();
        assert_eq!(t, QueryItemType::DeviceJob);
    }

    #[test]
    fn header_names() {
        assert_eq!(HEADER_CONTINUATION, "x-ms-continuation");
        assert_eq!(HEADER_MAX_ITEM_COUNT, "x-ms-max-item-count");
        assert_eq!(HEADER_ITEM_TYPE, "x-ms-item-type");
    }

    #[test]
    fn page_size_defaults_and_clamps() {
        assert_eq!(page_size(None), 100);
        assert_eq!(page_size(Some("10")), 10);
        assert_eq!(page_size(Some(" 5 ")), 5);
        assert_eq!(page_size(Some("0")), 100);
        assert_eq!(page_size(Some("1000")), 100);
        assert_eq!(page_size(Some("99999999999999999999999")), 100);
        assert_eq!(page_size(Some("-1")), 100);
        assert_eq!(page_size(Some("ten")), 100);
    }

    proptest! {
        #[test]
        fn random_text_never_panics(s in "\\PC*") {
            let _ = serde_json::from_str::<QuerySpecification>(&s);
            let _ = s.parse::<QueryItemType>();
            let n = page_size(Some(&s));
            prop_assert!((1..=MAX_PAGE_SIZE).contains(&n));
        }
    }
}
