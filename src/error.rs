//! The library's error type, and the one place where errors become gRPC
//! status codes and gRPC codes become HTTP status codes, including the retry
//! hint of a RESOURCE_EXHAUSTED answer (`retry-after` metadata and a
//! `google.rpc.RetryInfo` detail on gRPC, a `Retry-After` header on HTTP).

use std::time::Duration;

use tonic::Code;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic_types::{ErrorDetails, StatusExt};

use crate::state::{IllegalTransition, State};

/// Everything a job operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the offending field.
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// Name of the field as it appears in the API.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No job with this id.
    #[error("job {0} not found")]
    NotFound(String),
    /// The state machine refused the change.
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    /// The operation does not apply to the job as it is now.
    #[error("job is {state}: {message}")]
    FailedPrecondition {
        /// The job's state when the operation was refused.
        state: State,
        /// Why it was refused.
        message: String,
    },
    /// A report from an attempt that no longer holds the job's lease.
    #[error("stale attempt: {0}")]
    StaleLease(String),
    /// Another writer changed the job first; retrying may succeed.
    #[error("concurrent update: {0}")]
    Conflict(String),
    /// Redis or RabbitMQ could not be reached.
    #[error("{service} unavailable: {message}")]
    Unavailable {
        /// "redis", "rabbitmq", ...
        service: &'static str,
        /// The underlying error.
        message: String,
    },
    /// A per-caller limit was hit (the submit rate, open watch streams); the
    /// caller may retry later, after `retry_after` when it is known.
    #[error("{message}")]
    ResourceExhausted {
        /// The limit, named as its setting (`submit_rate`, ...).
        limit: &'static str,
        /// What was exceeded, naming the limit, its value and the caller.
        message: String,
        /// When a retry can succeed, if the server knows.
        retry_after: Option<Duration>,
    },
    /// The request is larger than the server accepts; retrying cannot help.
    /// OUT_OF_RANGE on gRPC (as tonic reports a message over its size
    /// limit), HTTP 413.
    #[error("request too large: {message}")]
    TooLarge {
        /// The limit, named as its setting (`max_request_bytes`).
        limit: &'static str,
        /// How large the request was and what the limit is.
        message: String,
    },
    /// The request took longer than the server's per-request limit.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// A bug or corrupt data.
    #[error("internal error: {0}")]
    Internal(String),
    /// No valid credentials: the bearer token is missing, malformed or
    /// unknown. The message never contains the token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials whose role may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A validation error on `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::IllegalTransition(_)
            | Error::FailedPrecondition { .. }
            | Error::StaleLease(_) => Code::FailedPrecondition,
            Error::Conflict(_) => Code::Aborted,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::TooLarge { .. } => Code::OutOfRange,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
        }
    }

    /// The HTTP status of this error on the REST surface: the one of its
    /// gRPC code, except 413 for a request that is too large.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::TooLarge { .. } => 413,
            other => http_status(other.code()),
        }
    }

    /// How long the caller should wait before retrying, when known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::ResourceExhausted { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The retry hint in whole seconds, rounded up and at least 1, as HTTP's
/// `Retry-After` header and the gRPC `retry-after` metadata carry it.
pub fn retry_after_secs(delay: Duration) -> u64 {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    secs.max(1)
}

/// Name of the gRPC metadata entry that carries the retry hint in seconds.
pub const RETRY_AFTER_METADATA: &str = "retry-after";

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        match err.retry_after() {
            Some(delay) => {
                let mut metadata = MetadataMap::new();
                metadata.insert(
                    RETRY_AFTER_METADATA,
                    MetadataValue::from(retry_after_secs(delay)),
                );
                tonic::Status::with_error_details_and_metadata(
                    code,
                    err.to_string(),
                    ErrorDetails::with_retry_info(Some(delay)),
                    metadata,
                )
            }
            None => tonic::Status::new(code, err.to_string()),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.is_unrecoverable_error()
        {
            Error::Unavailable {
                service: "redis",
                message: err.to_string(),
            }
        } else {
            Error::Internal(format!("redis: {err}"))
        }
    }
}

impl From<redis::ParsingError> for Error {
    fn from(err: redis::ParsingError) -> Self {
        Error::Internal(format!("unexpected reply from redis: {err}"))
    }
}

