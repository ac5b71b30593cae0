//! `fail {"message": s, "succeed_on_attempt": n, "permanent": bool}`: fails
//! with `message` until attempt `n` (always when `n` is absent), then
//! completes with `{"attempt": n}`. `permanent: true` fails without retry.
//! For testing retries and failure reporting.

use async_trait::async_trait;
use pbjson_types::Struct;
use serde_json::json;

use super::{boolean, count, string};
use crate::error::HandlerError;
use crate::handler::{Handler, JobContext, to_struct};

/// Message used when the payload gives none.
pub const DEFAULT_MESSAGE: &str = "failed on purpose (fail handler)";

/// The `fail` handler.
#[derive(Debug, Clone, Copy)]
pub struct Fail;

/// What the `fail` handler does on `attempt` with `payload`.
pub(crate) fn outcome(payload: &Struct, attempt: u32) -> Result<Struct, HandlerError> {
    let message = string(payload, "message")?
        .unwrap_or(DEFAULT_MESSAGE)
        .to_owned();
    let succeed_on = count(payload, "succeed_on_attempt")?;
    let permanent = boolean(payload, "permanent")?.unwrap_or(false);
    if succeed_on.is_some_and(|n| attempt >= n) {
        return to_struct(json!({ "attempt": attempt }));
    }
    if permanent {
        Err(HandlerError::Permanent(message))
    } else {
        Err(HandlerError::Retryable(message))
    }
}

#[async_trait]
impl Handler for Fail {
    async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError> {
        outcome(&ctx.payload, ctx.attempt)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::handler::{from_struct, test_context};

    async fn run(
        payload: serde_json::Value,
        attempt: u32,
    ) -> Result<serde_json::Value, HandlerError> {
        Fail.run(test_context("fail", payload, attempt))
            .await
            .map(|s| from_struct(&s))
    }

    #[tokio::test]
    async fn fails_until_the_given_attempt() {
        let p = json!({"message": "flaky", "succeed_on_attempt": 3});
        assert_eq!(
            run(p.clone(), 1).await,
            Err(HandlerError::Retryable("flaky".into()))
        );
        assert_eq!(
            run(p.clone(), 2).await,
            Err(HandlerError::Retryable("flaky".into()))
        );
        assert_eq!(run(p.clone(), 3).await, Ok(json!({"attempt": 3.0})));
        assert_eq!(run(p, 4).await, Ok(json!({"attempt": 4.0})));
    }

    #[tokio::test]
    async fn fails_always_without_succeed_on_attempt() {
        for attempt in [1, 2, 50] {
            assert_eq!(
                run(json!({}), attempt).await,
                Err(HandlerError::Retryable(DEFAULT_MESSAGE.into()))
            );
        }
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let p = json!({"message": "bad input", "permanent": true});
        assert_eq!(
            run(p, 1).await,
            Err(HandlerError::Permanent("bad input".into()))
        );
        // succeed_on_attempt still wins once reached.
        let p = json!({"permanent": true, "succeed_on_attempt": 1});
        assert!(run(p, 1).await.is_ok());
    }

    #[tokio::test]
    async fn malformed_fields_fail_permanently_naming_the_field() {
        for (p, field) in [
            (json!({"message": 5}), "message"),
            (json!({"succeed_on_attempt": 1.5}), "succeed_on_attempt"),
            (json!({"succeed_on_attempt": -1}), "succeed_on_attempt"),
            (json!({"permanent": "yes"}), "permanent"),
        ] {
            let Err(HandlerError::Permanent(m)) = run(p.clone(), 1).await else {
                panic!("{p}")
            };
            assert!(m.contains(&format!("\"{field}\"")), "{m}");
        }
    }
}
