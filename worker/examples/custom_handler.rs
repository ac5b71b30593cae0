//! A worker binary with a job kind of its own, next to the built-ins.
//!
//! ```text
//! cargo run -p orchestrator-worker --example custom_handler -- --queues default
//! orchctl submit word-count --payload '{"text": "to be or not to be"}'
//! ```

use std::collections::BTreeMap;

use clap::Parser;
use orchestrator_worker::{Handler, HandlerError, JobContext, Registry, WorkerConfig, to_struct};
use pbjson_types::Struct;
use tokio_util::sync::CancellationToken;

/// Counts the words of `text`; a long text is processed in chunks, checking
/// for cancellation between them.
struct WordCount;

#[async_trait::async_trait]
impl Handler for WordCount {
    async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError> {
        let payload = ctx.payload_json();
        let text = payload
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| HandlerError::invalid_field("text", "is required (a string)"))?;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (i, word) in text.split_whitespace().enumerate() {
            if i % 10_000 == 0 && ctx.is_cancelled() {
                return Err(HandlerError::Cancelled);
            }
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
        tracing::info!(job_id = %ctx.job_id, distinct = counts.len(), "counted words");
        to_struct(serde_json::json!({ "counts": counts, "attempt": ctx.attempt }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let config = WorkerConfig::parse();
    let mut registry = Registry::with_builtins(&config);
    registry.register("word-count", WordCount)?;

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    orchestrator_worker::run(config, registry, shutdown).await?;
    Ok(())
}
