//! `orchctl bench` end to end: the real binary against an in-process
//! `orchd dev` (whose workers consume every queue, so the fresh
//! `bench-<random>` queue of each run is served). Checks what the JSON
//! report says and how the command exits; never how fast anything was.

use std::process::Output;
use std::time::Duration;

use orchestrator_server::dev::{self, DevConfig, DevRunning};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(120);

struct Orchd {
    grpc: String,
    rest: String,
    running: Option<DevRunning>,
}

impl Orchd {
    async fn start() -> Orchd {
        Orchd::with_config(DevConfig::local_ephemeral(2)).await
    }

    async fn with_config(config: DevConfig) -> Orchd {
        let running = dev::start(config).await.expect("orchd dev starts");
        Orchd {
            grpc: format!("http://{}", running.server.grpc_addr),
            rest: format!("http://{}", running.server.http_addr),
            running: Some(running),
        }
    }

    /// Runs the `orchctl` binary with `--server` set to this orchd.
    async fn orchctl(&self, args: &[&str]) -> Output {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchctl"))
            .arg("--server")
            .arg(&self.grpc)
            .args(args)
            .env_remove("ORCH_TOKEN")
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(T, child)
            .await
            .expect("orchctl bench finishes")
            .expect("orchctl runs")
    }

    /// Runs `orchctl -o json bench ARGS`; returns the exit code and the
    /// report.
    async fn bench_json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = vec!["-o", "json", "bench"];
        all.extend_from_slice(args);
        let output = self.orchctl(&all).await;
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let report: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\nstderr: {stderr}"));
        (output.status.code().expect("exit code"), report)
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

fn number(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {report:#}"))
}

/// The latency object is complete and ordered.
fn check_latency(latency: &Value, samples: u64) {
    assert_eq!(latency["samples"], samples, "{latency}");
    let get = |k: &str| {
        latency[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {latency}"))
    };
    let (min, p50, p90, p99, max) = (get("min"), get("p50"), get("p90"), get("p99"), get("max"));
    assert!(min >= 0.0, "{latency}");
    assert!(
        min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{latency}"
    );
    let mean = get("mean");
    assert!(min <= mean && mean <= max, "{latency}");
}

/// A throughput report where every one of `n` jobs completed exactly once.
fn check_success(report: &Value, n: u64) {
    assert_eq!(report["jobs"], n, "{report:#}");
    assert_eq!(report["submitted"], n, "{report:#}");
    assert_eq!(report["completed"], n, "{report:#}");
    for zero in [
        "failed",
        "cancelled",
        "unfinished",
        "missing",
        "ended_not_once",
        "duplicate_ids",
    ] {
        assert_eq!(report[zero], 0, "{zero} in {report:#}");
    }
    assert_eq!(report["exactly_once"], true, "{report:#}");
    assert_eq!(report["problems"], Value::Array(vec![]), "{report:#}");
    for positive in ["submit_seconds", "submit_rate", "e2e_seconds", "e2e_rate"] {
        assert!(number(report, positive) > 0.0, "{positive} in {report:#}");
    }
    // The last job cannot finish before the last submit was sent.
    assert!(number(report, "server_seconds") >= 0.0, "{report:#}");
    check_latency(&report["latency_ms"], n);
    let queue = report["queue"].as_str().unwrap();
    assert!(queue.starts_with("bench-"), "a fresh queue: {queue}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_grpc_completes_every_job_exactly_once() {
    let orchd = Orchd::start().await;
    let (code, report) = orchd
        .bench_json(&["-n", "50", "--concurrency", "8", "--warmup", "5"])
        .await;
    assert_eq!(code, 0, "{report:#}");
    check_success(&report, 50);
    assert_eq!(report["mode"], "throughput");
    assert_eq!(report["transport"], "grpc");
    assert_eq!(report["endpoint"], orchd.grpc.as_str());
    assert_eq!(report["kind"], "noop");
    assert_eq!(report["concurrency"], 8);
    assert_eq!(report["warmup"], 5);
    assert_eq!(report["batch"], Value::Null);
    assert_eq!(report["client_latency_ms"], Value::Null);
    orchd.stop().await;
}

/// Injects: orchd's per-token submit limit (20/s, burst 5) below what the
/// bench submits. Asserts: the bench still completes every job exactly
/// once (it waits out the retry hint) and says on stderr that the limit
/// throttled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_rate_limit_slows_the_bench_down_without_failing_it() {
    let mut config = DevConfig::local_ephemeral(2);
    config.limits.submit_rate = orchestrator_server::limits::SubmitRate::per_second(20);
    config.limits.submit_burst = std::num::NonZeroU32::new(5).unwrap();
    let orchd = Orchd::with_config(config).await;
    let output = orchd
        .orchctl(&["-o", "json", "bench", "-n", "30", "--concurrency", "8"])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(0), "{report:#}\n{stderr}");
    check_success(&report, 30);
    assert!(stderr.contains("throttles the submits"), "{stderr}");
    orchd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_rest_in_batches() {
    let orchd = Orchd::start().await;
    let (code, report) = orchd
        .bench_json(&["-n", "50", "--rest", &orchd.rest, "--batch", "20"])
        .await;
    assert_eq!(code, 0, "{report:#}");
    check_success(&report, 50);
    assert_eq!(report["transport"], "rest");
    assert_eq!(report["batch"], 20);
    orchd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_mode_runs_one_job_at_a_time() {
    let orchd = Orchd::start().await;
    for transport in [vec![], vec!["--rest", orchd.rest.as_str()]] {
        let mut args = vec![
            "--latency",
            "5",
            "--kind",
            "echo",
            "--payload",
            r#"{"x":1}"#,
        ];
        args.extend(transport.iter().copied());
        let (code, report) = orchd.bench_json(&args).await;
        assert_eq!(code, 0, "{report:#}");
        assert_eq!(report["mode"], "latency");
        assert_eq!(report["concurrency"], 1);
        assert_eq!(report["completed"], 5, "{report:#}");
        assert_eq!(report["exactly_once"], true, "{report:#}");
        check_latency(&report["latency_ms"], 5);
        check_latency(&report["client_latency_ms"], 5);
        assert!(number(&report["client_latency_ms"], "min") > 0.0);
    }
    orchd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mode_cancels_every_running_job() {
    let orchd = Orchd::start().await;
    for transport in [vec![], vec!["--rest", orchd.rest.as_str()]] {
        let mut args = vec!["--cancel", "4", "--warmup", "1"];
        args.extend(transport.iter().copied());
        let (code, report) = orchd.bench_json(&args).await;
        assert_eq!(code, 0, "{report:#}");
        assert_eq!(report["mode"], "cancel");
        assert_eq!(report["kind"], "sleep");
        assert_eq!(report["concurrency"], 1);
        assert_eq!(report["cancelled"], 4, "{report:#}");
        assert_eq!(report["completed"], 0, "{report:#}");
        assert_eq!(report["exactly_once"], true, "{report:#}");
        assert_eq!(report["problems"], Value::Array(vec![]), "{report:#}");
        check_latency(&report["cancel_latency_ms"], 4);
        check_latency(&report["cancel_server_latency_ms"], 4);
        assert!(number(&report["cancel_latency_ms"], "min") > 0.0);
        assert_eq!(report["latency_ms"], Value::Null, "no job COMPLETED");
    }
    orchd.stop().await;
}

/// A kind that ends by itself before it could be cancelled fails the
/// check: every job of a cancel run must end CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mode_fails_when_jobs_end_by_themselves() {
    let orchd = Orchd::start().await;
    let (code, report) = orchd.bench_json(&["--cancel", "2", "--kind", "noop"]).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["exactly_once"], false, "{report:#}");
    assert_eq!(report["completed"], 2, "{report:#}");
    assert_eq!(report["cancel_latency_ms"], Value::Null, "{report:#}");
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems[0].as_str().unwrap().ends_with(": COMPLETED"),
        "{problems:?}"
    );
    orchd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_fail_the_check() {
    let orchd = Orchd::start().await;
    let (code, report) = orchd
        .bench_json(&[
            "-n",
            "6",
            "--kind",
            "fail",
            "--payload",
            r#"{"message":"nope","permanent":true}"#,
        ])
        .await;
    assert_ne!(code, 0, "{report:#}");
    assert_eq!(report["exactly_once"], false, "{report:#}");
    assert_eq!(report["failed"], 6, "{report:#}");
    assert_eq!(report["completed"], 0, "{report:#}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 6);
    assert!(
        problems[0].as_str().unwrap().contains("FAILED: nope"),
        "{problems:?}"
    );
    assert_eq!(report["latency_ms"], Value::Null, "no job COMPLETED");
    orchd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_report_and_timeout_without_workers_for_the_queue() {
    let orchd = Orchd::start().await;
    let output = orchd
        .orchctl(&["bench", "-n", "20", "--queue", "tbl"])
        .await;
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    for expected in [
        "orchctl bench: 20 noop jobs on queue tbl over grpc",
        "20 submitted, 20 COMPLETED, 0 FAILED",
        "exactly once",
        "submit rate",
        "end-to-end throughput",
        "latency, server",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing in\n{stdout}"
        );
    }
    // No progress bar or other noise on stdout.
    assert!(
        !stdout.contains('\r') && !stdout.contains('\u{1b}'),
        "{stdout:?}"
    );

    // A job that does not finish in time: exit 5 and the report anyway.
    let (code, report) = orchd
        .bench_json(&[
            "-n",
            "2",
            "--kind",
            "sleep",
            "--payload",
            r#"{"seconds":3}"#,
            "--timeout",
            "300ms",
        ])
        .await;
    assert_eq!(code, 5, "{report:#}");
    assert_eq!(report["exactly_once"], false);
    assert_eq!(report["unfinished"], 2, "{report:#}");
    orchd.stop().await;
}
