//! The command line of `orchctl`: global flags, subcommands and their
//! arguments, as clap derive types.
//!
//! Parsing only checks the shape of the command line (exit code 2 on
//! failure). What the values mean (is `--payload` a JSON object, is a
//! `--label` a `KEY=VALUE` pair) is checked when the request is built, in
//! [`crate::request`], before anything is sent (exit code 4).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use orchestrator::proto::v1::job::State;

use crate::exit::EXIT_CODES_HELP;

/// Where `orchd` listens unless `--server` or `ORCH_SERVER` says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// How many jobs `list` shows unless `--limit` says otherwise.
pub const DEFAULT_LIST_LIMIT: u32 = 50;

const LONG_ABOUT: &str = "\
orchctl is the command-line client of the orchestrator: it submits jobs to
orchd over gRPC, shows and lists them, cancels them and follows them until
they finish.";

const AFTER_LONG_HELP: &str = "\
Examples:
  ID=$(orchctl submit sleep --payload '{\"seconds\":1}')
  orchctl status \"$ID\"
  orchctl watch \"$ID\"
  orchctl submit sleep --payload-file job.json --label team=ml --wait
  orchctl list --state failed --limit 10 -o json";

/// `orchctl`: command-line client of the orchestrator.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orchctl",
    version,
    about = "Command-line client of the orchestrator: submit, inspect, list, cancel and watch jobs",
    long_about = LONG_ABOUT,
    after_long_help = format!("{EXIT_CODES_HELP}\n\n{AFTER_LONG_HELP}"),
    propagate_version = true,
)]
pub struct Cli {
    /// orchd gRPC endpoint (http:// is assumed when no scheme is given;
    /// https:// for TLS)
    #[arg(
        long,
        global = true,
        env = "ORCH_SERVER",
        value_name = "URL",
        default_value = DEFAULT_SERVER
    )]
    pub server: String,

    /// Bearer token, sent as `authorization: Bearer <TOKEN>` on every call
    #[arg(
        long,
        global = true,
        env = "ORCH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// PEM CA certificate(s) to trust for an https:// server (and --rest
    /// URL) instead of the system's roots
    #[arg(long, global = true, env = "ORCH_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// PEM client certificate for an orchd that requires one (mTLS); needs
    /// --client-key
    #[arg(
        long,
        global = true,
        env = "ORCH_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of --client-cert
    #[arg(
        long,
        global = true,
        env = "ORCH_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,

    /// Output format; json is the proto3 JSON the REST API returns
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value_t = OutputFormat::Table
    )]
    pub output: OutputFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns and key/value views for people.
    Table,
    /// proto3 JSON (lowerCamelCase fields, enum names, RFC 3339 times).
    Json,
}

/// The subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Submit a job; prints its id (the job JSON with -o json)
    #[command(long_about = "\
Submit a job and print its id on stdout, so that
`ID=$(orchctl submit KIND ...)` works. With -o json the new job is printed
as JSON instead.

With --wait the job is then followed like `orchctl watch` and the exit code
tells how it ended (0 COMPLETED, 10 FAILED, 11 CANCELLED). With --wait and
-o json the output is only the NDJSON stream of `watch -o json`.")]
    Submit(SubmitArgs),

    /// Show one job: its fields and its history
    Status(JobIdArg),

    /// Cancel a job (a running job is stopped by its worker)
    #[command(long_about = "\
Cancel a job. CREATED and RETRYING jobs become CANCELLED at once; a RUNNING
job is marked cancel_requested and its worker stops it. Cancelling a
COMPLETED or FAILED job fails with FAILED_PRECONDITION (exit code 4).")]
    Cancel(JobIdArg),

    /// List jobs, newest first
    #[command(long_about = "\
List jobs, newest first, following the server's pages until --limit jobs
were read or there are no more.

With -o json the output is one JSON object {\"jobs\": [...]}: the proto3
JSON of a ListJobsResponse holding all the jobs read, without
nextPageToken; `jobs` is always present, [] when nothing matched.")]
    List(ListArgs),

    /// Follow a job until it is terminal, one line per change
    #[command(long_about = "\
Follow a job until it is COMPLETED, FAILED or CANCELLED, printing one line
per change (time, state, attempt, reason/error); with -o json, one JSON job
per line (NDJSON).

The exit code tells how the job ended: 0 COMPLETED, 10 FAILED,
11 CANCELLED.")]
    Watch(JobIdArg),

    /// Benchmark orchd: submit many jobs, wait for all, report the rates
    #[command(long_about = crate::bench::LONG_ABOUT)]
    Bench(crate::bench::BenchArgs),
}

