//! The JobService contract end to end, over REST and gRPC, against a real
//! orchd with real Redis and RabbitMQ.

mod common;

use std::time::Duration;

use common::{TestServer, eventually, fresh_queue, next_dispatch, next_message, spec};
use orchestrator::proto::v1::start_attempt_response::Decision;
use orchestrator::proto::v1::{
    CancelJobRequest, FinishAttemptRequest, GetJobRequest, HeartbeatRequest, Job, JobView, Lease,
    ListJobsRequest, StartAttemptRequest, SubmitJobRequest, WatchJobRequest,
    finish_attempt_request::Outcome, job,
};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::Code;

/// Sends a request and returns the status and the JSON body (null when
/// there is none).
async fn call(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut request = server.http_client.request(method, server.url(path));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let resp = request.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(server: &TestServer, path: &str, body: &str) -> (u16, Value) {
    call(server, reqwest::Method::POST, path, Some(body)).await
}

async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    call(server, reqwest::Method::GET, path, None).await
}

async fn delete(server: &TestServer, path: &str) -> (u16, Value) {
    call(server, reqwest::Method::DELETE, path, None).await
}

/// How many jobs the list shows on `queue`: bad input must leave it at 0.
async fn jobs_on(server: &TestServer, queue: &str) -> usize {
    let (status, body) = get(server, &format!("/jobs?queue={queue}&pageSize=1000")).await;
    assert_eq!(status, 200, "{body}");
    body["jobs"].as_array().map_or(0, Vec::len)
}

