//! Timestamps as IoT Hub writes them (`2030-01-02T03:04:05.000Z` in twin metadata and jobs,
//! 7 fraction digits in device-job records) and a lenient ISO 8601 / RFC 3339 parser for what
//! SDKs send (0-9 fraction digits, `Z` or an offset, or naive text meaning UTC). Pure: never
//! reads the clock.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// A timestamp that is not ISO 8601 / RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "timestamp `{text}` is not an ISO 8601 date-time; expected e.g. `2030-01-02T03:04:05.000Z`, `2030-01-02T03:04:05+01:00` or `2030-01-02T03:04:05.1234567` (UTC)"
)]
pub struct TimestampError {
    /// The rejected text (cut to 64 characters).
    pub text: String,
}

fn write_utc(dt: OffsetDateTime, digits: u32, zone: bool) -> String {
    let dt = dt.to_offset(UtcOffset::UTC);
    let fraction = dt.nanosecond() / 10u32.pow(9 - digits);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:0width$}{}",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        fraction,
        if zone { "Z" } else { "" },
        width = digits as usize,
    )
}

/// Formats as IoT Hub does in twin metadata and job records: UTC, milliseconds, `Z`
/// (`2030-01-02T03:04:05.000Z`). Sub-millisecond digits are truncated.
pub fn format_millis(dt: OffsetDateTime) -> String {
    write_utc(dt, 3, true)
}

/// Formats with 7 fraction digits (100 ns ticks) and `Z`, as in device-job
/// `createdDateTimeUtc` (`2016-09-29T18:18:56.7787107Z`).
pub fn format_ticks(dt: OffsetDateTime) -> String {
    write_utc(dt, 7, true)
}

/// Formats with 7 fraction digits and no zone designator, as in device-job `startTimeUtc`
/// (`2016-09-29T18:18:52.7418462`); the value is UTC.
pub fn format_ticks_naive(dt: OffsetDateTime) -> String {
    write_utc(dt, 7, false)
}

/// Parses an ISO 8601 / RFC 3339 date-time: any number of fraction digits (0-9 significant),
/// `Z` or `±hh:mm`; text without a zone (`2016-09-29T18:18:52.7418462`) is taken as UTC.
pub fn parse(text: &str) -> Result<OffsetDateTime, TimestampError> {
    OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(&format!("{text}Z"), &Rfc3339))
        .map_err(|_| TimestampError {
            text: text.chars().take(64).collect(),
        })
}

/// Serde adapter for `OffsetDateTime` fields written as `...05.000Z` and read leniently with
/// [`parse`]: `#[serde(with = "hub_core::timestamp::millis")]`.
pub mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    /// Writes [`super::format_millis`].
    pub fn serialize<S: Serializer>(dt: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_millis(*dt))
    }

    /// Reads anything [`super::parse`] accepts.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<OffsetDateTime>` (`null` or absent with `#[serde(default)]`).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use time::OffsetDateTime;

        /// Writes [`super::super::format_millis`] or `null`.
        pub fn serialize<S: Serializer>(
            dt: &Option<OffsetDateTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match dt {
                Some(dt) => s.serialize_str(&super::super::format_millis(*dt)),
                None => s.serialize_none(),
            }
        }

        /// Reads `null` or anything [`super::super::parse`] accepts.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<OffsetDateTime>, D::Error> {
            Option::<std::borrow::Cow<'de, str>>::deserialize(d)?
                .map(|text| super::super::parse(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn formats_like_iot_hub() {
        let dt = datetime!(2016-09-29 18:18:52.741846289 UTC);
        assert_eq!(format_millis(dt), "2016-09-29T18:18:52.741Z");
        assert_eq!(format_ticks(dt), "2016-09-29T18:18:52.7418462Z");
        assert_eq!(format_ticks_naive(dt), "2016-09-29T18:18:52.7418462");
        let offset = datetime!(2030-01-02 05:04:05 +02:00);
        assert_eq!(format_millis(offset), "2030-01-02T03:04:05.000Z");
        assert_eq!(
            format_millis(datetime!(0001-01-01 00:00 UTC)),
            "0001-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn parses_what_sdks_send() {
        let table = [
            (
                "2030-01-02T03:04:05.000Z",
                datetime!(2030-01-02 03:04:05 UTC),
            ),
            (
                "2026-11-28T08:09:41.224459Z",
                datetime!(2026-11-28 08:09:41.224459 UTC),
            ),
            ("2030-01-02T03:04:05Z", datetime!(2030-01-02 03:04:05 UTC)),
            (
                "2030-01-02T03:04:05.1Z",
                datetime!(2030-01-02 03:04:05.1 UTC),
            ),
            (
                "2030-01-02T03:04:05.123456789Z",
                datetime!(2030-01-02 03:04:05.123456789 UTC),
            ),
            (
                "2030-01-02T03:04:05+01:30",
                datetime!(2030-01-02 03:04:05 +01:30),
            ),
            (
                "2030-01-02t03:04:05.5-08:00",
                datetime!(2030-01-02 03:04:05.5 -08:00),
            ),
            (
                "2016-09-29T18:18:52.7418462",
                datetime!(2016-09-29 18:18:52.7418462 UTC),
            ),
            ("2016-09-29T18:18:52", datetime!(2016-09-29 18:18:52 UTC)),
            ("0001-01-01T00:00:00Z", datetime!(0001-01-01 00:00 UTC)),
        ];
        for (text, want) in table {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_non_timestamps() {
        for bad in [
            "",
            "2030-01-02",
            "2030-01-02T03:04Z",
            "2030-13-02T03:04:05Z",
            "2030-01-02T03:04:05.Z",
            "yesterday",
            "2030-01-02T03:04:05ZZ",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse("nope").unwrap_err().to_string(),
            "timestamp `nope` is not an ISO 8601 date-time; expected e.g. `2030-01-02T03:04:05.000Z`, `2030-01-02T03:04:05+01:00` or `2030-01-02T03:04:05.1234567` (UTC)"
        );
    }

    #[test]
    fn serde_adapters() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Job {
            #[serde(with = "millis")]
            start: OffsetDateTime,
            #[serde(with = "millis::option", default)]
            end: Option<OffsetDateTime>,
        }
        let job: Job = serde_json::from_str(r#"{"start":"2026-11-28T08:09:41.224459Z"}"#).unwrap();
        assert_eq!(job.start, datetime!(2026-11-28 08:09:41.224459 UTC));
        assert_eq!(job.end, None);
        assert_eq!(
            serde_json::to_string(&job).unwrap(),
            r#"{"start":"2026-11-28T08:09:41.224Z","end":null}"#
        );
        assert!(serde_json::from_str::<Job>(r#"{"start":"soon"}"#).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC*") {
            let _ = parse(&s);
        }

        #[test]
        fn formats_round_trip(secs in -62_135_596_800i64..253_402_300_799, nanos in 0u32..1_000_000_000) {
            let dt = OffsetDateTime::from_unix_timestamp(secs).unwrap() + time::Duration::nanoseconds(nanos.into());
            let millis = dt.replace_nanosecond(dt.nanosecond() / 1_000_000 * 1_000_000).unwrap();
            proptest::prop_assert_eq!(parse(&format_millis(dt)), Ok(millis));
            let ticks = dt.replace_nanosecond(dt.nanosecond() / 100 * 100).unwrap();
            proptest::prop_assert_eq!(parse(&format_ticks(dt)), Ok(ticks));
            proptest::prop_assert_eq!(parse(&format_ticks_naive(dt)), Ok(ticks));
        }
    }
}
