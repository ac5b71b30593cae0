//! The abuse suite: hostile or broken requests against a real orchd (Redis
//! and RabbitMQ) with tokens on, over REST and gRPC where both apply. Each
//! case says what it sends and asserts what comes back, and that no job
//! changed: every job the server holds is listed (as the admin) before and
//! after, and the lists must be equal.
//!
//! Cases across tenants (a token of namespace A reading, cancelling or
//! watching a job of namespace B) wait for namespace isolation.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{TestServer, eventually, fresh_queue, spec};
use futures::StreamExt;
use orchestrator::auth::{Role, TokenEntry};
use orchestrator::error::RETRY_AFTER_METADATA;
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::{
    CancelJobRequest, GetJobRequest, Job, ListJobsRequest, SubmitJobRequest, SubmitJobsRequest,
    WatchJobRequest, job,
};
use orchestrator_server::ServeConfig;
use orchestrator_server::config::LimitSettings;
use orchestrator_testkit::{shared_amqp_url, shared_redis_url, unique_name};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const ALICE: &str = "orch_abuse-client-token-alice";
const BOB: &str = "orch_abuse-client-token-bob";
const WORKER: &str = "orch_abuse-worker-token-w1";
const ROOT: &str = "orch_abuse-admin-token-root";
const UNKNOWN: &str = "orch_abuse-token-nobody-knows";

/// How long any one answer may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(30);

