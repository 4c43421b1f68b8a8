//! Device-side MQTT topic names and subscription filters of IoT Hub (reference §3.4-3.7) as
//! typed enums with `parse` and `Display`. Invariant: `Topic::parse(&t.to_string()) == Ok(t)`
//! for every value whose ids are valid IoT Hub ids; method names, `$rid` and property bags are
//! percent-decoded on parse and encoded on display, as the Python SDK does.

use std::fmt;
use std::str::FromStr;

use percent_encoding::{percent_decode_str, utf8_percent_encode};

use crate::sas::PY_QUOTE_SAFE_NONE;

/// Message properties from a telemetry or C2D property bag, decoded, in topic order. A key
/// without `=` (IoT Hub's encoding of a null value) decodes with an empty value.
pub type Properties = Vec<(String, String)>;

/// A device-side topic name (not a filter).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Hub → device: `$iothub/methods/POST/{name}/?$rid={rid}`.
    MethodRequest {
        /// Method name, percent-decoded.
        name: String,
        /// Request id to echo in the response.
        rid: String,
    },
    /// Device → hub: `$iothub/methods/res/{status}/?$rid={rid}`.
    MethodResponse {
        /// Status chosen by the device (any integer).
        status: i32,
        /// Request id from the method request.
        rid: String,
    },
    /// Device → hub: `$iothub/twin/GET/?$rid={rid}`.
    TwinGet {
        /// Request id.
        rid: String,
    },
    /// Device → hub: `$iothub/twin/PATCH/properties/reported/?$rid={rid}`.
    TwinPatchReported {
        /// Request id.
        rid: String,
    },
    /// Hub → device: `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`.
    TwinResponse {
        /// HTTP-like status (200, 204, 400, 429, 5xx).
        status: u16,
        /// Request id of the GET or PATCH.
        rid: String,
        /// New reported `$version` (PATCH responses).
        version: Option<u64>,
    },
    /// Hub → device: `$iothub/twin/PATCH/properties/desired/?$version={v}`.
    TwinDesiredPatch {
        /// New desired `$version`.
        version: u64,
    },
    /// Device → hub: `devices/{id}[/modules/{m}]/messages/events/{property bag}`.
    Telemetry {
        /// Device id.
        device_id: String,
        /// Module id for module identities.
        module_id: Option<String>,
        /// System (`$.mid`, ...) and application properties.
        properties: Properties,
    },
    /// Hub → device: `devices/{id}/messages/devicebound/{property bag}`.
    C2d {
        /// Device id.
        device_id: String,
        /// System (`$.mid`, `$.to`, ...) and application properties.
        properties: Properties,
    },
    /// Hub → module: `devices/{id}/modules/{m}/inputs/{input}/{property bag}`.
    ModuleInput {
        /// Device id.
        device_id: String,
        /// Module id.
        module_id: String,
        /// Input name.
        input: String,
        /// Message properties.
        properties: Properties,
    },
}

/// A topic or filter that is not one IoT Hub's device side uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// Not a known topic shape.
    #[error(
        "topic `{topic}` is not an IoT Hub device topic; expected `$iothub/methods/...`, `$iothub/twin/...` or `devices/{{id}}/messages/...`"
    )]
    Unrecognised {
        /// The topic.
        topic: String,
    },
    /// Not a known subscription filter.
    #[error(
        "topic filter `{topic}` is not supported by IoT Hub; expected `$iothub/methods/POST/#`, `$iothub/twin/res/#`, `$iothub/twin/PATCH/properties/desired/#`, `devices/{{id}}/messages/devicebound/#` or `devices/{{id}}/modules/{{id}}/inputs/#`"
    )]
    UnsupportedFilter {
        /// The filter.
        topic: String,
    },
    /// A required query parameter is missing.
    #[error("topic `{topic}` lacks the `{param}` parameter")]
    MissingParam {
        /// The topic.
        topic: String,
        /// `$rid` or `$version`.
        param: &'static str,
    },
    /// A parameter or path segment has the wrong shape.
    #[error("topic `{topic}` has an invalid {what}; expected {expected}")]
    Invalid {
        /// The topic.
        topic: String,
        /// What part is wrong.
        what: &'static str,
        /// What it should be.
        expected: &'static str,
    },
}

