//! Validation of everything a client sends: each check names the field it
//! rejects, and nothing is written before all checks pass.

use std::time::Duration;

use pbjson_types::Struct;
use pbjson_types::value::Kind;
use prost::Message;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::job::{
    DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, MAX_ATTEMPTS_LIMIT, NewJob, RetrySettings,
    duration_from_proto,
};
use crate::proto::v1::{ListJobsRequest, SubmitJobRequest, job};
use crate::state::State;

/// Limits on what a client may send; configurable on the server (the
/// defaults are orchd's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload, in bytes of its protobuf encoding.
    pub max_payload_bytes: usize,
    /// Most labels on one job.
    pub max_labels: usize,
    /// Longest label key, in bytes.
    pub max_label_key_bytes: usize,
    /// Longest label value, in bytes.
    pub max_label_value_bytes: usize,
    /// Largest page of ListJobs.
    pub max_page_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1024 * 1024,
            max_labels: 64,
            max_label_key_bytes: 63,
            max_label_value_bytes: 256,
            max_page_size: 1000,
        }
    }
}

const MAX_NAME_LEN: usize = 64;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;
/// Deepest nesting of objects and lists in a payload, the payload object
/// being level 1. An object level costs protobuf decoders three of the 100
/// levels they allow (prost, tonic, most other languages' runtimes: the
/// `Struct`, its map entry and the `Value`) and the job and the messages
/// around it take a few more, while JSON allows 128: without this bound the
/// REST shim stored payloads of 34 levels and more that no store could read
/// back. 20 leaves room for the messages that carry a job.
pub const MAX_PAYLOAD_DEPTH: usize = 20;
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 3600);
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default number of jobs per page of ListJobs (less when the largest page
/// allowed is smaller).
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// Longest namespace (a DNS label, like a Kubernetes namespace).
pub const MAX_NAMESPACE_LEN: usize = 63;

/// Checks a namespace: a lowercase letter, then lowercase letters, digits
/// or '-', not ending in '-', at most 63 characters (a DNS label). No '.',
/// so that `<namespace>.<queue>` names a RabbitMQ queue unambiguously, and
/// no ':', so that it can sit inside Redis keys.
pub fn namespace(field: &str, value: &str) -> Result<()> {
    let rule = "must be a DNS label: a lowercase letter, then lowercase letters, digits or '-', not ending in '-'";
    if value.is_empty() || value.len() > MAX_NAMESPACE_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "must be 1 to {MAX_NAMESPACE_LEN} characters, got {}",
                value.len()
            ),
        ));
    }
    let ok = value.starts_with(|c: char| c.is_ascii_lowercase())
        && !value.ends_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{rule}, got {value:?}")))
    }
}

/// Checks a kind or queue name: a lowercase letter, then lowercase letters,
/// digits, '.', '_' or '-', at most 64 characters in all.
pub fn name(field: &str, value: &str) -> Result<()> {
    let rule = "must start with a lowercase letter and contain only lowercase letters, digits, '.', '_' and '-'";
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {MAX_NAME_LEN} characters, got {}",
                value.len()
            ),
        ));
    }
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{rule}, got {value:?}")))
    }
}

/// Decodes a REST request body: JSON in the proto3 JSON mapping (pbjson)
/// into the generated request type. Any failure, from bytes that are not
/// UTF-8 to a field of the wrong type, is an error on the field `body`
/// whose message says where and what serde_json found. The decoded request
/// still has to pass its own validation ([`submit`], [`list`]).
pub fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    // pbjson's decoders can panic on values they cannot represent (with
    // overflow checks on, `"--9223372036854775808s"` overflows a negation,
    // found by fuzzing): such a body is as malformed as any other.
    match std::panic::catch_unwind(|| serde_json::from_slice(body)) {
        Ok(decoded) => decoded.map_err(|e| Error::invalid("body", format!("invalid JSON: {e}"))),
        Err(_) => Err(Error::invalid(
            "body",
            "invalid JSON: a value out of the range of its field",
        )),
    }
}