fn tokens_file(dir: &tempfile::TempDir) -> PathBuf {
    let mut text = String::new();
    for (name, role, token) in [
        ("alice", Role::Client, ALICE),
        ("bob", Role::Client, BOB),
        ("w1", Role::Worker, WORKER),
        ("root", Role::Admin, ROOT),
    ] {
        text.push_str(
            &TokenEntry::for_token(name, role, "default", token)
                .unwrap()
                .line(),
        );
        text.push('\n');
    }
    let path = dir.path().join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

/// orchd with tokens on and the limits `set` makes of the defaults.
async fn server_with(dir: &tempfile::TempDir, set: impl FnOnce(&mut LimitSettings)) -> TestServer {
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    config.redis_prefix = format!("{}:", unique_name("abuse"));
    config.auth.tokens_file = Some(tokens_file(dir));
    set(&mut config.limits);
    TestServer::with_config(config).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Sends exactly these `authorization` metadata values (none, one or
/// several).
#[derive(Clone)]
struct Authorization(Vec<MetadataValue<Ascii>>);

impl Interceptor for Authorization {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        for value in &self.0 {
            request
                .metadata_mut()
                .append("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = JobServiceClient<InterceptedService<Channel, Authorization>>;

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn grpc_as(server: &TestServer, values: &[&str]) -> Client {
    let values = values.iter().map(|v| v.parse().unwrap()).collect();
    JobServiceClient::with_interceptor(channel(server).await, Authorization(values))
        .max_encoding_message_size(64 << 20)
}

async fn grpc(server: &TestServer, token: &str) -> Client {
    grpc_as(server, &[&bearer(token)]).await
}

/// A REST answer: status, JSON body (Null when not JSON) and headers.
struct Answer {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

async fn rest(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    authorization: Option<reqwest::header::HeaderValue>,
    body: Option<String>,
) -> Answer {
    let mut request = server
        .http_client
        .request(method, server.url(path))
        .timeout(HANG);
    if let Some(value) = authorization {
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    if let Some(body) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
    }
    let response = request.send().await.expect("orchd answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        headers,
    }
}

fn auth_header(token: &str) -> Option<reqwest::header::HeaderValue> {
    Some(bearer(token).parse().unwrap())
}

/// Every job the server holds, as the admin sees it, oldest first.
async fn all_jobs(server: &TestServer) -> Vec<Job> {
    let mut root = grpc(server, ROOT).await;
    let page_size = server.config.limits.max_page_size.min(100);
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = root
            .list_jobs(ListJobsRequest {
                page_size,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("the admin lists jobs")
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    jobs
}

/// One job on a fresh queue (no worker consumes it, so it stays CREATED),
/// submitted by alice.
async fn one_job(server: &TestServer) -> Job {
    grpc(server, ALICE)
        .await
        .submit_job(spec("echo", &fresh_queue()))
        .await
        .expect("alice submits")
        .into_inner()
}

fn message(answer: &Answer) -> &str {
    answer.body["message"].as_str().unwrap_or_default()
}

/// Writes `request` on a fresh TCP connection to the REST port and reads
/// the answer until the server closes it; returns its status code (0 when
/// the server closed without answering) and the whole text.
async fn raw_http(server: &TestServer, request: &[u8]) -> (u16, String) {
    let addr = server.http.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before it read everything.
    let _ = tcp.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(HANG, tcp.read_to_end(&mut answer))
        .await
        .expect("the server answers or closes");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn missing_malformed_and_wrong_role_tokens_get_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |_| {}).await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;
    let submit = json!({"kind": "echo", "queue": job.queue}).to_string();
    let long = format!("Bearer orch_{}", "a".repeat(8 * 1024));
    let huge = format!("Bearer orch_{}", "a".repeat(1024 * 1024));
    let value = |bytes: &[u8]| Some(reqwest::header::HeaderValue::from_bytes(bytes).unwrap());

    // REST: each credential on submit, get and cancel. Sent: the header as
    // written; expected: the status and gRPC code in the JSON body.
    let credentials: Vec<(&str, Option<reqwest::header::HeaderValue>, u16)> = vec![
        ("no header", None, 401),
        ("empty", value(b""), 401),
        ("scheme only", value(b"Bearer"), 401),
        (
            "wrong scheme",
            value(format!("Token {ALICE}").as_bytes()),
            401,
        ),
        (
            "token without the orch_ prefix",
            value(b"Bearer abc123"),
            401,
        ),
        ("unknown token", auth_header(UNKNOWN), 401),
        (
            "token with a non-ASCII byte",
            value(format!("Bearer {ALICE}\u{f6}").as_bytes()),
            401,
        ),
        (
            "two tokens in one header",
            value(format!("Bearer {ALICE} {BOB}").as_bytes()),
            401,
        ),
        ("8 KiB token", value(long.as_bytes()), 401),
        // Past hyper's header buffer: refused before orchd sees it.
        ("1 MiB token", value(huge.as_bytes()), 431),
        ("worker role", auth_header(WORKER), 403),
    ];
    let routes = [
        (
            reqwest::Method::POST,
            "/jobs".to_owned(),
            Some(submit.clone()),
        ),
        (reqwest::Method::GET, format!("/jobs/{}", job.id), None),
        (reqwest::Method::DELETE, format!("/jobs/{}", job.id), None),
    ];
    for (what, header, want) in &credentials {
        for (method, path, body) in &routes {
            let answer = rest(&server, method.clone(), path, header.clone(), body.clone()).await;
            assert_eq!(
                answer.status, *want,
                "{what}: {method} {path}: {}",
                answer.body
            );
            let code = match want {
                401 => Code::Unauthenticated,
                403 => Code::PermissionDenied,
                _ => continue,
            };
            assert_eq!(answer.body["code"], code as i32, "{what}");
            for secret in [ALICE, BOB, UNKNOWN, WORKER, "abc123"] {
                assert!(
                    !message(&answer).contains(secret),
                    "{what}: echoes a secret: {}",
                    message(&answer)
                );
            }
        }
    }

    // gRPC: the same, as metadata (a non-ASCII byte cannot be put in ASCII
    // metadata by a client, so it is left out here).
    let metadata: Vec<(&str, Vec<String>, Code)> = vec![
        ("no metadata", vec![], Code::Unauthenticated),
        ("scheme only", vec!["Bearer".into()], Code::Unauthenticated),
        (
            "wrong scheme",
            vec![format!("Token {ALICE}")],
            Code::Unauthenticated,
        ),
        (
            "no orch_ prefix",
            vec!["Bearer abc123".into()],
            Code::Unauthenticated,
        ),
        (
            "unknown token",
            vec![bearer(UNKNOWN)],
            Code::Unauthenticated,
        ),
        ("8 KiB token", vec![long.clone()], Code::Unauthenticated),
        // Past the HTTP/2 header list limit (16 KiB): the transport
        // answers 431 before orchd sees the call; clients report UNKNOWN.
        // (Far past it, from about 64 KiB, h2 ends the connection with
        // GOAWAY ENHANCE_YOUR_CALM instead.)
        (
            "16 KiB token",
            vec![format!("Bearer orch_{}", "a".repeat(16 * 1024))],
            Code::Unknown,
        ),
        ("worker role", vec![bearer(WORKER)], Code::PermissionDenied),
    ];
    for (what, values, want) in &metadata {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let mut client = grpc_as(&server, &values).await;
        let submitted = client.submit_job(spec("echo", &job.queue)).await;
        let cancelled = client
            .cancel_job(CancelJobRequest {
                job_id: job.id.clone(),
            })
            .await;
        let got = client
            .get_job(GetJobRequest {
                job_id: job.id.clone(),
            })
            .await;
        for (rpc, status) in [
            ("SubmitJob", submitted.map(drop)),
            ("CancelJob", cancelled.map(drop)),
            ("GetJob", got.map(drop)),
        ] {
            let status = status.expect_err(&format!("{what}: {rpc} must be refused"));
            assert_eq!(status.code(), *want, "{what}: {rpc}: {status:?}");
            if *want == Code::Unknown {
                assert!(status.message().contains("431"), "{what}: {status:?}");
            }
        }
    }
    assert_eq!(
        all_jobs(&server).await,
        before,
        "a refused request changed a job"
    );
    server.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413_and_oversized_payloads_400() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |limits| {
        limits.max_request_bytes = 64 * 1024;
        limits.max_payload_bytes = 16 * 1024;
    })
    .await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;
    let queue = job.queue.clone();
    let with_blob = |bytes: usize| {
        json!({"kind": "echo", "queue": queue, "payload": {"blob": "x".repeat(bytes)}}).to_string()
    };

    // A 100 KiB body (past max_request_bytes): 413 naming the limit, on
    // the single and the batch route.
    for (path, body) in [
        ("/jobs", with_blob(100 * 1024)),
        (
            "/jobs:batchSubmit",
            json!({"jobs": [{"kind": "echo", "queue": queue, "payload": {"blob": "x".repeat(100 * 1024)}}]})
                .to_string(),
        ),
    ] {
        let answer = rest(&server, reqwest::Method::POST, path, auth_header(ALICE), Some(body)).await;
        assert_eq!(answer.status, 413, "{path}: {}", answer.body);
        assert_eq!(answer.body["code"], Code::OutOfRange as i32);
        assert!(message(&answer).contains("more than 65536 bytes (max_request_bytes)"), "{}", message(&answer));
    }
    // The same size without a Content-Length (chunked, raw TCP): still
    // 413 once the limit is read past.
    let mut chunked = format!(
        "POST /jobs HTTP/1.1\r\nHost: orchd\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..100 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, text) = raw_http(&server, &chunked).await;
    assert_eq!(status, 413, "{text}");

    // A 20 KiB payload in a body under the limit: 400 naming `payload`.
    let answer = rest(
        &server,
        reqwest::Method::POST,
        "/jobs",
        auth_header(ALICE),
        Some(with_blob(20 * 1024)),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert!(
        message(&answer).starts_with("invalid payload:"),
        "{}",
        message(&answer)
    );
    assert!(
        message(&answer).contains("limit of 16384 bytes"),
        "{}",
        message(&answer)
    );

    // gRPC: a 100 KiB message is refused by the decoder (OUT_OF_RANGE
    // naming the limit), a 20 KiB payload by validation.
    let mut alice = grpc(&server, ALICE).await;
    let blob = |bytes: usize| {
        let mut payload = pbjson_types::Struct::default();
        payload.fields.insert(
            "blob".into(),
            pbjson_types::Value {
                kind: Some(pbjson_types::value::Kind::StringValue("x".repeat(bytes))),
            },
        );
        SubmitJobRequest {
            payload: Some(payload),
            ..spec("echo", &queue)
        }
    };
    let status = alice.submit_job(blob(100 * 1024)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("65536"), "{}", status.message());
    let status = alice
        .submit_jobs(SubmitJobsRequest {
            jobs: vec![blob(100 * 1024)],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = alice.submit_job(blob(20 * 1024)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid payload:"),
        "{}",
        status.message()
    );
    let status = alice
        .submit_jobs(SubmitJobsRequest {
            jobs: vec![spec("echo", &queue), blob(20 * 1024)],
        })
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("invalid jobs[1].payload:"),
        "{}",
        status.message()
    );

    assert_eq!(all_jobs(&server).await, before);
    server.stop().await;
}

#[tokio::test]
async fn labels_and_page_sizes_past_the_limits_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |limits| {
        limits.max_labels = 2;
        limits.max_label_key_bytes = 8;
        limits.max_label_value_bytes = 16;
        limits.max_page_size = 10;
    })
    .await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;
    let queue = job.queue.clone();

    // Sent: labels past each limit (and a key with a forbidden character);
    // expected: 400 / INVALID_ARGUMENT on `labels` naming the limit.
    let cases = [
        (json!({"a": "1", "b": "2", "c": "3"}), "max_labels"),
        (json!({"much-too-long": "1"}), "max_label_key_bytes"),
        (json!({"a": "x".repeat(17)}), "max_label_value_bytes"),
        (json!({"a\r\nb": "1"}), "letters, digits"),
    ];
    let mut alice = grpc(&server, ALICE).await;
    for (labels, limit) in &cases {
        let body = json!({"kind": "echo", "queue": queue, "labels": labels}).to_string();
        let answer = rest(
            &server,
            reqwest::Method::POST,
            "/jobs",
            auth_header(ALICE),
            Some(body),
        )
        .await;
        assert_eq!(answer.status, 400, "{labels}: {}", answer.body);
        assert!(
            message(&answer).starts_with("invalid labels:"),
            "{}",
            message(&answer)
        );
        assert!(
            message(&answer).contains(limit),
            "{limit}: {}",
            message(&answer)
        );

        let request = SubmitJobRequest {
            labels: serde_json::from_value(labels.clone()).unwrap(),
            ..spec("echo", &queue)
        };
        let status = alice.submit_job(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains(limit),
            "{limit}: {}",
            status.message()
        );
    }

    // Pages past max_page_size (and past u32): 400 naming `page_size`.
    for size in ["11", "4294967296", "-1"] {
        let answer = rest(
            &server,
            reqwest::Method::GET,
            &format!("/jobs?pageSize={size}"),
            auth_header(ALICE),
            None,
        )
        .await;
        assert_eq!(answer.status, 400, "{size}: {}", answer.body);
        assert!(
            message(&answer).contains("page_size"),
            "{}",
            message(&answer)
        );
    }
    let status = alice
        .list_jobs(ListJobsRequest {
            page_size: 11,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("at most 10 (max_page_size)"),
        "{}",
        status.message()
    );
    let page = alice
        .list_jobs(ListJobsRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 1);

    assert_eq!(all_jobs(&server).await, before);
    server.stop().await;
}

#[tokio::test]
async fn deeply_nested_json_is_a_clear_400_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |_| {}).await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;
    let queue = job.queue.clone();
    let depth = 100_000;

    // Sent: 100,000 nested arrays or objects, in the payload and as the
    // whole body. Expected: 400 INVALID_ARGUMENT from serde_json's
    // recursion limit, and the server alive afterwards.
    let bodies = [
        format!(
            r#"{{"kind":"echo","queue":"{queue}","payload":{{"a":{}{}}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        format!(
            r#"{{"kind":"echo","queue":"{queue}","payload":{}1{}}}"#,
            r#"{"a":"#.repeat(depth),
            "}".repeat(depth)
        ),
        "[".repeat(depth),
        format!(
            r#"{{"jobs":[{{"kind":"echo","payload":{{"a":{}}}}}]}}"#,
            "[".repeat(depth)
        ),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let path = if i == 3 { "/jobs:batchSubmit" } else { "/jobs" };
        let answer = rest(
            &server,
            reqwest::Method::POST,
            path,
            auth_header(ALICE),
            Some(body),
        )
        .await;
        assert_eq!(answer.status, 400, "body {i}: {}", answer.body);
        assert_eq!(answer.body["code"], Code::InvalidArgument as i32);
        assert!(
            message(&answer).contains("invalid JSON"),
            "body {i}: {}",
            message(&answer)
        );
    }

    // gRPC: a Struct nested 200 deep (prost decodes at most 100 levels):
    // refused with INTERNAL, as gRPC says a message that does not parse
    // is reported.
    let mut value = pbjson_types::Value {
        kind: Some(pbjson_types::value::Kind::NumberValue(1.0)),
    };
    for _ in 0..200 {
        let mut inner = pbjson_types::Struct::default();
        inner.fields.insert("a".into(), value);
        value = pbjson_types::Value {
            kind: Some(pbjson_types::value::Kind::StructValue(inner)),
        };
    }
    let Some(pbjson_types::value::Kind::StructValue(payload)) = value.kind else {
        unreachable!()
    };
    let mut alice = grpc(&server, ALICE).await;
    let status = alice
        .submit_job(SubmitJobRequest {
            payload: Some(payload),
            ..spec("echo", &queue)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        status.message().contains("recursion limit"),
        "{}",
        status.message()
    );

    assert_eq!(all_jobs(&server).await, before);
    // Still serving.
    alice
        .submit_job(spec("echo", &queue))
        .await
        .expect("orchd still serves");
    server.stop().await;
}

#[tokio::test]
async fn ids_that_are_not_uuids_are_400_naming_job_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |_| {}).await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;
    let simple = uuid::Uuid::parse_str(&job.id).unwrap().simple().to_string();
    let long = "7".repeat(10_000);

    // Sent: ids that are not hyphenated UUIDs (percent-encoded on REST).
    // Expected: 400 / INVALID_ARGUMENT naming `job_id` on get, cancel and
    // watch.
    let bad: Vec<(&str, &str)> = vec![
        ("42", "42"),
        ("not-a-uuid", "not-a-uuid"),
        ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd"),
        ("uuid without hyphens", &simple),
        (
            "uuid in braces",
            "%7B7f1c0a52-3b1e-4c1a-9d8e-2f6b1c9a0e4d%7D",
        ),
        ("quote and SQL", "%27%20OR%201%3D1%20--"),
        ("NUL byte", "%00"),
        ("non-ASCII", "%C3%A9t%C3%A9"),
        ("10,000 digits", &long),
    ];
    for (what, encoded) in &bad {
        for (method, path) in [
            (reqwest::Method::GET, format!("/jobs/{encoded}")),
            (reqwest::Method::DELETE, format!("/jobs/{encoded}")),
            (reqwest::Method::GET, format!("/jobs/{encoded}:watch")),
        ] {
            let answer = rest(&server, method.clone(), &path, auth_header(ALICE), None).await;
            assert_eq!(answer.status, 400, "{what}: {method}: {}", answer.body);
            assert!(
                message(&answer).starts_with("invalid job_id:"),
                "{what}: {}",
                message(&answer)
            );
            assert!(
                message(&answer).len() < 300,
                "{what}: the message repeats the whole id"
            );
        }
    }
    let mut alice = grpc(&server, ALICE).await;
    for id in [
        "42",
        "../../etc/passwd",
        &simple,
        "",
        &long,
        "'; DROP TABLE jobs; --",
    ] {
        let id = id.to_owned();
        let got = alice
            .get_job(GetJobRequest { job_id: id.clone() })
            .await
            .map(drop);
        let cancelled = alice
            .cancel_job(CancelJobRequest { job_id: id.clone() })
            .await
            .map(drop);
        let watched = alice
            .watch_job(WatchJobRequest { job_id: id.clone() })
            .await
            .map(drop);
        for (rpc, result) in [
            ("GetJob", got),
            ("CancelJob", cancelled),
            ("WatchJob", watched),
        ] {
            let status = result.expect_err(rpc);
            assert_eq!(status.code(), Code::InvalidArgument, "{rpc} {id:.20}");
            assert!(
                status.message().starts_with("invalid job_id:"),
                "{}",
                status.message()
            );
        }
    }
    assert_eq!(all_jobs(&server).await, before);
    server.stop().await;
}

#[tokio::test]
async fn header_injection_is_refused_not_authenticated() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |_| {}).await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;
    let body = json!({"kind": "echo", "queue": job.queue}).to_string();
    let post = |headers: &str| {
        format!(
            "POST /jobs HTTP/1.1\r\nHost: orchd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let cancel = |headers: &str| {
        format!(
            "DELETE /jobs/{} HTTP/1.1\r\nHost: orchd\r\nConnection: close\r\n{headers}\r\n",
            job.id
        )
        .into_bytes()
    };

    // Sent on raw TCP, each as a submit and a cancel. Expected: refused
    // (the status given), never authenticated by one of the values.
    let cases: Vec<(&str, String, u16)> = vec![
        // Two Authorization headers, the valid one first or second.
        (
            "repeated header, valid first",
            format!("Authorization: Bearer {ALICE}\r\nAuthorization: Bearer {UNKNOWN}\r\n"),
            401,
        ),
        (
            "repeated header, valid second",
            format!("Authorization: Bearer {UNKNOWN}\r\nAuthorization: Bearer {ALICE}\r\n"),
            401,
        ),
        (
            "repeated header, both valid",
            format!("Authorization: Bearer {ALICE}\r\nAuthorization: Bearer {BOB}\r\n"),
            401,
        ),
        // A bare CR inside the value, smuggling a second header line.
        (
            "CR in the value",
            format!("Authorization: Bearer {UNKNOWN}\rAuthorization: Bearer {ALICE}\r\n"),
            400,
        ),
        // A bare LF: parsed as two header lines, so a repeated header.
        (
            "LF in the value",
            format!("Authorization: Bearer {UNKNOWN}\nAuthorization: Bearer {ALICE}\r\n"),
            401,
        ),
        // An obsolete folded continuation line carrying the token.
        (
            "folded header",
            format!("Authorization: Bearer\r\n {ALICE}\r\n"),
            400,
        ),
        (
            "NUL in the value",
            format!("Authorization: Bearer {ALICE}\0\r\n"),
            400,
        ),
    ];
    for (what, headers, want) in &cases {
        for request in [post(headers), cancel(headers)] {
            let (status, text) = raw_http(&server, &request).await;
            assert_eq!(status, *want, "{what}: {text}");
            if *want == 401 {
                assert!(
                    text.contains("malformed authorization") || text.contains("invalid token"),
                    "{what}: {text}"
                );
            }
        }
    }
    // The same requests with one clean header do get in (the harness is
    // not what refuses them).
    let (status, text) = raw_http(
        &server,
        &cancel(&format!("Authorization: Bearer {ROOT}\r\n")),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let mut after = all_jobs(&server).await;
    assert_eq!(after.len(), before.len());
    assert_eq!(after[0].state, job::State::Cancelled as i32);
    after[0] = before[0].clone();
    assert_eq!(after, before, "only the clean cancel changed a job");

    // gRPC: two `authorization` entries, in either order.
    let before = all_jobs(&server).await;
    for values in [
        [bearer(ALICE), bearer(UNKNOWN)],
        [bearer(UNKNOWN), bearer(ALICE)],
    ] {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let mut client = grpc_as(&server, &values).await;
        let status = client
            .submit_job(spec("echo", &job.queue))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("repeated"),
            "{}",
            status.message()
        );
    }
    assert_eq!(all_jobs(&server).await, before);
    server.stop().await;
}

/// Asserts a REST 429 of the submit rate: JSON code, message naming the
/// limit and the token, `Retry-After` in whole seconds up to `max_secs`.
fn assert_rate_limited(answer: &Answer, who: &str, max_secs: u64) {
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.body["code"], Code::ResourceExhausted as i32);
    let text = message(answer);
    assert!(
        text.contains("submit_rate") && text.contains(who) && text.contains("retry after"),
        "{text}"
    );
    let secs: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=max_secs).contains(&secs), "Retry-After {secs}");
}

fn assert_rate_limited_grpc(status: &Status, who: &str, period: Duration) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("submit_rate") && status.message().contains(who),
        "{}",
        status.message()
    );
    let secs: u64 = status
        .metadata()
        .get(RETRY_AFTER_METADATA)
        .expect("retry-after metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=period.as_secs()).contains(&secs), "retry-after {secs}");
    let delay = status
        .get_details_retry_info()
        .and_then(|i| i.retry_delay)
        .expect("RetryInfo");
    assert!(delay > Duration::ZERO && delay <= period, "{delay:?}");
}

#[tokio::test]
async fn a_flood_of_submits_past_the_rate_gets_429_and_stores_only_what_was_accepted() {
    // One job per hour: nothing refills during the test, so exactly the
    // burst of 20 gets through, whatever the timing.
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |limits| {
        limits.submit_rate = "1/h".parse().unwrap();
        limits.submit_burst = 20.try_into().unwrap();
    })
    .await;
    let hour = Duration::from_secs(3600);
    let queue = fresh_queue();
    let before = all_jobs(&server).await;
    assert!(before.is_empty());

    // Invalid submits, and submits into a namespace that is not his, are
    // refused before they count: bob sends 5 of each first.
    let refused_first = [
        (r#"{"kind":"Bad Kind"}"#, 400),
        (r#"{"kind":"echo","namespace":"not-bobs"}"#, 403),
    ];
    for (body, status) in refused_first {
        for _ in 0..5 {
            let answer = rest(
                &server,
                reqwest::Method::POST,
                "/jobs",
                auth_header(BOB),
                Some(body.into()),
            )
            .await;
            assert_eq!(answer.status, status, "{body}: {:?}", answer.body);
        }
    }

    // Sent: 60 concurrent submits by alice, half REST, half gRPC.
    // Expected: 20 accepted, 40 refused with a retry hint.
    let body = json!({"kind": "echo", "queue": queue}).to_string();
    let rest_flood = (0..30).map(|_| {
        let server = &server;
        let body = body.clone();
        async move {
            rest(
                server,
                reqwest::Method::POST,
                "/jobs",
                auth_header(ALICE),
                Some(body),
            )
            .await
        }
    });
    let alice = grpc(&server, ALICE).await;
    let grpc_flood = (0..30).map(|_| {
        let mut alice = alice.clone();
        let queue = queue.clone();
        async move {
            alice
                .submit_job(spec("echo", &queue))
                .await
                .map(|r| r.into_inner())
        }
    });
    let (rest_answers, grpc_answers) = tokio::join!(
        futures::future::join_all(rest_flood),
        futures::future::join_all(grpc_flood)
    );
    let mut accepted = Vec::new();
    let mut refused = 0;
    for answer in rest_answers {
        if answer.status == 200 {
            accepted.push(answer.body["id"].as_str().unwrap().to_owned());
        } else {
            assert_rate_limited(&answer, "token \"alice\"", 3600);
            refused += 1;
        }
    }
    for answer in grpc_answers {
        match answer {
            Ok(job) => accepted.push(job.id),
            Err(status) => {
                assert_rate_limited_grpc(&status, "token \"alice\"", hour);
                refused += 1;
            }
        }
    }
    assert_eq!((accepted.len(), refused), (20, 40));

    // Batches count each job: alice's bucket is empty, so a batch of 2 is
    // refused whole, naming the batch.
    let answer = rest(
        &server,
        reqwest::Method::POST,
        "/jobs:batchSubmit",
        auth_header(ALICE),
        Some(
            json!({"jobs": [{"kind": "echo", "queue": queue}, {"kind": "echo", "queue": queue}]})
                .to_string(),
        ),
    )
    .await;
    // Two jobs at one per hour: the hint is up to two hours.
    assert_rate_limited(&answer, "by a batch of 2 jobs", 2 * 3600);

    // Bob has a bucket of his own (his invalid and forbidden submits took
    // nothing from it): a batch of 20 passes, then one more job does not. A batch larger
    // than the whole bucket can never pass: 400 naming `jobs`.
    let mut bob = grpc(&server, BOB).await;
    let status = bob
        .submit_jobs(SubmitJobsRequest {
            jobs: vec![spec("echo", &queue); 21],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid jobs:") && status.message().contains("submit_burst"),
        "{}",
        status.message()
    );
    let batch = bob
        .submit_jobs(SubmitJobsRequest {
            jobs: vec![spec("echo", &queue); 20],
        })
        .await
        .expect("bob's whole bucket")
        .into_inner();
    accepted.extend(batch.jobs.into_iter().map(|j| j.id));
    let status = bob.submit_job(spec("echo", &queue)).await.unwrap_err();
    assert_rate_limited_grpc(&status, "token \"bob\"", hour);

    // Exactly the accepted jobs are stored.
    let mut stored: Vec<String> = all_jobs(&server).await.into_iter().map(|j| j.id).collect();
    stored.sort();
    accepted.sort();
    assert_eq!(stored, accepted);
    // Reading is not limited.
    grpc(&server, ALICE)
        .await
        .get_job(GetJobRequest {
            job_id: stored[0].clone(),
        })
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn anonymous_callers_share_one_bucket() {
    // No tokens file: every caller is anonymous.
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    config.redis_prefix = format!("{}:", unique_name("abuse"));
    config.limits.submit_rate = "1/h".parse().unwrap();
    config.limits.submit_burst = 5.try_into().unwrap();
    let server = TestServer::with_config(config).await;
    let queue = fresh_queue();

    // Sent: 3 submits over REST, then 3 over gRPC from another connection.
    // Expected: 5 accepted in all, the sixth refused for anonymous callers.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let answer = rest(
            &server,
            reqwest::Method::POST,
            "/jobs",
            None,
            Some(json!({"kind": "echo", "queue": queue}).to_string()),
        )
        .await;
        statuses.push(answer.status);
    }
    assert_eq!(statuses, [200, 200, 200]);
    let mut other = server.jobs().await;
    other.submit_job(spec("echo", &queue)).await.unwrap();
    other.submit_job(spec("echo", &queue)).await.unwrap();
    let status = other.submit_job(spec("echo", &queue)).await.unwrap_err();
    assert_rate_limited_grpc(&status, "anonymous callers", Duration::from_secs(3600));
    let answer = rest(
        &server,
        reqwest::Method::POST,
        "/jobs",
        None,
        Some(json!({"kind": "echo", "queue": queue}).to_string()),
    )
    .await;
    assert_rate_limited(&answer, "anonymous callers", 3600);
    let listed = other
        .list_jobs(ListJobsRequest {
            queue: queue.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 5);
    server.stop().await;
}

#[tokio::test]
async fn watch_streams_past_the_per_token_cap_are_refused_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |limits| limits.max_watches_per_token = 2).await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;
    let watch = WatchJobRequest {
        job_id: job.id.clone(),
    };

    // Alice opens two: one over gRPC, one over REST; each delivers the
    // snapshot and stays open (the job is CREATED, nobody runs it).
    let mut alice = grpc(&server, ALICE).await;
    let mut first = alice.watch_job(watch.clone()).await.unwrap().into_inner();
    assert_eq!(first.message().await.unwrap().unwrap().id, job.id);
    let mut second = server
        .http_client
        .get(server.url(&format!("/jobs/{}:watch", job.id)))
        .header(reqwest::header::AUTHORIZATION, bearer(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status().as_u16(), 200);
    let line = tokio::time::timeout(HANG, second.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&line).contains(&job.id));

    // A third, either way: RESOURCE_EXHAUSTED / 429 naming the limit, with
    // no retry hint (the server cannot know when one closes).
    let status = alice.watch_job(watch.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_watches_per_token")
            && status.message().contains("\"alice\""),
        "{}",
        status.message()
    );
    let answer = rest(
        &server,
        reqwest::Method::GET,
        &format!("/jobs/{}:watch", job.id),
        auth_header(ALICE),
        None,
    )
    .await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.body["code"], Code::ResourceExhausted as i32);
    assert!(answer.headers.get("retry-after").is_none());

    // Bob's allowance is his own.
    let mut bob = grpc(&server, BOB).await;
    let mut bobs = bob.watch_job(watch.clone()).await.unwrap().into_inner();
    assert!(bobs.message().await.unwrap().is_some());

    // Closing alice's gRPC stream frees its slot (once orchd sees the
    // stream reset); closing the REST one frees another.
    drop(first);
    let mut third = eventually("a watch slot freed by the closed stream", HANG, || {
        let mut alice = alice.clone();
        let watch = watch.clone();
        async move { alice.watch_job(watch).await.ok() }
    })
    .await
    .into_inner();
    assert!(third.message().await.unwrap().is_some());
    drop(second);
    eventually("a watch slot freed by the closed REST stream", HANG, || {
        let server = &server;
        let id = job.id.clone();
        async move {
            let response = server
                .http_client
                .get(server.url(&format!("/jobs/{id}:watch")))
                .header(reqwest::header::AUTHORIZATION, bearer(ALICE))
                .send()
                .await
                .ok()?;
            (response.status().as_u16() == 200).then_some(())
        }
    })
    .await;

    assert_eq!(all_jobs(&server).await, before);
    server.stop().await;
}

