//! The job operations, once: submit, get, list, cancel and watch. The gRPC
//! service and the REST routes are thin adapters over [`JobService`]; this
//! is where requests are validated, the per-token limits are checked
//! (`crate::limits`) and the state machine is enforced.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use orchestrator::attempt::{CancelStep, user_cancel};
use orchestrator::auth::Caller;
use orchestrator::error::{Error, Result};
use orchestrator::job::{job_state, now_ms};
use orchestrator::proto::v1::{
    Job, ListJobsRequest, ListJobsResponse, SubmitJobRequest, SubmitJobsRequest, SubmitJobsResponse,
};
use orchestrator::state::State;
use orchestrator::store::changes::Notice;
use orchestrator::store::{Applied, Created, JobStore};
use orchestrator::validate::{self, Limits};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dispatch::Dispatcher;
use crate::limits::Quotas;

/// Most jobs in one SubmitJobs call.
pub const MAX_BATCH: usize = 1000;
/// How often a CAS that lost a race is retried before giving up.
const MAX_CAS_RETRIES: usize = 8;
/// How often a watch re-reads the job even without a change notification,
/// in case one was lost while Redis reconnected.
const WATCH_RESYNC: Duration = Duration::from_secs(2);
/// How often a watch polls once its change subscription is gone.
const WATCH_POLL: Duration = Duration::from_millis(500);

/// The job operations shared by every API surface.
#[derive(Clone)]
pub struct JobService {
    store: Arc<dyn JobStore>,
    dispatcher: Dispatcher,
    limits: Limits,
    quotas: Quotas,
    shutdown: CancellationToken,
}

impl JobService {
    /// A service over `store` that dispatches through `dispatcher`,
    /// checking requests against `limits` and callers against `quotas`.
    /// Watch streams end when `shutdown` is cancelled.
    pub fn new(
        store: Arc<dyn JobStore>,
        dispatcher: Dispatcher,
        limits: Limits,
        quotas: Quotas,
        shutdown: CancellationToken,
    ) -> Self {
        JobService {
            store,
            dispatcher,
            limits,
            quotas,
            shutdown,
        }
    }

    /// Validates and stores a job, then dispatches it. The job is durable in
    /// the store when this returns; if the publish fails, the dispatcher's
    /// outbox loop publishes it later. The history records `caller`'s name
    /// ("submitted by NAME") unless it is anonymous. A valid, permitted request counts
    /// against `caller`'s submit rate, even when idempotency returns an
    /// existing job.
    pub async fn submit(&self, req: SubmitJobRequest, caller: &Caller) -> Result<Job> {
        let mut new = validate::submit(&req, &self.limits)?;
        new.namespace = caller.namespace_for(&new.namespace)?;
        self.quotas.check_submit(caller, 1)?;
        new.submitted_by = caller.name.clone();
        let id = Uuid::new_v4();
        let now = now_ms();
        let claim = now + self.dispatcher.claim_ttl_ms();
        match self.store.create(id, &new, now, claim).await? {
            Created::New(job) => {
                // Per-job lifecycle lines are debug: at thousands of jobs a second, one
                // stderr write each cost ~10 % of throughput, and the job's
                // history already records every transition.
                tracing::debug!(job_id = %id, kind = %job.kind, queue = %job.queue, by = caller.actor().unwrap_or("-"), "job submitted");
                self.dispatcher.dispatch_soon(&job, claim);
                Ok(*job)
            }
            Created::Existing(job) => {
                tracing::info!(job_id = %job.id, idempotency_key = %new.idempotency_key, "idempotent submit returned the existing job");
                Ok(*job)
            }
        }
    }

