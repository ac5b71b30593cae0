//! Consuming dispatches from RabbitMQ: one connection and channel with
//! manual acks and a prefetch of `--concurrency`, a consumer per job queue,
//! reconnection with backoff ([`crate::reconnect`]) whenever the broker goes
//! away or cancels any one of the consumers (an operator deleted its queue:
//! reconnecting declares it again), and what to do with each delivery:
//!
//! * undecodable → reject without requeue (it dead-letters to `orch.dead`);
//! * StartAttempt says RUN → ack at once, then run the attempt (from then on
//!   the lease, not the broker, protects the job);
//! * DROP → ack; unknown job (NOT_FOUND) → reject without requeue (within
//!   a batch: that dispatch alone goes to the dead-letter exchange as a
//!   message of its own, and the batch is acked);
//! * orchd unreachable or failing → requeue after a backoff.
//!
//! Since a message is acked when its attempt starts, the prefetch does not
//! bound how many jobs run: a semaphore of `--concurrency` permits does, and
//! a delivery waits for a permit before StartAttempt. So up to
//! `--concurrency` more messages per queue can reach a busy worker (and all
//! of them go back if the worker dies or shuts down). Each dispatch waits
//! there for a permit for [`SLOT_WAIT`] at most: a message none of whose
//! dispatches got one goes back to the queue, and the dispatches of a batch
//! message (up to 50) still waiting then are handed back as a new message
//! (published with confirms before the batch is acked). So a busy worker
//! never keeps jobs from an idle one for long.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use orchestrator::proto::v1::DispatchMessage;
use orchestrator::queue::{amqp, message, topology};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attempt::{self, Shared, StartOutcome};
use crate::reconnect::Reconnect;

/// What the consumer needs to know.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerSettings {
    pub amqp_url: String,
    /// TLS settings of an `amqps://` URL.
    pub amqp_tls: lapin::tcp::OwnedTLSConfig,
    pub queues: Vec<String>,
    /// The namespace whose queues these are.
    pub namespace: String,
    /// Jobs run at once; also the prefetch.
    pub concurrency: u16,
    pub worker_id: String,
}

/// How long closing the broker connection may take on the way out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a dispatch waits for a free slot before it goes back to the
/// queue for another worker. A busy worker is sent up to `--concurrency`
/// messages (they are acked when their attempts start, so they do not fill
/// the prefetch); each bounces at most this often while every worker is
/// busy, a small price for never leaving a job waiting long in a busy
/// worker while an idle one could run it. Long enough that short jobs free
/// slots within it: handing back is for jobs that would wait seconds.
const SLOT_WAIT: Duration = Duration::from_secs(1);

/// Consumes until `shutdown`, then stops consuming and returns once every
/// delivery taken is either running as an attempt (in `attempts`) or back
/// with the broker.
pub(crate) async fn consume(
    shared: Arc<Shared>,
    settings: ConsumerSettings,
    attempts: TaskTracker,
    shutdown: CancellationToken,
) {
    let consumer = Consumer {
        slots: Arc::new(Semaphore::new(usize::from(settings.concurrency))),
        shared,
        settings,
        attempts,
        pending: TaskTracker::new(),
        shutdown,
    };
    let mut reconnect = Reconnect::default();
    loop {
        if consumer.shutdown.is_cancelled() {
            break;
        }
        let wait = match consumer.session(&mut reconnect).await {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::Lost(why)) => {
                let wait = reconnect.ended();
                tracing::warn!(reason = %why, failures = reconnect.failures(), retry_in = ?wait, "rabbitmq consumer ended; reconnecting");
                wait
            }
            Err(e) => {
                let wait = reconnect.ended();
                tracing::warn!(error = %e, failures = reconnect.failures(), retry_in = ?wait, "cannot consume from rabbitmq; retrying");
                wait
            }
        };
        tokio::select! {
            _ = consumer.shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Deliveries of earlier, lost sessions may still be in StartAttempt;
    // once they are done, no attempt can start any more.
    consumer.pending.close();
    consumer.pending.wait().await;
}

enum Ended {
    Shutdown,
    Lost(String),
}

/// An item of a session's consumers, merged.
// Nearly every item is a delivery: boxing it to shrink the rare end marker
// would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Consumed {
    Delivery(lapin::Result<Delivery>),
    /// The consumer of this queue (its RabbitMQ name) ended.
    Ended(String),
}

