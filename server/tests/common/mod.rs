//! Shared harness of orchd's integration tests: a real orchd on ephemeral
//! loopback ports, backed by real Redis and RabbitMQ, isolated per test by
//! a unique key prefix and unique queue names.

#![allow(dead_code)]

pub mod tokens;

use std::time::Duration;

use lapin::options::BasicGetOptions;
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::worker_service_client::WorkerServiceClient;
use orchestrator::proto::v1::{DispatchMessage, SubmitJobRequest};
use orchestrator::queue::{message, topology};
use orchestrator_server::{Running, ServeConfig};
use orchestrator_testkit::{shared_amqp_url, shared_redis_url, unique_name};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A running orchd and clients for it.
pub struct TestServer {
    pub grpc_addr: std::net::SocketAddr,
    pub http: String,
    pub config: ServeConfig,
    pub shutdown: CancellationToken,
    running: Option<Running>,
    pub http_client: reqwest::Client,
}

impl TestServer {
    /// orchd on the shared Redis and RabbitMQ, under a fresh key prefix.
    pub async fn start() -> TestServer {
        let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
        config.redis_prefix = format!("{}:", unique_name("t"));
        TestServer::with_config(config).await
    }

    /// orchd with an explicit configuration.
    pub async fn with_config(config: ServeConfig) -> TestServer {
        let shutdown = CancellationToken::new();
        let running = orchestrator_server::start(config.clone(), shutdown.clone())
            .await
            .expect("orchd starts");
        TestServer {
            grpc_addr: running.grpc_addr,
            http: format!("http://{}", running.http_addr),
            config,
            shutdown,
            running: Some(running),
            http_client: {
                // reqwest takes rustls's process-wide crypto provider.
                orchestrator::tls::install_crypto_provider();
                reqwest::Client::new()
            },
        }
    }

    pub async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("gRPC connects")
    }

    pub async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("gRPC connects")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.http, path)
    }

    /// Stops orchd and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), running.wait(&self.shutdown))
                .await
                .expect("orchd stops within 30s");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A minimal spec on a fresh queue.
pub fn spec(kind: &str, queue: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        kind: kind.into(),
        queue: queue.into(),
        ..SubmitJobRequest::default()
    }
}

pub fn fresh_queue() -> String {
    unique_name("q")
}

/// Takes the next message off `queue` (default namespace), waiting up to
/// `timeout`: its dispatches (several for a batch message), its delivery
/// mode, and whether it was a batch message.
pub async fn next_message(
    amqp_url: &str,
    queue: &str,
    timeout: Duration,
) -> Option<(Vec<DispatchMessage>, u8, bool)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(conn) = orchestrator::queue::amqp::connect(amqp_url, "test-reader").await {
            let channel = conn.create_channel().await.expect("channel");
            topology::declare_base(&channel).await.expect("topology");
            topology::declare_job_queue(&channel, "default", queue)
                .await
                .expect("queue");
            let got = channel
                .basic_get(
                    topology::queue_name("default", queue).as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            if let Some(delivery) = got {
                let mode = delivery.properties.delivery_mode().unwrap_or(0);
                let batch =
                    message::is_batch(delivery.properties.kind().as_ref().map(|k| k.as_str()));
                let dispatches = message::decode_dispatches(batch, &delivery.data)
                    .expect("a valid dispatch message");
                let _ = conn.close(0, "done".into()).await;
                return Some((dispatches, mode, batch));
            }
            let _ = conn.close(0, "done".into()).await;
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`next_message`] for a message of one dispatch (what a single submit
/// publishes).
pub async fn next_dispatch(
    amqp_url: &str,
    queue: &str,
    timeout: Duration,
) -> Option<(DispatchMessage, u8)> {
    let (mut dispatches, mode, batch) = next_message(amqp_url, queue, timeout).await?;
    assert!(
        !batch && dispatches.len() == 1,
        "expected one dispatch, got a batch"
    );
    Some((dispatches.remove(0), mode))
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
