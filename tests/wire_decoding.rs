//! Property tests of the two decode paths that take bytes from outside: the
//! REST submit body (JSON in the proto3 mapping, then validation) and the
//! AMQP dispatch message (protobuf). Every property feeds its inputs to the
//! fuzz target bodies (`fuzz/src/lib.rs`, included below), which assert that
//! any input is either rejected with an error naming a field or accepted and
//! round-trips unchanged, and that nothing panics. The generators here aim
//! at the interesting parts of the input space (real field names, durations,
//! nested payloads, valid messages with a few bytes changed), where the
//! fuzzers start from bytes.
//!
//! `fuzz_corpus_replays` runs the same bodies on stable over the committed
//! seeds and regressions (`fuzz/seeds/`) and over random mutations of them:
//! `ORCH_FUZZ_ITERATIONS` (default 2000) mutations per target, from
//! `ORCH_FUZZ_SEED` (default: random, printed). `scripts/fuzz.sh` uses it as
//! its fallback when cargo-fuzz cannot run.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

use orchestrator::proto::v1::{DispatchMessage, RetryPolicy, SubmitJobRequest};
use orchestrator::queue::message;
use pbjson_types::value::Kind;
use proptest::collection::{btree_map, hash_map, vec};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use targets::Outcome;
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A name that may or may not pass the kind/queue rule.
fn name_like() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z][a-z0-9._-]{0,70}".prop_map(Value::String),
        "[A-Za-z0-9 ./_é-]{0,10}".prop_map(Value::String),
        json_value(),
    ]
}

/// A duration in the proto3 JSON form, well-formed or not.
fn duration_like() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0i64..1_000_000).prop_map(|s| json!(format!("{s}s"))),
        (any::<i64>(), 0u32..1_000_000_000).prop_map(|(s, n)| json!(format!("{s}.{n:09}s"))),
        "-?[0-9]{0,20}(\\.[0-9+-]{0,11})?[sm]?".prop_map(Value::String),
        json_value(),
    ]
}

/// A number as proto3 JSON may carry it: a number, or a string.
fn number_like() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u32..=200).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop_oneof![
            Just("NaN"),
            Just("Infinity"),
            Just("-Infinity"),
            Just("1e400"),
            Just("2.5"),
            Just("07"),
            Just("")
        ]
        .prop_map(Value::from),
        "[0-9]{1,12}".prop_map(Value::String),
        json_value(),
    ]
}

/// A submit body: the request's real fields (in both spellings) with
/// plausible and implausible values, and now and then a stray field.
/// Also says whether the body holds nothing but a good kind.
fn submit_body() -> impl Strategy<Value = (Value, bool)> {
    let retry = btree_map(
        prop_oneof![
            Just("initialBackoff"),
            Just("initial_backoff"),
            Just("maxBackoff"),
            Just("max_backoff"),
            Just("multiplier"),
            Just("jitter"),
        ],
        prop_oneof![duration_like(), number_like()],
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    let labels = btree_map("[a-z./_-]{0,8}|\\PC{0,4}", "\\PC{0,8}", 0..4).prop_map(|m| json!(m));
    let field = prop_oneof![
        name_like().prop_map(|v| ("kind", v)),
        name_like().prop_map(|v| ("queue", v)),
        number_like().prop_map(|v| ("maxAttempts", v)),
        number_like().prop_map(|v| ("max_attempts", v)),
        json_value().prop_map(|v| ("payload", v)),
        labels.prop_map(|v| ("labels", v)),
        "\\PC{0,10}|[\\x00-\\x1f]".prop_map(|s| ("idempotencyKey", json!(s))),
        duration_like().prop_map(|v| ("timeout", v)),
        retry.prop_map(|v| ("retry", v)),
        json_value().prop_map(|v| ("colour", v)),
    ];
    ("[a-z][a-z0-9._-]{0,10}", vec(field, 0..8)).prop_map(|(kind, fields)| {
        let only_kind = fields.is_empty();
        let mut body = Map::new();
        body.insert("kind".into(), json!(kind));
        for (k, v) in fields {
            body.insert(k.into(), v);
        }
        (Value::Object(body), only_kind)
    })
}

/// A payload value, any number included (NaN and infinities can come over
/// gRPC), nested a few levels.
fn payload_value(finite: bool) -> impl Strategy<Value = pbjson_types::Value> {
    let number = if finite {
        (-1e15f64..1e15).boxed()
    } else {
        any::<f64>().boxed()
    };
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        number.prop_map(Kind::NumberValue),
        "\\PC{0,12}".prop_map(Kind::StringValue),
    ]
    .prop_map(|kind| pbjson_types::Value { kind: Some(kind) });
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(|values| pbjson_types::Value {
                kind: Some(Kind::ListValue(pbjson_types::ListValue { values }))
            }),
            hash_map("\\PC{0,8}", inner, 0..5).prop_map(|fields| pbjson_types::Value {
                kind: Some(Kind::StructValue(pbjson_types::Struct { fields }))
            }),
        ]
    })
}

