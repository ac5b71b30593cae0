//! The error type of `orchctl` and how each error maps to a process exit code.
//!
//! Every failure the library can report is a [`CliError`]; `main` prints it
//! to stderr as `error: <message>` and exits with [`CliError::exit_code`].
//! The codes are listed once, in [`EXIT_CODES_HELP`], which is also the
//! "Exit codes" section of `orchctl --help`.

use std::fmt;
use std::time::Duration;

use orchestrator::error::RETRY_AFTER_METADATA;
use tonic::Code;
use tonic_types::StatusExt;

/// The command completed (for `watch` and `submit --wait`: the job COMPLETED).
pub const OK: u8 = 0;
/// Any error not covered by a more specific code.
pub const GENERIC: u8 = 1;
/// The command line could not be used (clap's own code for parse errors).
pub const USAGE: u8 = 2;
/// The job does not exist (NOT_FOUND).
pub const NOT_FOUND: u8 = 3;
/// The request was rejected as invalid, locally or by orchd.
pub const INVALID_INPUT: u8 = 4;
/// orchd could not be reached or did not answer in time.
pub const UNAVAILABLE: u8 = 5;
/// The token is missing, wrong or not allowed to do this.
pub const AUTH: u8 = 6;
/// A per-token limit of orchd was hit (RESOURCE_EXHAUSTED); retry later.
pub const LIMITED: u8 = 7;
/// `watch` / `submit --wait`: the job ended FAILED.
pub const JOB_FAILED: u8 = 10;
/// `watch` / `submit --wait`: the job ended CANCELLED.
pub const JOB_CANCELLED: u8 = 11;

/// The "Exit codes" section of the long help.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
   0  success; for `watch` and `submit --wait`: the job COMPLETED
   1  any other error (including gRPC codes not listed below)
   2  usage error: bad flags or arguments, invalid --server URL or --token
   3  not found (NOT_FOUND)
   4  invalid input: --payload not a JSON object, --label without '=', an
      unreadable --payload-file, or orchd answered INVALID_ARGUMENT,
      FAILED_PRECONDITION (e.g. cancelling a finished job) or OUT_OF_RANGE
   5  orchd unavailable: cannot connect (5 s connect timeout), UNAVAILABLE,
      DEADLINE_EXCEEDED (30 s per call), or a watch stream that ended before
      the job was terminal
   6  authentication: UNAUTHENTICATED or PERMISSION_DENIED
   7  a limit of orchd was hit (RESOURCE_EXHAUSTED): the token's submit
      rate or its open watch streams; the message says when to retry
  10  `watch` / `submit --wait`: the job ended FAILED
  11  `watch` / `submit --wait`: the job ended CANCELLED

Errors are printed to stderr as `error: <message>`, with the gRPC code name
for errors returned by orchd (e.g. `error: NOT_FOUND: job ... not found`).
Data (ids, tables, JSON) goes to stdout only.";

/// Everything that can make an `orchctl` command fail.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is unusable in a way clap could not check (e.g. the
    /// `--server` URL). Exit code [`USAGE`].
    #[error("{0}")]
    Usage(String),
    /// The request described on the command line is invalid; nothing was
    /// sent. Exit code [`INVALID_INPUT`].
    #[error("{0}")]
    InvalidInput(String),
    /// orchd could not be reached. Exit code [`UNAVAILABLE`].
    #[error("cannot reach orchd at {server}: {reason}")]
    Connect {
        /// The server URL that was dialled.
        server: String,
        /// Why, with the whole error chain.
        reason: String,
    },
    /// orchd answered with an error status (or the connection failed
    /// during the call: UNAVAILABLE). Exit code by [`code_exit`].
    #[error("{}", StatusDisplay(.0))]
    Rpc(tonic::Status),
    /// The watch stream ended while the job was not terminal yet.
    /// Exit code [`UNAVAILABLE`].
    #[error("the watch of job {id} ended before the job finished (last state {state})")]
    WatchEnded {
        /// The watched job.
        id: String,
        /// The last state seen.
        state: String,
    },
    /// The watched job ended FAILED. Exit code [`JOB_FAILED`].
    #[error("job {id} FAILED: {error}")]
    JobFailed {
        /// The job.
        id: String,
        /// The job's `error`.
        error: String,
    },
    /// The watched job ended CANCELLED. Exit code [`JOB_CANCELLED`].
    #[error("job {id} CANCELLED{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    JobCancelled {
        /// The job.
        id: String,
        /// The job's `error` (why it was cancelled), if any.
        reason: String,
    },
    /// Output could not be produced or written. Exit code [`GENERIC`], or
    /// [`OK`] when stdout was closed by the reader (`orchctl list | head`).
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// A job could not be rendered as JSON. Exit code [`GENERIC`].
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// How the message of a connection that failed during a call starts.
pub const CONNECTION_FAILED: &str = "connection to orchd failed";