fn encode(s: &str) -> impl fmt::Display + '_ {
    utf8_percent_encode(s, PY_QUOTE_SAFE_NONE)
}

fn write_bag(f: &mut fmt::Formatter<'_>, properties: &Properties) -> fmt::Result {
    for (i, (k, v)) in properties.iter().enumerate() {
        if i > 0 {
            f.write_str("&")?;
        }
        write!(f, "{}={}", encode(k), encode(v))?;
    }
    Ok(())
}

impl fmt::Display for Topic {
    /// The topic as sent on the wire; names, `$rid` and properties encoded like Python's
    /// `quote(s, safe="")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::MethodRequest { name, rid } => {
                write!(
                    f,
                    "$iothub/methods/POST/{}/?$rid={}",
                    encode(name),
                    encode(rid)
                )
            }
            Topic::MethodResponse { status, rid } => {
                write!(f, "$iothub/methods/res/{status}/?$rid={}", encode(rid))
            }
            Topic::TwinGet { rid } => write!(f, "$iothub/twin/GET/?$rid={}", encode(rid)),
            Topic::TwinPatchReported { rid } => {
                write!(
                    f,
                    "$iothub/twin/PATCH/properties/reported/?$rid={}",
                    encode(rid)
                )
            }
            Topic::TwinResponse {
                status,
                rid,
                version,
            } => {
                write!(f, "$iothub/twin/res/{status}/?$rid={}", encode(rid))?;
                match version {
                    Some(v) => write!(f, "&$version={v}"),
                    None => Ok(()),
                }
            }
            Topic::TwinDesiredPatch { version } => {
                write!(
                    f,
                    "$iothub/twin/PATCH/properties/desired/?$version={version}"
                )
            }
            Topic::Telemetry {
                device_id,
                module_id,
                properties,
            } => {
                match module_id {
                    Some(m) => write!(f, "devices/{device_id}/modules/{m}/messages/events/")?,
                    None => write!(f, "devices/{device_id}/messages/events/")?,
                }
                write_bag(f, properties)
            }
            Topic::C2d {
                device_id,
                properties,
            } => {
                write!(f, "devices/{device_id}/messages/devicebound/")?;
                write_bag(f, properties)
            }
            Topic::ModuleInput {
                device_id,
                module_id,
                input,
                properties,
            } => {
                write!(f, "devices/{device_id}/modules/{module_id}/inputs/{input}/")?;
                write_bag(f, properties)
            }
        }
    }
}

/// Parses `k=v&k2=v2` with percent-decoding of keys and values.
fn parse_bag(topic: &str, bag: &str) -> Result<Properties, TopicError> {
    if bag.is_empty() {
        return Ok(Vec::new());
    }
    bag.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((
                decode(topic, k, "property name")?,
                decode(topic, v, "property value")?,
            ))
        })
        .collect()
}

fn decode(topic: &str, s: &str, what: &'static str) -> Result<String, TopicError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| TopicError::Invalid {
            topic: topic.to_owned(),
            what,
            expected: "percent-encoded utf-8",
        })
}

/// The `$rid` and `$version` parameters of a `$iothub` topic (others are ignored).
struct Params {
    rid: Option<String>,
    version: Option<u64>,
}

fn parse_params(topic: &str, query: &str) -> Result<Params, TopicError> {
    let mut params = Params {
        rid: None,
        version: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match decode(topic, k, "parameter name")?.as_str() {
            "$rid" => params.rid = Some(decode(topic, v, "`$rid`")?),
            "$version" => {
                params.version = Some(v.parse().map_err(|_| TopicError::Invalid {
                    topic: topic.to_owned(),
                    what: "`$version`",
                    expected: "a whole number",
                })?)
            }
            _ => {}
        }
    }
    Ok(params)
}

