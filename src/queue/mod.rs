//! The job queue: how orchd hands jobs to workers through RabbitMQ.
//!
//! [`topology`] declares the exchanges and queues (shared by orchd and the
//! workers so both agree on names and arguments), [`message`] is the wire
//! format of dispatches and control messages, [`amqp`] is the RabbitMQ
//! publisher behind the [`JobQueue`] trait and [`memory`] the in-process
//! queue of `orchd dev`.

pub mod amqp;
pub mod memory;
pub mod message;
pub mod topology;

use async_trait::async_trait;

use crate::error::Result;
use crate::proto::v1::{ControlMessage, DispatchMessage};

/// Where the server sends jobs for workers to pick up.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Publishes one dispatch and returns once the broker confirmed that it
    /// stored the message.
    async fn publish(&self, message: &DispatchMessage) -> Result<()>;

    /// Publishes dispatches that all go to one queue (the same namespace
    /// and queue), at most [`message::MAX_BATCH`], as one message where the
    /// queue can; returns once the broker confirmed it. The default
    /// publishes them one by one.
    async fn publish_batch(&self, messages: &[DispatchMessage]) -> Result<()> {
        for message in messages {
            self.publish(message).await?;
        }
        Ok(())
    }

    /// Pushes a control message to the worker `worker_id`, best effort:
    /// returns once the message is handed to the broker, without waiting
    /// for it to be stored or delivered. A worker that is gone (or has no
    /// control queue) never gets it, and that is not an error: workers
    /// also poll for what control messages tell them.
    async fn send_control(&self, worker_id: &str, message: &ControlMessage) -> Result<()>;

    /// Checks that the broker answers.
    async fn ping(&self) -> Result<()>;
}
