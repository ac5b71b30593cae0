//! Harness of the worker's end-to-end tests: a real orchd (in process, on
//! ephemeral ports) over real Redis and RabbitMQ, and real workers, each
//! test isolated by a unique Redis key prefix and unique queue names.

#![allow(dead_code)]

use std::time::Duration;

use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::{GetJobRequest, Job, SubmitJobRequest};
use orchestrator::state::State;
use orchestrator_server::{Running, ServeConfig};
use orchestrator_testkit::{shared_amqp_url, shared_redis_url, unique_name};
use orchestrator_worker::{Registry, WorkerConfig, to_struct};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Logs of the test's orchd and workers, filtered by RUST_LOG (errors
/// only when unset), captured per test.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A running orchd.
pub struct Orchd {
    pub grpc_addr: std::net::SocketAddr,
    pub amqp_url: String,
    pub config: ServeConfig,
    shutdown: CancellationToken,
    running: Option<Running>,
}

impl Orchd {
    /// orchd on the shared Redis and RabbitMQ, under a fresh key prefix.
    pub async fn start() -> Orchd {
        Orchd::on(shared_redis_url(), shared_amqp_url()).await
    }

    /// orchd on the given servers, under a fresh key prefix.
    pub async fn on(redis_url: String, amqp_url: String) -> Orchd {
        let mut config = ServeConfig::local(redis_url, amqp_url);
        config.redis_prefix = format!("{}:", unique_name("w"));
        Orchd::with_config(config).await
    }

    pub async fn with_config(config: ServeConfig) -> Orchd {
        logs();
        let shutdown = CancellationToken::new();
        let running = orchestrator_server::start(config.clone(), shutdown.clone())
            .await
            .expect("orchd starts");
        Orchd {
            grpc_addr: running.grpc_addr,
            amqp_url: config.amqp_url.clone(),
            config,
            shutdown,
            running: Some(running),
        }
    }

    pub fn server_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::connect(self.server_url())
            .await
            .expect("gRPC connects")
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

impl Drop for Orchd {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A worker running in this process.
pub struct Worker {
    pub shutdown: CancellationToken,
    handle: Option<JoinHandle<Result<(), orchestrator_worker::WorkerError>>>,
}

impl Worker {
    /// Starts a worker with the built-in handlers.
    pub fn start(config: WorkerConfig) -> Worker {
        let registry = Registry::with_builtins(&config);
        Worker::with_registry(config, registry)
    }

    pub fn with_registry(config: WorkerConfig, registry: Registry) -> Worker {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(orchestrator_worker::run(config, registry, shutdown.clone()));
        Worker {
            shutdown,
            handle: Some(handle),
        }
    }

