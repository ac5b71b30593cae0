//! The job store: the authoritative record of every job, behind a small
//! trait so that the server's logic does not depend on which database holds
//! the jobs.
//!
//! Writes are compare-and-set: a [`Change`] names the state (and, for
//! worker reports, the lease) it expects, and the store applies it only if
//! the job is still in that state, atomically with the history entry, the
//! index moves and the due-set update.

pub mod changes;
pub mod embedded;
pub mod redis;
pub mod subscriber;

use async_trait::async_trait;
use futures::stream::BoxStream;
use pbjson_types::Struct;
use uuid::Uuid;

use crate::error::Result;
use crate::job::NewJob;
use crate::proto::v1::{Job, Transition};
use crate::state::State;
use crate::validate::ListQuery;

/// What to do with a job's entry in the due-set (the outbox the dispatcher
/// publishes from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Due {
    /// Leave it as it is.
    #[default]
    Keep,
    /// Publish the job at this time (epoch ms).
    At(i64),
    /// Take the job out of the due-set.
    Remove,
}

/// What to do with a job's lease.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LeaseChange {
    /// Leave it as it is.
    #[default]
    Keep,
    /// A lease with this token, held until `expires_ms`.
    Set {
        /// The fencing token of the attempt.
        token: String,
        /// Epoch ms.
        expires_ms: i64,
    },
    /// Extend the current lease until `expires_ms`.
    Extend {
        /// Epoch ms.
        expires_ms: i64,
    },
    /// No lease any more.
    Clear,
}

/// A compare-and-set update of one job.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// The state the job must be in for the change to apply.
    pub expect: Option<State>,
    /// The lease token the job must hold (worker reports).
    pub expect_lease: Option<String>,
    /// The attempt number the job must be at (a compare-and-set without
    /// reading the job first).
    pub expect_attempt: Option<u32>,
    /// The namespace the job must belong to; otherwise the store answers
    /// [`Applied::NotFound`], as for another tenant's job.
    pub expect_namespace: Option<String>,
    /// Only apply when the lease expired at or before this time (epoch ms):
    /// the sweeper's guard against a heartbeat that just renewed it.
    pub expect_lease_expired_by: Option<i64>,
    /// Only apply while the job's cancel request is in this state: a
    /// decision taken on a read of the job (a failed attempt retries only
    /// when no cancel was requested) must not overwrite a request written
    /// since that read.
    pub expect_cancel_requested: Option<bool>,
    /// The new state; equal to `expect` for updates within a state.
    pub to: Option<State>,
    /// When the change happens (epoch ms).
    pub at_ms: i64,
    /// Appended to the history when set.
    pub history: Option<Transition>,
    /// New attempt number.
    pub attempt: Option<u32>,
    /// New value of `cancel_requested`.
    pub cancel_requested: Option<bool>,
    /// New error message.
    pub error: Option<String>,
    /// Handler output.
    pub result: Option<Struct>,
    /// Set `started_at` (only the first attempt does).
    pub started: bool,
    /// Set `finished_at`.
    pub finished: bool,
    /// New `next_attempt_at`; `Some(None)` clears it.
    pub next_attempt_ms: Option<Option<i64>>,
    /// New worker id; `Some(None)` clears it.
    pub worker_id: Option<Option<String>>,
    /// Due-set update.
    pub due: Due,
    /// Lease update.
    pub lease: LeaseChange,
    /// A lease renewal: leaves `updated_at` alone and notifies no watcher,
    /// since nothing a user sees changed.
    pub silent: bool,
}

/// The result of [`JobStore::apply`] (the job as written) and of
/// [`JobStore::apply_blind`] (`Applied<()>`: nothing read back).
#[derive(Debug, Clone)]
pub enum Applied<T = Box<Job>> {
    /// The change was written; the job as it is now.
    Done(T),
    /// The job is not in the expected state (or lease); nothing changed.
    Conflict {
        /// The state the job is actually in.
        actual: State,
        /// True when the state matched but the lease did not.
        lease_mismatch: bool,
    },
    /// No such job.
    NotFound,
}

impl<T> Applied<T> {
    /// The same outcome with `f` applied to what was written.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Applied<U> {
        match self {
            Applied::Done(job) => Applied::Done(f(job)),
            Applied::Conflict {
                actual,
                lease_mismatch,
            } => Applied::Conflict {
                actual,
                lease_mismatch,
            },
            Applied::NotFound => Applied::NotFound,
        }
    }
}