/// Drives a job to COMPLETED through the worker protocol.
async fn complete(server: &TestServer, id: &str) -> Job {
    let mut workers = server.workers().await;
    let started = workers
        .start_attempt(StartAttemptRequest {
            job_id: id.into(),
            worker_id: "test-worker".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.decision, Decision::Run as i32);
    workers
        .finish_attempt(FinishAttemptRequest {
            job_id: id.into(),
            lease_token: started.lease_token,
            outcome: Some(Outcome::Completed(Default::default())),
            attempt: started.job.map_or(0, |j| j.attempt),
            worker_id: "test-worker".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn rest_submit_get_list_and_cancel() {
    let server = TestServer::start().await;
    let queue = fresh_queue();
    let body = json!({
        "kind": "sleep",
        "payload": {"seconds": 1.5, "tags": ["a", "b"]},
        "queue": queue,
        "labels": {"team": "infra"},
        "retry": {"initialBackoff": "2s", "multiplier": 3.0},
        "timeout": "30s"
    });
    let (status, job) = post(&server, "/jobs", &body.to_string()).await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    assert_eq!(job["state"], "CREATED");
    assert_eq!(job["kind"], "sleep");
    assert_eq!(job["queue"], queue.as_str());
    assert_eq!(job["maxAttempts"], 3);
    assert_eq!(job["payload"]["seconds"], 1.5);
    assert_eq!(job["labels"]["team"], "infra");
    assert_eq!(job["retry"]["initialBackoff"], "2s");
    assert_eq!(job["timeout"], "30s");
    assert!(
        job["createdAt"].as_str().unwrap().starts_with("20"),
        "RFC 3339: {job}"
    );
    assert_eq!(job["history"][0]["to"], "CREATED");

    let (status, fetched) = get(&server, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(fetched, job, "GET returns what POST returned");

    let (status, page) = get(&server, &format!("/jobs?queue={queue}&state=CREATED")).await;
    assert_eq!(status, 200);
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(page["jobs"][0]["id"], id.as_str());

    let (status, cancelled) = delete(&server, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "CANCELLED");
    assert!(cancelled["finishedAt"].is_string());
    let history = cancelled["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["from"], "CREATED");
    assert_eq!(history.last().unwrap()["to"], "CANCELLED");

    // Idempotent: a second cancel returns the job unchanged.
    let (status, again) = delete(&server, &format!("/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(again, cancelled);

    let (status, page) = get(&server, &format!("/jobs?queue={queue}&state=CREATED")).await;
    assert_eq!(
        (status, page["jobs"].as_array().map_or(0, Vec::len)),
        (200, 0)
    );
    server.stop().await;
}

#[tokio::test]
async fn submit_stores_then_publishes_a_persistent_dispatch() {
    let server = TestServer::start().await;
    let queue = fresh_queue();
    let job = server
        .jobs()
        .await
        .submit_job(spec("echo", &queue))
        .await
        .unwrap()
        .into_inner();
    let (msg, delivery_mode) =
        next_dispatch(&server.config.amqp_url, &queue, Duration::from_secs(20))
            .await
            .expect("the job is published");
    assert_eq!(msg.job_id, job.id);
    assert_eq!(msg.kind, "echo");
    assert_eq!(msg.queue, queue);
    assert_eq!(msg.attempt, 1);
    assert_eq!(delivery_mode, 2, "persistent");
    // Published exactly once: the due entry was cleared on the confirm.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        next_dispatch(&server.config.amqp_url, &queue, Duration::from_millis(200))
            .await
            .is_none()
    );
    server.stop().await;
}

#[tokio::test]
async fn grpc_list_pages_newest_first_and_filters() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let queue = fresh_queue();
    let mut ids = Vec::new();
    for i in 0..7 {
        let kind = if i % 2 == 0 { "even" } else { "odd" };
        let job = client
            .submit_job(spec(kind, &queue))
            .await
            .unwrap()
            .into_inner();
        ids.push(job.id);
        // Distinct creation times make the order observable.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_jobs(ListJobsRequest {
                queue: queue.clone(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids, "every job once, newest first");
    assert_eq!(pages, 3);

    let odd = client
        .list_jobs(ListJobsRequest {
            queue: queue.clone(),
            kind: "odd".into(),
            state: job::State::Created as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(odd.jobs.len(), 3);
    assert!(odd.jobs.iter().all(|j| j.kind == "odd" && j.queue == queue));

    let bad = client
        .list_jobs(ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("page_token"));
    server.stop().await;
}

#[tokio::test]
async fn idempotent_submit_returns_the_same_job() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let queue = fresh_queue();
    let req = SubmitJobRequest {
        idempotency_key: "order-42".into(),
        ..spec("echo", &queue)
    };
    let first = client.submit_job(req.clone()).await.unwrap().into_inner();
    let second = client.submit_job(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.id, second.id);
    let (status, third) = post(
        &server,
        "/jobs",
        &json!({"kind": "echo", "queue": queue, "idempotencyKey": "order-42"}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(third["id"], first.id.as_str());
    assert_eq!(jobs_on(&server, &queue).await, 1);
    // Concurrent submits with one key still make one job.
    let key = SubmitJobRequest {
        idempotency_key: "burst".into(),
        ..spec("echo", &queue)
    };
    let results = futures::future::join_all((0..16).map(|_| {
        let mut c = client.clone();
        let k = key.clone();
        async move { c.submit_job(k).await.unwrap().into_inner().id }
    }))
    .await;
    assert!(results.iter().all(|id| id == &results[0]));
    assert_eq!(jobs_on(&server, &queue).await, 2);
    server.stop().await;
}

#[tokio::test]
async fn racing_starts_and_cancels_have_exactly_one_winner() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let workers = server.workers().await;
    for round in 0..5 {
        let job = client
            .submit_job(spec("sleep", &fresh_queue()))
            .await
            .unwrap()
            .into_inner();
        let starts = (0..16).map(|i| {
            let mut w = workers.clone();
            let id = job.id.clone();
            async move {
                let resp = w
                    .start_attempt(StartAttemptRequest {
                        job_id: id,
                        worker_id: format!("racer-{i}"),
                        ..Default::default()
                    })
                    .await;
                matches!(resp, Ok(r) if r.get_ref().decision == Decision::Run as i32)
            }
        });
        let cancels = (0..16).map(|_| {
            let mut c = client.clone();
            let id = job.id.clone();
            async move { c.cancel_job(CancelJobRequest { job_id: id }).await.is_ok() }
        });
        let (started, cancelled) = tokio::join!(
            futures::future::join_all(starts),
            futures::future::join_all(cancels)
        );
        assert!(
            cancelled.iter().all(|ok| *ok),
            "cancel never fails on CREATED/RUNNING"
        );
        let runs = started.iter().filter(|ok| **ok).count();
        let after = client
            .get_job(GetJobRequest {
                job_id: job.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let out_of_created: Vec<_> = after
            .history
            .iter()
            .filter(|t| t.from == job::State::Created as i32)
            .collect();
        assert_eq!(
            out_of_created.len(),
            1,
            "round {round}: one transition leaves CREATED: {after:?}"
        );
        if after.state == job::State::Running as i32 {
            assert_eq!(runs, 1);
            assert!(
                after.cancel_requested,
                "the cancels that came later asked the worker to stop"
            );
        } else {
            assert_eq!(after.state, job::State::Cancelled as i32);
            assert!(runs <= 1);
            if runs == 0 {
                assert_eq!(out_of_created[0].to, job::State::Cancelled as i32);
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn cancel_semantics_by_state() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let queue = fresh_queue();

    // RUNNING: the state stays, cancel_requested is set.
    let running = client
        .submit_job(spec("sleep", &queue))
        .await
        .unwrap()
        .into_inner();
    let mut workers = server.workers().await;
    let started = workers
        .start_attempt(StartAttemptRequest {
            job_id: running.id.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.decision, Decision::Run as i32);
    let after = client
        .cancel_job(CancelJobRequest {
            job_id: running.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.state, job::State::Running as i32);
    assert!(after.cancel_requested);

    // COMPLETED: FAILED_PRECONDITION over gRPC, 400 over REST, nothing changes.
    let done = client
        .submit_job(spec("echo", &queue))
        .await
        .unwrap()
        .into_inner();
    let completed = complete(&server, &done.id).await;
    assert_eq!(completed.state, job::State::Completed as i32);
    let err = client
        .cancel_job(CancelJobRequest {
            job_id: done.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("COMPLETED"), "{}", err.message());
    let (status, body) = delete(&server, &format!("/jobs/{}", done.id)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], 9);
    assert!(body["message"].as_str().unwrap().contains("COMPLETED"));
    assert_eq!(body["details"], json!([]));
    let unchanged = client
        .get_job(GetJobRequest { job_id: done.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged, completed);
    server.stop().await;
}

// Found by the state machine property tests: the stores read an empty
// expected lease token as "any", so a heartbeat carrying an empty token
// renewed the lease of whichever attempt held the job. Injects heartbeats
// with an empty and a wrong token; asserts only the real one holds.
#[tokio::test]
async fn heartbeats_renew_only_the_lease_they_carry() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let job = client
        .submit_job(spec("sleep", &fresh_queue()))
        .await
        .unwrap()
        .into_inner();
    let mut workers = server.workers().await;
    let started = workers
        .start_attempt(StartAttemptRequest {
            job_id: job.id.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.decision, Decision::Run as i32);
    let before = client
        .get_job(GetJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    for (token, held) in [
        (String::new(), false),
        ("not-the-token".to_owned(), false),
        (started.lease_token.clone(), true),
    ] {
        let reply = workers
            .heartbeat(HeartbeatRequest {
                worker_id: "w".into(),
                leases: vec![Lease {
                    job_id: job.id.clone(),
                    lease_token: token.clone(),
                }],
                lease: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.leases.len(), 1);
        assert_eq!(reply.leases[0].held, held, "token {token:?}");
        assert_eq!(reply.leases[0].lease_expires_at.is_some(), held);
    }
    let after = client
        .get_job(GetJobRequest { job_id: job.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before, "heartbeats change nothing a client sees");
    server.stop().await;
}

/// A JSON object nested `depth` levels deep.
fn nested(depth: usize) -> serde_json::Value {
    (1..depth).fold(json!({"leaf": 1}), |inner, _| json!({ "a": inner }))
}

#[tokio::test]
async fn rest_bad_input_is_rejected_and_changes_nothing() {
    let mut config = orchestrator_server::ServeConfig::local(
        orchestrator_testkit::shared_redis_url(),
        orchestrator_testkit::shared_amqp_url(),
    );
    config.redis_prefix = format!("{}:", orchestrator_testkit::unique_name("t"));
    config.limits.max_payload_bytes = 1024;
    let server = TestServer::with_config(config).await;
    let queue = fresh_queue();
    let big = "x".repeat(2000);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid JSON"),
        (
            json!({"kind": "sleep", "queue": queue, "colour": "red"}).to_string(),
            400,
            "unknown field `colour`",
        ),
        (
            json!({"kind": "sleep", "queue": queue, "maxAttempts": "many"}).to_string(),
            400,
            "invalid JSON",
        ),
        (
            json!({"kind": 7, "queue": queue}).to_string(),
            400,
            "invalid JSON",
        ),
        (
            json!({"kind": "", "queue": queue}).to_string(),
            400,
            "invalid kind",
        ),
        (json!({"queue": queue}).to_string(), 400, "invalid kind"),
        (
            json!({"kind": "Not A Kind", "queue": queue}).to_string(),
            400,
            "invalid kind",
        ),
        (
            json!({"kind": "sleep", "queue": queue, "maxAttempts": 101}).to_string(),
            400,
            "invalid max_attempts",
        ),
        (
            json!({"kind": "sleep", "queue": queue, "payload": {"blob": big}}).to_string(),
            400,
            "invalid payload",
        ),
        (
            json!({"kind": "sleep", "queue": queue, "payload": [1, 2]}).to_string(),
            400,
            "invalid JSON",
        ),
        (
            json!({"kind": "sleep", "queue": queue, "retry": {"multiplier": 0.5}}).to_string(),
            400,
            "retry.multiplier",
        ),
        (
            json!({"kind": "sleep", "queue": queue, "timeout": "soon"}).to_string(),
            400,
            "invalid JSON",
        ),
        (
            json!({"kind": "sleep", "queue": "Bad Queue"}).to_string(),
            400,
            "invalid queue",
        ),
        // Deeper than protobuf decoders read back: it used to be stored as a
        // job that every later read failed on.
        (
            json!({"kind": "echo", "queue": queue, "payload": nested(40)}).to_string(),
            400,
            "invalid payload",
        ),
    ];
    for (body, want_status, want_message) in cases {
        let (status, err) = post(&server, "/jobs", &body).await;
        assert_eq!(status, want_status, "{body} -> {err}");
        assert_eq!(err["code"], 3, "INVALID_ARGUMENT for {body}");
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(want_message), "{body} -> {message}");
    }
    assert_eq!(jobs_on(&server, &queue).await, 0, "nothing was stored");

    let (status, err) = get(&server, "/jobs/not-a-uuid").await;
    assert_eq!((status, err["code"].as_i64()), (400, Some(3)));
    assert!(err["message"].as_str().unwrap().contains("job_id"));
    let (status, err) = delete(&server, "/jobs/12345").await;
    assert_eq!((status, err["code"].as_i64()), (400, Some(3)));
    let unknown = uuid::Uuid::new_v4();
    let (status, err) = get(&server, &format!("/jobs/{unknown}")).await;
    assert_eq!((status, err["code"].as_i64()), (404, Some(5)));
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains(&unknown.to_string())
    );
    let (status, _) = delete(&server, &format!("/jobs/{unknown}")).await;
    assert_eq!(status, 404);
    let (status, err) = get(&server, "/jobs?state=SLEEPING").await;
    assert_eq!(status, 400);
    assert!(err["message"].as_str().unwrap().contains("state"));
    let (status, err) = get(&server, "/jobs?pageSize=5000").await;
    assert_eq!(status, 400);
    assert!(err["message"].as_str().unwrap().contains("page_size"));
    let (status, _) = get(&server, "/nope").await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn grpc_bad_input_is_rejected_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let queue = fresh_queue();
    let cases = vec![
        (spec("", &queue), "kind"),
        (spec("UPPER", &queue), "kind"),
        (spec("sleep", "white space"), "queue"),
        (
            SubmitJobRequest {
                max_attempts: 1000,
                ..spec("sleep", &queue)
            },
            "max_attempts",
        ),
        (
            SubmitJobRequest {
                idempotency_key: "k".repeat(300),
                ..spec("sleep", &queue)
            },
            "idempotency_key",
        ),
    ];
    for (req, field) in cases {
        let err = client.submit_job(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert_eq!(jobs_on(&server, &queue).await, 0);

    let err = client
        .get_job(GetJobRequest {
            job_id: "42".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .get_job(GetJobRequest {
            job_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .cancel_job(CancelJobRequest {
            job_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .list_jobs(ListJobsRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .list_jobs(ListJobsRequest {
            state: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn watch_streams_the_snapshot_then_changes_until_terminal() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let job = client
        .submit_job(spec("sleep", &fresh_queue()))
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .watch_job(WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.state, job::State::Created as i32);

    let mut workers = server.workers().await;
    let started = workers
        .start_attempt(StartAttemptRequest {
            job_id: job.id.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let running = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(running.state, job::State::Running as i32);
    // The one-round-trip completion that reads nothing back (what workers
    // send): the watcher still gets the whole job.
    workers
        .finish_attempt(FinishAttemptRequest {
            job_id: job.id.clone(),
            lease_token: started.lease_token,
            outcome: Some(Outcome::Completed(Default::default())),
            attempt: running.attempt,
            worker_id: "w".into(),
            view: JobView::Basic as i32,
        })
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(done.state, job::State::Completed as i32);
    assert_eq!(done.kind, "sleep");
    assert_eq!(
        done.history.last().map(|t| t.to),
        Some(job::State::Completed as i32)
    );
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(end.is_none(), "the stream ends after a terminal state");

    // REST: newline-delimited {"result": job} lines, ending at the terminal state.
    let resp = server
        .http_client
        .get(server.url(&format!("/jobs/{}:watch", job.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["result"]["state"], "COMPLETED");
    let err = client
        .watch_job(WatchJobRequest { job_id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn health_follows_the_dependencies() {
    let server = TestServer::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    eventually("SERVING", Duration::from_secs(20), || {
        let mut h = health.clone();
        async move {
            let resp = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            (resp.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                .then_some(())
        }
    })
    .await;
    let (status, body) = get(&server, "/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("SERVING")));
    server.stop().await;

    // Point orchd at a Redis that is not there: NOT_SERVING and 503.
    let dead = format!("redis://127.0.0.1:{}/", orchestrator_testkit::free_port());
    let config =
        orchestrator_server::ServeConfig::local(dead, orchestrator_testkit::shared_amqp_url());
    let server = TestServer::with_config(config).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = get(&server, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("redis"));
    let err = server
        .jobs()
        .await
        .submit_job(spec("echo", "default"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    server.stop().await;
}

#[tokio::test]
async fn openapi_document_describes_the_routes() {
    let server = TestServer::start().await;
    let (status, doc) = get(&server, "/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/jobs", "/jobs/{job_id}"] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["paths"]["/jobs"]["post"].is_object());
    assert!(doc["paths"]["/jobs/{job_id}"]["delete"].is_object());
    server.stop().await;
}

#[tokio::test]
async fn completed_jobs_keep_their_result() {
    let server = TestServer::start().await;
    let mut client = server.jobs().await;
    let job = client
        .submit_job(spec("echo", &fresh_queue()))
        .await
        .unwrap()
        .into_inner();
    let done = complete(&server, &job.id).await;
    assert_eq!(done.state, job::State::Completed as i32);
    assert_eq!(done.attempt, 1);
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    let states: Vec<i32> = done.history.iter().map(|t| t.to).collect();
    assert_eq!(
        states,
        [
            job::State::Created as i32,
            job::State::Running as i32,
            job::State::Completed as i32
        ]
    );
    assert_eq!(done.history[1].worker_id, "test-worker");
    server.stop().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_services() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = TestServer::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "orchestrator.v1.JobService",
        "orchestrator.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "orchestrator.v1.JobService".into(),
            ),
        ),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap().message_response;
    assert!(
        matches!(reply, Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{reply:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn batch_submit_creates_each_job_with_its_own_id_and_idempotency() {
    let server = TestServer::start().await;
    let queue = fresh_queue();
    let body = json!({"jobs": [
        {"kind": "echo", "queue": queue, "payload": {"n": 0}},
        {"kind": "echo", "queue": queue, "payload": {"n": 1}, "idempotencyKey": "batch-key"},
        {"kind": "echo", "queue": queue, "payload": {"n": 2}, "idempotencyKey": "batch-key"},
        {"kind": "sleep", "queue": queue}
    ]});
    let (status, resp) = post(&server, "/jobs:batchSubmit", &body.to_string()).await;
    assert_eq!(status, 200, "{resp}");
    let jobs = resp["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    assert_eq!(jobs[0]["payload"]["n"], 0.0);
    assert_eq!(jobs[3]["kind"], "sleep");
    assert_eq!(jobs[1]["id"], jobs[2]["id"], "one idempotency key, one job");
    assert_ne!(jobs[0]["id"], jobs[1]["id"]);
    assert_eq!(jobs_on(&server, &queue).await, 3);
    // The three new jobs go to one queue, so they go out as one message.
    let (dispatches, mode, batch) =
        next_message(&server.config.amqp_url, &queue, Duration::from_secs(20))
            .await
            .expect("the new jobs are published");
    assert!(batch, "one batch message");
    assert_eq!(mode, 2, "persistent");
    let published: Vec<_> = dispatches.iter().map(|d| d.job_id.as_str()).collect();
    let new_ids = [&jobs[0]["id"], &jobs[1]["id"], &jobs[3]["id"]];
    assert_eq!(
        published,
        new_ids.map(|id| id.as_str().unwrap()),
        "every new job once, in order; the idempotent repeat not at all"
    );
    assert!(
        dispatches
            .iter()
            .all(|d| d.attempt == 1 && d.queue == queue)
    );

    // All or nothing: one bad spec rejects the batch and stores nothing.
    let other = fresh_queue();
    let bad = json!({"jobs": [{"kind": "echo", "queue": other}, {"kind": "", "queue": other}]});
    let (status, err) = post(&server, "/jobs:batchSubmit", &bad.to_string()).await;
    assert_eq!(status, 400);
    assert!(
        err["message"].as_str().unwrap().contains("jobs[1].kind"),
        "{err}"
    );
    assert_eq!(jobs_on(&server, &other).await, 0);
    let (status, err) = post(&server, "/jobs:batchSubmit", "{\"jobs\": []}").await;
    assert_eq!(status, 400, "{err}");

    let mut client = server.jobs().await;
    let too_many = orchestrator::proto::v1::SubmitJobsRequest {
        jobs: vec![spec("echo", &other); 1001],
    };
    let err = client.submit_jobs(too_many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let ok = client
        .submit_jobs(orchestrator::proto::v1::SubmitJobsRequest {
            jobs: vec![spec("echo", &other); 200],
        })
        .await
        .unwrap()
        .into_inner();
    let ids: std::collections::HashSet<_> = ok.jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(ids.len(), 200);
    assert_eq!(jobs_on(&server, &other).await, 200);
    // 200 jobs for one queue: four messages of 50.
    let mut published = std::collections::HashSet::new();
    let mut sizes = Vec::new();
    while published.len() < 200 {
        let (dispatches, _, _) =
            next_message(&server.config.amqp_url, &other, Duration::from_secs(20))
                .await
                .expect("every new job is published");
        sizes.push(dispatches.len());
        published.extend(dispatches.into_iter().map(|d| d.job_id));
    }
    assert_eq!(published, ids);
    assert_eq!(sizes, vec![50; 4]);
    server.stop().await;
}

/// Sends: StartAttempt with the dispatch's attempt and max_attempts (the
/// one-round-trip path), a duplicate of it, then completions naming the
/// attempt with a wrong lease token and with a later attempt number.
/// Asserts: one RUN, the duplicate DROPped, the wrong token refused with
/// FAILED_PRECONDITION and the job unchanged; the right token completes.
#[tokio::test]
async fn one_round_trip_starts_and_completions_stay_fenced() {
    let server = TestServer::start().await;
    let queue = fresh_queue();
    let mut jobs = server.jobs().await;
    let job = jobs
        .submit_job(spec("echo", &queue))
        .await
        .unwrap()
        .into_inner();
    let mut workers = server.workers().await;
    let start = StartAttemptRequest {
        job_id: job.id.clone(),
        worker_id: "w-fast".into(),
        attempt: 1,
        max_attempts: job.max_attempts,
        ..Default::default()
    };
    let started = workers
        .start_attempt(start.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.decision, Decision::Run as i32);
    assert_eq!(started.job.as_ref().map(|j| j.attempt), Some(1));
    let again = workers.start_attempt(start).await.unwrap().into_inner();
    assert_eq!(again.decision, Decision::Drop as i32, "{again:?}");

    let get = GetJobRequest {
        job_id: job.id.clone(),
    };
    let before = jobs.get_job(get.clone()).await.unwrap().into_inner();
    let stale = workers
        .finish_attempt(FinishAttemptRequest {
            job_id: job.id.clone(),
            lease_token: "not-the-lease".into(),
            outcome: Some(Outcome::Completed(Default::default())),
            attempt: 1,
            worker_id: "w-fast".into(),
            view: JobView::Basic as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert_eq!(
        jobs.get_job(get.clone()).await.unwrap().into_inner(),
        before
    );

    let finish = |view: i32| FinishAttemptRequest {
        job_id: job.id.clone(),
        lease_token: started.lease_token.clone(),
        outcome: Some(Outcome::Completed(Default::default())),
        attempt: 1,
        worker_id: "w-fast".into(),
        view,
    };
    // A result JSON cannot carry is refused like such a payload, and the
    // attempt stays RUNNING.
    let mut nan = pbjson_types::Struct::default();
    nan.fields.insert("ratio".into(), f64::NAN.into());
    let refused = workers
        .finish_attempt(FinishAttemptRequest {
            outcome: Some(Outcome::Completed(nan)),
            ..finish(JobView::Basic as i32)
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("completed"), "{refused:?}");
    assert!(refused.message().contains("finite"), "{refused:?}");
    assert_eq!(
        jobs.get_job(get.clone()).await.unwrap().into_inner(),
        before
    );
    let unknown_view = workers.finish_attempt(finish(7)).await.unwrap_err();
    assert_eq!(unknown_view.code(), Code::InvalidArgument);
    assert!(unknown_view.message().contains("view"), "{unknown_view:?}");
    assert_eq!(
        jobs.get_job(get.clone()).await.unwrap().into_inner(),
        before
    );

    // The basic view: what was recorded, without the job read back.
    let done = workers
        .finish_attempt(finish(JobView::Basic as i32))
        .await
        .unwrap()
        .into_inner();
    let stored = jobs.get_job(get).await.unwrap().into_inner();
    assert_eq!(stored.state, job::State::Completed as i32);
    assert_eq!(
        done,
        Job {
            id: job.id.clone(),
            state: job::State::Completed as i32,
            attempt: 1,
            updated_at: stored.updated_at,
            finished_at: stored.finished_at,
            ..Job::default()
        }
    );
    assert!(stored.finished_at.is_some());
    let last = stored.history.last().unwrap();
    assert_eq!((last.attempt, last.worker_id.as_str()), (1, "w-fast"));
    server.stop().await;
}

#[tokio::test]
async fn a_basic_start_answers_every_field_but_the_history() {
    let server = TestServer::start().await;
    let queue = fresh_queue();
    let mut jobs = server.jobs().await;
    let mut workers = server.workers().await;
    let submit = |n: f64| {
        let mut payload = pbjson_types::Struct::default();
        payload.fields.insert("n".into(), n.into());
        SubmitJobRequest {
            payload: Some(payload),
            ..spec("echo", &queue)
        }
    };
    let full = jobs.submit_job(submit(1.0)).await.unwrap().into_inner();
    let basic = jobs.submit_job(submit(2.0)).await.unwrap().into_inner();
    let start = |job: &Job, view: i32| StartAttemptRequest {
        job_id: job.id.clone(),
        worker_id: "w-view".into(),
        attempt: 1,
        max_attempts: job.max_attempts,
        view,
        ..Default::default()
    };
    let get = |job: &Job| GetJobRequest {
        job_id: job.id.clone(),
    };
    // An unknown view is refused and starts nothing.
    let refused = workers.start_attempt(start(&basic, 9)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("view"), "{refused:?}");
    let created = jobs.get_job(get(&basic)).await.unwrap().into_inner();
    assert_eq!(created.state, job::State::Created as i32);

    let answered = workers
        .start_attempt(start(&full, JobView::Unspecified as i32))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(
        answered,
        jobs.get_job(get(&full)).await.unwrap().into_inner()
    );
    assert_eq!(answered.history.len(), 2);

    let answered = workers
        .start_attempt(start(&basic, JobView::Basic as i32))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let mut stored = jobs.get_job(get(&basic)).await.unwrap().into_inner();
    assert_eq!(stored.history.len(), 2);
    stored.history.clear();
    assert_eq!(answered, stored);
    assert_eq!(answered.state, job::State::Running as i32);
    assert_eq!(answered.payload, basic.payload);
    server.stop().await;
}

#[tokio::test]
async fn batched_starts_and_finishes_answer_each_request_on_its_own() {
    use orchestrator::proto::v1::{
        FinishAttemptsRequest, StartAttemptsRequest, finish_attempt_result, start_attempt_result,
    };
    let server = TestServer::start().await;
    let queue = fresh_queue();
    let mut jobs = server.jobs().await;
    let mut submitted = Vec::new();
    for _ in 0..3 {
        submitted.push(
            jobs.submit_job(spec("echo", &queue))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let start = |job_id: &str| StartAttemptRequest {
        job_id: job_id.into(),
        worker_id: "w-batch".into(),
        attempt: 1,
        max_attempts: 3,
        ..Default::default()
    };
    let mut workers = server.workers().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let started = workers
        .start_attempts(StartAttemptsRequest {
            attempts: vec![
                start(&submitted[0].id),
                start(&unknown),
                start("not-a-uuid"),
                start(&submitted[1].id),
                // The same message twice: the second is a duplicate.
                start(&submitted[1].id),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(started.len(), 5, "one result per request");
    let answer = |i: usize| match &started[i].result {
        Some(start_attempt_result::Result::Answer(a)) => a.clone(),
        other => panic!("request {i}: expected an answer, got {other:?}"),
    };
    let error = |i: usize| match &started[i].result {
        Some(start_attempt_result::Result::Error(e)) => (Code::from(e.code), e.message.clone()),
        other => panic!("request {i}: expected an error, got {other:?}"),
    };
    assert_eq!(answer(0).decision, Decision::Run as i32);
    assert_eq!(error(1).0, Code::NotFound);
    let (code, message) = error(2);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("job_id"), "{message}");
    // Both starts of job 1 ran concurrently: exactly one of them won.
    let decisions = [answer(3).decision, answer(4).decision];
    assert_eq!(
        decisions
            .iter()
            .filter(|d| **d == Decision::Run as i32)
            .count(),
        1,
        "{decisions:?}"
    );
    let won = if decisions[0] == Decision::Run as i32 {
        answer(3)
    } else {
        answer(4)
    };
    let untouched = jobs
        .get_job(GetJobRequest {
            job_id: submitted[2].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        untouched.state,
        job::State::Created as i32,
        "not in the batch"
    );

    let finish = |job_id: &str, lease_token: &str| FinishAttemptRequest {
        job_id: job_id.into(),
        lease_token: lease_token.into(),
        outcome: Some(Outcome::Completed(Default::default())),
        attempt: 1,
        worker_id: "w-batch".into(),
        ..Default::default()
    };
    let finished = workers
        .finish_attempts(FinishAttemptsRequest {
            attempts: vec![
                finish(&submitted[0].id, &answer(0).lease_token),
                finish(&submitted[1].id, "not-the-lease"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    match &finished[0].result {
        Some(finish_attempt_result::Result::Job(job)) => {
            assert_eq!(job.state, job::State::Completed as i32)
        }
        other => panic!("expected the completed job, got {other:?}"),
    }
    match &finished[1].result {
        Some(finish_attempt_result::Result::Error(e)) => {
            assert_eq!(Code::from(e.code), Code::FailedPrecondition, "{e:?}")
        }
        other => panic!("a stale lease is refused, got {other:?}"),
    }
    let still_running = jobs
        .get_job(GetJobRequest {
            job_id: submitted[1].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still_running.state, job::State::Running as i32);
    assert_eq!(still_running.attempt, won.job.unwrap().attempt);

    // Batches of nothing, or of too much, are refused whole.
    for attempts in [Vec::new(), vec![start(&submitted[2].id); 1001]] {
        let n = attempts.len();
        let err = workers
            .start_attempts(StartAttemptsRequest { attempts })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{n}: {err:?}");
        assert!(err.message().contains("attempts"), "{}", err.message());
    }
    let err = workers
        .finish_attempts(FinishAttemptsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let untouched_after = jobs
        .get_job(GetJobRequest {
            job_id: submitted[2].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        untouched_after, untouched,
        "a refused batch changes nothing"
    );
    server.stop().await;
}
