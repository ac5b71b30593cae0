//! The README's quick start, as written: the first-job example block runs
//! line by line in bash against `orchd dev` on the default ports, and every
//! line must succeed. The only change made to the text is that
//! `cargo run --release --bin orchctl --` becomes the orchctl binary this
//! test was built with (a release build inside a test would take minutes).

use std::process::Command;

use orchestrator_server::dev::{self, DevConfig};
use tokio_util::sync::CancellationToken;

const MARKER: &str = "<!-- quickstart-first-job";

/// The lines of the first fenced block after the marker.
fn first_job_example(readme: &str) -> Vec<String> {
    let after = &readme[readme
        .find(MARKER)
        .expect("the README marks its first-job example")..];
    let block = after
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a ```sh block follows the marker");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_quick_start_first_job_works_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let lines = first_job_example(&readme);
    assert!(lines.len() >= 2, "{lines:?}");
    assert!(
        readme.contains("cargo run --release --bin orchd -- dev"),
        "the quick start starts orchd dev"
    );

    // The README's commands use the default ports, so orchd dev must too.
    let mut config = DevConfig::local_ephemeral(2);
    config.grpc_addr = "127.0.0.1:50051".parse().unwrap();
    config.http_addr = "127.0.0.1:8000".parse().unwrap();
    let running = dev::start(config)
        .await
        .expect("orchd dev starts on 127.0.0.1:50051 and :8000 (are they free?)");

    let orchctl = env!("CARGO_BIN_EXE_orchctl");
    for line in &lines {
        let command = line.replace("cargo run --release --bin orchctl --", orchctl);
        let output = tokio::task::spawn_blocking(move || {
            Command::new("bash")
                .args(["-euo", "pipefail", "-c", &command])
                .env_remove("ORCH_SERVER")
                .output()
                .expect("bash runs")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "README line failed: {line}\nexit: {:?}\nstdout: {stdout}\nstderr: {stderr}",
            output.status
        );
        assert!(
            !stdout.trim().is_empty(),
            "README line printed nothing: {line}"
        );
        if line.contains("curl") {
            let job: serde_json::Value = serde_json::from_str(&stdout).expect("curl prints a job");
            assert_eq!(job["state"], "CREATED", "{stdout}");
        }
    }

    let stop = CancellationToken::new();
    stop.cancel();
    running.wait(stop).await;
}

#[test]
fn the_example_block_is_found() {
    let text = format!(
        "intro\n{MARKER} -->\n```sh\nfirst one\n\n# comment\nsecond\n```\nafter\n```sh\nnot this\n```\n"
    );
    assert_eq!(first_job_example(&text), ["first one", "second"]);
}