fn require_rid(topic: &str, params: &Params) -> Result<String, TopicError> {
    params.rid.clone().ok_or_else(|| TopicError::MissingParam {
        topic: topic.to_owned(),
        param: "$rid",
    })
}

fn parse_status<T: FromStr>(topic: &str, s: &str) -> Result<T, TopicError> {
    s.parse().map_err(|_| TopicError::Invalid {
        topic: topic.to_owned(),
        what: "status",
        expected: "an integer status code",
    })
}

/// Checks a device or module id segment taken from a topic.
fn id_segment<'a>(topic: &str, s: &'a str, what: &'static str) -> Result<&'a str, TopicError> {
    if s.is_empty() {
        return Err(TopicError::Invalid {
            topic: topic.to_owned(),
            what,
            expected: "a non-empty id",
        });
    }
    Ok(s)
}

impl Topic {
    /// Parses a device-side topic name. `$iothub` parameters may come in any order, with
    /// extra parameters ignored; the `/` before `?` is optional.
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let unrecognised = || TopicError::Unrecognised {
            topic: topic.to_owned(),
        };
        if let Some(rest) = topic.strip_prefix("$iothub/") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            let path = path.strip_suffix('/').unwrap_or(path);
            let params = parse_params(topic, query)?;
            let segments: Vec<&str> = path.split('/').collect();
            return match segments.as_slice() {
                ["methods", "POST", name] if !name.is_empty() => Ok(Topic::MethodRequest {
                    name: decode(topic, name, "method name")?,
                    rid: require_rid(topic, &params)?,
                }),
                ["methods", "res", status] => Ok(Topic::MethodResponse {
                    status: parse_status(topic, status)?,
                    rid: require_rid(topic, &params)?,
                }),
                ["twin", "GET"] => Ok(Topic::TwinGet {
                    rid: require_rid(topic, &params)?,
                }),
                ["twin", "PATCH", "properties", "reported"] => Ok(Topic::TwinPatchReported {
                    rid: require_rid(topic, &params)?,
                }),
                ["twin", "res", status] => Ok(Topic::TwinResponse {
                    status: parse_status(topic, status)?,
                    rid: require_rid(topic, &params)?,
                    version: params.version,
                }),
                ["twin", "PATCH", "properties", "desired"] => Ok(Topic::TwinDesiredPatch {
                    version: params.version.ok_or_else(|| TopicError::MissingParam {
                        topic: topic.to_owned(),
                        param: "$version",
                    })?,
                }),
                _ => Err(unrecognised()),
            };
        }
        let rest = topic.strip_prefix("devices/").ok_or_else(unrecognised)?;
        let (device_id, rest) = rest.split_once('/').ok_or_else(unrecognised)?;
        let device_id = id_segment(topic, device_id, "device id")?.to_owned();
        if let Some(bag) = rest.strip_prefix("messages/events/") {
            return Ok(Topic::Telemetry {
                device_id,
                module_id: None,
                properties: parse_bag(topic, bag)?,
            });
        }
        if rest == "messages/events" {
            return Ok(Topic::Telemetry {
                device_id,
                module_id: None,
                properties: Vec::new(),
            });
        }
        if let Some(bag) = rest.strip_prefix("messages/devicebound/") {
            return Ok(Topic::C2d {
                device_id,
                properties: parse_bag(topic, bag)?,
            });
        }
        if rest == "messages/devicebound" {
            return Ok(Topic::C2d {
                device_id,
                properties: Vec::new(),
            });
        }
        let rest = rest.strip_prefix("modules/").ok_or_else(unrecognised)?;
        let (module_id, rest) = rest.split_once('/').ok_or_else(unrecognised)?;
        let module_id = id_segment(topic, module_id, "module id")?.to_owned();
        if let Some(bag) = rest.strip_prefix("messages/events/") {
            return Ok(Topic::Telemetry {
                device_id,
                module_id: Some(module_id),
                properties: parse_bag(topic, bag)?,
            });
        }
        if rest == "messages/events" {
            return Ok(Topic::Telemetry {
                device_id,
                module_id: Some(module_id),
                properties: Vec::new(),
            });
        }
        let rest = rest.strip_prefix("inputs/").ok_or_else(unrecognised)?;
        let (input, bag) = rest.split_once('/').unwrap_or((rest, ""));
        Ok(Topic::ModuleInput {
            device_id,
            module_id,
            input: id_segment(topic, input, "input name")?.to_owned(),
            properties: parse_bag(topic, bag)?,
        })
    }

    /// The value of the first property named `key`, if any.
    pub fn property(&self, key: &str) -> Option<&str> {
        match self {
            Topic::Telemetry { properties, .. }
            | Topic::C2d { properties, .. }
            | Topic::ModuleInput { properties, .. } => properties
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

impl FromStr for Topic {
    type Err = TopicError;

    /// Same as [`Topic::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topic::parse(s)
    }
}

/// A subscription filter a device may use (IoT Hub accepts only these).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopicFilter {
    /// `$iothub/methods/POST/#`.
    Methods,
    /// `$iothub/twin/res/#`.
    TwinResponses,
    /// `$iothub/twin/PATCH/properties/desired/#`.
    TwinDesired,
    /// `devices/{device_id}/messages/devicebound/#`.
    C2d {
        /// Device id.
        device_id: String,
    },
    /// `devices/{device_id}/modules/{module_id}/inputs/#`.
    ModuleInputs {
        /// Device id.
        device_id: String,
        /// Module id.
        module_id: String,
    },
}

