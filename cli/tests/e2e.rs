//! `orchctl` end to end against a real `orchd dev` (embedded store,
//! in-process queue and workers running the built-in handlers; no Redis or
//! RabbitMQ needed): what it prints and how it exits, through the library
//! (`run_to`) and through the real binary.

use std::time::Duration;

use clap::Parser;
use orchestrator::proto::v1::{Job, job::State};
use orchestrator_cli::{Cli, CliError, run_to};
use orchestrator_server::dev::{self, DevConfig, DevRunning};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

/// An ephemeral `orchd dev` with two workers.
struct Orchd {
    url: String,
    running: Option<DevRunning>,
}

impl Orchd {
    async fn start() -> Orchd {
        let running = dev::start(DevConfig::local_ephemeral(2))
            .await
            .expect("orchd dev starts");
        Orchd {
            url: format!("http://{}", running.server.grpc_addr),
            running: Some(running),
        }
    }

    /// Runs `orchctl --server URL ARGS` in process; returns stdout and the
    /// result.
    async fn orchctl(&self, args: &[&str]) -> (String, Result<(), CliError>) {
        let cli = Cli::try_parse_from(
            ["orchctl", "--server", &self.url]
                .into_iter()
                .chain(args.iter().copied()),
        )
        .unwrap();
        let mut out = Vec::new();
        let result = tokio::time::timeout(T, run_to(cli, &mut out))
            .await
            .expect("orchctl finishes");
        (String::from_utf8(out).unwrap(), result)
    }

    /// Like [`Orchd::orchctl`], for commands that must succeed.
    async fn ok(&self, args: &[&str]) -> String {
        let (out, result) = self.orchctl(args).await;
        if let Err(e) = result {
            panic!("orchctl {args:?} failed: {e}");
        }
        out
    }

    /// `status -o json` of a job.
    async fn job(&self, id: &str) -> Job {
        serde_json::from_str(&self.ok(&["-o", "json", "status", id]).await).unwrap()
    }

    async fn stop(mut self) {
        let stop = CancellationToken::new();
        stop.cancel();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(T, running.wait(stop))
                .await
                .expect("orchd stops");
        }
    }
}

fn exit_code(result: &Result<(), CliError>) -> u8 {
    result.as_ref().err().map_or(0, CliError::exit_code)
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.chars().enumerate().all(|(i, c)| {
            matches!(i, 8 | 13 | 18 | 23) == (c == '-') && (c == '-' || c.is_ascii_hexdigit())
        })
}

#[tokio::test]
async fn submit_prints_only_the_id_then_status_shows_the_job() {
    let orchd = Orchd::start().await;
    let out = orchd
        .ok(&[
            "submit",
            "echo",
            "--payload",
            r#"{"hello":"world","n":1}"#,
            "--label",
            "team=ml",
            "--max-attempts",
            "2",
            "--timeout",
            "30s",
            "--idempotency-key",
            "k-1",
        ])
        .await;
    let id = out.strip_suffix('\n').expect("one line");
    assert!(is_uuid(id), "{out:?}");

    // The same idempotency key gives the same job back.
    let again = orchd
        .ok(&[
            "submit",
            "echo",
            "--payload",
            "{}",
            "--idempotency-key",
            "k-1",
        ])
        .await;
    assert_eq!(again, out);

    let (lines, result) = orchd.orchctl(&["watch", id]).await;
    assert_eq!(exit_code(&result), 0, "{lines}");
    assert!(
        lines.lines().last().unwrap().contains("COMPLETED"),
        "{lines}"
    );

    let text = orchd.ok(&["status", id]).await;
    for expected in [
        format!("id:               {id}\n"),
        "kind:             echo\n".to_owned(),
        "state:            COMPLETED\n".to_owned(),
        "queue:            default\n".to_owned(),
        "attempt:          1/2\n".to_owned(),
        "cancel_requested: false\n".to_owned(),
        "timeout:          30s\n".to_owned(),
        "labels:           team=ml\n".to_owned(),
        "payload:          {\"hello\":\"world\",\"n\":1}\n".to_owned(),
        "history:\n".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing in\n{text}");
    }
    assert!(text.contains("- → CREATED"), "{text}");
    assert!(text.contains("RUNNING → COMPLETED"), "{text}");

    let job = orchd.job(id).await;
    assert_eq!(job.id, id);
    assert_eq!(job.state, State::Completed as i32);
    assert!(job.result.is_some());
    orchd.stop().await;
}

#[tokio::test]
async fn submit_json_prints_the_new_job() {
    let orchd = Orchd::start().await;
    let out = orchd
        .ok(&["-o", "json", "submit", "noop", "--queue", "other"])
        .await;
    let job: Job = serde_json::from_str(&out).unwrap();
    assert!(is_uuid(&job.id));
    assert_eq!(job.kind, "noop");
    assert_eq!(job.queue, "other");
    orchd.stop().await;
}