impl Applied {
    /// The same outcome, the job as written without its history: what
    /// [`JobStore::apply_without_history`] answers.
    pub fn without_history(self) -> Applied {
        self.map(|mut job| {
            job.history.clear();
            job
        })
    }
}

/// The result of [`JobStore::create`].
#[derive(Debug, Clone)]
pub enum Created {
    /// A new job was stored.
    New(Box<Job>),
    /// The idempotency key was used before, by this job.
    Existing(Box<Job>),
}

/// A job the dispatcher must publish, claimed for a while so that other
/// dispatchers leave it alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueJob {
    /// Job id.
    pub id: Uuid,
    /// Handler name.
    pub kind: String,
    /// Queue name.
    pub queue: String,
    /// The job's namespace.
    pub namespace: String,
    /// The job's max_attempts.
    pub max_attempts: u32,
    /// Attempt the message will start.
    pub attempt: u32,
    /// The claim; pass it back to [`JobStore::ack_due`].
    pub claim: i64,
}

/// A running attempt whose lease ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    /// Job id.
    pub id: Uuid,
    /// When the lease expired (epoch ms).
    pub expired_ms: i64,
}

/// One page of jobs.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Newest first.
    pub jobs: Vec<Job>,
    /// Cursor of the next page; `None` on the last.
    pub next_page_token: Option<String>,
}

/// The authoritative job store.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job in CREATED, due for dispatch at `due_ms`, unless its
    /// idempotency key was seen before.
    async fn create(&self, id: Uuid, job: &NewJob, now_ms: i64, due_ms: i64) -> Result<Created>;

    /// Stores many new jobs at once, each like [`JobStore::create`] (its own
    /// id and idempotency check), answering in order. Stores that can,
    /// write them in one round trip.
    async fn create_many(
        &self,
        jobs: &[(Uuid, NewJob)],
        now_ms: i64,
        due_ms: i64,
    ) -> Result<Vec<Created>> {
        let mut out = Vec::with_capacity(jobs.len());
        for (id, job) in jobs {
            out.push(self.create(*id, job, now_ms, due_ms).await?);
        }
        Ok(out)
    }

    /// Reads one job with its history.
    async fn get(&self, id: Uuid) -> Result<Option<Job>>;

    /// Lists jobs, newest first.
    async fn list(&self, query: &ListQuery) -> Result<Page>;

    /// Applies a compare-and-set change.
    async fn apply(&self, id: Uuid, change: &Change) -> Result<Applied>;

    /// Applies a compare-and-set change for a caller that only needs to
    /// know whether it was written. Stores that can skip reading the job
    /// back (the largest part of a write's reply); watchers are told as
    /// after [`JobStore::apply`].
    async fn apply_blind(&self, id: Uuid, change: &Change) -> Result<Applied<()>> {
        Ok(self.apply(id, change).await?.map(|_| ()))
    }

    /// Applies a compare-and-set change and answers the job as written
    /// without its history (empty), which stores can build from what the
    /// write reads anyway instead of reading the job back; watchers are
    /// told as after [`JobStore::apply`].
    async fn apply_without_history(&self, id: Uuid, change: &Change) -> Result<Applied> {
        Ok(self.apply(id, change).await?.without_history())
    }

    /// Claims up to `limit` jobs due at `now_ms` until `claim_until_ms`.
    /// Entries of jobs that no longer need a dispatch are dropped.
    async fn claim_due(
        &self,
        now_ms: i64,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueJob>>;

    /// Removes jobs from the due-set once their message is confirmed, each
    /// `(id, claim)` unless the job was re-scheduled since that claim; in
    /// one round trip, as one message carries many jobs.
    async fn ack_due(&self, acks: &[(Uuid, i64)]) -> Result<()>;

    /// Running attempts whose lease expired by `now_ms`.
    async fn expired_leases(&self, now_ms: i64, limit: usize) -> Result<Vec<ExpiredLease>>;

    /// Deletes up to `limit` terminal jobs whose retention ended by
    /// `now_ms`, with their index entries. Returns how many went.
    async fn purge_expired(&self, now_ms: i64, limit: usize) -> Result<usize>;

    /// A stream of notices about changes of the job: the job as written
    /// when the change was made here, or a hint to re-read it. It may
    /// yield spuriously, and ends when notifications stop (the connection
    /// to the store broke); readers then poll.
    async fn changes(&self, id: Uuid) -> Result<BoxStream<'static, changes::Notice>>;

    /// Every namespace that ever had a job, sorted: what tools that work
    /// across tenants (an admin, `orchd dev`'s recovery) iterate over.
    async fn namespaces(&self) -> Result<Vec<String>>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<()>;
}
