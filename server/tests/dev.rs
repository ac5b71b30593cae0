//! `orchd dev` end to end, and one lifecycle suite run against both
//! backends (Redis + RabbitMQ with `orch-worker`s, and the embedded store
//! with the in-process queue and workers), so the two cannot drift.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TestServer, eventually, fresh_queue};
use orchestrator::job::{duration_to_proto, job_state};
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::{
    CancelJobRequest, GetJobRequest, Job, RetryPolicy, SubmitJobRequest,
};
use orchestrator::state::State;
use orchestrator_server::dev::{self, DevConfig};
use orchestrator_worker::{Registry, WorkerConfig, to_struct};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(30);

fn spec(kind: &str, queue: &str, payload: serde_json::Value) -> SubmitJobRequest {
    SubmitJobRequest {
        kind: kind.into(),
        queue: queue.into(),
        payload: Some(to_struct(payload).unwrap()),
        ..SubmitJobRequest::default()
    }
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Some(duration_to_proto(Duration::from_millis(20))),
        multiplier: 1.0,
        max_backoff: Some(duration_to_proto(Duration::from_millis(50))),
    }
}

async fn wait_until(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    what: &str,
    pred: impl Fn(&Job) -> bool,
) -> Job {
    eventually(what, T, || {
        let mut c = client.clone();
        let id = id.to_owned();
        let pred = &pred;
        async move {
            let job = c
                .get_job(GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner();
            pred(&job).then_some(job)
        }
    })
    .await
}

fn state(job: &Job) -> State {
    job_state(job).unwrap()
}

/// The lifecycle paths, against whatever backend serves `server`.
async fn lifecycle_suite(server: &str, queue: &str) {
    let mut client = JobServiceClient::connect(server.to_owned()).await.unwrap();

    let echo = client
        .submit_job(spec("echo", queue, json!({"hello": "world"})))
        .await
        .unwrap()
        .into_inner();
    let done = wait_until(&mut client, &echo.id, "echo done", |j| {
        state(j).is_terminal()
    })
    .await;
    assert_eq!(state(&done), State::Completed);
    assert_eq!(
        done.result.unwrap().fields["hello"],
        to_struct(json!({"hello": "world"})).unwrap().fields["hello"]
    );

    let mut flaky = spec(
        "fail",
        queue,
        json!({"message": "flaky", "succeed_on_attempt": 2}),
    );
    flaky.retry = Some(quick_retries());
    let flaky = client.submit_job(flaky).await.unwrap().into_inner();
    let done = wait_until(&mut client, &flaky.id, "flaky done", |j| {
        state(j).is_terminal()
    })
    .await;
    assert_eq!((state(&done), done.attempt), (State::Completed, 2));

    let permanent = client
        .submit_job(spec(
            "fail",
            queue,
            json!({"message": "bad input", "permanent": true}),
        ))
        .await
        .unwrap()
        .into_inner();
    let done = wait_until(&mut client, &permanent.id, "permanent failure", |j| {
        state(j).is_terminal()
    })
    .await;
    assert_eq!(
        (state(&done), done.attempt, done.error.as_str()),
        (State::Failed, 1, "bad input")
    );

    let sleeper = client
        .submit_job(spec("sleep", queue, json!({"seconds": 30})))
        .await
        .unwrap()
        .into_inner();
    wait_until(&mut client, &sleeper.id, "sleep running", |j| {
        state(j) == State::Running
    })
    .await;
    let asked = tokio::time::Instant::now();
    client
        .cancel_job(CancelJobRequest {
            job_id: sleeper.id.clone(),
        })
        .await
        .unwrap();
    let done = wait_until(&mut client, &sleeper.id, "sleep cancelled", |j| {
        state(j).is_terminal()
    })
    .await;
    assert_eq!(state(&done), State::Cancelled);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn the_lifecycle_is_the_same_on_orchd_dev() {
    let running = dev::start(DevConfig::local_ephemeral(2)).await.unwrap();
    let server = format!("http://{}", running.server.grpc_addr);
    lifecycle_suite(&server, "default").await;
    lifecycle_suite(&server, &fresh_queue()).await;
    let stop = CancellationToken::new();
    stop.cancel();
    tokio::time::timeout(T, running.wait(stop))
        .await
        .expect("dev stops");
}

#[tokio::test]
async fn the_lifecycle_is_the_same_on_redis_and_rabbitmq() {
    let server = TestServer::start().await;
    let url = format!("http://{}", server.grpc_addr);
    let queue = fresh_queue();
    let mut config = WorkerConfig::local(url.clone(), server.config.amqp_url.clone());
    config.queues = vec![queue.clone()];
    config.concurrency = 2;
    let stop = CancellationToken::new();
    let worker = tokio::spawn(orchestrator_worker::run(
        config.clone(),
        Registry::with_builtins(&config),
        stop.clone(),
    ));
    lifecycle_suite(&url, &queue).await;
    stop.cancel();
    tokio::time::timeout(T, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn external_workers_are_told_that_dev_takes_none() {
    let running = dev::start(DevConfig::local_ephemeral(1)).await.unwrap();
    let mut config = WorkerConfig::local(
        format!("http://{}", running.server.grpc_addr),
        "amqp://guest:guest@127.0.0.1:1/%2f",
    );
    config.queues = vec!["default".into()];
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        orchestrator_worker::run(
            config.clone(),
            Registry::with_builtins(&config),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the worker gives up at once instead of waiting for a broker")
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("in-process") && message.contains("orchd serve"),
        "{message}"
    );
    let stop = CancellationToken::new();
    stop.cancel();
    running.wait(stop).await;
}

struct DevProcess {
    child: tokio::process::Child,
    grpc: String,
}

async fn spawn_dev(
    data_dir: &std::path::Path,
    workers: u16,
    grpc_port: u16,
    http_port: u16,
) -> DevProcess {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchd"))
        .arg("dev")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--workers", &workers.to_string()])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("orchd dev starts");
    let grpc = format!("http://127.0.0.1:{grpc_port}");
    eventually("orchd dev answers", T, || {
        let grpc = grpc.clone();
        async move { JobServiceClient::connect(grpc).await.ok() }
    })
    .await;
    DevProcess { child, grpc }
}

/// Injects: SIGKILL to an `orchd dev` process holding a CREATED job (no
/// workers) and, in a second run, a RUNNING one. Asserts: after a restart on
/// the same data directory both jobs are still there and complete: the
/// CREATED one is dispatched again, the RUNNING one is recovered like a lost
/// worker's (its history shows the lost attempt).
#[tokio::test]
async fn a_killed_dev_server_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc_port, http_port) = (
        orchestrator_testkit::free_port(),
        orchestrator_testkit::free_port(),
    );

    let mut first = spawn_dev(dir.path(), 0, grpc_port, http_port).await;
    let mut client = JobServiceClient::connect(first.grpc.clone()).await.unwrap();
    let waiting = client
        .submit_job(spec("echo", "default", json!({"n": 1})))
        .await
        .unwrap()
        .into_inner();
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();

    let mut second = spawn_dev(dir.path(), 1, grpc_port, http_port).await;
    let mut client = JobServiceClient::connect(second.grpc.clone())
        .await
        .unwrap();
    let done = wait_until(
        &mut client,
        &waiting.id,
        "the CREATED job runs after the restart",
        |j| state(j).is_terminal(),
    )
    .await;
    assert_eq!(state(&done), State::Completed);
    let mut long = spec("sleep", "default", json!({"seconds": 60}));
    long.retry = Some(quick_retries());
    let long = client.submit_job(long).await.unwrap().into_inner();
    wait_until(&mut client, &long.id, "sleep running", |j| {
        state(j) == State::Running
    })
    .await;
    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();

    let third = spawn_dev(dir.path(), 1, grpc_port, http_port).await;
    let mut client = JobServiceClient::connect(third.grpc.clone()).await.unwrap();
    let recovered = wait_until(
        &mut client,
        &long.id,
        "the interrupted job runs again",
        |j| state(j) == State::Running && j.attempt == 2,
    )
    .await;
    let lost = recovered
        .history
        .iter()
        .find(|t| t.to == State::Retrying.to_proto() as i32)
        .expect("the lost attempt is in the history");
    assert!(lost.reason.contains("worker lost"), "{}", lost.reason);
    client
        .cancel_job(CancelJobRequest {
            job_id: long.id.clone(),
        })
        .await
        .unwrap();
    let done = wait_until(&mut client, &long.id, "cancelled", |j| {
        state(j).is_terminal()
    })
    .await;
    assert_eq!(state(&done), State::Cancelled);
}
