//! The built-in handlers, one module each, and the payload accessors they
//! share (each validation error names the offending field and is
//! permanent: a malformed payload never succeeds on retry).

pub mod echo;
pub mod exec;
pub mod fail;
pub mod noop;
pub mod sleep;

use pbjson_types::Struct;
use pbjson_types::value::Kind;

use crate::error::HandlerError;

/// The JSON type name of a value, for error messages.
fn type_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None | Some(Kind::NullValue(_)) => "null",
        Some(Kind::NumberValue(_)) => "a number",
        Some(Kind::StringValue(_)) => "a string",
        Some(Kind::BoolValue(_)) => "a boolean",
        Some(Kind::StructValue(_)) => "an object",
        Some(Kind::ListValue(_)) => "a list",
    }
}

/// The value of `field`, treating an explicit null like a missing field.
fn field<'a>(payload: &'a Struct, name: &str) -> Option<&'a Kind> {
    payload
        .fields
        .get(name)
        .and_then(|v| v.kind.as_ref())
        .filter(|k| !matches!(k, Kind::NullValue(_)))
}

/// An optional number field.
pub(crate) fn number(payload: &Struct, name: &str) -> Result<Option<f64>, HandlerError> {
    match field(payload, name) {
        None => Ok(None),
        Some(Kind::NumberValue(n)) if n.is_finite() => Ok(Some(*n)),
        Some(Kind::NumberValue(n)) => Err(HandlerError::invalid_field(
            name,
            format!("must be a finite number, got {n}"),
        )),
        other => Err(HandlerError::invalid_field(
            name,
            format!("must be a number, got {}", type_name(other)),
        )),
    }
}

/// An optional string field.
pub(crate) fn string<'a>(payload: &'a Struct, name: &str) -> Result<Option<&'a str>, HandlerError> {
    match field(payload, name) {
        None => Ok(None),
        Some(Kind::StringValue(s)) => Ok(Some(s)),
        other => Err(HandlerError::invalid_field(
            name,
            format!("must be a string, got {}", type_name(other)),
        )),
    }
}

/// An optional boolean field.
pub(crate) fn boolean(payload: &Struct, name: &str) -> Result<Option<bool>, HandlerError> {
    match field(payload, name) {
        None => Ok(None),
        Some(Kind::BoolValue(b)) => Ok(Some(*b)),
        other => Err(HandlerError::invalid_field(
            name,
            format!("must be a boolean, got {}", type_name(other)),
        )),
    }
}

/// An optional non-negative whole number field (JSON numbers are doubles).
pub(crate) fn count(payload: &Struct, name: &str) -> Result<Option<u32>, HandlerError> {
    match number(payload, name)? {
        None => Ok(None),
        Some(n) if n >= 0.0 && n.fract() == 0.0 && n <= f64::from(u32::MAX) => Ok(Some(n as u32)),
        Some(n) => Err(HandlerError::invalid_field(
            name,
            format!("must be a non-negative whole number, got {n}"),
        )),
    }
}

/// An optional list-of-strings field.
pub(crate) fn strings(payload: &Struct, name: &str) -> Result<Option<Vec<String>>, HandlerError> {
    match field(payload, name) {
        None => Ok(None),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| match &v.kind {
                Some(Kind::StringValue(s)) => Ok(s.clone()),
                other => Err(HandlerError::invalid_field(
                    name,
                    format!(
                        "item {i} must be a string, got {}",
                        type_name(other.as_ref())
                    ),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(HandlerError::invalid_field(
            name,
            format!("must be a list of strings, got {}", type_name(other)),
        )),
    }
}

/// An optional object-of-strings field, e.g. environment variables.
pub(crate) fn string_map(
    payload: &Struct,
    name: &str,
) -> Result<Option<Vec<(String, String)>>, HandlerError> {
    match field(payload, name) {
        None => Ok(None),
        Some(Kind::StructValue(map)) => {
            let mut pairs = map
                .fields
                .iter()
                .map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(s)) => Ok((k.clone(), s.clone())),
                    other => Err(HandlerError::invalid_field(
                        name,
                        format!(
                            "value of {k:?} must be a string, got {}",
                            type_name(other.as_ref())
                        ),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            pairs.sort();
            Ok(Some(pairs))
        }
        other => Err(HandlerError::invalid_field(
            name,
            format!("must be an object of strings, got {}", type_name(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::handler::to_struct;

    fn payload(v: serde_json::Value) -> Struct {
        to_struct(v).unwrap()
    }

    #[test]
    fn accessors_check_types_and_name_the_field() {
        let p = payload(json!({
            "n": 1.5, "s": "x", "b": true, "c": 3, "l": ["a", "b"], "m": {"K": "v"}, "z": null
        }));
        assert_eq!(number(&p, "n").unwrap(), Some(1.5));
        assert_eq!(number(&p, "missing").unwrap(), None);
        assert_eq!(number(&p, "z").unwrap(), None, "null is missing");
        assert_eq!(string(&p, "s").unwrap(), Some("x"));
        assert_eq!(boolean(&p, "b").unwrap(), Some(true));
        assert_eq!(count(&p, "c").unwrap(), Some(3));
        assert_eq!(
            strings(&p, "l").unwrap(),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            string_map(&p, "m").unwrap(),
            Some(vec![("K".into(), "v".into())])
        );

        let e = number(&p, "s").unwrap_err();
        assert_eq!(
            e,
            HandlerError::Permanent(
                "invalid payload field \"s\": must be a number, got a string".into()
            )
        );
        assert!(string(&p, "n").unwrap_err().to_string().contains("\"n\""));
        assert!(boolean(&p, "s").is_err());
        assert!(
            count(&p, "n")
                .unwrap_err()
                .to_string()
                .contains("whole number")
        );
        let bad = payload(json!({"l": ["a", 1], "m": {"K": 1}}));
        assert!(
            strings(&bad, "l")
                .unwrap_err()
                .to_string()
                .contains("item 1")
        );
        assert!(
            string_map(&bad, "m")
                .unwrap_err()
                .to_string()
                .contains("\"K\"")
        );
    }
}
