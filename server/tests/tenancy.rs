//! Tenant isolation over REST and gRPC against a real orchd (Redis and
//! RabbitMQ): jobs belong to the namespace of the token that submitted
//! them; other tenants get NOT_FOUND (404) for their ids, exactly as for ids
//! that do not exist, and cannot list, cancel, watch or run them; queues
//! are per namespace, so a tenant's workers never receive another's jobs.

mod common;

use std::time::Duration;

use common::tokens::{bearer, jobs_as, rest, tokens_file, workers_as};
use common::{TestServer, fresh_queue, spec};
use orchestrator::auth::Role;
use orchestrator::proto::v1::{
    CancelJobRequest, FinishAttemptRequest, GetJobRequest, GetServerInfoRequest, Job, JobView,
    ListJobsRequest, StartAttemptRequest, SubmitJobRequest, SubmitJobsRequest, WatchJobRequest,
    finish_attempt_request::Outcome, job,
};
use orchestrator_server::ServeConfig;
use orchestrator_testkit::{shared_amqp_url, shared_redis_url, unique_name};
use orchestrator_worker::{Registry, WorkerConfig};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const ALICE: &str = "orch_alice-of-tenant-a";
const BOB: &str = "orch_bob-of-tenant-b";
const WORKER_A: &str = "orch_worker-of-tenant-a";
const WORKER_B: &str = "orch_worker-of-tenant-b";
const ROOT: &str = "orch_root-admin-of-ops";

const T: Duration = Duration::from_secs(30);

async fn server(dir: &tempfile::TempDir) -> TestServer {
    server_with(dir, |_| {}).await
}

async fn server_with(dir: &tempfile::TempDir, adjust: impl FnOnce(&mut ServeConfig)) -> TestServer {
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    adjust(&mut config);
    config.redis_prefix = format!("{}:", unique_name("tenancy"));
    config.auth.tokens_file = Some(tokens_file(
        dir,
        &[
            ("alice", Role::Client, "tenant-a", ALICE),
            ("bob", Role::Client, "tenant-b", BOB),
            ("wa", Role::Worker, "tenant-a", WORKER_A),
            ("wb", Role::Worker, "tenant-b", WORKER_B),
            ("root", Role::Admin, "ops", ROOT),
        ],
    ));
    TestServer::with_config(config).await
}

async fn submit_as(server: &TestServer, token: &str, req: SubmitJobRequest) -> Job {
    jobs_as(server, bearer(token).as_deref())
        .await
        .submit_job(req)
        .await
        .unwrap()
        .into_inner()
}

async fn get_as(server: &TestServer, token: &str, id: &str) -> Result<Job, tonic::Status> {
    jobs_as(server, bearer(token).as_deref())
        .await
        .get_job(GetJobRequest { job_id: id.into() })
        .await
        .map(|r| r.into_inner())
}

async fn list_as(server: &TestServer, token: &str, req: ListJobsRequest) -> Vec<String> {
    jobs_as(server, bearer(token).as_deref())
        .await
        .list_jobs(req)
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect()
}

/// The NOT_FOUND message with the id taken out, to compare the answer for
/// another tenant's job with the answer for an id that does not exist.
fn without(message: &str, id: &str) -> String {
    message.replace(id, "<id>")
}

