//! The embedded job store: one [redb] file (or memory) instead of Redis, for
//! `orchd dev` and tests that run in a single process.
//!
//! It mirrors [`super::redis::RedisStore`] operation by operation; the
//! conformance suite (`tests/store_conformance.rs`) runs every case against
//! both so that they cannot drift.
//!
//! Layout, one redb table each (job ids are stored as the `u128` of the
//! UUID, which sorts like its hyphenated text form does in Redis):
//! - `jobs`: id → a private protobuf `Record`: the full `Job` with its
//!   history, plus what the API never shows (lease token and expiry, and the
//!   creation time the index entries are keyed by).
//! - `index`: `(name, created_ms, id)`, encoded as bytes that sort in that
//!   order, → `()`, with names `{ns}:all`, `{ns}:state:{STATE}`,
//!   `{ns}:kind:{kind}` and `{ns}:queue:{queue}` per namespace `ns`. Pages
//!   are reverse range reads within one name, the last key being the
//!   cursor, exactly like the Redis sorted sets read by lex.
//! - `idem`: `{ns}:{idempotency key}` → id.
//! - `namespaces`: every namespace that ever had a job → `()`.
//! - `due`, `leases`, `retention`: sorted sets as two tables each,
//!   `(score, id)` → `()` for the ordered range reads of the dispatcher, the
//!   sweeper and the purge, and `{name}_by_id`: id → score, so re-scoring or
//!   removing one job's entry is a point lookup instead of a scan.
//!
//! No operation scans all jobs: lists, claims, expired leases and purges are
//! ordered range reads that stop at their limit.
//!
//! Crash safety: every operation is one redb transaction, so its writes (job
//! record, history, index moves, sorted-set updates, idempotency key) land
//! together or not at all. redb never overwrites the pages of the last
//! commit (copy-on-write B-trees) and commits with `Durability::Immediate`
//! by default: the new pages and a checksummed, versioned root are written
//! and fsynced before `commit` returns. A method that returned has therefore
//! written to disk, and a crash during a commit is detected on the next open
//! (bad checksum or older transaction id) and rolled back to the previous
//! commit. Operations that change nothing (a compare-and-set that loses, a
//! stale ack) abort instead of committing, which spares an fsync.
//!
//! redb is synchronous; every transaction runs on tokio's blocking pool so
//! the async runtime never waits on disk. redb serializes write
//! transactions, which is what makes each compare-and-set and each due-set
//! claim atomic against concurrent callers.
//!
//! Change notifications are in-process: after each commit, the watchers of
//! the written job (a [`ChangeHub`]) are told to re-read it.
//!
//! [redb]: https://www.redb.org

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use futures::stream::BoxStream;
use prost::Message;
use redb::{Database, ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};
use uuid::Uuid;

use super::changes::{ChangeHub, Notice};
use super::{Applied, Change, Created, Due, DueJob, ExpiredLease, JobStore, LeaseChange, Page};
use crate::error::{Error, Result};
use crate::job::{NewJob, job_state, ms_to_timestamp};
use crate::proto::v1::Job;
use crate::state::State;
use crate::validate::{ListQuery, job_namespace};

const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// Keys built by [`index_key`]: plain bytes rather than a `(&str, i64, u128)`
/// tuple, because redb 3 changed how variable-width tuples are encoded while
/// byte keys read the same in every version.
const INDEX: TableDefinition<&[u8], ()> = TableDefinition::new("index");
const IDEM: TableDefinition<&str, u128> = TableDefinition::new("idem");
/// Every namespace that ever had a job.
const NAMESPACES: TableDefinition<&str, ()> = TableDefinition::new("namespaces");

/// The tables of one sorted set.
#[derive(Clone, Copy)]
struct ScoredSetDef {
    by_score: TableDefinition<'static, (i64, u128), ()>,
    by_id: TableDefinition<'static, u128, i64>,
}

