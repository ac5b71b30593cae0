//! orchd, the control plane: wires the Redis store, the RabbitMQ
//! dispatcher, the gRPC services, the REST shim, health and reflection,
//! and runs them until shutdown.

pub mod attempts;
pub mod auth;
pub mod config;
pub mod dev;
pub mod dispatch;
pub mod grpc;
pub mod health;
pub mod janitor;
pub mod limits;
pub mod listen;
pub mod openapi;
pub mod rest;
pub mod service;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use orchestrator::auth::{Api, Authenticator};
use orchestrator::proto::v1::ServerInfo;
use orchestrator::proto::v1::job_service_server::JobServiceServer;
use orchestrator::proto::v1::worker_service_server::WorkerServiceServer;
use orchestrator::queue::JobQueue;
use orchestrator::queue::amqp::AmqpQueue;
use orchestrator::store::JobStore;
use orchestrator::store::redis::{RedisStore, RedisStoreConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

pub use config::ServeConfig;

use crate::attempts::{AttemptService, LeaseConfig};
use crate::dispatch::{DispatchConfig, Dispatcher};
use crate::health::Health;
use crate::service::JobService;

/// Why orchd could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] orchestrator::Error),
    /// The gRPC reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
    /// No tokens are configured and an address is not loopback.
    #[error("{0}")]
    Insecure(String),
}

/// A started orchd.
pub struct Running {
    /// Where gRPC listens (the real port when 0 was asked for).
    pub grpc_addr: SocketAddr,
    /// Where the REST shim listens.
    pub http_addr: SocketAddr,
    /// Whether both ports speak TLS.
    pub tls: bool,
    local: listen::LocalConnector,
    handle: JoinHandle<()>,
}

/// How long a graceful shutdown may take before open connections are cut:
/// a client behind a network partition must not keep orchd alive.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

impl Running {
    /// A gRPC channel to this server whose connections stay in this process
    /// (no TCP, no TLS): for `orchd dev`'s in-process workers.
    pub fn local_channel(&self) -> tonic::transport::Channel {
        self.local.channel()
    }

    /// Waits until every part has stopped after shutdown; once `shutdown`
    /// was cancelled, waits at most [`SHUTDOWN_GRACE`], then cuts what is
    /// left (streams and connections that would not close).
    pub async fn wait(self, shutdown: &CancellationToken) {
        let mut handle = self.handle;
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            _ = &mut handle => {}
            _ = deadline => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "graceful shutdown took too long; closing the remaining connections");
                handle.abort();
                let _ = handle.await;
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The store and queue a server runs on, and what workers need to know
/// about them.
pub struct Backend {
    /// Where jobs are stored.
    pub store: Arc<dyn JobStore>,
    /// Where dispatches go.
    pub queue: Arc<dyn JobQueue>,
    /// What GetServerInfo answers.
    pub info: ServerInfo,
}

/// Starts `orchd serve` and returns once it listens. Everything stops when
/// `shutdown` is cancelled; [`Running::wait`] waits for that.
pub async fn start(
    config: ServeConfig,
    shutdown: CancellationToken,
) -> Result<Running, ServerError> {
    let store_config = RedisStoreConfig {
        url: config.redis_url.clone(),
        prefix: config.redis_prefix.clone(),
        retention: config.jobs.retention,
        ca_cert: config.redis_ca_cert.clone(),
    };
    let amqp_tls = orchestrator::tls::amqp_tls(&config.amqp_url, config.amqp_ca_cert.as_deref())?;
    let backend = Backend {
        store: Arc::new(RedisStore::new(&store_config)?),
        queue: Arc::new(AmqpQueue::with_tls(config.amqp_url.clone(), amqp_tls)),
        info: ServerInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            queue_backend: "rabbitmq".into(),
            accepts_external_workers: true,
            // GetServerInfo fills in the caller's namespace and role.
            ..ServerInfo::default()
        },
    };
    start_with(&config, backend, shutdown).await
}

/// Starts a server on `backend`, listening, limited and authenticating as
/// `config` says (its Redis and RabbitMQ settings are not used).
pub async fn start_with(
    config: &ServeConfig,
    backend: Backend,
    shutdown: CancellationToken,
) -> Result<Running, ServerError> {
    let auth = auth::from_config(&config.auth, &[config.grpc_addr, config.http_addr], None)?;
    start_with_auth(config, backend, auth, shutdown).await
}

