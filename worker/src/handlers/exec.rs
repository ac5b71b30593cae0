//! `exec {"command": ["prog", "arg", ...], "env": {...}, "cwd": "..."}`:
//! runs a process and completes with `{"exit_code", "stdout", "stderr"}`
//! (the last 4 KiB of each stream). A non-zero exit is a retryable failure
//! whose message carries the exit code and the output tails.
//!
//! The process runs in its own process group, so that stopping the job
//! stops everything it started: on cancellation the group gets SIGTERM, then
//! SIGKILL after the kill grace. Disabled unless the worker runs with
//! `--enable-exec`, since it runs arbitrary commands from job payloads.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use pbjson_types::Struct;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{string, string_map, strings};
use crate::error::HandlerError;
use crate::handler::{Handler, JobContext, to_struct};

/// Why an exec job fails on a worker started without `--enable-exec`.
pub const DISABLED_MESSAGE: &str = "exec is disabled on this worker (start it with --enable-exec)";
/// How much of the end of stdout and of stderr is kept.
pub const TAIL_BYTES: usize = 4096;
/// How much of each tail goes into a failure message.
const MESSAGE_TAIL_BYTES: usize = 1024;
/// How long output is still read after the process exited, in case a child
/// it left behind keeps the pipes open.
const PIPE_DRAIN: Duration = Duration::from_millis(500);
/// Variables of the worker's environment that a command does not inherit.
const HIDDEN_ENV: &[&str] = &["ORCH_TOKEN"];

/// The `exec` handler.
#[derive(Debug, Clone, Copy)]
pub struct Exec {
    /// Whether commands may run at all (`--enable-exec`).
    pub enabled: bool,
    /// Time between SIGTERM and SIGKILL when the job is stopped.
    pub kill_grace: Duration,
}

/// A validated exec payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
}

impl Spec {
    pub(crate) fn parse(payload: &Struct) -> Result<Spec, HandlerError> {
        let command = strings(payload, "command")?.ok_or_else(|| {
            HandlerError::invalid_field(
                "command",
                "is required (a list such as [\"prog\", \"arg\"])",
            )
        })?;
        match command.first() {
            None => return Err(HandlerError::invalid_field("command", "must not be empty")),
            Some(prog) if prog.is_empty() => {
                return Err(HandlerError::invalid_field(
                    "command",
                    "the program (item 0) must not be empty",
                ));
            }
            Some(_) => {}
        }
        let env = string_map(payload, "env")?.unwrap_or_default();
        if let Some((key, _)) = env
            .iter()
            .find(|(k, _)| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(HandlerError::invalid_field(
                "env",
                format!("{key:?} is not a valid variable name"),
            ));
        }
        let cwd = string(payload, "cwd")?.map(str::to_owned);
        Ok(Spec { command, env, cwd })
    }
}

/// The end of an output stream.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > TAIL_BYTES {
            let excess = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    /// The last `max` bytes as text; a character cut at the start is
    /// dropped rather than shown as garbage.
    fn text(&self, max: usize) -> String {
        let start = self.bytes.len().saturating_sub(max);
        let mut slice = &self.bytes[start..];
        if self.truncated || start > 0 {
            while let Some((&b, rest)) = slice.split_first() {
                if b & 0b1100_0000 != 0b1000_0000 {
                    break;
                }
                slice = rest;
            }
        }
        String::from_utf8_lossy(slice).into_owned()
    }
}

type SharedTail = Arc<Mutex<Tail>>;

fn read_tail(
    stream: Option<impl AsyncRead + Unpin + Send + 'static>,
) -> (SharedTail, tokio::task::JoinHandle<()>) {
    let tail = SharedTail::default();
    let sink = tail.clone();
    let task = tokio::spawn(async move {
        let Some(mut stream) = stream else { return };
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(&buf[..n]);
        }
    });
    (tail, task)
}

/// How a command ended.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub stdout_short: String,
    pub stderr_short: String,
    pub cancelled: bool,
}

/// Kills the process group if the command is dropped before it was reaped
/// (the handler was abandoned), so nothing outlives its job.
struct GroupGuard {
    pgid: Option<Pid>,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

async fn stop(
    child: &mut Child,
    pgid: Option<Pid>,
    kill_grace: Duration,
) -> std::io::Result<ExitStatus> {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGTERM);
    }
    match tokio::time::timeout(kill_grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            child.wait().await
        }
    }
}