    /// Signals shutdown and waits (up to `limit`) for `run` to return.
    pub async fn stop(mut self, limit: Duration) -> Duration {
        let started = tokio::time::Instant::now();
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(limit, handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker run returns Ok");
        started.elapsed()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Worker settings for `orchd` on `queue`, quick to react.
pub fn worker_config(orchd: &Orchd, queue: &str) -> WorkerConfig {
    let mut config = WorkerConfig::local(orchd.server_url(), orchd.amqp_url.clone());
    config.queues = vec![queue.to_owned()];
    config.concurrency = 2;
    config.worker_id_prefix = Some("test".into());
    config
}

pub fn fresh_queue() -> String {
    unique_name("wq")
}

/// A spec of `kind` with a JSON payload on `queue`.
pub fn spec(kind: &str, queue: &str, payload: serde_json::Value) -> SubmitJobRequest {
    SubmitJobRequest {
        kind: kind.into(),
        queue: queue.into(),
        payload: Some(to_struct(payload).expect("payload object")),
        ..SubmitJobRequest::default()
    }
}

/// A fast retry policy: attempts follow each other within ~100ms.
pub fn quick_retries() -> orchestrator::proto::v1::RetryPolicy {
    orchestrator::proto::v1::RetryPolicy {
        initial_backoff: Some(orchestrator::job::duration_to_proto(Duration::from_millis(
            50,
        ))),
        multiplier: 1.0,
        max_backoff: Some(orchestrator::job::duration_to_proto(Duration::from_millis(
            100,
        ))),
    }
}

pub async fn submit(client: &mut JobServiceClient<Channel>, spec: SubmitJobRequest) -> Job {
    client.submit_job(spec).await.expect("submit").into_inner()
}

pub async fn get(client: &mut JobServiceClient<Channel>, id: &str) -> Job {
    client
        .get_job(GetJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .expect("get")
        .into_inner()
}

pub fn state(job: &Job) -> State {
    orchestrator::job::job_state(job).expect("a state")
}

/// Polls the job until `pred` holds, or panics after `timeout`.
pub async fn wait_for(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Job) -> bool,
) -> Job {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let job = get(client, id).await;
        if pred(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; job is {:?} attempt {} error {:?}",
            state(&job),
            job.attempt,
            job.error
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the job is in `want`.
pub async fn wait_state(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    want: State,
    timeout: Duration,
) -> Job {
    wait_for(client, id, timeout, &format!("{want}"), |j| {
        state(j) == want
    })
    .await
}

/// Waits until the job is terminal.
pub async fn wait_terminal(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    timeout: Duration,
) -> Job {
    wait_for(client, id, timeout, "a terminal state", |j| {
        state(j).is_terminal()
    })
    .await
}

/// The job's result as JSON.
pub fn result_json(job: &Job) -> serde_json::Value {
    orchestrator_worker::from_struct(&job.result.clone().unwrap_or_default())
}

/// The consumers of `queue` (default namespace) and its messages ready for
/// delivery (not those delivered and unacked), by a passive declare: the
/// queue must exist.
pub async fn queue_counts(channel: &lapin::Channel, queue: &str) -> (u32, u32) {
    let declared = channel
        .queue_declare(
            orchestrator::queue::topology::queue_name("default", queue)
                .as_str()
                .into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    (declared.consumer_count(), declared.message_count())
}

/// The dispatch orchd would publish for attempt 1 of `job`, addressed to
/// `queue` (default namespace): for tests that put jobs on a queue no one
/// consumes and then hand a worker their dispatches themselves.
pub fn dispatch_for(job: &Job, queue: &str) -> orchestrator::proto::v1::DispatchMessage {
    orchestrator::proto::v1::DispatchMessage {
        job_id: job.id.clone(),
        kind: job.kind.clone(),
        queue: queue.to_owned(),
        attempt: 1,
        namespace: "default".into(),
        max_attempts: job.max_attempts,
        ..Default::default()
    }
}

/// Publishes `dispatches` to `queue` (default namespace) as one message,
/// the way orchd does, on `channel` (in confirm mode); returns once the
/// broker confirmed it.
pub async fn publish_by_hand(
    channel: &lapin::Channel,
    queue: &str,
    dispatches: &[orchestrator::proto::v1::DispatchMessage],
) -> Result<(), orchestrator::queue::amqp::Unconfirmed> {
    let key = orchestrator::queue::topology::routing_key("default", queue);
    orchestrator::queue::amqp::publish_dispatches(
        channel,
        orchestrator::queue::topology::JOBS_EXCHANGE,
        &key,
        dispatches,
    )
    .await
}

/// A connection to the test's broker and a channel on it in confirm mode,
/// with the base topology and `queue` (default namespace) declared as a
/// worker declares them, for tests that publish dispatches by hand
/// ([`publish_by_hand`]) and look at the queue ([`queue_counts`]).
pub async fn hand_over_channel(orchd: &Orchd, queue: &str) -> (lapin::Connection, lapin::Channel) {
    use orchestrator::queue::{amqp, topology};
    let connection = amqp::connect(&orchd.amqp_url, "test-by-hand")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology::declare_base(&channel).await.unwrap();
    topology::declare_job_queue(&channel, "default", queue)
        .await
        .unwrap();
    (connection, channel)
}
