//! End-to-end tests of orch-worker against a real orchd, Redis and
//! RabbitMQ: built-in handlers, retries, cancellation, timeouts, poison
//! messages, concurrency and graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use orchestrator::proto::v1::{CancelJobRequest, DispatchMessage};
use orchestrator::queue::{amqp, message, topology};
use orchestrator::state::State;
use orchestrator_worker::{HandlerError, JobContext, Registry, handler_fn, to_struct};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

#[tokio::test]
async fn built_in_handlers_complete_with_their_results() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let sleep = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 0.2}))).await;
    let echo = submit(
        &mut jobs,
        spec("echo", &queue, json!({"msg": "hi", "n": [1, 2]})),
    )
    .await;
    let noop = submit(&mut jobs, spec("noop", &queue, json!({}))).await;

    let sleep = wait_terminal(&mut jobs, &sleep.id, T).await;
    assert_eq!(state(&sleep), State::Completed, "{}", sleep.error);
    assert_eq!(result_json(&sleep), json!({"slept_seconds": 0.2}));
    assert!(
        sleep
            .history
            .iter()
            .any(|t| t.worker_id.starts_with("test-")),
        "worker id recorded"
    );

    let echo = wait_terminal(&mut jobs, &echo.id, T).await;
    assert_eq!(state(&echo), State::Completed);
    assert_eq!(result_json(&echo), json!({"msg": "hi", "n": [1.0, 2.0]}));

    let noop = wait_terminal(&mut jobs, &noop.id, T).await;
    assert_eq!(state(&noop), State::Completed);
    assert_eq!(result_json(&noop), json!({}));

    worker.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn failures_retry_until_they_succeed_and_permanent_ones_do_not() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let mut flaky = spec(
        "fail",
        &queue,
        json!({"message": "flaky", "succeed_on_attempt": 3}),
    );
    flaky.max_attempts = 3;
    flaky.retry = Some(quick_retries());
    let flaky = submit(&mut jobs, flaky).await;

    let mut permanent = spec(
        "fail",
        &queue,
        json!({"message": "bad input", "permanent": true}),
    );
    permanent.max_attempts = 3;
    permanent.retry = Some(quick_retries());
    let permanent = submit(&mut jobs, permanent).await;

    let mut hopeless = spec("fail", &queue, json!({"message": "always"}));
    hopeless.max_attempts = 2;
    hopeless.retry = Some(quick_retries());
    let hopeless = submit(&mut jobs, hopeless).await;

    let flaky = wait_terminal(&mut jobs, &flaky.id, T).await;
    assert_eq!(state(&flaky), State::Completed, "{}", flaky.error);
    assert_eq!(flaky.attempt, 3);
    assert_eq!(result_json(&flaky), json!({"attempt": 3.0}));

    let permanent = wait_terminal(&mut jobs, &permanent.id, T).await;
    assert_eq!(state(&permanent), State::Failed);
    assert_eq!(permanent.attempt, 1, "no retry after a permanent failure");
    assert_eq!(permanent.error, "bad input");

    let hopeless = wait_terminal(&mut jobs, &hopeless.id, T).await;
    assert_eq!(state(&hopeless), State::Failed);
    assert_eq!(hopeless.attempt, 2);
    assert_eq!(hopeless.error, "always");

    worker.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn unknown_kinds_bad_payloads_and_disabled_exec_fail_permanently() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let cases = [
        (
            spec("resize-image", &queue, json!({})),
            "no handler for kind \"resize-image\" on this worker; known kinds: echo, exec, fail, noop, sleep",
        ),
        (
            spec("sleep", &queue, json!({"seconds": "ten"})),
            "invalid payload field \"seconds\": must be a number, got a string",
        ),
        (
            spec("exec", &queue, json!({"command": ["true"]})),
            "exec is disabled on this worker (start it with --enable-exec)",
        ),
    ];
    for (mut spec, error) in cases {
        spec.max_attempts = 3;
        let job = submit(&mut jobs, spec).await;
        let job = wait_terminal(&mut jobs, &job.id, T).await;
        assert_eq!(state(&job), State::Failed);
        assert_eq!(job.attempt, 1, "permanent: no retry");
        assert_eq!(job.error, error);
    }

    worker.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn exec_runs_commands_when_enabled() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.enable_exec = true;
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;

    let ok = submit(
        &mut jobs,
        spec(
            "exec",
            &queue,
            json!({"command": ["sh", "-c", "echo hi; echo err >&2"]}),
        ),
    )
    .await;
    let mut bad = spec(
        "exec",
        &queue,
        json!({"command": ["sh", "-c", "echo partial; exit 3"]}),
    );
    bad.max_attempts = 1;
    let bad = submit(&mut jobs, bad).await;

    let ok = wait_terminal(&mut jobs, &ok.id, T).await;
    assert_eq!(state(&ok), State::Completed, "{}", ok.error);
    assert_eq!(
        result_json(&ok),
        json!({"exit_code": 0.0, "stdout": "hi\n", "stderr": "err\n"})
    );
    let bad = wait_terminal(&mut jobs, &bad.id, T).await;
    assert_eq!(state(&bad), State::Failed);
    assert!(bad.error.contains("exited with code 3"), "{}", bad.error);
    assert!(bad.error.contains("partial"), "{}", bad.error);

    worker.stop(T).await;
    orchd.stop().await;
}