const DUE: ScoredSetDef = ScoredSetDef {
    by_score: TableDefinition::new("due"),
    by_id: TableDefinition::new("due_by_id"),
};
const LEASES: ScoredSetDef = ScoredSetDef {
    by_score: TableDefinition::new("leases"),
    by_id: TableDefinition::new("leases_by_id"),
};
const RETENTION: ScoredSetDef = ScoredSetDef {
    by_score: TableDefinition::new("retention"),
    by_id: TableDefinition::new("retention_by_id"),
};

/// Most index entries one list request looks at when filters are combined;
/// past that it returns a short page with a cursor (as the Redis store does).
const MAX_LIST_SCAN: usize = 5000;

const SERVICE: &str = "embedded store";

/// What `jobs` holds per job.
#[derive(Clone, PartialEq, Message)]
struct Record {
    /// The job as `get` returns it, history included.
    #[prost(message, optional, tag = "1")]
    job: Option<Job>,
    /// Fencing token of the running attempt.
    #[prost(string, optional, tag = "2")]
    lease_token: Option<String>,
    /// Epoch ms; mirrored by the `leases` sorted set.
    #[prost(int64, optional, tag = "3")]
    lease_expires_ms: Option<i64>,
    /// Creation time as the index keys have it, kept apart from
    /// `job.created_at` so that index cleanup never depends on a timestamp
    /// round trip.
    #[prost(int64, tag = "4")]
    ix_ms: i64,
}

impl Record {
    fn job(&self) -> Result<&Job> {
        self.job
            .as_ref()
            .ok_or_else(|| corrupt("record without job"))
    }

    fn job_mut(&mut self) -> Result<&mut Job> {
        self.job
            .as_mut()
            .ok_or_else(|| corrupt("record without job"))
    }
}

/// The redb-backed [`JobStore`]. Cheap to clone; clones share the database
/// and the change notifications.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    retention_ms: i64,
    changes: ChangeHub,
}

impl EmbeddedStore {
    /// Opens the store in the file at `path`, creating the file and its
    /// directory when missing. Blocks while redb opens the file (and repairs
    /// it after an unclean shutdown), so call it at startup.
    pub fn open(path: &Path, retention: Duration) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Unavailable {
                service: SERVICE,
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        let mut db = builder().create(path).map_err(|e| {
            let e = redb::Error::from(e);
            if matches!(e, redb::Error::DatabaseAlreadyOpen) {
                Error::Unavailable {
                    service: SERVICE,
                    message: format!("{} is in use by another process", path.display()),
                }
            } else {
                db_error(e)
            }
        })?;
        // A no-op for files this store created; moves older v2 files to the
        // format that redb 3 and later read.
        db.upgrade().db()?;
        Self::with_database(db, retention)
    }

    /// A store that lives in memory only and is gone when the last clone is
    /// dropped.
    pub fn in_memory(retention: Duration) -> Result<Self> {
        let db = builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .db()?;
        Self::with_database(db, retention)
    }

    fn with_database(db: Database, retention: Duration) -> Result<Self> {
        // Read transactions cannot open tables that were never created.
        let txn = db.begin_write().db()?;
        Tables::open(&txn)?;
        txn.commit().db()?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            changes: ChangeHub::new(),
        })
    }

    /// Runs `op` in one write transaction on the blocking pool. `op` returns
    /// its value and whether it wrote anything: only then is the transaction
    /// committed (and fsynced). An error aborts it.
    async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut Tables<'t>) -> Result<(T, bool)> + Send + 'static,
    {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().db()?;
            let (value, wrote) = {
                let mut tables = Tables::open(&txn)?;
                op(&mut tables)?
            };
            if wrote {
                txn.commit().db()?;
            } else {
                txn.abort().db()?;
            }
            Ok(value)
        })
        .await
    }

    /// Runs `op` in one read transaction (a consistent snapshot) on the
    /// blocking pool.
    async fn read<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().db()?;
            op(&txn)
        })
        .await
    }

    fn notify(&self, id: Uuid) {
        self.changes.notify(id, || Notice::Reread);
    }
}