#[tokio::test]
async fn requests_that_stall_time_out_but_watch_streams_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with(&dir, |limits| {
        limits.request_timeout = Duration::from_secs(1)
    })
    .await;
    let job = one_job(&server).await;
    let before = all_jobs(&server).await;

    // REST: a submit that announces 100 bytes of body and sends 1, then
    // stalls. Expected: 504 DEADLINE_EXCEEDED naming request_timeout.
    let request = format!(
        "POST /jobs HTTP/1.1\r\nHost: orchd\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    let addr = server.http.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(HANG, tcp.read(&mut answer))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");

    // gRPC: a SubmitJob whose request message never comes (the stream of
    // a client-streaming call that stays empty). Expected:
    // DEADLINE_EXCEEDED naming request_timeout.
    let channel = channel(&server).await;
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let mut request = Request::new(futures::stream::pending::<SubmitJobRequest>());
    request
        .metadata_mut()
        .insert("authorization", bearer(ALICE).parse().unwrap());
    let call = raw.client_streaming(
        request,
        "/orchestrator.v1.JobService/SubmitJob".parse().unwrap(),
        tonic_prost::ProstCodec::<SubmitJobRequest, Job>::default(),
    );
    let status = tokio::time::timeout(HANG, call)
        .await
        .expect("an answer, not a hang")
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("request_timeout"),
        "{}",
        status.message()
    );

    // A watch stream outlives the request timeout: open, wait past it,
    // then a cancel still arrives on the stream.
    let mut alice = grpc(&server, ALICE).await;
    let mut stream = alice
        .watch_job(WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        all_jobs(&server).await,
        before,
        "the stalled requests changed nothing"
    );
    alice
        .cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap();
    let update = tokio::time::timeout(HANG, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(update.state, job::State::Cancelled as i32);
    server.stop().await;
}
