//! The library's error type, and the one place where errors become gRPC
//! status codes and gRPC codes become HTTP status codes.

use tonic::Code;

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
    /// A limit was hit; the caller may retry later.
    #[error("{0}")]
    ResourceExhausted(String),
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
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Internal(_) => Code::Internal,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code(), err.to_string())
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
                Error::ResourceExhausted("slow down".into()),
                Code::ResourceExhausted,
                429,
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
    fn grpc_gateway_codes_for_auth_and_limits() {
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::PermissionDenied), 403);
        assert_eq!(http_status(Code::AlreadyExists), 409);
    }
}
