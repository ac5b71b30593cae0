//! orch-worker's settings: the command line (every flag has an environment
//! fallback, durations are humantime such as `30s` or `250ms`), their
//! validation, and the process's worker id.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::error::WorkerError;

/// Longest worker id orchd accepts.
const MAX_WORKER_ID_LEN: usize = 128;
/// Longest prefix kept from `--worker-id`, leaving room for `-<pid>-<uuid>`.
const MAX_PREFIX_LEN: usize = 96;

/// orch-worker: runs orchestrator jobs consumed from RabbitMQ.
#[derive(Debug, Clone, Parser)]
#[command(name = "orch-worker", version, about, long_about = None)]
pub struct WorkerConfig {
    /// orchd's gRPC endpoint.
    #[arg(long, env = "ORCH_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// The RabbitMQ that carries dispatches.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// PEM CA certificate(s) to trust for an amqps:// --amqp-url, besides
    /// the system's roots (a private CA).
    #[arg(long, env = "AMQP_CA_CERT")]
    pub amqp_ca_cert: Option<PathBuf>,

    /// PEM CA certificate(s) to trust for an https:// --server, instead of
    /// the system's roots.
    #[arg(long, env = "ORCH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// PEM client certificate presented to orchd (for an orchd started with
    /// --client-ca). Needs --client-key.
    #[arg(long, env = "ORCH_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of --client-cert.
    #[arg(long, env = "ORCH_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,

    /// Bearer token sent to orchd as `authorization: Bearer <token>`.
    #[arg(long, env = "ORCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Job queues to consume, comma-separated (RabbitMQ queues
    /// `orch.q.<namespace>.<name>`).
    #[arg(
        long,
        env = "ORCH_QUEUES",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub queues: Vec<String>,

    /// The namespace whose queues to consume. Default: the namespace of the
    /// token (orchd says which). Only an admin token may name another.
    #[arg(long, env = "ORCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// How many jobs run at once; also the RabbitMQ prefetch. Default: the
    /// number of CPU cores.
    #[arg(long, env = "ORCH_CONCURRENCY", default_value_t = default_concurrency(),
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Lease asked for each attempt; orchd considers the worker lost when it
    /// stops renewing it for this long.
    #[arg(long, env = "ORCH_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,

    /// How often leases are renewed when no fast cancel polling is on.
    #[arg(long, env = "ORCH_HEARTBEAT_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// How often running attempts are checked for cancellation (one batched
    /// Heartbeat for all of them, sent only while jobs run): the fallback
    /// for a pushed cancel that got lost. `0s` turns fast polling off: such
    /// cancellations are then seen every heartbeat interval. 1s, not
    /// faster: cancels are pushed, and every poll renews every running
    /// lease in the store.
    #[arg(long, env = "ORCH_CANCEL_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub cancel_poll_interval: Duration,

    /// Receive cancellations that orchd pushes to this worker's own control
    /// queue (RabbitMQ `orch.control.<worker id>`), so a cancelled job stops
    /// within milliseconds. `false` leaves only the heartbeat poll (see
    /// `--cancel-poll-interval`).
    #[arg(long, env = "ORCH_CANCEL_PUSH", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0..=1, default_value_t = true, default_missing_value = "true")]
    pub cancel_push: bool,

    /// How long a handler may take to stop once asked to (cancel, timeout,
    /// shutdown) before the worker abandons it.
    #[arg(long, env = "ORCH_CANCEL_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cancel_grace: Duration,

    /// On shutdown, how long running jobs may take to finish before they are
    /// stopped and reported as interrupted (to be retried elsewhere).
    #[arg(long, env = "ORCH_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Allow the `exec` handler to run processes on this host.
    #[arg(long, env = "ORCH_ENABLE_EXEC", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub enable_exec: bool,

    /// How long an `exec` process group has between SIGTERM and SIGKILL when
    /// its job is stopped. Keep it below `--cancel-grace`.
    #[arg(long, env = "ORCH_EXEC_KILL_GRACE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub exec_kill_grace: Duration,

