//! The worker's side of the worker protocol, against a scripted fake orchd
//! (a real gRPC server whose answers each test chooses) and a real
//! RabbitMQ: answers that a real orchd gives only in rare races (lost
//! leases, stale reports, outages) are played here deterministically.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use orchestrator::proto::v1::finish_attempt_request::Outcome;
use orchestrator::proto::v1::start_attempt_response::Decision;
use orchestrator::proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use orchestrator::proto::v1::{
    DispatchMessage, FinishAttemptRequest, GetServerInfoRequest, HeartbeatRequest,
    HeartbeatResponse, Job, LeaseStatus, ServerInfo, StartAttemptRequest, StartAttemptResponse,
};
use orchestrator::queue::{amqp, message, topology};
use orchestrator_testkit::{shared_amqp_url, unique_name};
use orchestrator_worker::{WorkerConfig, to_struct};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

const T: Duration = Duration::from_secs(15);

/// What the fake saw.
#[derive(Debug, Clone)]
enum Call {
    Start {
        job_id: String,
        at: Instant,
    },
    Heartbeat {
        jobs: Vec<String>,
        lease: Option<Duration>,
    },
    Finish {
        job_id: String,
        outcome: Outcome,
    },
}

/// How the fake answers, per job id.
#[derive(Default)]
struct Script {
    /// Jobs it knows (others are NOT_FOUND), by id.
    jobs: HashMap<String, Job>,
    /// Start answers UNAVAILABLE this many more times.
    start_unavailable: HashMap<String, u32>,
    /// Start answers DROP.
    drop: HashSet<String>,
    /// Heartbeats say the lease is not held.
    lost: HashSet<String>,
    /// Heartbeats say a cancel was requested.
    cancel: HashSet<String>,
    /// Finish fails with this code this many more times.
    finish_errors: HashMap<String, (Code, u32)>,
}

#[derive(Default, Clone)]
struct Fake {
    script: Arc<Mutex<Script>>,
    calls: Arc<Mutex<Vec<Call>>>,
    /// The authorization header of every call, when `token` is checked.
    auth: Arc<Mutex<Vec<Option<String>>>>,
}

impl Fake {
    fn record<T>(&self, request: &Request<T>, call: Call) {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.auth.lock().unwrap().push(auth);
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn starts(&self, job_id: &str) -> Vec<Instant> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Start { job_id: id, at } if id == job_id => Some(at),
                _ => None,
            })
            .collect()
    }

    fn finishes(&self, job_id: &str) -> Vec<Outcome> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Finish {
                    job_id: id,
                    outcome,
                } if id == job_id => Some(outcome),
                _ => None,
            })
            .collect()
    }

    fn heartbeats(&self) -> Vec<(Vec<String>, Option<Duration>)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Heartbeat { jobs, lease } => Some((jobs, lease)),
                _ => None,
            })
            .collect()
    }

    /// A job this fake will start.
    fn job(&self, kind: &str, payload: serde_json::Value) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let job = Job {
            id: id.clone(),
            kind: kind.into(),
            payload: Some(to_struct(payload).unwrap()),
            attempt: 1,
            max_attempts: 3,
            ..Job::default()
        };
        self.script.lock().unwrap().jobs.insert(id.clone(), job);
        id
    }

    fn edit(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.script.lock().unwrap());
    }
}