impl TopicFilter {
    /// Parses a SUBSCRIBE filter.
    pub fn parse(filter: &str) -> Result<TopicFilter, TopicError> {
        let unsupported = || TopicError::UnsupportedFilter {
            topic: filter.to_owned(),
        };
        match filter {
            "$iothub/methods/POST/#" => return Ok(TopicFilter::Methods),
            "$iothub/twin/res/#" => return Ok(TopicFilter::TwinResponses),
            "$iothub/twin/PATCH/properties/desired/#" => return Ok(TopicFilter::TwinDesired),
            _ => {}
        }
        let segments: Vec<&str> = filter.split('/').collect();
        let valid = |s: &&str| !s.is_empty() && !s.contains(['+', '#']);
        match segments.as_slice() {
            ["devices", d, "messages", "devicebound", "#"] if valid(d) => Ok(TopicFilter::C2d {
                device_id: (*d).to_owned(),
            }),
            ["devices", d, "modules", m, "inputs", "#"] if valid(d) && valid(m) => {
                Ok(TopicFilter::ModuleInputs {
                    device_id: (*d).to_owned(),
                    module_id: (*m).to_owned(),
                })
            }
            _ => Err(unsupported()),
        }
    }

    /// Whether a topic published by the hub falls under this filter.
    pub fn matches(&self, topic: &Topic) -> bool {
        match (self, topic) {
            (TopicFilter::Methods, Topic::MethodRequest { .. }) => true,
            (TopicFilter::TwinResponses, Topic::TwinResponse { .. }) => true,
            (TopicFilter::TwinDesired, Topic::TwinDesiredPatch { .. }) => true,
            (TopicFilter::C2d { device_id }, Topic::C2d { device_id: d, .. }) => device_id == d,
            (
                TopicFilter::ModuleInputs {
                    device_id,
                    module_id,
                },
                Topic::ModuleInput {
                    device_id: d,
                    module_id: m,
                    ..
                },
            ) => device_id == d && module_id == m,
            _ => false,
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicFilter::Methods => f.write_str("$iothub/methods/POST/#"),
            TopicFilter::TwinResponses => f.write_str("$iothub/twin/res/#"),
            TopicFilter::TwinDesired => f.write_str("$iothub/twin/PATCH/properties/desired/#"),
            TopicFilter::C2d { device_id } => {
                write!(f, "devices/{device_id}/messages/devicebound/#")
            }
            TopicFilter::ModuleInputs {
                device_id,
                module_id,
            } => write!(f, "devices/{device_id}/modules/{module_id}/inputs/#"),
        }
    }
}