    /// Prefix of this process's worker id (default: the host name). The id
    /// is always `<prefix>-<pid>-<random>`, unique per process.
    #[arg(long = "worker-id", env = "ORCH_WORKER_ID")]
    pub worker_id_prefix: Option<String>,

    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, env = "ORCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// A ready channel to orchd, used instead of dialling --server (`orchd
    /// dev`'s in-process workers get one whose connections stay in memory).
    #[arg(skip)]
    pub channel: Option<tonic::transport::Channel>,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The number of CPU cores, at least 1.
pub fn default_concurrency() -> u16 {
    std::thread::available_parallelism()
        .map(|n| u16::try_from(n.get()).unwrap_or(u16::MAX))
        .unwrap_or(1)
}

impl WorkerConfig {
    /// Defaults (as with no flags and no environment) for `server` and
    /// `amqp_url`: what tests and embedders start from.
    pub fn local(server: impl Into<String>, amqp_url: impl Into<String>) -> Self {
        let mut config = WorkerConfig::parse_from(["orch-worker"]);
        config.server = server.into();
        config.amqp_url = amqp_url.into();
        config
    }

    /// The interval of the heartbeat loop while attempts run: the cancel
    /// poll interval when fast polling is on, else the heartbeat interval.
    pub fn tick_interval(&self) -> Duration {
        if self.cancel_poll_interval.is_zero() {
            self.heartbeat_interval
        } else {
            self.cancel_poll_interval.min(self.heartbeat_interval)
        }
    }

    /// Checks settings that clap cannot check alone.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |message: String| Err(WorkerError::Config(message));
        if self.queues.is_empty() {
            return bad("--queues must name at least one queue".into());
        }
        for queue in &self.queues {
            if let Err(e) = orchestrator::validate::name("queues", queue) {
                return bad(e.to_string());
            }
        }
        if let Some(namespace) = &self.namespace
            && let Err(e) = orchestrator::validate::namespace("namespace", namespace)
        {
            return bad(e.to_string());
        }
        if self.lease.is_zero() {
            return bad("--lease must be positive".into());
        }
        if self.heartbeat_interval.is_zero() {
            return bad("--heartbeat-interval must be positive".into());
        }
        if self.heartbeat_interval >= self.lease {
            return bad(format!(
                "--heartbeat-interval ({}) must be shorter than --lease ({}), or leases expire between heartbeats",
                humantime::format_duration(self.heartbeat_interval),
                humantime::format_duration(self.lease)
            ));
        }
        if let Some(prefix) = &self.worker_id_prefix
            && (prefix.is_empty()
                || prefix.len() > MAX_PREFIX_LEN
                || prefix.chars().any(|c| c.is_control()))
        {
            return bad(format!(
                "--worker-id must be 1..={MAX_PREFIX_LEN} printable characters"
            ));
        }
        if self.channel.is_none() {
            if !self.server.starts_with("http://") && !self.server.starts_with("https://") {
                return bad(format!(
                    "--server must be an http:// or https:// URL, got {:?}",
                    self.server
                ));
            }
            // Read the certificate files now: a typo should stop the worker
            // at start, not fail every call later.
            self.client_tls()
                .check(&self.server)
                .map_err(|e| WorkerError::Config(e.to_string()))?;
        }
        Ok(())
    }