/// Sends: bob's (tenant-b) get, cancel and watch of alice's (tenant-a) job,
/// a list of tenant-a, and submits naming tenant-a, over gRPC. Asserts:
/// NOT_FOUND word for word as for a random id, PERMISSION_DENIED for naming
/// the namespace, and alice's job unchanged (same state, same history, no
/// new job in tenant-a). The admin sees and lists tenant-a's job.
#[tokio::test]
async fn grpc_other_tenants_get_not_found_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir).await;
    let queue = fresh_queue();
    let job = submit_as(&server, ALICE, spec("echo", &queue)).await;
    assert_eq!(
        job.namespace, "tenant-a",
        "the job takes its token's namespace"
    );
    let before = get_as(&server, ALICE, &job.id).await.unwrap();

    let random = uuid::Uuid::new_v4().to_string();
    let unknown = get_as(&server, BOB, &random).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let mut bob = jobs_as(&server, bearer(BOB).as_deref()).await;

    let got = get_as(&server, BOB, &job.id).await.unwrap_err();
    assert_eq!(got.code(), Code::NotFound);
    assert_eq!(
        without(got.message(), &job.id),
        without(unknown.message(), &random),
        "another tenant's id reads exactly like an unknown one"
    );
    let cancelled = bob
        .cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(cancelled.code(), Code::NotFound, "{cancelled:?}");
    let watched = bob
        .watch_job(WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(watched.code(), Code::NotFound, "{watched:?}");

    // Bob's own list does not show it, and he may not list tenant-a.
    let mine = list_as(&server, BOB, ListJobsRequest::default()).await;
    assert!(!mine.contains(&job.id), "{mine:?}");
    let denied = bob
        .list_jobs(ListJobsRequest {
            namespace: "tenant-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("tenant-a"), "{denied:?}");

    // Bob may not submit into tenant-a, alone or in a batch.
    let into_a = SubmitJobRequest {
        namespace: "tenant-a".into(),
        ..spec("echo", &queue)
    };
    let refused = bob.submit_job(into_a.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = bob
        .submit_jobs(SubmitJobsRequest {
            jobs: vec![spec("echo", &queue), into_a],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("jobs[1]"), "{refused:?}");

    // Nothing changed: alice's job as it was, still the only one in tenant-a
    // on this queue, and bob's batch stored nothing either.
    let after = get_as(&server, ALICE, &job.id).await.unwrap();
    assert_eq!(after, before, "another tenant's calls changed the job");
    let in_a = ListJobsRequest {
        queue: queue.clone(),
        ..Default::default()
    };
    assert_eq!(
        list_as(&server, ALICE, in_a.clone()).await,
        vec![job.id.clone()]
    );
    assert!(list_as(&server, BOB, in_a.clone()).await.is_empty());

    // The admin sees every namespace, one at a time.
    let seen = get_as(&server, ROOT, &job.id).await.unwrap();
    assert_eq!(seen.id, job.id);
    let listed = list_as(
        &server,
        ROOT,
        ListJobsRequest {
            namespace: "tenant-a".into(),
            ..in_a.clone()
        },
    )
    .await;
    assert_eq!(listed, vec![job.id.clone()]);
    assert!(
        list_as(&server, ROOT, in_a).await.is_empty(),
        "the admin's own namespace (ops) is listed by default"
    );
    server.stop().await;
}

/// Sends: the same calls over REST as bob. Asserts: 404 with the same body
/// as an unknown id for GET, DELETE and :watch; 403 for `?namespace=`
/// of another tenant and for a body naming it; alice's job unchanged.
#[tokio::test]
async fn rest_other_tenants_get_404_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir).await;
    let queue = fresh_queue();
    let body = format!(r#"{{"kind":"echo","queue":"{queue}"}}"#);
    let (status, job, _) = rest(
        &server,
        reqwest::Method::POST,
        "/jobs",
        bearer(ALICE).as_deref(),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["namespace"], "tenant-a");
    let id = job["id"].as_str().unwrap().to_owned();
    let before = get_as(&server, ALICE, &id).await.unwrap();

    let bob = bearer(BOB);
    let random = uuid::Uuid::new_v4().to_string();
    for (method, path) in [
        (reqwest::Method::GET, "/jobs/{}"),
        (reqwest::Method::DELETE, "/jobs/{}"),
        (reqwest::Method::GET, "/jobs/{}:watch"),
    ] {
        let (status, theirs, _) = rest(
            &server,
            method.clone(),
            &path.replace("{}", &id),
            bob.as_deref(),
            None,
        )
        .await;
        let (unknown_status, unknown, _) = rest(
            &server,
            method.clone(),
            &path.replace("{}", &random),
            bob.as_deref(),
            None,
        )
        .await;
        assert_eq!((status, unknown_status), (404, 404), "{method} {path}");
        assert_eq!(
            without(&theirs.to_string(), &id),
            without(&unknown.to_string(), &random),
            "{method} {path}: another tenant's id reads like an unknown one"
        );
    }
    let (status, page, _) = rest(
        &server,
        reqwest::Method::GET,
        &format!("/jobs?queue={queue}"),
        bob.as_deref(),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page["jobs"].as_array().map_or(0, Vec::len), 0, "{page}");
    let (status, denied, _) = rest(
        &server,
        reqwest::Method::GET,
        "/jobs?namespace=tenant-a",
        bob.as_deref(),
        None,
    )
    .await;
    assert_eq!(status, 403, "{denied}");
    let (status, denied, _) = rest(
        &server,
        reqwest::Method::POST,
        "/jobs",
        bob.as_deref(),
        Some(&format!(
            r#"{{"kind":"echo","queue":"{queue}","namespace":"tenant-a"}}"#
        )),
    )
    .await;
    assert_eq!(status, 403, "{denied}");

    assert_eq!(get_as(&server, ALICE, &id).await.unwrap(), before);
    let (status, page, _) = rest(
        &server,
        reqwest::Method::GET,
        &format!("/jobs?queue={queue}"),
        bearer(ALICE).as_deref(),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page["jobs"].as_array().map_or(0, Vec::len), 1, "{page}");
    server.stop().await;
}

/// Sends: one idempotency key from alice and from bob. Asserts: two jobs,
/// each tenant's repeat returns its own.
#[tokio::test]
async fn idempotency_keys_are_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir).await;
    let queue = fresh_queue();
    let keyed = SubmitJobRequest {
        idempotency_key: "nightly-report".into(),
        ..spec("echo", &queue)
    };
    let a = submit_as(&server, ALICE, keyed.clone()).await;
    let b = submit_as(&server, BOB, keyed.clone()).await;
    assert_ne!(a.id, b.id, "bob's key must not return alice's job");
    assert_eq!(submit_as(&server, ALICE, keyed.clone()).await.id, a.id);
    assert_eq!(submit_as(&server, BOB, keyed).await.id, b.id);
    server.stop().await;
}

fn worker_config(server: &TestServer, token: &str, queue: &str) -> WorkerConfig {
    let mut config = WorkerConfig::local(format!("http://{}", server.grpc_addr), shared_amqp_url());
    config.token = Some(token.into());
    config.queues = vec![queue.into()];
    config.concurrency = 2;
    config
}

fn spawn_worker(config: WorkerConfig) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let registry = Registry::with_builtins(&config);
    let handle = tokio::spawn({
        let stop = stop.clone();
        async move {
            orchestrator_worker::run(config, registry, stop)
                .await
                .expect("worker runs");
        }
    });
    (stop, handle)
}

