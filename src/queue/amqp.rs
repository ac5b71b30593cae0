//! The RabbitMQ publisher: persistent messages with publisher confirms on one
//! long-lived channel, reconnecting after the broker restarts.
//!
//! Publishes run concurrently on the channel; each waits only for its own
//! confirm, so throughput is not bounded by one confirm round trip.
//!
//! Control messages (pushed cancellations) go out on a second channel of
//! the same connection without confirms: they are best effort by design
//! (workers poll as well), and a confirm channel would keep every confirm
//! nobody waits for.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{JobQueue, message, topology};
use crate::error::{Error, Result};
use crate::proto::v1::{ControlMessage, DispatchMessage};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// A confirmed publisher of dispatches.
pub struct AmqpQueue {
    url: String,
    tls: OwnedTLSConfig,
    live: Mutex<Option<Live>>,
}

struct Live {
    // Kept so the connection lives as long as the channels.
    _connection: Connection,
    /// Dispatches, with publisher confirms.
    channel: Channel,
    /// Control messages, without confirms.
    control: Channel,
    declared: HashSet<String>,
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::Unavailable {
        service: "rabbitmq",
        message: message.into(),
    }
}

/// AMQP heartbeat asked for unless the URL sets one. RabbitMQ's default
/// (60s) lets a hung but connected client (a frozen worker) hold its
/// prefetched messages for minutes; 10s hands them back within ~30s.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// `url` with `heartbeat=DEFAULT_HEARTBEAT_SECS` added unless it has one.
pub fn with_default_heartbeat(url: &str) -> String {
    let has_heartbeat = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|kv| kv.starts_with("heartbeat=")));
    if has_heartbeat {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&heartbeat={DEFAULT_HEARTBEAT_SECS}")
    } else {
        format!("{url}?heartbeat={DEFAULT_HEARTBEAT_SECS}")
    }
}

/// Opens a connection to `url`, failing after a few seconds rather than
/// hanging when the broker is down.
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    connect_with_tls(url, name, &OwnedTLSConfig::default()).await
}

/// [`connect`] with TLS settings for an `amqps://` URL (see
/// [`crate::tls::amqp_tls`]).
pub async fn connect_with_tls(url: &str, name: &str, tls: &OwnedTLSConfig) -> Result<Connection> {
    crate::tls::install_crypto_provider();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let url = with_default_heartbeat(url);
    let runtime =
        lapin::runtime::default_runtime().map_err(|e| unavailable(format!("runtime: {e}")))?;
    let connecting = Connection::connect_with_config(&url, properties, tls.clone(), runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unavailable(format!("cannot connect: {e}"))),
        Err(_) => Err(unavailable("cannot connect: timed out")),
    }
}

impl AmqpQueue {
    /// A publisher for `url`; connects on first use.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpQueue::with_tls(url, OwnedTLSConfig::default())
    }

    /// A publisher for an `amqps://` `url` with these TLS settings.
    pub fn with_tls(url: impl Into<String>, tls: OwnedTLSConfig) -> Self {
        AmqpQueue {
            url: url.into(),
            tls,
            live: Mutex::new(None),
        }
    }

    /// The connection's channels, connecting first when there are none or
    /// one broke; declares the job queue `(namespace, queue)` first when it
    /// is given and not declared on this connection yet.
    async fn channels(&self, queue: Option<(&str, &str)>) -> Result<(Channel, Channel)> {
        let mut live = self.live.lock().await;
        if live
            .as_ref()
            .is_some_and(|l| !l.channel.status().connected() || !l.control.status().connected())
        {
            tracing::warn!("rabbitmq channel lost; reconnecting");
            *live = None;
        }
        if live.is_none() {
            let connection = connect_with_tls(&self.url, "orchd-publisher", &self.tls).await?;
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            topology::declare_base(&channel).await?;
            let control = connection.create_channel().await?;
            tracing::info!("connected to rabbitmq");
            *live = Some(Live {
                _connection: connection,
                channel,
                control,
                declared: HashSet::new(),
            });
        }
        let live = live.as_mut().expect("connected above");
        if let Some((namespace, queue)) = queue {
            let key = topology::routing_key(namespace, queue);
            if !live.declared.contains(&key) {
                topology::declare_job_queue(&live.channel, namespace, queue).await?;
                live.declared.insert(key);
            }
        }
        Ok((live.channel.clone(), live.control.clone()))
    }

    /// The dispatch channel, with `namespace`'s `queue` declared.
    async fn channel_for(&self, namespace: &str, queue: &str) -> Result<Channel> {
        Ok(self.channels(Some((namespace, queue))).await?.0)
    }

    async fn reset(&self) {
        *self.live.lock().await = None;
    }

    /// Publishes `dispatches` (all for one queue) as one message, declaring
    /// the queue first if this connection has not, and maps a missing
    /// confirm to an error, reconnecting next time when the channel is in
    /// doubt.
    async fn publish_to_queue(&self, dispatches: &[DispatchMessage]) -> Result<()> {
        let Some(first) = dispatches.first() else {
            return Ok(());
        };
        let key = topology::routing_key_of(first);
        let (namespace, queue) = key.split_once('.').unwrap_or(("", &key));
        let channel = self.channel_for(namespace, queue).await?;
        let published = publish_dispatches(&channel, topology::JOBS_EXCHANGE, &key, dispatches);
        let Err(unconfirmed) = published.await else {
            return Ok(());
        };
        if unconfirmed.needs_reconnect() {
            // Unroutable included: the queue vanished (deleted by an
            // operator), so declare it again on the next publish.
            self.reset().await;
        }
        Err(match unconfirmed {
            Unconfirmed::Unroutable => unavailable(format!(
                "queue {:?} was not routable",
                topology::queue_name(namespace, queue)
            )),
            Unconfirmed::NotRequested => Error::Internal(unconfirmed.to_string()),
            Unconfirmed::Broken(e) => e.into(),
            Unconfirmed::TimedOut | Unconfirmed::Nacked => unavailable(unconfirmed.to_string()),
        })
    }
}