/// The consuming side of the worker.
struct Consumer {
    shared: Arc<Shared>,
    settings: ConsumerSettings,
    /// One permit per job that may run at once.
    slots: Arc<Semaphore>,
    /// Running attempts.
    attempts: TaskTracker,
    /// Deliveries taken but not yet acked, rejected or handed back.
    pending: TaskTracker,
    shutdown: CancellationToken,
}

impl Consumer {
    /// Connects, declares, consumes; returns when the consumer ends.
    async fn session(&self, reconnect: &mut Reconnect) -> orchestrator::Result<Ended> {
        let settings = &self.settings;
        let setup = async {
            let name = format!("orch-worker {}", settings.worker_id);
            let connection =
                amqp::connect_with_tls(&settings.amqp_url, &name, &settings.amqp_tls).await?;
            let channel = connection.create_channel().await?;
            // Where the part of a batch this worker cannot start yet goes
            // back to its queue, with confirms.
            let publisher = connection.create_channel().await?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            // Per consumer (global = false), the usual RabbitMQ meaning.
            channel
                .basic_qos(settings.concurrency, BasicQosOptions { global: false })
                .await?;
            topology::declare_base(&channel).await?;
            let mut consumers = Vec::with_capacity(settings.queues.len());
            let ns = settings.namespace.as_str();
            for queue in &settings.queues {
                topology::declare_job_queue(&channel, ns, queue).await?;
                let name = topology::queue_name(ns, queue);
                let consumer = channel
                    .basic_consume(
                        name.as_str().into(),
                        format!("{}.{queue}", settings.worker_id).as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                consumers.push((name, consumer));
            }
            Ok::<_, orchestrator::Error>((connection, channel, publisher, consumers))
        };
        let (connection, channel, publisher, consumers) = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(Ended::Shutdown),
            ready = setup => ready?,
        };
        reconnect.established();
        tracing::info!(namespace = %settings.namespace, queues = ?settings.queues, prefetch = settings.concurrency, "consuming from rabbitmq");

        let tags: Vec<_> = consumers.iter().map(|(_, c)| c.tag()).collect();
        // select_all drops a stream that ends and goes on with the others,
        // so each consumer's end is made an item of its own: the broker
        // cancelling any one consumer (its queue deleted, its node down)
        // must end the session, whose reconnect declares and consumes every
        // queue again.
        let mut deliveries =
            futures::stream::select_all(consumers.into_iter().map(|(queue, consumer)| {
                let end = futures::stream::once(futures::future::ready(Consumed::Ended(queue)));
                consumer.map(Consumed::Delivery).chain(end)
            }));
        // Fired when this session ends: deliveries still waiting for a slot
        // give up (the broker requeues them when the channel closes or died).
        let gone = CancellationToken::new();
        let broken = CancellationToken::new();
        let ended = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ended::Shutdown,
                _ = broken.cancelled() => break Ended::Lost("the channel for publishing dispatches back failed".into()),
                next = deliveries.next() => match next {
                    Some(Consumed::Delivery(Ok(delivery))) => {
                        let job = Delivered {
                            shared: self.shared.clone(),
                            publisher: publisher.clone(),
                            broken: broken.clone(),
                            slots: self.slots.clone(),
                            attempts: self.attempts.clone(),
                            gone: gone.clone(),
                        };
                        self.pending.spawn(job.handle(delivery));
                    }
                    Some(Consumed::Delivery(Err(e))) => break Ended::Lost(e.to_string()),
                    Some(Consumed::Ended(queue)) => break Ended::Lost(format!("the broker cancelled the consumer of {queue} (was the queue deleted?)")),
                    // Only with no queue at all: each consumer's end comes first.
                    None => break Ended::Lost("no consumer left".into()),
                },
            }
        };
        gone.cancel();
        if matches!(ended, Ended::Shutdown) {
            tracing::info!("stopping consumption");
            stop_consuming(&channel, &tags).await;
            // Let StartAttempt calls under way finish and ack on this
            // channel before closing it.
            self.pending.close();
            self.pending.wait().await;
        }
        close(&connection, &channel).await;
        Ok(ended)
    }
}

