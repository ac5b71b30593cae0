//! Clients that send a chosen `authorization` value over gRPC and REST,
//! for the tests of tokens, roles and tenants.

use std::path::PathBuf;

use orchestrator::auth::{BearerAuth, Role, TokenEntry};
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::worker_service_client::WorkerServiceClient;
use serde_json::Value;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::TestServer;

/// Writes a tokens file of `(name, role, namespace, token)` entries to
/// `dir` and returns its path.
pub fn tokens_file(dir: &tempfile::TempDir, entries: &[(&str, Role, &str, &str)]) -> PathBuf {
    let mut text = String::from("# test tokens\n\n");
    for (name, role, namespace, token) in entries {
        let entry = TokenEntry::for_token(name, *role, namespace, token).unwrap();
        text.push_str(&entry.line());
        text.push('\n');
    }
    let path = dir.path().join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

/// Sends exactly this `authorization` value (or none), malformed or not.
pub fn header(value: Option<&str>) -> BearerAuth {
    BearerAuth::raw(value.map(|v| v.parse().unwrap()))
}

pub fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

pub async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn jobs_as(
    server: &TestServer,
    value: Option<&str>,
) -> JobServiceClient<InterceptedService<Channel, BearerAuth>> {
    JobServiceClient::with_interceptor(channel(server).await, header(value))
}

pub async fn workers_as(
    server: &TestServer,
    value: Option<&str>,
) -> WorkerServiceClient<InterceptedService<Channel, BearerAuth>> {
    WorkerServiceClient::with_interceptor(channel(server).await, header(value))
}

/// A REST call with this `authorization` value (or none): status, JSON
/// body (Null when not JSON) and headers.
pub async fn rest(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = server.http_client.request(method, server.url(path));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        headers,
    )
}
