//! Micro-benchmarks (criterion) of the hot paths of one job's life:
//!
//! - `state`: the transition table check and the attempt rules that build
//!   each store change (start, retry after a failure);
//! - `job`: a realistic job (payload, labels, retry policy, a history of
//!   four transitions) encoded and decoded as JSON (pbjson, what REST
//!   answers) and as protobuf (prost, what gRPC answers and the stores
//!   keep), and a REST submit body decoded and validated;
//! - `redis`: round trips of the Redis store's compare-and-set script
//!   (`RedisStore::apply`): a state change (start and fail, alternately), a
//!   lease renewal, a refused change, and a read.
//!
//! The Redis group uses `ORCH_TEST_REDIS_URL` when set, otherwise starts a
//! private `redis-server` with the testkit, and is skipped with a message
//! when neither works. `bench/micro.sh` runs everything and writes a table.
//! Under `cargo test --benches` each benchmark runs once, as a smoke test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use orchestrator::attempt;
use orchestrator::proto::v1::{Job, SubmitJobRequest};
use orchestrator::state::{self, State};
use orchestrator::store::redis::{RedisStore, RedisStoreConfig};
use orchestrator::store::{Applied, Change, Created, JobStore};
use orchestrator::validate::{self, Limits};
use prost::Message;
use rand::SeedableRng;
use uuid::Uuid;

const NOW: i64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(30);

/// A submit body of the size and shape of a typical job.
const SUBMIT_BODY: &str = r#"{
  "kind": "thumbnail",
  "queue": "media",
  "maxAttempts": 5,
  "payload": {
    "source": "s3://uploads/2024/05/17/3f9a2c1e-photo.jpg",
    "sizes": [64, 128, 256, 512],
    "options": {"format": "webp", "quality": 0.82, "strip_metadata": true},
    "user_id": 482913,
    "callback": "https://api.example.invalid/hooks/thumbnails"
  },
  "labels": {"team": "media", "tier": "standard", "origin": "upload-api"},
  "idempotencyKey": "upload-3f9a2c1e",
  "timeout": "120s",
  "retry": {"initialBackoff": "0.5s", "multiplier": 2.0, "maxBackoff": "60s"}
}"#;

/// The job stored from [`SUBMIT_BODY`] after two attempts: it failed once,
/// and runs again.
fn realistic_job() -> Job {
    let request: SubmitJobRequest = validate::json_body(SUBMIT_BODY.as_bytes()).unwrap();
    let new = validate::submit(&request, &Limits::default()).unwrap();
    let mut job = new.to_job("3f9a2c1e-0b7d-4d2e-9c41-5a8f6e2d1b07", NOW);
    job.history.push(new.created_transition(NOW));
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let steps: [fn(&Job, &mut rand::rngs::StdRng) -> Change; 2] = [
        |job, _| {
            attempt::start(job, "worker-7", 0, "lease-1".into(), LEASE, NOW + 10)
                .unwrap()
                .unwrap()
        },
        |job, rng| {
            attempt::fail(
                job,
                Some("lease-1"),
                "connection reset by peer",
                false,
                NOW + 900,
                rng,
            )
            .unwrap()
        },
    ];
    for step in steps.iter().chain(&steps[..1]) {
        let change = step(&job, &mut rng);
        apply_locally(&mut job, &change);
    }
    job
}

/// Enough of a store's apply to build the benchmark job without one.
fn apply_locally(job: &mut Job, change: &Change) {
    if let Some(to) = change.to {
        job.state = to.to_proto() as i32;
    }
    if let Some(entry) = &change.history {
        job.history.push(entry.clone());
    }
    if let Some(attempt) = change.attempt {
        job.attempt = attempt;
    }
    if let Some(error) = &change.error {
        job.error.clone_from(error);
    }
    if let Some(worker) = &change.worker_id {
        job.worker_id = worker.clone().unwrap_or_default();
    }
    job.updated_at = Some(orchestrator::job::ms_to_timestamp(change.at_ms));
}

