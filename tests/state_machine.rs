//! Property tests of the job state machine as the platform runs it: random
//! sequences of the operations a job goes through (a worker starts an
//! attempt, completes, fails, reports a cancellation or renews its lease,
//! with the right, a stale, a wrong or an empty lease token; the sweeper
//! declares the worker lost; a user cancels; time passes), each computed by
//! the rules of `src/attempt.rs` and applied by a real store's
//! compare-and-set, the in-memory embedded store and the Redis store.
//!
//! After every operation, against a small independent model of what should
//! happen:
//! - the store accepted exactly the operations the model accepts;
//! - a refused operation left the job unchanged, field for field;
//! - an accepted one moved the job along the transition table (or kept its
//!   state), to the state the model predicts; terminal states never change;
//! - the job is well-formed: a real state, attempts within the maximum, a
//!   history whose entries chain and follow the table, `finished_at` exactly
//!   when terminal, `next_attempt_at` exactly when RETRYING, a worker when
//!   RUNNING.
//!
//! The user's cancel is built here as `JobService::cancel` builds it
//! (server/src/service.rs), since that logic lives in the server crate.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use orchestrator::attempt::{self, Refusal};
use orchestrator::error::Error;
use orchestrator::job::job_state;
use orchestrator::proto::v1::{Job, SubmitJobRequest};
use orchestrator::state::{self, State};
use orchestrator::store::embedded::EmbeddedStore;
use orchestrator::store::redis::{RedisStore, RedisStoreConfig};
use orchestrator::store::{Applied, Change, Created, JobStore};
use orchestrator::validate::{self, Limits};
use orchestrator_testkit::{shared_redis_url, unique_name};
use pbjson_types::Struct;
use proptest::collection::vec;
use proptest::prelude::*;
use rand::SeedableRng;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);
const T0: i64 = 1_700_000_000_000;

/// Which lease token a worker report carries.
#[derive(Debug, Clone, Copy)]
enum Token {
    /// The token of the attempt that holds the job.
    Current,
    /// The token of an earlier attempt of this job.
    Stale,
    /// A token this job never had.
    Wrong,
    /// No token at all.
    Empty,
}

/// Which attempt a dispatch message was published for.
#[derive(Debug, Clone, Copy)]
enum Dispatched {
    /// Unknown (0), as from an old publisher.
    Unknown,
    /// The job's next attempt.
    Next,
    /// A late duplicate of an earlier attempt.
    Earlier,
    /// An attempt after the next.
    Later,
}

#[derive(Debug, Clone)]
enum Op {
    Start(Dispatched),
    Complete(Token),
    Fail {
        token: Token,
        permanent: bool,
    },
    Cancelled(Token),
    Renew(Token),
    WorkerLost,
    Cancel,
    /// Milliseconds pass.
    Tick(i64),
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![
        6 => Just(Token::Current),
        1 => Just(Token::Stale),
        1 => Just(Token::Wrong),
        1 => Just(Token::Empty),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let dispatched = prop_oneof![
        Just(Dispatched::Unknown),
        Just(Dispatched::Next),
        Just(Dispatched::Earlier),
        Just(Dispatched::Later),
    ];
    prop_oneof![
        4 => dispatched.prop_map(Op::Start),
        2 => token().prop_map(Op::Complete),
        4 => (token(), prop::bool::weighted(0.2)).prop_map(|(token, permanent)| Op::Fail { token, permanent }),
        1 => token().prop_map(Op::Cancelled),
        2 => token().prop_map(Op::Renew),
        1 => Just(Op::WorkerLost),
        1 => Just(Op::Cancel),
        2 => prop_oneof![1i64..1000, 20_000i64..40_000, 60_000i64..120_000].prop_map(Op::Tick),
    ]
}

/// What the model expects the job to be; the store's job is checked
/// against it.
#[derive(Debug, Clone)]
struct Model {
    state: State,
    attempt: u32,
    max_attempts: u32,
    cancel_requested: bool,
    token: Option<String>,
    lease_expires_ms: i64,
    tokens_issued: u32,
    now: i64,
}

impl Model {
    fn token(&self, which: Token) -> String {
        match which {
            Token::Current => self.token.clone().unwrap_or_else(|| "never-issued".into()),
            Token::Stale if self.tokens_issued > 1 || self.token.is_none() => "lease-1".into(),
            Token::Stale => "lease-0".into(),
            Token::Wrong => "lease-of-another-job".into(),
            Token::Empty => String::new(),
        }
    }

    /// Whether a report carrying `token` holds the lease.
    fn holds(&self, token: &str) -> bool {
        self.state == State::Running && self.token.as_deref() == Some(token)
    }

    /// The state a failed attempt leads to.
    fn after_failure(&self, permanent: bool) -> State {
        if self.cancel_requested {
            State::Cancelled
        } else if permanent || self.attempt >= self.max_attempts {
            State::Failed
        } else {
            State::Retrying
        }
    }
}

/// What an operation did.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Written by the store.
    Applied,
    /// Refused by the rules or by the store's compare-and-set.
    Refused,
    /// Nothing to write (time passing, cancelling a cancelled job).
    NoOp,
}

