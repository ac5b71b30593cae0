//! The dispatcher: publishes jobs from the store's due-set (the outbox) to
//! the queue, and removes each from the due-set only once the broker has
//! confirmed it.
//!
//! A submit stores the job with a due-set entry already claimed by this
//! process and publishes it at once: alone when the dispatcher is idle,
//! together with the other jobs for its queue that arrived while earlier
//! publishes were under way otherwise (one `DispatchBatch` message, since
//! RabbitMQ's cost is per message). If the publish fails or the process
//! dies first, the claim runs out and the outbox loop of any replica
//! publishes the job. Claims are taken atomically in the store, so replicas
//! never publish the same entry at the same time; a duplicate after a
//! crash is harmless because workers are fenced by the lease.
//!
//! It also pushes cancellations to the worker that runs a job (a control
//! message on the queue, best effort: the worker's heartbeat poll is the
//! fallback), off the caller's path.

use std::sync::Arc;
use std::time::Duration;

use orchestrator::job::{ms_to_timestamp, now_ms};
use orchestrator::proto::v1::{ControlMessage, DispatchMessage, Job, control_message::Action};
use orchestrator::queue::{JobQueue, message};
use orchestrator::store::{DueJob, JobStore};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Settings of the outbox loop.
#[derive(Debug, Clone, Copy)]
pub struct DispatchConfig {
    /// How long a claimed entry is left alone before another dispatcher may
    /// publish it again.
    pub claim_ttl: Duration,
    /// How often the loop looks for due entries when it found none.
    pub poll_interval: Duration,
    /// Most entries claimed at once.
    pub batch: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            claim_ttl: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            batch: 500,
        }
    }
}

/// Publishes of just-created jobs under way at once; what arrives while
/// they are goes out with the next ones. Two: a message's cost (to
/// RabbitMQ, orchd and the worker that takes it) is per message, so
/// waiting for a confirm to gather more jobs into the next one is cheaper
/// than more messages in flight (at saturation, CPU per job over the whole
/// machine: 15 % less than with 8, 7 % less than with 4; an idle
/// dispatcher still publishes at once). The second keeps jobs moving while
/// one confirm is slow.
const PUBLISHES_IN_FLIGHT: usize = 2;
/// Most just-created jobs gathered for one round of publishes.
const MAX_GATHERED: usize = 500;

/// Publishes jobs; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    publisher: Arc<Publisher>,
    config: DispatchConfig,
    /// Just-created jobs, to the task that gathers them (see
    /// [`Dispatcher::dispatch_many_soon`]).
    soon: mpsc::UnboundedSender<DueJob>,
}

/// What publishes, shared by the dispatcher's clones and its tasks.
struct Publisher {
    store: Arc<dyn JobStore>,
    queue: Arc<dyn JobQueue>,
}

impl Dispatcher {
    /// A dispatcher from `store`'s due-set to `queue`. Starts the task
    /// that publishes just-created jobs; it ends with the last clone.
    pub fn new(store: Arc<dyn JobStore>, queue: Arc<dyn JobQueue>, config: DispatchConfig) -> Self {
        let publisher = Arc::new(Publisher { store, queue });
        let (soon, gathered) = mpsc::unbounded_channel();
        tokio::spawn(gather(publisher.clone(), gathered));
        Dispatcher {
            publisher,
            config,
            soon,
        }
    }

    /// The claim duration, in ms.
    pub fn claim_ttl_ms(&self) -> i64 {
        self.config.claim_ttl.as_millis() as i64
    }

    /// Publishes a just-created job in the background.
    pub fn dispatch_soon(&self, job: &Job, claim: i64) {
        self.dispatch_many_soon([job], claim);
    }