    /// Validates and stores a batch of jobs in one store round trip, then
    /// dispatches the new ones. All or nothing on validation and on the
    /// submit rate, where each job counts.
    pub async fn submit_many(
        &self,
        req: SubmitJobsRequest,
        caller: &Caller,
    ) -> Result<SubmitJobsResponse> {
        validate::batch_len("jobs", req.jobs.len(), MAX_BATCH, "job specs")?;
        let mut batch = Vec::with_capacity(req.jobs.len());
        for (i, spec) in req.jobs.iter().enumerate() {
            let mut new = validate::submit(spec, &self.limits).map_err(|e| match e {
                Error::InvalidArgument { field, message } => Error::InvalidArgument {
                    field: format!("jobs[{i}].{field}"),
                    message,
                },
                other => other,
            })?;
            new.submitted_by = caller.name.clone();
            new.namespace = caller.namespace_for(&new.namespace).map_err(|e| match e {
                Error::InvalidArgument { field, message } => Error::InvalidArgument {
                    field: format!("jobs[{i}].{field}"),
                    message,
                },
                Error::PermissionDenied(message) => {
                    Error::PermissionDenied(format!("jobs[{i}].namespace: {message}"))
                }
                other => other,
            })?;
            batch.push((Uuid::new_v4(), new));
        }
        self.quotas.check_submit(caller, batch.len())?;
        let now = now_ms();
        let claim = now + self.dispatcher.claim_ttl_ms();
        let created = self.store.create_many(&batch, now, claim).await?;
        let mut jobs = Vec::with_capacity(created.len());
        // Where in `jobs` the newly created ones are.
        let mut fresh = Vec::with_capacity(created.len());
        for outcome in created {
            match outcome {
                Created::New(job) => {
                    fresh.push(jobs.len());
                    jobs.push(*job);
                }
                Created::Existing(job) => jobs.push(*job),
            }
        }
        // The batch's jobs for one queue go out together: one message per
        // queue (up to 50 jobs each) instead of one per job.
        self.dispatcher
            .dispatch_many_soon(fresh.iter().map(|&i| &jobs[i]), claim);
        tracing::info!(submitted = jobs.len(), new = fresh.len(), "batch submitted");
        Ok(SubmitJobsResponse { jobs })
    }

