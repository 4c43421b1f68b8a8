//! Pure wave planning: canary, fixed or exponential rates, the tier's clamp, the abort rule's
//! arithmetic, and splitting a wave's device ids into job query conditions under IoT Hub's
//! query-length limit. Nothing here reads a clock or talks to the hub, so all of it is unit
//! tested; the executor (`run.rs`) passes in what it has seen.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hub_core::service_client::escape_sql_string;
use hub_core::tier::{Operation, Quotas};
use serde::{Deserialize, Serialize};

/// IoT Hub's limit on the text of a query ("Maximum size of a query: 8192 characters",
/// Microsoft Learn, "IoT Hub quotas and throttling"). A job's queryCondition becomes
/// `SELECT * FROM devices WHERE <condition>`, so the condition gets what the prefix leaves.
pub const MAX_QUERY_CHARS: usize = 8192;

/// What the hub puts before a job's queryCondition when it runs the query.
const QUERY_PREFIX: &str = "SELECT * FROM devices WHERE ";

/// Most characters a wave job's condition may have.
pub const MAX_CONDITION_CHARS: usize = MAX_QUERY_CHARS - QUERY_PREFIX.len();

/// A part (one job) holds at most this many seconds of the wave's rate, so that the rate is
/// honoured within that window even when the hub itself runs devices faster than asked.
pub const PART_SECONDS: u64 = 10;

/// The canary: the first wave, alone, before any other.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Canary {
    /// This many devices.
    Count(u64),
    /// This share of the fleet, rounded up (at least one device).
    Percent(f64),
}

impl Canary {
    /// How many devices of a fleet of `fleet` the canary takes.
    pub fn size(self, fleet: u64) -> u64 {
        let n = match self {
            Canary::Count(n) => n,
            Canary::Percent(p) => ((fleet as f64) * p / 100.0).ceil() as u64,
        };
        n.clamp(1, fleet.max(1)).min(fleet)
    }
}

impl FromStr for Canary {
    type Err = String;

    fn from_str(text: &str) -> Result<Canary, String> {
        let text = text.trim();
        if let Some(p) = text.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| {
                format!("--canary `{text}`: give a count such as 10 or a share such as 5%")
            })?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!(
                    "--canary `{text}`: a share must be above 0% and at most 100%"
                ));
            }
            return Ok(Canary::Percent(p));
        }
        match text.parse::<u64>() {
            Ok(0) => Err(
                "--canary 0: a canary needs at least one device (leave --canary out for none)"
                    .into(),
            ),
            Ok(n) => Ok(Canary::Count(n)),
            Err(_) => Err(format!(
                "--canary `{text}`: give a count such as 10 or a share such as 5%"
            )),
        }
    }
}

/// What makes an exponential rate grow (AWS IoT Jobs' `rateIncreaseCriteria`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IncreaseCriteria {
    /// After this many more devices were notified (`numberOfNotifiedThings`).
    Notified(u64),
    /// After this many more devices succeeded (`numberOfSucceededThings`).
    Succeeded(u64),
}

impl IncreaseCriteria {
    /// The count that triggers an increase.
    pub fn count(self) -> u64 {
        match self {
            IncreaseCriteria::Notified(n) | IncreaseCriteria::Succeeded(n) => n,
        }
    }
}

impl FromStr for IncreaseCriteria {
    type Err = String;

    fn from_str(text: &str) -> Result<IncreaseCriteria, String> {
        let hint = "--rate-increase-after: give notified:N or succeeded:N, e.g. notified:100";
        let (kind, n) = text.trim().split_once(':').ok_or_else(|| hint.to_owned())?;
        let n: u64 = n.trim().parse().map_err(|_| hint.to_owned())?;
        if n == 0 {
            return Err(format!("{hint} (N must be at least 1)"));
        }
        match kind.trim() {
            "notified" => Ok(IncreaseCriteria::Notified(n)),
            "succeeded" => Ok(IncreaseCriteria::Succeeded(n)),
            _ => Err(hint.to_owned()),
        }
    }
}