/// Why a published message was not confirmed.
#[derive(Debug)]
pub enum Unconfirmed {
    /// No confirm within 10s.
    TimedOut,
    /// The broker returned it: no queue is bound to its routing key.
    Unroutable,
    /// The broker refused it.
    Nacked,
    /// The channel is not in confirm mode.
    NotRequested,
    /// The channel or connection failed.
    Broken(lapin::Error),
}

impl Unconfirmed {
    /// Whether the channel is in doubt and should be opened again.
    pub fn needs_reconnect(&self) -> bool {
        !matches!(self, Unconfirmed::Nacked | Unconfirmed::NotRequested)
    }
}

impl std::fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unconfirmed::TimedOut => write!(f, "no publisher confirm within 10s"),
            Unconfirmed::Unroutable => write!(f, "the message was not routable"),
            Unconfirmed::Nacked => write!(f, "broker refused the message (nack)"),
            Unconfirmed::NotRequested => write!(f, "publisher confirms are off"),
            Unconfirmed::Broken(e) => write!(f, "{e}"),
        }
    }
}

/// Publishes `dispatches` (all for one queue; at most
/// [`message::MAX_BATCH`]) as one persistent, mandatory message to
/// `exchange` with `routing_key`, on `channel`, which must be in confirm
/// mode, and waits for the broker's confirm. orchd's publisher and a worker
/// handing back part of a batch both publish this way.
pub async fn publish_dispatches(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    dispatches: &[DispatchMessage],
) -> std::result::Result<(), Unconfirmed> {
    let (body, kind) = message::encode_dispatches(dispatches);
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(message::CONTENT_TYPE.into());
    if let Some(first) = dispatches.first() {
        properties = properties.with_message_id(first.job_id.as_str().into());
    }
    if let Some(kind) = kind {
        properties = properties.with_type(kind.into());
    }
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let publish = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                &body,
                properties,
            )
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
        Err(_) => Err(Unconfirmed::TimedOut),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(Unconfirmed::Unroutable),
        Ok(Ok(Confirmation::Nack(_))) => Err(Unconfirmed::Nacked),
        Ok(Ok(Confirmation::NotRequested)) => Err(Unconfirmed::NotRequested),
        Ok(Err(e)) => Err(Unconfirmed::Broken(e)),
    }
}

#[async_trait]
impl JobQueue for AmqpQueue {
    async fn publish(&self, msg: &DispatchMessage) -> Result<()> {
        self.publish_to_queue(std::slice::from_ref(msg)).await
    }

    async fn publish_batch(&self, msgs: &[DispatchMessage]) -> Result<()> {
        if let [first, rest @ ..] = msgs {
            let key = topology::routing_key_of(first);
            if rest.iter().any(|m| topology::routing_key_of(m) != key) {
                return Err(Error::Internal(
                    "a dispatch batch must go to one queue".into(),
                ));
            }
        }
        if msgs.len() > message::MAX_BATCH {
            return Err(Error::Internal(format!(
                "a dispatch batch holds at most {} dispatches",
                message::MAX_BATCH
            )));
        }
        self.publish_to_queue(msgs).await
    }

    async fn send_control(&self, worker_id: &str, msg: &ControlMessage) -> Result<()> {
        let (_, control) = self.channels(None).await?;
        let properties = BasicProperties::default()
            .with_delivery_mode(1)
            .with_content_type(message::CONTENT_TYPE.into())
            .with_message_id(msg.job_id.as_str().into());
        let body = message::encode_control(msg);
        let publish = control.basic_publish(
            topology::CONTROL_EXCHANGE.into(),
            worker_id.into(),
            BasicPublishOptions::default(),
            &body,
            properties,
        );
        // Not confirmed: this returns once the frames are on their way.
        match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
            Ok(Ok(_not_requested)) => Ok(()),
            Ok(Err(e)) => {
                self.reset().await;
                Err(e.into())
            }
            Err(_) => {
                self.reset().await;
                Err(unavailable("control message not sent within 10s"))
            }
        }
    }

    async fn ping(&self) -> Result<()> {
        self.channel_for(crate::auth::DEFAULT_NAMESPACE, crate::job::DEFAULT_QUEUE)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_added_unless_the_url_sets_one() {
        assert_eq!(
            with_default_heartbeat("amqp://h:5672/%2f"),
            "amqp://h:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_default_heartbeat("amqp://h/%2f?frame_max=8192"),
            "amqp://h/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            with_default_heartbeat("amqp://h/%2f?heartbeat=3"),
            "amqp://h/%2f?heartbeat=3"
        );
    }
}
