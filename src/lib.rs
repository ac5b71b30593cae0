//! Shared library of the orchestrator platform: the protobuf contract, the
//! job model and its state machine, input validation, the Redis store, the
//! RabbitMQ topology and message format, the client side of TLS, and the
//! error type with its mapping to gRPC status codes.

pub mod attempt;
pub mod auth;
pub mod error;
pub mod job;
pub mod process;
pub mod proto;
pub mod state;
pub mod tls;
pub mod validate;

pub use error::{Error, Result};
pub use state::State;
pub mod queue;
pub mod store;
