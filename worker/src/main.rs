//! orch-worker's entry point: parse flags, set up logging, run the built-in
//! handlers until SIGINT or SIGTERM.

use clap::Parser;
use orchestrator::process;
use orchestrator_worker::{LogFormat, Registry, WorkerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = WorkerConfig::parse();
    process::init_logs(config.log_format == LogFormat::Json);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        process::shutdown_signal().await;
        tracing::info!("shutting down: no new jobs; waiting for running ones");
        on_signal.cancel();
    });
    let registry = Registry::with_builtins(&config);
    orchestrator_worker::run(config, registry, shutdown).await?;
    Ok(())
}