/// The bar: a cancel turns a sleeping job CANCELLED within 1s with
/// the default settings.
#[tokio::test]
async fn cancelling_a_running_job_stops_it_within_a_second() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let job = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 60}))).await;
    wait_state(&mut jobs, &job.id, State::Running, T).await;
    let asked = Instant::now();
    jobs.cancel_job(CancelJobRequest {
        job_id: job.id.clone(),
    })
    .await
    .expect("cancel");
    let done = wait_terminal(&mut jobs, &job.id, T).await;
    let took = asked.elapsed();
    assert_eq!(state(&done), State::Cancelled, "{}", done.error);
    assert_eq!(done.error, "cancelled by user");
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");

    // The slot is free again: the next job runs.
    let next = submit(&mut jobs, spec("noop", &queue, json!({}))).await;
    assert_eq!(
        state(&wait_terminal(&mut jobs, &next.id, T).await),
        State::Completed
    );

    worker.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn a_job_past_its_timeout_fails_and_is_retried() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let mut slow = spec("sleep", &queue, json!({"seconds": 30}));
    slow.timeout = Some(orchestrator::job::duration_to_proto(Duration::from_millis(
        300,
    )));
    slow.max_attempts = 2;
    slow.retry = Some(quick_retries());
    let slow = submit(&mut jobs, slow).await;
    let started = Instant::now();
    let done = wait_terminal(&mut jobs, &slow.id, T).await;
    assert_eq!(state(&done), State::Failed);
    assert_eq!(done.attempt, 2, "a timeout is retryable");
    assert_eq!(done.error, "timed out after 0.3s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    worker.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn concurrency_bounds_how_many_jobs_run_at_once() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.concurrency = 1;
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 0.3})))
                .await
                .id,
        );
    }
    let mut spans = Vec::new();
    for id in &ids {
        let job = wait_terminal(&mut jobs, id, T).await;
        assert_eq!(state(&job), State::Completed);
        let ms = |ts: &Option<pbjson_types::Timestamp>| {
            orchestrator::job::timestamp_to_ms(ts.as_ref().unwrap())
        };
        spans.push((ms(&job.started_at), ms(&job.finished_at)));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "jobs overlapped: {spans:?}");
    }

    worker.stop(T).await;
    orchd.stop().await;
}