#[tonic::async_trait]
impl WorkerService for Fake {
    /// Like an older orchd: the worker must start anyway.
    async fn get_server_info(
        &self,
        _request: Request<GetServerInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn start_attempt(
        &self,
        request: Request<StartAttemptRequest>,
    ) -> Result<Response<StartAttemptResponse>, Status> {
        let job_id = request.get_ref().job_id.clone();
        self.record(
            &request,
            Call::Start {
                job_id: job_id.clone(),
                at: Instant::now(),
            },
        );
        let mut script = self.script.lock().unwrap();
        if let Some(n) = script.start_unavailable.get_mut(&job_id)
            && *n > 0
        {
            *n -= 1;
            return Err(Status::unavailable("redis unavailable: scripted"));
        }
        if script.drop.contains(&job_id) {
            return Ok(Response::new(StartAttemptResponse {
                decision: Decision::Drop as i32,
                reason: "job is CANCELLED".into(),
                ..StartAttemptResponse::default()
            }));
        }
        let Some(job) = script.jobs.get(&job_id).cloned() else {
            return Err(Status::not_found(format!("job {job_id} not found")));
        };
        Ok(Response::new(StartAttemptResponse {
            decision: Decision::Run as i32,
            job: Some(job),
            lease_token: format!("lease-{job_id}"),
            lease_expires_at: None,
            reason: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let jobs: Vec<String> = request
            .get_ref()
            .leases
            .iter()
            .map(|l| l.job_id.clone())
            .collect();
        let lease = request
            .get_ref()
            .lease
            .and_then(orchestrator::job::duration_from_proto);
        self.record(
            &request,
            Call::Heartbeat {
                jobs: jobs.clone(),
                lease,
            },
        );
        let script = self.script.lock().unwrap();
        let leases = request
            .get_ref()
            .leases
            .iter()
            .map(|l| LeaseStatus {
                job_id: l.job_id.clone(),
                held: !script.lost.contains(&l.job_id)
                    && l.lease_token == format!("lease-{}", l.job_id),
                cancel_requested: script.cancel.contains(&l.job_id),
                lease_expires_at: None,
            })
            .collect();
        Ok(Response::new(HeartbeatResponse { leases }))
    }

    async fn finish_attempt(
        &self,
        request: Request<FinishAttemptRequest>,
    ) -> Result<Response<Job>, Status> {
        let job_id = request.get_ref().job_id.clone();
        let outcome = request.get_ref().outcome.clone().expect("an outcome");
        self.record(
            &request,
            Call::Finish {
                job_id: job_id.clone(),
                outcome,
            },
        );
        let mut script = self.script.lock().unwrap();
        if let Some((code, n)) = script.finish_errors.get_mut(&job_id)
            && *n > 0
        {
            *n -= 1;
            return Err(Status::new(*code, "scripted"));
        }
        Ok(Response::new(
            script.jobs.get(&job_id).cloned().unwrap_or_default(),
        ))
    }
}

/// The fake on an ephemeral port, and a broker queue for the test.
struct Setup {
    fake: Fake,
    server_url: String,
    queue: String,
    connection: Connection,
    channel: Channel,
    _stop: tokio_util::sync::DropGuard,
}

impl Setup {
    async fn new() -> Setup {
        common::logs();
        let fake = Fake::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(fake.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        let queue = unique_name("pq");
        let connection = amqp::connect(&shared_amqp_url(), "protocol-test")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        topology::declare_base(&channel).await.unwrap();
        topology::declare_job_queue(&channel, &queue).await.unwrap();
        Setup {
            fake,
            server_url: format!("http://{addr}"),
            queue,
            connection,
            channel,
            _stop: stop.drop_guard(),
        }
    }

    fn config(&self) -> WorkerConfig {
        let mut config = WorkerConfig::local(self.server_url.clone(), shared_amqp_url());
        config.queues = vec![self.queue.clone()];
        config.concurrency = 2;
        config
    }

    async fn dispatch(&self, job_id: &str) {
        let message = DispatchMessage {
            job_id: job_id.to_owned(),
            kind: String::new(),
            queue: self.queue.clone(),
            attempt: 1,
            published_at: None,
        };
        self.channel
            .basic_publish(
                topology::JOBS_EXCHANGE.into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &message::encode(&message),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Ready messages in the queue (unacked ones are not counted).
    async fn ready(&self) -> u32 {
        let queue = topology::queue_name(&self.queue);
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    async fn close(self) {
        let _ = self.connection.close(0, "done".into()).await;
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn completed(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Completed(_))
}

#[tokio::test]
async fn a_run_is_acked_and_reported_and_a_drop_is_acked_without_running() {
    let s = Setup::new().await;
    let run = s.fake.job("echo", json!({"x": "y"}));
    let dropped = s.fake.job("echo", json!({}));
    s.fake.edit(|script| {
        script.drop.insert(dropped.clone());
    });
    let mut config = s.config();
    config.token = Some("s3cret".into());
    config.lease = Duration::from_secs(12);
    let worker = common::Worker::start(config);
    s.dispatch(&run).await;
    s.dispatch(&dropped).await;

    eventually("the echo job's report", || {
        !s.fake.finishes(&run).is_empty()
    })
    .await;
    let finishes = s.fake.finishes(&run);
    let Outcome::Completed(result) = &finishes[0] else {
        panic!("{finishes:?}")
    };
    assert_eq!(orchestrator_worker::from_struct(result), json!({"x": "y"}));
    eventually("the dropped job's start", || {
        !s.fake.starts(&dropped).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        s.fake.finishes(&dropped).is_empty(),
        "a dropped job does not run"
    );

    worker.stop(T).await;
    assert_eq!(s.ready().await, 0, "both messages were acked");
    let auth = s.fake.auth.lock().unwrap().clone();
    assert!(!auth.is_empty());
    assert!(
        auth.iter().all(|a| a.as_deref() == Some("Bearer s3cret")),
        "{auth:?}"
    );
    s.close().await;
}

#[tokio::test]
async fn unavailable_starts_are_requeued_with_backoff() {
    let s = Setup::new().await;
    let job = s.fake.job("noop", json!({}));
    s.fake.edit(|script| {
        script.start_unavailable.insert(job.clone(), 2);
    });
    let worker = common::Worker::start(s.config());
    s.dispatch(&job).await;

    eventually("the report", || !s.fake.finishes(&job).is_empty()).await;
    let starts = s.fake.starts(&job);
    assert_eq!(starts.len(), 3, "two refusals, then a start");
    for pair in starts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(350),
            "no backoff between tries: {gap:?}"
        );
    }
    assert!(completed(&s.fake.finishes(&job)[0]));

    worker.stop(T).await;
    s.close().await;
}

#[tokio::test]
async fn unknown_jobs_are_rejected_without_requeue() {
    let s = Setup::new().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let known = s.fake.job("noop", json!({}));
    let worker = common::Worker::start(s.config());
    s.dispatch(&unknown).await;
    s.dispatch(&known).await;
    eventually("the known job's report", || {
        !s.fake.finishes(&known).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.fake.starts(&unknown).len(),
        1,
        "rejected, not redelivered"
    );
    worker.stop(T).await;
    assert_eq!(s.ready().await, 0);
    s.close().await;
}

#[tokio::test]
async fn reports_are_retried_through_outages_and_stale_ones_dropped() {
    let s = Setup::new().await;
    let flaky = s.fake.job("noop", json!({}));
    let stale = s.fake.job("noop", json!({}));
    s.fake.edit(|script| {
        script
            .finish_errors
            .insert(flaky.clone(), (Code::Unavailable, 2));
        script
            .finish_errors
            .insert(stale.clone(), (Code::FailedPrecondition, 5));
    });
    let worker = common::Worker::start(s.config());
    s.dispatch(&flaky).await;
    s.dispatch(&stale).await;

    eventually("the third report", || s.fake.finishes(&flaky).len() == 3).await;
    eventually("the stale report", || !s.fake.finishes(&stale).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.fake.finishes(&flaky).len(), 3, "no report after success");
    assert_eq!(
        s.fake.finishes(&stale).len(),
        1,
        "a stale report is not retried"
    );

    worker.stop(T).await;
    s.close().await;
}

#[tokio::test]
async fn a_lost_lease_abandons_the_attempt_silently_and_frees_its_slot() {
    let s = Setup::new().await;
    let long = s.fake.job("sleep", json!({"seconds": 3600}));
    let next = s.fake.job("noop", json!({}));
    let mut config = s.config();
    config.concurrency = 1;
    let worker = common::Worker::start(config);
    s.dispatch(&long).await;
    eventually("a heartbeat for the long job", || {
        s.fake
            .heartbeats()
            .iter()
            .any(|(jobs, _)| jobs.contains(&long))
    })
    .await;
    s.fake.edit(|script| {
        script.lost.insert(long.clone());
    });
    s.dispatch(&next).await;
    eventually("the next job's report", || {
        !s.fake.finishes(&next).is_empty()
    })
    .await;
    assert!(
        s.fake.finishes(&long).is_empty(),
        "nothing reported for a lost lease"
    );

    worker.stop(T).await;
    s.close().await;
}

#[tokio::test]
async fn one_heartbeat_covers_every_running_attempt_and_carries_cancels() {
    let s = Setup::new().await;
    let jobs: Vec<String> = (0..3)
        .map(|_| s.fake.job("sleep", json!({"seconds": 3600})))
        .collect();
    let mut config = s.config();
    config.concurrency = 3;
    config.lease = Duration::from_secs(20);
    let worker = common::Worker::start(config);
    for job in &jobs {
        s.dispatch(job).await;
    }
    eventually("a heartbeat with all three leases", || {
        s.fake.heartbeats().iter().any(|(sent, _)| sent.len() == 3)
    })
    .await;
    let beats = s.fake.heartbeats();
    assert!(
        beats
            .iter()
            .all(|(_, lease)| *lease == Some(Duration::from_secs(20)))
    );

    let asked = Instant::now();
    s.fake
        .edit(|script| script.cancel.extend(jobs.iter().cloned()));
    eventually("three cancelled reports", || {
        jobs.iter()
            .all(|j| matches!(s.fake.finishes(j).first(), Some(Outcome::Cancelled(_))))
    })
    .await;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    for job in &jobs {
        let finishes = s.fake.finishes(job);
        let Some(Outcome::Cancelled(c)) = finishes.first() else {
            unreachable!()
        };
        assert_eq!(c.reason, "cancelled by user");
    }
    // With nothing running, the worker sends no heartbeats.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let quiet = s.fake.heartbeats().len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(s.fake.heartbeats().len(), quiet);

    worker.stop(T).await;
    s.close().await;
}

#[tokio::test]
async fn workers_start_before_orchd_and_the_broker_are_reachable() {
    // Nothing listens on either port: run() must keep trying, not fail.
    let dead_grpc = format!("http://127.0.0.1:{}", orchestrator_testkit::free_port());
    let dead_amqp = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        orchestrator_testkit::free_port()
    );
    let mut config = WorkerConfig::local(dead_grpc, dead_amqp);
    config.queues = vec![unique_name("pq")];
    let worker = common::Worker::start(config);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let took = worker.stop(T).await;
    assert!(took < Duration::from_secs(6), "{took:?}");
}
