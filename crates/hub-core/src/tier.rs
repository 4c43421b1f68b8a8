//! IoT Hub's tiers and what each allows: the operation throttles, the cap on concurrent jobs and
//! the features the basic tiers lack. Figures from Microsoft Learn, "IoT Hub quotas and
//! throttling" (English page as of 2023, the version the protocol reference records; the
//! table with its source is in `docs/tiers.md`). Pure data: the emulator enforces it, our tools
//! pace themselves by it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// An IoT Hub pricing tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Free: one unit, S1's throttles.
    F1,
    /// Basic 1: S1's throttles, no twins, methods or jobs.
    B1,
    /// Basic 2: S2's throttles, no twins, methods or jobs.
    B2,
    /// Basic 3: S3's throttles, no twins, methods or jobs.
    B3,
    /// Standard 1, the tutorial's tier.
    S1,
    /// Standard 2.
    S2,
    /// Standard 3.
    S3,
}

/// Every tier, in the order the portal lists them.
pub const TIERS: [Tier; 7] = [
    Tier::F1,
    Tier::B1,
    Tier::B2,
    Tier::B3,
    Tier::S1,
    Tier::S2,
    Tier::S3,
];

/// A class of operations with its own throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Identity registry create, get, list, update, delete.
    Registry,
    /// New device connections (the rate of connects, not how many are open).
    NewConnection,
    /// Device-to-cloud sends.
    DeviceToCloud,
    /// Queries (`POST /devices/query`, job queries).
    Query,
    /// Direct methods, metered in [`METHOD_METER_BYTES`] steps of the request payload.
    DirectMethod,
    /// Twin reads, device and service side.
    TwinRead,
    /// Twin updates, device and service side.
    TwinUpdate,
    /// Jobs operations: create, get, list, cancel.
    JobsOperation,
    /// Device operations run by jobs (one method call or twin update per device).
    JobDeviceOperation,
    /// Automatic device and module configurations: create, get, list, update, delete, test
    /// queries ("Configurations and edge deployments", 20/min/unit on every standard tier).
    Configurations,
}

impl Operation {
    /// Every class, in the order of Microsoft's table.
    pub const ALL: [Operation; 10] = [
        Operation::Registry,
        Operation::NewConnection,
        Operation::DeviceToCloud,
        Operation::Query,
        Operation::DirectMethod,
        Operation::TwinRead,
        Operation::TwinUpdate,
        Operation::JobsOperation,
        Operation::JobDeviceOperation,
        Operation::Configurations,
    ];

    /// The name Microsoft's table gives the throttle.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Registry => "identity registry operations",
            Operation::NewConnection => "new device connections",
            Operation::DeviceToCloud => "device-to-cloud sends",
            Operation::Query => "queries",
            Operation::DirectMethod => "direct methods",
            Operation::TwinRead => "twin reads",
            Operation::TwinUpdate => "twin updates",
            Operation::JobsOperation => "jobs operations",
            Operation::JobDeviceOperation => "jobs device operations",
            Operation::Configurations => "configurations and edge deployments",
        }
    }
}

/// Direct methods are metered in steps of this many bytes of request payload: "throttle is
/// based on the request payload size in 4-KB chunks" (0 to 4 KB counts as one step).
pub const METHOD_METER_BYTES: usize = 4 * 1024;

/// How many [`METHOD_METER_BYTES`] steps a direct method with `payload_bytes` counts for.
pub fn method_meter_steps(payload_bytes: usize) -> u64 {
    (payload_bytes.div_ceil(METHOD_METER_BYTES)).max(1) as u64
}

/// Why a tier cannot be built as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// Not one of F1, B1-B3, S1-S3.
    #[error("unknown IoT Hub tier `{0}`; use one of F1, B1, B2, B3, S1, S2, S3")]
    Unknown(String),
    /// Zero units, or more than one on the free tier.
    #[error("{tier} cannot have {units} units ({hint})")]
    Units {
        /// The tier.
        tier: Tier,
        /// What was asked.
        units: u32,
        /// What is allowed.
        hint: &'static str,
    },
}

impl FromStr for Tier {
    type Err = TierError;

    fn from_str(text: &str) -> Result<Tier, TierError> {
        match text.trim().to_ascii_uppercase().as_str() {
            "F1" | "FREE" => Ok(Tier::F1),
            "B1" => Ok(Tier::B1),
            "B2" => Ok(Tier::B2),
            "B3" => Ok(Tier::B3),
            "S1" => Ok(Tier::S1),
            "S2" => Ok(Tier::S2),
            "S3" => Ok(Tier::S3),
            _ => Err(TierError::Unknown(text.to_owned())),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::F1 => "F1",
            Tier::B1 => "B1",
            Tier::B2 => "B2",
            Tier::B3 => "B3",
            Tier::S1 => "S1",
            Tier::S2 => "S2",
            Tier::S3 => "S3",
        })
    }
}

