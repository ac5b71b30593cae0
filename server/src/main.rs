//! orchd's entry point: parse flags, set up logging, run until SIGINT or
//! SIGTERM.

use clap::Parser;
use orchestrator::process;
use orchestrator_server::config::{Cli, Command, LogFormat};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    process::init_logs(cli.log_format == LogFormat::Json);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        process::shutdown_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    match cli.command {
        Command::Serve(config) => orchestrator_server::run(config, shutdown).await?,
        Command::Dev(config) => orchestrator_server::dev::run(config, shutdown).await?,
    }
    tracing::info!("orchd stopped");
    Ok(())
}