fn builder() -> redb::Builder {
    let mut builder = Database::builder();
    // redb 3 and later only read the v3 format; writing it now means
    // upgrading redb later needs no migration of existing files.
    builder.create_with_file_format_v3(true);
    builder
}

async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("{SERVICE} task failed: {e}")))?
}

fn db_error(e: redb::Error) -> Error {
    match e {
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseAlreadyOpen => {
            Error::Unavailable {
                service: SERVICE,
                message: e.to_string(),
            }
        }
        other => Error::Internal(format!("{SERVICE}: {other}")),
    }
}

/// `.db()?` turns any redb error into ours.
trait DbResult<T> {
    fn db(self) -> Result<T>;
}

impl<T, E: Into<redb::Error>> DbResult<T> for std::result::Result<T, E> {
    fn db(self) -> Result<T> {
        self.map_err(|e| db_error(e.into()))
    }
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("corrupt job record: {what}"))
}

fn decode_record(bytes: &[u8]) -> Result<Record> {
    Record::decode(bytes).map_err(|e| corrupt(&e.to_string()))
}

fn load(jobs: &impl ReadableTable<u128, &'static [u8]>, id: u128) -> Result<Option<Record>> {
    jobs.get(id)
        .db()?
        .map(|bytes| decode_record(bytes.value()))
        .transpose()
}

fn state_of(job: &Job) -> Result<State> {
    job_state(job).ok_or_else(|| corrupt("bad state"))
}

fn state_index(namespace: &str, state: State) -> String {
    format!("{namespace}:state:{}", state.as_str())
}

fn idem_key(namespace: &str, key: &str) -> String {
    format!("{namespace}:{key}")
}

/// `len(name) ‖ name ‖ created_ms ‖ id`, all big-endian with the sign bit
/// of `created_ms` flipped, so that byte order is (name, time, id) order
/// and one name's entries form one contiguous range.
fn index_key(name: &str, created_ms: i64, id: u128) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + name.len() + 8 + 16);
    key.extend_from_slice(&(name.len() as u32).to_be_bytes());
    key.extend_from_slice(name.as_bytes());
    key.extend_from_slice(&((created_ms as u64) ^ (1 << 63)).to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The creation time and id at the end of an index key.
fn parse_index_key(key: &[u8]) -> Result<(i64, u128)> {
    let tail = key
        .len()
        .checked_sub(24)
        .map(|at| &key[at..])
        .ok_or_else(|| corrupt("short index key"))?;
    let (ms, id) = tail.split_at(8);
    let ms = u64::from_be_bytes(ms.try_into().map_err(|_| corrupt("index key"))?) ^ (1 << 63);
    let id = u128::from_be_bytes(id.try_into().map_err(|_| corrupt("index key"))?);
    Ok((ms as i64, id))
}

fn index_names(job: &Job) -> Result<[String; 4]> {
    let ns = job_namespace(job);
    Ok([
        format!("{ns}:all"),
        state_index(ns, state_of(job)?),
        format!("{ns}:kind:{}", job.kind),
        format!("{ns}:queue:{}", job.queue),
    ])
}

/// One sorted set, open in a write transaction.
struct ScoredSet<'t> {
    by_score: Table<'t, (i64, u128), ()>,
    by_id: Table<'t, u128, i64>,
}

impl<'t> ScoredSet<'t> {
    fn open(txn: &'t WriteTransaction, def: ScoredSetDef) -> Result<Self> {
        Ok(ScoredSet {
            by_score: txn.open_table(def.by_score).db()?,
            by_id: txn.open_table(def.by_id).db()?,
        })
    }

    /// ZADD: sets the score, replacing any previous one.
    fn add(&mut self, id: u128, score: i64) -> Result<()> {
        let old = self.by_id.insert(id, score).db()?.map(|g| g.value());
        if let Some(old) = old {
            self.by_score.remove((old, id)).db()?;
        }
        self.by_score.insert((score, id), ()).db()?;
        Ok(())
    }

    /// ZREM.
    fn remove(&mut self, id: u128) -> Result<()> {
        let old = self.by_id.remove(id).db()?.map(|g| g.value());
        if let Some(old) = old {
            self.by_score.remove((old, id)).db()?;
        }
        Ok(())
    }