#[tokio::test]
async fn submit_wait_exits_with_the_outcome() {
    let orchd = Orchd::start().await;

    let (out, result) = orchd
        .orchctl(&["submit", "sleep", "--payload", r#"{"seconds":0}"#, "--wait"])
        .await;
    assert_eq!(exit_code(&result), 0, "{result:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(is_uuid(lines[0]), "the id comes first: {out}");
    assert!(lines.last().unwrap().contains("COMPLETED"), "{out}");

    let (out, result) = orchd
        .orchctl(&[
            "submit",
            "fail",
            "--payload",
            r#"{"message":"no luck","permanent":true}"#,
            "--wait",
        ])
        .await;
    assert_eq!(exit_code(&result), 10, "{result:?}");
    assert!(result.unwrap_err().to_string().ends_with("FAILED: no luck"));
    assert!(out.lines().last().unwrap().contains("FAILED"), "{out}");
    assert!(out.contains("no luck"), "{out}");

    // -o json with --wait: only the NDJSON stream, one job per line.
    let (out, result) = orchd
        .orchctl(&["-o", "json", "submit", "noop", "--wait"])
        .await;
    assert_eq!(exit_code(&result), 0);
    let jobs: Vec<Job> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(jobs.last().unwrap().state, State::Completed as i32, "{out}");
    orchd.stop().await;
}

#[tokio::test]
async fn cancel_then_watch_exits_cancelled() {
    let orchd = Orchd::start().await;
    let id = orchd
        .ok(&["submit", "sleep", "--payload", r#"{"seconds":3600}"#])
        .await;
    let id = id.trim();

    let out = orchd.ok(&["cancel", id]).await;
    assert!(
        out == format!("job {id} is CANCELLED\n") || out.contains("cancel requested"),
        "{out}"
    );
    let (lines, result) = orchd.orchctl(&["watch", id]).await;
    assert_eq!(exit_code(&result), 11, "{lines}\n{result:?}");
    assert!(
        lines.lines().last().unwrap().contains("CANCELLED"),
        "{lines}"
    );

    // A COMPLETED job cannot be cancelled: FAILED_PRECONDITION, exit 4.
    let done = orchd.ok(&["submit", "noop", "--wait"]).await;
    let done = done.lines().next().unwrap();
    let (_, result) = orchd.orchctl(&["cancel", done]).await;
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), 4);
    assert!(
        err.to_string().starts_with("FAILED_PRECONDITION: "),
        "{err}"
    );
    orchd.stop().await;
}

#[tokio::test]
async fn server_errors_map_to_exit_codes() {
    let orchd = Orchd::start().await;

    let (_, result) = orchd
        .orchctl(&["status", "0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11"])
        .await;
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), 3);
    assert!(err.to_string().starts_with("NOT_FOUND: "), "{err}");

    let (_, result) = orchd.orchctl(&["status", "not-a-uuid"]).await;
    let err = result.unwrap_err();
    assert_eq!(err.exit_code(), 4);
    assert!(err.to_string().starts_with("INVALID_ARGUMENT: "), "{err}");

    let (_, result) = orchd.orchctl(&["submit", "Bad Kind!"]).await;
    assert_eq!(exit_code(&result), 4, "{result:?}");

    let (out, result) = orchd.orchctl(&["submit", "echo", "--payload", "[1]"]).await;
    assert_eq!(exit_code(&result), 4);
    assert_eq!(out, "");
    orchd.stop().await;
}

#[tokio::test]
async fn list_shows_newest_first_and_honours_filters_and_limit() {
    let orchd = Orchd::start().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = orchd
            .ok(&["submit", "noop", "--queue", "listed", "--wait"])
            .await;
        ids.push(id.lines().next().unwrap().to_owned());
        // Distinct creation times, so "newest first" is well defined.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    orchd
        .ok(&["submit", "noop", "--queue", "elsewhere", "--wait"])
        .await;

    let out = orchd
        .ok(&[
            "list",
            "--queue",
            "listed",
            "--state",
            "Completed",
            "--limit",
            "3",
        ])
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID "), "{out}");
    let listed: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let newest: Vec<&str> = ids.iter().rev().take(3).map(String::as_str).collect();
    assert_eq!(listed, newest, "{out}");
    assert!(lines[1].contains("COMPLETED") && lines[1].contains("listed"));

    let out = orchd.ok(&["-o", "json", "list", "--queue", "listed"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 5, "{out}");

    let out = orchd.ok(&["-o", "json", "list", "--state", "failed"]).await;
    assert_eq!(out, "{\n  \"jobs\": []\n}\n");
    orchd.stop().await;
}

/// The real binary: stdout carries only data, stderr `error: ...`, and the
/// exit codes are the documented ones.
#[tokio::test]
async fn binary_streams_and_exit_codes() {
    let orchd = Orchd::start().await;
    let run = |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_orchctl"))
            .args(args)
            .env("ORCH_SERVER", &orchd.url)
            .env_remove("ORCH_TOKEN")
            .output()
    };

    let out = run(&["submit", "sleep", "--payload", r#"{"seconds":0}"#])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(is_uuid(stdout.trim_end()), "{stdout:?}");
    assert!(out.stderr.is_empty());

    let out = run(&["status", "0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: NOT_FOUND: "), "{stderr}");

    let out = run(&["submit", "sleep", "--payload", "42"]).await.unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: --payload must be a JSON object, got a number\n"
    );

    let out = run(&[
        "submit",
        "fail",
        "--payload",
        r#"{"permanent":true}"#,
        "--wait",
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: job "));

    let out = run(&["list", "--bogus"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchctl"))
        .args(["--server", "http://127.0.0.1:1", "status", "x"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: cannot reach orchd at http://127.0.0.1:1: "),
        "{stderr}"
    );
    orchd.stop().await;
}