fn state_machine(c: &mut Criterion) {
    let mut group = c.benchmark_group("state");
    group.bench_function("check_all_36_pairs", |b| {
        b.iter(|| {
            let mut allowed = 0;
            for from in State::ALL {
                for to in State::ALL {
                    allowed += usize::from(state::check(black_box(from), black_box(to)).is_ok());
                }
            }
            allowed
        })
    });
    let mut retrying = realistic_job();
    retrying.state = State::Retrying.to_proto() as i32;
    group.bench_function("attempt_start", |b| {
        b.iter(|| {
            attempt::start(
                black_box(&retrying),
                "worker-7",
                0,
                "lease-2".into(),
                LEASE,
                NOW,
            )
            .unwrap()
            .unwrap()
        })
    });
    let running = realistic_job();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    group.bench_function("attempt_fail_and_retry", |b| {
        b.iter(|| {
            attempt::fail(
                black_box(&running),
                Some("lease-1"),
                "boom",
                false,
                NOW,
                &mut rng,
            )
            .unwrap()
        })
    });
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let job = realistic_job();
    let json = serde_json::to_vec(&job).unwrap();
    let protobuf = job.encode_to_vec();
    let mut group = c.benchmark_group("job");
    group.bench_function("json_encode", |b| {
        b.iter(|| serde_json::to_vec(black_box(&job)).unwrap())
    });
    group.bench_function("json_decode", |b| {
        b.iter(|| serde_json::from_slice::<Job>(black_box(&json)).unwrap())
    });
    group.bench_function("protobuf_encode", |b| {
        b.iter(|| black_box(&job).encode_to_vec())
    });
    group.bench_function("protobuf_decode", |b| {
        b.iter(|| Job::decode(black_box(protobuf.as_slice())).unwrap())
    });
    group.bench_function("rest_submit_decode_and_validate", |b| {
        b.iter(|| {
            let request: SubmitJobRequest =
                validate::json_body(black_box(SUBMIT_BODY.as_bytes())).unwrap();
            validate::submit(&request, &Limits::default()).unwrap()
        })
    });
    group.finish();
    println!(
        "job sizes: JSON {} bytes, protobuf {} bytes",
        json.len(),
        protobuf.len()
    );
}

/// A Redis to measure against, and the private server when one was
/// started (kept alive as long as the value).
fn redis_url() -> Option<(String, Option<orchestrator_testkit::RedisServer>)> {
    if let Ok(url) = std::env::var(orchestrator_testkit::REDIS_URL_ENV)
        && !url.trim().is_empty()
    {
        return Some((url, None));
    }
    let started = std::panic::catch_unwind(orchestrator_testkit::RedisServer::start);
    match started {
        Ok(server) => Some((server.url(), Some(server))),
        Err(_) => None,
    }
}