/// [`start_with`] with an authenticator already built (`config.auth` is
/// not looked at).
pub async fn start_with_auth(
    config: &ServeConfig,
    backend: Backend,
    auth: Authenticator,
    shutdown: CancellationToken,
) -> Result<Running, ServerError> {
    let Backend { store, queue, info } = backend;
    let limits = config.limits.validated()?;
    let tls = tls::load(&config.connections)?;
    let dispatcher = Dispatcher::new(store.clone(), queue.clone(), DispatchConfig::default());
    let service = JobService::new(
        store.clone(),
        dispatcher.clone(),
        limits,
        config.limits.quotas(),
        shutdown.clone(),
    );
    let attempts = AttemptService::new(
        store.clone(),
        LeaseConfig {
            default: config.jobs.lease,
            ..LeaseConfig::default()
        },
    );

    let grpc_listener = bind(config.grpc_addr).await?;
    let http_listener = bind(config.http_addr).await?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.http_addr,
            source,
        })?;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::default();
    // tonic-health reports the whole server ("") as SERVING until told
    // otherwise; nothing is ready before the first dependency check.
    health::mark_not_serving(&reporter).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(orchestrator::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(orchestrator::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let max_request = config.limits.max_request_bytes;
    let timeouts = &config.connections;
    let (local_tx, grpc_incoming) = listen::accept(
        grpc_listener,
        tls.as_ref().map(|t| t.grpc.clone()),
        timeouts.handshake_timeout,
        "grpc",
        shutdown.clone(),
    );
    let local = listen::LocalConnector::new(local_tx);
    // Keepalive pings find clients that vanished behind a partition, so
    // their streams and connections do not linger.
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(limits::GrpcTimeoutLayer::new(config.limits.request_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Health and reflection are open; the two APIs are behind the
        // authenticator, each for its roles.
        .add_service(InterceptedService::new(
            JobServiceServer::new(grpc::GrpcJobs::new(service.clone()))
                .max_decoding_message_size(max_request),
            auth::GrpcAuth::new(auth.clone(), Api::Jobs),
        ))
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(grpc::GrpcWorkers::new(attempts.clone(), info))
                .max_decoding_message_size(max_request),
            auth::GrpcAuth::new(auth.clone(), Api::Workers),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(grpc_incoming).map(Ok::<_, std::io::Error>),
            shutdown.clone().cancelled_owned(),
        );
    let router = rest::router(
        rest::RestState {
            service: service.clone(),
            health: health.clone(),
        },
        auth,
        max_request,
        config.limits.request_timeout,
    );
    let (_, http_incoming) = listen::accept(
        http_listener,
        tls.as_ref().map(|t| t.rest.clone()),
        timeouts.handshake_timeout,
        "rest",
        shutdown.clone(),
    );
    let http = listen::serve_rest(
        http_incoming,
        router,
        listen::HttpTimeouts {
            header: timeouts.http_header_timeout,
            idle: timeouts.http_idle_timeout,
        },
        shutdown.clone(),
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(health::run(
        store.clone(),
        queue.clone(),
        reporter,
        health,
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    tasks.spawn(dispatcher.run(shutdown.clone()));
    tasks.spawn(attempts::run_sweeper(
        attempts,
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    tasks.spawn(janitor::run(
        store.clone(),
        Duration::from_secs(60),
        shutdown.clone(),
    ));
    let grpc_shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!(error = %e, "gRPC server failed");
            grpc_shutdown.cancel();
        }
    });
    tasks.spawn(http);
    tracing::info!(
        %grpc_addr,
        %http_addr,
        tls = tls.is_some(),
        client_certificates = tls.as_ref().is_some_and(|t| t.mutual),
        "orchd listening"
    );
    let handle = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
    Ok(Running {
        grpc_addr,
        http_addr,
        tls: tls.is_some(),
        local,
        handle,
    })
}

/// Runs `orchd serve` until `shutdown` is cancelled.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    start(config, shutdown.clone()).await?.wait(&shutdown).await;
    Ok(())
}
