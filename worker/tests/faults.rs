//! Fault tests of the worker against a real orchd: orchd restarting while
//! a job runs and while a message waits, RabbitMQ restarting under a
//! consuming worker, and the worker's control queue or one of its job
//! queues deleted under it.

mod common;

use std::time::Duration;

use common::*;
use lapin::types::FieldTable;
use orchestrator::proto::v1::{CancelJobRequest, DispatchMessage};
use orchestrator::queue::{amqp, topology};
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

/// Waits (up to [`T`]) until `queue` exists on `rabbit` with one consumer.
async fn wait_consumed(rabbit: &RabbitServer, queue: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + T;
    while !consumed(rabbit, queue) {
        assert!(tokio::time::Instant::now() < deadline, "{queue} {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes `queue` on `rabbit` as an operator would (`rabbitmqctl
/// delete_queue`): the broker cancels its consumers.
fn delete_queue(rabbit: &RabbitServer, queue: &str) {
    let out = tokio::task::block_in_place(|| rabbit.rabbitmqctl(&["delete_queue", queue]));
    assert!(
        out.status.success(),
        "delete_queue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

    delete_queue(&rabbit, &control);
    wait_consumed(&rabbit, &control, "not consumed again").await;

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

/// Injects: one of the two job queues of a worker deleted under it
/// (`rabbitmqctl delete_queue`, as an operator might; the broker cancels
/// that one consumer and leaves the other alone). Asserts: the worker
/// declares and consumes the deleted queue again by itself, and jobs
/// submitted afterwards to either queue complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_redeclares_a_deleted_job_queue_of_several() {
    let rabbit = tokio::task::spawn_blocking(RabbitServer::start)
        .await
        .unwrap();
    let orchd = Orchd::on(shared_redis_url(), rabbit.url()).await;
    let (deleted, kept) = (fresh_queue(), fresh_queue());
    let mut config = worker_config(&orchd, &deleted);
    config.queues.push(kept.clone());
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;
    let (deleted_name, kept_name) = (
        topology::queue_name("default", &deleted),
        topology::queue_name("default", &kept),
    );
    wait_consumed(&rabbit, &deleted_name, "never consumed").await;
    wait_consumed(&rabbit, &kept_name, "never consumed").await;

    delete_queue(&rabbit, &deleted_name);
    wait_consumed(&rabbit, &deleted_name, "not consumed again").await;
    wait_consumed(&rabbit, &kept_name, "not consumed after the reconnect").await;

    for queue in [&deleted, &kept] {
        let job = submit(&mut jobs, spec("echo", queue, json!({"queue": queue}))).await;
        let done = wait_terminal(&mut jobs, &job.id, T).await;
        assert_eq!(state(&done), State::Completed, "{queue}: {}", done.error);
        assert_eq!(result_json(&done), json!({"queue": queue}));
    }

    worker.stop(T).await;
    orchd.stop().await;
    drop(rabbit);
}

/// Injects: a batch message of four `sleep` jobs of 1.5 s to a worker whose
/// one slot is busy with a 3 s job, and its queue unbound from the jobs
/// exchange right after the message was published (the batch goes back to
/// the queue each second while the slot is busy, so nothing is handed back
/// before the unbind). When the slot frees, the worker starts the first job;
/// the other three find no slot within the 1 s wait, and the message
/// handing them back is returned by the broker as unroutable. (The four jobs were submitted to
/// a queue no one consumes and the batch message is made by hand, so
/// orchd's own dispatches of them are elsewhere.) Asserts: nothing is lost
/// or run twice. The worker puts the batch message back on the queue and
/// reconnects, which binds its queue again (a probe published with
/// `mandatory` is returned before and routed after), and every job of the
/// batch COMPLETES exactly once, on attempt 1.
#[tokio::test]
async fn a_batch_whose_rest_cannot_be_handed_back_is_not_lost() {
    let orchd = Orchd::start().await;
    let (queue, parked) = (fresh_queue(), fresh_queue());
    let mut jobs = orchd.jobs().await;
    let (connection, channel) = hand_over_channel(&orchd, &queue).await;
    let (name, key) = (
        topology::queue_name("default", &queue),
        topology::routing_key("default", &queue),
    );
    let mut config = worker_config(&orchd, &queue);
    config.concurrency = 1;
    let worker = Worker::start(config);
    let deadline = tokio::time::Instant::now() + T;
    while queue_counts(&channel, &queue).await.0 != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never consumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let blocker = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 3.0}))).await;
    wait_state(&mut jobs, &blocker.id, State::Running, T).await;
    let mut batch = Vec::new();
    for _ in 0..4 {
        batch.push(submit(&mut jobs, spec("sleep", &parked, json!({"seconds": 1.5}))).await);
    }
    let dispatches: Vec<DispatchMessage> =
        batch.iter().map(|job| dispatch_for(job, &queue)).collect();
    publish_by_hand(&channel, &queue, &dispatches)
        .await
        .expect("the batch is published");
    channel
        .queue_unbind(
            name.as_str().into(),
            topology::JOBS_EXCHANGE.into(),
            key.as_str().into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The probe: a duplicate dispatch of the first job (a worker drops it).
    let probe = std::slice::from_ref(&dispatches[0]);
    let routed = || publish_by_hand(&channel, &queue, probe);
    assert!(
        matches!(routed().await, Err(amqp::Unconfirmed::Unroutable)),
        "the queue is unbound"
    );

    for job in &batch {
        let done = wait_terminal(&mut jobs, &job.id, T).await;
        assert_eq!(state(&done), State::Completed, "{done:?}");
        assert_eq!(done.attempt, 1, "{done:?}");
        let completions = done
            .history
            .iter()
            .filter(|t| t.to == State::Completed.to_proto() as i32)
            .count();
        assert_eq!(completions, 1, "{done:?}");
    }
    assert!(
        routed().await.is_ok(),
        "the worker reconnected after the failed hand-back and bound its queue again"
    );
    let _ = connection.close(200, "bye".into()).await;
    worker.stop(T).await;
    orchd.stop().await;
}
