//! Command-line interface: the tutorial's defaults, the Jobs v2 subcommands, and value parsers.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use time::OffsetDateTime;

const EXAMPLES: &str = "\
Examples:
  # The tutorial: lockDoor in 20 s and desired {building:43,floor:3} in 10 s on myDeviceId
  schedule-job
  schedule-job --device-id dev7 --method-delay 2s --twin-delay 1s --status-interval 1s
  # The same pair as IoT Hub jobs (Jobs v2), starting at now + delay
  schedule-job --hub-jobs

  # Hub-side jobs over a twin query
  schedule-job method lockDoor --payload '{\"lockTime\":\"10m\"}' --query \"tags.building = '43'\" --wait
  schedule-job twin --desired '{\"floor\":3}' --tags '{\"zone\":\"b\"}' --device-id d1 --device-id d2 --start-in 5m
  schedule-job method reboot --query '*' --dry-run          # which devices would it hit now?
  schedule-job method reboot --query '*' --dry-run --tier S1   # ... and how long would it take on S1?
  schedule-job method lockDoor --query '*' --client-side --concurrency 256   # the tutorial's way, at scale
  schedule-job status JOB_ID --wait
  schedule-job list --type method --status running --output json
  schedule-job results JOB_ID
  schedule-job cancel JOB_ID

  # Staged rollouts: a canary, then waves at a rate; abort, retries, resume (docs/rollouts.md)
  schedule-job rollout method lockDoor --query '*' --canary 5% --max-per-minute 600 \\
      --abort-when 'failed>10%' --abort-min-executed 20 --retry timed-out:1,offline:3 --tier S1
  schedule-job rollout twin --desired '{\"fw\":\"2.1\"}' --query \"tags.zone = 'b'\" \\
      --base-rate 50 --increment-factor 2 --rate-increase-after succeeded:100 --dry-run
  schedule-job rollout status ROLLOUT_ID
  schedule-job rollout resume ROLLOUT_ID --stop-starting-at 2030-01-02T06:00:00Z

Hub, first found wins: --connection-string; --hub-env PATH; IOTHUB_CONNECTION_STRING (a service
policy such as iothubowner or service); the local hub-emulator's default hub.env. CA from
--ca-file, else the one that came with the connection string (hub.env) or IOTHUB_CA_FILE.
Tier (for predictions): --tier [--units], else hub.env's (the emulator's --tier), else
IOTHUB_TIER [IOTHUB_UNITS].
Exit codes: 0 done and nothing failed; 1 a device or job failed, was cancelled or interrupted
(or, for `results`, has not finished); 2 bad input, configuration or connection error (bad input
is caught before anything is created; a connection lost while following a job leaves the job
running on the hub).";