async fn wait_for(server: &TestServer, token: &str, id: &str, state: job::State) -> Job {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let job = get_as(server, token, id).await.unwrap();
        if job.state == state as i32 {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never reached {state:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Injects: a tenant-b worker on queue Q while alice (tenant-a) and bob
/// (tenant-b) submit to Q. Asserts: bob's job completes, alice's stays
/// CREATED (the tenant-b worker never received it), until a tenant-a worker
/// on Q runs it. The tenant-b worker token gets NOT_FOUND for StartAttempt
/// and FinishAttempt on alice's job, and GetServerInfo names its namespace.
#[tokio::test]
async fn workers_only_receive_and_run_their_tenants_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir).await;
    let queue = fresh_queue();

    let mut wb = workers_as(&server, bearer(WORKER_B).as_deref()).await;
    let info = wb
        .get_server_info(GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.namespace.as_str(), info.role.as_str()),
        ("tenant-b", "worker")
    );

    let (stop_b, worker_b) = spawn_worker(worker_config(&server, WORKER_B, &queue));
    let alices = submit_as(&server, ALICE, spec("noop", &queue)).await;
    let bobs = submit_as(&server, BOB, spec("noop", &queue)).await;
    wait_for(&server, BOB, &bobs.id, job::State::Completed).await;

    // The tenant-b worker token cannot start or finish alice's job, on the
    // read-first path (attempt 0) nor on the one-round-trip path that
    // compares in the store (attempt and max_attempts given).
    for (attempt, max_attempts) in [(0, 0), (1, 3)] {
        let start = wb
            .start_attempt(StartAttemptRequest {
                job_id: alices.id.clone(),
                worker_id: "intruder".into(),
                attempt,
                max_attempts,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(start.code(), Code::NotFound, "{start:?}");
        let finish = wb
            .finish_attempt(FinishAttemptRequest {
                job_id: alices.id.clone(),
                lease_token: "guessed".into(),
                outcome: Some(Outcome::Completed(Default::default())),
                attempt,
                worker_id: if attempt == 0 {
                    String::new()
                } else {
                    "intruder".into()
                },
                // The fast path with nothing read back checks the namespace too.
                view: if attempt == 0 {
                    JobView::Full
                } else {
                    JobView::Basic
                } as i32,
            })
            .await
            .unwrap_err();
        assert_eq!(finish.code(), Code::NotFound, "{finish:?}");
        // Batched, the same answer per request.
        let batch = wb
            .start_attempts(orchestrator::proto::v1::StartAttemptsRequest {
                attempts: vec![StartAttemptRequest {
                    job_id: alices.id.clone(),
                    worker_id: "intruder".into(),
                    attempt,
                    max_attempts,
                    ..Default::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        match &batch.results[0].result {
            Some(orchestrator::proto::v1::start_attempt_result::Result::Error(e)) => {
                assert_eq!(Code::from(e.code), Code::NotFound, "{e:?}")
            }
            other => panic!("another tenant's job in a batch: {other:?}"),
        }
    }

    // Bob's job went through the same queue name; alice's was never offered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = get_as(&server, ALICE, &alices.id).await.unwrap();
    assert_eq!(waiting.state, job::State::Created as i32, "{waiting:?}");
    assert_eq!(waiting.attempt, 0);

    let (stop_a, worker_a) = spawn_worker(worker_config(&server, WORKER_A, &queue));
    let ran = wait_for(&server, ALICE, &alices.id, job::State::Completed).await;
    assert_eq!(ran.attempt, 1);

    stop_a.cancel();
    stop_b.cancel();
    worker_a.await.unwrap();
    worker_b.await.unwrap();
    server.stop().await;
}

/// Sends: a tenant-b worker token asking to consume tenant-a's queues.
/// Asserts: the worker refuses to start and says why.
#[tokio::test]
async fn a_worker_token_cannot_consume_another_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir).await;
    let mut config = worker_config(&server, WORKER_B, &fresh_queue());
    config.namespace = Some("tenant-a".into());
    let err = orchestrator_worker::run(
        config.clone(),
        Registry::with_builtins(&config),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("tenant-a") && text.contains("admin"),
        "the refusal names the namespace and who may: {text}"
    );
    server.stop().await;
}

/// Injects: bob (tenant-b) submitting past a submit rate limit of 3 per
/// minute. Asserts: bob gets RESOURCE_EXHAUSTED, and alice (tenant-a),
/// whose token has its own allowance, still submits at once.
#[tokio::test]
async fn one_tenant_cannot_use_up_anothers_submit_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |config| {
        config.limits.submit_rate = "3/m".parse().unwrap();
        config.limits.submit_burst = std::num::NonZeroU32::new(3).unwrap();
    })
    .await;
    let queue = fresh_queue();
    let mut bob = jobs_as(&server, bearer(BOB).as_deref()).await;
    let mut refused = None;
    for _ in 0..10 {
        if let Err(status) = bob.submit_job(spec("echo", &queue)).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("bob hits the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let job = submit_as(&server, ALICE, spec("echo", &queue)).await;
    assert_eq!(job.namespace, "tenant-a");
    server.stop().await;
}