/// A queue bound to the dead-letter exchange, to see what the worker
/// rejects (the exchange is a fanout, so this gets a copy of everything).
async fn dead_letter_tap(channel: &Channel) -> lapin::Consumer {
    topology::declare_base(channel).await.unwrap();
    let tap = orchestrator_testkit::unique_name("dead-tap");
    channel
        .queue_declare(
            tap.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            tap.as_str().into(),
            topology::DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_consume(
            tap.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

async fn publish_raw(channel: &Channel, queue: &str, body: &[u8], id: &str) {
    channel
        .basic_publish(
            topology::JOBS_EXCHANGE.into(),
            topology::routing_key("default", queue).as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_message_id(id.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_worker_goes_on() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let connection = amqp::connect(&orchd.amqp_url, "test-poison").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut tap = dead_letter_tap(&channel).await;
    topology::declare_base(&channel).await.unwrap();
    topology::declare_job_queue(&channel, "default", &queue)
        .await
        .unwrap();

    let garbage_id = orchestrator_testkit::unique_name("garbage");
    publish_raw(&channel, &queue, b"\xff\x00 not protobuf", &garbage_id).await;
    let unknown_id = orchestrator_testkit::unique_name("unknown");
    let unknown = DispatchMessage {
        job_id: uuid::Uuid::new_v4().to_string(),
        kind: "echo".into(),
        queue: queue.clone(),
        attempt: 1,
        published_at: None,
        namespace: "default".into(),
        max_attempts: 3,
    };
    publish_raw(&channel, &queue, &message::encode(&unknown), &unknown_id).await;

    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + T;
    while seen.len() < 2 {
        let next = tokio::time::timeout_at(deadline, tap.next())
            .await
            .expect("both poison messages dead-letter")
            .unwrap()
            .unwrap();
        if let Some(id) = next.properties.message_id() {
            let id = id.to_string();
            if id == garbage_id || id == unknown_id {
                seen.insert(id);
            }
        }
    }

    // The worker is still consuming.
    let job = submit(&mut jobs, spec("noop", &queue, json!({}))).await;
    assert_eq!(
        state(&wait_terminal(&mut jobs, &job.id, T).await),
        State::Completed
    );

    let _ = connection.close(0, "done".into()).await;
    worker.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn shutdown_lets_running_jobs_finish_within_the_drain_timeout() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));
    let mut jobs = orchd.jobs().await;

    let job = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 1}))).await;
    wait_state(&mut jobs, &job.id, State::Running, T).await;
    let took = worker.stop(T).await;
    let done = get(&mut jobs, &job.id).await;
    assert_eq!(
        state(&done),
        State::Completed,
        "the running job finished before exit"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Jobs submitted after the worker left stay queued for the next one.
    let later = submit(&mut jobs, spec("noop", &queue, json!({}))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&get(&mut jobs, &later.id).await), State::Created);
    let next = Worker::start(worker_config(&orchd, &queue));
    assert_eq!(
        state(&wait_terminal(&mut jobs, &later.id, T).await),
        State::Completed
    );

    next.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn jobs_still_running_after_the_drain_timeout_are_handed_back_for_retry() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.drain_timeout = Duration::from_millis(200);
    let worker = Worker::start(config);
    let mut jobs = orchd.jobs().await;

    let mut long = spec("sleep", &queue, json!({"seconds": 60}));
    long.max_attempts = 3;
    long.retry = Some(quick_retries());
    let long = submit(&mut jobs, long).await;
    wait_state(&mut jobs, &long.id, State::Running, T).await;
    let took = worker.stop(T).await;
    assert!(took < Duration::from_secs(3), "{took:?}");
    let after = get(&mut jobs, &long.id).await;
    assert_eq!(state(&after), State::Retrying);
    assert_eq!(after.error, "worker shutting down");

    // Another worker picks it up.
    let next = Worker::start(worker_config(&orchd, &queue));
    let again = wait_for(&mut jobs, &long.id, T, "attempt 2 running", |j| {
        j.attempt == 2 && state(j) == State::Running
    })
    .await;
    assert_eq!(again.attempt, 2);
    jobs.cancel_job(CancelJobRequest {
        job_id: long.id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        state(&wait_terminal(&mut jobs, &long.id, T).await),
        State::Cancelled
    );

    next.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn custom_handlers_run_next_to_the_built_ins() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let config = worker_config(&orchd, &queue);
    let mut registry = Registry::with_builtins(&config);
    registry
        .register(
            "shout",
            handler_fn(|ctx: JobContext| async move {
                let text = ctx.payload_json()["text"]
                    .as_str()
                    .ok_or_else(|| HandlerError::invalid_field("text", "is required"))?
                    .to_uppercase();
                to_struct(json!({"text": text, "attempt": ctx.attempt}))
            }),
        )
        .unwrap();
    let worker = Worker::with_registry(config, registry);
    let mut jobs = orchd.jobs().await;

    let job = submit(&mut jobs, spec("shout", &queue, json!({"text": "hello"}))).await;
    let job = wait_terminal(&mut jobs, &job.id, T).await;
    assert_eq!(state(&job), State::Completed, "{}", job.error);
    assert_eq!(result_json(&job), json!({"text": "HELLO", "attempt": 1.0}));

    worker.stop(T).await;
    orchd.stop().await;
}