fn payload(finite: bool) -> impl Strategy<Value = Option<pbjson_types::Struct>> {
    proptest::option::of(
        hash_map("\\PC{0,8}", payload_value(finite), 0..5)
            .prop_map(|fields| pbjson_types::Struct { fields }),
    )
}

fn proto_duration() -> impl Strategy<Value = Option<pbjson_types::Duration>> {
    proptest::option::of(prop_oneof![
        (0i64..700_000, 0i32..1_000_000_000),
        (any::<i64>(), any::<i32>()),
    ])
    .prop_map(|d| d.map(|(seconds, nanos)| pbjson_types::Duration { seconds, nanos }))
}

/// A submit request as a gRPC client could send it: any field values.
fn any_submit_request() -> impl Strategy<Value = SubmitJobRequest> {
    (
        prop_oneof!["[a-z][a-z0-9._-]{0,70}", any::<String>()],
        prop_oneof![
            Just(String::new()),
            "[a-z][a-z0-9._-]{0,10}",
            any::<String>()
        ],
        prop_oneof![0u32..=110, any::<u32>()],
        proptest::option::of((proto_duration(), any::<f64>(), proto_duration())),
        payload(false),
        hash_map("[a-zA-Z0-9./_ -]{0,10}", "\\PC{0,10}", 0..4),
        prop_oneof!["\\PC{0,20}", any::<String>()],
        proto_duration(),
    )
        .prop_map(
            |(kind, queue, max_attempts, retry, payload, labels, idempotency_key, timeout)| {
                SubmitJobRequest {
                    kind,
                    payload,
                    queue,
                    max_attempts,
                    retry: retry.map(|(initial_backoff, multiplier, max_backoff)| RetryPolicy {
                        initial_backoff,
                        multiplier,
                        max_backoff,
                    }),
                    labels,
                    idempotency_key,
                    timeout,
                    namespace: String::new(),
                }
            },
        )
}

fn valid_duration(max_secs: u64) -> impl Strategy<Value = pbjson_types::Duration> {
    (0..max_secs, 0i32..1_000_000_000).prop_map(|(s, n)| pbjson_types::Duration {
        seconds: s as i64,
        nanos: n,
    })
}

