//! The gRPC client of orchd's WorkerService: a lazily connected channel
//! (so the worker starts even when orchd is not up yet, and reconnects by
//! itself when orchd restarts), over TLS for an `https://` server, the
//! bearer token, per-call timeouts, and which status codes are worth
//! retrying.

use std::time::Duration;

use orchestrator::auth::BearerAuth;
use orchestrator::proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::config::WorkerConfig;
use crate::error::WorkerError;

/// How long connecting to orchd may take before a call fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of StartAttempt and FinishAttempt calls.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The WorkerService client with the worker's credentials.
pub(crate) type Client = WorkerServiceClient<InterceptedService<Channel, BearerAuth>>;

fn auth(token: Option<&str>) -> Result<BearerAuth, WorkerError> {
    BearerAuth::new(token)
        .map_err(|_| WorkerError::Config("--token must be printable ASCII".into()))
}

/// A client for `config.server` (or `config.channel`); connects on first
/// use.
pub(crate) fn connect(config: &WorkerConfig) -> Result<Client, WorkerError> {
    let auth = auth(config.token.as_deref())?;
    if let Some(channel) = &config.channel {
        return Ok(WorkerServiceClient::with_interceptor(channel.clone(), auth));
    }
    let endpoint_error = |e: &dyn std::fmt::Display| WorkerError::Endpoint {
        url: config.server.clone(),
        message: e.to_string(),
    };
    let mut endpoint =
        Endpoint::from_shared(config.server.clone()).map_err(|e| endpoint_error(&e))?;
    if config.server.starts_with("https://") {
        let tls = config
            .client_tls()
            .tonic_config()
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        endpoint = endpoint.tls_config(tls).map_err(|e| endpoint_error(&e))?;
    }
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // Notice a dead orchd (or a silently dropped connection) quickly.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect_lazy();
    Ok(WorkerServiceClient::with_interceptor(channel, auth))
}

/// A request with a deadline.
pub(crate) fn request<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Whether a failed StartAttempt or FinishAttempt may succeed if tried
/// again: orchd or its store unreachable, overloaded, or racing.
pub(crate) fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

/// Asks orchd who this worker is and returns the namespace whose queues it
/// consumes: `requested`, or else the token's. Refuses to start against a
/// server whose queue is in its own process (`orchd dev`), since such a
/// worker would wait on a broker that never carries a job, and when a
/// worker token names another namespace than its own. No answer (orchd not
/// up yet, an older orchd) lets the worker start, in `requested` or the
/// default namespace.
pub(crate) async fn check_server(
    client: &Client,
    server: &str,
    requested: Option<&str>,
) -> Result<String, WorkerError> {
    let fallback = || {
        requested
            .unwrap_or(orchestrator::auth::DEFAULT_NAMESPACE)
            .to_owned()
    };
    let request = request(
        orchestrator::proto::v1::GetServerInfoRequest {},
        Duration::from_secs(3),
    );
    match client.clone().get_server_info(request).await {
        Ok(info) => {
            let info = info.into_inner();
            if !info.accepts_external_workers {
                return Err(WorkerError::Config(format!(
                    "orchd at {server} runs with an {} queue and takes no external workers: {}",
                    info.queue_backend, info.message
                )));
            }
            // An older orchd says nothing about namespaces.
            if info.namespace.is_empty() {
                return Ok(fallback());
            }
            match requested {
                None => Ok(info.namespace),
                Some(ns) if ns == info.namespace || info.role == "admin" => Ok(ns.to_owned()),
                Some(ns) => Err(WorkerError::Config(format!(
                    "--namespace {ns:?}: this worker's token belongs to namespace {:?} and only an admin token may consume another namespace's queues",
                    info.namespace
                ))),
            }
        }
        // A refused token will never work: say so now, not at the first job.
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) =>
        {
            Err(WorkerError::Config(format!(
                "orchd at {server} refused this worker's credentials ({:?}): {}; check --token/ORCH_TOKEN (it needs a worker or admin token)",
                status.code(),
                status.message()
            )))
        }
        // So will a server certificate this worker does not trust, or a
        // client certificate the server refuses.
        Err(status) if orchestrator::tls::handshake_failure(&status).is_some() => {
            Err(WorkerError::Config(format!(
                "TLS handshake with orchd at {server} failed: {}; check --ca-cert (and --client-cert/--client-key if orchd requires client certificates)",
                orchestrator::tls::handshake_failure(&status).unwrap_or_default()
            )))
        }
        Err(status) => {
            tracing::debug!(code = ?status.code(), error = %status.message(), "GetServerInfo unanswered; starting anyway");
            Ok(fallback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn the_token_becomes_a_bearer_header() {
        let mut with = auth(Some("s3cret")).unwrap();
        let req = with.call(Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let mut without = auth(None).unwrap();
        assert!(
            without
                .call(Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .is_none()
        );
        assert!(auth(Some("bad\ntoken")).is_err());
    }

    #[tokio::test]
    async fn connecting_is_lazy() {
        // Nothing listens there; creating the client must not fail.
        let config = WorkerConfig::local("http://127.0.0.1:1", "amqp://127.0.0.1:1");
        assert!(connect(&config).is_ok());
        let bad = WorkerConfig::local("http://[::1", "amqp://127.0.0.1:1");
        assert!(matches!(connect(&bad), Err(WorkerError::Endpoint { .. })));
    }

    #[test]
    fn only_transient_codes_are_retried() {
        assert!(is_transient(Code::Unavailable));
        assert!(is_transient(Code::DeadlineExceeded));
        for code in [
            Code::NotFound,
            Code::FailedPrecondition,
            Code::InvalidArgument,
            Code::Unauthenticated,
        ] {
            assert!(!is_transient(code), "{code:?}");
        }
    }
}
