//! Control messages orchd pushes to this worker (worker.proto,
//! "Cancellation"): the consumer of this process's own RabbitMQ control
//! queue `orch.control.<worker id>`, and its in-process equivalent for
//! `orchd dev`. A CANCEL for an attempt that runs here has its lease
//! checked with orchd at once (a Heartbeat for it alone), and orchd's
//! answer stops it; anything else is ignored. The check is what keeps
//! job state orchd's alone: whoever may publish to the broker can put a
//! message on this queue, but only a cancel orchd recorded stops a job.
//!
//! Pushes are best effort, so this consumer is never allowed to stop the
//! worker: when it fails (the broker restarts, an operator deletes the
//! queue) it reconnects with backoff ([`crate::reconnect`]) on a connection
//! of its own, while jobs keep running and the heartbeat poll covers the
//! gap. Its queue is exclusive to that connection, so the broker deletes it
//! when the worker goes away.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use orchestrator::proto::v1::ControlMessage;
use orchestrator::proto::v1::control_message::Action;
use orchestrator::queue::memory::ControlSubscription;
use orchestrator::queue::{amqp, message, topology};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::lease::{Leases, Pushed};
use crate::reconnect::Reconnect;

/// How long closing the control connection may take on the way out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Acts on one control message.
pub(crate) fn apply(leases: &Leases, msg: &ControlMessage) {
    match Action::try_from(msg.action) {
        Ok(Action::Cancel) => match leases.cancel_pushed(&msg.job_id, msg.attempt) {
            Pushed::Checking => {
                tracing::debug!(job_id = %msg.job_id, attempt = msg.attempt, "cancel pushed; checking it with orchd")
            }
            Pushed::AlreadyStopping => {
                tracing::debug!(job_id = %msg.job_id, attempt = msg.attempt, "cancel pushed for an attempt already stopping")
            }
            Pushed::Stale { running } => {
                tracing::info!(job_id = %msg.job_id, attempt = msg.attempt, running, "cancel pushed for another attempt of a job running here; ignored")
            }
            Pushed::NotRunning => {
                tracing::debug!(job_id = %msg.job_id, attempt = msg.attempt, "cancel pushed for an attempt not running here")
            }
        },
        _ => {
            tracing::debug!(action = msg.action, job_id = %msg.job_id, "unknown control message ignored")
        }
    }
}

/// What the RabbitMQ control consumer needs to know.
#[derive(Debug, Clone)]
pub(crate) struct ControlSettings {
    pub amqp_url: String,
    /// TLS settings of an `amqps://` URL, the job consumer's.
    pub amqp_tls: lapin::tcp::OwnedTLSConfig,
    pub worker_id: String,
}

/// Consumes this worker's control queue until `stop`, reconnecting
/// whenever it fails. `ready` fires once the queue is first declared and
/// consumed.
pub(crate) async fn consume_amqp(
    leases: Arc<Leases>,
    settings: ControlSettings,
    ready: oneshot::Sender<()>,
    stop: CancellationToken,
) {
    let mut ready = Some(ready);
    let mut reconnect = Reconnect::default();
    loop {
        let wait = match session(&leases, &settings, &mut ready, &mut reconnect, &stop).await {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost(why)) => {
                let wait = reconnect.ended();
                tracing::warn!(reason = %why, failures = reconnect.failures(), retry_in = ?wait, "control queue consumer ended; reconnecting (cancels reach running jobs through heartbeats meanwhile)");
                wait
            }
            Err(e) => {
                let wait = reconnect.ended();
                tracing::warn!(error = %e, failures = reconnect.failures(), retry_in = ?wait, "cannot consume the control queue; retrying (cancels reach running jobs through heartbeats meanwhile)");
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

enum Ended {
    Stopped,
    Lost(String),
}

/// Connects, declares and consumes the control queue; returns when the
/// consumer ends.
async fn session(
    leases: &Leases,
    settings: &ControlSettings,
    ready: &mut Option<oneshot::Sender<()>>,
    reconnect: &mut Reconnect,
    stop: &CancellationToken,
) -> orchestrator::Result<Ended> {
    let setup = async {
        let name = format!("orch-worker {} control", settings.worker_id);
        let connection =
            amqp::connect_with_tls(&settings.amqp_url, &name, &settings.amqp_tls).await?;
        let channel = connection.create_channel().await?;
        topology::declare_base(&channel).await?;
        let queue = topology::declare_control_queue(&channel, &settings.worker_id).await?;
        // No acks: a control message is worth nothing once delivered.
        let options = BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..BasicConsumeOptions::default()
        };
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                format!("{}.control", settings.worker_id).as_str().into(),
                options,
                FieldTable::default(),
            )
            .await?;
        Ok::<_, orchestrator::Error>((connection, consumer, queue))
    };
    let (connection, mut consumer, queue) = tokio::select! {
        _ = stop.cancelled() => return Ok(Ended::Stopped),
        ready = setup => ready?,
    };
    reconnect.established();
    tracing::info!(queue = %queue, "receiving pushed cancels");
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    let ended = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ended::Stopped,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => match message::decode_control(&delivery.data) {
                    Ok((msg, _)) => apply(leases, &msg),
                    Err(e) => tracing::warn!(error = %e, bytes = delivery.data.len(), "malformed control message ignored"),
                },
                Some(Err(e)) => break Ended::Lost(e.to_string()),
                None => break Ended::Lost("the broker cancelled the consumer (was the queue deleted?)".into()),
            },
        }
    };
    let closing = async {
        if connection.status().connected() {
            let _ = connection.close(200, "bye".into()).await;
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    Ok(ended)
}

/// Takes this worker's control messages from the in-process queue until
/// `stop`.
pub(crate) async fn consume_memory(
    leases: Arc<Leases>,
    mut subscription: ControlSubscription,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            next = subscription.recv() => match next {
                Some(msg) => apply(&leases, &msg),
                None => return,
            },
        }
    }
}