impl From<lapin::Error> for Error {
    fn from(err: lapin::Error) -> Self {
        Error::Unavailable {
            service: "rabbitmq",
            message: err.to_string(),
        }
    }
}

/// The HTTP status grpc-gateway uses for a gRPC code.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::PermissionDenied => 403,
        Code::Unauthenticated => 401,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_codes() {
        let cases = [
            (
                Error::invalid("kind", "must not be empty"),
                Code::InvalidArgument,
                400,
            ),
            (Error::NotFound("x".into()), Code::NotFound, 404),
            (
                IllegalTransition {
                    from: State::Completed,
                    to: State::Running,
                }
                .into(),
                Code::FailedPrecondition,
                400,
            ),
            (Error::Conflict("x".into()), Code::Aborted, 409),
            (
                Error::Unavailable {
                    service: "redis",
                    message: "down".into(),
                },
                Code::Unavailable,
                503,
            ),
            (
                Error::ResourceExhausted {
                    limit: "submit_rate",
                    message: "slow down".into(),
                    retry_after: None,
                },
                Code::ResourceExhausted,
                429,
            ),
            (
                Error::DeadlineExceeded("slow".into()),
                Code::DeadlineExceeded,
                504,
            ),
            (Error::Internal("bug".into()), Code::Internal, 500),
            (
                Error::Unauthenticated("missing".into()),
                Code::Unauthenticated,
                401,
            ),
            (
                Error::PermissionDenied("role".into()),
                Code::PermissionDenied,
                403,
            ),
        ];
        for (err, code, http) in cases {
            assert_eq!(err.code(), code, "{err}");
            assert_eq!(http_status(err.code()), http, "{err}");
            assert_eq!(err.http_status(), http, "{err}");
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
        }
    }

    #[test]
    fn messages_name_the_field_or_states() {
        assert_eq!(
            Error::invalid("max_attempts", "must be between 1 and 100, got 0").to_string(),
            "invalid max_attempts: must be between 1 and 100, got 0"
        );
        let e: Error = IllegalTransition {
            from: State::Failed,
            to: State::Cancelled,
        }
        .into();
        assert_eq!(e.to_string(), "illegal transition from FAILED to CANCELLED");
    }

    #[test]
    fn too_large_is_out_of_range_on_grpc_and_413_on_http() {
        let err = Error::TooLarge {
            limit: "max_request_bytes",
            message: "the body is more than 10 bytes (max_request_bytes)".into(),
        };
        assert_eq!(err.code(), Code::OutOfRange);
        assert_eq!(err.http_status(), 413);
        assert_eq!(http_status(err.code()), 400);
        assert!(err.to_string().contains("max_request_bytes"), "{err}");
    }

    #[test]
    fn resource_exhausted_carries_the_retry_hint_on_grpc() {
        let err = Error::ResourceExhausted {
            limit: "submit_rate",
            message: "submit rate limit of 2/s for token \"alice\" exceeded; retry after 120ms"
                .into(),
            retry_after: Some(Duration::from_millis(120)),
        };
        assert_eq!(err.retry_after(), Some(Duration::from_millis(120)));
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("retry after 120ms"));
        assert_eq!(
            status.metadata().get(RETRY_AFTER_METADATA).unwrap(),
            "1",
            "rounded up to whole seconds"
        );
        let info = status.get_details_retry_info().expect("a RetryInfo detail");
        assert_eq!(info.retry_delay, Some(Duration::from_millis(120)));
        // Without a hint, no metadata and no details.
        let status = tonic::Status::from(Error::ResourceExhausted {
            limit: "max_watches_per_token",
            message: "too many".into(),
            retry_after: None,
        });
        assert!(status.metadata().get(RETRY_AFTER_METADATA).is_none());
        assert!(status.details().is_empty());
    }

    #[test]
    fn retry_hints_round_up_to_whole_seconds() {
        for (delay, secs) in [
            (Duration::ZERO, 1),
            (Duration::from_millis(1), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_secs(3600), 3600),
        ] {
            assert_eq!(retry_after_secs(delay), secs, "{delay:?}");
        }
    }

    #[test]
    fn grpc_gateway_codes_for_auth_and_limits() {
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::PermissionDenied), 403);
        assert_eq!(http_status(Code::AlreadyExists), 409);
    }
}
