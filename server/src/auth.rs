//! Where authentication sits: one [`Authenticator`] (the pure logic is in
//! `orchestrator::auth`), applied by a tonic interceptor on each protected
//! gRPC service and by an axum middleware on the REST job routes. Both put
//! the [`Caller`] into the request's extensions for the handlers. Health,
//! reflection, `/healthz` and `/openapi.json` are not wrapped: they stay
//! open. Tokens are never logged.

use axum::extract::{Request as HttpRequest, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use orchestrator::auth::{Api, Authenticator, Caller, TokenEntry, Tokens};
use orchestrator::error::Error;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::AuthConfig;
use crate::rest::ApiError;

/// Why orchd refuses to start without authentication.
pub fn insecure_refusal(addrs: &[std::net::SocketAddr]) -> String {
    let exposed: Vec<String> = addrs
        .iter()
        .filter(|a| !a.ip().is_loopback())
        .map(ToString::to_string)
        .collect();
    format!(
        "refusing to listen on {} without authentication: no tokens are configured. \
         Give a tokens file with --tokens-file / ORCH_TOKENS_FILE (create tokens with \
         `orchd token new NAME --role client|worker|admin`), listen on loopback only \
         (--grpc-addr / --http-addr 127.0.0.1:PORT), or pass --insecure-no-auth / \
         ORCH_INSECURE_NO_AUTH=true to serve without authentication on purpose",
        exposed.join(" and ")
    )
}

/// The authenticator `config` asks for, plus `extra` (dev mode's
/// in-process worker token) when tokens are on. Without a tokens file it
/// is off, which is allowed only on loopback addresses or with
/// --insecure-no-auth.
pub fn from_config(
    config: &AuthConfig,
    addrs: &[std::net::SocketAddr],
    extra: Option<TokenEntry>,
) -> Result<Authenticator, crate::ServerError> {
    let Some(path) = &config.tokens_file else {
        if addrs.iter().any(|a| !a.ip().is_loopback()) {
            if !config.insecure_no_auth {
                return Err(crate::ServerError::Insecure(insecure_refusal(addrs)));
            }
            tracing::warn!(
                "authentication is OFF (--insecure-no-auth) on a non-loopback address: \
                 anyone who reaches orchd can submit, cancel and run jobs"
            );
        }
        return Ok(Authenticator::disabled());
    };
    let mut tokens = Tokens::load(path)?;
    if config.insecure_no_auth {
        tracing::warn!("--insecure-no-auth is ignored: --tokens-file is set");
    }
    let names: Vec<String> = tokens.names().map(str::to_owned).collect();
    if let Some(entry) = extra {
        let name = entry.name.clone();
        tokens.push(entry).map_err(|_| {
            orchestrator::Error::invalid(
                "tokens_file",
                format!("the name {name:?} is reserved for the in-process workers"),
            )
        })?;
    }
    tracing::info!(tokens = names.len(), names = ?names, file = %path.display(), "authentication on");
    Ok(Authenticator::new(tokens))
}

/// The one `authorization` value of a request. A repeated header is
/// refused when tokens are on: a proxy or a smuggled header line could
/// otherwise decide which of two credentials is checked.
fn single_authorization<'a>(
    auth: &Authenticator,
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<&'a [u8]>, Error> {
    let first = values.next();
    if auth.is_enabled() && values.next().is_some() {
        return Err(Error::Unauthenticated(
            "malformed authorization: the header is repeated; send exactly one `authorization: Bearer <token>`"
                .into(),
        ));
    }
    Ok(first)
}

fn log_refusal(api: Api, err: &Error) {
    match err {
        Error::PermissionDenied(_) => {
            tracing::info!(api = api.name(), error = %err, "request refused")
        }
        _ => tracing::debug!(api = api.name(), error = %err, "request refused"),
    }
}

/// The gRPC interceptor of one service: authorizes the call for `api` and
/// hands the [`Caller`] to the handler.
#[derive(Clone)]
pub struct GrpcAuth {
    auth: Authenticator,
    api: Api,
}

impl GrpcAuth {
    /// Guards a service of `api` with `auth`.
    pub fn new(auth: Authenticator, api: Api) -> Self {
        GrpcAuth { auth, api }
    }
}

impl Interceptor for GrpcAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let values = request
            .metadata()
            .get_all("authorization")
            .iter()
            .map(|v| v.as_bytes());
        let caller = single_authorization(&self.auth, values)
            .and_then(|header| self.auth.authorize(header, self.api));
        match caller {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            Err(err) => {
                log_refusal(self.api, &err);
                Err(err.into())
            }
        }
    }
}

/// The caller the interceptor found. A handler reached without the
/// interceptor fails closed.
pub fn grpc_caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| {
            Status::internal("no caller identity: the service is not behind the authenticator")
        })
}

/// The axum middleware of the REST job routes (JobService: client or
/// admin). 401 answers carry `WWW-Authenticate: Bearer`.
pub async fn rest_jobs(
    State(auth): State<Authenticator>,
    mut request: HttpRequest,
    next: Next,
) -> Response {
    let values = request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(HeaderValue::as_bytes);
    let caller =
        single_authorization(&auth, values).and_then(|header| auth.authorize(header, Api::Jobs));
    match caller {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(err) => {
            log_refusal(Api::Jobs, &err);
            let mut response = ApiError::from(err).into_response();
            if response.status() == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}