impl From<tonic::Status> for CliError {
    /// A status made on this side from a failed connection (tonic reports
    /// those as UNKNOWN "transport error", with the cause as its source)
    /// becomes UNAVAILABLE with the cause, e.g. a TLS alert from a server
    /// that wants a client certificate.
    fn from(status: tonic::Status) -> Self {
        let local_failure =
            status.code() == Code::Unknown && std::error::Error::source(&status).is_some();
        if !local_failure {
            return CliError::Rpc(status);
        }
        let reason = match orchestrator::tls::handshake_failure(&status) {
            Some(why) => format!("TLS handshake failed: {why}"),
            None => {
                let cause = std::error::Error::source(&status).expect("checked above");
                format!("{CONNECTION_FAILED}: {}", error_chain(cause))
            }
        };
        CliError::Rpc(tonic::Status::unavailable(reason))
    }
}

impl CliError {
    /// The process exit code for this error (see [`EXIT_CODES_HELP`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => USAGE,
            CliError::InvalidInput(_) => INVALID_INPUT,
            CliError::Connect { .. } | CliError::WatchEnded { .. } => UNAVAILABLE,
            CliError::Rpc(status) => code_exit(status.code()),
            CliError::JobFailed { .. } => JOB_FAILED,
            CliError::JobCancelled { .. } => JOB_CANCELLED,
            CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => OK,
            CliError::Output(_) | CliError::Json(_) => GENERIC,
        }
    }

    /// Whether this is a write to a stdout whose reader went away; such an
    /// error ends the command quietly.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// The exit code for an error status with this gRPC code.
pub fn code_exit(code: Code) -> u8 {
    match code {
        Code::NotFound => NOT_FOUND,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => INVALID_INPUT,
        Code::Unavailable | Code::DeadlineExceeded => UNAVAILABLE,
        Code::Unauthenticated | Code::PermissionDenied => AUTH,
        Code::ResourceExhausted => LIMITED,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::AlreadyExists
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => GENERIC,
    }
}

/// The canonical upper-case name of a gRPC code, as in the gRPC spec
/// (`NOT_FOUND`, `INVALID_ARGUMENT`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// When orchd says a retry can succeed: its `google.rpc.RetryInfo` detail,
/// or else its `retry-after` metadata (whole seconds).
pub fn retry_hint(status: &tonic::Status) -> Option<Duration> {
    if let Some(delay) = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
    {
        return Some(delay);
    }
    let secs = status.metadata().get(RETRY_AFTER_METADATA)?;
    secs.to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

/// Renders a status as `CODE_NAME: message` (the code's description when
/// the server sent no message), with the retry hint when the server gave
/// one that the message does not already state.
struct StatusDisplay<'a>(&'a tonic::Status);

impl fmt::Display for StatusDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.0;
        let message = status.message().trim();
        let message = if message.is_empty() {
            status.code().description()
        } else {
            message
        };
        write!(f, "{}: {}", code_name(status.code()), message)?;
        if let Some(delay) = retry_hint(status)
            && !message.contains("retry after")
        {
            write!(f, "; retry after {}", humantime::format_duration(delay))?;
        }
        Ok(())
    }
}

