//! Pushed cancellation end to end: orchd pushes a cancel to the worker that
//! runs the job (RabbitMQ control queue under `orchd serve`, the in-process
//! queue under `orchd dev`; over `amqps://` with a private CA too), the
//! heartbeat poll is the fallback when the
//! push is lost, and a push that orchd did not send or that names an
//! attempt the worker does not run stops nothing. Real orchd, Redis, RabbitMQ and workers; no timing assertions,
//! generous timeouts only to detect hangs.
//!
//! "Push alone" tests give the worker a heartbeat far longer than their
//! timeouts (lease 10m, heartbeat 9m, cancel poll 1h), so a job that ends
//! CANCELLED within the timeout can only have been stopped by the push.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use orchestrator::proto::v1::control_message::Action;
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::{CancelJobRequest, ControlMessage, ServerInfo};
use orchestrator::queue::memory::MemoryQueue;
use orchestrator::queue::{amqp, message, topology};
use orchestrator::state::State;
use orchestrator::store::embedded::EmbeddedStore;
use orchestrator_server::{Backend, Running, ServeConfig};
use orchestrator_testkit::{RabbitServer, TestCerts, shared_redis_url, unique_name};
use orchestrator_worker::{HandlerError, Registry, Source, WorkerConfig, handler_fn};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Long enough to catch a hang, far shorter than the heartbeat of a
/// push-only worker (9 minutes).
const T: Duration = Duration::from_secs(60);

/// Turns the worker's heartbeat poll into a distant fallback: the first
/// heartbeat of an attempt comes 9 minutes after it starts.
fn without_polling(config: &mut WorkerConfig) {
    config.lease = Duration::from_secs(600);
    config.heartbeat_interval = Duration::from_secs(540);
    config.cancel_poll_interval = Duration::from_secs(3600);
}

async fn cancel(jobs: &mut JobServiceClient<Channel>, id: &str) {
    jobs.cancel_job(CancelJobRequest {
        job_id: id.to_owned(),
    })
    .await
    .expect("cancel");
}

/// Submits `sleep 1h`, waits until it runs, cancels it, and returns the
/// job once terminal, checked CANCELLED by the user.
async fn cancel_a_long_sleep(
    jobs: &mut JobServiceClient<Channel>,
    queue: &str,
) -> orchestrator::proto::v1::Job {
    let job = submit(jobs, spec("sleep", queue, json!({"seconds": 3600}))).await;
    let running = wait_state(jobs, &job.id, State::Running, T).await;
    assert!(!running.worker_id.is_empty(), "the worker is recorded");
    cancel(jobs, &job.id).await;
    let done = wait_terminal(jobs, &job.id, T).await;
    assert_eq!(state(&done), State::Cancelled, "{}", done.error);
    assert_eq!(done.error, "cancelled by user");
    done
}

#[tokio::test]
async fn a_pushed_cancel_alone_stops_a_running_job_over_rabbitmq() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    without_polling(&mut config);
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;

    let done = cancel_a_long_sleep(&mut jobs, &queue).await;
    assert_eq!(done.attempt, 1);

    // The worker's slot is free again and it keeps working.
    let next = submit(&mut jobs, spec("noop", &queue, json!({}))).await;
    assert_eq!(
        state(&wait_terminal(&mut jobs, &next.id, T).await),
        State::Completed
    );
    worker.stop(T).await;
    orchd.stop().await;
}

/// Injects: nothing; RabbitMQ reachable only over TLS with a certificate of
/// a private CA, given to orchd and the worker with `--amqp-ca-cert`, and
/// the worker's heartbeat poll 9 minutes away. Asserts: the pushed cancel
/// alone stops the running job, so the worker's control consumer (on a
/// connection of its own) trusts the CA as its job consumer does.
#[tokio::test]
async fn a_pushed_cancel_alone_stops_a_running_job_over_amqps_with_a_private_ca() {
    let certs = Arc::new(TestCerts::generate());
    let rabbit = {
        let certs = certs.clone();
        tokio::task::spawn_blocking(move || RabbitServer::start_tls(&certs))
            .await
            .unwrap()
    };
    let mut orchd_config = ServeConfig::local(shared_redis_url(), rabbit.tls_url());
    orchd_config.redis_prefix = format!("{}:", unique_name("w"));
    orchd_config.amqp_ca_cert = Some(certs.ca_cert.clone());
    let orchd = Orchd::with_config(orchd_config).await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.amqp_ca_cert = Some(certs.ca_cert.clone());
    without_polling(&mut config);
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;

    cancel_a_long_sleep(&mut jobs, &queue).await;
    worker.stop(T).await;
    orchd.stop().await;
    drop(rabbit);
}