/// Runs `op` on the job as the platform would: the rules build a change
/// from the job as last read, the store applies it.
async fn step(store: &dyn JobStore, id: Uuid, job: &Job, model: &Model, op: &Op) -> Outcome {
    let now = model.now;
    let mut rng = rand::rngs::StdRng::seed_from_u64(now as u64);
    let current = job_state(job).expect("a stored job has a state");
    let change = match op {
        Op::Tick(_) => Err(Outcome::NoOp),
        Op::Start(dispatched) => {
            let next = job.attempt + 1;
            let dispatched = match dispatched {
                Dispatched::Unknown => 0,
                Dispatched::Next => next,
                Dispatched::Earlier => job.attempt.max(1),
                Dispatched::Later => next + 1,
            };
            let token = format!("lease-{}", model.tokens_issued + 1);
            match attempt::start(job, "w1", dispatched, token, LEASE, now) {
                Ok(Ok(change)) => Ok(change),
                Ok(Err(Refusal::Drop(_))) => Err(Outcome::Refused),
                Err(e) => panic!("start must decide, not fail: {e}"),
            }
        }
        Op::Complete(t) => refused_if_invalid(attempt::complete(
            job,
            &model.token(*t),
            Struct::default(),
            now,
        )),
        Op::Fail { token, permanent } => refused_if_invalid(attempt::fail(
            job,
            Some(&model.token(*token)),
            "boom",
            *permanent,
            now,
            &mut rng,
        )),
        Op::Cancelled(t) => refused_if_invalid(attempt::cancelled(job, &model.token(*t), "", now)),
        Op::Renew(t) => refused_if_invalid(attempt::renew(&model.token(*t), LEASE, now)),
        Op::WorkerLost => Ok(attempt::worker_lost(job, now, &mut rng).expect("worker_lost")),
        Op::Cancel => match attempt::user_cancel(job, Some("alice"), now) {
            Ok(attempt::CancelStep::Apply(change)) => Ok(*change),
            Ok(attempt::CancelStep::Nothing) => Err(Outcome::NoOp),
            Err(Error::FailedPrecondition { .. }) => Err(Outcome::Refused),
            Err(e) => panic!("cancel: {e}"),
        },
    };
    let change = match change {
        Ok(change) => change,
        Err(outcome) => return outcome,
    };
    match store.apply(id, &change).await.expect("apply") {
        Applied::Done(_) => Outcome::Applied,
        Applied::Conflict { actual, .. } => {
            assert_eq!(actual, current, "a conflict reports the state it saw");
            Outcome::Refused
        }
        Applied::NotFound => panic!("the job vanished"),
    }
}