/// How fast devices are notified (AWS IoT Jobs' `jobExecutionsRolloutConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateSpec {
    /// At most `per_minute` devices a minute (`maximumPerMinute`), in waves of `wave_size`
    /// devices (a minute's worth unless given).
    Fixed {
        /// Devices per minute.
        per_minute: u64,
        /// Devices per wave.
        wave_size: u64,
    },
    /// `base_per_minute`, multiplied by `factor` each time `after` is met
    /// (`exponentialRate`); each wave is one step of `after.count()` devices.
    Exponential {
        /// The first rate, devices per minute.
        base_per_minute: u64,
        /// The growth of the rate at each step.
        factor: f64,
        /// When the rate grows.
        after: IncreaseCriteria,
    },
}

/// One planned wave: a slice of the sorted fleet and the rate it is notified at.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WavePlan {
    /// 0 for the canary (or the first wave without one).
    pub index: usize,
    /// Whether this is the canary.
    pub canary: bool,
    /// Index of the wave's first device in the sorted fleet.
    pub first: usize,
    /// How many devices.
    pub size: usize,
    /// The rate the spec asks for, devices per minute (if every earlier device succeeds).
    pub requested_per_minute: f64,
    /// The rate used: the requested one, clamped to the tier's jobs device-operations rate.
    pub per_minute: f64,
    /// At most this many devices in one job of this wave.
    pub part_max: usize,
}

impl WavePlan {
    /// The wave's device index range in the sorted fleet.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.size
    }
}

/// The rate the tier allows for jobs' device operations, devices per minute, when known.
pub fn tier_per_minute(tier: Option<Quotas>) -> Option<f64> {
    tier.and_then(|q| q.rate(Operation::JobDeviceOperation))
        .map(|r| r.per_second * 60.0)
}

/// The rate after `steps` increases of an exponential rate (or the fixed rate).
pub fn rate_after_steps(rate: &RateSpec, steps: u32) -> f64 {
    match *rate {
        RateSpec::Fixed { per_minute, .. } => per_minute as f64,
        RateSpec::Exponential {
            base_per_minute,
            factor,
            ..
        } => base_per_minute as f64 * factor.powi(steps as i32),
    }
}

/// Most devices in one job of a wave at `per_minute`: [`PART_SECONDS`] of the rate, at least 1.
pub fn part_max(per_minute: f64) -> usize {
    ((per_minute * PART_SECONDS as f64 / 60.0).ceil() as usize).max(1)
}

/// Splits a fleet of `fleet` devices (sorted) into waves: the canary, then waves of the rate's
/// wave size (fixed) or step size (exponential); the last wave holds what is left. Each wave's
/// rate assumes every earlier device succeeded; the executor recomputes it for
/// `succeeded:N` criteria with [`increases_after`]. `tier` clamps every rate.
pub fn plan_waves(
    fleet: usize,
    canary: Option<Canary>,
    rate: &RateSpec,
    tier: Option<Quotas>,
) -> Vec<WavePlan> {
    let cap = tier_per_minute(tier);
    let mut waves = Vec::new();
    let mut first = 0usize;
    let mut notified = 0u64;
    let push =
        |waves: &mut Vec<WavePlan>, first: usize, size: usize, canary: bool, notified: u64| {
            let steps = match rate {
                RateSpec::Fixed { .. } => 0,
                RateSpec::Exponential { after, .. } => (notified / after.count()) as u32,
            };
            let requested = rate_after_steps(rate, steps);
            let per_minute = cap.map_or(requested, |c| requested.min(c));
            waves.push(WavePlan {
                index: waves.len(),
                canary,
                first,
                size,
                requested_per_minute: requested,
                per_minute,
                // Part sizes follow the requested rate, not the tier's clamp: job ids must not
                // depend on which tier a run was told about (resume may be told another).
                part_max: part_max(requested),
            });
        };
    if let Some(c) = canary {
        let size = c.size(fleet as u64) as usize;
        if size > 0 {
            push(&mut waves, 0, size, true, 0);
            first = size;
            notified = size as u64;
        }
    }
    let step = match *rate {
        RateSpec::Fixed { wave_size, .. } => wave_size,
        RateSpec::Exponential { after, .. } => after.count(),
    }
    .max(1) as usize;
    while first < fleet {
        let size = step.min(fleet - first);
        push(&mut waves, first, size, false, notified);
        first += size;
        notified += size as u64;
    }
    waves
}