/// A submit request that validation must accept.
fn valid_submit_request() -> impl Strategy<Value = SubmitJobRequest> {
    let retry =
        (1u64..3600, 1.0f64..=100.0, 0u64..3600).prop_map(|(initial, multiplier, extra)| {
            RetryPolicy {
                initial_backoff: Some(pbjson_types::Duration {
                    seconds: initial as i64,
                    nanos: 0,
                }),
                multiplier,
                max_backoff: Some(pbjson_types::Duration {
                    seconds: (initial + extra) as i64,
                    nanos: 0,
                }),
            }
        });
    (
        "[a-z][a-z0-9._-]{0,63}",
        prop_oneof![Just(String::new()), "[a-z][a-z0-9._-]{0,63}"],
        0u32..=100,
        proptest::option::of(retry),
        payload(true),
        hash_map("[a-zA-Z0-9./_-]{1,63}", "\\PC{0,40}", 0..8),
        "[^\\p{Cc}]{0,40}",
        proptest::option::of(valid_duration(7 * 24 * 3600)).prop_map(|d| {
            d.map(|mut d| {
                if d.seconds == 0 && d.nanos == 0 {
                    d.nanos = 1;
                }
                d
            })
        }),
    )
        .prop_map(
            |(kind, queue, max_attempts, retry, payload, labels, idempotency_key, timeout)| {
                SubmitJobRequest {
                    kind,
                    payload,
                    queue,
                    max_attempts,
                    retry,
                    labels,
                    idempotency_key,
                    timeout,
                    namespace: String::new(),
                }
            },
        )
}

fn timestamp() -> impl Strategy<Value = Option<pbjson_types::Timestamp>> {
    proptest::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| pbjson_types::Timestamp { seconds, nanos }),
    )
}

fn dispatch() -> impl Strategy<Value = (DispatchMessage, Uuid)> {
    (
        any::<u128>(),
        any::<bool>(),
        any::<String>(),
        any::<String>(),
        any::<u32>(),
        timestamp(),
        any::<String>(),
        any::<u32>(),
    )
        .prop_map(
            |(raw, upper, kind, queue, attempt, published_at, namespace, max_attempts)| {
                let id = Uuid::from_u128(raw);
                let text = id.hyphenated().to_string();
                let job_id = if upper { text.to_uppercase() } else { text };
                (
                    DispatchMessage {
                        job_id,
                        kind,
                        queue,
                        attempt,
                        published_at,
                        namespace,
                        max_attempts,
                    },
                    id,
                )
            },
        )
}

