//! Turning command-line arguments into validated gRPC requests, and the
//! conversions between `serde_json::Value` and the protobuf `Struct` /
//! `Value` well-known types.
//!
//! Everything here runs before a connection is opened, so invalid input is
//! reported (exit code 4) without sending anything.

use std::collections::HashMap;
use std::io::Read;

use orchestrator::proto::v1::{ListJobsRequest, SubmitJobRequest};
use pbjson_types::value::Kind;
use pbjson_types::{ListValue, Struct, Value};

use crate::args::{ListArgs, SubmitArgs};
use crate::exit::CliError;

/// Largest `page_size` orchd accepts.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Converts a JSON object into a protobuf `Struct`; anything else is an
/// error naming the JSON type that was given instead.
///
/// Written out rather than going through `serde_json::from_value::<Struct>`:
/// that deserializer turns a JSON `null` into a `Value` with no kind at all,
/// which is not a valid `google.protobuf.Value`; here `null` becomes
/// `NullValue`. Numbers become `f64`, as protobuf `Value` has no integers
/// (integers beyond ±2^53 lose precision).
pub fn json_to_struct(value: serde_json::Value) -> Result<Struct, String> {
    match value {
        serde_json::Value::Object(map) => Ok(map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect()),
        other => Err(format!("got {}", json_type_name(&other))),
    }
}

/// Converts any JSON value into a protobuf `Value`.
pub fn json_to_value(value: serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        // Without serde_json's arbitrary_precision, every number has an f64.
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(
            map.into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect(),
        ),
    };
    Value { kind: Some(kind) }
}

/// Converts a protobuf `Struct` back into a JSON object, keys sorted.
pub fn struct_to_json(s: &Struct) -> serde_json::Value {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    serde_json::Value::Object(
        keys.into_iter()
            .map(|k| (k.clone(), value_to_json(&s.fields[k])))
            .collect(),
    )
}

/// Converts a protobuf `Value` into JSON. Whole numbers within ±2^53 are
/// written as integers (`1`, not `1.0`); a `Value` without a kind is `null`.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

fn number_to_json(n: f64) -> serde_json::Value {
    const MAX_SAFE: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE {
        // Exact: |n| <= 2^53 fits an i64 without rounding.
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

fn json_type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Parses handler input given on the command line. `source` names where it
/// came from (`--payload`, `--payload-file job.json`) for the error message.
pub fn parse_payload(text: &str, source: &str) -> Result<Struct, CliError> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| CliError::InvalidInput(format!("{source} is not valid JSON: {e}")))?;
    json_to_struct(value)
        .map_err(|got| CliError::InvalidInput(format!("{source} must be a JSON object, {got}")))
}

/// Parses repeated `--label KEY=VALUE` flags. The value may itself contain
/// `=`; the key may not be empty or given twice.
pub fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>, CliError> {
    let mut map = HashMap::with_capacity(labels.len());
    for label in labels {
        let Some((key, value)) = label.split_once('=') else {
            return Err(CliError::InvalidInput(format!(
                "invalid --label {label:?}: expected KEY=VALUE"
            )));
        };
        if key.is_empty() {
            return Err(CliError::InvalidInput(format!(
                "invalid --label {label:?}: the key is empty"
            )));
        }
        if map.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(CliError::InvalidInput(format!(
                "--label {key:?} is given more than once"
            )));
        }
    }
    Ok(map)
}

/// Builds the `SubmitJobRequest` of `orchctl submit`, reading
/// `--payload-file` if given.
pub fn submit_request(args: &SubmitArgs) -> Result<SubmitJobRequest, CliError> {
    let payload = match (&args.payload, &args.payload_file) {
        (Some(text), _) => Some(parse_payload(text, "--payload")?),
        (None, Some(path)) => {
            let source = format!("--payload-file {}", path.display());
            let text = if path.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).map(|_| text)
            } else {
                std::fs::read_to_string(path)
            }
            .map_err(|e| CliError::InvalidInput(format!("cannot read {source}: {e}")))?;
            Some(parse_payload(&text, &source)?)
        }
        (None, None) => None,
    };
    Ok(SubmitJobRequest {
        kind: args.kind.clone(),
        payload,
        queue: args.queue.clone().unwrap_or_default(),
        max_attempts: args.max_attempts.unwrap_or(0),
        retry: None,
        labels: parse_labels(&args.labels)?,
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        timeout: args.timeout.map(|d| pbjson_types::Duration::from(*d)),
        namespace: args.namespace.clone().unwrap_or_default(),
    })
}