/// Arguments of `submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Handler that runs the job, e.g. "sleep"
    pub kind: String,

    /// Handler input: a JSON object
    #[arg(long, value_name = "JSON", conflicts_with = "payload_file")]
    pub payload: Option<String>,

    /// Read the handler input (a JSON object) from FILE; "-" reads stdin
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,

    /// Queue to dispatch the job to (server default: "default")
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// The job's namespace (default: the token's; only admins may name another)
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// Attempts the job may use in total, 1..=100 (server default: 3)
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Label the job; repeat for several labels
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// Client-chosen key: submitting again with the same key returns the
    /// existing job instead of creating another
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,

    /// Time limit of each attempt, e.g. 30s, 5m, 1h 30m
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<humantime::Duration>,

    /// After submitting, follow the job like `watch` until it is terminal
    #[arg(long)]
    pub wait: bool,
}

/// The single `ID` argument of `status`, `cancel` and `watch`.
#[derive(Debug, Clone, Args)]
pub struct JobIdArg {
    /// Job id (a UUID, as printed by `submit`)
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Arguments of `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only jobs in this state (case-insensitive)
    #[arg(long, value_enum, ignore_case = true, value_name = "STATE")]
    pub state: Option<StateArg>,

    /// Only jobs of this kind
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,

    /// Only jobs on this queue
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// The namespace to list (default: the token's; only admins may name another)
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// Show at most N jobs, reading as many pages as needed
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_LIST_LIMIT,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub limit: u32,
}

/// A job state as written on the command line (case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Stored, waiting for a worker.
    Created,
    /// An attempt is running.
    Running,
    /// Finished successfully.
    Completed,
    /// Failed with no attempts left.
    Failed,
    /// Cancelled by a user.
    #[value(alias = "canceled")]
    Cancelled,
    /// Waiting out the backoff before the next attempt.
    Retrying,
}

impl From<StateArg> for State {
    fn from(state: StateArg) -> State {
        match state {
            StateArg::Created => State::Created,
            StateArg::Running => State::Running,
            StateArg::Completed => State::Completed,
            StateArg::Failed => State::Failed,
            StateArg::Cancelled => State::Cancelled,
            StateArg::Retrying => State::Retrying,
        }
    }
}

/// Parses a state name the way `--state` does: case-insensitive, the names
/// of the proto enum without `STATE_UNSPECIFIED`.
pub fn parse_state(name: &str) -> Result<State, String> {
    StateArg::from_str(name.trim(), true).map(State::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("orchctl").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_with_every_flag() {
        let cli = parse(&[
            "submit",
            "sleep",
            "--payload",
            r#"{"seconds":1}"#,
            "--queue",
            "fast",
            "--max-attempts",
            "5",
            "--label",
            "team=ml",
            "--label",
            "env=dev",
            "--idempotency-key",
            "k1",
            "--timeout",
            "1m 30s",
            "--wait",
        ])
        .unwrap();
        let Command::Submit(s) = cli.command else {
            panic!("not submit: {cli:?}")
        };
        assert_eq!(s.kind, "sleep");
        assert_eq!(s.payload.as_deref(), Some(r#"{"seconds":1}"#));
        assert_eq!(s.queue.as_deref(), Some("fast"));
        assert_eq!(s.max_attempts, Some(5));
        assert_eq!(s.labels, ["team=ml", "env=dev"]);
        assert_eq!(s.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(*s.timeout.unwrap(), std::time::Duration::from_secs(90));
        assert!(s.wait);
    }

    #[test]
    fn submit_minimal() {
        let cli = parse(&["submit", "sleep"]).unwrap();
        let Command::Submit(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.kind, "sleep");
        assert!(s.payload.is_none() && s.payload_file.is_none() && !s.wait);
        assert!(s.labels.is_empty());
    }

    #[test]
    fn submit_rejects_payload_and_payload_file_together() {
        let err = parse(&["submit", "k", "--payload", "{}", "--payload-file", "x"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn submit_rejects_bad_duration_and_number() {
        assert!(parse(&["submit", "k", "--timeout", "soon"]).is_err());
        assert!(parse(&["submit", "k", "--max-attempts", "-1"]).is_err());
        assert!(parse(&["submit"]).is_err(), "KIND is required");
    }

    #[test]
    fn status_cancel_watch_take_an_id() {
        for sub in ["status", "cancel", "watch"] {
            let cli = parse(&[sub, "0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11"]).unwrap();
            let id = match cli.command {
                Command::Status(a) | Command::Cancel(a) | Command::Watch(a) => a.id,
                other => panic!("{sub} parsed as {other:?}"),
            };
            assert_eq!(id, "0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11");
            assert!(parse(&[sub]).is_err(), "{sub} needs an ID");
        }
    }

    #[test]
    fn list_defaults_and_filters() {
        let cli = parse(&["list"]).unwrap();
        let Command::List(l) = cli.command else {
            panic!()
        };
        assert_eq!(l.limit, 50);
        assert!(l.state.is_none() && l.kind.is_none() && l.queue.is_none());

        let cli = parse(&[
            "list", "--state", "Failed", "--kind", "sleep", "--queue", "q", "--limit", "7",
        ])
        .unwrap();
        let Command::List(l) = cli.command else {
            panic!()
        };
        assert_eq!(l.state, Some(StateArg::Failed));
        assert_eq!(l.kind.as_deref(), Some("sleep"));
        assert_eq!(l.queue.as_deref(), Some("q"));
        assert_eq!(l.limit, 7);

        assert!(parse(&["list", "--limit", "0"]).is_err());
        assert!(parse(&["list", "--state", "sleeping"]).is_err());
    }

    #[test]
    fn global_flags_work_before_and_after_the_subcommand() {
        let cli = parse(&[
            "--server",
            "http://orchd:1",
            "-o",
            "json",
            "status",
            "x",
            "--token",
            "t0k",
        ])
        .unwrap();
        assert_eq!(cli.server, "http://orchd:1");
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.token.as_deref(), Some("t0k"));

        let cli = parse(&["list", "--output", "table"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Table);
        assert!(parse(&["-o", "yaml", "list"]).is_err());
    }

    /// The env fallbacks, checked on the clap definition itself: setting
    /// process environment variables in a multi-threaded test binary would
    /// race with the other tests.
    #[test]
    fn server_and_token_fall_back_to_the_environment() {
        let cmd = Cli::command();
        let env_of = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env_of("server").as_deref(), Some("ORCH_SERVER"));
        assert_eq!(env_of("token").as_deref(), Some("ORCH_TOKEN"));

        let cli = parse(&["list"]).unwrap();
        if std::env::var_os("ORCH_SERVER").is_none() {
            assert_eq!(cli.server, DEFAULT_SERVER);
        }
    }

    /// The real fallback: `ORCH_SERVER` in the environment, no `--server`.
    /// Run in a child process of this test binary so that the variable
    /// never leaks into other tests.
    #[test]
    fn server_env_var_is_used_when_flag_is_absent() {
        const CHILD: &str = "ORCHCTL_ARGS_ENV_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let cli = parse(&["list"]).unwrap();
            assert_eq!(cli.server, "http://from-env:7");
            assert_eq!(cli.token.as_deref(), Some("env-token"));
            let cli = parse(&["--server", "http://flag:8", "list"]).unwrap();
            assert_eq!(cli.server, "http://flag:8", "the flag wins over the env");
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "args::tests::server_env_var_is_used_when_flag_is_absent",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("ORCH_SERVER", "http://from-env:7")
            .env("ORCH_TOKEN", "env-token")
            .status()
            .unwrap();
        assert!(status.success(), "child test failed: {status}");
    }

    #[test]
    fn token_value_is_hidden_from_help() {
        let cmd = Cli::command();
        let token = cmd.get_arguments().find(|a| a.get_id() == "token").unwrap();
        assert!(token.is_hide_env_values_set());
    }

    #[test]
    fn state_names_parse_case_insensitively() {
        let cases = [
            ("created", State::Created),
            ("RUNNING", State::Running),
            ("Completed", State::Completed),
            ("failed", State::Failed),
            ("cancelled", State::Cancelled),
            ("canceled", State::Cancelled),
            ("ReTrYiNg", State::Retrying),
        ];
        for (name, state) in cases {
            assert_eq!(parse_state(name), Ok(state), "{name}");
        }
        for bad in ["", "unspecified", "STATE_UNSPECIFIED", "done", "5"] {
            assert!(parse_state(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"));
        for code in [" 3  not found", "10  `watch`", "11  `watch`"] {
            assert!(help.contains(code), "{code} missing in\n{help}");
        }
    }
}
