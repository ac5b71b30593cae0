//! `noop`: completes at once with an empty result.

use async_trait::async_trait;
use pbjson_types::Struct;

use crate::error::HandlerError;
use crate::handler::{Handler, JobContext};

/// The `noop` handler.
#[derive(Debug, Clone, Copy)]
pub struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn run(&self, _ctx: JobContext) -> Result<Struct, HandlerError> {
        Ok(Struct::default())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::handler::test_context;

    #[tokio::test]
    async fn completes_empty_whatever_the_payload() {
        let out = Noop
            .run(test_context("noop", json!({"ignored": 1}), 1))
            .await
            .unwrap();
        assert_eq!(out, Struct::default());
    }
}
