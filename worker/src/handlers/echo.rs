//! `echo`: completes with its payload as the result.

use async_trait::async_trait;
use pbjson_types::Struct;

use crate::error::HandlerError;
use crate::handler::{Handler, JobContext};

/// The `echo` handler.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError> {
        Ok(ctx.payload)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::handler::{from_struct, test_context};

    #[tokio::test]
    async fn returns_its_payload() {
        let payload = json!({"msg": "hi", "n": 2.0, "nested": {"list": [1.0, "two", null, false]}});
        let out = Echo
            .run(test_context("echo", payload.clone(), 1))
            .await
            .unwrap();
        assert_eq!(from_struct(&out), payload);
        let out = Echo.run(test_context("echo", json!({}), 1)).await.unwrap();
        assert_eq!(out, Struct::default());
    }
}