impl FromStr for TopicFilter {
    type Err = TopicError;

    /// Same as [`TopicFilter::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicFilter::parse(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn props(pairs: &[(&str, &str)]) -> Properties {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Wire captures from reference §7.3, each with its typed form; Display must give the
    /// exact bytes back.
    #[test]
    fn parses_and_prints_captured_topics() {
        let table = [
            (
                "devices/dev1/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&a%2Fb=x%26y%3Dz&alert=high%20temp",
                Topic::Telemetry {
                    device_id: "dev1".into(),
                    module_id: None,
                    properties: props(&[
                        ("$.mid", "m-1"),
                        ("$.ct", "application/json"),
                        ("$.ce", "utf-8"),
                        ("a/b", "x&y=z"),
                        ("alert", "high temp"),
                    ]),
                },
            ),
            (
                "devices/dev1/messages/events/",
                Topic::Telemetry {
                    device_id: "dev1".into(),
                    module_id: None,
                    properties: vec![],
                },
            ),
            (
                "devices/dev1/modules/mod1/messages/events/%24.on=out1",
                Topic::Telemetry {
                    device_id: "dev1".into(),
                    module_id: Some("mod1".into()),
                    properties: props(&[("$.on", "out1")]),
                },
            ),
            (
                "$iothub/twin/GET/?$rid=93630bb2-4252-4f10-8a2d-9f7a40107fb2",
                Topic::TwinGet {
                    rid: "93630bb2-4252-4f10-8a2d-9f7a40107fb2".into(),
                },
            ),
            (
                "$iothub/twin/res/200/?$rid=93630bb2",
                Topic::TwinResponse {
                    status: 200,
                    rid: "93630bb2".into(),
                    version: None,
                },
            ),
            (
                "$iothub/twin/PATCH/properties/reported/?$rid=2e011d7a",
                Topic::TwinPatchReported {
                    rid: "2e011d7a".into(),
                },
            ),
            (
                "$iothub/twin/res/204/?$rid=2e011d7a&$version=8",
                Topic::TwinResponse {
                    status: 204,
                    rid: "2e011d7a".into(),
                    version: Some(8),
                },
            ),
            (
                "$iothub/methods/POST/reboot/?$rid=1",
                Topic::MethodRequest {
                    name: "reboot".into(),
                    rid: "1".into(),
                },
            ),
            (
                "$iothub/methods/res/200/?$rid=1",
                Topic::MethodResponse {
                    status: 200,
                    rid: "1".into(),
                },
            ),
            (
                "$iothub/methods/POST/my%20method/?$rid=3",
                Topic::MethodRequest {
                    name: "my method".into(),
                    rid: "3".into(),
                },
            ),
            (
                "devices/dev1/messages/devicebound/%24.mid=c2d-1&%24.to=%2Fdevices%2Fdev1%2Fmessages%2Fdevicebound&%24.ct=application%2Fjson&color=red&empty=",
                Topic::C2d {
                    device_id: "dev1".into(),
                    properties: props(&[
                        ("$.mid", "c2d-1"),
                        ("$.to", "/devices/dev1/messages/devicebound"),
                        ("$.ct", "application/json"),
                        ("color", "red"),
                        ("empty", ""),
                    ]),
                },
            ),
            (
                "$iothub/twin/PATCH/properties/desired/?$version=5",
                Topic::TwinDesiredPatch { version: 5 },
            ),
            (
                "devices/d/modules/m/inputs/in1/k=v",
                Topic::ModuleInput {
                    device_id: "d".into(),
                    module_id: "m".into(),
                    input: "in1".into(),
                    properties: props(&[("k", "v")]),
                },
            ),
            (
                "$iothub/methods/res/-1/?$rid=x",
                Topic::MethodResponse {
                    status: -1,
                    rid: "x".into(),
                },
            ),
        ];
        for (text, topic) in table {
            assert_eq!(Topic::parse(text).as_ref(), Ok(&topic), "{text}");
            assert_eq!(topic.to_string(), text);
        }
    }

