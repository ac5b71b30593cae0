//! TLS and mTLS on both of orchd's ports, TLS clients (orchctl, a worker,
//! reqwest), `rediss://` and `amqps://` with a private CA, and the
//! connection timeouts, against a real orchd on real Redis and RabbitMQ.
//! Certificates are made at run time (testkit's `TestCerts`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use common::{TestServer, eventually, fresh_queue};
use orchestrator::proto::v1::job_service_client::JobServiceClient;
use orchestrator::proto::v1::{GetJobRequest, SubmitJobRequest, job};
use orchestrator::tls::ClientTls;
use orchestrator_cli::CliError;
use orchestrator_server::ServeConfig;
use orchestrator_testkit::{
    RabbitServer, RedisServer, TestCerts, shared_amqp_url, shared_redis_url, unique_name,
};
use orchestrator_worker::{Registry, WorkerConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Generous bound for anything that should happen within a few seconds.
const T: Duration = Duration::from_secs(30);

fn config(certs: &TestCerts, client_ca: bool) -> ServeConfig {
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    config.redis_prefix = format!("{}:", unique_name("t"));
    config.connections.tls_cert = Some(certs.server_cert.clone());
    config.connections.tls_key = Some(certs.server_key.clone());
    if client_ca {
        config.connections.client_ca = Some(certs.ca_cert.clone());
    }
    config
}

/// The gRPC URL of a TLS server; the certificate is for `localhost` and
/// `127.0.0.1`.
fn grpc_url(server: &TestServer) -> String {
    format!("https://127.0.0.1:{}", server.grpc_addr.port())
}

fn http_port(server: &TestServer) -> u16 {
    server.http.rsplit(':').next().unwrap().parse().unwrap()
}

/// Runs orchctl with these arguments; its stdout, or its error.
async fn orchctl(args: &[&str]) -> Result<String, CliError> {
    let mut argv = vec!["orchctl"];
    argv.extend_from_slice(args);
    let cli = orchestrator_cli::Cli::try_parse_from(argv).expect("orchctl arguments");
    let mut out = Vec::new();
    orchestrator_cli::run_to(cli, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A reqwest client that trusts `ca` and presents `identity` (PEM cert +
/// key), built with reqwest's own API.
fn rest_client(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    orchestrator::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder().timeout(T);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).unwrap();
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

async fn tls_jobs(server: &TestServer, tls: &ClientTls) -> JobServiceClient<Channel> {
    let channel = Channel::from_shared(grpc_url(server))
        .unwrap()
        .tls_config(tls.tonic_config().unwrap())
        .unwrap()
        .connect()
        .await
        .expect("TLS connection");
    JobServiceClient::new(channel)
}

#[tokio::test]
async fn grpc_and_rest_over_tls_need_the_ca() {
    let certs = TestCerts::generate();
    let server = TestServer::with_config(config(&certs, false)).await;
    let grpc = grpc_url(&server);
    let http_port = http_port(&server);
    let rest = |path: &str| format!("https://127.0.0.1:{http_port}{path}");
    let queue = fresh_queue();

    // orchctl with the CA submits a job and reads it back over gRPC.
    let id = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        path(&certs.ca_cert),
        "submit",
        "echo",
        "--queue",
        &queue,
    ])
    .await
    .expect("submit over TLS");
    let id = id.trim().to_owned();
    let shown = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        path(&certs.ca_cert),
        "-o",
        "json",
        "status",
        &id,
    ])
    .await
    .expect("status over TLS");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["kind"], "echo");

    // REST over TLS with the CA: submit and read.
    let client = rest_client(Some(&certs.ca_cert), None);
    let created: Value = client
        .post(rest("/jobs"))
        .json(&serde_json::json!({"kind": "noop", "queue": queue}))
        .send()
        .await
        .expect("REST over TLS")
        .json()
        .await
        .unwrap();
    let rest_id = created["id"].as_str().expect("a job id").to_owned();
    let read: Value = client
        .get(rest(&format!("/jobs/{rest_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["kind"], "noop");
    // The job submitted over gRPC is there over REST too.
    let first = client
        .get(rest(&format!("/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);

    // Without the CA (system roots only) the handshake fails: exit 5 with
    // the reason.
    let err = orchctl(&["--server", &grpc, "status", &id])
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    let text = err.to_string();
    assert!(text.contains("TLS handshake failed"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    // Trusting another CA does not help either.
    let err = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        path(&certs.other_ca_cert),
        "status",
        &id,
    ])
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(err.to_string().contains("TLS handshake failed"), "{err}");
    let err = rest_client(None, None)
        .get(rest("/healthz"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");

    // Plain text to the TLS ports gets no answer.
    let err = orchctl(&[
        "--server",
        &format!("http://127.0.0.1:{}", server.grpc_addr.port()),
        "status",
        &id,
    ])
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    orchestrator::tls::install_crypto_provider();
    let plain = reqwest::Client::builder().timeout(T).build().unwrap();
    assert!(
        plain
            .get(format!("http://127.0.0.1:{http_port}/healthz"))
            .send()
            .await
            .is_err(),
        "plain HTTP to the TLS port must fail"
    );

    // A bad CA file is a usage error naming the flag; nothing is sent.
    let err = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        "/nonexistent/ca.pem",
        "status",
        &id,
    ])
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("--ca-cert"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn client_certificates_are_required_with_client_ca() {
    let certs = TestCerts::generate();
    let server = TestServer::with_config(config(&certs, true)).await;
    let grpc = grpc_url(&server);
    let http_port = http_port(&server);
    let rest = |path: &str| format!("https://127.0.0.1:{http_port}{path}");
    let queue = fresh_queue();
    let ca = path(&certs.ca_cert);

    // No client certificate: refused, on both ports.
    let err = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        ca,
        "submit",
        "noop",
        "--queue",
        &queue,
    ])
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(
        rest_client(Some(&certs.ca_cert), None)
            .get(rest("/jobs"))
            .send()
            .await
            .is_err()
    );

    // A certificate from another CA: refused too.
    let err = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        ca,
        "--client-cert",
        path(&certs.other_client_cert),
        "--client-key",
        path(&certs.other_client_key),
        "submit",
        "noop",
        "--queue",
        &queue,
    ])
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    assert!(
        rest_client(
            Some(&certs.ca_cert),
            Some((&certs.other_client_cert, &certs.other_client_key))
        )
        .get(rest("/jobs"))
        .send()
        .await
        .is_err()
    );

    // None of the refused attempts created a job.
    let mine = rest_client(
        Some(&certs.ca_cert),
        Some((&certs.client_cert, &certs.client_key)),
    );
    let listed: Value = mine
        .get(rest(&format!("/jobs?queue={queue}")))
        .send()
        .await
        .expect("the right certificate gets in")
        .json()
        .await
        .unwrap();
    assert!(
        listed["jobs"].as_array().is_none_or(Vec::is_empty),
        "{listed}"
    );

    // The right certificate works on both ports.
    let id = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        ca,
        "--client-cert",
        path(&certs.client_cert),
        "--client-key",
        path(&certs.client_key),
        "submit",
        "noop",
        "--queue",
        &queue,
    ])
    .await
    .expect("submit with a client certificate");
    let read: Value = mine
        .get(rest(&format!("/jobs/{}", id.trim())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["id"], id.trim());

    // A key that is not the certificate's is refused before connecting.
    let err = orchctl(&[
        "--server",
        &grpc,
        "--ca-cert",
        ca,
        "--client-cert",
        path(&certs.client_cert),
        "--client-key",
        path(&certs.other_client_key),
        "status",
        id.trim(),
    ])
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(err.to_string().contains("--client-key"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn a_worker_over_tls_and_mtls_completes_a_job() {
    let certs = TestCerts::generate();
    let server = TestServer::with_config(config(&certs, true)).await;
    let queue = fresh_queue();
    let mut worker = WorkerConfig::local(grpc_url(&server), server.config.amqp_url.clone());
    worker.queues = vec![queue.clone()];
    worker.ca_cert = Some(certs.ca_cert.clone());
    worker.client_cert = Some(certs.client_cert.clone());
    worker.client_key = Some(certs.client_key.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(orchestrator_worker::run(
        worker.clone(),
        Registry::with_builtins(&worker),
        stop.clone(),
    ));

    let tls = ClientTls {
        ca_cert: Some(certs.ca_cert.clone()),
        client_cert: Some(certs.client_cert.clone()),
        client_key: Some(certs.client_key.clone()),
    };
    let mut jobs = tls_jobs(&server, &tls).await;
    let job = jobs
        .submit_job(SubmitJobRequest {
            kind: "noop".into(),
            queue: queue.clone(),
            ..SubmitJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = eventually("the job to complete", T, || {
        let mut jobs = jobs.clone();
        let id = job.id.clone();
        async move {
            let job = jobs
                .get_job(GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner();
            (job.state == job::State::Completed as i32).then_some(job)
        }
    })
    .await;
    assert_eq!(done.attempt, 1);
    stop.cancel();
    tokio::time::timeout(T, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // A worker that does not trust the server's CA stops at once and says
    // why instead of retrying forever.
    let mut untrusting = worker.clone();
    untrusting.ca_cert = Some(certs.other_ca_cert.clone());
    let err = tokio::time::timeout(
        T,
        orchestrator_worker::run(
            untrusting.clone(),
            Registry::with_builtins(&untrusting),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the worker gives up at once")
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("TLS handshake") && err.contains("--ca-cert"),
        "{err}"
    );
    server.stop().await;
}

/// Injects: nothing; Redis and RabbitMQ reachable only over TLS with
/// certificates from a private CA. Asserts: orchd (store and publisher) and
/// a worker (consumer) run a job end to end through `rediss://` and
/// `amqps://` with `--redis-ca-cert` / `--amqp-ca-cert`, and that without
/// the CA the broker connection is refused.
#[tokio::test]
async fn rediss_and_amqps_with_a_private_ca() {
    let certs = TestCerts::generate();
    let redis = RedisServer::start_tls(&certs);
    let rabbit = RabbitServer::start_tls(&certs);

    let mut config = ServeConfig::local(redis.tls_url(), rabbit.tls_url());
    config.redis_ca_cert = Some(certs.ca_cert.clone());
    config.amqp_ca_cert = Some(certs.ca_cert.clone());
    let server = TestServer::with_config(config).await;

    let queue = fresh_queue();
    let mut worker = WorkerConfig::local(format!("http://{}", server.grpc_addr), rabbit.tls_url());
    worker.queues = vec![queue.clone()];
    worker.amqp_ca_cert = Some(certs.ca_cert.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(orchestrator_worker::run(
        worker.clone(),
        Registry::with_builtins(&worker),
        stop.clone(),
    ));

    let mut jobs = server.jobs().await;
    let job = jobs
        .submit_job(SubmitJobRequest {
            kind: "noop".into(),
            queue: queue.clone(),
            ..SubmitJobRequest::default()
        })
        .await
        .expect("submit through rediss://")
        .into_inner();
    eventually("the job to complete through amqps://", T, || {
        let mut jobs = jobs.clone();
        let id = job.id.clone();
        async move {
            let job = jobs
                .get_job(GetJobRequest { job_id: id })
                .await
                .ok()?
                .into_inner();
            (job.state == job::State::Completed as i32).then_some(())
        }
    })
    .await;
    stop.cancel();
    tokio::time::timeout(T, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The same broker without the CA: the certificate is not trusted.
    let refused = orchestrator::queue::amqp::connect(&rabbit.tls_url(), "test-no-ca").await;
    let Err(err) = refused else {
        panic!("an untrusted certificate is refused")
    };
    assert!(err.to_string().contains("rabbitmq unavailable"), "{err}");
    server.stop().await;
}

/// `orchd dev` with TLS and client certificates: its in-process workers
/// hold no certificate, yet run jobs (they reach the server in memory),
/// while outside clients still need theirs.
#[tokio::test]
async fn orchd_dev_with_mtls_runs_jobs_on_its_in_process_workers() {
    let certs = TestCerts::generate();
    let mut config = orchestrator_server::dev::DevConfig::local_ephemeral(1);
    config.connections.tls_cert = Some(certs.server_cert.clone());
    config.connections.tls_key = Some(certs.server_key.clone());
    config.connections.client_ca = Some(certs.ca_cert.clone());
    let dev = orchestrator_server::dev::start(config)
        .await
        .expect("orchd dev starts");
    assert!(dev.server.tls);
    let grpc = format!("https://127.0.0.1:{}", dev.server.grpc_addr.port());
    let ca = path(&certs.ca_cert);
    let with_cert = [
        "--server",
        grpc.as_str(),
        "--ca-cert",
        ca,
        "--client-cert",
        path(&certs.client_cert),
        "--client-key",
        path(&certs.client_key),
    ];
    let mut submit = with_cert.to_vec();
    submit.extend(["submit", "echo", "--wait"]);
    let out = tokio::time::timeout(T, orchctl(&submit))
        .await
        .expect("the job finishes")
        .expect("the job COMPLETED");
    assert!(out.contains("COMPLETED"), "{out}");
    let err = orchctl(&["--server", &grpc, "--ca-cert", ca, "list"])
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    let stop = CancellationToken::new();
    stop.cancel();
    tokio::time::timeout(T, dev.wait(stop))
        .await
        .expect("orchd dev stops");
}

#[tokio::test]
async fn bad_tls_settings_stop_orchd_naming_the_flag() {
    let certs = TestCerts::generate();
    let start = |config: ServeConfig| async move {
        match orchestrator_server::start(config, CancellationToken::new()).await {
            Ok(_) => panic!("orchd started with bad TLS settings"),
            Err(e) => e.to_string(),
        }
    };
    let mut only_cert = config(&certs, false);
    only_cert.connections.tls_key = None;
    let err = start(only_cert).await;
    assert!(err.contains("--tls-key"), "{err}");

    let mut wrong_key = config(&certs, false);
    wrong_key.connections.tls_key = Some(certs.client_key.clone());
    let err = start(wrong_key).await;
    assert!(
        err.contains("--tls-key") && err.contains("does not belong"),
        "{err}"
    );

    let mut missing = config(&certs, false);
    missing.connections.tls_cert = Some("/nonexistent/server.pem".into());
    let err = start(missing).await;
    assert!(
        err.contains("--tls-cert") && err.contains("/nonexistent/server.pem"),
        "{err}"
    );

    let mut ca_without_tls = config(&certs, true);
    ca_without_tls.connections.tls_cert = None;
    ca_without_tls.connections.tls_key = None;
    let err = start(ca_without_tls).await;
    assert!(err.contains("--client-ca"), "{err}");

    let mut not_pem = config(&certs, false);
    not_pem.connections.tls_key = Some(certs.dir().to_owned());
    let err = start(not_pem).await;
    assert!(err.contains("--tls-key"), "{err}");
}

/// Reads from `stream` until the peer closes it (Ok) or `wait` passes with
/// the connection still open (Err); returns what was read.
fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Result<Vec<u8>, Vec<u8>> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => return Ok(got),
            Err(_) => return Err(got),
        }
    }
}

async fn plain_server(tune: impl FnOnce(&mut ServeConfig)) -> (TestServer, SocketAddr) {
    let mut config = ServeConfig::local(shared_redis_url(), shared_amqp_url());
    config.redis_prefix = format!("{}:", unique_name("t"));
    tune(&mut config);
    let server = TestServer::with_config(config).await;
    let http: SocketAddr = server.http.trim_start_matches("http://").parse().unwrap();
    (server, http)
}

/// Injects: a client that sends half a request line and then nothing
/// (slowloris). Asserts: orchd closes the connection once the header
/// timeout (1s here; 15s by default, longer than this test waits) passes.
#[tokio::test]
async fn a_request_head_that_never_completes_is_cut_off() {
    let (server, http) = plain_server(|c| {
        c.connections.http_header_timeout = Duration::from_secs(1);
    })
    .await;
    let closed = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(http).unwrap();
        stream.write_all(b"GET /healthz HT").unwrap();
        read_until_closed(&mut stream, Duration::from_secs(10))
    })
    .await
    .unwrap();
    let got = closed.expect("the server closed the half-sent request's connection");
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "no answer to half a request"
    );
    server.stop().await;
}

/// Injects: a keep-alive client that goes quiet after one request, and a
/// watch stream that stays silent longer than the idle timeout. Asserts:
/// the quiet connection is closed after the idle timeout (1s here; 60s by
/// default), while the watch, a request in flight, is not cut and ends
/// normally when its job does.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_but_requests_in_flight_are_not() {
    let (server, http) = plain_server(|c| {
        c.connections.http_idle_timeout = Duration::from_secs(1);
        c.connections.http_header_timeout = Duration::from_secs(60);
    })
    .await;
    let idle = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(http).unwrap();
        stream
            .write_all(b"GET /openapi.json HTTP/1.1\r\nHost: orchd\r\n\r\n")
            .unwrap();
        read_until_closed(&mut stream, Duration::from_secs(10))
    });

    // A job no worker takes (its queue has none), watched over REST.
    let mut jobs = server.jobs().await;
    let job = jobs
        .submit_job(SubmitJobRequest {
            kind: "noop".into(),
            queue: fresh_queue(),
            ..SubmitJobRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = job.id.clone();
    let watch = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(http).unwrap();
        write!(
            stream,
            "GET /jobs/{id}:watch HTTP/1.1\r\nHost: orchd\r\n\r\n"
        )
        .unwrap();
        // Silent for three idle timeouts: still open.
        let quiet = read_until_closed(&mut stream, Duration::from_secs(3));
        let first = quiet.expect_err("a watch in flight must not be closed as idle");
        // Then the job is cancelled (below) and the stream ends with it.
        let rest = read_until_closed(&mut stream, T);
        (first, rest)
    });

    let got = idle.await.unwrap().expect("the idle connection was closed");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    jobs.cancel_job(orchestrator::proto::v1::CancelJobRequest {
        job_id: job.id.clone(),
    })
    .await
    .unwrap();
    let (first, rest) = watch.await.unwrap();
    let mut all = first;
    all.extend(rest.unwrap_or_else(|partial| partial));
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("CANCELLED"), "{text}");
    server.stop().await;
}

/// Injects: TCP connections to both TLS ports that never send a
/// ClientHello, and one to a plain gRPC port that sends nothing. Asserts:
/// each is closed once the handshake timeout (1s here; 10s by default)
/// passes, and the server still serves TLS clients afterwards.
#[tokio::test]
async fn connections_that_never_start_are_closed_after_the_handshake_timeout() {
    let certs = TestCerts::generate();
    let mut config = config(&certs, false);
    config.connections.handshake_timeout = Duration::from_secs(1);
    let server = TestServer::with_config(config).await;
    let http: SocketAddr = server.http.trim_start_matches("http://").parse().unwrap();
    let (plain, _) = plain_server(|c| {
        c.connections.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    for addr in [server.grpc_addr, http, plain.grpc_addr] {
        let closed = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            read_until_closed(&mut stream, Duration::from_secs(8))
        })
        .await
        .unwrap();
        let got = closed.unwrap_or_else(|_| panic!("{addr}: a silent connection stays open"));
        assert!(got.is_empty(), "{addr}: nothing is sent to a silent client");
    }
    let tls = ClientTls {
        ca_cert: Some(certs.ca_cert.clone()),
        ..ClientTls::default()
    };
    let mut jobs = tls_jobs(&server, &tls).await;
    jobs.list_jobs(orchestrator::proto::v1::ListJobsRequest::default())
        .await
        .expect("TLS clients still get in");
    plain.stop().await;
    server.stop().await;
}
