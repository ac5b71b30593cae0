//! Lifecycle paths and recovery: cancels before start and while retrying,
//! backoff in the history, duplicated dispatches, a worker killed with
//! SIGKILL mid-job, and RabbitMQ, Redis and orchd restarting while jobs
//! flow. Everything real: orchd, Redis, RabbitMQ and workers.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use orchestrator::job::{duration_to_proto, ms_to_timestamp, now_ms};
use orchestrator::proto::v1::{
    CancelJobRequest, DispatchMessage, Job, RetryPolicy, SubmitJobRequest, job,
};
use orchestrator::queue::{message, topology};
use orchestrator::state::State;
use orchestrator_server::ServeConfig;
use orchestrator_testkit::{RabbitServer, RedisServer, free_port, unique_name};
use orchestrator_worker::{Registry, handler_fn};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// Successful handler runs per job id.
type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// The built-ins plus `count`: sleeps `ms` (default 50) honouring
/// cancellation, then records one successful run of the job.
fn counting_registry(config: &orchestrator_worker::WorkerConfig, runs: Runs) -> Registry {
    let mut registry = Registry::with_builtins(config);
    registry.register(
        "count",
        handler_fn(move |ctx| {
            let runs = runs.clone();
            async move {
                let ms = ctx.payload_json()["ms"].as_u64().unwrap_or(50);
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Err(orchestrator_worker::HandlerError::Cancelled),
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                }
                *runs.lock().unwrap().entry(ctx.job.id.clone()).or_default() += 1;
                Ok(Default::default())
            }
        }),
    )
    .expect("count is a valid kind");
    registry
}

fn transitions(job: &Job) -> Vec<(State, State)> {
    job.history
        .iter()
        .filter_map(|t| {
            let from = job::State::try_from(t.from)
                .ok()
                .and_then(State::from_proto)?;
            let to = job::State::try_from(t.to)
                .ok()
                .and_then(State::from_proto)?;
            Some((from, to))
        })
        .collect()
}

fn count(job: &Job, pair: (State, State)) -> usize {
    transitions(job).into_iter().filter(|p| *p == pair).count()
}

/// An orch-worker process on `queue` with a 2s lease renewed every 500ms,
/// so a lost worker is noticed quickly.
fn spawn_worker(
    server: &str,
    amqp_url: &str,
    queue: &str,
    id_prefix: &str,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_orch-worker"))
        .args([
            "--server",
            server,
            "--amqp-url",
            amqp_url,
            "--queues",
            queue,
        ])
        .args([
            "--lease",
            "2s",
            "--heartbeat-interval",
            "500ms",
            "--worker-id",
            id_prefix,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("orch-worker starts")
}

/// Cancel before start: the job is CANCELLED at once and a worker that
/// later receives its dispatch drops it without running it.
#[tokio::test]
async fn a_job_cancelled_before_it_starts_never_runs() {
    let orchd = Orchd::start().await;
    let mut jobs = orchd.jobs().await;
    let queue = fresh_queue();
    let runs = Runs::default();
    let job = submit(&mut jobs, spec("count", &queue, json!({}))).await;
    let cancelled = jobs
        .cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), State::Cancelled);

    let config = worker_config(&orchd, &queue);
    let worker = Worker::with_registry(config.clone(), counting_registry(&config, runs.clone()));
    // A marker job on the same queue: once it completed, the cancelled
    // job's dispatch (published earlier) has been consumed too.
    let marker = submit(&mut jobs, spec("count", &queue, json!({}))).await;
    wait_state(&mut jobs, &marker.id, State::Completed, T).await;
    let after = get(&mut jobs, &job.id).await;
    assert_eq!(state(&after), State::Cancelled);
    assert_eq!(after.attempt, 0);
    assert!(
        !transitions(&after)
            .iter()
            .any(|(_, to)| *to == State::Running)
    );
    assert_eq!(runs.lock().unwrap().get(&job.id), None, "never ran");
    worker.stop(T).await;
    orchd.stop().await;
}