/// How many times an exponential rate has grown once `notified` devices were notified and
/// `succeeded` succeeded (0 for a fixed rate).
pub fn increases_after(rate: &RateSpec, notified: u64, succeeded: u64) -> u32 {
    match rate {
        RateSpec::Fixed { .. } => 0,
        RateSpec::Exponential { after, .. } => {
            let basis = match after {
                IncreaseCriteria::Notified(_) => notified,
                IncreaseCriteria::Succeeded(_) => succeeded,
            };
            u32::try_from(basis / after.count()).unwrap_or(u32::MAX)
        }
    }
}

/// How long a wave takes at least: its devices at its rate, and, when the tier is known, its
/// jobs one after the other at the tier's jobs device-operations rate.
pub fn wave_duration(wave: &WavePlan, tier: Option<Quotas>) -> Duration {
    let paced =
        Duration::from_secs_f64(wave.size as f64 * 60.0 / wave.per_minute.max(f64::MIN_POSITIVE));
    let work = tier
        .and_then(|q| q.job_duration(wave.size as u64))
        .unwrap_or(Duration::ZERO);
    paced.max(work)
}

/// The failure types a device can end a job with (AWS IoT Jobs' FAILED, TIMED_OUT, and the
/// IoT Hub-specific offline device, 404103 DeviceNotOnline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureType {
    /// The device answered with a non-2xx status, or the hub reported another error.
    Failed,
    /// The device did not answer in time (504101 GatewayTimeout), or the job ran out of time.
    TimedOut,
    /// The device was not connected (404103 DeviceNotOnline).
    Offline,
}

impl FailureType {
    /// Every type, in a fixed order.
    pub const ALL: [FailureType; 3] = [
        FailureType::Failed,
        FailureType::TimedOut,
        FailureType::Offline,
    ];

    /// The name used on the command line and in output.
    pub fn name(self) -> &'static str {
        match self {
            FailureType::Failed => "failed",
            FailureType::TimedOut => "timed-out",
            FailureType::Offline => "offline",
        }
    }

    fn parse(text: &str, what: &str) -> Result<FailureType, String> {
        match text.trim() {
            "failed" => Ok(FailureType::Failed),
            "timed-out" | "timedout" | "timeout" => Ok(FailureType::TimedOut),
            "offline" => Ok(FailureType::Offline),
            other => Err(format!(
                "{what}: unknown failure type `{other}`; use failed, timed-out or offline"
            )),
        }
    }
}

impl fmt::Display for FailureType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which failures an abort rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AbortScope {
    /// One failure type.
    Only(FailureType),
    /// Every failure type (AWS's `ALL`).
    All,
}

impl AbortScope {
    /// Whether a failure of `kind` counts for this scope.
    pub fn counts(self, kind: FailureType) -> bool {
        match self {
            AbortScope::Only(k) => k == kind,
            AbortScope::All => true,
        }
    }

    /// The scope's name, as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            AbortScope::Only(k) => k.name(),
            AbortScope::All => "all",
        }
    }
}

/// `--abort-when TYPE>PCT`: abort once the share of executed devices that failed so exceeds
/// `percent` (AWS IoT Jobs' `abortCriteriaList` with `thresholdPercentage`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortRule {
    /// Which failures count.
    pub scope: AbortScope,
    /// The threshold, a percentage (exceeding it aborts).
    pub percent: f64,
}

