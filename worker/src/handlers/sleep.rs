//! `sleep {"seconds": f}`: waits, then completes with `{"slept_seconds": f}`.
//! Stops as soon as its cancellation token fires.

use std::time::Duration;

use async_trait::async_trait;
use pbjson_types::Struct;
use serde_json::json;

use super::number;
use crate::error::HandlerError;
use crate::handler::{Handler, JobContext, to_struct};

/// The `sleep` handler.
#[derive(Debug, Clone, Copy)]
pub struct Sleep;

/// The validated duration of a sleep payload.
pub(crate) fn duration(payload: &Struct) -> Result<Duration, HandlerError> {
    let seconds = number(payload, "seconds")?.ok_or_else(|| {
        HandlerError::invalid_field("seconds", "is required (a number of seconds, e.g. 1.5)")
    })?;
    if seconds < 0.0 {
        return Err(HandlerError::invalid_field(
            "seconds",
            format!("must not be negative, got {seconds}"),
        ));
    }
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| HandlerError::invalid_field("seconds", format!("is too large: {seconds}")))
}

#[async_trait]
impl Handler for Sleep {
    async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError> {
        let duration = duration(&ctx.payload)?;
        tokio::select! {
            _ = ctx.cancel.cancelled() => Err(HandlerError::Cancelled),
            _ = tokio::time::sleep(duration) => to_struct(json!({ "slept_seconds": duration.as_secs_f64() })),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio::time::Instant;

    use super::*;
    use crate::handler::{from_struct, test_context};

    #[tokio::test(start_paused = true)]
    async fn sleeps_for_the_given_seconds() {
        let start = Instant::now();
        let out = Sleep
            .run(test_context("sleep", json!({"seconds": 1.5}), 1))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        assert_eq!(from_struct(&out), json!({"slept_seconds": 1.5}));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_once_when_cancelled() {
        let ctx = test_context("sleep", json!({"seconds": 3600}), 1);
        let cancel = ctx.cancel.clone();
        let start = Instant::now();
        let run = tokio::spawn(Sleep.run(ctx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
        assert_eq!(run.await.unwrap(), Err(HandlerError::Cancelled));
        assert!(
            start.elapsed() < Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn zero_seconds_completes_at_once() {
        assert!(
            Sleep
                .run(test_context("sleep", json!({"seconds": 0}), 1))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn invalid_seconds_fail_permanently_naming_the_field() {
        for (payload, expect) in [
            (json!({}), "is required"),
            (json!({"seconds": null}), "is required"),
            (json!({"seconds": -1}), "must not be negative"),
            (json!({"seconds": "5"}), "must be a number, got a string"),
            (json!({"seconds": true}), "must be a number, got a boolean"),
            (json!({"seconds": 1e300}), "too large"),
        ] {
            let err = Sleep
                .run(test_context("sleep", payload.clone(), 1))
                .await
                .unwrap_err();
            let HandlerError::Permanent(message) = err else {
                panic!("{payload}: {err:?}")
            };
            assert!(message.contains("\"seconds\""), "{message}");
            assert!(message.contains(expect), "{payload}: {message}");
        }
    }
}
