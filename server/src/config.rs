//! orchd's command line: every flag has an environment fallback, durations
//! are humantime (`30s`, `7d`).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use orchestrator::auth::Role;
use orchestrator::error::Error;
use orchestrator::validate::Limits;

use crate::limits::{Quotas, SubmitLimiter, SubmitRate};

/// orchd, the orchestrator control plane.
#[derive(Debug, Parser)]
#[command(name = "orchd", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, env = "ORCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// orchd's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API, the REST shim and the dispatcher, with Redis as
    /// the store and RabbitMQ as the queue.
    Serve(ServeConfig),
    /// Run everything in one process: the API, an embedded store, an
    /// in-process queue and workers. No Redis or RabbitMQ needed.
    Dev(crate::dev::DevConfig),
    /// Create bearer tokens for --tokens-file.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `orchd token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new random token on stdout (shown once, never stored), and on
    /// stderr the line to add to the tokens file (a `#` comment and
    /// `name:role:namespace:sha256hex`), e.g.
    /// `TOKEN=$(orchd token new alice --role client 2>>tokens)`.
    New {
        /// Who the token is for; recorded in the history of the jobs it
        /// submits or cancels.
        name: String,
        /// client (JobService), worker (WorkerService) or admin (both).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The token's namespace (tenant): it sees and runs only that
        /// namespace's jobs, unless its role is admin. A DNS label.
        #[arg(long, default_value = orchestrator::auth::DEFAULT_NAMESPACE)]
        namespace: String,
    },
}