impl Tier {
    /// Whether this is a basic tier (no twins, direct methods or jobs).
    pub fn is_basic(self) -> bool {
        matches!(self, Tier::B1 | Tier::B2 | Tier::B3)
    }

    /// Size class 1, 2 or 3 (F1 throttles as 1).
    fn size(self) -> u8 {
        match self {
            Tier::F1 | Tier::B1 | Tier::S1 => 1,
            Tier::B2 | Tier::S2 => 2,
            Tier::B3 | Tier::S3 => 3,
        }
    }

    /// This tier with `units` units (F1 has exactly one; the others one or more).
    pub fn with_units(self, units: u32) -> Result<Quotas, TierError> {
        match (self, units) {
            (_, 0) => Err(TierError::Units {
                tier: self,
                units,
                hint: "a hub has at least one unit",
            }),
            (Tier::F1, 2..) => Err(TierError::Units {
                tier: self,
                units,
                hint: "the free tier has exactly one unit",
            }),
            _ => Ok(Quotas { tier: self, units }),
        }
    }
}

/// A throttle: how many operations (for [`Operation::DirectMethod`], meter steps) per second
/// the hub serves before it shapes, then refuses, traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Operations per second.
    pub per_second: f64,
}

impl Rate {
    fn per_minute(n: f64) -> Rate {
        Rate {
            per_second: n / 60.0,
        }
    }

    fn per_second(n: f64) -> Rate {
        Rate { per_second: n }
    }

    /// How long `operations` take at this rate.
    pub fn time_for(self, operations: u64) -> Duration {
        if self.per_second <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(operations as f64 / self.per_second)
    }
}

/// A tier with its units: the limits a hub enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// The tier.
    pub tier: Tier,
    /// Provisioned units (at least one).
    pub units: u32,
}

impl Quotas {
    /// The throttle of `operation`, or `None` where the tier does not offer it (basic tiers:
    /// twins, methods, jobs, queries over twins and automatic device management).
    pub fn rate(self, operation: Operation) -> Option<Rate> {
        let units = f64::from(self.units);
        let size = self.tier.size();
        if self.tier.is_basic()
            && matches!(
                operation,
                Operation::DirectMethod
                    | Operation::TwinRead
                    | Operation::TwinUpdate
                    | Operation::JobsOperation
                    | Operation::JobDeviceOperation
                    | Operation::Query
                    | Operation::Configurations
            )
        {
            return None;
        }
        let rate = match (operation, size) {
            (Operation::Registry | Operation::JobsOperation, 1 | 2) => {
                Rate::per_minute(100.0 * units)
            }
            (Operation::Registry | Operation::JobsOperation, _) => {
                Rate::per_minute(5_000.0 * units)
            }
            // "100/sec or 12/sec/unit": whichever is higher, across units.
            (Operation::NewConnection | Operation::DeviceToCloud, 1) => {
                Rate::per_second((12.0 * units).max(100.0))
            }
            (Operation::NewConnection | Operation::DeviceToCloud, 2) => {
                Rate::per_second(120.0 * units)
            }
            (Operation::NewConnection | Operation::DeviceToCloud, _) => {
                Rate::per_second(6_000.0 * units)
            }
            (Operation::Query, 1 | 2) => Rate::per_minute(20.0 * units),
            (Operation::Query, _) => Rate::per_minute(1_000.0 * units),
            // 160 KB/s/unit, 480 KB/s/unit, 24 MB/s/unit, in 4 KB meter steps.
            (Operation::DirectMethod, 1) => Rate::per_second(40.0 * units),
            (Operation::DirectMethod, 2) => Rate::per_second(120.0 * units),
            (Operation::DirectMethod, _) => Rate::per_second(6_000.0 * units),
            (Operation::TwinRead, 1) => Rate::per_second(100.0),
            (Operation::TwinRead, 2) => Rate::per_second((10.0 * units).max(100.0)),
            (Operation::TwinRead, _) => Rate::per_second(500.0 * units),
            (Operation::TwinUpdate, 1) => Rate::per_second(50.0),
            (Operation::TwinUpdate, 2) => Rate::per_second((5.0 * units).max(50.0)),
            (Operation::TwinUpdate, _) => Rate::per_second(250.0 * units),
            (Operation::JobDeviceOperation, 1) => Rate::per_second(10.0),
            (Operation::JobDeviceOperation, 2) => Rate::per_second(units.max(10.0)),
            (Operation::JobDeviceOperation, _) => Rate::per_second(50.0 * units),
            (Operation::Configurations, _) => Rate::per_minute(20.0 * units),
        };
        Some(rate)
    }