/// Cancels the consumers so that no new message arrives.
async fn stop_consuming(channel: &Channel, tags: &[lapin::types::ShortString]) {
    for tag in tags {
        let cancel = channel.basic_cancel(tag.clone(), BasicCancelOptions::default());
        match tokio::time::timeout(CLOSE_TIMEOUT, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cancelling a consumer failed"),
            Err(_) => tracing::debug!("cancelling a consumer timed out"),
        }
    }
}

/// Closes the channel and connection; the broker requeues whatever this
/// worker took and did not ack (prefetched messages).
async fn close(connection: &Connection, channel: &Channel) {
    let closing = async {
        if channel.status().connected() {
            let _ = channel.close(200, "bye".into()).await;
        }
        if connection.status().connected() {
            let _ = connection.close(200, "bye".into()).await;
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
}

/// One delivery's handling, up to the ack.
struct Delivered {
    shared: Arc<Shared>,
    /// The session's channel for handing dispatches back and dead-lettering
    /// them (confirm mode).
    publisher: Channel,
    /// Fired when that channel is in doubt: the session ends and connects
    /// again.
    broken: CancellationToken,
    slots: Arc<Semaphore>,
    attempts: TaskTracker,
    gone: CancellationToken,
}

/// How one dispatch's wait for a slot ended.
enum Waited {
    /// It got one and was handled.
    Handled(Handled),
    /// None came before the deadline.
    NoSlot,
    /// The channel died or the worker is stopping: the broker requeues the
    /// message by itself.
    Gone,
}

/// What became of one dispatch of a delivery.
enum Handled {
    /// The attempt runs (it holds a slot until it ends).
    Started,
    /// No slot was free for it: it is back in the queue, in a message of
    /// its own.
    HandedBack,
    /// orchd said to drop it (a duplicate, or the job moved on).
    Dropped,
    /// orchd does not know the job.
    Unknown,
    /// StartAttempt (or the hand-back) failed; the message must go back to
    /// the queue after this wait.
    Failed(Duration),
}

impl Delivered {
    /// Handles a delivery: one dispatch, or a batch of them (AMQP `type`
    /// [`message::BATCH_TYPE`]), each started as if it had come alone.
    ///
    /// Each dispatch is started as soon as it has a free slot, for
    /// [`SLOT_WAIT`] at most. If none got one, the message goes back to
    /// the queue; if some did, the rest is handed back: published to the
    /// queue again as a message of its own, for whichever worker has slots
    /// first. So a busy worker does not sit on dispatches that an idle one
    /// could run, and a worker whose jobs are short (its slots free up
    /// within the wait) starts a whole batch itself.
    ///
    /// The message is acked once each dispatch was started or dropped and
    /// the rest (if any) confirmed by the broker, and goes back to the
    /// queue when one could not be started yet or the hand-back failed (the
    /// ones that were started are dropped as duplicates when it comes
    /// again).
    async fn handle(self, delivery: Delivery) {
        let batch = message::is_batch(delivery.properties.kind().as_ref().map(|k| k.as_str()));
        let dispatches = match message::decode_dispatches(batch, &delivery.data) {
            Ok(dispatches) => dispatches,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    bytes = delivery.data.len(),
                    routing_key = %delivery.routing_key,
                    "malformed dispatch; rejecting it to the dead-letter queue"
                );
                reject(&delivery, None).await;
                return;
            }
        };
        let label = if batch {
            format!(
                "batch of {} from {}",
                dispatches.len(),
                dispatches[0].job_id
            )
        } else {
            dispatches[0].job_id.clone()
        };
        // Each dispatch waits for a free slot before StartAttempt, so an
        // attempt only starts (and its lease only runs) when it can run; but
        // not past the deadline, so that a busy worker does not sit on jobs
        // an idle one could run.
        let deadline = tokio::time::Instant::now() + SLOT_WAIT;
        let (this, acker) = (&self, &delivery.acker);
        let waited = futures::future::join_all(dispatches.iter().map(|dispatch| async move {
            let slot = tokio::select! {
                slot = tokio::time::timeout_at(deadline, this.slots.clone().acquire_owned()) => slot,
                _ = this.gone.cancelled() => return Waited::Gone,
            };
            match slot {
                Err(_) => Waited::NoSlot,
                Ok(Err(_)) => Waited::Gone,
                // The channel died while the message waited: the broker has
                // already put it back.
                Ok(Ok(_)) if !acker.usable() => Waited::Gone,
                Ok(Ok(slot)) => Waited::Handled(this.start(dispatch, slot).await),
            }
        }))
        .await;
        if waited.iter().any(|w| matches!(w, Waited::Gone)) {
            return;
        }
        if waited.iter().all(|w| matches!(w, Waited::NoSlot)) {
            tracing::debug!(job_id = %label, waited = ?SLOT_WAIT, "no free slot; the message goes back to the queue");
            requeue(&delivery, &label).await;
            return;
        }
        let mut handled = Vec::with_capacity(dispatches.len());
        let mut rest = Vec::new();
        let mut unknown = Vec::new();
        for (dispatch, waited) in dispatches.into_iter().zip(waited) {
            match waited {
                Waited::Handled(Handled::Unknown) if batch => {
                    unknown.push(dispatch);
                    handled.push(Handled::Unknown);
                }
                Waited::Handled(h) => handled.push(h),
                _ => rest.push(dispatch),
            }
        }
        // When a start failed the whole message goes back to the queue, so
        // handing the rest back as well would only copy it.
        if !handled.iter().any(|h| matches!(h, Handled::Failed(_))) {
            handled.extend(self.hand_back(&delivery, &rest).await);
        }
        let wait = handled
            .iter()
            .filter_map(|h| match h {
                Handled::Failed(wait) => Some(*wait),
                _ => None,
            })
            .max();
        if let Some(wait) = wait {
            // Hold the message for a while, so that an unreachable orchd is
            // not hit by a redelivery loop.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.gone.cancelled() => return,
            }
            requeue(&delivery, &label).await;
            return;
        }
        if !batch && matches!(handled[0], Handled::Unknown) {
            reject(&delivery, Some(&label)).await;
            return;
        }
        self.dead_letter(&delivery, &unknown).await;
        ack(&delivery, &label).await;
    }

    /// Sends the dispatches of a batch for jobs orchd does not know to the
    /// dead-letter queue, as a message of their own: what rejecting does
    /// for a single dispatch, without rejecting the jobs that did start.
    /// Best effort: orchd has nothing to lose for such a job, so a failed
    /// publish is only logged.
    async fn dead_letter(&self, delivery: &Delivery, unknown: &[DispatchMessage]) {
        let Some(first) = unknown.first() else {
            return;
        };
        let exchange = topology::DEAD_LETTER_EXCHANGE;
        let routing_key = delivery.routing_key.as_str();
        if let Err(e) = self.publish(exchange, routing_key, unknown).await {
            tracing::warn!(job_id = %first.job_id, dispatches = unknown.len(), error = %e, "could not dead-letter dispatches for unknown jobs; dropped");
        }
    }

    /// Publishes `dispatches` as one message on the session's publishing
    /// channel; a failure that leaves the channel in doubt ends the session,
    /// so that the worker connects again.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        dispatches: &[DispatchMessage],
    ) -> Result<(), amqp::Unconfirmed> {
        let published =
            amqp::publish_dispatches(&self.publisher, exchange, routing_key, dispatches).await;
        if matches!(&published, Err(e) if e.needs_reconnect()) {
            self.broken.cancel();
        }
        published
    }

    /// Publishes `rest`, the dispatches of `delivery` that got no slot in
    /// time, to their queue again; `None` when there are none.
    async fn hand_back(&self, delivery: &Delivery, rest: &[DispatchMessage]) -> Option<Handled> {
        let first = rest.first()?;
        // The way the message came (orchd's exchange and routing key, or the
        // queue's name on the default exchange when an operator moved
        // messages back by hand) leads back to this queue.
        let (exchange, routing_key) = (delivery.exchange.as_str(), delivery.routing_key.as_str());
        match self.publish(exchange, routing_key, rest).await {
            Ok(()) => {
                tracing::debug!(job_id = %first.job_id, dispatches = rest.len(), "no free slot for these; handed them back to the queue");
                Some(Handled::HandedBack)
            }
            Err(e) => {
                let wait = self.shared.start_backoff();
                tracing::warn!(job_id = %first.job_id, dispatches = rest.len(), error = %e, retry_in = ?wait, "could not hand dispatches back; the whole message goes back to the queue");
                Some(Handled::Failed(wait))
            }
        }
    }

    /// Starts one dispatch in `slot`; the attempt then runs on its own,
    /// holding the slot.
    async fn start(&self, dispatch: &DispatchMessage, slot: OwnedSemaphorePermit) -> Handled {
        let job_id = dispatch.job_id.as_str();
        match attempt::start(&self.shared, dispatch).await {
            StartOutcome::Run(started) => {
                // The attempt is orchd's record now, so the message has done
                // its work: the run need not wait for the ack to be written
                // (a round trip through lapin's I/O thread), and a failed
                // ack only means a redelivery that orchd will drop.
                let shared = self.shared.clone();
                self.attempts.spawn(run_holding(shared, *started, slot));
                Handled::Started
            }
            StartOutcome::Drop(reason) => {
                tracing::info!(job_id = %job_id, reason = %reason, "orchd says drop this message");
                Handled::Dropped
            }
            StartOutcome::UnknownJob(message) => {
                tracing::warn!(job_id = %job_id, error = %message, "dispatch for an unknown job; dropping it (a message of its own goes to the dead-letter queue)");
                Handled::Unknown
            }
            StartOutcome::Failed(status) => {
                let wait = self.shared.start_backoff();
                if crate::rpc::is_transient(status.code()) {
                    tracing::warn!(
                        job_id = %job_id,
                        code = ?status.code(),
                        error = %status.message(),
                        retry_in = ?wait,
                        "StartAttempt failed; the message goes back to the queue"
                    );
                } else {
                    // INVALID_ARGUMENT (e.g. a --lease outside orchd's bounds),
                    // UNAUTHENTICATED (--token): a setting of this worker is
                    // wrong. Keep the message for a worker that is right.
                    tracing::error!(
                        job_id = %job_id,
                        code = ?status.code(),
                        error = %status.message(),
                        retry_in = ?wait,
                        "orchd refused StartAttempt; check this worker's settings; the message goes back to the queue"
                    );
                }
                Handled::Failed(wait)
            }
        }
    }
}

/// Runs an attempt, keeping its slot until it ends.
async fn run_holding(shared: Arc<Shared>, started: attempt::Started, slot: OwnedSemaphorePermit) {
    attempt::run(shared, started).await;
    drop(slot);
}

async fn ack(delivery: &Delivery, job_id: &str) {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        // A redelivery of this message will be dropped by orchd: the job is
        // RUNNING under our live lease.
        Ok(false) => tracing::warn!(
            job_id = %job_id,
            "could not ack (channel closed); a redelivery will be dropped"
        ),
        Err(e) => {
            tracing::warn!(job_id = %job_id, error = %e, "ack failed; a redelivery will be dropped")
        }
    }
}

/// Hands the message back to the queue, for any consumer.
async fn requeue(delivery: &Delivery, job_id: &str) {
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(e) = delivery.acker.nack(requeue).await {
        tracing::debug!(job_id = %job_id, error = %e, "nack failed; the broker requeues on channel loss");
    }
}

async fn reject(delivery: &Delivery, job_id: Option<&str>) {
    if let Err(e) = delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
    {
        tracing::warn!(job_id = job_id.unwrap_or(""), error = %e, "reject failed");
    }
}
