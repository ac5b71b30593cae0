//! The REST shim: the routes that `google.api.http` declares in the proto,
//! served in the style of grpc-gateway. Bodies and responses are the
//! generated proto types with the proto3 JSON mapping (pbjson); every route
//! calls the same [`JobService`] as gRPC does. Bodies are bounded by
//! `max_request_bytes` (413) and every request by `request_timeout` (504)
//! until its answer starts.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{BoxError, Json, Router, middleware};
use futures::StreamExt;
use orchestrator::auth::{Authenticator, Caller};
use orchestrator::error::{Error, http_status, retry_after_secs};
use orchestrator::proto::v1::{ListJobsRequest, SubmitJobRequest, SubmitJobsRequest, job};
use orchestrator::validate;
use serde::Serialize;
use tonic::Code;
use tower::ServiceBuilder;
use tower::timeout::TimeoutLayer;

use crate::health::Health;
use crate::service::JobService;

/// What the routes share.
#[derive(Clone)]
pub struct RestState {
    /// The job operations.
    pub service: JobService,
    /// Dependency health, for `/healthz`.
    pub health: Health,
}

/// The largest request body, for the message of a 413.
#[derive(Debug, Clone, Copy)]
struct BodyLimit(usize);

/// The router of the REST surface. `max_body_bytes` bounds request bodies;
/// a request whose answer has not started after `timeout` gets 504. The
/// job routes are behind `auth` (client or admin); `/healthz` and
/// `/openapi.json` are open.
pub fn router(
    state: RestState,
    auth: Authenticator,
    max_body_bytes: usize,
    timeout: Duration,
) -> Router {
    let jobs = Router::new()
        .route("/jobs", get(list_jobs).post(submit_job))
        .route("/jobs:batchSubmit", post(submit_jobs))
        .route("/jobs/{job_id}", get(get_job).delete(cancel_job))
        .route_layer(middleware::from_fn_with_state(auth, crate::auth::rest_jobs));
    Router::new()
        .merge(jobs)
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(Extension(BodyLimit(max_body_bytes)))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |_: BoxError| async move {
                    ApiError::from(crate::limits::timeout_error(timeout))
                }))
                .layer(TimeoutLayer::new(timeout)),
        )
        .with_state(state)
}

/// An error as grpc-gateway writes it: `{"code", "message", "details"}`
/// with the HTTP status of the error (that of its gRPC code, 413 for a body
/// too large) and, when the server knows when a retry can succeed, a
/// `Retry-After` header in seconds.
#[derive(Debug)]
pub struct ApiError {
    code: Code,
    http: u16,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            http: http_status(code),
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        ApiError {
            code: err.code(),
            http: err.http_status(),
            message: err.to_string(),
            retry_after: err.retry_after(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: i32,
    message: &'a str,
    details: [(); 0],
}

/// One line of a streamed response.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum StreamLine<'a> {
    Result(&'a orchestrator::proto::v1::Job),
    Error(ErrorBody<'a>),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: self.code as i32,
            message: &self.message,
            details: [],
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(delay) = self.retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(delay)),
            );
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

fn json<T: Serialize>(value: &T) -> ApiResult {
    let bytes =
        serde_json::to_vec(value).map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: BodyLimit) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::TooLarge {
                limit: "max_request_bytes",
                message: format!(
                    "the body is more than {} bytes (max_request_bytes)",
                    limit.0
                ),
            }
            .into()
        } else {
            ApiError::new(
                Code::InvalidArgument,
                format!("cannot read the request body: {e}"),
            )
        }
    })
}

async fn submit_job(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Extension(limit): Extension<BodyLimit>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_bytes(body, limit)?;
    let request: SubmitJobRequest = validate::json_body(&body)?;
    json(&state.service.submit(request, &caller).await?)
}

async fn submit_jobs(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Extension(limit): Extension<BodyLimit>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body_bytes(body, limit)?;
    let request: SubmitJobsRequest = validate::json_body(&body)?;
    json(&state.service.submit_many(request, &caller).await?)
}

async fn get_job(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
) -> ApiResult {
    if let Some(id) = job_id.strip_suffix(":watch") {
        return watch_job(state, id, &caller).await;
    }
    json(&state.service.get(&job_id, &caller).await?)
}