/// Schedule and broadcast IoT Hub jobs: the tutorial's delayed lockDoor method and twin update,
/// and IoT Hub Jobs v2 over a twin query with live progress and per-device results.
#[derive(Debug, Clone, Parser)]
#[command(name = "schedule-job", version, after_long_help = EXAMPLES, after_help = "See --help for examples.")]
pub struct Args {
    /// Where the hub is and how to trust it.
    #[command(flatten)]
    pub hub: HubArgs,
    /// Output format: `human` (tables and sentences) or `json` (one document; JSON lines while waiting).
    #[arg(long, value_enum, default_value_t = OutputFormat::Human, global = true)]
    pub output: OutputFormat,
    /// The tutorial's settings (no subcommand).
    #[command(flatten)]
    pub tutorial: TutorialArgs,
    /// Hub-side job commands; without one, runs the tutorial.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Connection settings.
#[derive(Debug, Clone, ClapArgs)]
pub struct HubArgs {
    /// Service connection string (`HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`);
    /// prefer the IOTHUB_CONNECTION_STRING variable, which stays out of shell history.
    #[arg(long, value_name = "STRING", global = true)]
    pub connection_string: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. the hub-emulator's ca.pem [env: IOTHUB_CA_FILE].
    #[arg(long, value_name = "PATH", global = true)]
    pub ca_file: Option<PathBuf>,
    /// The local hub-emulator's hub.env, used when no connection string is given
    /// [default: DATA_DIR/iothub-emulator/hub.env].
    #[arg(long, value_name = "PATH", global = true)]
    pub hub_env: Option<PathBuf>,
    /// The hub's tier (F1, S1, S2, S3; B1-B3), for predictions such as how long a job takes;
    /// our tools cannot ask Azure for it [env: IOTHUB_TIER; default: the hub-emulator's
    /// `--tier`, from its hub.env].
    #[arg(long, value_name = "TIER", global = true)]
    pub tier: Option<hub_core::tier::Tier>,
    /// Units of the hub's tier [env: IOTHUB_UNITS; default: 1].
    #[arg(long, value_name = "N", global = true)]
    pub units: Option<u32>,
}

/// The tutorial flow (no subcommand).
#[derive(Debug, Clone, ClapArgs)]
pub struct TutorialArgs {
    /// The device to lock and update.
    #[arg(long, value_name = "ID", default_value = "myDeviceId")]
    pub device_id: String,
    /// Delay before invoking lockDoor.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub method_delay: Duration,
    /// Delay before patching the desired properties.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub twin_delay: Duration,
    /// How often to print the jobs' state.
    #[arg(long, value_name = "DURATION", default_value = "6s", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// Run the pair as IoT Hub Jobs v2 (startTime = now + delay) instead of client-side timers.
    #[arg(long)]
    pub hub_jobs: bool,
}

/// Hub-side job commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Invoke a direct method on every device a query matches, as a hub job (or client-side).
    Method(MethodArgs),
    /// Patch desired properties and/or tags of every device a query matches, as a hub job.
    Twin(TwinArgs),
    /// Show a job; with --wait, follow it to the end.
    Status(StatusArgs),
    /// List jobs, optionally by type and status.
    List(ListArgs),
    /// Cancel a job.
    Cancel(JobIdArg),
    /// Per-device outcomes of a job.
    Results(JobIdArg),
    /// Staged, rate-limited, self-aborting rollouts with retries, as a series of hub jobs.
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

/// `rollout` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum RolloutCommand {
    /// Roll a direct method out over the devices a query matches, in waves.
    Method(RolloutMethodArgs),
    /// Roll a twin patch out over the devices a query matches, in waves.
    Twin(RolloutTwinArgs),
    /// Continue a rollout from the hub's record of what ran.
    Resume(RolloutResumeArgs),
    /// Show a rollout's waves and counts.
    Status(RolloutStatusArgs),
}

/// `rollout method` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct RolloutMethodArgs {
    /// The method and how the hub calls it.
    #[command(flatten)]
    pub call: MethodCallArgs,
    /// Where, how and when.
    #[command(flatten)]
    pub plan: RolloutPlanArgs,
}

/// `rollout twin` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct RolloutTwinArgs {
    /// The patch.
    #[command(flatten)]
    pub patch: TwinPatchArgs,
    /// Where, how and when.
    #[command(flatten)]
    pub plan: RolloutPlanArgs,
}

/// What `rollout method` and `rollout twin` share: the devices, the rollout, and this run.
#[derive(Debug, Clone, ClapArgs)]
pub struct RolloutPlanArgs {
    /// Which devices.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Waves, abort rules, retries.
    #[command(flatten)]
    pub rollout: RolloutArgs,
    /// Window, tier, state.
    #[command(flatten)]
    pub run: RolloutRunArgs,
}

