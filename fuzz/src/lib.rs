//! The bodies of the fuzz targets: what must hold for any input to the two
//! decode paths that take bytes from outside the platform.
//!
//! - A REST submit body goes through [`validate::json_body`] (the function
//!   the REST shim calls) and then [`validate::submit`] (what every submit,
//!   gRPC or REST, goes through). It is either rejected with an
//!   `InvalidArgument` error naming a field, or valid. A valid request
//!   means the same after a JSON round trip and is unchanged by a protobuf
//!   one, and the job stored from it survives both unchanged, so nothing
//!   accepted is lost or becomes unreadable later.
//! - An AMQP dispatch goes through [`message::decode`] (what workers call):
//!   either an error, or a message whose id parses and that re-encodes to
//!   the same message.
//!
//! Nothing may panic. One file, three users: the cargo-fuzz targets in
//! `fuzz/fuzz_targets/`, the stable replay of the corpus
//! (`tests/fuzz_replay.rs` of the library crate, which includes this file
//! by path) and the property tests (`tests/wire_props.rs`, likewise).

use orchestrator::error::Error;
use orchestrator::proto::v1::{Job, ListJobsResponse, SubmitJobRequest, SubmitJobsRequest};
use orchestrator::queue::message::{self, DecodeError};
use orchestrator::validate::{self, Limits};
use pbjson_types::Value;
use pbjson_types::value::Kind;
use prost::Message;
use uuid::Uuid;

/// Every field [`validate::submit`] may reject, as its errors name them.
pub const SUBMIT_FIELDS: &[&str] = &[
    "kind",
    "queue",
    "max_attempts",
    "retry.initial_backoff",
    "retry.multiplier",
    "retry.max_backoff",
    "payload",
    "labels",
    "idempotency_key",
    "timeout",
];

/// Installs a panic hook for the cargo-fuzz targets. libFuzzer's own hook
/// aborts on every panic, even one the code under test catches; but
/// [`validate::json_body`] catches the panics of pbjson's decoders on
/// purpose (reporting an invalid body, as production does). This hook lets
/// those pass silently and keeps libFuzzer's print-and-abort for any other.
pub fn abort_on_panics_outside_json_decoders() {
    let abort = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_decoder = info
            .location()
            .is_some_and(|at| at.file().contains("/pbjson-types-"));
        if !in_decoder {
            abort(info);
        }
    }));
}

/// What became of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not decodable (REST: not JSON of the request type; AMQP: not a
    /// dispatch).
    Undecodable,
    /// Decoded, then refused by validation.
    Invalid,
    /// Decoded and valid.
    Valid,
}

/// The REST submit path on `data`, as the body of `POST /jobs` and as the
/// body of `POST /jobs:batchSubmit`. Returns what became of the single
/// submit.
pub fn rest_submit_body(data: &[u8]) -> Outcome {
    if let Some(batch) = decode_body::<SubmitJobsRequest>(data) {
        for spec in &batch.jobs {
            submit_request(spec);
        }
    }
    match decode_body::<SubmitJobRequest>(data) {
        Some(request) => submit_request(&request),
        None => Outcome::Undecodable,
    }
}

fn decode_body<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    validate::json_body::<T>(data)
        .inspect_err(|e| expect_field(e, &["body"]))
        .ok()
}

/// Validation of a decoded submit request (from JSON or from gRPC): an
/// error names one of [`SUBMIT_FIELDS`]; a valid request and its job
/// round-trip through JSON and protobuf.
pub fn submit_request(request: &SubmitJobRequest) -> Outcome {
    let new = match validate::submit(request, &Limits::default()) {
        Ok(new) => new,
        Err(e) => {
            expect_field(&e, SUBMIT_FIELDS);
            return Outcome::Invalid;
        }
    };
    let json = serde_json::to_vec(request).expect("a valid request serializes to JSON");
    let back: SubmitJobRequest = validate::json_body(&json).unwrap_or_else(|e| {
        panic!(
            "a valid request does not decode from its own JSON ({e}): {}",
            String::from_utf8_lossy(&json)
        )
    });
    let again = validate::submit(&back, &Limits::default())
        .unwrap_or_else(|e| panic!("a valid request is invalid after a JSON round trip: {e}"));
    assert_eq!(
        again, new,
        "a valid request means the same after a JSON round trip"
    );
    let back = SubmitJobRequest::decode(request.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("a valid request does not decode from protobuf: {e}"));
    assert_eq!(&back, request, "protobuf round trip of a valid request");

    let mut job = new.to_job("7f1c0a52-3b1e-4c1a-9d8e-2f6b1c9a0e4d", 1_700_000_000_123);
    job.history.push(new.created_transition(1_700_000_000_123));
    job_round_trips(&job);
    Outcome::Valid
}

