//! Connecting to orchd: the endpoint with its timeouts and, for an
//! `https://` server, its TLS settings, the interceptor
//! that adds `authorization: Bearer <token>` to every call, and a deadline
//! for unary calls.
//!
//! A connection failure is reported as [`CliError::Connect`] within
//! [`CONNECT_TIMEOUT`] rather than surfacing later as a failed call.

use std::future::Future;
use std::time::Duration;

use orchestrator::auth::BearerAuth;
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use orchestrator::tls::ClientTls;

use crate::exit::{CliError, error_chain};

/// How long connecting to orchd may take, DNS and TCP included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a unary call (and the start of a watch) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP/2 keep-alive pings, so that a watch on a dead connection fails
/// (UNAVAILABLE) instead of hanging.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client of `orchestrator.v1.JobService` that `orchctl` uses.
pub type Client = JobServiceClient<InterceptedService<Channel, BearerAuth>>;

/// The credentials of `--token`/`ORCH_TOKEN`; a token that cannot be sent
/// as a header is a usage error (exit 2).
pub fn auth(token: Option<&str>) -> Result<BearerAuth, CliError> {
    BearerAuth::new(token).map_err(|_| {
        CliError::Usage(
            "--token / ORCH_TOKEN contains characters that cannot be sent in a header".to_owned(),
        )
    })
}

/// The server URL with `http://` added when it has no scheme.
pub fn normalize_server(server: &str) -> String {
    let server = server.trim();
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

/// The endpoint for a server URL, with `orchctl`'s timeouts.
pub fn endpoint(server: &str) -> Result<Endpoint, CliError> {
    let url = normalize_server(server);
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| {
        CliError::Usage(format!("invalid --server URL {url:?}: {}", error_chain(&e)))
    })?;
    Ok(endpoint
        .user_agent(concat!("orchctl/", env!("CARGO_PKG_VERSION")))
        .map_err(|e| CliError::Usage(error_chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// Connects to orchd and returns a client that authenticates every call.
/// An `https://` server is reached over TLS with `tls`'s CA (else the
/// system's roots) and client certificate.
pub async fn connect(
    server: &str,
    token: Option<&str>,
    tls: &ClientTls,
) -> Result<Client, CliError> {
    let interceptor = auth(token)?;
    let mut endpoint = endpoint(server)?;
    let url = endpoint.uri().to_string();
    let url = url.trim_end_matches('/').to_owned();
    tls.check(&url)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if url.starts_with("https://") {
        let config = tls
            .tonic_config()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| CliError::Usage(format!("TLS settings for {url}: {}", error_chain(&e))))?;
    }
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            return Err(CliError::Connect {
                server: url,
                reason: connect_reason(&e),
            });
        }
        Err(_) => {
            return Err(CliError::Connect {
                server: url,
                reason: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
            });
        }
    };
    Ok(JobServiceClient::with_interceptor(channel, interceptor))
}

/// The useful part of a tonic transport error: its sources, without the
/// bare "transport error" wrapper.
fn connect_reason(err: &tonic::transport::Error) -> String {
    if let Some(why) = orchestrator::tls::handshake_failure(err) {
        return format!("TLS handshake failed: {why}");
    }
    match std::error::Error::source(err) {
        Some(source) => error_chain(source),
        None => error_chain(err),
    }
}

/// Runs a call with the [`CALL_TIMEOUT`] deadline; running out of time is
/// DEADLINE_EXCEEDED.
pub async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CliError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(CliError::from(status)),
        Err(_) => Err(CliError::Rpc(tonic::Status::deadline_exceeded(format!(
            "orchd did not answer within {}s",
            CALL_TIMEOUT.as_secs()
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_that_cannot_be_a_header_is_a_usage_error() {
        let err = auth(Some("a\nb")).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(!err.to_string().contains("a\nb"));
    }

    #[test]
    fn server_urls() {
        assert_eq!(
            normalize_server("localhost:50051"),
            "http://localhost:50051"
        );
        assert_eq!(normalize_server("http://x:1"), "http://x:1");
        assert_eq!(normalize_server(" https://x "), "https://x");
        assert!(endpoint("http://127.0.0.1:50051").is_ok());
        let err = endpoint("http://bad host:1").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().starts_with("invalid --server URL"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_server_is_a_quick_connect_error() {
        // A port that was free a moment ago: nothing listens there.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let started = std::time::Instant::now();
        let err = connect(&format!("127.0.0.1:{port}"), None, &ClientTls::default())
            .await
            .unwrap_err();
        assert!(started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(1));
        assert_eq!(err.exit_code(), 5);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot reach orchd at http://127.0.0.1:{port}: ")),
            "{text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[tokio::test]
    async fn call_deadline_is_deadline_exceeded() {
        tokio::time::pause();
        let never = std::future::pending::<Result<tonic::Response<()>, tonic::Status>>();
        let err = call(never).await.unwrap_err();
        assert!(matches!(&err, CliError::Rpc(s) if s.code() == tonic::Code::DeadlineExceeded));
        assert_eq!(err.exit_code(), 5);
    }
}