/// A batch of `len` `items` in field `field` must hold 1 to `max` of them.
pub fn batch_len(field: &str, len: usize, max: usize, items: &str) -> Result<()> {
    if len == 0 || len > max {
        return Err(Error::invalid(
            field,
            format!("must hold 1 to {max} {items}, got {len}"),
        ));
    }
    Ok(())
}

/// Parses a job id: a UUID in its hyphenated form.
pub fn job_id(value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(Error::invalid("job_id", "must not be empty"));
    }
    match Uuid::try_parse(value) {
        Ok(id) if value.len() == 36 => Ok(id),
        _ => Err(Error::invalid(
            "job_id",
            format!(
                "must be a UUID such as 7f1c0a52-3b1e-4c1a-9d8e-2f6b1c9a0e4d, got {:?}",
                truncate(value)
            ),
        )),
    }
}

fn truncate(value: &str) -> String {
    value.chars().take(80).collect()
}

fn duration(
    field: &str,
    value: Option<pbjson_types::Duration>,
    max: Duration,
) -> Result<Option<Duration>> {
    let Some(raw) = value else {
        return Ok(None);
    };
    let d = duration_from_proto(raw)
        .ok_or_else(|| Error::invalid(field, "must be a non-negative duration"))?;
    if d > max {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {}s, got {}s",
                max.as_secs(),
                d.as_secs_f64()
            ),
        ));
    }
    Ok(Some(d))
}

/// Checks that a JSON object carried as a protobuf `Struct` (a job's
/// payload, a handler's result) has the same meaning in protobuf and in
/// JSON: numbers are finite (JSON has no NaN or infinity) and nesting stays
/// within [`MAX_PAYLOAD_DEPTH`]. A value without a kind (what pbjson makes
/// of a JSON `null`) or with an unknown null becomes the proper
/// `null_value`, so that every stored object is well-formed protobuf for
/// gRPC clients whose JSON printers refuse an empty `Value`. Errors name
/// `field`.
pub fn json_object(field: &str, object: &mut Struct) -> Result<()> {
    fn walk_struct(field: &str, s: &mut Struct, depth: usize) -> Result<()> {
        if depth > MAX_PAYLOAD_DEPTH {
            return Err(too_deep(field));
        }
        s.fields
            .values_mut()
            .try_for_each(|v| walk(field, v, depth))
    }
    fn walk(field: &str, value: &mut pbjson_types::Value, depth: usize) -> Result<()> {
        match &mut value.kind {
            None | Some(Kind::NullValue(_)) => value.kind = Some(Kind::NullValue(0)),
            Some(Kind::NumberValue(n)) if !n.is_finite() => {
                return Err(Error::invalid(
                    field,
                    format!("numbers must be finite (JSON has no NaN or infinity), got {n}"),
                ));
            }
            Some(Kind::StructValue(s)) => walk_struct(field, s, depth + 1)?,
            Some(Kind::ListValue(list)) => {
                if depth + 1 > MAX_PAYLOAD_DEPTH {
                    return Err(too_deep(field));
                }
                list.values
                    .iter_mut()
                    .try_for_each(|v| walk(field, v, depth + 1))?;
            }
            Some(Kind::NumberValue(_) | Kind::StringValue(_) | Kind::BoolValue(_)) => {}
        }
        Ok(())
    }
    fn too_deep(field: &str) -> Error {
        Error::invalid(
            field,
            format!("must not nest objects and lists more than {MAX_PAYLOAD_DEPTH} levels deep"),
        )
    }
    walk_struct(field, object, 1)
}

