//! `orchd dev`: the whole platform in one process, for trying it out,
//! development and single-machine use. The same API, REST shim, health,
//! state machine, retries, leases, cancellation and fencing as `orchd
//! serve`, on an embedded crash-safe store (redb) and an in-process queue,
//! with in-process workers running the built-in handlers over the same gRPC
//! worker protocol.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use orchestrator::attempt;
use orchestrator::auth::{Role, TokenEntry};
use orchestrator::job::{job_state, now_ms, timestamp_to_ms};
use orchestrator::proto::v1::ServerInfo;
use orchestrator::queue::memory::MemoryQueue;
use orchestrator::state::State;
use orchestrator::store::embedded::EmbeddedStore;
use orchestrator::store::{Change, Due, JobStore};
use orchestrator::validate::ListQuery;
use orchestrator_worker::{Registry, Source, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{AuthConfig, ConnectionSettings, JobSettings, LimitSettings};
use crate::{Backend, Running, ServeConfig, ServerError};

/// Settings of `orchd dev`.
#[derive(Debug, Clone, Args)]
pub struct DevConfig {
    /// Where the gRPC API listens (loopback by default: without
    /// --tokens-file dev mode has no authentication).
    #[arg(long, env = "ORCH_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Where the REST shim listens.
    #[arg(long, env = "ORCH_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    /// How many in-process workers run jobs (default: the number of cores).
    #[arg(long, env = "ORCH_WORKERS", default_value_t = orchestrator_worker::config::default_concurrency())]
    pub workers: u16,
    /// Where jobs are kept, so that a restart loses none.
    #[arg(long, env = "ORCH_DATA_DIR", default_value = "./.orch")]
    pub data_dir: PathBuf,
    /// Keep everything in memory instead (gone when orchd stops).
    #[arg(long, env = "ORCH_EPHEMERAL")]
    pub ephemeral: bool,
    /// Let the in-process workers run `exec` jobs (arbitrary commands).
    #[arg(long, env = "ORCH_ENABLE_EXEC")]
    pub enable_exec: bool,
    #[command(flatten)]
    pub jobs: JobSettings,
    #[command(flatten)]
    pub limits: LimitSettings,
    #[command(flatten)]
    pub auth: AuthConfig,
    #[command(flatten)]
    pub connections: ConnectionSettings,
}

impl DevConfig {
    /// Ephemeral dev settings on ephemeral loopback ports, for tests.
    pub fn local_ephemeral(workers: u16) -> Self {
        DevConfig {
            grpc_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            workers,
            data_dir: PathBuf::from("./.orch"),
            ephemeral: true,
            enable_exec: false,
            jobs: JobSettings::default(),
            limits: LimitSettings::default(),
            auth: AuthConfig::default(),
            connections: ConnectionSettings::default(),
        }
    }

    fn serve_config(&self) -> ServeConfig {
        let mut config = ServeConfig::local("", "");
        config.grpc_addr = self.grpc_addr;
        config.http_addr = self.http_addr;
        config.jobs = self.jobs.clone();
        config.limits = self.limits.clone();
        config.auth = self.auth.clone();
        config.connections = self.connections.clone();
        config
    }
}

/// Name of the token of `orchd dev`'s in-process workers (when
/// --tokens-file is set); reserved in the tokens file.
pub const DEV_WORKER_TOKEN_NAME: &str = "orchd-dev-worker";

/// A running `orchd dev`.
pub struct DevRunning {
    /// The server part.
    pub server: Running,
    workers: Vec<tokio::task::JoinHandle<()>>,
    workers_stop: CancellationToken,
    server_stop: CancellationToken,
}

impl DevRunning {
    /// Waits for `shutdown`, then drains the workers before the server
    /// stops, so running jobs can still report.
    pub async fn wait(self, shutdown: CancellationToken) {
        shutdown.cancelled().await;
        self.workers_stop.cancel();
        for worker in self.workers {
            let _ = worker.await;
        }
        self.server_stop.cancel();
        self.server.wait(&self.server_stop).await;
    }
}

/// Starts `orchd dev` and returns once it listens and its workers run.
pub async fn start(config: DevConfig) -> Result<DevRunning, ServerError> {
    let store: Arc<dyn JobStore> = if config.ephemeral {
        Arc::new(EmbeddedStore::in_memory(config.jobs.retention)?)
    } else {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            orchestrator::Error::invalid("data_dir", format!("{}: {e}", config.data_dir.display()))
        })?;
        Arc::new(EmbeddedStore::open(
            &config.data_dir.join("jobs.redb"),
            config.jobs.retention,
        )?)
    };
    let recovered = recover(store.as_ref()).await?;
    if recovered > 0 {
        tracing::info!(
            recovered,
            "re-dispatched jobs left unfinished by the last run"
        );
    }
    let queue = MemoryQueue::new();
    let backend = Backend {
        store,
        queue: Arc::new(queue.clone()),
        info: ServerInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            queue_backend: "in-process".into(),
            accepts_external_workers: false,
            message: "`orchd dev` runs its workers in process (set their number with --workers); \
                      for external workers run `orchd serve` with Redis and RabbitMQ"
                .into(),
            ..ServerInfo::default()
        },
    };
    // With tokens on, the in-process workers get a token of their own, made
    // up now and known only to this process. They run the jobs of every
    // namespace (they consume every in-process queue), and a worker token
    // is confined to one namespace: so theirs is an admin's, which no one
    // outside this process can hold.
    let worker_token = orchestrator::auth::new_token();
    let worker_entry = TokenEntry::for_token(
        DEV_WORKER_TOKEN_NAME,
        Role::Admin,
        orchestrator::auth::DEFAULT_NAMESPACE,
        &worker_token,
    )
    .map_err(|e| ServerError::Config(orchestrator::Error::Internal(e)))?;
    let serve_config = config.serve_config();
    let auth = crate::auth::from_config(
        &serve_config.auth,
        &[serve_config.grpc_addr, serve_config.http_addr],
        Some(worker_entry),
    )?;
    let worker_token = auth.is_enabled().then_some(worker_token);
    let server_stop = CancellationToken::new();
    let server = crate::start_with_auth(&serve_config, backend, auth, server_stop.clone()).await?;

    let workers_stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..config.workers {
        let mut worker = WorkerConfig::local("in-process", "");
        // In memory: the gRPC port may require TLS and client certificates
        // that in-process workers have no business holding.
        worker.channel = Some(server.local_channel());
        worker.queues = Vec::new();
        worker.concurrency = 1;
        worker.enable_exec = config.enable_exec;
        worker.worker_id_prefix = Some("dev".into());
        worker.token = worker_token.clone();
        let registry = Registry::with_builtins(&worker);
        let stop = workers_stop.clone();
        let source = Source::InProcess(queue.clone());
        workers.push(tokio::spawn(async move {
            if let Err(e) = orchestrator_worker::run_from(worker, registry, source, stop).await {
                tracing::error!(error = %e, "in-process worker failed");
            }
        }));
    }
    Ok(DevRunning {
        server,
        workers,
        workers_stop,
        server_stop,
    })
}