/// Injects: the push dropped (the worker runs with `--cancel-push=false`, so
/// it has no control queue and orchd's push is unroutable). Asserts: the
/// heartbeat poll (default 1s) still cancels the running job.
#[tokio::test]
async fn without_the_push_the_heartbeat_poll_still_cancels() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.cancel_push = false;
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;

    cancel_a_long_sleep(&mut jobs, &queue).await;
    worker.stop(T).await;
    orchd.stop().await;
}

/// `sleep-on-retry`: attempt 1 fails at once, later attempts sleep for
/// `seconds` honouring cancellation. Gives a job whose running attempt is 2.
fn registry(config: &WorkerConfig) -> Registry {
    let mut registry = Registry::with_builtins(config);
    registry
        .register(
            "sleep-on-retry",
            handler_fn(|ctx| async move {
                if ctx.job.attempt == 1 {
                    return Err(HandlerError::Retryable("first attempt fails".into()));
                }
                let seconds = ctx.payload_json()["seconds"].as_f64().unwrap_or(3600.0);
                tokio::select! {
                    _ = ctx.cancel.cancelled() => Err(HandlerError::Cancelled),
                    _ = tokio::time::sleep(Duration::from_secs_f64(seconds)) => Ok(Default::default()),
                }
            }),
        )
        .expect("a valid kind");
    registry
}

/// Publishes a control message to `worker_id` the way orchd does.
async fn push(channel: &lapin::Channel, worker_id: &str, job_id: &str, attempt: u32) {
    let msg = ControlMessage {
        action: Action::Cancel as i32,
        job_id: job_id.to_owned(),
        attempt,
        sent_at: None,
    };
    channel
        .basic_publish(
            topology::CONTROL_EXCHANGE.into(),
            worker_id.into(),
            BasicPublishOptions::default(),
            &message::encode_control(&msg),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
}

/// Injects, by hand on the worker's control routing key, as anyone allowed
/// to publish to the broker could: a cancel for attempt 1 of a job whose
/// attempt 2 runs on the worker (stale), and a cancel for the running
/// attempt of a job nobody cancelled (forged). Then a real CancelJob of a
/// third job, whose push comes after them on the same queue: messages of
/// one queue arrive in order, so once that job is CANCELLED the worker has
/// handled the other two, and checked the forged one with orchd. Asserts:
/// the real cancel stops its job; the stale and the forged pushes stop
/// nothing (both jobs still RUNNING on the same attempt half a second
/// later); and orchd's own push still cancels the retried job.
#[tokio::test]
async fn only_a_cancel_orchd_recorded_stops_a_job_not_a_stale_or_forged_push() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    without_polling(&mut config);
    config.concurrency = 3;
    let worker = Worker::with_registry(config.clone(), registry(&config));
    let mut jobs = orchd.jobs().await;

    let mut retried = spec("sleep-on-retry", &queue, json!({"seconds": 3600}));
    retried.max_attempts = 3;
    retried.retry = Some(quick_retries());
    let retried = submit(&mut jobs, retried).await;
    let retried = wait_for(&mut jobs, &retried.id, T, "attempt 2 running", |j| {
        state(j) == State::Running && j.attempt == 2
    })
    .await;
    let mut running = Vec::new();
    for _ in 0..2 {
        let job = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 3600}))).await;
        running.push(wait_state(&mut jobs, &job.id, State::Running, T).await);
    }
    let [bystander, witness] = &running[..] else {
        unreachable!()
    };
    for job in [bystander, witness] {
        assert_eq!(
            job.worker_id, retried.worker_id,
            "all run on the one worker"
        );
    }

    let connection = amqp::connect(&orchd.amqp_url, "test-control")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    push(&channel, &retried.worker_id, &retried.id, 1).await;
    push(
        &channel,
        &bystander.worker_id,
        &bystander.id,
        bystander.attempt,
    )
    .await;
    cancel(&mut jobs, &witness.id).await;

    let witness = wait_terminal(&mut jobs, &witness.id, T).await;
    assert_eq!(state(&witness), State::Cancelled, "{}", witness.error);
    // Give a wrongly stopped attempt time to report, then check both run on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = get(&mut jobs, &retried.id).await;
    assert_eq!(state(&still), State::Running, "{}", still.error);
    assert_eq!(still.attempt, 2);
    let still = get(&mut jobs, &bystander.id).await;
    assert_eq!(
        state(&still),
        State::Running,
        "a forged push stopped the job: {}",
        still.error
    );
    assert_eq!(still.attempt, bystander.attempt);
    assert!(!still.cancel_requested);

    // The attempt that runs is cancelled by orchd's own push.
    cancel(&mut jobs, &retried.id).await;
    let done = wait_terminal(&mut jobs, &retried.id, T).await;
    assert_eq!(state(&done), State::Cancelled, "{}", done.error);
    assert_eq!(done.attempt, 2);

    let _ = connection.close(200, "bye".into()).await;
    worker.stop(T).await;
    orchd.stop().await;
}