    /// Publishes just-created jobs in the background. Jobs for one queue
    /// that are waiting together go out as one message (up to
    /// [`message::MAX_BATCH`]): the jobs of one SubmitJobs call, and the
    /// single submits that arrived while earlier publishes were under way.
    /// A job waits for no timer: an idle dispatcher publishes at once. If
    /// the job cannot be handed over (the server is stopping), its due
    /// entry stays and the outbox publishes it.
    pub fn dispatch_many_soon<'a>(&self, jobs: impl IntoIterator<Item = &'a Job>, claim: i64) {
        for due in jobs.into_iter().filter_map(|job| due_of(job, claim)) {
            let _ = self.soon.send(due);
        }
    }

    /// Tells the worker running `job` (RUNNING, with its cancel requested)
    /// to stop its attempt, in the background. Nothing waits for it and a
    /// failure is only logged: the worker also learns of the cancel from
    /// its next heartbeat.
    pub fn push_cancel(&self, job: &Job) {
        if job.worker_id.is_empty() {
            return;
        }
        let message = ControlMessage {
            action: Action::Cancel as i32,
            job_id: job.id.clone(),
            attempt: job.attempt,
            sent_at: Some(ms_to_timestamp(now_ms())),
        };
        let worker_id = job.worker_id.clone();
        let queue = self.publisher.queue.clone();
        tokio::spawn(async move {
            match queue.send_control(&worker_id, &message).await {
                Ok(()) => {
                    tracing::debug!(job_id = %message.job_id, worker_id = %worker_id, attempt = message.attempt, "cancel pushed to the worker")
                }
                Err(e) => {
                    tracing::warn!(job_id = %message.job_id, worker_id = %worker_id, error = %e, "could not push the cancel; the worker's heartbeat will see it")
                }
            }
        });
    }

    /// Runs the outbox loop until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let now = now_ms();
            let claimed = self
                .publisher
                .store
                .claim_due(now, now + self.claim_ttl_ms(), self.config.batch)
                .await;
            let pause = match claimed {
                Ok(due) if due.is_empty() => self.config.poll_interval,
                Ok(due) => {
                    let full = due.len() == self.config.batch;
                    let published = futures::future::join_all(
                        by_queue(due).into_iter().map(|g| self.publisher.publish(g)),
                    )
                    .await;
                    if published.iter().all(|ok| *ok) {
                        failures = 0;
                    } else {
                        failures += 1;
                    }
                    if full && failures == 0 {
                        Duration::ZERO
                    } else {
                        backoff(failures, self.config.poll_interval)
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "outbox: cannot read the due-set");
                    backoff(failures, self.config.poll_interval)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Publishes just-created jobs: waits for one, then for a free publish
/// slot, and takes along every job that arrived meanwhile.
async fn gather(publisher: Arc<Publisher>, mut gathered: mpsc::UnboundedReceiver<DueJob>) {
    let slots = Arc::new(Semaphore::new(PUBLISHES_IN_FLIGHT));
    while let Some(first) = gathered.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut round = vec![first];
        while round.len() < MAX_GATHERED {
            match gathered.try_recv() {
                Ok(due) => round.push(due),
                Err(_) => break,
            }
        }
        let publisher = publisher.clone();
        tokio::spawn(async move {
            futures::future::join_all(by_queue(round).into_iter().map(|g| publisher.publish(g)))
                .await;
            drop(slot);
        });
    }
}

impl Publisher {
    /// Publishes claimed entries of one queue (one message, or a batch
    /// message for several) and acknowledges them in the store. Returns
    /// whether the broker confirmed it.
    async fn publish(&self, group: Vec<DueJob>) -> bool {
        let now = Some(ms_to_timestamp(now_ms()));
        let messages: Vec<DispatchMessage> = group
            .iter()
            .map(|due| DispatchMessage {
                job_id: due.id.to_string(),
                kind: due.kind.clone(),
                queue: due.queue.clone(),
                attempt: due.attempt + 1,
                published_at: now,
                namespace: due.namespace.clone(),
                max_attempts: due.max_attempts,
            })
            .collect();
        if let Err(e) = self.queue.publish_batch(&messages).await {
            for due in &group {
                tracing::warn!(job_id = %due.id, error = %e, "publish failed; the outbox will retry");
            }
            return false;
        }
        for due in &group {
            tracing::debug!(job_id = %due.id, queue = %due.queue, "dispatched");
        }
        let acks: Vec<(Uuid, i64)> = group.iter().map(|due| (due.id, due.claim)).collect();
        if let Err(e) = self.store.ack_due(&acks).await {
            // The entries come due again and the jobs are published twice;
            // workers drop the duplicates.
            for due in &group {
                tracing::warn!(job_id = %due.id, error = %e, "could not clear the due entry");
            }
        }
        true
    }
}

/// The due entry of a just-created job.
fn due_of(job: &Job, claim: i64) -> Option<DueJob> {
    Some(DueJob {
        id: Uuid::try_parse(&job.id).ok()?,
        kind: job.kind.clone(),
        queue: job.queue.clone(),
        namespace: orchestrator::validate::job_namespace(job).to_owned(),
        max_attempts: job.max_attempts,
        attempt: job.attempt,
        claim,
    })
}

/// Groups entries by the queue they go to (namespace and queue), in their
/// order, in groups of at most [`message::MAX_BATCH`]: one message each.
fn by_queue(due: Vec<DueJob>) -> Vec<Vec<DueJob>> {
    let mut groups: Vec<Vec<DueJob>> = Vec::new();
    let mut open: std::collections::HashMap<(String, String), usize> =
        std::collections::HashMap::new();
    for entry in due {
        let key = (entry.namespace.clone(), entry.queue.clone());
        match open.get(&key) {
            Some(&i) if groups[i].len() < message::MAX_BATCH => groups[i].push(entry),
            _ => {
                open.insert(key, groups.len());
                groups.push(vec![entry]);
            }
        }
    }
    groups
}

fn backoff(failures: u32, base: Duration) -> Duration {
    (base * 2u32.saturating_pow(failures.min(5))).min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    //! The gathering of just-created jobs, on the in-memory store and a
    //! queue of this test that holds publishes until told to go on.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use orchestrator::error::Result;
    use orchestrator::store::embedded::EmbeddedStore;
    use tokio::sync::Notify;

    use super::*;

    #[derive(Default)]
    struct HeldQueue {
        /// The size of every message published.
        sizes: Mutex<Vec<usize>>,
        hold: AtomicBool,
        release: Notify,
    }

    #[async_trait]
    impl JobQueue for HeldQueue {
        async fn publish(&self, message: &DispatchMessage) -> Result<()> {
            self.publish_batch(std::slice::from_ref(message)).await
        }

        async fn publish_batch(&self, messages: &[DispatchMessage]) -> Result<()> {
            self.sizes.lock().unwrap().push(messages.len());
            while self.hold.load(Ordering::SeqCst) {
                self.release.notified().await;
            }
            Ok(())
        }

        async fn send_control(&self, _: &str, _: &ControlMessage) -> Result<()> {
            Ok(())
        }

        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    fn job(queue: &str) -> Job {
        Job {
            id: Uuid::new_v4().to_string(),
            kind: "noop".into(),
            queue: queue.into(),
            max_attempts: 3,
            ..Job::default()
        }
    }

    /// The sizes published once there are `messages` of them. Waits on the
    /// clock, not a count of yields: a slot frees only after the store's
    /// acks, which run on the blocking pool.
    async fn published(queue: &HeldQueue, messages: usize) -> Vec<usize> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            let sizes = queue.sizes.lock().unwrap().clone();
            if sizes.len() >= messages {
                return sizes;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!(
            "expected {messages} messages, got {:?}",
            queue.sizes.lock().unwrap()
        );
    }

    #[tokio::test]
    async fn an_idle_dispatcher_publishes_a_lone_job_at_once() {
        let queue = Arc::new(HeldQueue::default());
        let store = Arc::new(EmbeddedStore::in_memory(Duration::from_secs(60)).unwrap());
        let dispatcher = Dispatcher::new(store, queue.clone(), DispatchConfig::default());
        dispatcher.dispatch_soon(&job("a"), 0);
        assert_eq!(published(&queue, 1).await, vec![1]);
    }

    #[tokio::test]
    async fn jobs_arriving_while_publishes_are_under_way_go_out_together_per_queue() {
        let queue = Arc::new(HeldQueue::default());
        queue.hold.store(true, Ordering::SeqCst);
        let store = Arc::new(EmbeddedStore::in_memory(Duration::from_secs(60)).unwrap());
        let dispatcher = Dispatcher::new(store, queue.clone(), DispatchConfig::default());
        // Every publish slot taken by a held lone job.
        for n in 0..PUBLISHES_IN_FLIGHT {
            dispatcher.dispatch_soon(&job("a"), 0);
            published(&queue, n + 1).await;
        }
        // Meanwhile: 60 jobs for queue a, 3 for queue b.
        for _ in 0..60 {
            dispatcher.dispatch_soon(&job("a"), 0);
        }
        for _ in 0..3 {
            dispatcher.dispatch_soon(&job("b"), 0);
        }
        queue.hold.store(false, Ordering::SeqCst);
        queue.release.notify_waiters();
        let mut sizes = published(&queue, PUBLISHES_IN_FLIGHT + 3).await;
        let later = sizes.split_off(PUBLISHES_IN_FLIGHT);
        assert_eq!(sizes, vec![1; PUBLISHES_IN_FLIGHT]);
        let mut later = later;
        later.sort_unstable();
        assert_eq!(
            later,
            vec![3, 10, 50],
            "queue a in messages of 50 and 10, queue b in one"
        );
    }
}
