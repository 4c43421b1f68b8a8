//! What the hub's tier says about a job before it runs: how long its device operations take at
//! least (IoT Hub runs them at the tier's "jobs device operations" rate, e.g. 10 a second on S1,
//! whatever the devices answer), and whether the tier's cap on active jobs may hold it back.

use std::time::Duration;

use hub_core::tier::Operation;
use serde_json::{Value, json};

use crate::settings::{ENV_TIER, HubSettings};

/// The tier the unknown-tier hint uses as its example: the tutorial's.
const EXAMPLE: &str = "S1 runs 10 device operations a second, so 100 devices take 10 s";

/// What a dry run can tell about a job over `devices` devices on the hub of `hub`.
#[derive(Debug, Clone, Copy)]
pub struct JobForecast<'a> {
    hub: &'a HubSettings,
    devices: u64,
}

impl<'a> JobForecast<'a> {
    /// The forecast for `devices` devices.
    pub fn new(hub: &'a HubSettings, devices: usize) -> JobForecast<'a> {
        JobForecast {
            hub,
            devices: devices as u64,
        }
    }

    /// The least time the job's device operations take, when the tier is known and has jobs.
    pub fn least_duration(&self) -> Option<Duration> {
        self.hub
            .tier
            .as_ref()
            .and_then(|t| t.quotas.job_duration(self.devices))
    }

    /// Sentences for people.
    pub fn lines(&self) -> Vec<String> {
        let Some(known) = &self.hub.tier else {
            let why = if self.hub.from_hub_env {
                "the hub-emulator was started without --tier, so it does not pace jobs; \
                 pass --tier S1 [--units N] to predict a real hub's"
            } else {
                "it depends on the hub's tier; pass --tier S1 [--units N] (or set IOTHUB_TIER)"
            };
            return vec![format!("job duration: unknown: {why} ({EXAMPLE})")];
        };
        let quotas = known.quotas;
        let (Some(least), Some(rate)) = (
            self.least_duration(),
            quotas.rate(Operation::JobDeviceOperation),
        ) else {
            return vec![format!(
                "{} (from {}) has no jobs: basic tiers lack twins, direct methods and jobs",
                quotas.tier, known.origin
            )];
        };
        let mut lines = vec![format!(
            "job duration on {quotas} (from {}): at least {} for {} device(s), at {} device operations a second",
            known.origin,
            human_duration(least),
            self.devices,
            rate.per_second
        )];
        if quotas.max_active_jobs() == 1 {
            lines.push(format!(
                "{} allows one active job at a time: while another job is queued, scheduled or \
                 running, this one is refused (429 ThrottlingMaxActiveJobCountExceeded)",
                quotas.tier
            ));
        }
        lines
    }

    /// The forecast's fields for `--output json`: `tier` (`null` when unknown),
    /// `estimatedSeconds` (least duration) and `maxActiveJobs`.
    pub fn json(&self) -> Value {
        match &self.hub.tier {
            None => json!({
                "tier": null,
                "estimatedSeconds": null,
                "maxActiveJobs": null,
                "hint": format!("pass --tier (or set {ENV_TIER}) to have the duration predicted"),
            }),
            Some(known) => json!({
                "tier": {
                    "name": known.quotas.tier.to_string(),
                    "units": known.quotas.units,
                    "origin": known.origin,
                },
                "estimatedSeconds": self.least_duration().map(|d| d.as_secs_f64()),
                "maxActiveJobs": known.quotas.max_active_jobs(),
            }),
        }
    }
}

/// `0.3 s`, `45 s`, `12 min 5 s`, `3 h 20 min`.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 10.0 {
        return format!("{secs:.1} s");
    }
    let whole = duration.as_secs_f64().round() as u64;
    match whole {
        0..120 => format!("{whole} s"),
        120..7_200 => format!("{} min {} s", whole / 60, whole % 60),
        _ => format!("{} h {} min", whole / 3_600, whole % 3_600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use hub_core::tier::Tier;

    use super::*;
    use crate::settings::KnownTier;

    fn hub(tier: Option<(Tier, u32)>, from_hub_env: bool) -> HubSettings {
        HubSettings {
            connection: "HostName=h;SharedAccessKeyName=p;SharedAccessKey=YQ=="
                .parse()
                .expect("cs"),
            ca_file: None,
            origin: "test".into(),
            from_hub_env,
            tier: tier.map(|(t, u)| KnownTier {
                quotas: t.with_units(u).expect("tier"),
                origin: "--tier".into(),
            }),
        }
    }

    #[test]
    fn s1_runs_100_devices_in_10_s_one_job_at_a_time() {
        let hub = hub(Some((Tier::S1, 1)), false);
        let lines = JobForecast::new(&hub, 100).lines();
        assert!(
            lines[0].contains("at least 10 s for 100 device(s)"),
            "{lines:?}"
        );
        assert!(
            lines[0].contains("S1 with 1 unit (from --tier)"),
            "{lines:?}"
        );
        assert!(lines[1].contains("one active job"), "{lines:?}");
        assert_eq!(JobForecast::new(&hub, 100).json()["estimatedSeconds"], 10.0);
    }

    #[test]
    fn s3_scales_with_units_and_has_no_single_job_cap() {
        let hub = hub(Some((Tier::S3, 2)), false);
        let lines = JobForecast::new(&hub, 6_000).lines();
        assert!(lines[0].contains("at least 60 s"), "{lines:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
    }

    #[test]
    fn unknown_and_basic_tiers_say_so() {
        let unknown = JobForecast::new(&hub(None, false), 5).lines();
        assert!(
            unknown[0].starts_with("job duration: unknown"),
            "{unknown:?}"
        );
        assert!(unknown[0].contains("--tier"), "{unknown:?}");
        let emulator = JobForecast::new(&hub(None, true), 5).lines();
        assert!(emulator[0].contains("without --tier"), "{emulator:?}");
        let basic = JobForecast::new(&hub(Some((Tier::B1, 1)), false), 5).lines();
        assert!(basic[0].contains("has no jobs"), "{basic:?}");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(300)), "0.3 s");
        assert_eq!(human_duration(Duration::from_secs(45)), "45 s");
        assert_eq!(human_duration(Duration::from_secs(725)), "12 min 5 s");
        assert_eq!(human_duration(Duration::from_secs(12_000)), "3 h 20 min");
    }
}
