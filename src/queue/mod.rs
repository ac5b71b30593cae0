//! The job queue: how orchd hands jobs to workers through RabbitMQ.
//!
//! [`topology`] declares the exchanges and queues (shared by orchd and the
//! workers so both agree on names and arguments), [`message`] is the wire
//! format of a dispatch, and [`amqp`] is the confirmed publisher behind the
//! [`JobQueue`] trait.

pub mod amqp;
pub mod memory;
pub mod message;
pub mod topology;

use async_trait::async_trait;

use crate::error::Result;
use crate::proto::v1::DispatchMessage;

/// Where the server sends jobs for workers to pick up.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Publishes one dispatch and returns once the broker confirmed that it
    /// stored the message.
    async fn publish(&self, message: &DispatchMessage) -> Result<()>;

    /// Checks that the broker answers.
    async fn ping(&self) -> Result<()>;
}