    #[test]
    fn accepts_wire_variations() {
        let table = [
            (
                "$iothub/twin/res/204/?$version=8&$rid=x",
                Topic::TwinResponse {
                    status: 204,
                    rid: "x".into(),
                    version: Some(8),
                },
            ),
            (
                "$iothub/twin/res/204/?$rid=x&$version=8&extra=1",
                Topic::TwinResponse {
                    status: 204,
                    rid: "x".into(),
                    version: Some(8),
                },
            ),
            (
                "$iothub/twin/res/200?$rid=x",
                Topic::TwinResponse {
                    status: 200,
                    rid: "x".into(),
                    version: None,
                },
            ),
            (
                "$iothub/methods/POST/m/?foo=bar&%24rid=a%2Fb",
                Topic::MethodRequest {
                    name: "m".into(),
                    rid: "a/b".into(),
                },
            ),
            (
                "devices/dev1/messages/events",
                Topic::Telemetry {
                    device_id: "dev1".into(),
                    module_id: None,
                    properties: vec![],
                },
            ),
            (
                "devices/dev1/messages/devicebound/a&b=",
                Topic::C2d {
                    device_id: "dev1".into(),
                    properties: props(&[("a", ""), ("b", "")]),
                },
            ),
        ];
        for (text, topic) in table {
            assert_eq!(Topic::parse(text), Ok(topic), "{text}");
        }
        assert_eq!(
            Topic::parse("devices/dev1/messages/events/%24.mid=1")
                .unwrap()
                .property("$.mid"),
            Some("1")
        );
    }

    #[test]
    fn rejects_unknown_topics() {
        let table = [
            ("", "is not an IoT Hub device topic"),
            ("$iothub/methods/POST/reboot/", "lacks the `$rid` parameter"),
            (
                "$iothub/twin/PATCH/properties/desired/",
                "lacks the `$version` parameter",
            ),
            (
                "$iothub/twin/PATCH/properties/desired/?$version=x",
                "invalid `$version`; expected a whole number",
            ),
            ("$iothub/twin/res/ok/?$rid=1", "invalid status"),
            ("$iothub/twin/res/70000/?$rid=1", "invalid status"),
            (
                "$iothub/methods/POST//?$rid=1",
                "not an IoT Hub device topic",
            ),
            ("$iothub/twin/DELETE/?$rid=1", "not an IoT Hub device topic"),
            ("devices//messages/events/", "invalid device id"),
            ("devices/d/messages/other", "not an IoT Hub device topic"),
            (
                "devices/d/messages/events/a=%FF",
                "invalid property value; expected percent-encoded utf-8",
            ),
            ("other/topic", "not an IoT Hub device topic"),
        ];
        for (text, want) in table {
            let got = Topic::parse(text).unwrap_err().to_string();
            assert!(got.contains(want), "{text}: {got}");
        }
    }