/// What makes a rollout: its waves, rate, abort rules and retries (the rollout id derives from
/// these and from what is rolled out where).
#[derive(Debug, Clone, ClapArgs)]
#[command(group = clap::ArgGroup::new("rate").required(true).multiple(false))]
pub struct RolloutArgs {
    /// The first wave, alone: a count (10) or a share of the fleet (5%). The abort rules judge
    /// it on its own, whatever --abort-min-executed says.
    #[arg(long, value_name = "N|PCT%")]
    pub canary: Option<crate::rollout::plan::Canary>,
    /// Fixed rate: at most N devices notified a minute.
    #[arg(long, value_name = "N", group = "rate", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_per_minute: Option<u64>,
    /// With --max-per-minute: devices per wave [default: the rate, a minute's worth].
    #[arg(long, value_name = "N", requires = "max_per_minute", value_parser = clap::value_parser!(u64).range(1..))]
    pub wave_size: Option<u64>,
    /// Exponential rate: devices a minute in the first wave.
    #[arg(long, value_name = "N", group = "rate", requires = "rate_increase_after", value_parser = clap::value_parser!(u64).range(1..))]
    pub base_rate: Option<u64>,
    /// Exponential rate: the rate is multiplied by F at each step (1.1 to 5).
    #[arg(long, value_name = "F", default_value_t = 2.0, requires = "base_rate")]
    pub increment_factor: f64,
    /// Exponential rate: a step (one wave) is N more devices notified or succeeded.
    #[arg(long, value_name = "notified:N|succeeded:N", requires = "base_rate")]
    pub rate_increase_after: Option<crate::rollout::plan::IncreaseCriteria>,
    /// Abort when a failure share exceeds a threshold: TYPE>PCT with TYPE failed, timed-out,
    /// offline or all (repeat for several rules).
    #[arg(long = "abort-when", value_name = "TYPE>PCT")]
    pub abort_when: Vec<crate::rollout::plan::AbortRule>,
    /// The abort rules apply once this many devices have executed.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub abort_min_executed: u64,
    /// Retries per device by failure type, run as later jobs over just those devices,
    /// e.g. failed:2,timed-out:1,offline:3.
    #[arg(long, value_name = "TYPE:N,..")]
    pub retry: Option<crate::rollout::plan::RetryCaps>,
    /// Pause before a retry job (gives offline devices time to come back).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// Each job fails if it runs longer than this.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub max_execution: Duration,
    /// Rollout id [default: derived from what, where and how, so re-running the same command
    /// resumes the same rollout].
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Print the plan (waves, sizes, the time it takes on --tier) and create nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// How this run goes: the window and where state is kept (not part of the rollout's identity:
/// `resume` takes them anew). The hub's tier comes from the global `--tier [--units]` (or
/// hub.env, or IOTHUB_TIER): rates are clamped to its jobs device-operations rate and the plan
/// says how long it takes.
#[derive(Debug, Clone, ClapArgs)]
pub struct RolloutRunArgs {
    /// Create no job before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub start_at: Option<OffsetDateTime>,
    /// Create no job from this time on (RFC 3339): the end of the window.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub stop_starting_at: Option<OffsetDateTime>,
    /// At the window's end, let the running job finish (stop) or cancel it (cancel).
    #[arg(long, value_enum, value_name = "stop|cancel", default_value_t = WindowEnd::Stop)]
    pub at_window_end: WindowEnd,
    /// Where rollout state files are [default: DATA_DIR/schedule-job/rollouts].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// What happens to a running job when the window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowEnd {
    /// Let it finish.
    Stop,
    /// Cancel it.
    Cancel,
}

/// `rollout resume` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct RolloutResumeArgs {
    /// The rollout id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Window, tier, state.
    #[command(flatten)]
    pub run: RolloutRunArgs,
}

/// `rollout status` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct RolloutStatusArgs {
    /// The rollout id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Where rollout state files are [default: DATA_DIR/schedule-job/rollouts].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// `method` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct MethodArgs {
    /// The method and how the hub calls it.
    #[command(flatten)]
    pub call: MethodCallArgs,
    /// Which devices.
    #[command(flatten)]
    pub target: TargetArgs,
    /// When and how.
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Invoke directly on each matched device through the REST API (the tutorial's approach),
    /// instead of creating a hub job.
    #[arg(long)]
    pub client_side: bool,
    /// With --client-side: how many invocations are in flight at once.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
}

/// A direct method: its name, payload and timeouts (`method` and `rollout method`).
#[derive(Debug, Clone, ClapArgs)]
pub struct MethodCallArgs {
    /// The method name, e.g. lockDoor.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// JSON payload sent to each device.
    #[arg(long, value_name = "JSON", default_value = "null", value_parser = parse_json)]
    pub payload: Value,
    /// How long the hub waits for each device's answer (5s..300s).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub response_timeout: Duration,
    /// How long the hub waits for a disconnected device to connect (0s..300s).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

/// `twin` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct TwinArgs {
    /// The patch.
    #[command(flatten)]
    pub patch: TwinPatchArgs,
    /// Which devices.
    #[command(flatten)]
    pub target: TargetArgs,
    /// When and how.
    #[command(flatten)]
    pub schedule: ScheduleArgs,
}