async fn cancel_job(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Path(job_id): Path<String>,
) -> ApiResult {
    json(&state.service.cancel(&job_id, &caller).await?)
}

/// Streams the job as newline-delimited JSON, each line `{"result": job}`
/// (or `{"error": status}`), as grpc-gateway does for server streams.
async fn watch_job(state: RestState, job_id: &str, caller: &Caller) -> ApiResult {
    let stream = state.service.watch(job_id, caller).await?;
    let lines = stream.map(|item| {
        let line = match item {
            Ok(job) => serde_json::to_vec(&StreamLine::Result(&job)),
            Err(e) => serde_json::to_vec(&StreamLine::Error(ErrorBody {
                code: e.code() as i32,
                message: &e.to_string(),
                details: [],
            })),
        };
        let mut bytes = line.unwrap_or_default();
        bytes.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Maps query parameters onto ListJobsRequest, accepting both the JSON
/// (lowerCamelCase) and the proto (snake_case) field names, as grpc-gateway
/// does, and rejecting anything else.
fn list_request(params: &[(String, String)]) -> Result<ListJobsRequest, ApiError> {
    let mut req = ListJobsRequest::default();
    for (key, value) in params {
        match key.as_str() {
            "state" => {
                req.state = match value.parse::<i32>() {
                    Ok(n) => n,
                    Err(_) => job::State::from_str_name(&value.to_ascii_uppercase())
                        .ok_or_else(|| {
                            ApiError::from(Error::invalid(
                                "state",
                                format!(
                                    "unknown state {value:?}; one of CREATED, RUNNING, COMPLETED, FAILED, CANCELLED, RETRYING"
                                ),
                            ))
                        })? as i32,
                };
            }
            "kind" => req.kind = value.clone(),
            "queue" => req.queue = value.clone(),
            "namespace" => req.namespace = value.clone(),
            "pageSize" | "page_size" => {
                req.page_size = value.parse().map_err(|_| {
                    ApiError::from(Error::invalid(
                        "page_size",
                        format!("must be a whole number, got {value:?}"),
                    ))
                })?;
            }
            "pageToken" | "page_token" => req.page_token = value.clone(),
            other => {
                return Err(Error::invalid(
                    other,
                    "is not a parameter of ListJobs (state, kind, queue, namespace, pageSize, pageToken)",
                )
                .into());
            }
        }
    }
    Ok(req)
}

async fn list_jobs(
    State(state): State<RestState>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<Vec<(String, String)>>,
) -> ApiResult {
    let request = list_request(&params)?;
    json(&state.service.list(request, &caller).await?)
}

async fn healthz(State(state): State<RestState>) -> Response {
    let serving = state.health.is_serving();
    let mut body: HashMap<&str, String> = HashMap::new();
    body.insert(
        "status",
        if serving { "SERVING" } else { "NOT_SERVING" }.to_owned(),
    );
    if !serving {
        body.insert("detail", state.health.detail());
    }
    let status = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn openapi() -> Response {
    Json(crate::openapi::document()).into_response()
}

async fn no_route() -> ApiError {
    ApiError::new(Code::NotFound, "no such route; see GET /openapi.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn list_parameters_accept_both_spellings() {
        let req = list_request(&params(&[
            ("state", "running"),
            ("pageSize", "5"),
            ("page_token", "t"),
        ]))
        .unwrap();
        assert_eq!(req.state, job::State::Running as i32);
        assert_eq!(req.page_size, 5);
        assert_eq!(req.page_token, "t");
        let req = list_request(&params(&[
            ("state", "COMPLETED"),
            ("page_size", "7"),
            ("kind", "sleep"),
        ]))
        .unwrap();
        assert_eq!(req.state, job::State::Completed as i32);
        assert_eq!((req.page_size, req.kind.as_str()), (7, "sleep"));
    }

    #[test]
    fn bad_list_parameters_name_the_field() {
        for (pairs, field) in [
            (vec![("state", "sleeping")], "state"),
            (vec![("pageSize", "ten")], "page_size"),
            (vec![("limit", "3")], "limit"),
        ] {
            let err = list_request(&params(&pairs)).unwrap_err();
            assert_eq!(err.code, Code::InvalidArgument);
            assert!(err.message.contains(field), "{}", err.message);
        }
    }
}
