//! schedule-job binary: parse arguments, wire Ctrl-C/SIGTERM to a cancellation token, run, exit.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = schedule_job::Args::parse();
    let shutdown = hub_core::shutdown::token_on_signal();
    match schedule_job::run(args, shutdown).await {
        Ok(schedule_job::Outcome::Success) => ExitCode::SUCCESS,
        Ok(outcome @ schedule_job::Outcome::Failed(_)) => {
            if let schedule_job::Outcome::Failed(reason) = &outcome {
                eprintln!("schedule-job: {reason}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(error) => {
            eprintln!("schedule-job: error: {:#}", anyhow::Error::from(error));
            ExitCode::from(2)
        }
    }
}
