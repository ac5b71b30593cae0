//! Consuming dispatches from an in-process [`MemoryQueue`], for the workers
//! that `orchd dev` runs inside the server's process. Everything after the
//! message arrives (StartAttempt, leases, reports) is the same code and the
//! same gRPC protocol as with RabbitMQ.

use std::sync::Arc;

use orchestrator::queue::memory::MemoryQueue;
use orchestrator::queue::message;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attempt::{self, Shared, StartOutcome};

/// Takes messages from `queue` (every job queue when `queues` is empty)
/// until `shutdown`, running at most `concurrency` attempts at once.
pub(crate) async fn consume(
    shared: Arc<Shared>,
    queue: MemoryQueue,
    queues: Vec<String>,
    concurrency: u16,
    attempts: TaskTracker,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(usize::from(concurrency)));
    let mut turn = 0usize;
    loop {
        // A slot first, so a message is only taken when it can run.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = queue.receive(&queues, turn) => received,
        };
        turn = turn.wrapping_add(1);
        let dispatch = match message::decode(&received.body) {
            Ok((dispatch, _)) => dispatch,
            Err(e) => {
                tracing::warn!(error = %e, queue = %received.queue, "malformed dispatch dropped");
                continue;
            }
        };
        let job_id = dispatch.job_id.clone();
        match attempt::start(&shared, &dispatch).await {
            StartOutcome::Run(started) => {
                let shared = shared.clone();
                attempts.spawn(async move {
                    attempt::run(shared, *started).await;
                    drop(slot);
                });
            }
            StartOutcome::Drop(reason) => {
                tracing::info!(job_id = %job_id, %reason, "orchd says drop this message");
            }
            StartOutcome::UnknownJob(message) => {
                tracing::warn!(job_id = %job_id, error = %message, "dispatch for an unknown job dropped");
            }
            StartOutcome::Failed(status) => {
                // Hand the message back after a pause, as with RabbitMQ.
                let wait = shared.start_backoff();
                tracing::warn!(job_id = %job_id, code = ?status.code(), error = %status.message(), retry_in = ?wait, "StartAttempt failed; the message goes back to the queue");
                let queue = queue.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    queue.push(&received.queue, received.body);
                });
            }
        }
    }
}