/// Validates a submit request and fills in the defaults.
pub fn submit(req: &SubmitJobRequest, limits: &Limits) -> Result<NewJob> {
    name("kind", &req.kind)?;
    if !req.namespace.is_empty() {
        namespace("namespace", &req.namespace)?;
    }
    let queue = if req.queue.is_empty() {
        DEFAULT_QUEUE.to_owned()
    } else {
        name("queue", &req.queue)?;
        req.queue.clone()
    };

    let max_attempts = match req.max_attempts {
        0 => DEFAULT_MAX_ATTEMPTS,
        n if n <= MAX_ATTEMPTS_LIMIT => n,
        n => {
            return Err(Error::invalid(
                "max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {n}"),
            ));
        }
    };

    let retry = retry(req.retry.as_ref())?;

    let mut payload = req.payload.clone().unwrap_or_default();
    json_object("payload", &mut payload)?;
    let size = payload.encoded_len();
    if size > limits.max_payload_bytes {
        return Err(Error::invalid(
            "payload",
            format!(
                "is {size} bytes, more than the limit of {} bytes",
                limits.max_payload_bytes
            ),
        ));
    }

    labels(&req.labels, limits)?;

    let key = &req.idempotency_key;
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(Error::invalid(
            "idempotency_key",
            format!("must be at most {MAX_IDEMPOTENCY_KEY_LEN} bytes"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::invalid(
            "idempotency_key",
            "must not contain control characters",
        ));
    }

    let timeout = duration("timeout", req.timeout, MAX_TIMEOUT)?;
    if timeout == Some(Duration::ZERO) {
        return Err(Error::invalid("timeout", "must be positive when set"));
    }

    Ok(NewJob {
        kind: req.kind.clone(),
        payload,
        queue,
        max_attempts,
        retry,
        labels: req.labels.clone(),
        idempotency_key: key.clone(),
        timeout,
        submitted_by: String::new(),
        namespace: req.namespace.clone(),
    })
}