/// A byte edit: flip, overwrite, insert, delete or truncate at a position
/// given as a fraction of the length.
#[derive(Debug, Clone)]
enum Edit {
    Flip(f64, u8),
    Set(f64, u8),
    Insert(f64, u8),
    Delete(f64),
    Truncate(f64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = 0.0f64..1.0;
    prop_oneof![
        (at.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Flip(p, b)),
        (at.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        (at.clone(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        at.clone().prop_map(Edit::Delete),
        at.prop_map(Edit::Truncate),
    ]
}

fn apply_edits(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    let pos = |len: usize, p: f64| ((len as f64 * p) as usize).min(len.saturating_sub(1));
    for e in edits {
        let len = bytes.len();
        match *e {
            Edit::Insert(p, b) => bytes.insert(pos(len + 1, p), b),
            _ if len == 0 => {}
            Edit::Flip(p, b) => bytes[pos(len, p)] ^= b.max(1),
            Edit::Set(p, b) => bytes[pos(len, p)] = b,
            Edit::Delete(p) => {
                bytes.remove(pos(len, p));
            }
            Edit::Truncate(p) => bytes.truncate(pos(len, p)),
        }
    }
    bytes
}

// ---------------------------------------------------------------------------
// REST body: JSON mapping and validation
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes as a submit body: rejected on `body` or decoded and
    /// then judged by validation (the target body asserts which).
    #[test]
    fn any_bytes_as_a_submit_body(bytes in vec(any::<u8>(), 0..256)) {
        targets::rest_submit_body(&bytes);
    }

    /// Any JSON value as a submit body.
    #[test]
    fn any_json_as_a_submit_body(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        targets::rest_submit_body(&bytes);
    }

    /// Submit-shaped bodies: each is undecodable (wrong type, unknown field,
    /// malformed duration), invalid on a named field, or valid and round-trips.
    #[test]
    fn submit_shaped_bodies((value, only_kind) in submit_body()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        let outcome = targets::rest_submit_body(&bytes);
        // A body whose only field is a good kind is always valid; this keeps
        // the generator honest about reaching the valid side.
        if only_kind {
            prop_assert_eq!(outcome, Outcome::Valid);
        }
    }

    /// Submit-shaped bodies with a few bytes changed.
    #[test]
    fn edited_submit_bodies((value, _) in submit_body(), edits in vec(edit(), 1..4)) {
        let bytes = apply_edits(serde_json::to_vec(&value).unwrap(), &edits);
        targets::rest_submit_body(&bytes);
    }

    /// A request as gRPC could deliver it, with any field values: invalid on
    /// a named field, or valid and it (and its job) round-trips through
    /// JSON and protobuf.
    #[test]
    fn any_decoded_submit_request(request in any_submit_request()) {
        targets::submit_request(&request);
    }

    /// Requests within every rule are accepted, and round-trip proto ->
    /// JSON -> proto unchanged (asserted by the target body).
    #[test]
    fn valid_requests_are_accepted_and_round_trip(request in valid_submit_request()) {
        prop_assert_eq!(targets::submit_request(&request), Outcome::Valid);
        let json = serde_json::to_vec(&request).unwrap();
        prop_assert_eq!(targets::rest_submit_body(&json), Outcome::Valid);
    }

    /// Payloads nested at any depth JSON allows: rejected on `payload`, or
    /// accepted and readable back from protobuf (what the stores keep).
    #[test]
    fn deeply_nested_payloads(depth in 1usize..=126, list in any::<bool>()) {
        let mut inner = json!(1);
        for _ in 0..depth {
            inner = if list { json!([inner]) } else { json!({ "a": inner }) };
        }
        let body = json!({ "kind": "echo", "payload": { "p": inner } });
        targets::rest_submit_body(&serde_json::to_vec(&body).unwrap());
    }
}

// ---------------------------------------------------------------------------
// AMQP dispatch message
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes as a dispatch: decoded or rejected, never a panic.
    #[test]
    fn any_bytes_as_a_dispatch(bytes in vec(any::<u8>(), 0..128)) {
        targets::amqp_dispatch(&bytes);
    }

    /// Every well-formed dispatch decodes to itself and its id.
    #[test]
    fn valid_dispatches_round_trip((msg, id) in dispatch()) {
        let bytes = message::encode(&msg);
        prop_assert_eq!(targets::amqp_dispatch(&bytes), Some(id));
        prop_assert_eq!(message::decode(&bytes), Ok((msg, id)));
    }

    /// Well-formed dispatches with a few bytes changed.
    #[test]
    fn edited_dispatches((msg, _) in dispatch(), edits in vec(edit(), 1..4)) {
        targets::amqp_dispatch(&apply_edits(message::encode(&msg), &edits));
    }

    /// Batches of well-formed dispatches decode to themselves; one entry
    /// with a bad id rejects the whole batch.
    #[test]
    fn batches_round_trip_or_fail_whole(
        msgs in vec(dispatch(), 1..8),
        bad in any::<prop::sample::Index>(),
    ) {
        let mut msgs: Vec<DispatchMessage> = msgs.into_iter().map(|(m, _)| m).collect();
        prop_assert_eq!(message::decode_batch(&message::encode_batch(&msgs)), Ok(msgs.clone()));
        let i = bad.index(msgs.len());
        msgs[i].job_id = "not-a-uuid".into();
        prop_assert!(message::decode_batch(&message::encode_batch(&msgs)).is_err());
        targets::amqp_dispatch(&message::encode_batch(&msgs));
    }

    /// A dispatch whose job_id is anything but a hyphenated UUID is rejected.
    #[test]
    fn dispatches_with_other_ids_are_rejected(job_id in any::<String>()) {
        let msg = DispatchMessage { job_id: job_id.clone(), ..DispatchMessage::default() };
        let got = targets::amqp_dispatch(&message::encode(&msg));
        let is_uuid = job_id.len() == 36 && Uuid::try_parse(&job_id).is_ok();
        prop_assert_eq!(got.is_some(), is_uuid);
    }
}

// ---------------------------------------------------------------------------
// Stable replay of the fuzz corpus
// ---------------------------------------------------------------------------

/// The seeds and regressions of one target, from `fuzz/seeds/TARGET/`.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Fragments worth splicing into JSON bodies.
const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-",
    b"1e400",
    b"\"NaN\"",
    b"\"1.5s\"",
    b"\"-1s\"",
    b"\"kind\"",
    b"\"payload\"",
    b"\"retry\"",
    b"\"timeout\"",
    b"\\u0000",
    b"\\ud800",
    b"0.0000000001",
    b"18446744073709551616",
];

/// One random mutation of `input`, in the spirit of libFuzzer's: byte
/// edits, token insertions and splices with another seed.
fn mutate(rng: &mut impl Rng, input: &[u8], pool: &[Vec<u8>], tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len();
        let at = rng.random_range(0..=len);
        match rng.random_range(0..6) {
            0 if len > 0 => out[at.min(len - 1)] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => out[at.min(len - 1)] = rng.random(),
            2 => out.insert(at, rng.random()),
            3 if len > 0 => {
                let end = rng.random_range(at.min(len - 1)..len);
                out.drain(at.min(len - 1)..=end);
            }
            4 if !tokens.is_empty() => {
                let token = tokens[rng.random_range(0..tokens.len())];
                out.splice(at..at, token.iter().copied());
            }
            _ => {
                let other = &pool[rng.random_range(0..pool.len())];
                let from = rng.random_range(0..=other.len());
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
        }
    }
    out
}

fn replay(target: &str, tokens: &[&[u8]], body: fn(&[u8])) {
    let iterations: usize = std::env::var("ORCH_FUZZ_ITERATIONS")
        .ok()
        .map(|v| v.parse().expect("ORCH_FUZZ_ITERATIONS is a number"))
        .unwrap_or(2000);
    let seed: u64 = std::env::var("ORCH_FUZZ_SEED")
        .ok()
        .map(|v| v.parse().expect("ORCH_FUZZ_SEED is a number"))
        .unwrap_or_else(rand::random);
    let started = std::time::Instant::now();
    let pool = seeds(target);
    for input in &pool {
        body(input);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..iterations {
        let base = &pool[rng.random_range(0..pool.len())];
        let input = mutate(&mut rng, base, &pool, tokens);
        let outcome = std::panic::catch_unwind(|| body(&input));
        if outcome.is_err() {
            panic!(
                "{target}: mutation {i} of ORCH_FUZZ_SEED={seed} failed on input {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    eprintln!(
        "{target}: {} seeds and {iterations} mutations in {:.1}s (ORCH_FUZZ_SEED={seed}) passed",
        pool.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The fuzz target bodies on stable: every seed and regression input, then
/// random mutations of them.
#[test]
fn fuzz_corpus_replays() {
    replay("rest_submit_body", JSON_TOKENS, |data| {
        targets::rest_submit_body(data);
    });
    replay("amqp_dispatch", &[], |data| {
        targets::amqp_dispatch(data);
    });
}

/// The seeds cover both sides of each target.
#[test]
fn seeds_reach_every_outcome() {
    let outcomes: Vec<_> = seeds("rest_submit_body")
        .iter()
        .map(|s| targets::rest_submit_body(s))
        .collect();
    for want in [Outcome::Undecodable, Outcome::Invalid, Outcome::Valid] {
        assert!(outcomes.contains(&want), "no REST seed is {want:?}");
    }
    let ids: Vec<_> = seeds("amqp_dispatch")
        .iter()
        .map(|s| targets::amqp_dispatch(s))
        .collect();
    assert!(ids.iter().any(Option::is_some) && ids.iter().any(Option::is_none));
}
