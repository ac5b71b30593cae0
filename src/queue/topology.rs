//! Names and declarations of every exchange and queue.
//!
//! One direct exchange routes dispatches on the job's queue name to a
//! durable classic queue per job queue; each of those dead-letters rejected
//! messages to one dead-letter queue. Classic queues, not quorum queues: on
//! RabbitMQ 3.10 a freshly declared quorum queue lost confirmed messages
//! across a `kill -9` on this kind of machine (see the README's notes).

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

/// The RabbitMQ queue that holds the dispatches of job queue `queue`.
pub fn queue_name(queue: &str) -> String {
    format!("{QUEUE_PREFIX}{queue}")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_queues_live_under_one_prefix() {
        assert_eq!(queue_name("default"), "orch.q.default");
        assert!(queue_name("x").starts_with(QUEUE_PREFIX));
    }
}
