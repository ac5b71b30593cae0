//! Names and declarations of every exchange and queue.
//!
//! One direct exchange routes dispatches on `<namespace>.<queue>` to a
//! durable classic queue per namespace and job queue, so that one tenant's
//! workers never receive another's jobs; each of those dead-letters rejected
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

/// Direct exchange for dispatches; the routing key is [`routing_key`].
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

/// The routing key of job queue `queue` of `namespace`. Namespaces are
/// DNS labels (no '.'), so the split is unambiguous.
pub fn routing_key(namespace: &str, queue: &str) -> String {
    format!("{namespace}.{queue}")
}

/// The routing key a dispatch is published with; messages from before
/// namespaces existed belong to the default namespace.
pub fn routing_key_of(msg: &crate::proto::v1::DispatchMessage) -> String {
    let namespace = if msg.namespace.is_empty() {
        crate::auth::DEFAULT_NAMESPACE
    } else {
        &msg.namespace
    };
    routing_key(namespace, &msg.queue)
}

/// The RabbitMQ queue that holds the dispatches of job queue `queue` of
/// `namespace`.
pub fn queue_name(namespace: &str, queue: &str) -> String {
    format!("{QUEUE_PREFIX}{}", routing_key(namespace, queue))
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

/// Declares the queue of job queue `queue` of `namespace` and binds it.
/// Idempotent; needs [`declare_base`] first.
pub async fn declare_job_queue(channel: &Channel, namespace: &str, queue: &str) -> Result<()> {
    let name = queue_name(namespace, queue);
    let key = routing_key(namespace, queue);
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
            key.as_str().into(),
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
    fn job_queues_live_under_one_prefix_per_namespace() {
        assert_eq!(queue_name("default", "default"), "orch.q.default.default");
        assert_eq!(queue_name("team-a", "mail.out"), "orch.q.team-a.mail.out");
        assert!(queue_name("a", "x").starts_with(QUEUE_PREFIX));
        assert_ne!(routing_key("a", "x"), routing_key("b", "x"));
    }

    #[test]
    fn dispatches_without_a_namespace_go_to_the_default_one() {
        let msg = crate::proto::v1::DispatchMessage {
            queue: "q".into(),
            ..Default::default()
        };
        assert_eq!(routing_key_of(&msg), "default.q");
        let msg = crate::proto::v1::DispatchMessage {
            queue: "q".into(),
            namespace: "t".into(),
            ..Default::default()
        };
        assert_eq!(routing_key_of(&msg), "t.q");
    }

    #[test]
    fn control_queues_are_named_for_their_worker() {
        assert_eq!(control_queue_name("host-12-ab"), "orch.control.host-12-ab");
        // Job queue names never start with the control prefix.
        assert!(!queue_name("control", "x").starts_with(CONTROL_QUEUE_PREFIX));
    }
}
