//! `sim-device`: the tutorial's simulated device. See `sim-device --help`.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = sim_device::Args::parse();
    let config = match sim_device::Config::from_args(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = hub_core::shutdown::token_on_signal();
        match sim_device::run(config, shutdown).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                let code = e.exit_code();
                eprintln!("error: {:#}", anyhow::Error::from(e));
                ExitCode::from(code)
            }
        }
    })
}
