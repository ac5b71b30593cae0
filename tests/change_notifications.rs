//! Change notifications of the Redis store, on a Redis server of each
//! test's own (so connection counts and CLIENT KILL touch nothing else):
//! writes made in this process reach its watchers as the job written,
//! writes of another replica as a re-read hint over the shared
//! subscription; every watch of a process shares one connection and
//! unsubscribes when its last watcher goes; a killed subscription
//! connection ends the streams and the next watch connects again.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use orchestrator::attempt;
use orchestrator::job::now_ms;
use orchestrator::proto::v1::SubmitJobRequest;
use orchestrator::state::State;
use orchestrator::store::changes::Notice;
use orchestrator::store::redis::{RedisStore, RedisStoreConfig};
use orchestrator::store::{Applied, Change, Created, JobStore};
use orchestrator::validate::{self, Limits};
use orchestrator_testkit::RedisServer;
use uuid::Uuid;

const PREFIX: &str = "notify:";
const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    redis: RedisServer,
    store: RedisStore,
}

async fn setup() -> Setup {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let store = replica(&redis);
    Setup { redis, store }
}

/// Another store on the same Redis and prefix: what a second orchd
/// replica would hold.
fn replica(redis: &RedisServer) -> RedisStore {
    let mut config = RedisStoreConfig::new(redis.url());
    config.prefix = PREFIX.into();
    RedisStore::new(&config).unwrap()
}

async fn create(store: &RedisStore) -> Uuid {
    let new = validate::submit(
        &SubmitJobRequest {
            kind: "noop".into(),
            ..Default::default()
        },
        &Limits::default(),
    )
    .unwrap();
    let id = Uuid::new_v4();
    let now = now_ms();
    match store.create(id, &new, now, now).await.unwrap() {
        Created::New(_) => id,
        Created::Existing(job) => panic!("a fresh id exists already: {}", job.id),
    }
}

fn cancel() -> Change {
    Change {
        expect: Some(State::Created),
        to: Some(State::Cancelled),
        at_ms: now_ms(),
        finished: true,
        history: Some(attempt::transition(
            State::Created,
            State::Cancelled,
            now_ms(),
            0,
            "test",
            "",
        )),
        ..Change::default()
    }
}

async fn next(stream: &mut BoxStream<'static, Notice>) -> Notice {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a notice within 10s")
        .expect("the stream is still open")
}

async fn command<T: redis::FromRedisValue>(redis: &RedisServer, cmd: &mut redis::Cmd) -> T {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// The `CLIENT LIST TYPE pubsub` lines: one per subscription connection.
async fn pubsub_clients(redis: &RedisServer) -> Vec<String> {
    let list: String = command(
        redis,
        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub"),
    )
    .await;
    list.lines().map(str::to_owned).collect()
}

async fn subscribers(redis: &RedisServer, id: Uuid) -> i64 {
    let reply: (String, i64) = command(
        redis,
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("{PREFIX}ev:{id}")),
    )
    .await;
    reply.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_here_reaches_watchers_here_as_the_job_written() {
    let s = setup().await;
    let id = create(&s.store).await;
    let mut changes = s.store.changes(id).await.unwrap();
    assert!(matches!(
        s.store.apply(id, &cancel()).await.unwrap(),
        Applied::Done(_)
    ));
    match next(&mut changes).await {
        Notice::Snapshot(job) => {
            assert_eq!(job.id, id.to_string());
            assert_eq!(job.state, State::Cancelled.to_proto() as i32);
        }
        Notice::Reread => panic!("the writer's own watcher should get the job, not a hint"),
    }
    // The write's PUBLISH comes back on the subscription too; it is this
    // store's own, so it is skipped rather than turned into a re-read.
    let more = tokio::time::timeout(Duration::from_millis(300), changes.next()).await;
    assert!(more.is_err(), "nothing after the snapshot, got {more:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_another_replica_arrives_as_a_reread() {
    let s = setup().await;
    let other = replica(&s.redis);
    let id = create(&s.store).await;
    let mut changes = s.store.changes(id).await.unwrap();
    assert!(matches!(
        other.apply(id, &cancel()).await.unwrap(),
        Applied::Done(_)
    ));
    assert!(matches!(next(&mut changes).await, Notice::Reread));
    let job = s.store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, State::Cancelled.to_proto() as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watch_shares_one_connection_and_the_last_one_unsubscribes() {
    let s = setup().await;
    let before = pubsub_clients(&s.redis).await.len();
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(create(&s.store).await);
    }
    let mut streams = Vec::new();
    for id in &ids {
        streams.push(s.store.changes(*id).await.unwrap());
    }
    // Five more watchers of one job.
    for _ in 0..5 {
        streams.push(s.store.changes(ids[0]).await.unwrap());
    }
    let clients = pubsub_clients(&s.redis).await;
    assert_eq!(
        clients.len(),
        before + 1,
        "45 watches, one subscription connection: {clients:?}"
    );
    assert!(
        clients[0].contains(" sub=40 "),
        "one channel per watched job: {clients:?}"
    );
    assert_eq!(subscribers(&s.redis, ids[0]).await, 1);

    // A change still reaches every watcher of the shared job.
    assert!(matches!(
        s.store.apply(ids[0], &cancel()).await.unwrap(),
        Applied::Done(_)
    ));
    let (shared, _rest) = streams.split_at_mut(1);
    assert!(matches!(next(&mut shared[0]).await, Notice::Snapshot(_)));
    let tail = streams.len() - 5;
    for stream in &mut streams[tail..] {
        assert!(matches!(next(stream).await, Notice::Snapshot(_)));
    }

    // Dropping one of six watchers of a job keeps its channel.
    streams.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(subscribers(&s.redis, ids[0]).await, 1, "five watchers left");
    drop(streams);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left: usize = {
            let mut n = 0;
            for id in &ids {
                n += subscribers(&s.redis, *id).await as usize;
            }
            n
        };
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} channels still subscribed after every watcher left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_ends_the_streams_and_the_next_watch_reconnects() {
    let s = setup().await;
    let id = create(&s.store).await;
    let mut changes = s.store.changes(id).await.unwrap();
    // Fault: the subscription connection is killed under the watcher.
    let killed: i64 = command(
        &s.redis,
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"),
    )
    .await;
    assert_eq!(killed, 1);
    let end = tokio::time::timeout(WAIT, changes.next())
        .await
        .expect("the stream ends within 10s");
    assert!(end.is_none(), "the watcher learns that notices stopped");

    // The next watch connects again, and notices flow.
    let mut again = s.store.changes(id).await.unwrap();
    assert_eq!(pubsub_clients(&s.redis).await.len(), 1);
    let other = replica(&s.redis);
    assert!(matches!(
        other.apply(id, &cancel()).await.unwrap(),
        Applied::Done(_)
    ));
    assert!(matches!(next(&mut again).await, Notice::Reread));
}