    /// The TLS settings for --server.
    pub fn client_tls(&self) -> orchestrator::tls::ClientTls {
        orchestrator::tls::ClientTls {
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }

    /// A fresh worker id for this process: `<prefix>-<pid>-<8 random hex>`,
    /// where the prefix is `--worker-id` or the host name. The random part
    /// makes ids unique even when a pid is reused or two workers in one
    /// process (tests) share a host, so an id is never reused.
    pub fn new_worker_id(&self) -> String {
        let prefix = match &self.worker_id_prefix {
            Some(prefix) => prefix.clone(),
            None => host_name(),
        };
        let prefix: String = prefix.chars().take(MAX_PREFIX_LEN).collect();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{prefix}-{}-{}", std::process::id(), &random[..8]);
        debug_assert!(id.len() <= MAX_WORKER_ID_LEN);
        id
    }
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| {
            h.chars()
                .filter(|c| !c.is_control() && *c != ' ')
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn parse(args: &[&str]) -> Result<WorkerConfig, clap::Error> {
        let mut argv = vec!["orch-worker"];
        argv.extend_from_slice(args);
        WorkerConfig::try_parse_from(argv)
    }

    /// Every variable the command line reads.
    const VARIABLES: &[&str] = &[
        "ORCH_SERVER",
        "AMQP_URL",
        "AMQP_CA_CERT",
        "ORCH_CA_CERT",
        "ORCH_CLIENT_CERT",
        "ORCH_CLIENT_KEY",
        "ORCH_TOKEN",
        "ORCH_QUEUES",
        "ORCH_CONCURRENCY",
        "ORCH_LEASE",
        "ORCH_HEARTBEAT_INTERVAL",
        "ORCH_CANCEL_POLL_INTERVAL",
        "ORCH_CANCEL_PUSH",
        "ORCH_CANCEL_GRACE",
        "ORCH_DRAIN_TIMEOUT",
        "ORCH_ENABLE_EXEC",
        "ORCH_EXEC_KILL_GRACE",
        "ORCH_WORKER_ID",
        "ORCH_LOG_FORMAT",
    ];

    /// Runs the ignored test `name` of this module in a child process (this
    /// test binary) whose environment has exactly `vars` of the worker's
    /// variables. Setting variables in this process would need `unsafe` on
    /// edition 2024 (the workspace forbids it) and would race other tests.
    fn in_child(name: &str, vars: &[(&str, &str)]) {
        let exe = std::env::current_exe().unwrap();
        let mut command = std::process::Command::new(exe);
        command.args([
            "--exact",
            &format!("config::tests::{name}"),
            "--nocapture",
            "--ignored",
        ]);
        for var in VARIABLES {
            command.env_remove(var);
        }
        command.envs(vars.iter().copied());
        let out = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("1 passed"), "{stdout}");
    }

    #[test]
    fn defaults_match_the_documentation() {
        in_child("defaults_child", &[]);
    }

    /// Run by `defaults_match_the_documentation` with none of the variables
    /// set; ignored when run directly.
    #[test]
    #[ignore = "run by defaults_match_the_documentation in a clean environment"]
    fn defaults_child() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.server, "http://127.0.0.1:50051");
        assert_eq!(c.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.queues, vec!["default"]);
        assert_eq!(c.concurrency, default_concurrency());
        assert!(c.concurrency >= 1);
        assert_eq!(c.lease, Duration::from_secs(30));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(c.cancel_poll_interval, Duration::from_secs(1));
        assert!(c.cancel_push);
        assert_eq!(c.cancel_grace, Duration::from_secs(5));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert!(!c.enable_exec);
        assert_eq!(c.token, None);
        assert!(c.ca_cert.is_none() && c.client_cert.is_none() && c.amqp_ca_cert.is_none());
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.tick_interval(), Duration::from_secs(1));
        c.validate().unwrap();
    }

    #[test]
    fn flags_parse_lists_durations_and_formats() {
        let c = parse(&[
            "--queues",
            "a,b",
            "--concurrency",
            "7",
            "--lease",
            "1m",
            "--heartbeat-interval",
            "10s",
            "--cancel-poll-interval",
            "0s",
            "--cancel-push=false",
            "--drain-timeout",
            "2s",
            "--enable-exec",
            "--token",
            "s3cret",
            "--log-format",
            "json",
            "--worker-id",
            "box1",
        ])
        .unwrap();
        assert_eq!(c.queues, vec!["a", "b"]);
        assert_eq!(c.concurrency, 7);
        assert_eq!(c.lease, Duration::from_secs(60));
        assert_eq!(
            c.tick_interval(),
            Duration::from_secs(10),
            "fast polling off"
        );
        assert!(!c.cancel_push);
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
        assert!(c.enable_exec);
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.new_worker_id().starts_with("box1-"));
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--lease", "soon"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        let mut c = parse(&["--lease", "2s", "--heartbeat-interval", "3s"]).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("--heartbeat-interval")
        );
        c = parse(&["--queues", "Bad Queue"]).unwrap();
        assert!(c.validate().is_err());
        c = parse(&["--server", "127.0.0.1:50051"]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("--server"));
        c = parse(&["--server", "https://orchd:50051"]).unwrap();
        c.validate().unwrap();
        c = parse(&["--server", "http://orchd:50051", "--ca-cert", "/ca.pem"]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("https://"));
        c = parse(&[
            "--server",
            "https://orchd:50051",
            "--ca-cert",
            "/nonexistent/ca.pem",
        ])
        .unwrap();
        let text = c.validate().unwrap_err().to_string();
        assert!(
            text.contains("--ca-cert") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
        assert!(
            parse(&["--client-cert", "/c.pem"]).is_err(),
            "--client-key is required"
        );
    }

    #[test]
    fn environment_variables_are_fallbacks() {
        in_child(
            "env_child",
            &[
                ("ORCH_SERVER", "http://orchd:50051"),
                ("AMQP_URL", "amqp://rabbit:5672/%2f"),
                ("ORCH_QUEUES", "emails,reports"),
                ("ORCH_CONCURRENCY", "3"),
                ("ORCH_ENABLE_EXEC", "true"),
                ("ORCH_TOKEN", "tok"),
                ("ORCH_CA_CERT", "/tls/ca.pem"),
                ("ORCH_CLIENT_CERT", "/tls/worker.pem"),
                ("ORCH_CLIENT_KEY", "/tls/worker-key.pem"),
                ("AMQP_CA_CERT", "/tls/rabbit-ca.pem"),
                ("ORCH_LEASE", "45s"),
                ("ORCH_HEARTBEAT_INTERVAL", "5s"),
                ("ORCH_DRAIN_TIMEOUT", "1m"),
                ("ORCH_CANCEL_PUSH", "false"),
                ("ORCH_LOG_FORMAT", "json"),
            ],
        );
    }

    /// Run by `environment_variables_are_fallbacks` in a child process with
    /// the environment set; ignored when run directly.
    #[test]
    #[ignore = "run by environment_variables_are_fallbacks with its environment"]
    fn env_child() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.server, "http://orchd:50051");
        assert_eq!(c.amqp_url, "amqp://rabbit:5672/%2f");
        assert_eq!(c.queues, vec!["emails", "reports"]);
        assert_eq!(c.concurrency, 3);
        assert!(c.enable_exec);
        assert_eq!(c.token.as_deref(), Some("tok"));
        assert_eq!(c.ca_cert, Some(PathBuf::from("/tls/ca.pem")));
        assert_eq!(c.client_cert, Some(PathBuf::from("/tls/worker.pem")));
        assert_eq!(c.client_key, Some(PathBuf::from("/tls/worker-key.pem")));
        assert_eq!(c.amqp_ca_cert, Some(PathBuf::from("/tls/rabbit-ca.pem")));
        assert_eq!(c.lease, Duration::from_secs(45));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.drain_timeout, Duration::from_secs(60));
        assert!(!c.cancel_push);
        assert_eq!(c.log_format, LogFormat::Json);
        // A flag still beats its variable.
        let c = parse(&["--concurrency", "9"]).unwrap();
        assert_eq!(c.concurrency, 9);
    }

    #[test]
    fn enable_exec_accepts_boolish_values() {
        assert!(parse(&["--enable-exec=true"]).unwrap().enable_exec);
        assert!(!parse(&["--enable-exec=false"]).unwrap().enable_exec);
        assert!(!parse(&["--enable-exec=0"]).unwrap().enable_exec);
    }

    #[test]
    fn worker_ids_are_unique_and_well_formed() {
        let c = parse(&[]).unwrap();
        let ids: HashSet<String> = (0..1000).map(|_| c.new_worker_id()).collect();
        assert_eq!(ids.len(), 1000);
        let pid = std::process::id().to_string();
        for id in ids.iter().take(5) {
            assert!(id.len() <= MAX_WORKER_ID_LEN);
            assert!(id.contains(&format!("-{pid}-")), "{id}");
            assert!(!id.chars().any(char::is_control));
        }
        let long = WorkerConfig {
            worker_id_prefix: Some("x".repeat(500)),
            ..c
        };
        assert!(long.new_worker_id().len() <= MAX_WORKER_ID_LEN);
        assert!(long.validate().is_err());
    }
}
