//! orch-worker's entry point: parse flags, set up logging, run the built-in
//! handlers until SIGINT or SIGTERM.

use clap::Parser;
use orchestrator::process;
use orchestrator_worker::{LogFormat, Registry, WorkerConfig};
use tokio_util::sync::CancellationToken;

// One thread: the built-in handlers only wait on timers, sockets and child
// processes, and a job's path through the worker (delivery, StartAttempt,
// FinishAttempt) is a chain of wake-ups that costs less on one thread than
// handed between threads: one-at-a-time latency p50 1.70 -> 1.47 ms and p99
// 2.4 -> 1.8 ms in the same session (bench/HISTORY.md). Embedders with
// CPU-heavy handlers call `orchestrator_worker::run` on a runtime of their own.
#[tokio::main(flavor = "current_thread")]
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