    /// ZSCORE.
    fn score(&self, id: u128) -> Result<Option<i64>> {
        Ok(self.by_id.get(id).db()?.map(|g| g.value()))
    }

    /// ZRANGEBYSCORE -inf max LIMIT 0 limit.
    fn up_to(&self, max: i64, limit: usize) -> Result<Vec<(i64, u128)>> {
        range_up_to(&self.by_score, max, limit)
    }
}

fn range_up_to(
    by_score: &impl ReadableTable<(i64, u128), ()>,
    max: i64,
    limit: usize,
) -> Result<Vec<(i64, u128)>> {
    by_score
        .range(..=(max, u128::MAX))
        .db()?
        .take(limit)
        .map(|entry| entry.db().map(|(key, _)| key.value()))
        .collect()
}

/// Every table, open in one write transaction.
struct Tables<'t> {
    jobs: Table<'t, u128, &'static [u8]>,
    index: Table<'t, &'static [u8], ()>,
    idem: Table<'t, &'static str, u128>,
    namespaces: Table<'t, &'static str, ()>,
    due: ScoredSet<'t>,
    leases: ScoredSet<'t>,
    retention: ScoredSet<'t>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(Tables {
            jobs: txn.open_table(JOBS).db()?,
            index: txn.open_table(INDEX).db()?,
            idem: txn.open_table(IDEM).db()?,
            namespaces: txn.open_table(NAMESPACES).db()?,
            due: ScoredSet::open(txn, DUE)?,
            leases: ScoredSet::open(txn, LEASES)?,
            retention: ScoredSet::open(txn, RETENTION)?,
        })
    }

    fn save(&mut self, id: u128, record: &Record) -> Result<()> {
        self.jobs
            .insert(id, record.encode_to_vec().as_slice())
            .db()?;
        Ok(())
    }

    fn create(
        &mut self,
        id: Uuid,
        new: &NewJob,
        now_ms: i64,
        due_ms: i64,
    ) -> Result<(Created, bool)> {
        let raw = id.as_u128();
        let idem = idem_key(
            crate::validate::namespace_or_default(&new.namespace),
            &new.idempotency_key,
        );
        if !new.idempotency_key.is_empty() {
            let existing = self.idem.get(idem.as_str()).db()?.map(|g| g.value());
            if let Some(existing) = existing {
                return match load(&self.jobs, existing)? {
                    Some(record) => Ok((Created::Existing(Box::new(record.job()?.clone())), false)),
                    // Purge drops the key with its job in one transaction, so
                    // this is corruption; answered as the Redis store does.
                    None => Err(Error::Conflict(format!(
                        "idempotency key {:?} belongs to job {}, which was just deleted",
                        new.idempotency_key,
                        Uuid::from_u128(existing)
                    ))),
                };
            }
        }
        if self.jobs.get(raw).db()?.is_some() {
            // Nothing was written yet, so aborting leaves no stray
            // idempotency key behind.
            return Err(Error::Conflict(format!("job id {id} already exists")));
        }
        let mut job = new.to_job(&id.to_string(), now_ms);
        job.history.push(new.created_transition(now_ms));
        for name in index_names(&job)? {
            self.index
                .insert(index_key(&name, now_ms, raw).as_slice(), ())
                .db()?;
        }
        self.namespaces.insert(job_namespace(&job), ()).db()?;
        if !new.idempotency_key.is_empty() {
            self.idem.insert(idem.as_str(), raw).db()?;
        }
        self.due.add(raw, due_ms)?;
        let record = Record {
            job: Some(job.clone()),
            lease_token: None,
            lease_expires_ms: None,
            ix_ms: now_ms,
        };
        self.save(raw, &record)?;
        Ok((Created::New(Box::new(job)), true))
    }

    fn apply(&mut self, id: Uuid, change: &Change, retention_ms: i64) -> Result<(Applied, bool)> {
        let raw = id.as_u128();
        let Some(mut record) = load(&self.jobs, raw)? else {
            return Ok((Applied::NotFound, false));
        };
        if let Some(ns) = &change.expect_namespace
            && job_namespace(record.job()?) != ns
        {
            return Ok((Applied::NotFound, false));
        }
        let state = state_of(record.job()?)?;
        let conflict = |lease_mismatch| {
            Ok((
                Applied::Conflict {
                    actual: state,
                    lease_mismatch,
                },
                false,
            ))
        };
        if change.expect.is_some_and(|s| s != state) {
            return conflict(false);
        }
        let attempt = record.job()?.attempt;
        if change.expect_attempt.is_some_and(|a| a != attempt) {
            return conflict(false);
        }
        let cancel_requested = record.job()?.cancel_requested;
        if change
            .expect_cancel_requested
            .is_some_and(|c| c != cancel_requested)
        {
            return conflict(false);
        }
        // An empty expected token means "any", as in the Redis store, whose
        // scripts cannot tell it from an absent one.
        if let Some(token) = change.expect_lease.as_deref().filter(|t| !t.is_empty())
            && record.lease_token.as_deref() != Some(token)
        {
            return conflict(true);
        }
        if let Some(by) = change.expect_lease_expired_by
            && record.lease_expires_ms.unwrap_or(0) > by
        {
            return conflict(true);
        }

        if let Some(to) = change.to.filter(|to| *to != state) {
            let ns = job_namespace(record.job()?).to_owned();
            let ns = ns.as_str();
            let (old, new) = (
                index_key(&state_index(ns, state), record.ix_ms, raw),
                index_key(&state_index(ns, to), record.ix_ms, raw),
            );
            self.index.remove(old.as_slice()).db()?;
            self.index.insert(new.as_slice(), ()).db()?;
        }
        match change.due {
            Due::Keep => {}
            Due::Remove => self.due.remove(raw)?,
            Due::At(ms) => self.due.add(raw, ms)?,
        }
        match &change.lease {
            LeaseChange::Keep => {}
            LeaseChange::Clear => {
                record.lease_token = None;
                record.lease_expires_ms = None;
                self.leases.remove(raw)?;
            }
            LeaseChange::Set { token, expires_ms } => {
                record.lease_token = Some(token.clone());
                record.lease_expires_ms = Some(*expires_ms);
                self.leases.add(raw, *expires_ms)?;
            }
            LeaseChange::Extend { expires_ms } => {
                record.lease_expires_ms = Some(*expires_ms);
                self.leases.add(raw, *expires_ms)?;
            }
        }
        if change.to.is_some_and(State::is_terminal) {
            self.retention
                .add(raw, change.at_ms.saturating_add(retention_ms))?;
        }

        let job = record.job_mut()?;
        if let Some(to) = change.to {
            job.state = to.to_proto() as i32;
        }
        if let Some(entry) = &change.history {
            job.history.push(entry.clone());
        }
        if !change.silent {
            job.updated_at = Some(ms_to_timestamp(change.at_ms));
        }
        if let Some(attempt) = change.attempt {
            job.attempt = attempt;
        }
        if let Some(cancel) = change.cancel_requested {
            job.cancel_requested = cancel;
        }
        if let Some(error) = &change.error {
            job.error.clone_from(error);
        }
        if let Some(result) = &change.result {
            job.result = Some(result.clone());
        }
        if change.started {
            job.started_at = Some(ms_to_timestamp(change.at_ms));
        }
        if change.finished {
            job.finished_at = Some(ms_to_timestamp(change.at_ms));
        }
        if let Some(next) = change.next_attempt_ms {
            job.next_attempt_at = next.map(ms_to_timestamp);
        }
        if let Some(worker) = &change.worker_id {
            job.worker_id = worker.clone().unwrap_or_default();
        }
        let job = job.clone();
        self.save(raw, &record)?;
        Ok((Applied::Done(Box::new(job)), true))
    }

    fn claim_due(
        &mut self,
        now_ms: i64,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<(Vec<DueJob>, bool)> {
        let entries = self.due.up_to(now_ms, limit)?;
        let mut claimed = Vec::new();
        for &(_, raw) in &entries {
            let record = load(&self.jobs, raw)?;
            let job = record.as_ref().map(Record::job).transpose()?;
            match job {
                Some(job) if matches!(state_of(job)?, State::Created | State::Retrying) => {
                    claimed.push(DueJob {
                        id: Uuid::from_u128(raw),
                        kind: job.kind.clone(),
                        queue: job.queue.clone(),
                        namespace: job_namespace(job).to_owned(),
                        max_attempts: job.max_attempts,
                        attempt: job.attempt,
                        claim: claim_until_ms,
                    });
                    self.due.add(raw, claim_until_ms)?;
                }
                // Started, finished or gone: nothing left to publish.
                _ => self.due.remove(raw)?,
            }
        }
        let wrote = !entries.is_empty();
        Ok((claimed, wrote))
    }

    fn ack_due(&mut self, acks: &[(Uuid, i64)]) -> Result<((), bool)> {
        let mut wrote = false;
        for &(id, claim) in acks {
            let raw = id.as_u128();
            // Re-scheduled since the claim (or already gone): not ours to drop.
            if self.due.score(raw)? == Some(claim) {
                self.due.remove(raw)?;
                wrote = true;
            }
        }
        Ok(((), wrote))
    }

    fn purge(&mut self, now_ms: i64, limit: usize) -> Result<(usize, bool)> {
        let victims = self.retention.up_to(now_ms, limit)?;
        for &(_, raw) in &victims {
            let removed = self
                .jobs
                .remove(raw)
                .db()?
                .map(|g| decode_record(g.value()));
            if let Some(record) = removed.transpose()? {
                let job = record.job()?;
                for name in index_names(job)? {
                    self.index
                        .remove(index_key(&name, record.ix_ms, raw).as_slice())
                        .db()?;
                }
                let key = idem_key(job_namespace(job), &job.idempotency_key);
                let owner = if job.idempotency_key.is_empty() {
                    None
                } else {
                    self.idem.get(key.as_str()).db()?.map(|g| g.value())
                };
                if owner == Some(raw) {
                    self.idem.remove(key.as_str()).db()?;
                }
            }
            self.retention.remove(raw)?;
            self.due.remove(raw)?;
            self.leases.remove(raw)?;
        }
        let purged = victims.len();
        Ok((purged, purged > 0))
    }
}

