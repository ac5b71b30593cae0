//! Fault tests of the worker against a real orchd: orchd restarting while
//! a job runs and while a message waits, RabbitMQ restarting under a
//! consuming worker, and the worker's control queue deleted under it.

mod common;

use std::time::Duration;

use common::*;
use orchestrator::proto::v1::CancelJobRequest;
use orchestrator::queue::topology;
use orchestrator::state::State;
use orchestrator_server::ServeConfig;
use orchestrator_testkit::{
    RabbitServer, free_port, shared_amqp_url, shared_redis_url, unique_name,
};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

/// Injects: orchd stopped while a job runs (so its report fails) and while
/// a worker receives a dispatch (so StartAttempt fails), then started again
/// on the same address and store. Asserts: the report is retried and lands,
/// the dispatch is requeued and runs, without restarting the workers.
#[tokio::test]
async fn workers_ride_out_an_orchd_restart() {
    let port = free_port();
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    config.grpc_addr = format!("127.0.0.1:{port}").parse().unwrap();
    config.redis_prefix = format!("{}:", unique_name("w"));
    let orchd = Orchd::with_config(config.clone()).await;
    let mut jobs = orchd.jobs().await;
    let (running_queue, waiting_queue) = (fresh_queue(), fresh_queue());

    let running = submit(
        &mut jobs,
        spec("sleep", &running_queue, json!({"seconds": 1.5})),
    )
    .await;
    let waiting = submit(&mut jobs, spec("noop", &waiting_queue, json!({}))).await;
    let first = Worker::start(worker_config(&orchd, &running_queue));
    wait_state(&mut jobs, &running.id, State::Running, T).await;
    // Let the dispatcher publish the waiting job before orchd goes away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    orchd.stop().await;

    // Started while orchd is down: it receives the waiting job's dispatch,
    // cannot start it, and hands it back until orchd answers.
    let mut second_config = worker_config_at(port, &waiting_queue);
    second_config.concurrency = 1;
    let second = Worker::start(second_config);
    // The running job ends meanwhile; its report fails until orchd is back.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let orchd = Orchd::with_config(config).await;
    let mut jobs = orchd.jobs().await;
    let done = wait_terminal(&mut jobs, &running.id, T).await;
    assert_eq!(state(&done), State::Completed, "{}", done.error);
    let done = wait_terminal(&mut jobs, &waiting.id, T).await;
    assert_eq!(state(&done), State::Completed, "{}", done.error);

    first.stop(T).await;
    second.stop(T).await;
    orchd.stop().await;
}

fn worker_config_at(port: u16, queue: &str) -> orchestrator_worker::WorkerConfig {
    let mut config = orchestrator_worker::WorkerConfig::local(
        format!("http://127.0.0.1:{port}"),
        shared_amqp_url(),
    );
    config.queues = vec![queue.to_owned()];
    config.worker_id_prefix = Some("test".into());
    config
}

/// Injects: RabbitMQ stopped and started again under a consuming worker
/// while a job runs. Asserts: the running job still completes (it was acked
/// at start; the lease protects it), and the worker reconnects and runs jobs
/// submitted after the restart.
#[tokio::test]
async fn workers_reconnect_after_a_rabbitmq_restart() {
    let rabbit = tokio::task::spawn_blocking(RabbitServer::start)
        .await
        .unwrap();
    let orchd = Orchd::on(shared_redis_url(), rabbit.url()).await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let before = submit(&mut jobs, spec("noop", &queue, json!({}))).await;
    assert_eq!(
        state(&wait_terminal(&mut jobs, &before.id, T).await),
        State::Completed
    );
    let during = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 2}))).await;
    wait_state(&mut jobs, &during.id, State::Running, T).await;

    let rabbit = tokio::task::spawn_blocking(move || {
        let mut rabbit = rabbit;
        rabbit.stop();
        rabbit.start_again();
        rabbit
    })
    .await
    .unwrap();

    let done = wait_terminal(&mut jobs, &during.id, T).await;
    assert_eq!(state(&done), State::Completed, "{}", done.error);
    let after = submit(&mut jobs, spec("echo", &queue, json!({"after": "restart"}))).await;
    let done = wait_terminal(&mut jobs, &after.id, Duration::from_secs(60)).await;
    assert_eq!(state(&done), State::Completed, "{}", done.error);
    assert_eq!(result_json(&done), json!({"after": "restart"}));

    worker.stop(T).await;
    orchd.stop().await;
    drop(rabbit);
}

/// Whether `queue` exists on `rabbit` with one consumer.
fn consumed(rabbit: &RabbitServer, queue: &str) -> bool {
    let out = tokio::task::block_in_place(|| {
        rabbit.rabbitmqctl(&["-q", "list_queues", "name", "consumers"])
    });
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.split_whitespace().collect::<Vec<_>>() == [queue, "1"])
}

/// Injects: the worker's control queue deleted under it while a job runs
/// (`rabbitmqctl delete_queue`, as an operator might; the broker cancels
/// the worker's consumer). Asserts: the worker declares and consumes the
/// queue again by itself, and a cancel pushed afterwards still stops the
/// job although the worker's heartbeat poll is 9 minutes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_redeclares_its_deleted_control_queue() {
    let rabbit = tokio::task::spawn_blocking(RabbitServer::start)
        .await
        .unwrap();
    let orchd = Orchd::on(shared_redis_url(), rabbit.url()).await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.lease = Duration::from_secs(600);
    config.heartbeat_interval = Duration::from_secs(540);
    config.cancel_poll_interval = Duration::from_secs(3600);
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;

    let job = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 3600}))).await;
    let running = wait_state(&mut jobs, &job.id, State::Running, T).await;
    let control = topology::control_queue_name(&running.worker_id);
    assert!(
        consumed(&rabbit, &control),
        "{control} is consumed before any job runs"
    );

    let out = tokio::task::block_in_place(|| rabbit.rabbitmqctl(&["delete_queue", &control]));
    assert!(
        out.status.success(),
        "delete_queue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = tokio::time::Instant::now() + T;
    while !consumed(&rabbit, &control) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{control} not consumed again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    jobs.cancel_job(CancelJobRequest {
        job_id: job.id.clone(),
    })
    .await
    .expect("cancel");
    let done = wait_terminal(&mut jobs, &job.id, T).await;
    assert_eq!(state(&done), State::Cancelled, "{}", done.error);

    worker.stop(T).await;
    orchd.stop().await;
    drop(rabbit);
}