/// Runs `spec` until it exits or `cancel` fires (then stops its process
/// group). Errors are spawn failures.
pub(crate) async fn run_command(
    spec: &Spec,
    cancel: &CancellationToken,
    kill_grace: Duration,
) -> Result<Finished, HandlerError> {
    let program = &spec.command[0];
    let mut command = Command::new(program);
    command
        .args(&spec.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for name in HIDDEN_ENV {
        command.env_remove(name);
    }
    command.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn().map_err(|e| {
        let message = format!("cannot run {program:?}: {e}");
        match e.kind() {
            // Missing program or directory, not executable: the same on retry.
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                HandlerError::Permanent(message)
            }
            _ => HandlerError::Retryable(message),
        }
    })?;
    // The child leads its own group, so its pid is the group id.
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let mut guard = GroupGuard { pgid };
    let (stdout, stdout_task) = read_tail(child.stdout.take());
    let (stderr, stderr_task) = read_tail(child.stderr.take());

    let (status, cancelled) = tokio::select! {
        status = child.wait() => (status, false),
        _ = cancel.cancelled() => (stop(&mut child, pgid, kill_grace).await, true),
    };
    if cancelled && let Some(pgid) = pgid {
        // The leader is gone; take down anything of its group that
        // survived SIGTERM (the group id stays reserved while members live).
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    guard.pgid = None;
    let status = status
        .map_err(|e| HandlerError::Retryable(format!("waiting for {program:?} failed: {e}")))?;
    for task in [stdout_task, stderr_task] {
        let abort = task.abort_handle();
        if tokio::time::timeout(PIPE_DRAIN, task).await.is_err() {
            abort.abort();
        }
    }
    let text = |tail: &SharedTail, max| {
        tail.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .text(max)
    };
    Ok(Finished {
        status,
        stdout: text(&stdout, TAIL_BYTES),
        stderr: text(&stderr, TAIL_BYTES),
        stdout_short: text(&stdout, MESSAGE_TAIL_BYTES),
        stderr_short: text(&stderr, MESSAGE_TAIL_BYTES),
        cancelled,
    })
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal)
                .map(|s| s.as_str())
                .unwrap_or("unknown signal");
            format!("was killed by signal {signal} ({name})")
        }
        (None, None) => "ended with an unknown status".to_owned(),
    }
}

