//! One suite for every [`JobStore`]: each case is written once against the
//! trait and runs against the Redis store (on a real Redis, under its own
//! key prefix) and against the embedded store (on a file in a temporary
//! directory), so the two cannot drift. Compare-and-set under races, the
//! state indexes, due-set claims and acks, lease expiry and fencing,
//! retention purge with its index cleanup, idempotency keys, pagination and
//! change notifications.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use orchestrator::attempt;
use orchestrator::error::Error;
use orchestrator::job::now_ms;
use orchestrator::proto::v1::SubmitJobRequest;
use orchestrator::state::State;
use orchestrator::store::embedded::EmbeddedStore;
use orchestrator::store::redis::{RedisStore, RedisStoreConfig};
use orchestrator::store::{Applied, Change, Created, Due, JobStore};
use orchestrator::validate::{self, Limits, ListQuery};
use orchestrator_testkit::{shared_redis_url, unique_name};
use uuid::Uuid;

/// Retention of every store under test. Short so that the purge case can
/// step past it; no other case purges.
const RETENTION: Duration = Duration::from_secs(1);

/// Runs `case` on a fresh Redis store under a unique key prefix, then
/// deletes the prefix's keys so the shared Redis does not fill up.
async fn with_redis<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn JobStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut config = RedisStoreConfig::new(shared_redis_url());
    config.prefix = format!("{}:", unique_name("conformance"));
    config.retention = RETENTION;
    let store = RedisStore::new(&config).unwrap();
    case(Arc::new(store.clone())).await;
    store.wipe().await.unwrap();
}

/// Runs `case` on a fresh embedded store in a file of its own.
async fn with_embedded<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn JobStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("jobs.redb"), RETENTION).unwrap();
    case(Arc::new(store)).await;
}

/// Runs `case` on a fresh in-memory embedded store.
async fn with_in_memory<F, Fut>(case: F)
where
    F: FnOnce(Arc<dyn JobStore>) -> Fut,
    Fut: Future<Output = ()>,
{
    case(Arc::new(EmbeddedStore::in_memory(RETENTION).unwrap())).await;
}

/// For every case, a `redis::case` and an `embedded::case` test, and one
/// test that runs them all on the in-memory embedded store.
macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::with_redis(super::$case).await;
                }
            )+
        }

        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::with_embedded(super::$case).await;
                }
            )+
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn in_memory_store_passes_every_case() {
            $( with_in_memory($case).await; )+
        }
    };
}

conformance!(
    case_concurrent_compare_and_set_has_exactly_one_winner,
    case_state_indexes_follow_transitions,
    case_due_entries_are_claimed_by_one_dispatcher_at_a_time,
    case_claims_skip_jobs_that_no_longer_need_a_dispatch,
    case_expired_leases_are_found_and_fenced,
    case_retention_purges_terminal_jobs_with_their_indexes_and_keys,
    case_idempotent_create_returns_the_existing_job,
    case_creating_an_existing_id_is_a_conflict,
    case_list_pages_newest_first_with_combined_filters,
    case_garbage_page_tokens_are_rejected,
    case_changes_yield_after_an_apply,
    case_unknown_ids_are_absent_and_not_found,
    case_namespaces_keep_jobs_indexes_and_keys_apart,
    case_attempt_and_namespace_expectations_guard_a_change,
    case_a_blind_apply_writes_what_apply_writes,
    case_an_apply_without_history_answers_the_job_as_written,
    case_a_failure_decided_before_a_cancel_request_conflicts,
    case_filtered_pages_reach_matches_past_the_first_scan_batch,
);

fn new_job(kind: &str, key: &str) -> orchestrator::job::NewJob {
    validate::submit(
        &SubmitJobRequest {
            kind: kind.into(),
            idempotency_key: key.into(),
            ..Default::default()
        },
        &Limits::default(),
    )
    .unwrap()
}

/// Creates a job at `at_ms` (also its due time) and returns its id, or the
/// id of the job that already holds `key`.
async fn create_at(store: &dyn JobStore, kind: &str, key: &str, at_ms: i64) -> Uuid {
    let id = Uuid::new_v4();
    match store
        .create(id, &new_job(kind, key), at_ms, at_ms)
        .await
        .unwrap()
    {
        Created::New(job) => {
            assert_eq!(job.id, id.to_string());
            id
        }
        Created::Existing(job) => job.id.parse().unwrap(),
    }
}

async fn create(store: &dyn JobStore, kind: &str, key: &str) -> Uuid {
    create_at(store, kind, key, now_ms()).await
}

/// Worker `w` starting `attempt` (of 3) of a dispatched job under lease
/// `token` (30 s), without reading the job.
fn start_of(attempt: u32, token: &str, at_ms: i64) -> Change {
    attempt::start_dispatched(
        attempt::Dispatched {
            attempt,
            max_attempts: 3,
        },
        "w",
        token.into(),
        Duration::from_secs(30),
        at_ms,
    )
    .unwrap()
}

