//! The worker side of the job operations: starting attempts under a lease,
//! renewing leases, recording outcomes, and the sweeper that recovers jobs
//! whose worker died. The rules live in `orchestrator::attempt`; this module
//! reads the job, applies the change and retries lost races.

use std::sync::Arc;
use std::time::Duration;

use orchestrator::attempt::{self, Refusal};
use orchestrator::auth::Caller;
use orchestrator::error::{Error, Result};
use orchestrator::job::{duration_from_proto, job_state, ms_to_timestamp, now_ms};
use orchestrator::proto::v1::{
    FinishAttemptRequest, HeartbeatRequest, HeartbeatResponse, Job, JobView, LeaseStatus,
    StartAttemptRequest, StartAttemptResponse, finish_attempt_request::Outcome,
    start_attempt_response::Decision,
};
use orchestrator::state::State;
use orchestrator::store::{Applied, Change, JobStore};
use orchestrator::validate;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::service::MAX_BATCH;

const MAX_CAS_RETRIES: usize = 8;
const MAX_WORKER_ID_LEN: usize = 128;

/// Lease bounds, configurable on the server.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// Lease given when the worker asks for none.
    pub default: Duration,
    /// Shortest lease a worker may ask for.
    pub min: Duration,
    /// Longest lease a worker may ask for.
    pub max: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            default: Duration::from_secs(30),
            min: Duration::from_millis(500),
            max: Duration::from_secs(600),
        }
    }
}

/// The worker protocol's operations.
#[derive(Clone)]
pub struct AttemptService {
    store: Arc<dyn JobStore>,
    lease: LeaseConfig,
}

fn lease_of(requested: Option<pbjson_types::Duration>, config: &LeaseConfig) -> Result<Duration> {
    let Some(raw) = requested else {
        return Ok(config.default);
    };
    let lease = duration_from_proto(raw)
        .ok_or_else(|| Error::invalid("lease", "must be a non-negative duration"))?;
    if lease.is_zero() {
        return Ok(config.default);
    }
    if lease < config.min || lease > config.max {
        return Err(Error::invalid(
            "lease",
            format!(
                "must be between {:?} and {:?}, got {:?}",
                config.min, config.max, lease
            ),
        ));
    }
    Ok(lease)
}

fn worker_id(value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid("worker_id", "must not be empty"));
    }
    if value.len() > MAX_WORKER_ID_LEN || value.chars().any(char::is_control) {
        return Err(Error::invalid(
            "worker_id",
            format!("must be at most {MAX_WORKER_ID_LEN} printable characters"),
        ));
    }
    Ok(())
}

impl AttemptService {
    /// The worker operations over `store`.
    pub fn new(store: Arc<dyn JobStore>, lease: LeaseConfig) -> Self {
        AttemptService { store, lease }
    }