fn encode_token(ms: i64, id: u128) -> String {
    let member = format!("{ms:013}:{}", Uuid::from_u128(id));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(member)
}

/// The same token format as the Redis store: base64url of
/// `{created_ms:013}:{id}`.
fn decode_token(token: &str) -> Result<(i64, u128)> {
    let bad = || Error::invalid("page_token", "is not a token returned by ListJobs");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let member = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ms, id) = member.split_once(':').ok_or_else(bad)?;
    if ms.len() != 13 || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let ms: i64 = ms.parse().map_err(|_| bad())?;
    let id = Uuid::try_parse(id).map_err(|_| bad())?;
    Ok((ms, id.as_u128()))
}

/// The index a query reads (the most selective filter, in the same order as
/// the Redis store); the other filters are checked on each job.
fn plan(query: &ListQuery) -> String {
    let ns = crate::validate::namespace_or_default(&query.namespace);
    if let Some(state) = query.state {
        state_index(ns, state)
    } else if let Some(kind) = &query.kind {
        format!("{ns}:kind:{kind}")
    } else if let Some(queue) = &query.queue {
        format!("{ns}:queue:{queue}")
    } else {
        format!("{ns}:all")
    }
}

fn list(txn: &ReadTransaction, query: &ListQuery, cursor: Option<(i64, u128)>) -> Result<Page> {
    let index = txn.open_table(INDEX).db()?;
    let jobs = txn.open_table(JOBS).db()?;
    let name = plan(query);
    let low = index_key(&name, i64::MIN, 0);
    let high = match cursor {
        Some((ms, id)) => Bound::Excluded(index_key(&name, ms, id)),
        None => Bound::Included(index_key(&name, i64::MAX, u128::MAX)),
    };
    let range = (
        Bound::Included(low.as_slice()),
        high.as_ref().map(Vec::as_slice),
    );
    let want = (query.page_size as usize).max(1);
    let mut page = Vec::with_capacity(want.min(64));
    let mut last_returned = None;
    let mut last_scanned = None;
    for (scanned, entry) in index.range::<&[u8]>(range).db()?.rev().enumerate() {
        if scanned == MAX_LIST_SCAN {
            // Entries up to the last scanned one did not match (or filled
            // the page), so the next page starts after it.
            let (ms, id) = last_scanned.unwrap_or_default();
            return Ok(Page {
                jobs: page,
                next_page_token: Some(encode_token(ms, id)),
            });
        }
        let (key, _) = entry.db()?;
        let (ms, id) = parse_index_key(key.value())?;
        last_scanned = Some((ms, id));
        let Some(record) = load(&jobs, id)? else {
            continue;
        };
        let job = record.job()?;
        if !query.matches(job) {
            continue;
        }
        if page.len() == want {
            // Only a match past a full page proves there is a next page, so
            // no token leads to an empty page (short of the scan cap above).
            let (ms, id) = last_returned.unwrap_or_default();
            return Ok(Page {
                jobs: page,
                next_page_token: Some(encode_token(ms, id)),
            });
        }
        page.push(job.clone());
        last_returned = Some((ms, id));
    }
    Ok(Page {
        jobs: page,
        next_page_token: None,
    })
}

