//! The Redis side of change notifications: one connection per process,
//! subscribed to the event channel of every job someone in this process
//! watches, feeding the [`ChangeHub`].
//!
//! A watch used to open a Redis connection of its own; a thousand watchers
//! were a thousand connections, and each watch paid a connection set-up
//! before its first read. Now the first watcher of a job subscribes its
//! channel on the shared connection and the last one to leave unsubscribes
//! it. Subscribe and unsubscribe commands go through one queue, in the
//! order the hub registered the watchers, so an UNSUBSCRIBE for a job's
//! last watcher can never overtake the SUBSCRIBE of its next one.
//!
//! Each write PUBLISHes the id of the store instance that made it; the
//! subscriber skips its own store's messages, whose watchers the store told
//! already (with the job itself).
//!
//! When the connection breaks, every watcher's stream ends (watchers fall
//! back to polling, see the server's watch) and the next watch connects
//! again.

use std::sync::{Arc, Mutex};

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::changes::{ChangeHub, Notice};
use crate::error::{Error, Result};

enum Command {
    Subscribe(String, oneshot::Sender<redis::RedisResult<()>>),
    Unsubscribe(String),
}

type Commands = mpsc::UnboundedSender<Command>;

/// The shared subscription connection of one store (and its clones).
pub struct Subscriber {
    client: redis::Client,
    /// `{prefix}ev:`; a job's channel is this and its id.
    channel_prefix: String,
    hub: ChangeHub,
    /// What this store's writes PUBLISH: its own messages are skipped,
    /// since the store pushes its writes to the hub itself.
    writer: Arc<str>,
    /// The live connection's command queue, if there is one.
    live: Arc<Mutex<Option<Commands>>>,
    /// Held while connecting, so concurrent first watchers open one
    /// connection, not several.
    connecting: tokio::sync::Mutex<()>,
}

impl Subscriber {
    /// A subscriber for `client`'s server, on the channels `channel_prefix`
    /// + job id. Connects on the first watch.
    pub fn new(client: redis::Client, channel_prefix: String) -> Self {
        Subscriber {
            client,
            channel_prefix,
            hub: ChangeHub::new(),
            writer: Uuid::new_v4().to_string().into(),
            live: Arc::default(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// What a write of job `id` passes to the apply script to PUBLISH:
    /// the job's channel and this store's writer id, so that this
    /// subscriber can tell its own writes from other replicas'.
    pub fn publish_arg(&self, id: &str) -> String {
        format!("{}{id} {}", self.channel_prefix, self.writer)
    }

    /// The hub this subscriber feeds (and the store pushes its own writes to).
    pub fn hub(&self) -> &ChangeHub {
        &self.hub
    }

    fn current(&self) -> Option<Commands> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    async fn commands(&self) -> Result<Commands> {
        if let Some(commands) = self.current() {
            return Ok(commands);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(commands) = self.current() {
            return Ok(commands);
        }
        let pubsub = self.client.get_async_pubsub().await?;
        let (sender, receiver) = mpsc::unbounded_channel();
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        tokio::spawn(run(
            pubsub,
            receiver,
            self.hub.clone(),
            self.channel_prefix.clone(),
            self.writer.clone(),
            self.live.clone(),
        ));
        Ok(sender)
    }

    /// The notices for job `id`, once its channel is subscribed: a change
    /// after this returns is never missed while the connection lasts.
    pub async fn watch(&self, id: Uuid) -> Result<BoxStream<'static, Notice>> {
        let commands = self.commands().await?;
        let channel = format!("{}{id}", self.channel_prefix);
        let (ack, acked) = oneshot::channel();
        let unsubscribe = {
            let commands = commands.clone();
            let channel = channel.clone();
            Box::new(move |_| {
                let _ = commands.send(Command::Unsubscribe(channel));
            })
        };
        let notices = self.hub.watch(id, Some(unsubscribe));
        // Every watcher subscribes (a no-op in Redis when the channel
        // already is), so each waits until the subscription is live. No
        // await between registering and queueing: a watcher dropped
        // later queues its UNSUBSCRIBE after this.
        commands
            .send(Command::Subscribe(channel, ack))
            .map_err(|_| lost())?;
        match acked.await {
            Ok(Ok(())) => Ok(notices),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(lost()),
        }
    }
}

fn lost() -> Error {
    Error::Unavailable {
        service: "redis",
        message: "the change subscription connection was lost".into(),
    }
}

/// Serves one connection's commands and messages until it breaks.
async fn run(
    pubsub: redis::aio::PubSub,
    mut commands: mpsc::UnboundedReceiver<Command>,
    hub: ChangeHub,
    channel_prefix: String,
    writer: Arc<str>,
    live: Arc<Mutex<Option<Commands>>>,
) {
    let (mut sink, mut messages) = pubsub.split();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Subscribe(channel, ack)) => {
                    let done = sink.subscribe(&channel).await;
                    let failed = done.is_err();
                    let _ = ack.send(done);
                    if failed {
                        break;
                    }
                }
                Some(Command::Unsubscribe(channel)) => {
                    if sink.unsubscribe(&channel).await.is_err() {
                        break;
                    }
                }
                // The store and every watcher are gone.
                None => return,
            },
            message = messages.next() => match message {
                Some(message) if message.get_payload_bytes() == writer.as_bytes() => {}
                Some(message) => {
                    let id = message
                        .get_channel_name()
                        .strip_prefix(channel_prefix.as_str())
                        .and_then(|id| Uuid::try_parse(id).ok());
                    if let Some(id) = id {
                        hub.notify(id, || Notice::Reread);
                    }
                }
                None => break,
            },
        }
    }
    tracing::warn!("redis change subscription lost; watches fall back to polling");
    // Queued commands fail (their acks drop) before the streams end, so a
    // watch either ends here or learns that it never started.
    drop(commands);
    {
        let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|c| c.is_closed()) {
            *live = None;
        }
    }
    hub.end_all();
}
