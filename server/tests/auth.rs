//! Authentication and roles, abuse-style, over REST and gRPC against a real
//! orchd (Redis and RabbitMQ) started with a tokens file, plus the
//! secure-by-default refusal and `orchd dev` with tokens.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::tokens::{bearer, channel, header, jobs_as, rest, workers_as};
use common::{TestServer, eventually, fresh_queue, spec};
use orchestrator::auth::{BearerAuth, Role};
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::{
    CancelJobRequest, FinishAttemptRequest, GetJobRequest, GetServerInfoRequest, HeartbeatRequest,
    Job, ListJobsRequest, StartAttemptRequest, SubmitJobRequest, SubmitJobsRequest,
    finish_attempt_request::Outcome, job, start_attempt_response::Decision,
};
use orchestrator_server::dev::{self, DevConfig};
use orchestrator_server::{ServeConfig, ServerError};
use orchestrator_testkit::{shared_amqp_url, shared_redis_url, unique_name};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

const CLIENT: &str = "orch_client-token-for-alice";
const WORKER: &str = "orch_worker-token-for-w1";
const ADMIN: &str = "orch_admin-token-for-root";
const UNKNOWN: &str = "orch_not-a-token-this-server-knows";
const CAROL: &str = "orch_client-token-for-carol";

/// A tokens file with alice (client), w1 (worker) and root (admin).
fn tokens_file(dir: &tempfile::TempDir) -> PathBuf {
    common::tokens::tokens_file(
        dir,
        &[
            ("alice", Role::Client, "default", CLIENT),
            ("w1", Role::Worker, "default", WORKER),
            ("root", Role::Admin, "default", ADMIN),
        ],
    )
}

async fn secured_server(dir: &tempfile::TempDir) -> TestServer {
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    config.redis_prefix = format!("{}:", unique_name("t"));
    config.auth.tokens_file = Some(tokens_file(dir));
    TestServer::with_config(config).await
}

/// The header values that must not get in: each with the code it gets.
fn bad_credentials() -> Vec<(&'static str, Option<String>)> {
    vec![
        ("no token", None),
        ("Bearer with nothing", Some("Bearer".into())),
        ("Basic scheme", Some("Basic xyz".into())),
        ("garbage", Some("garbage".into())),
        ("unknown token", bearer(UNKNOWN)),
    ]
}