fn redis_round_trips(c: &mut Criterion) {
    let Some((url, _server)) = redis_url() else {
        eprintln!(
            "redis benchmarks skipped: {} is not set and no redis-server could be started \
             (scripts/install-deps.sh installs one)",
            orchestrator_testkit::REDIS_URL_ENV
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut config = RedisStoreConfig::new(url);
    config.prefix = format!("{}:", orchestrator_testkit::unique_name("bench"));
    let store = {
        let _guard = rt.enter();
        RedisStore::new(&config).unwrap()
    };
    if let Err(e) = rt.block_on(store.ping()) {
        eprintln!("redis benchmarks skipped: {e}");
        return;
    }
    let request: SubmitJobRequest = validate::json_body(SUBMIT_BODY.as_bytes()).unwrap();
    let mut new = validate::submit(&request, &Limits::default()).unwrap();
    new.idempotency_key.clear();
    new.max_attempts = orchestrator::job::MAX_ATTEMPTS_LIMIT;
    let create = |store: RedisStore| {
        let new = new.clone();
        async move {
            let id = Uuid::new_v4();
            match store.create(id, &new, NOW, NOW).await.unwrap() {
                Created::New(job) => (id, *job),
                Created::Existing(_) => unreachable!("no idempotency key"),
            }
        }
    };

    let mut group = c.benchmark_group("redis");
    // A state change per iteration: start (CREATED/RETRYING -> RUNNING) and
    // fail (RUNNING -> RETRYING) in turn, each one script round trip that
    // checks the state and lease, writes the job, appends the history and
    // moves the indexes, due-set and lease entries. Only the applies are
    // timed; a job whose attempts run out is replaced untimed.
    group.bench_function("apply_state_change", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let store = store.clone();
            async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(3);
                let (mut id, mut job) = create(store.clone()).await;
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let running = job.state == State::Running.to_proto() as i32;
                    if !running && job.attempt >= job.max_attempts {
                        (id, job) = create(store.clone()).await;
                    }
                    let change = if running {
                        attempt::fail(&job, Some("lease"), "boom", false, NOW, &mut rng).unwrap()
                    } else {
                        attempt::start(&job, "w", 0, "lease".into(), LEASE, NOW)
                            .unwrap()
                            .unwrap()
                    };
                    let started = Instant::now();
                    let applied = store.apply(id, &change).await.unwrap();
                    spent += started.elapsed();
                    let Applied::Done(after) = applied else {
                        panic!("the change must apply: {applied:?}")
                    };
                    job = *after;
                }
                spent
            }
        })
    });

    let (running_id, _) = rt.block_on(async {
        let (id, job) = create(store.clone()).await;
        let change = attempt::start(&job, "w", 0, "lease".into(), LEASE, NOW)
            .unwrap()
            .unwrap();
        let Applied::Done(job) = store.apply(id, &change).await.unwrap() else {
            panic!("start must apply")
        };
        (id, *job)
    });
    // A heartbeat: same script, RUNNING -> RUNNING, the lease extended,
    // answered three ways: the job read back after the write (`apply`); the
    // job built from the fields the script reads first, without its history
    // (`apply_without_history`, what a basic StartAttempt costs); nothing
    // (`apply_blind`, what a basic completion costs).
    for name in [
        "apply_lease_renewal",
        "apply_lease_renewal_without_history",
        "apply_lease_renewal_blind",
    ] {
        group.bench_function(name, |b| {
            let change = attempt::renew("lease", LEASE, NOW).unwrap();
            b.to_async(&rt).iter(|| {
                let store = store.clone();
                let change = change.clone();
                async move {
                    let written = match name {
                        "apply_lease_renewal_blind" => matches!(
                            store.apply_blind(running_id, &change).await.unwrap(),
                            Applied::Done(())
                        ),
                        "apply_lease_renewal_without_history" => matches!(
                            store
                                .apply_without_history(running_id, &change)
                                .await
                                .unwrap(),
                            Applied::Done(_)
                        ),
                        _ => matches!(
                            store.apply(running_id, &change).await.unwrap(),
                            Applied::Done(_)
                        ),
                    };
                    assert!(written);
                }
            })
        });
    }
    // A compare-and-set that loses: the script reads and refuses.
    group.bench_function("apply_refused", |b| {
        let change = Change {
            expect: Some(State::Created),
            to: Some(State::Cancelled),
            at_ms: NOW,
            ..Change::default()
        };
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let change = change.clone();
            async move {
                assert!(matches!(
                    store.apply(running_id, &change).await.unwrap(),
                    Applied::Conflict { .. }
                ));
            }
        })
    });
    group.bench_function("get", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            async move { store.get(running_id).await.unwrap().unwrap() }
        })
    });
    group.finish();
    rt.block_on(store.wipe()).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = state_machine, encoding, redis_round_trips
}
criterion_main!(benches);