fn cancel(from: State) -> Change {
    Change {
        expect: Some(from),
        to: Some(State::Cancelled),
        at_ms: now_ms(),
        finished: true,
        history: Some(attempt::transition(
            from,
            State::Cancelled,
            now_ms(),
            0,
            "test",
            "",
        )),
        ..Change::default()
    }
}

fn query() -> ListQuery {
    ListQuery {
        state: None,
        kind: None,
        queue: None,
        page_size: 100,
        page_token: None,
        namespace: String::new(),
    }
}

async fn listed_ids(store: &dyn JobStore, q: &ListQuery) -> Vec<String> {
    store
        .list(q)
        .await
        .unwrap()
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect()
}

async fn case_concurrent_compare_and_set_has_exactly_one_winner(store: Arc<dyn JobStore>) {
    let id = create(&*store, "sleep", "").await;
    let tasks = (0..50).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let to = if i % 2 == 0 {
                State::Running
            } else {
                State::Cancelled
            };
            let change = Change {
                expect: Some(State::Created),
                to: Some(to),
                at_ms: now_ms(),
                history: Some(attempt::transition(
                    State::Created,
                    to,
                    now_ms(),
                    0,
                    "race",
                    "",
                )),
                ..Change::default()
            };
            store.apply(id, &change).await.unwrap()
        })
    });
    let results: Vec<Applied> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let winners = results
        .iter()
        .filter(|r| matches!(r, Applied::Done(_)))
        .count();
    assert_eq!(winners, 1);
    for r in &results {
        if let Applied::Conflict {
            actual,
            lease_mismatch,
        } = r
        {
            assert!(matches!(actual, State::Running | State::Cancelled));
            assert!(!lease_mismatch);
        }
    }
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(job.history.len(), 2, "one CREATED entry and one winner");
}

async fn case_state_indexes_follow_transitions(store: Arc<dyn JobStore>) {
    let id = create(&*store, "idx", "").await;
    let by_state = |s: State| ListQuery {
        state: Some(s),
        ..query()
    };
    assert_eq!(
        listed_ids(&*store, &by_state(State::Created)).await,
        [id.to_string()]
    );
    let Applied::Done(job) = store.apply(id, &cancel(State::Created)).await.unwrap() else {
        panic!("cancel applies");
    };
    assert_eq!(job.state, State::Cancelled.to_proto() as i32);
    assert!(job.finished_at.is_some());
    assert_eq!(job.history.len(), 2);
    assert!(
        listed_ids(&*store, &by_state(State::Created))
            .await
            .is_empty()
    );
    assert_eq!(
        listed_ids(&*store, &by_state(State::Cancelled)).await,
        [id.to_string()]
    );
    assert_eq!(
        listed_ids(&*store, &query()).await,
        [id.to_string()],
        "still listed once"
    );
}