impl fmt::Display for AbortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}>{}%", self.scope.name(), self.percent)
    }
}

impl FromStr for AbortRule {
    type Err = String;

    fn from_str(text: &str) -> Result<AbortRule, String> {
        let hint = format!(
            "--abort-when `{text}`: give TYPE>PERCENT with TYPE failed, timed-out, offline or all, e.g. failed>10%"
        );
        let (scope, pct) = text.trim().split_once('>').ok_or_else(|| hint.clone())?;
        let scope = match scope.trim() {
            "all" => AbortScope::All,
            other => AbortScope::Only(FailureType::parse(other, "--abort-when")?),
        };
        let pct = pct.trim();
        let percent: f64 = pct
            .strip_suffix('%')
            .unwrap_or(pct)
            .trim()
            .parse()
            .map_err(|_| hint.clone())?;
        if !(0.0..100.0).contains(&percent) {
            return Err(format!(
                "--abort-when `{text}`: the threshold must be at least 0% and below 100%"
            ));
        }
        Ok(AbortRule { scope, percent })
    }
}

/// Executed devices so far, by outcome, as the abort rules count them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Executed {
    /// Devices that succeeded.
    pub succeeded: u64,
    /// Devices whose last attempt failed and that have no retry left, by type.
    pub failed: u64,
    /// Of those, timed out.
    pub timed_out: u64,
    /// Of those, offline.
    pub offline: u64,
}

impl Executed {
    /// Devices executed: succeeded or finally failed.
    pub fn total(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out + self.offline
    }

    /// Adds one final failure of `kind`.
    pub fn add_failure(&mut self, kind: FailureType) {
        match kind {
            FailureType::Failed => self.failed += 1,
            FailureType::TimedOut => self.timed_out += 1,
            FailureType::Offline => self.offline += 1,
        }
    }

    /// Failures counted by `scope`.
    pub fn failures(&self, scope: AbortScope) -> u64 {
        FailureType::ALL
            .iter()
            .filter(|k| scope.counts(**k))
            .map(|k| match k {
                FailureType::Failed => self.failed,
                FailureType::TimedOut => self.timed_out,
                FailureType::Offline => self.offline,
            })
            .sum()
    }

    /// The share of executed devices `scope` counts, in percent (0 with nothing executed).
    pub fn percent(&self, scope: AbortScope) -> f64 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        self.failures(scope) as f64 * 100.0 / total as f64
    }
}

/// Why a rollout aborts: the rule, its figure and the counts behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortDecision {
    /// The rule that fired, as written (`failed>10%`).
    pub rule: String,
    /// The failure share it measured, percent.
    pub percent: f64,
    /// The threshold, percent.
    pub threshold: f64,
    /// Failures it counted.
    pub failures: u64,
    /// Devices executed.
    pub executed: u64,
}

/// The first rule whose figure exceeds its threshold, once `min_executed` devices have
/// executed (`min_executed` is ignored when `ignore_minimum`: after the canary, which is the
/// sample the rules are meant to judge).
pub fn should_abort(
    rules: &[AbortRule],
    executed: &Executed,
    min_executed: u64,
    ignore_minimum: bool,
) -> Option<AbortDecision> {
    if executed.total() == 0 || (!ignore_minimum && executed.total() < min_executed) {
        return None;
    }
    rules.iter().find_map(|rule| {
        let percent = executed.percent(rule.scope);
        (percent > rule.percent).then(|| AbortDecision {
            rule: rule.to_string(),
            percent,
            threshold: rule.percent,
            failures: executed.failures(rule.scope),
            executed: executed.total(),
        })
    })
}

/// Retries per failure type, per device (AWS IoT Jobs' `jobExecutionsRetryConfig`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryCaps {
    /// After the device failed.
    pub failed: u32,
    /// After it timed out.
    pub timed_out: u32,
    /// After it was offline.
    pub offline: u32,
}