    /// Reads one job. Another namespace's job is NOT_FOUND, exactly like a
    /// job that does not exist, so ids reveal nothing across tenants.
    pub async fn get(&self, job_id: &str, caller: &Caller) -> Result<Job> {
        let id = validate::job_id(job_id)?;
        self.store
            .get(id)
            .await?
            .filter(|job| caller.sees(validate::job_namespace(job)))
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Lists one namespace's jobs, newest first: the caller's, or the one
    /// an admin names.
    pub async fn list(&self, req: ListJobsRequest, caller: &Caller) -> Result<ListJobsResponse> {
        let mut query = validate::list(&req, &self.limits)?;
        query.namespace = caller.namespace_for(&query.namespace)?;
        let page = self.store.list(&query).await?;
        Ok(ListJobsResponse {
            jobs: page.jobs,
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }

    /// Cancels a job: at once when it has not started or waits for a retry,
    /// by request to its worker when it runs (recorded as `cancel_requested`,
    /// which the worker's heartbeats report, and pushed to the worker at
    /// once); idempotent on CANCELLED. The
    /// history records `caller`'s name ("cancelled by NAME", or a RUNNING
    /// entry "cancel requested by NAME") unless it is anonymous.
    pub async fn cancel(&self, job_id: &str, caller: &Caller) -> Result<Job> {
        let id = validate::job_id(job_id)?;
        for _ in 0..MAX_CAS_RETRIES {
            let job = self.get(job_id, caller).await?;
            let current =
                job_state(&job).ok_or_else(|| Error::Internal("job without state".into()))?;
            let change = match user_cancel(&job, caller.actor(), now_ms())? {
                CancelStep::Apply(change) => *change,
                CancelStep::Nothing => {
                    if current == State::Running {
                        // Asked again: push again, in case the first push was lost.
                        self.dispatcher.push_cancel(&job);
                    }
                    return Ok(job);
                }
            };
            match self.store.apply(id, &change).await? {
                Applied::Done(job) => {
                    tracing::info!(job_id = %id, from = %current, by = caller.actor().unwrap_or("-"), "cancel applied");
                    if current == State::Running {
                        self.dispatcher.push_cancel(&job);
                    }
                    return Ok(*job);
                }
                Applied::NotFound => return Err(Error::NotFound(id.to_string())),
                // Someone else moved the job first: decide again on what it is now.
                Applied::Conflict { .. } => continue,
            }
        }
        Err(Error::Conflict(format!(
            "job {id} kept changing while it was being cancelled; try again"
        )))
    }

    /// The job's current snapshot, then every change, ending after a
    /// terminal state. The stream holds one of `caller`'s watch slots until
    /// it is dropped.
    pub async fn watch(
        &self,
        job_id: &str,
        caller: &Caller,
    ) -> Result<BoxStream<'static, Result<Job>>> {
        let id = validate::job_id(job_id)?;
        let slot = self.quotas.watches.acquire(caller)?;
        // Subscribe before the first read so no change falls in between.
        let changes = match tokio::time::timeout(Duration::from_secs(2), self.store.changes(id))
            .await
        {
            Ok(Ok(stream)) => stream,
            Err(_) => {
                tracing::warn!(job_id = %id, "change notifications timed out; polling");
                futures::stream::pending().boxed()
            }
            Ok(Err(e)) => {
                tracing::warn!(job_id = %id, error = %e, "change notifications unavailable; polling");
                futures::stream::pending().boxed()
            }
        };
        let first = self.get(job_id, caller).await?;
        let store = self.store.clone();
        let stream = watch_stream(store, id, first, changes)
            .take_until(self.shutdown.clone().cancelled_owned())
            // The stream owns the slot: dropping it (the end, or a client
            // that went away) frees the slot.
            .map(move |item| {
                let _held = &slot;
                item
            })
            .boxed();
        Ok(stream)
    }
}

/// Whether `snapshot`, pushed by a write in this process, is newer than
/// `last`, the job as the watcher last showed it: `Some(true)` when it is,
/// `Some(false)` when it is not, `None` when only a re-read can tell.
/// Every transition appends to the history, so a longer history is a later
/// job; writes can finish out of order, so a shorter one is an earlier
/// job. Equal lengths with different contents (a change that adds no
/// history entry) need a re-read.
fn newer(last: Option<&Job>, snapshot: &Job) -> Option<bool> {
    let last = last?;
    match snapshot.history.len().cmp(&last.history.len()) {
        std::cmp::Ordering::Greater => Some(true),
        std::cmp::Ordering::Less => Some(false),
        std::cmp::Ordering::Equal if snapshot == last => Some(false),
        std::cmp::Ordering::Equal => None,
    }
}

fn watch_stream(
    store: Arc<dyn JobStore>,
    id: Uuid,
    first: Job,
    changes: BoxStream<'static, Notice>,
) -> BoxStream<'static, Result<Job>> {
    struct Watch {
        store: Arc<dyn JobStore>,
        id: Uuid,
        pending: Option<Job>,
        last: Option<Job>,
        changes: BoxStream<'static, Notice>,
        resync: Duration,
        done: bool,
    }
    let watch = Watch {
        store,
        id,
        pending: Some(first),
        last: None,
        changes,
        resync: WATCH_RESYNC,
        done: false,
    };
    futures::stream::unfold(watch, |mut w| async move {
        if w.done {
            return None;
        }
        loop {
            if let Some(job) = w.pending.take() {
                let is_new = w.last.as_ref().is_none_or(|last| last != &job);
                if is_new {
                    w.done = job_state(&job).is_some_and(State::is_terminal);
                    w.last = Some(job.clone());
                    return Some((Ok(job), w));
                }
            }
            // Wait for a notification, or re-read now and then regardless.
            match tokio::time::timeout(w.resync, w.changes.next()).await {
                Ok(Some(Notice::Snapshot(job))) => match newer(w.last.as_ref(), &job) {
                    Some(true) => {
                        w.pending = Some(Arc::unwrap_or_clone(job));
                        continue;
                    }
                    // Already seen, or older than what was: nothing new.
                    Some(false) => continue,
                    None => {}
                },
                Ok(Some(Notice::Reread)) | Err(_) => {}
                Ok(None) => {
                    // The subscription ended (Redis went away): poll instead.
                    w.changes = futures::stream::pending().boxed();
                    w.resync = WATCH_POLL;
                }
            }
            match w.store.get(w.id).await {
                Ok(Some(job)) => w.pending = Some(job),
                Ok(None) => {
                    w.done = true;
                    return Some((Err(Error::NotFound(w.id.to_string())), w));
                }
                Err(e) => {
                    tracing::debug!(job_id = %w.id, error = %e, "watch re-read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::newer;
    use orchestrator::proto::v1::{Job, Transition};

    fn job(history: usize, state: i32) -> Job {
        Job {
            state,
            history: vec![Transition::default(); history],
            ..Job::default()
        }
    }

    #[test]
    fn a_pushed_snapshot_is_shown_only_when_it_is_later_than_the_last() {
        let last = job(2, 2);
        assert_eq!(newer(Some(&last), &job(3, 3)), Some(true), "longer history");
        assert_eq!(
            newer(Some(&last), &job(1, 1)),
            Some(false),
            "a write that finished late"
        );
        assert_eq!(newer(Some(&last), &last.clone()), Some(false), "seen");
        assert_eq!(
            newer(Some(&last), &job(2, 5)),
            None,
            "same length, other contents: re-read"
        );
        assert_eq!(newer(None, &job(1, 1)), None, "nothing shown yet");
    }
}