/// Fail, retry with visible backoff, and cancel while RETRYING.
#[tokio::test]
async fn retries_show_their_backoff_and_a_retrying_job_can_be_cancelled() {
    let orchd = Orchd::start().await;
    let mut jobs = orchd.jobs().await;
    let queue = fresh_queue();
    let worker = Worker::start(worker_config(&orchd, &queue));

    // Fails twice, then succeeds on attempt 3.
    let mut flaky = spec(
        "fail",
        &queue,
        json!({"message": "flaky", "succeed_on_attempt": 3}),
    );
    flaky.retry = Some(quick_retries());
    let flaky = submit(&mut jobs, flaky).await;
    let done = wait_terminal(&mut jobs, &flaky.id, T).await;
    assert_eq!(state(&done), State::Completed, "{}", done.error);
    assert_eq!(done.attempt, 3);
    let retries: Vec<_> = done
        .history
        .iter()
        .filter(|t| t.to == job::State::Retrying as i32)
        .collect();
    assert_eq!(retries.len(), 2);
    for (i, t) in retries.iter().enumerate() {
        assert_eq!(t.attempt, i as u32 + 1);
        assert!(
            t.reason.contains("flaky") && t.reason.contains("retrying in"),
            "{}",
            t.reason
        );
    }

    // Always fails: FAILED after max_attempts, each attempt's error in the history.
    let mut doomed = spec("fail", &queue, json!({"message": "always"}));
    doomed.retry = Some(quick_retries());
    doomed.max_attempts = 2;
    let doomed = submit(&mut jobs, doomed).await;
    let failed = wait_terminal(&mut jobs, &doomed.id, T).await;
    assert_eq!(state(&failed), State::Failed);
    assert_eq!(failed.error, "always");
    assert_eq!(count(&failed, (State::Running, State::Retrying)), 1);
    assert_eq!(count(&failed, (State::Running, State::Failed)), 1);

    // A long backoff leaves time to cancel while RETRYING.
    let mut slow = spec("fail", &queue, json!({"message": "later"}));
    slow.retry = Some(RetryPolicy {
        initial_backoff: Some(duration_to_proto(Duration::from_secs(60))),
        multiplier: 1.0,
        max_backoff: Some(duration_to_proto(Duration::from_secs(60))),
    });
    let slow = submit(&mut jobs, slow).await;
    let retrying = wait_state(&mut jobs, &slow.id, State::Retrying, T).await;
    assert!(
        retrying.next_attempt_at.is_some(),
        "the next attempt time is visible"
    );
    let cancelled = jobs
        .cancel_job(CancelJobRequest {
            job_id: slow.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), State::Cancelled);
    assert_eq!(count(&cancelled, (State::Retrying, State::Cancelled)), 1);
    assert!(cancelled.next_attempt_at.is_none());
    worker.stop(T).await;
    orchd.stop().await;
}