/// Most retries per failure type (AWS IoT Jobs allows 0 to 10).
pub const MAX_RETRIES: u32 = 10;

impl RetryCaps {
    /// The cap for `kind`.
    pub fn cap(&self, kind: FailureType) -> u32 {
        match kind {
            FailureType::Failed => self.failed,
            FailureType::TimedOut => self.timed_out,
            FailureType::Offline => self.offline,
        }
    }

    /// Whether any retry is configured.
    pub fn any(&self) -> bool {
        self.failed + self.timed_out + self.offline > 0
    }
}

impl FromStr for RetryCaps {
    type Err = String;

    /// `failed:2,timed-out:1,offline:3` (any subset, any order).
    fn from_str(text: &str) -> Result<RetryCaps, String> {
        let mut caps = RetryCaps::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (kind, n) = item.split_once(':').ok_or_else(|| {
                format!("--retry `{item}`: give TYPE:N, e.g. failed:2,timed-out:1,offline:3")
            })?;
            let kind = FailureType::parse(kind, "--retry")?;
            let n: u32 = n
                .trim()
                .parse()
                .ok()
                .filter(|n| *n <= MAX_RETRIES)
                .ok_or_else(|| format!("--retry `{item}`: N must be 0 to {MAX_RETRIES}"))?;
            match kind {
                FailureType::Failed => caps.failed = n,
                FailureType::TimedOut => caps.timed_out = n,
                FailureType::Offline => caps.offline = n,
            }
        }
        Ok(caps)
    }
}

/// The condition naming these devices: `deviceId IN ['a', 'b']`.
pub fn ids_condition(ids: &[String]) -> String {
    let mut text = String::from("deviceId IN [");
    for (n, id) in ids.iter().enumerate() {
        if n > 0 {
            text.push_str(", ");
        }
        text.push('\'');
        text.push_str(&escape_sql_string(id));
        text.push('\'');
    }
    text.push(']');
    text
}