    #[test]
    fn filters_round_trip_and_match() {
        let table = [
            ("$iothub/methods/POST/#", TopicFilter::Methods),
            ("$iothub/twin/res/#", TopicFilter::TwinResponses),
            (
                "$iothub/twin/PATCH/properties/desired/#",
                TopicFilter::TwinDesired,
            ),
            (
                "devices/dev1/messages/devicebound/#",
                TopicFilter::C2d {
                    device_id: "dev1".into(),
                },
            ),
            (
                "devices/d/modules/m/inputs/#",
                TopicFilter::ModuleInputs {
                    device_id: "d".into(),
                    module_id: "m".into(),
                },
            ),
        ];
        for (text, filter) in table {
            assert_eq!(TopicFilter::parse(text).as_ref(), Ok(&filter));
            assert_eq!(filter.to_string(), text);
        }
        for bad in [
            "#",
            "$iothub/#",
            "$iothub/methods/POST/+",
            "devices/+/messages/devicebound/#",
            "devices/d/messages/events/#",
        ] {
            assert!(
                matches!(
                    TopicFilter::parse(bad),
                    Err(TopicError::UnsupportedFilter { .. })
                ),
                "{bad}"
            );
        }
        let c2d = Topic::parse("devices/dev1/messages/devicebound/").unwrap();
        assert!(
            TopicFilter::C2d {
                device_id: "dev1".into()
            }
            .matches(&c2d)
        );
        assert!(
            !TopicFilter::C2d {
                device_id: "dev2".into()
            }
            .matches(&c2d)
        );
        assert!(TopicFilter::Methods.matches(&Topic::MethodRequest {
            name: "m".into(),
            rid: "1".into()
        }));
        assert!(!TopicFilter::Methods.matches(&c2d));
        assert!(TopicFilter::TwinDesired.matches(&Topic::TwinDesiredPatch { version: 1 }));
        assert!(TopicFilter::TwinResponses.matches(&Topic::TwinResponse {
            status: 200,
            rid: "1".into(),
            version: None
        }));
    }

    fn id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9.%_*?!(),:=@$'-]{1,16}"
    }
    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,12}"
    }
    fn bag() -> impl Strategy<Value = Properties> {
        proptest::collection::vec(("\\PC{1,8}", text()), 0..4)
    }

    fn topic() -> impl Strategy<Value = Topic> {
        prop_oneof![
            ("\\PC{1,12}", text()).prop_map(|(name, rid)| Topic::MethodRequest { name, rid }),
            (any::<i32>(), text()).prop_map(|(status, rid)| Topic::MethodResponse { status, rid }),
            text().prop_map(|rid| Topic::TwinGet { rid }),
            text().prop_map(|rid| Topic::TwinPatchReported { rid }),
            (any::<u16>(), text(), any::<Option<u64>>()).prop_map(|(status, rid, version)| {
                Topic::TwinResponse {
                    status,
                    rid,
                    version,
                }
            }),
            any::<u64>().prop_map(|version| Topic::TwinDesiredPatch { version }),
            (id(), proptest::option::of(id()), bag()).prop_map(
                |(device_id, module_id, properties)| Topic::Telemetry {
                    device_id,
                    module_id,
                    properties
                }
            ),
            (id(), bag()).prop_map(|(device_id, properties)| Topic::C2d {
                device_id,
                properties
            }),
            (id(), id(), id(), bag()).prop_map(|(device_id, module_id, input, properties)| {
                Topic::ModuleInput {
                    device_id,
                    module_id,
                    input,
                    properties,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_topic_round_trips(t in topic()) {
            prop_assert_eq!(Topic::parse(&t.to_string()), Ok(t));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = Topic::parse(&s);
            let _ = TopicFilter::parse(&s);
            let _ = Topic::parse(&format!("$iothub/{s}"));
            let _ = Topic::parse(&format!("devices/{s}"));
        }

        #[test]
        fn filters_round_trip(d in id(), m in id()) {
            for f in [TopicFilter::C2d { device_id: d.clone() }, TopicFilter::ModuleInputs { device_id: d.clone(), module_id: m.clone() }] {
                prop_assert_eq!(TopicFilter::parse(&f.to_string()), Ok(f));
            }
        }
    }
}