/// How many jobs `queue` holds, and the state of `id`, as the admin sees them.
async fn snapshot(server: &TestServer, queue: &str, id: &str) -> (usize, i32) {
    let mut admin = jobs_as(server, bearer(ADMIN).as_deref()).await;
    let list = admin
        .list_jobs(ListJobsRequest {
            queue: queue.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let job = admin
        .get_job(GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    (list.jobs.len(), job.state)
}

#[tokio::test]
async fn rest_refuses_missing_malformed_unknown_and_worker_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(&dir).await;
    let queue = fresh_queue();
    let submit_body = format!(r#"{{"kind":"echo","queue":"{queue}"}}"#);
    let batch_body = format!(r#"{{"jobs":[{{"kind":"echo","queue":"{queue}"}}]}}"#);

    let (status, job, _) = rest(
        &server,
        reqwest::Method::POST,
        "/jobs",
        bearer(CLIENT).as_deref(),
        Some(&submit_body),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let before = snapshot(&server, &queue, &id).await;
    assert_eq!(before, (1, job::State::Created as i32));

    let routes: Vec<(reqwest::Method, String, Option<&str>)> = vec![
        (reqwest::Method::POST, "/jobs".into(), Some(&submit_body)),
        (
            reqwest::Method::POST,
            "/jobs:batchSubmit".into(),
            Some(&batch_body),
        ),
        (reqwest::Method::GET, format!("/jobs?queue={queue}"), None),
        (reqwest::Method::GET, format!("/jobs/{id}"), None),
        (reqwest::Method::DELETE, format!("/jobs/{id}"), None),
        (reqwest::Method::GET, format!("/jobs/{id}:watch"), None),
    ];
    let mut cases = bad_credentials()
        .into_iter()
        .map(|(what, value)| (what, value, 401u16, Code::Unauthenticated))
        .collect::<Vec<_>>();
    cases.push(("worker token", bearer(WORKER), 403, Code::PermissionDenied));
    for (method, path, body) in &routes {
        for (what, value, want_status, want_code) in &cases {
            let (status, body, headers) =
                rest(&server, method.clone(), path, value.as_deref(), *body).await;
            assert_eq!(status, *want_status, "{what}: {method} {path}: {body}");
            assert_eq!(body["code"], *want_code as i32, "{what}: {method} {path}");
            let message = body["message"].as_str().unwrap();
            assert!(!message.is_empty());
            for secret in [UNKNOWN, WORKER, "xyz"] {
                assert!(
                    !message.contains(secret),
                    "{what}: the message echoes the credentials: {message}"
                );
            }
            if *want_status == 401 {
                assert_eq!(headers["www-authenticate"], "Bearer", "{what}");
            }
            assert_eq!(
                snapshot(&server, &queue, &id).await,
                before,
                "{what}: {method} {path} changed a job"
            );
        }
    }

    // The right tokens do get in; admin too.
    for token in [CLIENT, ADMIN] {
        let (status, list, _) = rest(
            &server,
            reqwest::Method::GET,
            &format!("/jobs?queue={queue}"),
            bearer(token).as_deref(),
            None,
        )
        .await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    }
    // Open routes need no token.
    let (status, _, _) = rest(&server, reqwest::Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    eventually(
        "/healthz 200 without a token",
        Duration::from_secs(20),
        || {
            let server = &server;
            async move {
                let (status, _, _) =
                    rest(server, reqwest::Method::GET, "/healthz", None, None).await;
                assert!(status == 200 || status == 503, "{status}");
                (status == 200).then_some(())
            }
        },
    )
    .await;
    // An unknown route is still a 404, not a 401.
    let (status, _, _) = rest(&server, reqwest::Method::GET, "/nope", None, None).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn grpc_refuses_bad_tokens_and_wrong_roles_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(&dir).await;
    let queue = fresh_queue();
    let mut alice = jobs_as(&server, bearer(CLIENT).as_deref()).await;
    let job = alice
        .submit_job(spec("echo", &queue))
        .await
        .unwrap()
        .into_inner();
    let id = job.id.clone();
    let before = snapshot(&server, &queue, &id).await;
    assert_eq!(before, (1, job::State::Created as i32));

    let mut cases = bad_credentials()
        .into_iter()
        .map(|(what, value)| (what, value, Code::Unauthenticated))
        .collect::<Vec<_>>();
    cases.push(("worker token", bearer(WORKER), Code::PermissionDenied));
    for (what, value, want) in &cases {
        let mut client = jobs_as(&server, value.as_deref()).await;
        let results: Vec<(&str, Result<(), Status>)> = vec![
            (
                "SubmitJob",
                client.submit_job(spec("echo", &queue)).await.map(drop),
            ),
            (
                "SubmitJobs",
                client
                    .submit_jobs(SubmitJobsRequest {
                        jobs: vec![spec("echo", &queue)],
                    })
                    .await
                    .map(drop),
            ),
            (
                "ListJobs",
                client.list_jobs(ListJobsRequest::default()).await.map(drop),
            ),
            (
                "GetJob",
                client
                    .get_job(GetJobRequest { job_id: id.clone() })
                    .await
                    .map(drop),
            ),
            (
                "CancelJob",
                client
                    .cancel_job(CancelJobRequest { job_id: id.clone() })
                    .await
                    .map(drop),
            ),
        ];
        for (rpc, result) in results {
            let status = result.expect_err(&format!("{what}: {rpc} must be refused"));
            assert_eq!(status.code(), *want, "{what}: {rpc}: {status:?}");
            assert!(
                !status.message().contains(UNKNOWN) && !status.message().contains(WORKER),
                "{what}: {rpc} echoes the token: {}",
                status.message()
            );
        }
        assert_eq!(snapshot(&server, &queue, &id).await, before, "{what}");
    }

    // WorkerService: refused without a valid token, and to a client token.
    let mut worker_cases = bad_credentials()
        .into_iter()
        .map(|(what, value)| (what, value, Code::Unauthenticated))
        .collect::<Vec<_>>();
    worker_cases.push(("client token", bearer(CLIENT), Code::PermissionDenied));
    for (what, value, want) in &worker_cases {
        let mut client = workers_as(&server, value.as_deref()).await;
        let results: Vec<(&str, Result<(), Status>)> = vec![
            (
                "GetServerInfo",
                client
                    .get_server_info(GetServerInfoRequest {})
                    .await
                    .map(drop),
            ),
            (
                "StartAttempt",
                client
                    .start_attempt(StartAttemptRequest {
                        job_id: id.clone(),
                        worker_id: "intruder".into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            (
                "Heartbeat",
                client
                    .heartbeat(HeartbeatRequest {
                        worker_id: "intruder".into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            (
                "FinishAttempt",
                client
                    .finish_attempt(FinishAttemptRequest {
                        job_id: id.clone(),
                        outcome: Some(Outcome::Completed(Default::default())),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            (
                "StartAttempts",
                client
                    .start_attempts(orchestrator::proto::v1::StartAttemptsRequest {
                        attempts: vec![StartAttemptRequest {
                            job_id: id.clone(),
                            worker_id: "intruder".into(),
                            ..Default::default()
                        }],
                    })
                    .await
                    .map(drop),
            ),
            (
                "FinishAttempts",
                client
                    .finish_attempts(orchestrator::proto::v1::FinishAttemptsRequest {
                        attempts: vec![FinishAttemptRequest {
                            job_id: id.clone(),
                            outcome: Some(Outcome::Completed(Default::default())),
                            ..Default::default()
                        }],
                    })
                    .await
                    .map(drop),
            ),
        ];
        for (rpc, result) in results {
            let status = result.expect_err(&format!("{what}: {rpc} must be refused"));
            assert_eq!(status.code(), *want, "{what}: {rpc}: {status:?}");
        }
        assert_eq!(snapshot(&server, &queue, &id).await, before, "{what}");
    }
    let denied = workers_as(&server, bearer(CLIENT).as_deref())
        .await
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap_err();
    assert!(
        denied.message().contains("\"alice\" has role client"),
        "{}",
        denied.message()
    );

    // The worker token works on WorkerService, admin on both.
    for token in [WORKER, ADMIN] {
        workers_as(&server, bearer(token).as_deref())
            .await
            .get_server_info(GetServerInfoRequest {})
            .await
            .unwrap();
    }
    jobs_as(&server, bearer(ADMIN).as_deref())
        .await
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap();

    // Health and reflection need no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&server).await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers without a token");
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel(&server).await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection answers without a token")
        .into_inner();
    assert!(replies.message().await.unwrap().is_some());
    server.stop().await;
}

fn reasons(job: &Job) -> Vec<&str> {
    job.history.iter().map(|t| t.reason.as_str()).collect()
}

#[tokio::test]
async fn history_names_the_token_that_submitted_or_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(&dir).await;
    let queue = fresh_queue();
    let mut alice = jobs_as(&server, bearer(CLIENT).as_deref()).await;
    let mut root = jobs_as(&server, bearer(ADMIN).as_deref()).await;

    // Submitted over gRPC by alice, cancelled over REST by root.
    let job = alice
        .submit_job(spec("echo", &queue))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reasons(&job), ["submitted by alice"]);
    let (status, cancelled, _) = rest(
        &server,
        reqwest::Method::DELETE,
        &format!("/jobs/{}", job.id),
        bearer(ADMIN).as_deref(),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "CANCELLED");
    assert_eq!(cancelled["error"], "cancelled by root");
    let history = cancelled["history"].as_array().unwrap();
    assert_eq!(history[0]["reason"], "submitted by alice");
    assert_eq!(history.last().unwrap()["reason"], "cancelled by root");

    // Submitted over REST (single and batch) by alice; root's batch too.
    let (_, single, _) = rest(
        &server,
        reqwest::Method::POST,
        "/jobs",
        bearer(CLIENT).as_deref(),
        Some(&format!(r#"{{"kind":"echo","queue":"{queue}"}}"#)),
    )
    .await;
    assert_eq!(single["history"][0]["reason"], "submitted by alice");
    let batch = root
        .submit_jobs(SubmitJobsRequest {
            jobs: vec![spec("echo", &queue), spec("noop", &queue)],
        })
        .await
        .unwrap()
        .into_inner();
    for job in &batch.jobs {
        assert_eq!(reasons(job), ["submitted by root"]);
    }

    // A running job: the cancel request is recorded with the name, and the
    // stored history says so.
    let running = alice
        .submit_job(SubmitJobRequest {
            kind: "sleep".into(),
            queue: queue.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let started = workers_as(&server, bearer(WORKER).as_deref())
        .await
        .start_attempt(StartAttemptRequest {
            job_id: running.id.clone(),
            worker_id: "w1-host".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.decision, Decision::Run as i32);
    let requested = alice
        .cancel_job(CancelJobRequest {
            job_id: running.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(requested.cancel_requested);
    let stored = root
        .get_job(GetJobRequest {
            job_id: running.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let last = stored.history.last().unwrap();
    assert_eq!(last.reason, "cancel requested by alice");
    assert_eq!(last.worker_id, "w1-host");
    assert_eq!(stored.history[0].reason, "submitted by alice");
    server.stop().await;
}

#[tokio::test]
async fn without_tokens_a_public_address_is_refused_unless_insecure() {
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    config.redis_prefix = format!("{}:", unique_name("t"));
    config.http_addr = "0.0.0.0:0".parse().unwrap();
    let err = match orchestrator_server::start(config.clone(), Default::default()).await {
        Ok(_) => panic!("orchd must refuse 0.0.0.0 without tokens"),
        Err(e) => e,
    };
    assert!(matches!(err, ServerError::Insecure(_)), "{err}");
    let message = err.to_string();
    for needle in [
        "0.0.0.0:0",
        "--insecure-no-auth",
        "--tokens-file",
        "ORCH_INSECURE_NO_AUTH",
    ] {
        assert!(message.contains(needle), "{needle} missing from: {message}");
    }
    assert!(
        !message.contains("127.0.0.1:0"),
        "only the exposed address: {message}"
    );

    // On purpose: starts, and anyone may call (anonymous).
    let mut insecure = config.clone();
    insecure.auth.insecure_no_auth = true;
    let server = TestServer::with_config(insecure).await;
    let queue = fresh_queue();
    let job = server
        .jobs()
        .await
        .submit_job(spec("echo", &queue))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reasons(&job), ["submitted"]);
    server.stop().await;

    // With tokens, a public address is fine.
    let dir = tempfile::tempdir().unwrap();
    let mut secured = config.clone();
    secured.grpc_addr = "0.0.0.0:0".parse().unwrap();
    secured.auth.tokens_file = Some(tokens_file(&dir));
    let server = TestServer::with_config(secured).await;
    server.stop().await;

    // A broken tokens file stops the start, naming the line.
    let bad = dir.path().join("bad-tokens");
    std::fs::write(&bad, "# ok\nalice:client:default:not-a-hash\n").unwrap();
    let mut broken = config;
    broken.auth.tokens_file = Some(bad);
    let err = match orchestrator_server::start(broken, Default::default()).await {
        Ok(_) => panic!("a bad tokens file must stop orchd"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("line 2") && err.contains("64 hex digits"),
        "{err}"
    );
}

/// Job `id` once COMPLETED, read by `client`.
async fn completed(
    client: &JobServiceClient<InterceptedService<Channel, BearerAuth>>,
    id: &str,
) -> Job {
    eventually("the job completes", Duration::from_secs(20), || {
        let mut client = client.clone();
        let job_id = id.to_owned();
        async move {
            let job = client
                .get_job(GetJobRequest { job_id })
                .await
                .unwrap()
                .into_inner();
            (job.state == job::State::Completed as i32).then_some(job)
        }
    })
    .await
}

#[tokio::test]
async fn dev_refuses_a_public_address_without_tokens_and_runs_jobs_with_them() {
    let mut config = DevConfig::local_ephemeral(1);
    config.grpc_addr = "0.0.0.0:0".parse().unwrap();
    let err = match dev::start(config.clone()).await {
        Ok(_) => panic!("dev must refuse 0.0.0.0 without tokens"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--insecure-no-auth"), "{err}");

    // With tokens: the in-process workers have a token of their own, and
    // a client's job runs to completion, in any namespace.
    let dir = tempfile::tempdir().unwrap();
    config.auth.tokens_file = Some(common::tokens::tokens_file(
        &dir,
        &[
            ("alice", Role::Client, "default", CLIENT),
            ("carol", Role::Client, "team-a", CAROL),
        ],
    ));
    let running = dev::start(config).await.unwrap();
    let port = running.server.grpc_addr.port();
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut alice =
        JobServiceClient::with_interceptor(channel.clone(), header(bearer(CLIENT).as_deref()));
    let job = alice
        .submit_job(spec("echo", "default"))
        .await
        .unwrap()
        .into_inner();
    let done = completed(&alice, &job.id).await;
    assert_eq!(done.history[0].reason, "submitted by alice");
    let mut carol =
        JobServiceClient::with_interceptor(channel.clone(), header(bearer(CAROL).as_deref()));
    let job = carol
        .submit_job(spec("echo", "default"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.namespace, "team-a");
    let done = completed(&carol, &job.id).await;
    assert_eq!(done.namespace, "team-a");
    let mut anonymous = JobServiceClient::new(channel);
    assert_eq!(
        anonymous
            .list_jobs(ListJobsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    running.wait(stop).await;
}

/// A worker started with a client token stops at once with a message about
/// its credentials; with a worker token it runs jobs.
#[tokio::test]
async fn workers_need_a_worker_token_and_say_so_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(&dir).await;
    let url = format!("http://{}", server.grpc_addr);
    let mut config =
        orchestrator_worker::WorkerConfig::local(url.clone(), server.config.amqp_url.clone());
    config.queues = vec![unique_name("q")];
    config.token = Some(CLIENT.into());
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        orchestrator_worker::run(
            config.clone(),
            orchestrator_worker::Registry::with_builtins(&config),
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("the worker gives up at once")
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("credentials") && err.contains("ORCH_TOKEN"),
        "{err}"
    );
    assert!(!err.contains(CLIENT), "the token is not echoed: {err}");

    config.token = Some(WORKER.into());
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(orchestrator_worker::run(
        config.clone(),
        orchestrator_worker::Registry::with_builtins(&config),
        stop.clone(),
    ));
    let mut jobs = jobs_as(&server, bearer(CLIENT).as_deref()).await;
    let job = jobs
        .submit_job(orchestrator::proto::v1::SubmitJobRequest {
            kind: "noop".into(),
            queue: config.queues[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    common::eventually(
        "the job completes",
        std::time::Duration::from_secs(30),
        || {
            let mut jobs = jobs.clone();
            let id = job.id.clone();
            async move {
                let job = jobs
                    .get_job(orchestrator::proto::v1::GetJobRequest { job_id: id })
                    .await
                    .ok()?
                    .into_inner();
                (job.state == orchestrator::proto::v1::job::State::Completed as i32).then_some(())
            }
        },
    )
    .await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    server.stop().await;
}
