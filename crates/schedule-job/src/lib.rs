//! schedule-job: the tutorial's "schedule and broadcast jobs" back end, and IoT Hub Jobs v2 from
//! the command line, over hub-core's [`ServiceClient`](hub_core::service_client::ServiceClient).
//!
//! Module map:
//! - [`cli`]: arguments, examples and value parsers.
//! - [`settings`]: connection string and CA from flags, environment or the emulator's hub.env.
//! - [`tutorial`]: the default flow (two delayed calls, or two hub jobs with `--hub-jobs`).
//! - [`jobs`]: hub-side job subcommands, `--wait` progress and per-device results.
//! - [`fanout`]: `method --client-side`, direct calls with bounded concurrency.
//! - [`forecast`]: what the hub's tier says about a job (least duration, active-job cap).
//! - [`rollout`]: staged rollouts (canary, rates, abort rules, retries, window, resume).
//! - [`report`], [`output`]: per-device outcomes and how they are printed.
//!
//! [`run`] does it all and returns an [`Outcome`]; `main.rs` only maps it to an exit code.

pub mod cli;
pub mod error;
pub mod fanout;
pub mod forecast;
pub mod jobs;
pub mod output;
pub mod report;
pub mod rollout;
pub mod settings;
pub mod tutorial;

use tokio_util::sync::CancellationToken;

pub use cli::Args;
pub use error::Error;

use crate::cli::Command;
use crate::output::{Output, note};

/// How a run ended, when it got to talk to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything asked for succeeded.
    Success,
    /// Something failed, was cancelled or interrupted; the reason says what.
    Failed(String),
}

impl Outcome {
    /// 0 for success, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Failed(_) => 1,
        }
    }
}

/// Runs schedule-job with parsed arguments until done or until `shutdown` is cancelled.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<Outcome, Error> {
    run_labelled(args, "", shutdown).await
}

/// [`run`], with `label` written before every line of human output (for running beside other
/// programs in one process, as the tutorial example does).
pub async fn run_labelled(
    args: Args,
    label: &'static str,
    shutdown: CancellationToken,
) -> Result<Outcome, Error> {
    let out = Output {
        format: args.output,
        label,
    };
    let hub = settings::resolve(&args.hub, &|k| std::env::var(k).ok())?;
    if hub.origin != "--connection-string" {
        note(format!(
            "hub: {} (from {})",
            hub.connection.host_name, hub.origin
        ));
    }
    let client = settings::client(&hub, pool_size(&args))?;
    match &args.command {
        None => tutorial::run(&client, &hub, &args.tutorial, out, &shutdown).await,
        Some(Command::Method(m)) if m.client_side => fanout::run(&client, m, out, &shutdown).await,
        Some(Command::Method(m)) => jobs::method(&client, &hub, m, out, &shutdown).await,
        Some(Command::Twin(t)) => jobs::twin(&client, &hub, t, out, &shutdown).await,
        Some(Command::Status(s)) => jobs::status(&client, &s.job_id, s.wait, out, &shutdown).await,
        Some(Command::List(l)) => jobs::list(&client, l, out).await,
        Some(Command::Cancel(c)) => jobs::cancel(&client, &c.job_id, out).await,
        Some(Command::Results(r)) => jobs::results(&client, &r.job_id, out).await,
        Some(Command::Rollout(r)) => {
            rollout::command(&client, hub.tier.as_ref(), r, out, &shutdown).await
        }
    }
}

fn pool_size(args: &Args) -> usize {
    match &args.command {
        Some(Command::Method(m)) if m.client_side => m.concurrency as usize,
        _ => 8,
    }
}