async fn publish_dispatch(amqp_url: &str, msg: &DispatchMessage) {
    let conn = orchestrator::queue::amqp::connect(amqp_url, "test-duplicator")
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    topology::declare_base(&channel).await.unwrap();
    topology::declare_job_queue(&channel, &msg.namespace, &msg.queue)
        .await
        .unwrap();
    channel
        .basic_publish(
            topology::JOBS_EXCHANGE.into(),
            topology::routing_key_of(msg).as_str().into(),
            BasicPublishOptions::default(),
            &message::encode(msg),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = conn.close(0, "done".into()).await;
}

/// Injects: the same dispatch three times (the real one plus two
/// duplicates) to two workers consuming one queue. Asserts: exactly one
/// attempt runs; the duplicates are dropped.
#[tokio::test]
async fn two_workers_racing_on_a_duplicated_message_run_one_attempt() {
    let orchd = Orchd::start().await;
    let mut jobs = orchd.jobs().await;
    let queue = fresh_queue();
    let runs = Runs::default();
    let workers: Vec<Worker> = (0..2)
        .map(|_| {
            let config = worker_config(&orchd, &queue);
            Worker::with_registry(config.clone(), counting_registry(&config, runs.clone()))
        })
        .collect();
    let job = submit(&mut jobs, spec("count", &queue, json!({"ms": 500}))).await;
    let duplicate = DispatchMessage {
        job_id: job.id.clone(),
        kind: "count".into(),
        queue: queue.clone(),
        attempt: 1,
        published_at: Some(ms_to_timestamp(now_ms())),
        namespace: job.namespace.clone(),
        max_attempts: job.max_attempts,
    };
    publish_dispatch(&orchd.amqp_url, &duplicate).await;
    publish_dispatch(&orchd.amqp_url, &duplicate).await;
    let done = wait_terminal(&mut jobs, &job.id, T).await;
    assert_eq!(state(&done), State::Completed);
    // Give the duplicates time to be consumed and dropped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = get(&mut jobs, &job.id).await;
    assert_eq!(after.attempt, 1);
    assert_eq!(count(&after, (State::Created, State::Running)), 1);
    assert_eq!(runs.lock().unwrap().get(&job.id), Some(&1));
    for w in workers {
        w.stop(T).await;
    }
    orchd.stop().await;
}

/// Injects: SIGKILL to an orch-worker process in the middle of a job.
/// Asserts: after the lease expires the sweeper records "worker lost", the
/// job is retried on another worker and completes exactly once, and the
/// history shows the lost attempt.
#[tokio::test]
async fn a_job_whose_worker_is_killed_is_retried_elsewhere_and_completes_once() {
    let orchd = Orchd::start().await;
    let mut jobs = orchd.jobs().await;
    let queue = fresh_queue();
    let mut spec = spec("sleep", &queue, json!({"seconds": 3}));
    spec.retry = Some(quick_retries());
    let job = submit(&mut jobs, spec).await;

    let mut doomed = spawn_worker(&orchd.server_url(), &orchd.amqp_url, &queue, "doomed");
    let running = wait_state(&mut jobs, &job.id, State::Running, T).await;
    assert!(
        running.worker_id.starts_with("doomed"),
        "{}",
        running.worker_id
    );
    doomed.start_kill().unwrap();
    doomed.wait().await.unwrap();

    let mut config = worker_config(&orchd, &queue);
    config.lease = Duration::from_secs(2);
    config.heartbeat_interval = Duration::from_millis(500);
    config.worker_id_prefix = Some("survivor".into());
    let survivor = Worker::start(config);
    let done = wait_terminal(&mut jobs, &job.id, Duration::from_secs(60)).await;
    assert_eq!(state(&done), State::Completed, "{}", done.error);
    assert_eq!(done.attempt, 2);
    assert_eq!(count(&done, (State::Running, State::Completed)), 1);
    let lost = done
        .history
        .iter()
        .find(|t| t.from == job::State::Running as i32 && t.to == job::State::Retrying as i32)
        .expect("the lost attempt is in the history");
    assert_eq!(lost.attempt, 1);
    assert!(lost.reason.contains("worker lost"), "{}", lost.reason);
    assert!(lost.worker_id.starts_with("doomed"));
    let second = done
        .history
        .iter()
        .find(|t| t.to == job::State::Running as i32 && t.attempt == 2)
        .expect("a second attempt");
    assert!(
        second.worker_id.starts_with("survivor"),
        "{}",
        second.worker_id
    );
    survivor.stop(T).await;
    orchd.stop().await;
}

/// Submits until orchd accepts; the idempotency key makes retries safe.
async fn submit_reliably(server: &str, spec: SubmitJobRequest) -> String {
    loop {
        let client = orchestrator::proto::v1::job_service_client::JobServiceClient::connect(
            server.to_owned(),
        )
        .await;
        if let Ok(mut client) = client
            && let Ok(job) = client.submit_job(spec.clone()).await
        {
            return job.into_inner().id;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Injects, while jobs flow through two workers: RabbitMQ killed and
/// restarted, then Redis killed and restarted (AOF, fsync always), then
/// orchd stopped and started again on the same address. Asserts: every job
/// the client got an id for reaches COMPLETED, none is lost, and none ran
/// to completion twice.
#[tokio::test]
async fn jobs_survive_rabbitmq_redis_and_orchd_restarts() {
    let mut rabbit = tokio::task::spawn_blocking(RabbitServer::start)
        .await
        .unwrap();
    let mut redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let port = free_port();
    let mut config = ServeConfig::local(redis.url(), rabbit.url());
    config.grpc_addr = format!("127.0.0.1:{port}").parse().unwrap();
    config.redis_prefix = format!("{}:", unique_name("chaos"));
    let server = format!("http://127.0.0.1:{port}");
    let mut orchd = Some(Orchd::with_config(config.clone()).await);
    let queue = fresh_queue();
    let runs = Runs::default();
    let workers: Vec<Worker> = (0..2)
        .map(|_| {
            let mut wc = orchestrator_worker::WorkerConfig::local(server.clone(), rabbit.url());
            wc.queues = vec![queue.clone()];
            wc.concurrency = 4;
            Worker::with_registry(wc.clone(), counting_registry(&wc, runs.clone()))
        })
        .collect();

    let mut ids = Vec::new();
    let wave = |n: usize, tag: &str| {
        (0..n)
            .map(|i| SubmitJobRequest {
                kind: "count".into(),
                queue: queue.clone(),
                idempotency_key: format!("{tag}-{i}"),
                payload: Some(orchestrator_worker::to_struct(json!({"ms": 100})).unwrap()),
                ..SubmitJobRequest::default()
            })
            .collect::<Vec<_>>()
    };
    for phase in ["before", "after-rabbit", "after-redis", "after-orchd"] {
        for spec in wave(15, phase) {
            ids.push(submit_reliably(&server, spec).await);
        }
        match phase {
            "before" => {
                rabbit = tokio::task::spawn_blocking(move || {
                    rabbit.kill();
                    rabbit.start_again();
                    rabbit
                })
                .await
                .unwrap();
            }
            "after-rabbit" => {
                redis = tokio::task::spawn_blocking(move || {
                    redis.kill();
                    redis.start_again();
                    redis
                })
                .await
                .unwrap();
            }
            "after-redis" => {
                orchd.take().unwrap().stop().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                orchd = Some(Orchd::with_config(config.clone()).await);
            }
            _ => {}
        }
    }
    assert_eq!(ids.len(), 60);
    let mut client = orchd.as_ref().unwrap().jobs().await;
    for id in &ids {
        let done = wait_terminal(&mut client, id, Duration::from_secs(120)).await;
        assert_eq!(state(&done), State::Completed, "job {id}: {}", done.error);
        assert_eq!(
            count(&done, (State::Running, State::Completed)),
            1,
            "job {id}"
        );
    }
    let runs = runs.lock().unwrap().clone();
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "job {id} ran to completion once");
    }
    for w in workers {
        w.stop(T).await;
    }
    orchd.take().unwrap().stop().await;
    drop((rabbit, redis));
}

/// Injects: SIGSTOP to an orch-worker process in the middle of a job, for
/// longer than its lease, then SIGCONT. Asserts: the job is retried and
/// completed by another worker while the first is frozen, and when the
/// frozen worker wakes up its stale attempt is fenced: the job stays
/// COMPLETED with one completion, by the second worker.
#[tokio::test]
async fn a_frozen_worker_that_wakes_up_after_its_lease_is_fenced() {
    let orchd = Orchd::start().await;
    let mut jobs = orchd.jobs().await;
    let queue = fresh_queue();
    let mut spec = spec("sleep", &queue, json!({"seconds": 2}));
    spec.retry = Some(quick_retries());
    let job = submit(&mut jobs, spec).await;

    // A short AMQP heartbeat, so the broker takes back what the frozen
    // worker prefetched within seconds (the default, 10s, would take ~30s).
    let amqp = orchestrator::queue::amqp::with_default_heartbeat(&format!(
        "{}?heartbeat=2",
        orchd.amqp_url
    ));
    let mut frozen = spawn_worker(&orchd.server_url(), &amqp, &queue, "frozen");
    let pid = frozen.id().expect("a pid") as i32;
    wait_state(&mut jobs, &job.id, State::Running, T).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();

    let mut config = worker_config(&orchd, &queue);
    config.lease = Duration::from_secs(2);
    config.heartbeat_interval = Duration::from_millis(500);
    config.worker_id_prefix = Some("awake".into());
    let awake = Worker::start(config);
    let done = wait_terminal(&mut jobs, &job.id, Duration::from_secs(60)).await;
    assert_eq!(state(&done), State::Completed);

    // Wake the frozen worker: its handler finishes, its reports are refused.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = get(&mut jobs, &job.id).await;
    assert_eq!(state(&after), State::Completed);
    assert_eq!(
        after.history, done.history,
        "the stale attempt changed nothing"
    );
    assert_eq!(count(&after, (State::Running, State::Completed)), 1);
    let completed_by = after
        .history
        .iter()
        .find(|t| t.to == job::State::Completed as i32)
        .unwrap();
    assert!(
        completed_by.worker_id.starts_with("awake"),
        "{}",
        completed_by.worker_id
    );
    frozen.start_kill().unwrap();
    let _ = frozen.wait().await;
    awake.stop(T).await;
    orchd.stop().await;
}

/// A TCP relay in front of orchd's gRPC port that can be cut: its open
/// connections are dropped and new ones refused, as in a network partition
/// between one worker and orchd.
struct Relay {
    url: String,
    cut: tokio_util::sync::CancellationToken,
}

impl Relay {
    async fn to(orchd: &Orchd) -> Relay {
        let target = orchd.server_url().trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cut = tokio_util::sync::CancellationToken::new();
        let relay_cut = cut.clone();
        tokio::spawn(async move {
            loop {
                let mut inbound = tokio::select! {
                    // Dropping the listener refuses new connections.
                    _ = relay_cut.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(_) => return,
                    },
                };
                let (target, cut) = (target.clone(), relay_cut.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Relay { url, cut }
    }
}

/// When each attempt of a `hold` job ran: attempt → (start, end).
type Spans = Arc<Mutex<HashMap<u32, (std::time::Instant, Option<std::time::Instant>)>>>;

/// The built-ins plus `hold`: attempt 1 runs until it is cancelled (an
/// hour at most); later attempts complete after 200 ms.
fn holding_registry(config: &orchestrator_worker::WorkerConfig, spans: Spans) -> Registry {
    let mut registry = Registry::with_builtins(config);
    registry
        .register(
            "hold",
            handler_fn(move |ctx| {
                let spans = spans.clone();
                async move {
                    let attempt = ctx.job.attempt;
                    spans
                        .lock()
                        .unwrap()
                        .insert(attempt, (std::time::Instant::now(), None));
                    let run = if attempt == 1 {
                        Duration::from_secs(3600)
                    } else {
                        Duration::from_millis(200)
                    };
                    let cancelled = tokio::select! {
                        _ = ctx.cancel.cancelled() => true,
                        _ = tokio::time::sleep(run) => false,
                    };
                    if let Some(span) = spans.lock().unwrap().get_mut(&attempt) {
                        span.1 = Some(std::time::Instant::now());
                    }
                    if cancelled {
                        return Err(orchestrator_worker::HandlerError::Cancelled);
                    }
                    Ok(Default::default())
                }
            }),
        )
        .expect("hold is a valid kind");
    registry
}

/// Injects: a network partition between a worker and orchd (a relay on the
/// worker's gRPC path, cut) while the worker runs attempt 1 of a job, with
/// a 3 s lease; orchd and a second worker stay connected. Asserts: orchd's
/// sweeper gives the job to the second worker, which completes attempt 2,
/// and the cut-off worker stopped attempt 1 before attempt 2 started: the
/// two attempts never ran at the same time.
#[tokio::test]
async fn a_worker_cut_off_from_orchd_stops_its_attempt_before_another_worker_runs_it() {
    let orchd = Orchd::start().await;
    let mut jobs = orchd.jobs().await;
    let queue = fresh_queue();
    let spans: Spans = Arc::default();
    let relay = Relay::to(&orchd).await;

    let mut cut_off = worker_config(&orchd, &queue);
    cut_off.server = relay.url.clone();
    cut_off.lease = Duration::from_secs(3);
    cut_off.heartbeat_interval = Duration::from_millis(500);
    cut_off.concurrency = 1;
    cut_off.worker_id_prefix = Some("cut-off".into());
    let cut_off = Worker::with_registry(cut_off.clone(), holding_registry(&cut_off, spans.clone()));

    let mut spec = spec("hold", &queue, json!({}));
    spec.max_attempts = 3;
    spec.retry = Some(quick_retries());
    let job = submit(&mut jobs, spec).await;
    let running = wait_state(&mut jobs, &job.id, State::Running, T).await;
    assert!(
        running.worker_id.starts_with("cut-off"),
        "{}",
        running.worker_id
    );
    relay.cut.cancel();

    let mut other = worker_config(&orchd, &queue);
    other.worker_id_prefix = Some("other".into());
    let other = Worker::with_registry(other.clone(), holding_registry(&other, spans.clone()));
    let done = wait_terminal(&mut jobs, &job.id, Duration::from_secs(60)).await;
    assert_eq!(state(&done), State::Completed, "{}", done.error);
    assert_eq!(done.attempt, 2);
    assert!(done.worker_id.starts_with("other"), "{}", done.worker_id);

    let spans = spans.lock().unwrap().clone();
    let (_, first_end) = spans[&1];
    let (second_start, _) = spans[&2];
    let first_end = first_end.expect("the cut-off worker stopped attempt 1");
    assert!(
        first_end <= second_start,
        "attempt 1 ran {:?} into attempt 2",
        first_end - second_start
    );

    other.stop(T).await;
    cut_off.stop(T).await;
    orchd.stop().await;
}