/// Builds the first `ListJobsRequest` of `orchctl list`; the caller sets
/// `page_size` and `page_token` for each page.
pub fn list_request(args: &ListArgs) -> ListJobsRequest {
    ListJobsRequest {
        state: args
            .state
            .map(|s| orchestrator::proto::v1::job::State::from(s) as i32)
            .unwrap_or(0),
        kind: args.kind.clone().unwrap_or_default(),
        queue: args.queue.clone().unwrap_or_default(),
        page_size: args.limit.min(MAX_PAGE_SIZE),
        page_token: String::new(),
        namespace: args.namespace.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;
    use serde_json::json;

    fn submit_args(args: &[&str]) -> SubmitArgs {
        let cli = Cli::try_parse_from(["orchctl", "submit"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Submit(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_object_round_trips_through_struct() {
        let input = json!({
            "seconds": 1,
            "ratio": 0.25,
            "name": "x",
            "flag": true,
            "nothing": null,
            "list": [1, "two", [3], {"four": 4}],
            "nested": {"a": {"b": -7}},
        });
        let s = json_to_struct(input.clone()).unwrap();
        assert_eq!(
            s.fields["nothing"].kind,
            Some(Kind::NullValue(0)),
            "null must be a NullValue, not a Value without kind"
        );
        assert_eq!(s.fields["seconds"].kind, Some(Kind::NumberValue(1.0)));
        assert_eq!(struct_to_json(&s), input);

        // The proto3 JSON of the Struct (pbjson, as in -o json) is the same
        // object, numbers as floats.
        let pbjson = serde_json::to_value(&s).unwrap();
        assert_eq!(pbjson["seconds"], json!(1.0));
        assert_eq!(pbjson["nested"], json!({"a": {"b": -7.0}}));
        assert_eq!(pbjson["nothing"], json!(null));
    }

    #[test]
    fn our_conversion_agrees_with_pbjson_deserialize_except_for_null() {
        let input = json!({"a": 1, "b": [true, "s"], "c": {"d": 2.5}});
        let ours = json_to_struct(input.clone()).unwrap();
        let theirs: Struct = serde_json::from_value(input).unwrap();
        assert_eq!(ours, theirs);

        // The difference that makes the hand-written conversion necessary.
        let theirs: Struct = serde_json::from_value(json!({"n": null})).unwrap();
        assert_eq!(theirs.fields["n"].kind, None);
        let ours = json_to_struct(json!({"n": null})).unwrap();
        assert_eq!(ours.fields["n"].kind, Some(Kind::NullValue(0)));
    }

    #[test]
    fn non_objects_are_rejected_with_their_type() {
        for (v, name) in [
            (json!([1]), "an array"),
            (json!("s"), "a string"),
            (json!(3), "a number"),
            (json!(null), "null"),
            (json!(false), "a boolean"),
        ] {
            assert_eq!(json_to_struct(v).unwrap_err(), format!("got {name}"));
        }
        assert_eq!(json_to_struct(json!({})).unwrap(), Struct::default());
    }

    #[test]
    fn value_to_json_keeps_fractions_and_large_numbers() {
        let v = |n: f64| value_to_json(&Value::from(n));
        assert_eq!(v(2.0), json!(2));
        assert_eq!(v(-0.5), json!(-0.5));
        assert_eq!(v(1e300), json!(1e300));
        assert_eq!(value_to_json(&Value { kind: None }), json!(null));
    }

    #[test]
    fn payload_must_be_a_json_object() {
        let err = submit_request(&submit_args(&["k", "--payload", "[1,2]"])).unwrap_err();
        assert!(matches!(err, CliError::InvalidInput(_)));
        assert_eq!(err.exit_code(), 4);
        assert_eq!(
            err.to_string(),
            "--payload must be a JSON object, got an array"
        );

        let err = submit_request(&submit_args(&["k", "--payload", "{seconds: 1}"])).unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert!(
            err.to_string().starts_with("--payload is not valid JSON: "),
            "{err}"
        );
    }

    #[test]
    fn payload_file_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("orchctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"seconds": 2}"#).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "42").unwrap();

        let req = submit_request(&submit_args(&[
            "k",
            "--payload-file",
            good.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(struct_to_json(&req.payload.unwrap()), json!({"seconds": 2}));

        let err = submit_request(&submit_args(&[
            "k",
            "--payload-file",
            bad.to_str().unwrap(),
        ]))
        .unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert!(
            err.to_string()
                .contains("must be a JSON object, got a number")
        );

        let missing = dir.join("missing.json");
        let err = submit_request(&submit_args(&[
            "k",
            "--payload-file",
            missing.to_str().unwrap(),
        ]))
        .unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert!(err.to_string().starts_with("cannot read --payload-file "));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn labels_need_key_and_equals_sign() {
        let labels = parse_labels(&["team=ml".into(), "expr=a=b".into(), "empty=".into()]).unwrap();
        assert_eq!(labels["team"], "ml");
        assert_eq!(labels["expr"], "a=b");
        assert_eq!(labels["empty"], "");

        let err = submit_request(&submit_args(&["k", "--label", "team"])).unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert_eq!(
            err.to_string(),
            r#"invalid --label "team": expected KEY=VALUE"#
        );
        assert!(parse_labels(&["=v".into()]).is_err());
        assert!(parse_labels(&["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn submit_request_carries_every_flag() {
        let req = submit_request(&submit_args(&[
            "sleep",
            "--payload",
            r#"{"seconds":1}"#,
            "--queue",
            "fast",
            "--max-attempts",
            "4",
            "--label",
            "a=b",
            "--idempotency-key",
            "key-1",
            "--timeout",
            "30s",
        ]))
        .unwrap();
        assert_eq!(req.kind, "sleep");
        assert_eq!(
            struct_to_json(req.payload.as_ref().unwrap()),
            json!({"seconds": 1})
        );
        assert_eq!(req.queue, "fast");
        assert_eq!(req.max_attempts, 4);
        assert_eq!(req.labels, HashMap::from([("a".into(), "b".into())]));
        assert_eq!(req.idempotency_key, "key-1");
        assert_eq!(
            req.timeout,
            Some(pbjson_types::Duration {
                seconds: 30,
                nanos: 0
            })
        );

        let req = submit_request(&submit_args(&["sleep"])).unwrap();
        assert_eq!(req.payload, None);
        assert_eq!(req.queue, "");
        assert_eq!(req.max_attempts, 0);
        assert_eq!(req.timeout, None);
    }

    #[test]
    fn list_request_maps_filters() {
        let cli =
            Cli::try_parse_from(["orchctl", "list", "--state", "RETRYING", "--limit", "5000"])
                .unwrap();
        let Command::List(args) = cli.command else {
            panic!()
        };
        let req = list_request(&args);
        assert_eq!(req.state, 6);
        assert_eq!(req.page_size, MAX_PAGE_SIZE);
        assert_eq!(req.kind, "");
    }
}