/// Splits `ids` (in order) into parts of at most `max_count` ids whose [`ids_condition`] is at
/// most `max_chars` characters. Every part has at least one id.
pub fn chunk_ids(ids: &[String], max_count: usize, max_chars: usize) -> Vec<Vec<String>> {
    const OPEN_CLOSE: usize = "deviceId IN []".len();
    let mut parts: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut chars = OPEN_CLOSE;
    for id in ids {
        // `'id'` plus `, ` before every id but the first.
        let cost = escape_sql_string(id).chars().count() + 2;
        let sep = if current.is_empty() { 0 } else { 2 };
        if !current.is_empty()
            && (current.len() >= max_count.max(1) || chars + sep + cost > max_chars)
        {
            parts.push(std::mem::take(&mut current));
            chars = OPEN_CLOSE;
        }
        let sep = if current.is_empty() { 0 } else { 2 };
        chars += sep + cost;
        current.push(id.clone());
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

/// The id of one job of a rollout: `ro-<rollout>-w<wave>-a<attempt>-p<part>`. IoT Hub job ids
/// are up to 128 characters of letters, digits and `-` (among others); rollout ids are checked
/// to keep this well under.
pub fn job_id(rollout: &str, wave: usize, attempt: u32, part: usize) -> String {
    format!("ro-{rollout}-w{wave:02}-a{attempt}-p{part:02}")
}

/// A rollout job id read back: (wave, attempt, part), when `job_id` is one of `rollout`'s.
pub fn parse_job_id(rollout: &str, job_id: &str) -> Option<(usize, u32, usize)> {
    let rest = job_id
        .strip_prefix("ro-")?
        .strip_prefix(rollout)?
        .strip_prefix("-w")?;
    let (wave, rest) = rest.split_once("-a")?;
    let (attempt, part) = rest.split_once("-p")?;
    Some((
        wave.parse().ok()?,
        attempt.parse().ok()?,
        part.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hub_core::tier::Tier;

    fn sizes(waves: &[WavePlan]) -> Vec<usize> {
        waves.iter().map(|w| w.size).collect()
    }

    #[test]
    fn canary_then_fixed_waves_cover_the_fleet_once() {
        let rate = RateSpec::Fixed {
            per_minute: 600,
            wave_size: 5,
        };
        let waves = plan_waves(17, Some(Canary::Count(2)), &rate, None);
        assert_eq!(sizes(&waves), [2, 5, 5, 5]);
        assert!(waves[0].canary && !waves[1].canary);
        let mut next = 0;
        for w in &waves {
            assert_eq!(w.first, next, "waves are contiguous");
            next += w.size;
        }
        assert_eq!(next, 17);
        assert!(waves.iter().all(|w| w.per_minute == 600.0));
    }

    #[test]
    fn canary_share_rounds_up_and_never_exceeds_the_fleet() {
        assert_eq!(Canary::Percent(5.0).size(10_000), 500);
        assert_eq!(Canary::Percent(5.0).size(3), 1);
        assert_eq!(Canary::Count(50).size(3), 3);
        assert_eq!(Canary::Percent(100.0).size(7), 7);
        assert_eq!("5%".parse::<Canary>(), Ok(Canary::Percent(5.0)));
        assert_eq!("12".parse::<Canary>(), Ok(Canary::Count(12)));
        assert!("0".parse::<Canary>().is_err());
        assert!("150%".parse::<Canary>().is_err());
        assert!(
            "ten"
                .parse::<Canary>()
                .is_err_and(|e| e.contains("--canary"))
        );
    }

    #[test]
    fn exponential_rate_grows_per_step_of_notified_devices() {
        let rate = RateSpec::Exponential {
            base_per_minute: 100,
            factor: 2.0,
            after: IncreaseCriteria::Notified(50),
        };
        let waves = plan_waves(220, None, &rate, None);
        assert_eq!(sizes(&waves), [50, 50, 50, 50, 20]);
        let rates: Vec<f64> = waves.iter().map(|w| w.per_minute).collect();
        assert_eq!(rates, [100.0, 200.0, 400.0, 800.0, 1600.0]);
        // A canary counts as notified devices.
        let waves = plan_waves(220, Some(Canary::Count(50)), &rate, None);
        assert_eq!(waves[1].per_minute, 200.0);
    }

    #[test]
    fn succeeded_criteria_grow_only_with_successes() {
        let rate = RateSpec::Exponential {
            base_per_minute: 100,
            factor: 1.5,
            after: IncreaseCriteria::Succeeded(10),
        };
        assert_eq!(increases_after(&rate, 30, 9), 0);
        assert_eq!(increases_after(&rate, 30, 25), 2);
        assert_eq!(rate_after_steps(&rate, 2), 225.0);
        let fixed = RateSpec::Fixed {
            per_minute: 10,
            wave_size: 10,
        };
        assert_eq!(increases_after(&fixed, 1000, 1000), 0);
    }

    #[test]
    fn the_tier_clamps_the_rate_but_not_the_job_ids() {
        let rate = RateSpec::Fixed {
            per_minute: 6000,
            wave_size: 1000,
        };
        let s1 = Tier::S1.with_units(1).ok();
        let waves = plan_waves(2000, None, &rate, s1);
        // S1: 10 jobs device operations a second.
        assert!(waves.iter().all(|w| w.per_minute == 600.0));
        assert!(waves.iter().all(|w| w.requested_per_minute == 6000.0));
        let unclamped = plan_waves(2000, None, &rate, None);
        assert_eq!(waves[0].part_max, unclamped[0].part_max);
        // 1000 devices at 600/min: 100 s.
        assert_eq!(wave_duration(&waves[0], s1), Duration::from_secs(100));
        assert_eq!(wave_duration(&unclamped[0], None), Duration::from_secs(10));
    }

    #[test]
    fn parts_hold_ten_seconds_of_the_rate() {
        assert_eq!(part_max(600.0), 100);
        assert_eq!(part_max(1.0), 1);
        assert_eq!(part_max(61.0), 11);
    }

    #[test]
    fn abort_rules_parse_and_fire_above_the_threshold_after_the_minimum() {
        let rule: AbortRule = "failed>20%".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rule.scope, AbortScope::Only(FailureType::Failed));
        assert_eq!(rule.percent, 20.0);
        assert!("all>5".parse::<AbortRule>().is_ok());
        assert!("timed-out>100%".parse::<AbortRule>().is_err());
        assert!(
            "broken>5%"
                .parse::<AbortRule>()
                .is_err_and(|e| e.contains("unknown failure type"))
        );
        assert!(
            "failed=5%"
                .parse::<AbortRule>()
                .is_err_and(|e| e.contains("TYPE>PERCENT"))
        );
        let mut executed = Executed {
            succeeded: 3,
            ..Executed::default()
        };
        executed.add_failure(FailureType::Failed);
        // 1 of 4 = 25% > 20%, but only 4 executed of a minimum of 10.
        assert_eq!(should_abort(&[rule], &executed, 10, false), None);
        let decision = should_abort(&[rule], &executed, 10, true);
        assert!(decision.is_some_and(|d| d.percent == 25.0 && d.executed == 4 && d.failures == 1));
        assert!(should_abort(&[rule], &executed, 4, false).is_some());
        // Exactly at the threshold does not abort.
        let at: AbortRule = "failed>25%".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(should_abort(&[at], &executed, 1, false), None);
        let all: AbortRule = "all>40%".parse().unwrap_or_else(|e| panic!("{e}"));
        executed.add_failure(FailureType::Offline);
        assert!(should_abort(&[all], &executed, 1, false).is_none_or(|d| d.failures == 2));
        assert_eq!(executed.percent(AbortScope::All), 40.0);
    }

    #[test]
    fn retries_parse_per_type() {
        let caps: RetryCaps = "failed:2,timed-out:1,offline:3".parse().unwrap_or_default();
        assert_eq!(
            caps,
            RetryCaps {
                failed: 2,
                timed_out: 1,
                offline: 3
            }
        );
        assert!("failed:11".parse::<RetryCaps>().is_err());
        assert!(
            "failed"
                .parse::<RetryCaps>()
                .is_err_and(|e| e.contains("TYPE:N"))
        );
        assert!("lost:1".parse::<RetryCaps>().is_err());
    }

    #[test]
    fn id_chunks_stay_under_the_query_limit() {
        let ids: Vec<String> = (0..3000)
            .map(|i| format!("device-{i:06}-o'brien"))
            .collect();
        let parts = chunk_ids(&ids, usize::MAX, MAX_CONDITION_CHARS);
        assert!(parts.len() > 1);
        assert!(parts.iter().all(|p| {
            let c = ids_condition(p);
            c.len() <= MAX_CONDITION_CHARS && QUERY_PREFIX.len() + c.len() <= MAX_QUERY_CHARS
        }));
        // Every id once, in order.
        let flat: Vec<String> = parts.concat();
        assert_eq!(flat, ids);
        // A part is nearly full before a new one starts.
        let first = ids_condition(&parts[0]).len();
        assert!(first > MAX_CONDITION_CHARS - 40, "{first}");
        let by_count = chunk_ids(&ids[..25], 10, MAX_CONDITION_CHARS);
        assert_eq!(
            by_count.iter().map(Vec::len).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        assert_eq!(ids_condition(&["a'b".to_owned()]), r"deviceId IN ['a\'b']");
    }

    #[test]
    fn job_ids_round_trip_and_stay_short() {
        let id = job_id("0123456789ab", 3, 1, 12);
        assert_eq!(id, "ro-0123456789ab-w03-a1-p12");
        assert_eq!(parse_job_id("0123456789ab", &id), Some((3, 1, 12)));
        assert_eq!(parse_job_id("other", &id), None);
        assert!(job_id(&"x".repeat(40), 999, 10, 999).len() <= 128);
    }
}
