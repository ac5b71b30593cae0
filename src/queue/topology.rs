//! Names and declarations of every exchange and queue.
//!
//! One direct exchange routes dispatches on the job's queue name to a
//! durable classic queue per job queue; each of those dead-letters rejected
//! messages to one dead-letter queue. Classic queues, not quorum queues: on
//! RabbitMQ 3.10 a freshly declared quorum queue lost confirmed messages
//! across a `kill -9` on this kind of machine (see the README's notes).
//!
//! A second direct exchange carries control messages (pushed cancellations)
//! to one worker each: every worker process has its own exclusive,
//! auto-delete queue bound with its worker id as the routing key, so the
//! queue lives exactly as long as the worker's connection and a message for
//! a worker that is gone is simply unroutable.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::error::Result;

/// Direct exchange for dispatches; the routing key is the job queue name.
pub const JOBS_EXCHANGE: &str = "orch.jobs";
/// Exchange rejected messages are dead-lettered to.
pub const DEAD_LETTER_EXCHANGE: &str = "orch.dlx";
/// Queue that keeps dead-lettered messages for inspection.
pub const DEAD_LETTER_QUEUE: &str = "orch.dead";
/// Prefix of the RabbitMQ queue of each job queue.
pub const QUEUE_PREFIX: &str = "orch.q.";
/// Direct exchange for control messages; the routing key is the worker id.
pub const CONTROL_EXCHANGE: &str = "orch.control";
/// Prefix of each worker's control queue.
pub const CONTROL_QUEUE_PREFIX: &str = "orch.control.";

/// The RabbitMQ queue that holds the dispatches of job queue `queue`.
pub fn queue_name(queue: &str) -> String {
    format!("{QUEUE_PREFIX}{queue}")
}

/// The control queue of the worker `worker_id`.
pub fn control_queue_name(worker_id: &str) -> String {
    format!("{CONTROL_QUEUE_PREFIX}{worker_id}")
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Declares the exchanges and the dead-letter queue. Idempotent.
pub async fn declare_base(channel: &Channel) -> Result<()> {
    channel
        .exchange_declare(
            JOBS_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            CONTROL_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            DEAD_LETTER_QUEUE.into(),
            QueueDeclareOptions::durable(),
            classic_arguments(),
        )
        .await?;
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

fn classic_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("classic".into()),
    );
    args
}

/// Declares the queue of job queue `queue` and binds it. Idempotent; needs
/// [`declare_base`] first.
pub async fn declare_job_queue(channel: &Channel, queue: &str) -> Result<()> {
    let name = queue_name(queue);
    let mut args = classic_arguments();
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    channel
        .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
        .await?;
    channel
        .queue_bind(
            name.as_str().into(),
            JOBS_EXCHANGE.into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Declares the control queue of worker `worker_id` on this channel's
/// connection (exclusive: only it may consume, and the broker deletes the
/// queue when the connection closes) and binds it. Returns the queue name.
/// Needs [`declare_base`] first.
pub async fn declare_control_queue(channel: &Channel, worker_id: &str) -> Result<String> {
    let name = control_queue_name(worker_id);
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.as_str().into(), options, classic_arguments())
        .await?;
    channel
        .queue_bind(
            name.as_str().into(),
            CONTROL_EXCHANGE.into(),
            worker_id.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_queues_live_under_one_prefix() {
        assert_eq!(queue_name("default"), "orch.q.default");
        assert!(queue_name("x").starts_with(QUEUE_PREFIX));
    }

    #[test]
    fn control_queues_are_named_for_their_worker() {
        assert_eq!(control_queue_name("host-12-ab"), "orch.control.host-12-ab");
        // Job queue names never start with the control prefix.
        assert!(!queue_name("control.x").starts_with(CONTROL_QUEUE_PREFIX));
    }
}