fn refused_if_invalid(change: orchestrator::Result<Change>) -> Result<Change, Outcome> {
    match change {
        Ok(change) => Ok(change),
        Err(Error::InvalidArgument { field, .. }) if field == "lease_token" => {
            Err(Outcome::Refused)
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// What the model says `op` does: the state the job moves to (or stays
/// in) when the store must apply it, `None` when it must be refused or
/// write nothing; and the model afterwards.
fn expect(model: &Model, op: &Op) -> (Option<State>, Model) {
    let mut after = model.clone();
    let s = model.state;
    let holds = |t: &Token| model.holds(&model.token(*t));
    let next = match op {
        Op::Tick(ms) => {
            after.now += ms;
            None
        }
        Op::Start(d) => {
            let fresh = matches!(d, Dispatched::Unknown | Dispatched::Next)
                || (matches!(d, Dispatched::Earlier) && model.attempt == 0);
            (matches!(s, State::Created | State::Retrying) && fresh).then_some(State::Running)
        }
        Op::Complete(t) => holds(t).then_some(State::Completed),
        Op::Fail { token, permanent } => holds(token).then(|| model.after_failure(*permanent)),
        Op::Cancelled(t) => holds(t).then_some(State::Cancelled),
        Op::Renew(t) => holds(t).then_some(State::Running),
        Op::WorkerLost => (s == State::Running && model.lease_expires_ms <= model.now)
            .then(|| model.after_failure(false)),
        Op::Cancel => match s {
            State::Created | State::Retrying => Some(State::Cancelled),
            State::Running if !model.cancel_requested => Some(State::Running),
            _ => None,
        },
    };
    let Some(next) = next else {
        return (None, after);
    };
    match op {
        Op::Start(_) => {
            after.attempt += 1;
            after.tokens_issued += 1;
            after.token = Some(format!("lease-{}", after.tokens_issued));
            after.lease_expires_ms = model.now + LEASE.as_millis() as i64;
        }
        Op::Renew(_) => after.lease_expires_ms = model.now + LEASE.as_millis() as i64,
        Op::Cancel if s == State::Running => after.cancel_requested = true,
        _ => {}
    }
    if next != State::Running {
        after.token = None;
    }
    after.state = next;
    (Some(next), after)
}

/// The job is well-formed on its own.
fn check_job(job: &Job) {
    let state = job_state(job).expect("a real state");
    assert!(
        job.attempt <= job.max_attempts,
        "attempt {} of {}",
        job.attempt,
        job.max_attempts
    );
    assert_eq!(
        job.finished_at.is_some(),
        state.is_terminal(),
        "finished_at in {state}"
    );
    assert_eq!(
        job.next_attempt_at.is_some(),
        state == State::Retrying,
        "next_attempt_at in {state}"
    );
    if state == State::Running {
        assert!(!job.worker_id.is_empty(), "a running job has a worker");
    }
    let first = job.history.first().expect("a history");
    assert_eq!(
        (first.from, first.to),
        (0, State::Created.to_proto() as i32)
    );
    let mut at = State::Created;
    for entry in &job.history[1..] {
        let from = State::from_proto(entry.from.try_into().unwrap()).unwrap();
        let to = State::from_proto(entry.to.try_into().unwrap()).unwrap();
        assert_eq!(from, at, "history entries chain");
        assert!(
            state::check(from, to).is_ok() || (from, to) == (State::Running, State::Running),
            "history entry {from} -> {to} is not in the table"
        );
        at = to;
    }
    assert_eq!(at, state, "the history ends in the job's state");
}

async fn run(store: Arc<dyn JobStore>, max_attempts: u32, ops: Vec<Op>) {
    let spec = SubmitJobRequest {
        kind: "sleep".into(),
        max_attempts,
        ..SubmitJobRequest::default()
    };
    let new = validate::submit(&spec, &Limits::default()).unwrap();
    let id = Uuid::new_v4();
    let Created::New(job) = store.create(id, &new, T0, T0).await.unwrap() else {
        panic!("a fresh id is new")
    };
    let mut job = *job;
    let mut model = Model {
        state: State::Created,
        attempt: 0,
        max_attempts,
        cancel_requested: false,
        token: None,
        lease_expires_ms: 0,
        tokens_issued: 0,
        now: T0,
    };
    check_job(&job);
    for (i, op) in ops.iter().enumerate() {
        let before = job.clone();
        let from = job_state(&before).unwrap();
        let (want, after) = expect(&model, op);
        let outcome = step(store.as_ref(), id, &before, &model, op).await;
        job = store.get(id).await.unwrap().expect("the job exists");
        let to = job_state(&job).unwrap();
        let context = format!("op {i} {op:?} on {from} (model {model:?})");
        match (&outcome, want) {
            (Outcome::Applied, Some(state)) => {
                assert_eq!(to, state, "{context}");
                assert!(!from.is_terminal(), "{context}: a terminal state changed");
                assert!(
                    from == to || state::check(from, to).is_ok(),
                    "{context}: {from} -> {to} is not in the table"
                );
            }
            (Outcome::Refused | Outcome::NoOp, None) => {
                assert_eq!(job, before, "{context}: refused, yet the job changed");
            }
            (got, want) => panic!("{context}: the store said {got:?}, the model expects {want:?}"),
        }
        model = after;
        check_job(&job);
    }
}

/// One runtime and one store of each kind for all cases (an embedded
/// store takes a moment to create, and the Redis store's connection lives
/// on the runtime that made it); every case works on a job of its own.
struct Stores {
    runtime: tokio::runtime::Runtime,
    embedded: Arc<dyn JobStore>,
    redis: OnceLock<RedisStore>,
}

fn stores() -> &'static Stores {
    static STORES: OnceLock<Stores> = OnceLock::new();
    STORES.get_or_init(|| Stores {
        runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap(),
        embedded: Arc::new(EmbeddedStore::in_memory(Duration::from_secs(3600)).unwrap()),
        redis: OnceLock::new(),
    })
}

fn redis() -> RedisStore {
    let stores = stores();
    stores
        .redis
        .get_or_init(|| {
            let mut config = RedisStoreConfig::new(shared_redis_url());
            config.prefix = format!("{}:", unique_name("props"));
            let _guard = stores.runtime.enter();
            RedisStore::new(&config).unwrap()
        })
        .clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn embedded_store_follows_the_state_machine(max_attempts in 1u32..=4, ops in vec(op(), 1..40)) {
        let stores = stores();
        stores.runtime.block_on(run(stores.embedded.clone(), max_attempts, ops));
    }

    #[test]
    fn redis_store_follows_the_state_machine(max_attempts in 1u32..=4, ops in vec(op(), 1..40)) {
        let store = redis();
        // No wipe per case: SCAN-based, it costs the whole keyspace of the
        // shared Redis every time; the run's few thousand keys stay under
        // its unique prefix.
        stores().runtime.block_on(run(Arc::new(store.clone()), max_attempts, ops));
    }
}
