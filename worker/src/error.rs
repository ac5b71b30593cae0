//! The worker's error types: [`WorkerError`] for what stops the worker
//! itself, [`HandlerError`] for how one job's handler fails.

/// Why the worker could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// orchd's address could not be turned into a gRPC endpoint.
    #[error("invalid --server {url:?}: {message}")]
    Endpoint {
        /// The address given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// The same kind was registered twice.
    #[error("a handler for kind {0:?} is already registered")]
    DuplicateKind(String),
    /// The kind does not follow the naming rules of `Job.kind`.
    #[error("{0}")]
    InvalidKind(String),
}

/// How a handler failed. The worker reports it to orchd with
/// `FinishAttempt`, which decides whether the job is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The attempt failed; another attempt may succeed (orchd retries while
    /// attempts are left).
    #[error("{0}")]
    Retryable(String),
    /// The job can never succeed (bad payload, ...): no retry.
    #[error("{0}")]
    Permanent(String),
    /// The handler stopped because its cancellation token fired. The worker
    /// reports the attempt according to why it asked the handler to stop.
    #[error("cancelled")]
    Cancelled,
}

impl HandlerError {
    /// A permanent error about payload field `field`.
    pub fn invalid_field(field: &str, message: impl std::fmt::Display) -> Self {
        HandlerError::Permanent(format!("invalid payload field {field:?}: {message}"))
    }
}