#[async_trait]
impl Handler for Exec {
    async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError> {
        if !self.enabled {
            return Err(HandlerError::Permanent(DISABLED_MESSAGE.into()));
        }
        let spec = Spec::parse(&ctx.payload)?;
        tracing::info!(job_id = %ctx.job_id, command = ?spec.command, "exec: starting command");
        let done = run_command(&spec, &ctx.cancel, self.kill_grace).await?;
        if done.cancelled {
            tracing::info!(job_id = %ctx.job_id, "exec: command stopped ({})", describe(&done.status));
            return Err(HandlerError::Cancelled);
        }
        if done.status.success() {
            return to_struct(json!({
                "exit_code": 0,
                "stdout": done.stdout,
                "stderr": done.stderr,
            }));
        }
        Err(HandlerError::Retryable(format!(
            "command {:?} {}; stderr (tail): {:?}; stdout (tail): {:?}",
            spec.command[0],
            describe(&done.status),
            done.stderr_short,
            done.stdout_short
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::handler::{from_struct, test_context};

    fn exec() -> Exec {
        Exec {
            enabled: true,
            kill_grace: Duration::from_secs(2),
        }
    }

    fn sh(script: &str) -> serde_json::Value {
        json!({"command": ["sh", "-c", script]})
    }

    #[tokio::test]
    async fn disabled_exec_fails_permanently() {
        let off = Exec {
            enabled: false,
            ..exec()
        };
        let err = off
            .run(test_context("exec", sh("echo hi"), 1))
            .await
            .unwrap_err();
        assert_eq!(err, HandlerError::Permanent(DISABLED_MESSAGE.into()));
    }

    #[tokio::test]
    async fn success_returns_exit_code_and_output() {
        let payload = json!({
            "command": ["sh", "-c", "echo out; echo err >&2; echo \"$GREETING from $(pwd)\""],
            "env": {"GREETING": "hello"},
            "cwd": "/tmp",
        });
        let out = exec().run(test_context("exec", payload, 1)).await.unwrap();
        assert_eq!(
            from_struct(&out),
            json!({"exit_code": 0.0, "stdout": "out\nhello from /tmp\n", "stderr": "err\n"})
        );
    }

    #[tokio::test]
    async fn non_zero_exit_is_a_retryable_failure_with_code_and_tail() {
        let err = exec()
            .run(test_context(
                "exec",
                sh("echo hi; echo oops >&2; exit 3"),
                1,
            ))
            .await
            .unwrap_err();
        let HandlerError::Retryable(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.contains("exited with code 3"), "{message}");
        assert!(message.contains("stdout (tail): \"hi\\n\""), "{message}");
        assert!(message.contains("stderr (tail): \"oops\\n\""), "{message}");
    }

    #[tokio::test]
    async fn only_the_tail_of_long_output_is_kept() {
        let spec = Spec::parse(&to_struct(sh("seq 1 20000")).unwrap()).unwrap();
        let done = run_command(&spec, &CancellationToken::new(), Duration::from_secs(1))
            .await
            .unwrap();
        assert!(done.status.success());
        assert!(done.stdout.len() <= TAIL_BYTES);
        assert!(done.stdout.len() > TAIL_BYTES - 10);
        assert!(done.stdout.ends_with("19999\n20000\n"));
        assert!(done.stdout_short.len() <= MESSAGE_TAIL_BYTES);
    }

    #[tokio::test]
    async fn cancellation_kills_the_whole_process_group_promptly() {
        // A shell that starts `sleep 30` in the background and waits for it:
        // both are in the group, and the shell's pid file tells us the child's.
        let dir = tempfile_dir();
        let pidfile = format!("{dir}/sleep.pid");
        let ctx = test_context(
            "exec",
            sh(&format!("sleep 30 & echo $! > {pidfile}; wait")),
            1,
        );
        let cancel = ctx.cancel.clone();
        let started = Instant::now();
        let run = tokio::spawn(async move { exec().run(ctx).await });
        let sleep_pid = wait_for_pid(&pidfile).await;
        cancel.cancel();
        let out = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("stopped in time")
            .unwrap();
        assert_eq!(out, Err(HandlerError::Cancelled));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(dies_soon(sleep_pid).await, "the background sleep survived");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile_dir();
        let pidfile = format!("{dir}/ready");
        let handler = Exec {
            enabled: true,
            kill_grace: Duration::from_millis(300),
        };
        let ctx = test_context(
            "exec",
            sh(&format!(
                "trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done"
            )),
            1,
        );
        let cancel = ctx.cancel.clone();
        let run = tokio::spawn(async move { handler.run(ctx).await });
        let pid = wait_for_pid(&pidfile).await;
        let started = Instant::now();
        cancel.cancel();
        let out = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("stopped in time")
            .unwrap();
        assert_eq!(out, Err(HandlerError::Cancelled));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(dies_soon(pid).await, "the shell survived");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn payload_errors_are_permanent_and_name_the_field() {
        for (payload, field) in [
            (json!({}), "command"),
            (json!({"command": []}), "command"),
            (json!({"command": [""]}), "command"),
            (json!({"command": "ls -l"}), "command"),
            (json!({"command": ["ls", 1]}), "command"),
            (json!({"command": ["ls"], "env": {"A": 1}}), "env"),
            (json!({"command": ["ls"], "env": {"A=B": "c"}}), "env"),
            (json!({"command": ["ls"], "env": ["A"]}), "env"),
            (json!({"command": ["ls"], "cwd": 5}), "cwd"),
        ] {
            let err = exec()
                .run(test_context("exec", payload.clone(), 1))
                .await
                .unwrap_err();
            let HandlerError::Permanent(m) = err else {
                panic!("{payload}: {err:?}")
            };
            assert!(m.contains(&format!("\"{field}\"")), "{payload}: {m}");
        }
    }

    #[tokio::test]
    async fn a_missing_program_fails_permanently() {
        let err = exec()
            .run(test_context(
                "exec",
                json!({"command": ["/nonexistent/prog"]}),
                1,
            ))
            .await
            .unwrap_err();
        let HandlerError::Permanent(m) = err else {
            panic!("{err:?}")
        };
        assert!(m.contains("cannot run \"/nonexistent/prog\""), "{m}");
    }

    #[test]
    fn tails_drop_cut_characters() {
        let mut tail = Tail::default();
        tail.push(&[b'x'; TAIL_BYTES]);
        tail.push("é".as_bytes()); // 2 bytes: the first 'x' bytes fall off
        tail.push(&[b'y'; TAIL_BYTES - 1]); // leaves only the second byte of 'é'
        assert!(tail.truncated);
        assert_eq!(tail.text(TAIL_BYTES), "y".repeat(TAIL_BYTES - 1));
    }

    fn tempfile_dir() -> String {
        let dir = std::env::temp_dir().join(format!(
            "orch-worker-exec-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.to_string_lossy().into_owned()
    }

    async fn wait_for_pid(path: &str) -> i32 {
        for _ in 0..200 {
            if let Ok(text) = std::fs::read_to_string(path)
                && let Ok(pid) = text.trim().parse()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{path} never appeared");
    }

    /// Whether `pid` is gone within a moment (signals are delivered
    /// asynchronously).
    async fn dies_soon(pid: i32) -> bool {
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn alive(pid: i32) -> bool {
        // A killed process may linger as a zombie until its parent (here the
        // already-killed shell, then init) reaps it; count zombies as dead.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        !matches!(state, None | Some("Z") | Some("X"))
    }
}