#[tokio::test]
async fn a_handler_that_ignores_cancellation_is_abandoned_after_the_grace() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.cancel_grace = Duration::from_millis(300);
    let mut registry = Registry::with_builtins(&config);
    registry
        .register(
            "stubborn",
            handler_fn(|_ctx: JobContext| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(pbjson_types::Struct::default())
            }),
        )
        .unwrap();
    let worker = Worker::with_registry(config, registry);
    let mut jobs = orchd.jobs().await;

    let job = submit(&mut jobs, spec("stubborn", &queue, json!({}))).await;
    wait_state(&mut jobs, &job.id, State::Running, T).await;
    let asked = Instant::now();
    jobs.cancel_job(CancelJobRequest {
        job_id: job.id.clone(),
    })
    .await
    .unwrap();
    let done = wait_terminal(&mut jobs, &job.id, T).await;
    assert_eq!(state(&done), State::Cancelled);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    worker.stop(T).await;
    orchd.stop().await;
}

/// Sends: a SubmitJobs batch (orchd publishes it as one batch message),
/// then a hand-made batch message holding a duplicate of a completed
/// job's dispatch, a dispatch for a job orchd does not know and one for a
/// job that has not run. Asserts: every batched job completes exactly once
/// (attempt 1); in the hand-made message the new job runs, the duplicate is
/// dropped (the completed job is unchanged), the unknown job's dispatch
/// alone reaches the dead-letter queue as a message of its own, and the
/// message is acked, so nothing is left on the queue.
#[tokio::test]
async fn batch_messages_run_each_job_once_and_are_acked_as_a_whole() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut jobs = orchd.jobs().await;
    let batch = jobs
        .submit_jobs(orchestrator::proto::v1::SubmitJobsRequest {
            jobs: (0..5)
                .map(|n| spec("echo", &queue, json!({ "n": n })))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let worker = Worker::start(worker_config(&orchd, &queue));
    for job in &batch {
        let done = wait_terminal(&mut jobs, &job.id, T).await;
        assert_eq!(state(&done), State::Completed, "{done:?}");
        assert_eq!(done.attempt, 1);
        let completions = done
            .history
            .iter()
            .filter(|t| t.to == State::Completed.to_proto() as i32)
            .count();
        assert_eq!(completions, 1);
    }

    let (connection, channel) = hand_over_channel(&orchd, &queue).await;
    let mut tap = dead_letter_tap(&channel).await;
    // Hold the next job back from the worker: it is created on a queue no
    // one consumes, and the hand-made batch names it.
    let parked = fresh_queue();
    let fresh = submit(&mut jobs, spec("echo", &parked, json!({"fresh": true}))).await;
    let completed_before = get(&mut jobs, &batch[0].id).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let dispatches = [
        dispatch_for(&batch[0], &queue),
        DispatchMessage {
            job_id: unknown.clone(),
            ..dispatch_for(&fresh, &queue)
        },
        dispatch_for(&fresh, &queue),
    ];
    publish_by_hand(&channel, &queue, &dispatches)
        .await
        .expect("the hand-made batch is published");
    let ran = wait_terminal(&mut jobs, &fresh.id, T).await;
    assert_eq!(state(&ran), State::Completed);
    assert_eq!(
        get(&mut jobs, &batch[0].id).await,
        completed_before,
        "the duplicate changed nothing"
    );
    // The unknown job's dispatch alone is dead-lettered, as a message of
    // its own (the exchange is a fanout shared with other tests: skip
    // theirs).
    let dead = loop {
        let message = tokio::time::timeout(T, tap.next())
            .await
            .expect("the unknown dispatch was not dead-lettered")
            .expect("the tap ended")
            .expect("a delivery");
        let batch = message::is_batch(message.properties.kind().as_ref().map(|k| k.as_str()));
        let Ok(dispatches) = message::decode_dispatches(batch, &message.data) else {
            continue;
        };
        if dispatches.iter().any(|d| d.job_id == unknown) {
            break dispatches;
        }
    };
    let dead: Vec<_> = dead.iter().map(|d| d.job_id.as_str()).collect();
    assert_eq!(dead, [unknown.as_str()], "only the unknown job");
    // Acked as a whole: nothing back on the queue.
    let (_, left) = queue_counts(&channel, &queue).await;
    assert_eq!(left, 0, "the batch message was acked");

    let _ = connection.close(0, "done".into()).await;
    worker.stop(T).await;
    orchd.stop().await;
}

/// Sends: one batch message of six `sleep` jobs of an hour to two workers
/// with one slot each.
/// Asserts: two of the jobs run at the same time, one on each worker (the
/// worker that gets the message starts one and hands the other five back
/// to the queue, where the idle worker takes them; before, the first
/// worker sat on all six and the second stayed idle), and the other four
/// wait CREATED. Then every job is cancelled and ends CANCELLED without a
/// second attempt.
#[tokio::test]
async fn a_batch_of_long_jobs_spreads_over_the_workers() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let mut config = worker_config(&orchd, &queue);
    config.concurrency = 1;
    let workers = [Worker::start(config.clone()), Worker::start(config)];
    let mut jobs = orchd.jobs().await;
    // Submitted to a queue no one consumes, and handed to the workers as
    // one batch message by hand: orchd could split a SubmitJobs batch when
    // its dispatcher wakes between two of the jobs.
    let parked = fresh_queue();
    let batch = jobs
        .submit_jobs(orchestrator::proto::v1::SubmitJobsRequest {
            jobs: (0..6)
                .map(|_| spec("sleep", &parked, json!({ "seconds": 3600 })))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let (connection, channel) = hand_over_channel(&orchd, &queue).await;
    let dispatches: Vec<_> = batch.iter().map(|job| dispatch_for(job, &queue)).collect();
    publish_by_hand(&channel, &queue, &dispatches)
        .await
        .expect("the batch is published");

    let deadline = Instant::now() + T;
    let running = loop {
        let mut now = Vec::new();
        for job in &batch {
            now.push(get(&mut jobs, &job.id).await);
        }
        let running: Vec<_> = now
            .iter()
            .filter(|j| state(j) == State::Running)
            .cloned()
            .collect();
        if running.len() >= 2 {
            let waiting = now.iter().filter(|j| state(j) == State::Created).count();
            assert_eq!(
                (running.len(), waiting),
                (2, 4),
                "one job per slot, the rest waiting: {now:?}"
            );
            break running;
        }
        assert!(
            Instant::now() < deadline,
            "two jobs never ran at once: {:?}",
            now.iter()
                .map(|j| (state(j), j.worker_id.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(
        running[0].worker_id, running[1].worker_id,
        "one on each worker"
    );

    for job in &batch {
        jobs.cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap();
    }
    for job in &batch {
        let done = wait_terminal(&mut jobs, &job.id, T).await;
        assert_eq!(state(&done), State::Cancelled, "{done:?}");
        assert!(done.attempt <= 1, "{done:?}");
    }
    let _ = connection.close(200, "bye".into()).await;
    for worker in workers {
        worker.stop(T).await;
    }
    orchd.stop().await;
}

/// Sends: two `sleep` jobs of an hour, one message each, to one worker
/// with one slot: the first runs, the second is delivered to it as well
/// (acked messages do not fill the prefetch) and waits for the slot. Then
/// a second worker starts. Asserts: the waiting job goes back to the queue
/// and runs on the idle worker; before, it waited in the busy one for the
/// whole hour. Both are then cancelled.
#[tokio::test]
async fn a_job_waiting_in_a_busy_worker_goes_to_an_idle_one() {
    let orchd = Orchd::start().await;
    let queue = fresh_queue();
    let (connection, channel) = hand_over_channel(&orchd, &queue).await;
    let mut config = worker_config(&orchd, &queue);
    config.concurrency = 1;
    let busy = Worker::start(config.clone());
    let mut jobs = orchd.jobs().await;
    let first = submit(&mut jobs, spec("sleep", &queue, json!({"seconds": 3600}))).await;
    let first = wait_state(&mut jobs, &first.id, State::Running, T).await;
    // The second job's message is published by hand (the job itself waits on
    // a queue no one consumes), so that once the broker confirmed it, an
    // empty queue means the busy worker has it.
    let parked = fresh_queue();
    let second = submit(&mut jobs, spec("sleep", &parked, json!({"seconds": 3600}))).await;
    publish_by_hand(&channel, &queue, &[dispatch_for(&second, &queue)])
        .await
        .expect("the second job is published");
    let deadline = Instant::now() + T;
    while queue_counts(&channel, &queue).await.1 > 0 {
        assert!(
            Instant::now() < deadline,
            "the second job was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let idle = Worker::start(config);
    let second = wait_state(&mut jobs, &second.id, State::Running, T).await;
    assert_ne!(
        second.worker_id, first.worker_id,
        "it ran on the idle worker"
    );
    assert_eq!(second.attempt, 1);

    for job in [&first, &second] {
        jobs.cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap();
        let done = wait_terminal(&mut jobs, &job.id, T).await;
        assert_eq!(state(&done), State::Cancelled, "{done:?}");
    }
    let _ = connection.close(200, "bye".into()).await;
    for worker in [busy, idle] {
        worker.stop(T).await;
    }
    orchd.stop().await;
}