async fn case_due_entries_are_claimed_by_one_dispatcher_at_a_time(store: Arc<dyn JobStore>) {
    let mut ids = HashSet::new();
    for _ in 0..40 {
        ids.insert(create(&*store, "due", "").await);
    }
    let now = now_ms() + 1;
    let claims = futures::future::join_all((0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_due(now, now + 60_000, 15).await.unwrap() })
    }))
    .await;
    let claimed: Vec<Uuid> = claims
        .into_iter()
        .flat_map(Result::unwrap)
        .map(|d| d.id)
        .collect();
    let unique: HashSet<Uuid> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "no entry claimed twice");
    assert_eq!(unique, ids, "every due job claimed once");
    // Claimed entries are not due again until the claim runs out.
    assert!(
        store
            .claim_due(now, now + 60_000, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store
        .claim_due(now + 60_001, now + 120_000, 100)
        .await
        .unwrap();
    assert_eq!(again.len(), 40);
    for due in &again {
        assert_eq!(
            (due.kind.as_str(), due.queue.as_str(), due.attempt),
            ("due", "default", 0)
        );
        assert_eq!(due.claim, now + 120_000);
    }
    // An ack with a stale claim leaves a re-scheduled entry alone, in the
    // same call as acks that clear theirs.
    let first = &again[0];
    store
        .ack_due(&[
            (first.id, first.claim - 1),
            (again[1].id, again[1].claim),
            (again[2].id, again[2].claim),
        ])
        .await
        .unwrap();
    store.ack_due(&[]).await.unwrap();
    let left: HashSet<Uuid> = store
        .claim_due(now + 200_000, now + 300_000, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert!(left.contains(&first.id));
    assert!(!left.contains(&again[1].id));
    assert!(!left.contains(&again[2].id));
    assert_eq!(left.len(), 38);
}

async fn case_claims_skip_jobs_that_no_longer_need_a_dispatch(store: Arc<dyn JobStore>) {
    let gone = create(&*store, "gone", "").await;
    let live = create(&*store, "gone", "").await;
    let change = Change {
        due: Due::Keep,
        ..cancel(State::Created)
    };
    assert!(matches!(
        store.apply(gone, &change).await.unwrap(),
        Applied::Done(_)
    ));
    let claimed: Vec<Uuid> = store
        .claim_due(now_ms() + 1, now_ms() + 5000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(claimed, [live]);
    // The cancelled job's entry was dropped, not just skipped.
    let later: Vec<Uuid> = store
        .claim_due(now_ms() + 10_000, now_ms() + 20_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(later, [live]);
}

async fn case_expired_leases_are_found_and_fenced(store: Arc<dyn JobStore>) {
    let id = create(&*store, "lease", "").await;
    let job = store.get(id).await.unwrap().unwrap();
    let now = now_ms();
    let start = attempt::start(
        &job,
        "w1",
        1,
        "tok-1".into(),
        Duration::from_millis(100),
        now,
    )
    .unwrap()
    .unwrap();
    let Applied::Done(running) = store.apply(id, &start).await.unwrap() else {
        panic!("start applies");
    };
    assert_eq!(running.state, State::Running.to_proto() as i32);
    assert_eq!((running.attempt, running.worker_id.as_str()), (1, "w1"));
    assert!(running.started_at.is_some());
    assert!(store.expired_leases(now + 50, 10).await.unwrap().is_empty());
    let expired = store.expired_leases(now + 150, 10).await.unwrap();
    assert_eq!(expired.iter().map(|e| e.id).collect::<Vec<_>>(), [id]);
    assert_eq!(expired[0].expired_ms, now + 100);

    // A report with the wrong token changes nothing.
    let wrong = attempt::complete(&running, "tok-2", Default::default(), now).unwrap();
    assert!(matches!(
        store.apply(id, &wrong).await.unwrap(),
        Applied::Conflict {
            actual: State::Running,
            lease_mismatch: true
        }
    ));
    // The sweeper's change loses to a lease renewed after the expiry it saw.
    let renew = attempt::renew("tok-1", Duration::from_secs(30), now_ms()).unwrap();
    assert!(matches!(
        store.apply(id, &renew).await.unwrap(),
        Applied::Done(_)
    ));
    assert!(
        store
            .expired_leases(now + 150, 10)
            .await
            .unwrap()
            .is_empty(),
        "renewed"
    );
    let lost = attempt::worker_lost(&running, now + 150, &mut rand::rng()).unwrap();
    assert!(matches!(
        store.apply(id, &lost).await.unwrap(),
        Applied::Conflict {
            actual: State::Running,
            lease_mismatch: true
        }
    ));
    // Once it really expired, the sweeper wins and the lease is gone.
    let later = now_ms() + 60_000;
    let lost = attempt::worker_lost(&running, later, &mut rand::rng()).unwrap();
    let Applied::Done(after) = store.apply(id, &lost).await.unwrap() else {
        panic!("sweeper applies");
    };
    assert_eq!(after.state, State::Retrying.to_proto() as i32);
    assert!(after.error.contains("worker lost"));
    assert!(after.worker_id.is_empty());
    assert!(after.next_attempt_at.is_some());
    assert!(store.expired_leases(later, 10).await.unwrap().is_empty());
    // The old attempt's token no longer holds the job.
    let late = attempt::complete(&running, "tok-1", Default::default(), later).unwrap();
    assert!(matches!(
        store.apply(id, &late).await.unwrap(),
        Applied::Conflict {
            actual: State::Retrying,
            lease_mismatch: false
        }
    ));
}

async fn case_retention_purges_terminal_jobs_with_their_indexes_and_keys(store: Arc<dyn JobStore>) {
    let done = create(&*store, "purge", "purge-key").await;
    let live = create(&*store, "purge", "").await;
    assert!(matches!(
        store.apply(done, &cancel(State::Created)).await.unwrap(),
        Applied::Done(_)
    ));
    assert_eq!(
        store.purge_expired(now_ms(), 100).await.unwrap(),
        0,
        "not yet expired"
    );
    let purged = store.purge_expired(now_ms() + 2_000, 100).await.unwrap();
    assert_eq!(purged, 1);
    assert!(store.get(done).await.unwrap().is_none());
    assert!(
        store.get(live).await.unwrap().is_some(),
        "non-terminal jobs stay"
    );
    for q in [
        query(),
        ListQuery {
            kind: Some("purge".into()),
            ..query()
        },
        ListQuery {
            queue: Some("default".into()),
            ..query()
        },
        ListQuery {
            state: Some(State::Cancelled),
            ..query()
        },
    ] {
        let ids = listed_ids(&*store, &q).await;
        assert!(
            !ids.contains(&done.to_string()),
            "{q:?} still lists the purged job"
        );
    }
    assert_eq!(
        store.purge_expired(now_ms() + 2_000, 100).await.unwrap(),
        0,
        "purged once"
    );
    // The idempotency key is free again.
    let reused = create(&*store, "purge", "purge-key").await;
    assert_ne!(reused, done);
}

async fn case_idempotent_create_returns_the_existing_job(store: Arc<dyn JobStore>) {
    let now = now_ms();
    let first = Uuid::new_v4();
    let Created::New(created) = store
        .create(first, &new_job("idem", "key-1"), now, now)
        .await
        .unwrap()
    else {
        panic!("the first create stores a job");
    };
    assert_eq!(created.history.len(), 1);
    assert_eq!(created.state, State::Created.to_proto() as i32);
    assert_eq!(
        Some(&*created),
        store.get(first).await.unwrap().as_ref(),
        "create returns what get reads"
    );

    let second = Uuid::new_v4();
    let again = store
        .create(second, &new_job("idem", "key-1"), now + 5, now + 5)
        .await
        .unwrap();
    let Created::Existing(existing) = again else {
        panic!("the key was used before");
    };
    assert_eq!(existing, created, "the existing job, unchanged");
    assert!(store.get(second).await.unwrap().is_none(), "no second job");
    assert_eq!(listed_ids(&*store, &query()).await, [first.to_string()]);

    // Another key, or none, makes a new job.
    assert_ne!(create(&*store, "idem", "key-2").await, first);
    assert_ne!(create(&*store, "idem", "").await, first);
    assert_eq!(listed_ids(&*store, &query()).await.len(), 3);
}

async fn case_creating_an_existing_id_is_a_conflict(store: Arc<dyn JobStore>) {
    let id = create(&*store, "dup", "").await;
    let now = now_ms();
    match store.create(id, &new_job("dup", ""), now, now).await {
        Err(Error::Conflict(message)) => assert!(message.contains(&id.to_string()), "{message}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        store.get(id).await.unwrap().unwrap().history.len(),
        1,
        "untouched"
    );
}

async fn case_list_pages_newest_first_with_combined_filters(store: Arc<dyn JobStore>) {
    let base = now_ms();
    // Seven matches, interleaved with jobs that match one filter but not
    // the other, so the store must check both.
    let mut matching = Vec::new();
    let mut everything = Vec::new();
    for i in 0..7 {
        let at = base + 10 * i;
        let hit = create_at(&*store, "paged", "", at).await.to_string();
        let other = create_at(&*store, "other", "", at + 1).await.to_string();
        let cancelled = create_at(&*store, "paged", "", at + 2).await;
        assert!(matches!(
            store
                .apply(cancelled, &cancel(State::Created))
                .await
                .unwrap(),
            Applied::Done(_)
        ));
        matching.push(hit.clone());
        everything.extend([hit, other, cancelled.to_string()]);
    }
    matching.reverse();
    everything.reverse();

    let mut q = ListQuery {
        state: Some(State::Created),
        kind: Some("paged".into()),
        page_size: 3,
        ..query()
    };
    let mut pages = Vec::new();
    loop {
        let page = store.list(&q).await.unwrap();
        for job in &page.jobs {
            assert_eq!(
                (job.kind.as_str(), job.state),
                ("paged", State::Created.to_proto() as i32)
            );
        }
        pages.push(page.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>());
        match page.next_page_token {
            Some(token) => q.page_token = Some(token),
            None => break,
        }
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), matching, "newest first, each once");

    // Without filters: all 21 jobs, newest first, across pages of 3.
    let mut q = ListQuery {
        page_size: 3,
        ..query()
    };
    let mut all = Vec::new();
    loop {
        let page = store.list(&q).await.unwrap();
        assert!(page.jobs.len() <= 3);
        all.extend(page.jobs);
        match page.next_page_token {
            Some(token) => q.page_token = Some(token),
            None => break,
        }
    }
    assert_eq!(
        all.into_iter().map(|j| j.id).collect::<Vec<_>>(),
        everything,
        "newest first, each once"
    );

    // One filter alone uses its own index.
    let cancelled = ListQuery {
        state: Some(State::Cancelled),
        ..query()
    };
    assert_eq!(listed_ids(&*store, &cancelled).await.len(), 7);
    let other = ListQuery {
        kind: Some("other".into()),
        queue: Some("default".into()),
        ..query()
    };
    assert_eq!(listed_ids(&*store, &other).await.len(), 7);
    let nowhere = ListQuery {
        queue: Some("nowhere".into()),
        ..query()
    };
    let page = store.list(&nowhere).await.unwrap();
    assert!(page.jobs.is_empty() && page.next_page_token.is_none());
}

async fn case_garbage_page_tokens_are_rejected(store: Arc<dyn JobStore>) {
    create(&*store, "tok", "").await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    for token in [
        "garbage!".to_owned(),
        "garbage".to_owned(),
        b64("hello"),
        b64("42:7f1c0a52-3b1e-4c1a-9d8e-2f6b1c9a0e4d"),
        b64("1700000000000:not-a-uuid"),
    ] {
        let q = ListQuery {
            page_token: Some(token.clone()),
            ..query()
        };
        match store.list(&q).await {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "page_token", "{token}"),
            other => panic!("token {token:?}: expected InvalidArgument, got {other:?}"),
        }
    }
}

async fn case_changes_yield_after_an_apply(store: Arc<dyn JobStore>) {
    let id = create(&*store, "watch", "").await;
    let other = create(&*store, "watch", "").await;
    let mut changes = store.changes(id).await.unwrap();
    assert!(matches!(
        store.apply(other, &cancel(State::Created)).await.unwrap(),
        Applied::Done(_)
    ));
    assert!(matches!(
        store.apply(id, &cancel(State::Created)).await.unwrap(),
        Applied::Done(_)
    ));
    tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .expect("a change notification within 10s")
        .expect("the stream is still open");
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(
        job.state,
        State::Cancelled.to_proto() as i32,
        "the change is visible once notified"
    );
}

async fn case_unknown_ids_are_absent_and_not_found(store: Arc<dyn JobStore>) {
    create(&*store, "known", "").await;
    let missing = Uuid::new_v4();
    assert!(store.get(missing).await.unwrap().is_none());
    assert!(matches!(
        store.apply(missing, &cancel(State::Created)).await.unwrap(),
        Applied::NotFound
    ));
    let unconditional = Change {
        at_ms: now_ms(),
        ..Change::default()
    };
    assert!(matches!(
        store.apply(missing, &unconditional).await.unwrap(),
        Applied::NotFound
    ));
    assert!(
        store.get(missing).await.unwrap().is_none(),
        "apply created nothing"
    );
    store.ack_due(&[(missing, 0)]).await.unwrap();
    store.ping().await.unwrap();
}

#[tokio::test]
async fn embedded_store_keeps_jobs_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/jobs.redb");
    let (id, done, job) = {
        let store = EmbeddedStore::open(&path, Duration::from_secs(3600)).unwrap();
        let id = create_at(&store, "durable", "durable-key", now_ms() - 10).await;
        let done = create_at(&store, "durable", "", now_ms()).await;
        let Applied::Done(_) = store.apply(done, &cancel(State::Created)).await.unwrap() else {
            panic!("cancel applies");
        };
        let job = store.get(id).await.unwrap().unwrap();
        (id, done, job)
        // The store, and with it the database file, is closed here.
    };
    let store = EmbeddedStore::open(&path, Duration::from_secs(3600)).unwrap();
    assert_eq!(store.get(id).await.unwrap(), Some(job));
    let cancelled = store.get(done).await.unwrap().unwrap();
    assert_eq!(cancelled.state, State::Cancelled.to_proto() as i32);
    // Indexes, the due-set, retention and idempotency keys came back too.
    assert_eq!(
        listed_ids(&store, &query()).await,
        [done.to_string(), id.to_string()]
    );
    let claimed: Vec<Uuid> = store
        .claim_due(now_ms() + 1, now_ms() + 1000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(claimed, [id]);
    assert_eq!(create(&store, "durable", "durable-key").await, id);
    assert_eq!(
        store.purge_expired(now_ms() + 7_200_000, 10).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn embedded_store_file_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.redb");
    let _store = EmbeddedStore::open(&path, RETENTION).unwrap();
    match EmbeddedStore::open(&path, RETENTION) {
        Err(Error::Unavailable { service, .. }) => assert_eq!(service, "embedded store"),
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("a second open of the same file succeeded"),
    }
}

#[tokio::test]
async fn in_memory_store_is_private_to_its_instance() {
    let a = EmbeddedStore::in_memory(RETENTION).unwrap();
    let b = EmbeddedStore::in_memory(RETENTION).unwrap();
    let id = create(&a, "mem", "").await;
    assert!(a.get(id).await.unwrap().is_some());
    assert!(b.get(id).await.unwrap().is_none());
    let clone = a.clone();
    assert!(
        clone.get(id).await.unwrap().is_some(),
        "clones share the data"
    );
}

/// Creates a job of `kind` in `namespace` with idempotency `key` and
/// returns what the store answered.
async fn create_in(store: &dyn JobStore, namespace: &str, kind: &str, key: &str) -> Created {
    let mut new = new_job(kind, key);
    new.namespace = namespace.into();
    let now = now_ms();
    store.create(Uuid::new_v4(), &new, now, now).await.unwrap()
}

fn in_namespace(namespace: &str) -> ListQuery {
    ListQuery {
        namespace: namespace.into(),
        ..query()
    }
}

async fn case_namespaces_keep_jobs_indexes_and_keys_apart(store: Arc<dyn JobStore>) {
    // The same idempotency key in two namespaces makes two jobs.
    let Created::New(a) = create_in(&*store, "tenant-a", "work", "same-key").await else {
        panic!("a new job in tenant-a");
    };
    let Created::New(b) = create_in(&*store, "tenant-b", "work", "same-key").await else {
        panic!("the key of tenant-a must not answer for tenant-b");
    };
    assert_ne!(a.id, b.id);
    assert_eq!(
        (a.namespace.as_str(), b.namespace.as_str()),
        ("tenant-a", "tenant-b")
    );
    let Created::Existing(again) = create_in(&*store, "tenant-a", "work", "same-key").await else {
        panic!("the key still answers within its namespace");
    };
    assert_eq!(again.id, a.id);
    let stored = store.get(a.id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(stored.namespace, "tenant-a", "the namespace is stored");

    // Every index is per namespace: no filter reveals the other's job.
    for filter in [
        query(),
        ListQuery {
            kind: Some("work".into()),
            ..query()
        },
        ListQuery {
            queue: Some("default".into()),
            ..query()
        },
        ListQuery {
            state: Some(State::Created),
            ..query()
        },
    ] {
        for (ns, own) in [("tenant-a", &a.id), ("tenant-b", &b.id)] {
            let q = ListQuery {
                namespace: ns.into(),
                page_size: 100,
                ..filter.clone()
            };
            assert_eq!(listed_ids(&*store, &q).await, vec![own.clone()], "{q:?}");
        }
    }
    assert!(
        listed_ids(&*store, &in_namespace("tenant-c"))
            .await
            .is_empty()
    );
    // A transition moves the state index entry within the job's namespace.
    let a_id: Uuid = a.id.parse().unwrap();
    assert!(matches!(
        store.apply(a_id, &cancel(State::Created)).await.unwrap(),
        Applied::Done(_)
    ));
    let cancelled = |ns: &str| ListQuery {
        state: Some(State::Cancelled),
        ..in_namespace(ns)
    };
    assert_eq!(
        listed_ids(&*store, &cancelled("tenant-a")).await,
        vec![a.id.clone()]
    );
    assert!(listed_ids(&*store, &cancelled("tenant-b")).await.is_empty());

    // Dispatch claims carry the namespace, so the message is routed to it.
    let due = store
        .claim_due(now_ms() + 1, now_ms() + 60_000, 100)
        .await
        .unwrap();
    let claimed_b = due
        .iter()
        .find(|d| d.id.to_string() == b.id)
        .expect("b is due");
    assert_eq!(claimed_b.namespace, "tenant-b");

    let namespaces = store.namespaces().await.unwrap();
    assert!(
        namespaces.contains(&"tenant-a".to_owned()) && namespaces.contains(&"tenant-b".to_owned()),
        "{namespaces:?}"
    );

    // Purging a's job frees a's key only.
    assert_eq!(store.purge_expired(now_ms() + 2_000, 100).await.unwrap(), 1);
    let Created::New(reused) = create_in(&*store, "tenant-a", "work", "same-key").await else {
        panic!("the purged job's key is free again in tenant-a");
    };
    assert_ne!(reused.id, a.id);
    let Created::Existing(still_b) = create_in(&*store, "tenant-b", "work", "same-key").await
    else {
        panic!("tenant-b's key is untouched");
    };
    assert_eq!(still_b.id, b.id);
}

/// The blind start of orchd's fast path: a change that expects the attempt
/// (and the namespace) instead of reading the job.
async fn case_attempt_and_namespace_expectations_guard_a_change(store: Arc<dyn JobStore>) {
    let Created::New(job) = create_in(&*store, "tenant-a", "work", "").await else {
        panic!("created");
    };
    let id: Uuid = job.id.parse().unwrap();
    let start = |expect_attempt: u32, namespace: Option<&str>| {
        let mut change = start_of(expect_attempt + 1, "tok", now_ms());
        change.expect_attempt = Some(expect_attempt);
        change.expect_namespace = namespace.map(str::to_owned);
        change
    };
    // Another namespace: answered as if the job did not exist, unchanged.
    assert!(matches!(
        store.apply(id, &start(0, Some("tenant-b"))).await.unwrap(),
        Applied::NotFound
    ));
    // The wrong attempt: a conflict, unchanged.
    assert!(matches!(
        store.apply(id, &start(1, Some("tenant-a"))).await.unwrap(),
        Applied::Conflict {
            actual: State::Created,
            lease_mismatch: false
        }
    ));
    let unchanged = store.get(id).await.unwrap().unwrap();
    assert_eq!((unchanged.attempt, unchanged.history.len()), (0, 1));
    // The right attempt and namespace: started.
    let Applied::Done(started) = store.apply(id, &start(0, Some("tenant-a"))).await.unwrap() else {
        panic!("the blind start applies");
    };
    assert_eq!(started.attempt, 1);
    assert_eq!(
        started.state,
        orchestrator::proto::v1::job::State::Running as i32
    );
    // A second blind start of the same dispatch (a duplicate) conflicts.
    assert!(matches!(
        store.apply(id, &start(0, None)).await.unwrap(),
        Applied::Conflict {
            actual: State::Running,
            ..
        }
    ));
}

async fn case_a_blind_apply_writes_what_apply_writes(store: Arc<dyn JobStore>) {
    let id = create(&*store, "blind", "").await;
    let started_at = now_ms();
    let start = start_of(1, "tok", started_at);
    assert!(matches!(
        store.apply_blind(id, &start).await.unwrap(),
        Applied::Done(())
    ));
    let running = store.get(id).await.unwrap().unwrap();
    assert_eq!(running.state, State::Running.to_proto() as i32);
    assert_eq!((running.attempt, running.worker_id.as_str()), (1, "w"));
    let complete = |lease: &str| {
        let mut result = pbjson_types::Struct::default();
        result.fields.insert(
            "answer".into(),
            pbjson_types::Value {
                kind: Some(pbjson_types::value::Kind::NumberValue(42.0)),
            },
        );
        attempt::complete_attempt(1, "w", lease, result, now_ms()).unwrap()
    };
    // Fenced like apply: another lease conflicts and changes nothing; an
    // unknown job is not found.
    assert!(matches!(
        store.apply_blind(id, &complete("stale")).await.unwrap(),
        Applied::Conflict {
            actual: State::Running,
            lease_mismatch: true
        }
    ));
    assert_eq!(store.get(id).await.unwrap().unwrap(), running);
    assert!(matches!(
        store
            .apply_blind(Uuid::new_v4(), &complete("tok"))
            .await
            .unwrap(),
        Applied::NotFound
    ));
    // Written in full: the fields set and cleared, the history, the
    // indexes and the lease set.
    let done = complete("tok");
    assert!(matches!(
        store.apply_blind(id, &done).await.unwrap(),
        Applied::Done(())
    ));
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, State::Completed.to_proto() as i32);
    assert_eq!(
        job.finished_at,
        Some(orchestrator::job::ms_to_timestamp(done.at_ms))
    );
    assert_eq!(job.result, done.result);
    assert_eq!(job.history.len(), 3);
    assert_eq!(
        listed_ids(
            &*store,
            &ListQuery {
                state: Some(State::Completed),
                ..query()
            }
        )
        .await,
        [id.to_string()]
    );
    assert!(
        !store
            .expired_leases(now_ms() + 3_600_000, 100)
            .await
            .unwrap()
            .iter()
            .any(|lease| lease.id == id),
        "the lease is gone with the attempt"
    );
}

/// The job `store` holds under `id`, without its history.
async fn stored_without_history(store: &dyn JobStore, id: Uuid) -> orchestrator::proto::v1::Job {
    let mut job = store.get(id).await.unwrap().unwrap();
    job.history.clear();
    job
}

async fn case_an_apply_without_history_answers_the_job_as_written(store: Arc<dyn JobStore>) {
    let id = create(&*store, "unhistoried", "").await;
    let start = |attempt: u32, token: &str| start_of(attempt, token, now_ms());
    let answered = |applied: Applied| match applied {
        Applied::Done(job) => *job,
        other => panic!("not written: {other:?}"),
    };
    // A start sets state, attempt, worker, lease and times.
    let first = answered(
        store
            .apply_without_history(id, &start(1, "tok1"))
            .await
            .unwrap(),
    );
    assert!(first.history.is_empty());
    assert_eq!(first, stored_without_history(&*store, id).await);
    assert_eq!(store.get(id).await.unwrap().unwrap().history.len(), 2);
    // A failed attempt sets the error and the next attempt's time and
    // clears the worker and the lease.
    let mut rng = rand::rng();
    let failed = attempt::fail(&first, Some("tok1"), "boom", false, now_ms(), &mut rng).unwrap();
    let retrying = answered(store.apply_without_history(id, &failed).await.unwrap());
    assert_eq!(retrying.state, State::Retrying.to_proto() as i32);
    assert_eq!(
        (retrying.error.as_str(), retrying.worker_id.as_str()),
        ("boom", "")
    );
    assert!(retrying.next_attempt_at.is_some());
    assert_eq!(retrying, stored_without_history(&*store, id).await);
    // The next start clears the next attempt's time, and keeps the error.
    let second = answered(
        store
            .apply_without_history(id, &start(2, "tok2"))
            .await
            .unwrap(),
    );
    assert_eq!((second.attempt, second.next_attempt_at), (2, None));
    assert_eq!(second, stored_without_history(&*store, id).await);
    // Fenced like apply, and nothing changes: a duplicate start conflicts,
    // an unknown job is not found.
    let before = store.get(id).await.unwrap().unwrap();
    assert!(matches!(
        store
            .apply_without_history(id, &start(2, "tok3"))
            .await
            .unwrap(),
        Applied::Conflict {
            actual: State::Running,
            ..
        }
    ));
    assert_eq!(store.get(id).await.unwrap().unwrap(), before);
    assert!(matches!(
        store
            .apply_without_history(Uuid::new_v4(), &start(1, "tok4"))
            .await
            .unwrap(),
        Applied::NotFound
    ));
}

/// A failed attempt's change is decided on a read of the job. A user's
/// cancel written between that read and the write must not be lost to it:
/// the change (in each of the three ways a store applies one) conflicts
/// and writes nothing, and the decision taken on a fresh read cancels.
async fn case_a_failure_decided_before_a_cancel_request_conflicts(store: Arc<dyn JobStore>) {
    let id = create(&*store, "work", "").await;
    let start = start_of(1, "tok", now_ms());
    assert!(matches!(
        store.apply(id, &start).await.unwrap(),
        Applied::Done(_)
    ));
    // The worker's report of a failed attempt, decided on `job`.
    let failed = |job: &orchestrator::proto::v1::Job| {
        attempt::fail(job, Some("tok"), "boom", false, now_ms(), &mut rand::rng()).unwrap()
    };
    let read = store.get(id).await.unwrap().unwrap();
    assert!(!read.cancel_requested);
    let failure = failed(&read);
    assert_eq!(failure.to, Some(State::Retrying));

    let attempt::CancelStep::Apply(cancel) = attempt::user_cancel(&read, None, now_ms()).unwrap()
    else {
        panic!("a running job's cancel is a write");
    };
    assert!(matches!(
        store.apply(id, &cancel).await.unwrap(),
        Applied::Done(_)
    ));
    let requested = store.get(id).await.unwrap().unwrap();
    assert!(requested.cancel_requested);

    let stale = Applied::<()>::Conflict {
        actual: State::Running,
        lease_mismatch: false,
    };
    let outcome = |applied: Applied<()>| format!("{applied:?}");
    assert_eq!(
        outcome(store.apply(id, &failure).await.unwrap().map(drop)),
        outcome(stale.clone())
    );
    assert_eq!(
        outcome(store.apply_blind(id, &failure).await.unwrap()),
        outcome(stale.clone())
    );
    assert_eq!(
        outcome(
            store
                .apply_without_history(id, &failure)
                .await
                .unwrap()
                .map(drop)
        ),
        outcome(stale)
    );
    let unchanged = store.get(id).await.unwrap().unwrap();
    assert_eq!(format!("{unchanged:?}"), format!("{requested:?}"));

    let decided_again = failed(&unchanged);
    let Applied::Done(cancelled) = store
        .apply_without_history(id, &decided_again)
        .await
        .unwrap()
    else {
        panic!("the failure decided on the fresh read applies");
    };
    assert_eq!(
        cancelled.state,
        orchestrator::proto::v1::job::State::Cancelled as i32
    );
}

/// A listing by state and kind reads the state index and filters by kind.
/// With more non-matching jobs in front of the matches than one scan batch
/// holds (50), following the page tokens must still reach every match.
async fn case_filtered_pages_reach_matches_past_the_first_scan_batch(store: Arc<dyn JobStore>) {
    let namespace = unique_name("pages");
    let base = now_ms();
    let create = async |kind: &str, at: i64| {
        let mut new = new_job(kind, "");
        new.namespace = namespace.clone();
        let id = Uuid::new_v4();
        store.create(id, &new, at, at).await.unwrap();
        id.to_string()
    };
    let mut wanted = Vec::new();
    for i in 0..3 {
        wanted.push(create("paged", base + i).await);
    }
    for i in 0..60 {
        create("other", base + 10 + i).await;
    }
    wanted.reverse();

    let mut q = ListQuery {
        state: Some(State::Created),
        kind: Some("paged".into()),
        page_size: 1,
        ..in_namespace(&namespace)
    };
    let mut seen = Vec::new();
    for _ in 0..10 {
        let page = store.list(&q).await.unwrap();
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        match page.next_page_token {
            Some(token) => q.page_token = Some(token),
            None => break,
        }
    }
    assert_eq!(seen, wanted, "every match, newest first, across the pages");
}