/// Renders an error with its whole `source()` chain, `outer: inner: ...`,
/// skipping a source whose text the previous one already contains.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_CODES: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    #[test]
    fn every_grpc_code_has_its_exit_code() {
        for code in ALL_CODES {
            let expected = match code {
                Code::NotFound => 3,
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 4,
                Code::Unavailable | Code::DeadlineExceeded => 5,
                Code::Unauthenticated | Code::PermissionDenied => 6,
                Code::ResourceExhausted => 7,
                _ => 1,
            };
            assert_eq!(code_exit(code), expected, "{code:?}");
            let err = CliError::Rpc(tonic::Status::new(code, "x"));
            assert_eq!(err.exit_code(), expected, "{code:?}");
        }
    }

    #[test]
    fn code_names_are_the_canonical_ones() {
        for code in ALL_CODES {
            // The canonical name is the SCREAMING_SNAKE_CASE of the variant.
            let debug = format!("{code:?}");
            let mut snake = String::new();
            for (i, c) in debug.chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_uppercase());
            }
            assert_eq!(code_name(code), snake);
        }
        // Wire values agree too.
        assert_eq!(Code::from(5), Code::NotFound);
        assert_eq!(code_name(Code::from(5)), "NOT_FOUND");
    }

    #[test]
    fn other_errors_have_distinct_exit_codes() {
        let cases = [
            (CliError::Usage("u".into()), 2),
            (CliError::InvalidInput("i".into()), 4),
            (
                CliError::Connect {
                    server: "http://x".into(),
                    reason: "refused".into(),
                },
                5,
            ),
            (
                CliError::WatchEnded {
                    id: "j".into(),
                    state: "RUNNING".into(),
                },
                5,
            ),
            (
                CliError::JobFailed {
                    id: "j".into(),
                    error: "boom".into(),
                },
                10,
            ),
            (
                CliError::JobCancelled {
                    id: "j".into(),
                    reason: String::new(),
                },
                11,
            ),
            (CliError::Output(std::io::Error::other("disk full")), 1),
            (CliError::Output(std::io::ErrorKind::BrokenPipe.into()), 0),
        ];
        for (err, code) in cases {
            assert_eq!(err.exit_code(), code, "{err}");
        }
    }

    #[test]
    fn rpc_errors_show_code_name_and_server_message() {
        let err = CliError::Rpc(tonic::Status::not_found("job 42 not found"));
        assert_eq!(err.to_string(), "NOT_FOUND: job 42 not found");
        let err = CliError::Rpc(tonic::Status::unavailable(""));
        assert_eq!(
            err.to_string(),
            "UNAVAILABLE: The service is currently unavailable"
        );
    }

    #[test]
    fn limit_errors_exit_7_and_show_the_retry_hint() {
        // orchd's own answer: the hint is in the message, the metadata and
        // the RetryInfo detail; it is shown once.
        let status = tonic::Status::from(orchestrator::Error::ResourceExhausted {
            limit: "submit_rate",
            message: "submit rate limit of 2/s (burst 2, submit_rate) for token \"alice\" exceeded; retry after 500ms".into(),
            retry_after: Some(Duration::from_millis(500)),
        });
        assert_eq!(retry_hint(&status), Some(Duration::from_millis(500)));
        let err = CliError::Rpc(status);
        assert_eq!(err.exit_code(), LIMITED);
        let text = err.to_string();
        assert!(
            text.starts_with("RESOURCE_EXHAUSTED: submit rate limit"),
            "{text}"
        );
        assert_eq!(text.matches("retry after").count(), 1, "{text}");

        // A hint only in the metadata (a proxy, another server) is added.
        let mut status = tonic::Status::resource_exhausted("slow down");
        status
            .metadata_mut()
            .insert(RETRY_AFTER_METADATA, "3".parse().unwrap());
        assert_eq!(retry_hint(&status), Some(Duration::from_secs(3)));
        assert_eq!(
            CliError::Rpc(status).to_string(),
            "RESOURCE_EXHAUSTED: slow down; retry after 3s"
        );
        assert_eq!(retry_hint(&tonic::Status::resource_exhausted("x")), None);
    }

    #[test]
    fn local_transport_failures_become_unavailable() {
        // What tonic makes of a connection that broke during a call.
        let broken = tonic::Status::from_error(Box::new(std::fmt::Error));
        assert_eq!(broken.code(), Code::Unknown);
        let err = CliError::from(broken);
        assert_eq!(err.exit_code(), UNAVAILABLE);
        assert!(
            err.to_string()
                .starts_with("UNAVAILABLE: connection to orchd failed"),
            "{err}"
        );
        // An UNKNOWN that orchd sent stays what it is.
        let err = CliError::from(tonic::Status::unknown("boom"));
        assert_eq!(err.exit_code(), GENERIC);
        assert_eq!(err.to_string(), "UNKNOWN: boom");
    }

    #[test]
    fn job_outcome_messages() {
        let failed = CliError::JobFailed {
            id: "j1".into(),
            error: "exit status 3".into(),
        };
        assert_eq!(failed.to_string(), "job j1 FAILED: exit status 3");
        let cancelled = CliError::JobCancelled {
            id: "j1".into(),
            reason: String::new(),
        };
        assert_eq!(cancelled.to_string(), "job j1 CANCELLED");
    }

    #[test]
    fn error_chain_joins_sources_without_repeats() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(error_chain(&err), "transport error: Connection refused");
    }
}