fn labels(labels: &std::collections::HashMap<String, String>, limits: &Limits) -> Result<()> {
    if labels.len() > limits.max_labels {
        return Err(Error::invalid(
            "labels",
            format!(
                "at most {} labels (max_labels), got {}",
                limits.max_labels,
                labels.len()
            ),
        ));
    }
    let max_key = limits.max_label_key_bytes;
    let max_value = limits.max_label_value_bytes;
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= max_key
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(Error::invalid(
                "labels",
                format!(
                    "key {:?} ({} bytes) must be 1 to {max_key} characters (max_label_key_bytes) of letters, digits, '.', '_', '-' and '/'",
                    truncate(key),
                    key.len()
                ),
            ));
        }
        if value.len() > max_value {
            return Err(Error::invalid(
                "labels",
                format!(
                    "value of {:?} is {} bytes, more than {max_value} (max_label_value_bytes)",
                    truncate(key),
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

fn retry(policy: Option<&crate::proto::v1::RetryPolicy>) -> Result<RetrySettings> {
    let defaults = RetrySettings::default();
    let Some(policy) = policy else {
        return Ok(defaults);
    };
    let initial_backoff = duration("retry.initial_backoff", policy.initial_backoff, MAX_BACKOFF)?
        .unwrap_or(defaults.initial_backoff);
    let multiplier = match policy.multiplier {
        0.0 => defaults.multiplier,
        m if m.is_finite() && (1.0..=100.0).contains(&m) => m,
        m => {
            return Err(Error::invalid(
                "retry.multiplier",
                format!("must be between 1 and 100, got {m}"),
            ));
        }
    };
    let max_backoff = duration("retry.max_backoff", policy.max_backoff, MAX_BACKOFF)?
        .unwrap_or_else(|| defaults.max_backoff.max(initial_backoff));
    if max_backoff < initial_backoff {
        return Err(Error::invalid(
            "retry.max_backoff",
            "must not be shorter than retry.initial_backoff",
        ));
    }
    Ok(RetrySettings {
        initial_backoff,
        multiplier,
        max_backoff,
    })
}

/// A validated ListJobs request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this state.
    pub state: Option<State>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this queue.
    pub queue: Option<String>,
    /// 1 to the largest page allowed.
    pub page_size: u32,
    /// Opaque cursor from the previous page.
    pub page_token: Option<String>,
    /// The namespace listed; empty until the service resolves the caller's.
    pub namespace: String,
}

impl ListQuery {
    /// Whether `job` passes every filter of the query. Stores read the
    /// index of one filter and check the others with this.
    pub fn matches(&self, job: &crate::proto::v1::Job) -> bool {
        job_namespace(job) == namespace_or_default(&self.namespace)
            && self.state.is_none_or(|s| job.state == s.to_proto() as i32)
            && self.kind.as_deref().is_none_or(|k| job.kind == k)
            && self.queue.as_deref().is_none_or(|q| job.queue == q)
    }
}

/// Validates a list request and fills in the defaults.
pub fn list(req: &ListJobsRequest, limits: &Limits) -> Result<ListQuery> {
    let state = match job::State::try_from(req.state) {
        Ok(s) => State::from_proto(s),
        Err(_) => {
            return Err(Error::invalid(
                "state",
                format!("unknown state {}", req.state),
            ));
        }
    };
    if !req.namespace.is_empty() {
        namespace("namespace", &req.namespace)?;
    }
    let kind = (!req.kind.is_empty())
        .then(|| name("kind", &req.kind).map(|()| req.kind.clone()))
        .transpose()?;
    let queue = (!req.queue.is_empty())
        .then(|| name("queue", &req.queue).map(|()| req.queue.clone()))
        .transpose()?;
    let max = limits.max_page_size;
    let page_size = match req.page_size {
        0 => DEFAULT_PAGE_SIZE.min(max),
        n if n <= max => n,
        n => {
            return Err(Error::invalid(
                "page_size",
                format!("must be at most {max} (max_page_size), got {n}"),
            ));
        }
    };
    Ok(ListQuery {
        state,
        kind,
        queue,
        page_size,
        page_token: (!req.page_token.is_empty()).then(|| req.page_token.clone()),
        namespace: req.namespace.clone(),
    })
}

/// The namespace of a stored job; jobs stored before namespaces existed
/// belong to the default one.
pub fn job_namespace(job: &crate::proto::v1::Job) -> &str {
    namespace_or_default(&job.namespace)
}

/// `namespace`, or the default namespace when it is empty (not chosen yet,
/// or written before namespaces existed).
pub fn namespace_or_default(namespace: &str) -> &str {
    if namespace.is_empty() {
        crate::auth::DEFAULT_NAMESPACE
    } else {
        namespace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::RetryPolicy;

    fn spec(kind: &str) -> SubmitJobRequest {
        SubmitJobRequest {
            kind: kind.into(),
            ..SubmitJobRequest::default()
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn namespaces_are_dns_labels() {
        for good in ["default", "a", "team-a", "t1", &"n".repeat(63)] {
            assert!(namespace("namespace", good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "Team",
            "team.a",
            "team_a",
            "team:a",
            "-a",
            "a-",
            "1a",
            "tëam",
            &"n".repeat(64),
        ] {
            assert_eq!(
                field_of(namespace("namespace", bad).unwrap_err()),
                "namespace",
                "{bad:?}"
            );
        }
        let spec = SubmitJobRequest {
            namespace: "Not.Valid".into(),
            ..spec("sleep")
        };
        assert_eq!(
            field_of(submit(&spec, &Limits::default()).unwrap_err()),
            "namespace"
        );
        let list_req = ListJobsRequest {
            namespace: "a.b".into(),
            ..ListJobsRequest::default()
        };
        assert_eq!(
            field_of(list(&list_req, &Limits::default()).unwrap_err()),
            "namespace"
        );
    }

    #[test]
    fn a_minimal_spec_gets_the_defaults() {
        let job = submit(&spec("sleep"), &Limits::default()).unwrap();
        assert_eq!(job.queue, "default");
        assert_eq!(job.max_attempts, 3);
        assert_eq!(job.retry, RetrySettings::default());
        assert_eq!(job.timeout, None);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["sleep", "a", "my-kind_2.v1", &"x".repeat(64)] {
            assert!(name("kind", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Sleep",
            "1abc",
            "-a",
            "a b",
            "a/b",
            "é",
            &"x".repeat(65),
        ] {
            let err = name("kind", bad).unwrap_err();
            assert_eq!(field_of(err), "kind", "{bad}");
        }
        let err = submit(
            &SubmitJobRequest {
                queue: "Bad Queue".into(),
                ..spec("sleep")
            },
            &Limits::default(),
        );
        assert_eq!(field_of(err.unwrap_err()), "queue");
    }

    #[test]
    fn max_attempts_must_be_within_1_and_100() {
        for (n, want) in [
            (0, Some(3)),
            (1, Some(1)),
            (100, Some(100)),
            (101, None),
            (u32::MAX, None),
        ] {
            let got = submit(
                &SubmitJobRequest {
                    max_attempts: n,
                    ..spec("sleep")
                },
                &Limits::default(),
            );
            match want {
                Some(w) => assert_eq!(got.unwrap().max_attempts, w),
                None => {
                    let err = got.unwrap_err();
                    assert!(err.to_string().contains("between 1 and 100"), "{err}");
                    assert_eq!(field_of(err), "max_attempts");
                }
            }
        }
    }

    #[test]
    fn payload_over_the_limit_is_rejected() {
        let mut payload = pbjson_types::Struct::default();
        payload.fields.insert(
            "blob".into(),
            pbjson_types::Value {
                kind: Some(pbjson_types::value::Kind::StringValue("x".repeat(2000))),
            },
        );
        let req = SubmitJobRequest {
            payload: Some(payload),
            ..spec("echo")
        };
        let limits = Limits {
            max_payload_bytes: 1000,
            ..Limits::default()
        };
        let err = submit(&req, &limits).unwrap_err();
        assert!(err.to_string().contains("limit of 1000 bytes"), "{err}");
        assert_eq!(field_of(err), "payload");
        assert!(submit(&req, &Limits::default()).is_ok());
    }

    /// A payload nested `depth` levels deep (the payload object is level 1).
    fn nested_body(depth: usize, list: bool) -> String {
        let mut inner = "1".to_owned();
        for _ in 1..depth {
            inner = if list {
                format!("[{inner}]")
            } else {
                format!("{{\"a\":{inner}}}")
            };
        }
        format!("{{\"kind\":\"echo\",\"payload\":{{\"p\":{inner}}}}}")
    }

    // Found by the property tests (tests/wire_decoding.rs): JSON allowed 128
    // levels, protobuf decoders stop at 100 (34 payload levels), so a REST
    // submit stored a job that no store could read back.
    #[test]
    fn payloads_nested_deeper_than_the_limit_are_rejected() {
        use crate::proto::v1::ListJobsResponse;
        for list in [false, true] {
            let body = nested_body(MAX_PAYLOAD_DEPTH, list);
            let ok: SubmitJobRequest = json_body(body.as_bytes()).unwrap();
            let new = submit(&ok, &Limits::default()).unwrap();
            // Readable inside a message that carries jobs, with room to spare.
            let page = ListJobsResponse {
                jobs: vec![new.to_job("j", 0)],
                next_page_token: String::new(),
            };
            let bytes = page.encode_to_vec();
            assert_eq!(ListJobsResponse::decode(bytes.as_slice()).unwrap(), page);

            for depth in [MAX_PAYLOAD_DEPTH + 1, 34, 60, 126] {
                let deep: SubmitJobRequest =
                    json_body(nested_body(depth, list).as_bytes()).unwrap();
                let err = submit(&deep, &Limits::default()).unwrap_err();
                assert!(err.to_string().contains("20 levels"), "{err}");
                assert_eq!(field_of(err), "payload");
            }
        }
        let err = json_body::<SubmitJobRequest>(nested_body(200, false).as_bytes()).unwrap_err();
        assert_eq!(field_of(err), "body");
    }

    // Found by the property tests: gRPC accepted NaN and infinities in a
    // payload, which the JSON mapping cannot write, so the REST shim failed
    // with an internal error on every read of the job.
    #[test]
    fn payload_numbers_must_be_finite() {
        for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut inner = pbjson_types::Struct::default();
            inner.fields.insert("n".into(), n.into());
            let mut payload = pbjson_types::Struct::default();
            payload
                .fields
                .insert("list".into(), vec![inner.into()].into());
            let req = SubmitJobRequest {
                payload: Some(payload),
                ..spec("echo")
            };
            let err = submit(&req, &Limits::default()).unwrap_err();
            assert!(err.to_string().contains("finite"), "{err}");
            assert_eq!(field_of(err), "payload");
        }
    }

    #[test]
    fn json_objects_are_checked_under_the_field_named() {
        let mut result = pbjson_types::Struct::default();
        result.fields.insert("n".into(), f64::NAN.into());
        let err = json_object("completed", &mut result).unwrap_err();
        assert!(err.to_string().contains("finite"), "{err}");
        assert_eq!(field_of(err), "completed");
        let mut deep = pbjson_types::Struct::default();
        for _ in 0..MAX_PAYLOAD_DEPTH {
            let mut outer = pbjson_types::Struct::default();
            outer.fields.insert("a".into(), deep.into());
            deep = outer;
        }
        let err = json_object("completed", &mut deep).unwrap_err();
        assert!(err.to_string().contains("levels deep"), "{err}");
        assert_eq!(field_of(err), "completed");
        let mut fine = pbjson_types::Struct::default();
        fine.fields.insert("n".into(), 1.5.into());
        json_object("completed", &mut fine).unwrap();
    }

    #[test]
    fn nulls_are_stored_as_null_values() {
        let req: SubmitJobRequest =
            json_body(br#"{"kind":"echo","payload":{"a":null,"b":[null,{"c":null}]}}"#).unwrap();
        let mut grpc = req.clone();
        grpc.payload
            .as_mut()
            .unwrap()
            .fields
            .insert("d".into(), Kind::NullValue(7).into());
        let null = pbjson_types::Value::from(Kind::NullValue(0));
        let payload = submit(&grpc, &Limits::default()).unwrap().payload;
        assert_eq!(payload.fields["a"], null);
        assert_eq!(payload.fields["d"], null);
        let expected: pbjson_types::Value = vec![
            null.clone(),
            pbjson_types::Value::from(std::collections::HashMap::from([(
                "c".to_owned(),
                null.clone(),
            )])),
        ]
        .into();
        assert_eq!(payload.fields["b"], expected);
    }

    // Found by the property tests: serde_json's default float parser can be
    // off in the last place, so these numbers changed on the way in (and
    // again on every JSON round trip) before `float_roundtrip` was enabled.
    #[test]
    fn numbers_in_json_bodies_are_read_exactly() {
        let body = br#"{"kind":"echo","payload":{"x":-960842474995071.3},"retry":{"multiplier":92.99357415411936}}"#;
        let req: SubmitJobRequest = json_body(body).unwrap();
        assert_eq!(
            req.payload.unwrap().fields["x"].kind,
            Some(Kind::NumberValue(-960842474995071.3))
        );
        assert_eq!(req.retry.unwrap().multiplier, 92.99357415411936);
    }

    // Found by the fuzzer (fuzz/seeds/rest_submit_body/regression-*): the
    // duration parser negated i64::MIN, a panic with overflow checks on.
    #[test]
    fn durations_out_of_range_fail_on_body_without_a_panic() {
        for body in [
            br#"{"kind":"spele","timeout":"--9223372036854775808s",}"#.as_slice(),
            br#"{"kind":"a","retry":{"maxBackoff":"--9223372036854775808.5s"}}"#,
        ] {
            let err = json_body::<SubmitJobRequest>(body).unwrap_err();
            assert_eq!(field_of(err), "body");
        }
        let req: SubmitJobRequest = json_body(br#"{"kind":"a","timeout":"-5s"}"#).unwrap();
        assert_eq!(
            field_of(submit(&req, &Limits::default()).unwrap_err()),
            "timeout"
        );
    }

    #[test]
    fn bodies_that_are_not_the_request_fail_on_body() {
        for body in [
            &b""[..],
            b"{",
            b"\xff",
            b"[]",
            br#"{"kind":7}"#,
            br#"{"kind":"a","colour":"red"}"#,
            br#"{"kind":"a","timeout":"5m"}"#,
        ] {
            let err = json_body::<SubmitJobRequest>(body).unwrap_err();
            assert!(
                err.to_string().starts_with("invalid body: invalid JSON"),
                "{err}"
            );
            assert_eq!(field_of(err), "body");
        }
    }

    #[test]
    fn labels_and_idempotency_keys_are_bounded() {
        let mut req = spec("sleep");
        req.labels.insert("team".into(), "infra".into());
        assert!(submit(&req, &Limits::default()).is_ok());
        req.labels.insert("bad key".into(), "x".into());
        assert_eq!(
            field_of(submit(&req, &Limits::default()).unwrap_err()),
            "labels"
        );

        let mut req = spec("sleep");
        req.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(
            field_of(submit(&req, &Limits::default()).unwrap_err()),
            "labels"
        );

        let req = SubmitJobRequest {
            idempotency_key: "k".repeat(257),
            ..spec("sleep")
        };
        assert_eq!(
            field_of(submit(&req, &Limits::default()).unwrap_err()),
            "idempotency_key"
        );
        let req = SubmitJobRequest {
            idempotency_key: "a\nb".into(),
            ..spec("sleep")
        };
        assert_eq!(
            field_of(submit(&req, &Limits::default()).unwrap_err()),
            "idempotency_key"
        );
    }

    #[test]
    fn retry_policy_is_checked_field_by_field() {
        let d = |s: i64| {
            Some(pbjson_types::Duration {
                seconds: s,
                nanos: 0,
            })
        };
        let cases = [
            (
                RetryPolicy {
                    multiplier: 0.5,
                    ..Default::default()
                },
                Some("retry.multiplier"),
            ),
            (
                RetryPolicy {
                    multiplier: f64::NAN,
                    ..Default::default()
                },
                Some("retry.multiplier"),
            ),
            (
                RetryPolicy {
                    initial_backoff: d(-1),
                    ..Default::default()
                },
                Some("retry.initial_backoff"),
            ),
            (
                RetryPolicy {
                    initial_backoff: d(10),
                    max_backoff: d(5),
                    ..Default::default()
                },
                Some("retry.max_backoff"),
            ),
            (
                RetryPolicy {
                    max_backoff: d(100_000),
                    ..Default::default()
                },
                Some("retry.max_backoff"),
            ),
            (
                RetryPolicy {
                    initial_backoff: d(2),
                    multiplier: 3.0,
                    max_backoff: d(60),
                },
                None,
            ),
            (
                RetryPolicy {
                    initial_backoff: d(600),
                    ..Default::default()
                },
                None,
            ),
        ];
        for (policy, want) in cases {
            let got = submit(
                &SubmitJobRequest {
                    retry: Some(policy),
                    ..spec("sleep")
                },
                &Limits::default(),
            );
            match want {
                Some(field) => assert_eq!(field_of(got.unwrap_err()), field, "{policy:?}"),
                None => assert!(got.is_ok(), "{policy:?}"),
            }
        }
    }

    #[test]
    fn timeout_must_be_positive_and_bounded() {
        let with = |s: i64| SubmitJobRequest {
            timeout: Some(pbjson_types::Duration {
                seconds: s,
                nanos: 0,
            }),
            ..spec("sleep")
        };
        assert_eq!(
            submit(&with(30), &Limits::default()).unwrap().timeout,
            Some(Duration::from_secs(30))
        );
        for bad in [0, -5, 8 * 24 * 3600] {
            assert_eq!(
                field_of(submit(&with(bad), &Limits::default()).unwrap_err()),
                "timeout"
            );
        }
    }

    #[test]
    fn job_ids_must_be_hyphenated_uuids() {
        let id = Uuid::new_v4();
        assert_eq!(job_id(&id.to_string()).unwrap(), id);
        for bad in [
            "",
            "42",
            "not-a-uuid",
            &id.simple().to_string(),
            &format!("{{{id}}}"),
            "../../etc",
        ] {
            assert_eq!(field_of(job_id(bad).unwrap_err()), "job_id", "{bad}");
        }
    }

    #[test]
    fn list_requests_get_defaults_and_bounds() {
        let limits = Limits::default();
        let q = list(&ListJobsRequest::default(), &limits).unwrap();
        assert_eq!(q.page_size, 50);
        assert_eq!(
            (q.state, q.kind, q.queue, q.page_token),
            (None, None, None, None)
        );
        let q = list(
            &ListJobsRequest {
                state: job::State::Running as i32,
                kind: "sleep".into(),
                page_size: 1000,
                ..Default::default()
            },
            &limits,
        )
        .unwrap();
        assert_eq!(q.state, Some(State::Running));
        assert_eq!(q.kind.as_deref(), Some("sleep"));
        for (req, field) in [
            (
                ListJobsRequest {
                    page_size: 1001,
                    ..Default::default()
                },
                "page_size",
            ),
            (
                ListJobsRequest {
                    state: 42,
                    ..Default::default()
                },
                "state",
            ),
            (
                ListJobsRequest {
                    kind: "BAD".into(),
                    ..Default::default()
                },
                "kind",
            ),
            (
                ListJobsRequest {
                    queue: "a b".into(),
                    ..Default::default()
                },
                "queue",
            ),
        ] {
            assert_eq!(field_of(list(&req, &limits).unwrap_err()), field);
        }
    }

    #[test]
    fn configured_label_and_page_limits_apply() {
        let limits = Limits {
            max_labels: 2,
            max_label_key_bytes: 4,
            max_label_value_bytes: 3,
            max_page_size: 10,
            ..Limits::default()
        };
        let with = |pairs: &[(&str, &str)]| SubmitJobRequest {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..spec("sleep")
        };
        assert!(submit(&with(&[("a", "x"), ("bcde", "xyz")]), &limits).is_ok());
        for (labels, names) in [
            (&[("a", "1"), ("b", "2"), ("c", "3")][..], "max_labels"),
            (&[("abcde", "1")][..], "max_label_key_bytes"),
            (&[("a", "1234")][..], "max_label_value_bytes"),
        ] {
            let err = submit(&with(labels), &limits).unwrap_err();
            assert!(err.to_string().contains(names), "{err}");
            assert_eq!(field_of(err), "labels");
        }
        // The defaults allow what the configured limits refuse.
        assert!(submit(&with(&[("abcde", "1234")]), &Limits::default()).is_ok());

        let page = |n| ListJobsRequest {
            page_size: n,
            ..Default::default()
        };
        assert_eq!(list(&page(10), &limits).unwrap().page_size, 10);
        assert_eq!(
            list(&page(0), &limits).unwrap().page_size,
            10,
            "the default shrinks to the limit"
        );
        let err = list(&page(11), &limits).unwrap_err();
        assert!(
            err.to_string().contains("at most 10 (max_page_size)"),
            "{err}"
        );
        assert_eq!(field_of(err), "page_size");
    }
}
