//! The Redis store against a real Redis: compare-and-set under races, the
//! due-set claims, lease expiry, retention purge and its index cleanup.

use std::collections::HashSet;
use std::time::Duration;

use orchestrator::attempt;
use orchestrator::job::now_ms;
use orchestrator::proto::v1::SubmitJobRequest;
use orchestrator::state::State;
use orchestrator::store::redis::{RedisStore, RedisStoreConfig};
use orchestrator::store::{Applied, Change, Created, Due, JobStore};
use orchestrator::validate::{self, Limits, ListQuery};
use orchestrator_testkit::{shared_redis_url, unique_name};
use uuid::Uuid;

fn store(retention: Duration) -> RedisStore {
    let mut config = RedisStoreConfig::new(shared_redis_url());
    config.prefix = format!("{}:", unique_name("store"));
    config.retention = retention;
    RedisStore::new(&config).unwrap()
}

async fn create(store: &RedisStore, kind: &str, key: &str) -> Uuid {
    let new = validate::submit(
        &SubmitJobRequest {
            kind: kind.into(),
            idempotency_key: key.into(),
            ..Default::default()
        },
        &Limits::default(),
    )
    .unwrap();
    let id = Uuid::new_v4();
    let now = now_ms();
    match store.create(id, &new, now, now).await.unwrap() {
        Created::New(job) => {
            assert_eq!(job.id, id.to_string());
            id
        }
        Created::Existing(job) => job.id.parse().unwrap(),
    }
}

fn query() -> ListQuery {
    ListQuery {
        state: None,
        kind: None,
        queue: None,
        page_size: 100,
        page_token: None,
    }
}

#[tokio::test]
async fn concurrent_compare_and_set_has_exactly_one_winner() {
    let store = store(Duration::from_secs(3600));
    let id = create(&store, "sleep", "").await;
    let tasks = (0..50).map(|i| {
        let store = store.clone();
        async move {
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
        }
    });
    let results = futures::future::join_all(tasks).await;
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

#[tokio::test]
async fn state_indexes_follow_transitions() {
    let store = store(Duration::from_secs(3600));
    let id = create(&store, "idx", "").await;
    let by_state = |s: State| ListQuery {
        state: Some(s),
        ..query()
    };
    assert_eq!(
        store
            .list(&by_state(State::Created))
            .await
            .unwrap()
            .jobs
            .len(),
        1
    );
    let change = Change {
        expect: Some(State::Created),
        to: Some(State::Cancelled),
        at_ms: now_ms(),
        ..Change::default()
    };
    assert!(matches!(
        store.apply(id, &change).await.unwrap(),
        Applied::Done(_)
    ));
    assert!(
        store
            .list(&by_state(State::Created))
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
    assert_eq!(
        store
            .list(&by_state(State::Cancelled))
            .await
            .unwrap()
            .jobs
            .len(),
        1
    );
    let missing = Uuid::new_v4();
    assert!(matches!(
        store.apply(missing, &change).await.unwrap(),
        Applied::NotFound
    ));
}

#[tokio::test]
async fn due_entries_are_claimed_by_one_dispatcher_at_a_time() {
    let store = store(Duration::from_secs(3600));
    let mut ids = HashSet::new();
    for _ in 0..40 {
        ids.insert(create(&store, "due", "").await);
    }
    let now = now_ms() + 1;
    let claims = futures::future::join_all((0..4).map(|_| {
        let store = store.clone();
        async move { store.claim_due(now, now + 60_000, 15).await.unwrap() }
    }))
    .await;
    let claimed: Vec<Uuid> = claims.iter().flatten().map(|d| d.id).collect();
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
    // An ack with a stale claim leaves a re-scheduled entry alone.
    let first = &again[0];
    store.ack_due(first.id, first.claim - 1).await.unwrap();
    store.ack_due(again[1].id, again[1].claim).await.unwrap();
    let left: HashSet<Uuid> = store
        .claim_due(now + 200_000, now + 300_000, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert!(left.contains(&first.id));
    assert!(!left.contains(&again[1].id));
}

#[tokio::test]
async fn claims_skip_jobs_that_no_longer_need_a_dispatch() {
    let store = store(Duration::from_secs(3600));
    let id = create(&store, "gone", "").await;
    let change = Change {
        expect: Some(State::Created),
        to: Some(State::Cancelled),
        at_ms: now_ms(),
        due: Due::Keep,
        ..Change::default()
    };
    assert!(matches!(
        store.apply(id, &change).await.unwrap(),
        Applied::Done(_)
    ));
    assert!(
        store
            .claim_due(now_ms() + 1, now_ms() + 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn expired_leases_are_found_and_fenced() {
    let store = store(Duration::from_secs(3600));
    let id = create(&store, "lease", "").await;
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
    assert!(store.expired_leases(now + 50, 10).await.unwrap().is_empty());
    let expired = store.expired_leases(now + 150, 10).await.unwrap();
    assert_eq!(expired.iter().map(|e| e.id).collect::<Vec<_>>(), [id]);

    // A report with the wrong token changes nothing.
    let wrong = attempt::complete(&running, "tok-2", Default::default(), now).unwrap();
    assert!(matches!(
        store.apply(id, &wrong).await.unwrap(),
        Applied::Conflict {
            lease_mismatch: true,
            ..
        }
    ));
    // The sweeper's change loses to a lease renewed after the expiry it saw.
    let renew = attempt::renew("tok-1", Duration::from_secs(30), now_ms());
    assert!(matches!(
        store.apply(id, &renew).await.unwrap(),
        Applied::Done(_)
    ));
    let lost = attempt::worker_lost(&running, now + 150, &mut rand::rng()).unwrap();
    assert!(matches!(
        store.apply(id, &lost).await.unwrap(),
        Applied::Conflict { .. }
    ));
    // Once it really expired, the sweeper wins and the lease is gone.
    let later = now_ms() + 60_000;
    let lost = attempt::worker_lost(&running, later, &mut rand::rng()).unwrap();
    let Applied::Done(after) = store.apply(id, &lost).await.unwrap() else {
        panic!("sweeper applies");
    };
    assert_eq!(after.state, State::Retrying.to_proto() as i32);
    assert!(after.error.contains("worker lost"));
    assert!(store.expired_leases(later, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn retention_purges_terminal_jobs_with_their_indexes_and_keys() {
    let store = store(Duration::from_secs(1));
    let done = create(&store, "purge", "purge-key").await;
    let live = create(&store, "purge", "").await;
    let change = Change {
        expect: Some(State::Created),
        to: Some(State::Cancelled),
        at_ms: now_ms(),
        finished: true,
        ..Change::default()
    };
    assert!(matches!(
        store.apply(done, &change).await.unwrap(),
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
            state: Some(State::Cancelled),
            ..query()
        },
    ] {
        let ids: Vec<String> = store
            .list(&q)
            .await
            .unwrap()
            .jobs
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert!(
            !ids.contains(&done.to_string()),
            "{q:?} still lists the purged job"
        );
    }
    // The idempotency key is free again.
    let reused = create(&store, "purge", "purge-key").await;
    assert_ne!(reused, done);
    store.wipe().await.unwrap();
}