    /// The job, if `caller` may see it: another namespace's job is NOT_FOUND.
    async fn read(&self, id: Uuid, caller: &Caller) -> Result<Job> {
        self.store
            .get(id)
            .await?
            .filter(|job| caller.sees(validate::job_namespace(job)))
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// StartAttempt: RUN with a fresh lease, or DROP.
    pub async fn start(
        &self,
        req: StartAttemptRequest,
        caller: &Caller,
    ) -> Result<StartAttemptResponse> {
        let id = validate::job_id(&req.job_id)?;
        worker_id(&req.worker_id)?;
        let lease = lease_of(req.lease, &self.lease)?;
        let basic = is_basic(req.view)?;
        // The common case in one store round trip: the job is still as it
        // was when the message was published. Anything else is decided on
        // the job as it is, below.
        let dispatched = attempt::Dispatched {
            attempt: req.attempt,
            max_attempts: req.max_attempts,
        };
        let token = Uuid::new_v4().to_string();
        let now = now_ms();
        if let Some(mut change) =
            attempt::start_dispatched(dispatched, &req.worker_id, token.clone(), lease, now)
        {
            change.expect_namespace = caller.confined_to().map(str::to_owned);
            match self.apply_start(id, &change, basic).await? {
                Applied::Done(job) => {
                    return Ok(started(id, &req.worker_id, *job, token, now, lease));
                }
                Applied::NotFound => return Err(Error::NotFound(id.to_string())),
                Applied::Conflict { .. } => {}
            }
        }
        for _ in 0..MAX_CAS_RETRIES {
            let job = self.read(id, caller).await?;
            let token = Uuid::new_v4().to_string();
            let now = now_ms();
            let change = match attempt::start(
                &job,
                &req.worker_id,
                req.attempt,
                token.clone(),
                lease,
                now,
            )? {
                Ok(change) => change,
                Err(Refusal::Drop(reason)) => {
                    tracing::info!(job_id = %id, worker_id = %req.worker_id, %reason, "start refused: drop the message");
                    return Ok(StartAttemptResponse {
                        decision: Decision::Drop as i32,
                        reason,
                        ..StartAttemptResponse::default()
                    });
                }
            };
            match self.apply_start(id, &change, basic).await? {
                Applied::Done(job) => {
                    return Ok(started(id, &req.worker_id, *job, token, now, lease));
                }
                Applied::NotFound => return Err(Error::NotFound(id.to_string())),
                Applied::Conflict { .. } => continue,
            }
        }
        Err(Error::Conflict(format!(
            "job {id} kept changing; try again"
        )))
    }

    /// Writes a start; a `basic` answer holds the job without its history.
    async fn apply_start(&self, id: Uuid, change: &Change, basic: bool) -> Result<Applied> {
        if basic {
            self.store.apply_without_history(id, change).await
        } else {
            self.store.apply(id, change).await
        }
    }

    /// StartAttempts: [`AttemptService::start`] for each request, all at
    /// once (their store round trips share the pipelined connection); one
    /// outcome per request, in order.
    pub async fn start_many(
        &self,
        reqs: Vec<StartAttemptRequest>,
        caller: &Caller,
    ) -> Result<Vec<Result<StartAttemptResponse>>> {
        validate::batch_len("attempts", reqs.len(), MAX_BATCH, "requests")?;
        Ok(futures::future::join_all(reqs.into_iter().map(|req| self.start(req, caller))).await)
    }

    /// FinishAttempts: [`AttemptService::finish`] for each request, as
    /// [`AttemptService::start_many`] does.
    pub async fn finish_many(
        &self,
        reqs: Vec<FinishAttemptRequest>,
        caller: &Caller,
    ) -> Result<Vec<Result<Job>>> {
        validate::batch_len("attempts", reqs.len(), MAX_BATCH, "requests")?;
        Ok(futures::future::join_all(reqs.into_iter().map(|req| self.finish(req, caller))).await)
    }

    /// Heartbeat: renew every lease still held, report cancellations. No
    /// namespace check is needed: a lease token is a secret only the worker
    /// that started the attempt (in the job's namespace) was given.
    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse> {
        worker_id(&req.worker_id)?;
        let lease = lease_of(req.lease, &self.lease)?;
        let now = now_ms();
        let worker = req.worker_id.as_str();
        let renewals = req.leases.iter().map(|l| async move {
            let not_held = || LeaseStatus {
                job_id: l.job_id.clone(),
                ..LeaseStatus::default()
            };
            let Ok(id) = validate::job_id(&l.job_id) else {
                return Ok(not_held());
            };
            // An empty token holds no lease (the stores would read it as any).
            let Ok(change) = attempt::renew(&l.lease_token, lease, now) else {
                return Ok(not_held());
            };
            let status = match self.store.apply(id, &change).await? {
                Applied::Done(job) => LeaseStatus {
                    job_id: l.job_id.clone(),
                    held: true,
                    cancel_requested: job.cancel_requested,
                    lease_expires_at: Some(ms_to_timestamp(now + lease.as_millis() as i64)),
                },
                Applied::Conflict { .. } | Applied::NotFound => {
                    tracing::info!(job_id = %id, worker_id = %worker, "heartbeat for a lease no longer held");
                    not_held()
                }
            };
            Ok::<_, Error>(status)
        });
        let leases = futures::future::try_join_all(renewals).await?;
        Ok(HeartbeatResponse { leases })
    }

    /// FinishAttempt: record the outcome of the attempt holding the lease;
    /// answers the job as `req.view` asks.
    pub async fn finish(&self, req: FinishAttemptRequest, caller: &Caller) -> Result<Job> {
        let basic = is_basic(req.view)?;
        let job = self.record(req, caller, basic).await?;
        Ok(if basic { basic_view(job) } else { job })
    }

    async fn record(&self, req: FinishAttemptRequest, caller: &Caller, basic: bool) -> Result<Job> {
        let id = validate::job_id(&req.job_id)?;
        if req.lease_token.is_empty() {
            return Err(Error::invalid("lease_token", "must not be empty"));
        }
        let Some(mut outcome) = req.outcome else {
            return Err(Error::invalid(
                "outcome",
                "one of completed, failed or cancelled is required",
            ));
        };
        // A result is held to the rules of a payload, so that it reads the
        // same over gRPC and JSON.
        if let Outcome::Completed(result) = &mut outcome {
            validate::json_object("completed", result)?;
        }
        // A completion, the common case, in one store round trip when the
        // worker says which attempt it ran; the lease token and attempt are
        // compared in the store. Anything else is decided on the job.
        if let Outcome::Completed(result) = &outcome
            && req.attempt > 0
            && !req.worker_id.is_empty()
        {
            worker_id(&req.worker_id)?;
            let mut change = attempt::complete_attempt(
                req.attempt,
                &req.worker_id,
                &req.lease_token,
                result.clone(),
                now_ms(),
            )?;
            change.expect_namespace = caller.confined_to().map(str::to_owned);
            let applied = if basic {
                // What a basic view shows is known without reading the job back.
                self.store.apply_blind(id, &change).await?.map(|()| {
                    Box::new(Job {
                        id: id.to_string(),
                        state: change.to.map_or(0, |to| to.to_proto() as i32),
                        attempt: req.attempt,
                        updated_at: Some(ms_to_timestamp(change.at_ms)),
                        finished_at: Some(ms_to_timestamp(change.at_ms)),
                        ..Job::default()
                    })
                })
            } else {
                self.store.apply(id, &change).await?
            };
            match applied {
                Applied::Done(job) => {
                    log_finished(id, job.attempt, change.to);
                    return Ok(*job);
                }
                Applied::NotFound => return Err(Error::NotFound(id.to_string())),
                Applied::Conflict { .. } => {}
            }
        }
        for _ in 0..MAX_CAS_RETRIES {
            let job = self.read(id, caller).await?;
            let current =
                job_state(&job).ok_or_else(|| Error::Internal("job without state".into()))?;
            if current != State::Running {
                return Err(Error::StaleLease(format!(
                    "job {id} is {current}, not running this attempt"
                )));
            }
            let now = now_ms();
            let change: Change = match &outcome {
                Outcome::Completed(result) => {
                    attempt::complete(&job, &req.lease_token, result.clone(), now)?
                }
                Outcome::Failed(f) => attempt::fail(
                    &job,
                    Some(&req.lease_token),
                    &f.message,
                    f.permanent,
                    now,
                    &mut rand::rng(),
                )?,
                Outcome::Cancelled(c) => {
                    attempt::cancelled(&job, &req.lease_token, &c.reason, now)?
                }
            };
            match self.store.apply(id, &change).await? {
                Applied::Done(job) => {
                    log_finished(id, job.attempt, change.to);
                    return Ok(*job);
                }
                Applied::NotFound => return Err(Error::NotFound(id.to_string())),
                Applied::Conflict {
                    actual,
                    lease_mismatch: true,
                } => {
                    return Err(Error::StaleLease(format!(
                        "job {id} ({actual}) is held by another attempt; this lease is no longer valid"
                    )));
                }
                // The job changed within RUNNING (e.g. a cancel request): decide again.
                Applied::Conflict { .. } => continue,
            }
        }
        Err(Error::Conflict(format!(
            "job {id} kept changing; try again"
        )))
    }

    /// One sweep: fails every attempt whose lease expired ("worker lost"),
    /// then retries or fails the job like any failed attempt. Returns how
    /// many attempts it recovered.
    pub async fn sweep(&self, limit: usize) -> Result<usize> {
        let now = now_ms();
        let mut recovered = 0;
        for expired in self.store.expired_leases(now, limit).await? {
            let Some(job) = self.store.get(expired.id).await? else {
                continue;
            };
            if job_state(&job) != Some(State::Running) {
                continue;
            }
            let change = attempt::worker_lost(&job, now, &mut rand::rng())?;
            // Another replica's sweep or a last-moment heartbeat may win; both are fine.
            if let Applied::Done(after) = self.store.apply(expired.id, &change).await? {
                tracing::warn!(job_id = %expired.id, worker_id = %job.worker_id, attempt = job.attempt, state = ?change.to, "lease expired: worker lost");
                let _ = after;
                recovered += 1;
            }
        }
        Ok(recovered)
    }
}

/// The RUN answer for a started attempt.
fn started(
    id: Uuid,
    worker_id: &str,
    job: Job,
    token: String,
    now: i64,
    lease: Duration,
) -> StartAttemptResponse {
    tracing::debug!(job_id = %id, worker_id = %worker_id, attempt = job.attempt, "attempt started");
    StartAttemptResponse {
        decision: Decision::Run as i32,
        job: Some(job),
        lease_token: token,
        lease_expires_at: Some(ms_to_timestamp(now + lease.as_millis() as i64)),
        reason: String::new(),
    }
}

/// Whether a request's `view` asks for [`JobView::Basic`].
fn is_basic(view: i32) -> Result<bool> {
    match JobView::try_from(view) {
        Ok(JobView::Basic) => Ok(true),
        Ok(JobView::Unspecified | JobView::Full) => Ok(false),
        Err(_) => Err(Error::invalid("view", format!("unknown job view {view}"))),
    }
}

/// The fields of `job` that [`JobView::Basic`] shows in a FinishAttempt answer.
fn basic_view(job: Job) -> Job {
    Job {
        id: job.id,
        state: job.state,
        attempt: job.attempt,
        updated_at: job.updated_at,
        finished_at: job.finished_at,
        ..Job::default()
    }
}

/// Runs the sweeper every `interval` until `shutdown`.
pub async fn run_sweeper(service: AttemptService, interval: Duration, shutdown: CancellationToken) {
    loop {
        match service.sweep(200).await {
            Ok(n) if n > 0 => {
                tracing::info!(recovered = n, "sweeper recovered attempts of lost workers")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// A finished attempt: a completion is routine (debug, like every per-job
/// line), a failure, retry or cancellation is news (info).
fn log_finished(id: Uuid, attempt: u32, to: Option<State>) {
    if to == Some(State::Completed) {
        tracing::debug!(job_id = %id, attempt, state = ?to, "attempt finished");
    } else {
        tracing::info!(job_id = %id, attempt, state = ?to, "attempt finished");
    }
}

#[cfg(test)]
mod tests {
    //! The service's decide-then-write loops when another write lands
    //! between their read of the job and their own write.

    use std::sync::Mutex;

    use async_trait::async_trait;
    use futures::stream::BoxStream;
    use orchestrator::job::NewJob;
    use orchestrator::proto::v1::{AttemptFailure, SubmitJobRequest};
    use orchestrator::store::embedded::EmbeddedStore;
    use orchestrator::store::{Created, DueJob, ExpiredLease, Page, changes::Notice};
    use orchestrator::validate::{Limits, ListQuery};

    use super::*;

    /// A real (in-memory embedded) store that writes `cut_in` once, just
    /// before the first change that would take a job to `before`: the
    /// interleaving a concurrent request could produce.
    struct CutIn {
        inner: EmbeddedStore,
        before: State,
        cut_in: Mutex<Option<(Uuid, Change)>>,
    }

    impl CutIn {
        async fn maybe_cut_in(&self, change: &Change) {
            if change.to != Some(self.before) {
                return;
            }
            let pending = self.cut_in.lock().unwrap().take();
            if let Some((id, write)) = pending {
                let applied = self.inner.apply(id, &write).await.unwrap();
                assert!(matches!(applied, Applied::Done(_)), "{applied:?}");
            }
        }
    }

    #[async_trait]
    impl JobStore for CutIn {
        async fn create(&self, id: Uuid, job: &NewJob, now: i64, due: i64) -> Result<Created> {
            self.inner.create(id, job, now, due).await
        }
        async fn get(&self, id: Uuid) -> Result<Option<Job>> {
            self.inner.get(id).await
        }
        async fn list(&self, query: &ListQuery) -> Result<Page> {
            self.inner.list(query).await
        }
        async fn apply(&self, id: Uuid, change: &Change) -> Result<Applied> {
            self.maybe_cut_in(change).await;
            self.inner.apply(id, change).await
        }
        async fn claim_due(&self, now: i64, until: i64, limit: usize) -> Result<Vec<DueJob>> {
            self.inner.claim_due(now, until, limit).await
        }
        async fn ack_due(&self, acks: &[(Uuid, i64)]) -> Result<()> {
            self.inner.ack_due(acks).await
        }
        async fn expired_leases(&self, now: i64, limit: usize) -> Result<Vec<ExpiredLease>> {
            self.inner.expired_leases(now, limit).await
        }
        async fn purge_expired(&self, now: i64, limit: usize) -> Result<usize> {
            self.inner.purge_expired(now, limit).await
        }
        async fn changes(&self, id: Uuid) -> Result<BoxStream<'static, Notice>> {
            self.inner.changes(id).await
        }
        async fn namespaces(&self) -> Result<Vec<String>> {
            self.inner.namespaces().await
        }
        async fn ping(&self) -> Result<()> {
            self.inner.ping().await
        }
    }

    /// A job RUNNING attempt 1 of 3 under lease `tok` (expiring after
    /// `lease`), and a service whose store writes the job's cancel request
    /// just before the first change to RETRYING.
    async fn running_with_a_cancel_cutting_in(lease: Duration) -> (AttemptService, Uuid) {
        let inner = EmbeddedStore::in_memory(Duration::from_secs(3600)).unwrap();
        let id = Uuid::new_v4();
        let spec = SubmitJobRequest {
            kind: "work".into(),
            max_attempts: 3,
            ..SubmitJobRequest::default()
        };
        let new = validate::submit(&spec, &Limits::default()).unwrap();
        inner.create(id, &new, now_ms(), now_ms()).await.unwrap();
        let dispatched = attempt::Dispatched {
            attempt: 1,
            max_attempts: 3,
        };
        let start = attempt::start_dispatched(dispatched, "w", "tok".into(), lease, now_ms());
        let started = inner.apply(id, &start.unwrap()).await.unwrap();
        let Applied::Done(running) = started else {
            panic!("started: {started:?}");
        };
        let attempt::CancelStep::Apply(cancel) =
            attempt::user_cancel(&running, Some("alice"), now_ms()).unwrap()
        else {
            panic!("a running job's cancel is a write");
        };
        let store = CutIn {
            inner,
            before: State::Retrying,
            cut_in: Mutex::new(Some((id, *cancel))),
        };
        let service = AttemptService::new(Arc::new(store), LeaseConfig::default());
        (service, id)
    }

    // Injected: a user's cancel request written after FinishAttempt read the
    // job (no cancel requested, attempts left) and before it wrote RETRYING.
    // Asserted: the job ends CANCELLED, not RETRYING with a new attempt due.
    #[tokio::test]
    async fn a_failure_racing_a_cancel_request_cancels_the_job() {
        let (service, id) = running_with_a_cancel_cutting_in(Duration::from_secs(30)).await;
        let failed = FinishAttemptRequest {
            job_id: id.to_string(),
            lease_token: "tok".into(),
            outcome: Some(Outcome::Failed(AttemptFailure {
                message: "boom".into(),
                permanent: false,
            })),
            ..FinishAttemptRequest::default()
        };
        let job = service.finish(failed, &Caller::anonymous()).await.unwrap();
        assert_eq!(job_state(&job), Some(State::Cancelled), "{job:?}");
        assert!(job.cancel_requested);
        assert!(job.next_attempt_at.is_none(), "{job:?}");
        let stored = service.store.get(id).await.unwrap().unwrap();
        assert_eq!(job_state(&stored), Some(State::Cancelled));
    }

    // Injected: the same cancel request, written after the sweeper read a
    // job whose lease expired and before it wrote "worker lost" (RETRYING).
    // Asserted: that sweep recovers nothing and leaves the cancel request;
    // the next sweep cancels the job instead of retrying it.
    #[tokio::test]
    async fn a_sweep_racing_a_cancel_request_cancels_the_job() {
        let (service, id) = running_with_a_cancel_cutting_in(Duration::ZERO).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(service.sweep(10).await.unwrap(), 0);
        let after_first = service.store.get(id).await.unwrap().unwrap();
        assert_eq!(job_state(&after_first), Some(State::Running));
        assert!(after_first.cancel_requested);
        assert_eq!(service.sweep(10).await.unwrap(), 1);
        let after_second = service.store.get(id).await.unwrap().unwrap();
        assert_eq!(
            job_state(&after_second),
            Some(State::Cancelled),
            "{after_second:?}"
        );
    }
}