/// A twin patch: desired properties and/or tags (`twin` and `rollout twin`).
#[derive(Debug, Clone, ClapArgs)]
#[command(group = clap::ArgGroup::new("patch").required(true).multiple(true))]
pub struct TwinPatchArgs {
    /// Desired properties patch (JSON object; `null` values delete).
    #[arg(long, value_name = "JSON", value_parser = parse_json_object, group = "patch")]
    pub desired: Option<serde_json::Map<String, Value>>,
    /// Tags patch (JSON object; `null` values delete).
    #[arg(long, value_name = "JSON", value_parser = parse_json_object, group = "patch")]
    pub tags: Option<serde_json::Map<String, Value>>,
}

/// Which devices a job targets.
#[derive(Debug, Clone, ClapArgs)]
#[command(group = clap::ArgGroup::new("target").required(true).multiple(false))]
pub struct TargetArgs {
    /// WHERE clause over device twins, e.g. "tags.building = '43'", or '*' for all devices.
    #[arg(long, value_name = "CONDITION", group = "target")]
    pub query: Option<String>,
    /// A device id (repeat for several).
    #[arg(long = "device-id", value_name = "ID", group = "target")]
    pub device_ids: Vec<String>,
}

/// Start time, limits and waiting.
#[derive(Debug, Clone, ClapArgs)]
pub struct ScheduleArgs {
    /// Start after this delay (default: now).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "start_at")]
    pub start_in: Option<Duration>,
    /// Start at this time (RFC 3339, e.g. 2030-01-02T03:04:05Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub start_at: Option<OffsetDateTime>,
    /// The job fails if it runs longer than this.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub max_execution: Duration,
    /// Job id (default: a new UUID).
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Follow the job with a progress bar and print per-device results at the end.
    #[arg(long)]
    pub wait: bool,
    /// Only list the devices the query matches now; create nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `status` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct StatusArgs {
    /// The job id.
    #[arg(value_name = "JOB_ID")]
    pub job_id: String,
    /// Follow the job to its end.
    #[arg(long)]
    pub wait: bool,
}

/// `list` arguments.
#[derive(Debug, Clone, ClapArgs)]
pub struct ListArgs {
    /// Only jobs of this type.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub job_type: Option<JobKind>,
    /// Only jobs in this status (queued, scheduled, running, completed, failed, cancelled...).
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
}

/// A job id argument.
#[derive(Debug, Clone, ClapArgs)]
pub struct JobIdArg {
    /// The job id.
    #[arg(value_name = "JOB_ID")]
    pub job_id: String,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Sentences and tables.
    Human,
    /// JSON for scripts.
    Json,
}

/// Job types as the command line names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JobKind {
    /// scheduleDeviceMethod.
    Method,
    /// scheduleUpdateTwin.
    Twin,
}

pub use hub_core::duration::parse as parse_duration;

/// Parses an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`{text}` is not an RFC 3339 time such as 2030-01-02T03:04:05Z ({e})"))
}

/// Parses JSON text.
pub fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e}): {text}"))
}

/// Parses JSON text that must be an object.
pub fn parse_json_object(text: &str) -> Result<serde_json::Map<String, Value>, String> {
    match parse_json(text)? {
        Value::Object(map) => Ok(map),
        other => Err(format!(
            "expected a JSON object such as {{\"floor\":3}}, got {}",
            match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn json_objects() {
        assert!(parse_json_object(r#"{"floor":3}"#).is_ok());
        assert!(parse_json_object("[1]").is_err_and(|e| e.contains("array")));
        assert!(parse_json_object("{floor:3}").is_err_and(|e| e.contains("not valid JSON")));
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn subcommands_parse() {
        let a = Args::try_parse_from([
            "schedule-job",
            "method",
            "lockDoor",
            "--query",
            "*",
            "--wait",
        ]);
        assert!(a.is_ok_and(|a| matches!(a.command, Some(Command::Method(m)) if m.schedule.wait)));
        let a = Args::try_parse_from(["schedule-job", "twin", "--device-id", "a"]);
        assert!(a.is_err(), "a twin job needs a patch");
        let a = Args::try_parse_from(["schedule-job", "method", "x"]);
        assert!(a.is_err(), "a method job needs a target");
        let a = Args::try_parse_from(["schedule-job", "--method-delay", "1s"]);
        assert!(a.is_ok_and(
            |a| a.command.is_none() && a.tutorial.method_delay == Duration::from_secs(1)
        ));
    }
}