/// orchd as `orchd dev` runs it: the embedded store, the in-process queue,
/// and in-process workers taking jobs and control messages from it.
struct Dev {
    running: Option<Running>,
    shutdown: CancellationToken,
    workers_stop: CancellationToken,
    worker: Option<tokio::task::JoinHandle<()>>,
    jobs: JobServiceClient<Channel>,
}

impl Dev {
    async fn start(tune: impl FnOnce(&mut WorkerConfig)) -> Dev {
        logs();
        let queue = MemoryQueue::new();
        let backend = Backend {
            store: Arc::new(EmbeddedStore::in_memory(Duration::from_secs(3600)).unwrap()),
            queue: Arc::new(queue.clone()),
            info: ServerInfo::default(),
        };
        let shutdown = CancellationToken::new();
        let running =
            orchestrator_server::start_with(&ServeConfig::local("", ""), backend, shutdown.clone())
                .await
                .expect("orchd starts");
        let mut config = WorkerConfig::local(format!("http://{}", running.grpc_addr), "");
        config.queues = Vec::new();
        config.concurrency = 1;
        config.worker_id_prefix = Some("dev".into());
        tune(&mut config);
        let registry = Registry::with_builtins(&config);
        let workers_stop = CancellationToken::new();
        let stop = workers_stop.clone();
        let worker = tokio::spawn(async move {
            orchestrator_worker::run_from(config, registry, Source::InProcess(queue), stop)
                .await
                .expect("the worker runs");
        });
        let jobs = JobServiceClient::connect(format!("http://{}", running.grpc_addr))
            .await
            .expect("gRPC connects");
        Dev {
            running: Some(running),
            shutdown,
            workers_stop,
            worker: Some(worker),
            jobs,
        }
    }

    async fn stop(mut self) {
        self.workers_stop.cancel();
        if let Some(worker) = self.worker.take() {
            tokio::time::timeout(T, worker)
                .await
                .expect("the worker stops")
                .expect("the worker task");
        }
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(T, running.wait(&self.shutdown))
                .await
                .expect("orchd stops");
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.workers_stop.cancel();
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn a_pushed_cancel_alone_stops_a_running_job_in_process() {
    let mut dev = Dev::start(without_polling).await;
    cancel_a_long_sleep(&mut dev.jobs, "default").await;
    let next = submit(&mut dev.jobs, spec("noop", "default", json!({}))).await;
    assert_eq!(
        state(&wait_terminal(&mut dev.jobs, &next.id, T).await),
        State::Completed
    );
    dev.stop().await;
}

/// Injects: the push dropped in process (`cancel_push = false`: the worker
/// does not subscribe, so the in-process queue drops the message). Asserts:
/// the heartbeat poll still cancels.
#[tokio::test]
async fn without_the_push_the_heartbeat_poll_still_cancels_in_process() {
    let mut dev = Dev::start(|c| c.cancel_push = false).await;
    cancel_a_long_sleep(&mut dev.jobs, "default").await;
    dev.stop().await;
}
