//! Background upkeep of the store: purging terminal jobs whose retention
//! ended, together with their index entries.

use std::sync::Arc;
use std::time::Duration;

use orchestrator::job::now_ms;
use orchestrator::store::JobStore;
use tokio_util::sync::CancellationToken;

const PURGE_BATCH: usize = 500;

/// Purges expired jobs every `interval` until `shutdown`. Safe with several
/// replicas: each purge is one atomic script over a bounded batch.
pub async fn run(store: Arc<dyn JobStore>, interval: Duration, shutdown: CancellationToken) {
    loop {
        match store.purge_expired(now_ms(), PURGE_BATCH).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(purged = n, "purged jobs past their retention");
                if n == PURGE_BATCH {
                    continue;
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention purge failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