/// A job, as the store keeps it (protobuf, also inside a list page) and as
/// REST shows it (JSON), reads back unchanged.
pub fn job_round_trips(job: &Job) {
    let back = Job::decode(job.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("a job does not decode from protobuf: {e}"));
    assert_eq!(&back, job, "protobuf round trip of a job");
    let page = ListJobsResponse {
        jobs: vec![job.clone()],
        next_page_token: String::new(),
    };
    let back = ListJobsResponse::decode(page.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("a page of jobs does not decode from protobuf: {e}"));
    assert_eq!(back, page, "protobuf round trip of a page of jobs");
    let json = serde_json::to_vec(job).expect("a job serializes to JSON");
    let back: Job = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "a job does not decode from its own JSON ({e}): {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(
        back,
        nulls_as_json_reads_them(job),
        "JSON round trip of a job"
    );
}

/// `job` with every `null_value` in its payload and result replaced by a
/// `Value` without a kind: what pbjson reads a JSON `null` as. The two are
/// the same null (validation stores the first).
fn nulls_as_json_reads_them(job: &Job) -> Job {
    fn walk(value: &mut Value) {
        match &mut value.kind {
            Some(Kind::NullValue(_)) => value.kind = None,
            Some(Kind::StructValue(s)) => s.fields.values_mut().for_each(walk),
            Some(Kind::ListValue(l)) => l.values.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut job = job.clone();
    for s in [&mut job.payload, &mut job.result].into_iter().flatten() {
        s.fields.values_mut().for_each(walk);
    }
    job
}

/// The worker's decoding of a dispatch on `data`. Returns the job id when
/// it is a valid dispatch.
pub fn amqp_dispatch(data: &[u8]) -> Option<Uuid> {
    // The same bytes as the body of a batch message (AMQP type
    // DispatchBatch): all of it valid, or rejected as a whole.
    if let Ok(dispatches) = message::decode_batch(data) {
        assert!(!dispatches.is_empty(), "a batch is never empty");
        for dispatch in &dispatches {
            assert!(
                dispatch.job_id.len() == 36 && Uuid::try_parse(&dispatch.job_id).is_ok(),
                "every dispatch of a batch has a UUID job_id"
            );
        }
        assert_eq!(
            message::decode_batch(&message::encode_batch(&dispatches)),
            Ok(dispatches),
            "a valid batch re-encodes to itself"
        );
    }
    match message::decode(data) {
        Ok((dispatch, id)) => {
            assert_eq!(
                Uuid::try_parse(&dispatch.job_id).ok(),
                Some(id),
                "the id is the message's job_id"
            );
            assert_eq!(
                message::decode(&message::encode(&dispatch)),
                Ok((dispatch, id)),
                "a valid dispatch re-encodes to itself"
            );
            Some(id)
        }
        Err(DecodeError::Encoding { error: why, .. }) => {
            assert!(!why.is_empty(), "a decode error says why");
            None
        }
        Err(DecodeError::JobId(id)) => {
            assert!(
                id.chars().count() <= 64,
                "a rejected id is quoted truncated"
            );
            None
        }
    }
}

/// Checks that `err` is a validation error on one of `fields` with a
/// message that says something.
fn expect_field(err: &Error, fields: &[&str]) {
    match err {
        Error::InvalidArgument { field, message } => {
            assert!(
                fields.contains(&field.as_str()),
                "error on unexpected field {field:?}: {err}"
            );
            assert!(!message.is_empty(), "an error without a message: {err:?}");
        }
        other => panic!("expected an InvalidArgument error, got {other:?}"),
    }
}