    /// How many jobs may be active (queued, scheduled or running) at once: "Maximum concurrent
    /// jobs: 1 (for Free and S1), 5 (for S2), 10 (for S3)"; basic tiers have no jobs.
    pub fn max_active_jobs(self) -> usize {
        match self.tier {
            Tier::B1 | Tier::B2 | Tier::B3 => 0,
            Tier::F1 | Tier::S1 => 1,
            Tier::S2 => 5,
            Tier::S3 => 10,
        }
    }

    /// How long a job over `devices` devices takes at least on this tier (its device operations
    /// run at the jobs device-operations rate); `None` on basic tiers.
    pub fn job_duration(self, devices: u64) -> Option<Duration> {
        self.rate(Operation::JobDeviceOperation)
            .map(|rate| rate.time_for(devices))
    }
}

impl fmt::Display for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} with {} unit{}",
            self.tier,
            self.units,
            if self.units == 1 { "" } else { "s" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(quotas: Quotas, operation: Operation) -> f64 {
        quotas.rate(operation).map_or(0.0, |r| r.per_second)
    }

    #[test]
    fn tiers_parse_case_insensitively_and_print_back() {
        for tier in TIERS {
            assert_eq!(tier.to_string().parse::<Tier>(), Ok(tier));
            assert_eq!(tier.to_string().to_lowercase().parse::<Tier>(), Ok(tier));
        }
        assert_eq!("free".parse::<Tier>(), Ok(Tier::F1));
        assert!(matches!("S4".parse::<Tier>(), Err(TierError::Unknown(_))));
    }

    #[test]
    fn units_are_checked() {
        assert!(Tier::F1.with_units(2).is_err());
        assert!(Tier::S1.with_units(0).is_err());
        assert!(Tier::S3.with_units(10).is_ok());
    }

    #[test]
    fn s1_has_the_tutorial_limits() {
        let s1 = Tier::S1.with_units(1).expect("S1");
        assert_eq!(s1.max_active_jobs(), 1);
        assert_eq!(per_second(s1, Operation::JobDeviceOperation), 10.0);
        assert_eq!(per_second(s1, Operation::DirectMethod), 40.0);
        assert_eq!(per_second(s1, Operation::TwinUpdate), 50.0);
        assert_eq!(per_second(s1, Operation::TwinRead), 100.0);
        assert!((per_second(s1, Operation::JobsOperation) - 100.0 / 60.0).abs() < 1e-9);
        assert!((per_second(s1, Operation::Query) - 20.0 / 60.0).abs() < 1e-9);
        // A method job over 100 devices takes about 10 s on S1.
        assert_eq!(s1.job_duration(100), Some(Duration::from_secs(10)));
    }

    #[test]
    fn floors_and_unit_scaling_follow_the_table() {
        // "100/sec or 12/sec/unit", e.g. 9 units of S1: 108/s.
        let s1x2 = Tier::S1.with_units(2).expect("S1");
        let s1x9 = Tier::S1.with_units(9).expect("S1");
        assert_eq!(per_second(s1x2, Operation::NewConnection), 100.0);
        assert_eq!(per_second(s1x9, Operation::NewConnection), 108.0);
        let s2x20 = Tier::S2.with_units(20).expect("S2");
        assert_eq!(per_second(s2x20, Operation::JobDeviceOperation), 20.0);
        assert_eq!(per_second(s2x20, Operation::TwinUpdate), 100.0);
        let s2 = Tier::S2.with_units(1).expect("S2");
        assert_eq!(per_second(s2, Operation::JobDeviceOperation), 10.0);
        assert_eq!(s2.max_active_jobs(), 5);
        let s3x2 = Tier::S3.with_units(2).expect("S3");
        assert_eq!(per_second(s3x2, Operation::JobDeviceOperation), 100.0);
        assert_eq!(s3x2.max_active_jobs(), 10);
    }

    #[test]
    fn basic_tiers_have_no_twins_methods_or_jobs() {
        for tier in [Tier::B1, Tier::B2, Tier::B3] {
            let quotas = tier.with_units(1).expect("basic");
            for operation in [
                Operation::DirectMethod,
                Operation::TwinRead,
                Operation::TwinUpdate,
                Operation::JobsOperation,
                Operation::JobDeviceOperation,
                Operation::Configurations,
            ] {
                assert_eq!(quotas.rate(operation), None, "{tier} {operation:?}");
            }
            assert!(quotas.rate(Operation::Registry).is_some());
            assert!(quotas.rate(Operation::NewConnection).is_some());
            assert_eq!(quotas.max_active_jobs(), 0);
        }
    }

    #[test]
    fn methods_are_metered_in_4_kb_steps() {
        assert_eq!(method_meter_steps(0), 1);
        assert_eq!(method_meter_steps(4096), 1);
        assert_eq!(method_meter_steps(4097), 2);
        assert_eq!(method_meter_steps(128 * 1024), 32);
    }
}