#[async_trait]
impl JobStore for EmbeddedStore {
    async fn create(&self, id: Uuid, job: &NewJob, now_ms: i64, due_ms: i64) -> Result<Created> {
        let new = job.clone();
        let created = self
            .write(move |t| t.create(id, &new, now_ms, due_ms))
            .await?;
        if let Created::New(_) = created {
            self.notify(id);
        }
        Ok(created)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>> {
        self.read(move |txn| {
            let jobs = txn.open_table(JOBS).db()?;
            load(&jobs, id.as_u128())?
                .map(|record| record.job().cloned())
                .transpose()
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Page> {
        // A bad token fails before any transaction starts.
        let cursor = query.page_token.as_deref().map(decode_token).transpose()?;
        let query = query.clone();
        self.read(move |txn| list(txn, &query, cursor)).await
    }

    async fn apply(&self, id: Uuid, change: &Change) -> Result<Applied> {
        let silent = change.silent;
        let change = change.clone();
        let retention_ms = self.retention_ms;
        let applied = self
            .write(move |t| t.apply(id, &change, retention_ms))
            .await?;
        if matches!(applied, Applied::Done(_)) && !silent {
            self.notify(id);
        }
        Ok(applied)
    }

    async fn claim_due(
        &self,
        now_ms: i64,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<DueJob>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.write(move |t| t.claim_due(now_ms, claim_until_ms, limit))
            .await
    }

    async fn ack_due(&self, acks: &[(Uuid, i64)]) -> Result<()> {
        if acks.is_empty() {
            return Ok(());
        }
        let acks = acks.to_vec();
        self.write(move |t| t.ack_due(&acks)).await
    }

    async fn expired_leases(&self, now_ms: i64, limit: usize) -> Result<Vec<ExpiredLease>> {
        self.read(move |txn| {
            let leases = txn.open_table(LEASES.by_score).db()?;
            Ok(range_up_to(&leases, now_ms, limit)?
                .into_iter()
                .map(|(expired_ms, id)| ExpiredLease {
                    id: Uuid::from_u128(id),
                    expired_ms,
                })
                .collect())
        })
        .await
    }

    async fn purge_expired(&self, now_ms: i64, limit: usize) -> Result<usize> {
        if limit == 0 {
            return Ok(0);
        }
        self.write(move |t| t.purge(now_ms, limit)).await
    }

    async fn changes(&self, id: Uuid) -> Result<BoxStream<'static, Notice>> {
        Ok(self.changes.watch(id, None))
    }

    async fn namespaces(&self) -> Result<Vec<String>> {
        self.read(|txn| {
            let table = txn.open_table(NAMESPACES).db()?;
            table
                .iter()
                .db()?
                .map(|entry| entry.db().map(|(key, _)| key.value().to_owned()))
                .collect()
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.read(|txn| {
            txn.open_table(JOBS).db()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let id = Uuid::new_v4().as_u128();
        let token = encode_token(1_700_000_000_123, id);
        assert_eq!(decode_token(&token).unwrap(), (1_700_000_000_123, id));
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for bad in [
            "garbage!".to_owned(),
            b64("no colon"),
            b64("123:7f1c0a52-3b1e-4c1a-9d8e-2f6b1c9a0e4d"),
            b64("17000000001x3:7f1c0a52-3b1e-4c1a-9d8e-2f6b1c9a0e4d"),
            b64("1700000000123:not-a-uuid"),
        ] {
            match decode_token(&bad) {
                Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "page_token"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_sparse_filter_stops_at_the_scan_cap_and_resumes() {
        let store = EmbeddedStore::in_memory(Duration::from_secs(60)).unwrap();
        let new = |kind: &str| {
            crate::validate::submit(
                &crate::proto::v1::SubmitJobRequest {
                    kind: kind.into(),
                    ..Default::default()
                },
                &crate::validate::Limits::default(),
            )
            .unwrap()
        };
        let (wanted, noise) = (new("wanted"), new("noise"));
        let target = Uuid::new_v4();
        // One transaction for all of them keeps the test fast.
        let txn = store.db.begin_write().unwrap();
        {
            let mut t = Tables::open(&txn).unwrap();
            t.create(target, &wanted, 1_000, 1_000).unwrap();
            for i in 0..MAX_LIST_SCAN as i64 + 2 {
                t.create(Uuid::new_v4(), &noise, 2_000 + i, 0).unwrap();
            }
        }
        txn.commit().unwrap();

        // CREATED is the index; the kind filter matches only the oldest job.
        let mut query = ListQuery {
            state: Some(State::Created),
            kind: Some("wanted".into()),
            queue: None,
            page_size: 10,
            page_token: None,
            namespace: String::new(),
        };
        let first = store.list(&query).await.unwrap();
        assert!(first.jobs.is_empty(), "the cap ends the page early");
        query.page_token = Some(first.next_page_token.expect("a cursor to resume from"));
        let second = store.list(&query).await.unwrap();
        let ids: Vec<_> = second.jobs.iter().map(|j| j.id.clone()).collect();
        assert_eq!(ids, [target.to_string()]);
        assert_eq!(second.next_page_token, None);
    }

    #[test]
    fn index_keys_sort_by_time_then_id_within_one_contiguous_name_range() {
        let keys = [
            (i64::MIN, 0),
            (-1, u128::MAX),
            (0, 0),
            (0, 1),
            (1_700_000_000_000, 5),
            (i64::MAX, u128::MAX),
        ];
        let encoded: Vec<Vec<u8>> = keys
            .iter()
            .map(|&(ms, id)| index_key("kind:a", ms, id))
            .collect();
        assert!(encoded.windows(2).all(|w| w[0] < w[1]));
        for (want, key) in keys.iter().zip(&encoded) {
            assert_eq!(parse_index_key(key).unwrap(), *want);
        }
        // Names that extend or precede this one never fall inside its range.
        let (low, high) = (&encoded[0], &encoded[encoded.len() - 1]);
        for name in ["kind:", "kind:ab", "kind:b", "kind:A", ""] {
            for (ms, id) in keys {
                let other = index_key(name, ms, id);
                assert!(other < *low || other > *high, "{name:?} {ms} {id}");
            }
        }
    }

    #[test]
    fn uuid_order_as_u128_matches_text_order() {
        let mut ids: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
        ids.sort_by_key(|id| id.as_u128());
        let text: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let mut sorted = text.clone();
        sorted.sort();
        assert_eq!(text, sorted);
    }
}
