//! An in-process queue for `orchd dev`: the same dispatch messages as on
//! RabbitMQ, held in memory and handed to the in-process workers.
//!
//! Nothing here is durable, and nothing needs to be: the store's due-set is
//! the record of what must be dispatched, and `orchd dev` re-dispatches
//! every CREATED or RETRYING job when it starts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{JobQueue, message};
use crate::error::Result;
use crate::proto::v1::DispatchMessage;

/// One message taken from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The job queue it came from.
    pub queue: String,
    /// The encoded dispatch.
    pub body: Vec<u8>,
}

/// The in-process queue; cheap to clone, all clones share the messages.
#[derive(Clone, Default)]
pub struct MemoryQueue {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    queues: Mutex<HashMap<String, VecDeque<Vec<u8>>>>,
    notify: Notify,
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new() -> Self {
        MemoryQueue::default()
    }

    /// Puts an encoded message on `queue`, a routing key
    /// (`<namespace>.<queue>`, see [`super::topology::routing_key`]).
    pub fn push(&self, queue: &str, body: Vec<u8>) {
        if let Ok(mut queues) = self.inner.queues.lock() {
            queues.entry(queue.to_owned()).or_default().push_back(body);
        }
        self.inner.notify.notify_waiters();
    }

    fn try_take(&self, queues: &[String], start: usize) -> Option<Received> {
        let mut all = self.inner.queues.lock().ok()?;
        let names: Vec<String> = if queues.is_empty() {
            let mut names: Vec<String> = all
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(name, _)| name.clone())
                .collect();
            names.sort();
            names
        } else {
            queues.to_vec()
        };
        (0..names.len()).find_map(|i| {
            let name = &names[(start + i) % names.len()];
            let body = all.get_mut(name)?.pop_front()?;
            Some(Received {
                queue: name.clone(),
                body,
            })
        })
    }

    /// Waits for the next message on any of `queues` (on any queue at all
    /// when `queues` is empty), taking them in turn so that a busy queue does
    /// not starve the others.
    pub async fn receive(&self, queues: &[String], turn: usize) -> Received {
        loop {
            // Register interest before looking, so a push in between wakes us.
            let notified = self.inner.notify.notified();
            if let Some(received) = self.try_take(queues, turn) {
                return received;
            }
            notified.await;
        }
    }

    /// How many messages wait on `queue`.
    pub fn len(&self, queue: &str) -> usize {
        self.inner
            .queues
            .lock()
            .map(|q| q.get(queue).map_or(0, VecDeque::len))
            .unwrap_or(0)
    }

    /// Whether no message waits on `queue`.
    pub fn is_empty(&self, queue: &str) -> bool {
        self.len(queue) == 0
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    async fn publish(&self, msg: &DispatchMessage) -> Result<()> {
        self.push(
            &crate::queue::topology::routing_key_of(msg),
            message::encode(msg),
        );
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn msg(queue: &str, n: u32) -> DispatchMessage {
        DispatchMessage {
            job_id: uuid::Uuid::new_v4().to_string(),
            queue: queue.into(),
            namespace: "ns".into(),
            attempt: n,
            ..DispatchMessage::default()
        }
    }

    /// Where `msg(queue, _)` lands: the routing key of `queue` in "ns".
    fn key(queue: &str) -> String {
        crate::queue::topology::routing_key("ns", queue)
    }

    #[tokio::test]
    async fn messages_come_out_in_order_per_queue() {
        let q = MemoryQueue::new();
        for n in 1..=3 {
            q.publish(&msg("a", n)).await.unwrap();
        }
        let names = vec![key("a")];
        for n in 1..=3 {
            let got = q.receive(&names, 0).await;
            let (decoded, _) = message::decode(&got.body).unwrap();
            assert_eq!(decoded.attempt, n);
        }
        assert!(q.is_empty(&key("a")));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_publish_and_ignores_other_queues() {
        let q = MemoryQueue::new();
        let receiver = {
            let q = q.clone();
            tokio::spawn(async move { q.receive(&[key("b")], 0).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.publish(&msg("a", 1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !receiver.is_finished(),
            "a message on another queue is not taken"
        );
        q.publish(&msg("b", 2)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), receiver)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.queue, key("b"));
        assert_eq!(q.len(&key("a")), 1);
    }

    #[tokio::test]
    async fn no_queue_names_means_every_queue() {
        let q = MemoryQueue::new();
        q.publish(&msg("x", 1)).await.unwrap();
        q.publish(&msg("y", 2)).await.unwrap();
        let mut got = vec![q.receive(&[], 0).await.queue, q.receive(&[], 1).await.queue];
        got.sort();
        assert_eq!(got, [key("x"), key("y")]);
    }

    #[tokio::test]
    async fn turns_rotate_across_queues() {
        let q = MemoryQueue::new();
        for n in 0..2 {
            q.publish(&msg("a", n)).await.unwrap();
            q.publish(&msg("b", n)).await.unwrap();
        }
        let names = vec![key("a"), key("b")];
        let first = q.receive(&names, 0).await.queue;
        let second = q.receive(&names, 1).await.queue;
        assert_eq!((first, second), (key("a"), key("b")));
    }
}