fn parse_role(value: &str) -> Result<Role, String> {
    Role::parse(value).ok_or_else(|| format!("unknown role {value:?}: client, worker or admin"))
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings of `orchd serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Where the gRPC API listens.
    #[arg(long, env = "ORCH_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// Where the REST shim listens.
    #[arg(long, env = "ORCH_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    pub http_addr: SocketAddr,
    /// The Redis that stores jobs.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// The RabbitMQ that carries dispatches to workers.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every Redis key orchd writes.
    #[arg(long, env = "ORCH_REDIS_PREFIX", default_value = "orch:")]
    pub redis_prefix: String,
    /// PEM CA certificate(s) to trust for a rediss:// --redis-url, instead
    /// of the system's roots (a private CA).
    #[arg(long, env = "REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for an amqps:// --amqp-url, besides
    /// the system's roots (a private CA).
    #[arg(long, env = "AMQP_CA_CERT")]
    pub amqp_ca_cert: Option<PathBuf>,
    #[command(flatten)]
    pub jobs: JobSettings,
    #[command(flatten)]
    pub limits: LimitSettings,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub connections: ConnectionSettings,
}

/// How jobs are kept and run, the same for `orchd serve` and `orchd dev`.
#[derive(Debug, Clone, Args)]
pub struct JobSettings {
    /// How long terminal jobs are kept before they are purged.
    #[arg(long, env = "ORCH_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Lease of a running attempt when its worker asks for none; a worker
    /// that stops renewing it for this long is considered lost.
    #[arg(long, env = "ORCH_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            retention: Duration::from_secs(7 * 24 * 3600),
            lease: Duration::from_secs(30),
        }
    }
}

/// What one request and one token may use, the same for `orchd serve` and
/// `orchd dev`. Every error a limit causes names its setting (the flag
/// without `--`, with `_`). Anonymous callers (no --tokens-file) share one
/// allowance of the per-token limits.
#[derive(Debug, Clone, Args)]
pub struct LimitSettings {
    /// Largest request: REST body and gRPC message, in bytes. Larger ones
    /// get 413 on REST and OUT_OF_RANGE on gRPC; must exceed
    /// --max-payload-bytes.
    #[arg(long, env = "ORCH_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Largest accepted job payload, in bytes of its protobuf encoding.
    #[arg(long, env = "ORCH_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Most labels on one job.
    #[arg(long, env = "ORCH_MAX_LABELS", default_value_t = 64)]
    pub max_labels: usize,
    /// Longest label key, in bytes.
    #[arg(long, env = "ORCH_MAX_LABEL_KEY_BYTES", default_value_t = 63)]
    pub max_label_key_bytes: usize,
    /// Longest label value, in bytes.
    #[arg(long, env = "ORCH_MAX_LABEL_VALUE_BYTES", default_value_t = 256)]
    pub max_label_value_bytes: usize,
    /// Largest page of ListJobs.
    #[arg(long, env = "ORCH_MAX_PAGE_SIZE", default_value_t = 1000)]
    pub max_page_size: u32,
    /// Most WatchJob streams (gRPC and REST together) one token may have
    /// open at once; more get RESOURCE_EXHAUSTED / 429.
    #[arg(long, env = "ORCH_MAX_WATCHES_PER_TOKEN", default_value_t = 100)]
    pub max_watches_per_token: usize,
    /// Jobs one token may submit, as JOBS/PERIOD (`200/s`, `1000/m`,
    /// `50/h`, `10/30s`) or `off`; each job of a batch counts. Past it:
    /// RESOURCE_EXHAUSTED / 429 with a retry hint.
    #[arg(long, env = "ORCH_SUBMIT_RATE", default_value = "1000/s")]
    pub submit_rate: SubmitRate,
    /// Jobs a token may submit at once above the rate (the size of its
    /// token bucket); with the rate on, also the largest batch accepted.
    #[arg(long, env = "ORCH_SUBMIT_BURST", default_value_t = NonZeroU32::new(2000).expect("not zero"))]
    pub submit_burst: NonZeroU32,
    /// How long a request may take before its answer starts; then
    /// DEADLINE_EXCEEDED / 504. A WatchJob stream is timed until its first
    /// message only.
    #[arg(long, env = "ORCH_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        let limits = Limits::default();
        LimitSettings {
            max_request_bytes: 4 * 1024 * 1024,
            max_payload_bytes: limits.max_payload_bytes,
            max_labels: limits.max_labels,
            max_label_key_bytes: limits.max_label_key_bytes,
            max_label_value_bytes: limits.max_label_value_bytes,
            max_page_size: limits.max_page_size,
            max_watches_per_token: 100,
            submit_rate: SubmitRate::per_second(1000),
            submit_burst: NonZeroU32::new(2000).expect("not zero"),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl LimitSettings {
    /// The request limits, once the settings are checked to make sense
    /// together; a bad one is an error naming it.
    pub fn validated(&self) -> Result<Limits, Error> {
        if self.max_request_bytes <= self.max_payload_bytes {
            return Err(Error::invalid(
                "max_request_bytes",
                format!(
                    "must be more than max_payload_bytes ({}) so that a request can carry the largest payload, got {}",
                    self.max_payload_bytes, self.max_request_bytes
                ),
            ));
        }
        for (name, value) in [
            ("max_page_size", self.max_page_size as usize),
            ("max_watches_per_token", self.max_watches_per_token),
        ] {
            if value == 0 {
                return Err(Error::invalid(name, "must be at least 1"));
            }
        }
        if self.request_timeout.is_zero() {
            return Err(Error::invalid("request_timeout", "must be positive"));
        }
        Ok(Limits {
            max_payload_bytes: self.max_payload_bytes,
            max_labels: self.max_labels,
            max_label_key_bytes: self.max_label_key_bytes,
            max_label_value_bytes: self.max_label_value_bytes,
            max_page_size: self.max_page_size,
        })
    }

    /// The per-token limits: a submit rate limiter and watch slots.
    pub fn quotas(&self) -> Quotas {
        Quotas {
            submit: SubmitLimiter::new(self.submit_rate, self.submit_burst).map(Into::into),
            ..Quotas::unlimited_rate(self.max_watches_per_token)
        }
    }
}

/// Authentication settings of `orchd serve` and `orchd dev`.
#[derive(Debug, Clone, Default, Args)]
pub struct AuthConfig {
    /// File of accepted bearer tokens, one `name:role:namespace:sha256hex`
    /// per line (`orchd token new` makes them; a mounted Kubernetes Secret
    /// works). Read at start. Without it, authentication is off and orchd
    /// refuses non-loopback addresses unless --insecure-no-auth.
    #[arg(long, env = "ORCH_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Serve without authentication on a non-loopback address anyway, e.g.
    /// behind a proxy that authenticates. Ignored when --tokens-file is set.
    #[arg(long, env = "ORCH_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

/// How clients connect to the gRPC and REST ports, the same for `orchd
/// serve` and `orchd dev`: TLS (and mTLS), and how long a connection may
/// hold the server without doing its part.
#[derive(Debug, Clone, Args)]
pub struct ConnectionSettings {
    /// PEM certificate chain (server certificate first): serve gRPC and
    /// REST over TLS. Needs --tls-key.
    #[arg(long, env = "ORCH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ORCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): require a client certificate signed by one of
    /// them on both ports (mTLS). Needs --tls-cert.
    #[arg(long, env = "ORCH_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// How long a new connection may take to send its first bytes and, with
    /// TLS, to finish the handshake, before it is closed.
    #[arg(long, env = "ORCH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// REST: how long a client may take to send a whole request head (the
    /// request line and headers) once it started one or connected; slower
    /// clients (slowloris) are disconnected.
    #[arg(long, env = "ORCH_HTTP_HEADER_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// REST: how long a keep-alive connection may stay open with no request
    /// in flight. gRPC connections are checked by HTTP/2 keepalive pings
    /// instead.
    #[arg(long, env = "ORCH_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            handshake_timeout: Duration::from_secs(10),
            http_header_timeout: Duration::from_secs(15),
            http_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl ServeConfig {
    /// Defaults with the given dependencies, listening on ephemeral
    /// loopback ports: what tests and embedders start from.
    pub fn local(redis_url: impl Into<String>, amqp_url: impl Into<String>) -> Self {
        ServeConfig {
            grpc_addr: "127.0.0.1:0".parse().expect("valid address"),
            http_addr: "127.0.0.1:0".parse().expect("valid address"),
            redis_url: redis_url.into(),
            amqp_url: amqp_url.into(),
            redis_prefix: "orch:".into(),
            redis_ca_cert: None,
            amqp_ca_cert: None,
            jobs: JobSettings::default(),
            limits: LimitSettings::default(),
            auth: AuthConfig::default(),
            connections: ConnectionSettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_defaults_match_the_documented_ports() {
        let cli = Cli::try_parse_from(["orchd", "serve"]).unwrap();
        let Command::Serve(cfg) = cli.command else {
            panic!("serve")
        };
        assert_eq!(cfg.grpc_addr.port(), 50051);
        assert_eq!(cfg.http_addr.port(), 8000);
        assert_eq!(cfg.jobs.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(cfg.limits.max_payload_bytes, 1 << 20);
    }

    #[test]
    fn limit_defaults_match_the_library_and_the_docs() {
        let cli = Cli::try_parse_from(["orchd", "serve"]).unwrap();
        let Command::Serve(cfg) = cli.command else {
            panic!("serve")
        };
        let parsed = &cfg.limits;
        let defaults = LimitSettings::default();
        assert_eq!(parsed.validated().unwrap(), Limits::default());
        assert_eq!(defaults.validated().unwrap(), Limits::default());
        for (flag, default) in [
            (parsed.max_request_bytes, defaults.max_request_bytes),
            (parsed.max_watches_per_token, defaults.max_watches_per_token),
            (parsed.submit_burst.get() as usize, 2000),
        ] {
            assert_eq!(flag, default);
        }
        assert_eq!(parsed.max_request_bytes, 4 << 20);
        assert_eq!(parsed.submit_rate, SubmitRate::per_second(1000));
        assert_eq!(parsed.submit_rate, defaults.submit_rate);
        assert_eq!(parsed.request_timeout, Duration::from_secs(30));
        assert!(parsed.quotas().submit.is_some());
    }

    #[test]
    fn limit_flags_parse_and_bad_combinations_name_the_flag() {
        let cli = Cli::try_parse_from([
            "orchd",
            "dev",
            "--submit-rate",
            "off",
            "--max-watches-per-token",
            "3",
            "--max-page-size",
            "10",
            "--request-timeout",
            "2s",
            "--max-labels",
            "0",
        ])
        .unwrap();
        let Command::Dev(cfg) = cli.command else {
            panic!("dev")
        };
        assert_eq!(cfg.limits.submit_rate, SubmitRate::Off);
        assert!(cfg.limits.quotas().submit.is_none());
        let limits = cfg.limits.validated().unwrap();
        assert_eq!((limits.max_page_size, limits.max_labels), (10, 0));
        assert_eq!(cfg.limits.request_timeout, Duration::from_secs(2));

        for args in [
            &["--submit-rate", "fast"][..],
            &["--submit-burst", "0"][..],
            &["--request-timeout", "soon"][..],
        ] {
            let mut argv = vec!["orchd", "serve"];
            argv.extend_from_slice(args);
            assert!(Cli::try_parse_from(argv).is_err(), "{args:?}");
        }
        for (change, field) in [
            (
                (|l: &mut LimitSettings| l.max_request_bytes = l.max_payload_bytes)
                    as fn(&mut LimitSettings),
                "max_request_bytes",
            ),
            (|l: &mut LimitSettings| l.max_page_size = 0, "max_page_size"),
            (
                |l: &mut LimitSettings| l.max_watches_per_token = 0,
                "max_watches_per_token",
            ),
            (
                |l: &mut LimitSettings| l.request_timeout = Duration::ZERO,
                "request_timeout",
            ),
        ] {
            let mut limits = LimitSettings::default();
            change(&mut limits);
            let err = limits.validated().unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("invalid {field}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn dev_listens_on_loopback_and_keeps_data_in_dot_orch() {
        let cli = Cli::try_parse_from(["orchd", "dev"]).unwrap();
        let Command::Dev(cfg) = cli.command else {
            panic!("dev")
        };
        assert!(cfg.grpc_addr.ip().is_loopback() && cfg.http_addr.ip().is_loopback());
        assert_eq!((cfg.grpc_addr.port(), cfg.http_addr.port()), (50051, 8000));
        assert_eq!(cfg.data_dir, std::path::PathBuf::from("./.orch"));
        assert!(!cfg.ephemeral && !cfg.enable_exec);
        assert!(cfg.workers >= 1);
        let cli = Cli::try_parse_from(["orchd", "dev", "--ephemeral", "--workers", "5"]).unwrap();
        let Command::Dev(cfg) = cli.command else {
            panic!("dev")
        };
        assert!(cfg.ephemeral);
        assert_eq!(cfg.workers, 5);
    }

    #[test]
    fn auth_flags_and_token_command() {
        let cli = Cli::try_parse_from(["orchd", "serve"]).unwrap();
        let Command::Serve(cfg) = cli.command else {
            panic!("serve")
        };
        assert!(cfg.auth.tokens_file.is_none() && !cfg.auth.insecure_no_auth);
        let cli = Cli::try_parse_from([
            "orchd",
            "serve",
            "--tokens-file",
            "/run/secrets/tokens",
            "--insecure-no-auth",
        ])
        .unwrap();
        let Command::Serve(cfg) = cli.command else {
            panic!("serve")
        };
        assert_eq!(
            cfg.auth.tokens_file,
            Some(PathBuf::from("/run/secrets/tokens"))
        );
        assert!(cfg.auth.insecure_no_auth);
        let cli =
            Cli::try_parse_from(["orchd", "token", "new", "bob", "--role", "worker"]).unwrap();
        let Command::Token(TokenCommand::New {
            name,
            role,
            namespace,
        }) = cli.command
        else {
            panic!("token new")
        };
        assert_eq!(
            (name.as_str(), role, namespace.as_str()),
            ("bob", Role::Worker, "default")
        );
        assert!(Cli::try_parse_from(["orchd", "token", "new", "bob", "--role", "root"]).is_err());
        assert!(Cli::try_parse_from(["orchd", "token", "new", "bob"]).is_err());
    }

    #[test]
    fn tls_and_connection_flags() {
        let cli = Cli::try_parse_from(["orchd", "serve"]).unwrap();
        let Command::Serve(cfg) = cli.command else {
            panic!("serve")
        };
        assert!(cfg.connections.tls_cert.is_none() && cfg.connections.client_ca.is_none());
        assert_eq!(cfg.connections.handshake_timeout, Duration::from_secs(10));
        assert_eq!(cfg.connections.http_header_timeout, Duration::from_secs(15));
        assert_eq!(cfg.connections.http_idle_timeout, Duration::from_secs(60));
        assert!(cfg.redis_ca_cert.is_none() && cfg.amqp_ca_cert.is_none());
        let cli = Cli::try_parse_from([
            "orchd",
            "dev",
            "--tls-cert",
            "/tls/server.pem",
            "--tls-key",
            "/tls/server-key.pem",
            "--client-ca",
            "/tls/ca.pem",
            "--http-idle-timeout",
            "2m",
        ])
        .unwrap();
        let Command::Dev(cfg) = cli.command else {
            panic!("dev")
        };
        assert_eq!(
            cfg.connections.client_ca,
            Some(PathBuf::from("/tls/ca.pem"))
        );
        assert_eq!(cfg.connections.http_idle_timeout, Duration::from_secs(120));
        // One half of the pair, or a client CA without TLS, is refused by
        // name.
        for args in [
            &["orchd", "serve", "--tls-cert", "/c.pem"][..],
            &["orchd", "serve", "--tls-key", "/k.pem"],
            &["orchd", "serve", "--client-ca", "/ca.pem"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(err.contains("--tls-"), "{err}");
        }
        assert!(Cli::try_parse_from(["orchd", "serve", "--handshake-timeout", "soon"]).is_err());
        let cli = Cli::try_parse_from([
            "orchd",
            "serve",
            "--redis-ca-cert",
            "/r.pem",
            "--amqp-ca-cert",
            "/a.pem",
        ])
        .unwrap();
        let Command::Serve(cfg) = cli.command else {
            panic!("serve")
        };
        assert_eq!(cfg.redis_ca_cert, Some(PathBuf::from("/r.pem")));
        assert_eq!(cfg.amqp_ca_cert, Some(PathBuf::from("/a.pem")));
    }

    #[test]
    fn durations_are_humantime() {
        let cli = Cli::try_parse_from(["orchd", "serve", "--retention", "2h"]).unwrap();
        let Command::Serve(cfg) = cli.command else {
            panic!("serve")
        };
        assert_eq!(cfg.jobs.retention, Duration::from_secs(7200));
        assert!(Cli::try_parse_from(["orchd", "serve", "--retention", "soon"]).is_err());
    }
}
