//! An in-process queue for `orchd dev`: the same dispatch messages as on
//! RabbitMQ, held in memory and handed to the in-process workers.
//!
//! Nothing here is durable, and nothing needs to be: the store's due-set is
//! the record of what must be dispatched, and `orchd dev` re-dispatches
//! every CREATED or RETRYING job when it starts.
//!
//! Control messages go to the worker that subscribed under the message's
//! worker id, like the per-worker control queues on RabbitMQ; with no such
//! subscriber they are dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{Notify, mpsc};

use super::{JobQueue, message};
use crate::error::Result;
use crate::proto::v1::{ControlMessage, DispatchMessage};

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
    control: Mutex<HashMap<String, Subscriber>>,
    subscriptions: AtomicU64,
}

struct Subscriber {
    /// Tells this subscription from a later one under the same worker id.
    id: u64,
    sender: mpsc::UnboundedSender<ControlMessage>,
}

/// The control messages of one worker, from [`MemoryQueue::subscribe_control`];
/// unsubscribes when dropped.
pub struct ControlSubscription {
    queue: MemoryQueue,
    worker_id: String,
    id: u64,
    receiver: mpsc::UnboundedReceiver<ControlMessage>,
}

impl ControlSubscription {
    /// The next control message for this worker.
    pub async fn recv(&mut self) -> Option<ControlMessage> {
        self.receiver.recv().await
    }
}

impl Drop for ControlSubscription {
    fn drop(&mut self) {
        if let Ok(mut control) = self.queue.inner.control.lock() {
            // Only our own entry: a later subscription under the same id
            // (which real worker ids never reuse) is left alone.
            if control
                .get(&self.worker_id)
                .is_some_and(|s| s.id == self.id)
            {
                control.remove(&self.worker_id);
            }
        }
    }
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

    /// Receives the control messages sent to `worker_id` from now on, until
    /// the subscription is dropped.
    pub fn subscribe_control(&self, worker_id: &str) -> ControlSubscription {
        let (sender, receiver) = mpsc::unbounded_channel();
        let id = self.inner.subscriptions.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut control) = self.inner.control.lock() {
            control.insert(worker_id.to_owned(), Subscriber { id, sender });
        }
        ControlSubscription {
            queue: self.clone(),
            worker_id: worker_id.to_owned(),
            id,
            receiver,
        }
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

    async fn send_control(&self, worker_id: &str, msg: &ControlMessage) -> Result<()> {
        let sender = self
            .inner
            .control
            .lock()
            .ok()
            .and_then(|control| control.get(worker_id).map(|s| s.sender.clone()));
        if let Some(sender) = sender {
            // Fails only when the worker is just going away: dropped, as an
            // unroutable message would be.
            let _ = sender.send(msg.clone());
        }
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
    async fn control_messages_reach_only_their_worker_while_it_listens() {
        let q = MemoryQueue::new();
        let cancel = |attempt| ControlMessage {
            job_id: uuid::Uuid::new_v4().to_string(),
            attempt,
            ..ControlMessage::default()
        };
        // Nobody listens yet: dropped, not an error.
        q.send_control("w1", &cancel(1)).await.unwrap();
        let mut w1 = q.subscribe_control("w1");
        let mut w2 = q.subscribe_control("w2");
        let sent = cancel(2);
        q.send_control("w1", &sent).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(1), w1.recv())
            .await
            .unwrap();
        assert_eq!(
            got,
            Some(sent),
            "the message sent before subscribing is gone"
        );
        assert!(w2.receiver.try_recv().is_err(), "w2 got nothing");
        drop(w1);
        assert!(!q.inner.control.lock().unwrap().contains_key("w1"));
        q.send_control("w1", &cancel(3)).await.unwrap();
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