/// Runs `orchd dev` until `shutdown`, printing where it listens.
pub async fn run(config: DevConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let running = start(config.clone()).await?;
    let grpc = running.server.grpc_addr;
    let http = running.server.http_addr;
    let storage = if config.ephemeral {
        "in memory (--ephemeral)".to_owned()
    } else {
        format!("in {}", config.data_dir.join("jobs.redb").display())
    };
    let tls = running.server.tls;
    let scheme = if tls { "https" } else { "http" };
    let server_flag = if grpc.port() == 50051 && !tls {
        String::new()
    } else {
        format!("--server {scheme}://{grpc} ")
    };
    // With TLS the clients need the CA (and, with --client-ca, a
    // certificate of their own); say so rather than print a command that
    // fails.
    let (orchctl_tls, curl_tls) = match (tls, config.connections.client_ca.is_some()) {
        (false, _) => ("", ""),
        (true, false) => ("--ca-cert CA.pem ", "--cacert CA.pem "),
        (true, true) => (
            "--ca-cert CA.pem --client-cert CLIENT.pem --client-key CLIENT-KEY.pem ",
            "--cacert CA.pem --cert CLIENT.pem --key CLIENT-KEY.pem ",
        ),
    };
    eprintln!(
        "\norchd dev is up: gRPC on {grpc}, REST on {scheme}://{http}, {} in-process workers, jobs stored {storage}\n\
         \n  submit a first job:  orchctl {server_flag}{orchctl_tls}submit sleep --payload '{{\"seconds\": 1}}' --wait\n\
         \x20                  or:  curl -s {curl_tls}-X POST {scheme}://{http}/jobs -d '{{\"kind\":\"echo\",\"payload\":{{\"hello\":\"world\"}}}}'\n",
        config.workers,
    );
    running.wait(shutdown).await;
    Ok(())
}

/// Makes a restarted dev server whole: its in-process queue started empty,
/// so CREATED and RETRYING jobs are dispatched again, and no worker of the
/// last run is alive, so RUNNING attempts are failed as "worker lost" at
/// once (and retried like any failed attempt). Returns how many jobs it
/// touched.
async fn recover(store: &dyn JobStore) -> Result<usize, ServerError> {
    let mut touched = 0;
    let now = now_ms();
    let namespaces = store.namespaces().await?;
    let scopes = namespaces
        .iter()
        .flat_map(|ns| [State::Created, State::Retrying, State::Running].map(|s| (ns, s)));
    for (namespace, state) in scopes {
        let mut query = ListQuery {
            state: Some(state),
            kind: None,
            queue: None,
            page_size: 500,
            page_token: None,
            namespace: namespace.clone(),
        };
        loop {
            let page = store.list(&query).await?;
            for job in &page.jobs {
                let Ok(id) = job.id.parse() else { continue };
                if job_state(job) != Some(state) {
                    continue;
                }
                let change = match state {
                    State::Running => {
                        let mut change = attempt::worker_lost(job, now, &mut rand::rng())?;
                        change.expect_lease_expired_by = None;
                        change
                    }
                    _ => {
                        let due = job
                            .next_attempt_at
                            .as_ref()
                            .map(timestamp_to_ms)
                            .unwrap_or(now)
                            .max(now);
                        Change {
                            expect: Some(state),
                            to: Some(state),
                            at_ms: now,
                            due: Due::At(due),
                            silent: true,
                            ..Change::default()
                        }
                    }
                };
                store.apply(id, &change).await?;
                touched += 1;
            }
            match page.next_page_token {
                Some(token) => query.page_token = Some(token),
                None => break,
            }
        }
    }
    Ok(touched)
}
