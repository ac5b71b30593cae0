//! orch-worker as a library: consume dispatches from RabbitMQ, run them
//! with registered [`Handler`]s under orchd's leases, report the outcomes.
//!
//! The worker protocol is documented in `proto/orchestrator/v1/worker.proto`.
//! To run your own job kinds, build a [`Registry`] (usually
//! [`Registry::with_builtins`] plus your handlers) and call [`run`]; see
//! `examples/custom_handler.rs`.
//!
//! Modules: [`config`] (flags), `consumer` (RabbitMQ consumption and
//! reconnection), `attempt` (one attempt: start, run, finish), `lease`
//! (heartbeats and stop signals), `control` (cancels pushed by orchd),
//! `rpc` (the orchd client), [`handler`] (trait and registry), [`handlers`]
//! (built-ins), [`error`].

pub mod config;
pub mod error;
pub mod handler;
pub mod handlers;

mod attempt;
mod batch;
mod consumer;
mod control;
mod lease;
mod memory;
mod reconnect;
mod rpc;

use std::sync::Arc;
use std::time::Duration;

use orchestrator::queue::memory::MemoryQueue;
use orchestrator::queue::topology;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{LogFormat, WorkerConfig};
pub use error::{HandlerError, WorkerError};
pub use handler::{Handler, JobContext, Registry, from_struct, handler_fn, to_struct};

/// How long, after the cancel grace, stopped attempts may take to report
/// on the way out before the worker exits anyway (the sweeper recovers them).
const FINAL_REPORT_TIME: Duration = Duration::from_secs(10);
/// How long the worker waits for its control queue before it consumes jobs
/// anyway (pushed cancels are then lost until the queue is up; heartbeats
/// still deliver them).
const CONTROL_READY_WAIT: Duration = Duration::from_secs(10);

/// Runs a worker until `shutdown` is cancelled, then shuts down gracefully:
/// stops consuming (prefetched messages go back to the queue), lets running
/// jobs finish within `--drain-timeout`, stops and reports the rest, and
/// returns. Fails only on invalid settings: brokers and orchd being away are
/// waited out.
pub async fn run(
    config: WorkerConfig,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    run_from(config, registry, Source::Rabbitmq, shutdown).await
}

/// Where a worker takes its dispatches from.
#[derive(Clone)]
pub enum Source {
    /// RabbitMQ at `--amqp-url`, the queues of `--queues`.
    Rabbitmq,
    /// The in-process queue of an `orchd dev` server, in the same process:
    /// every job queue when `--queues` is empty.
    InProcess(MemoryQueue),
}

/// Like [`run`], taking dispatches from `source`.
pub async fn run_from(
    config: WorkerConfig,
    registry: Registry,
    source: Source,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    if matches!(source, Source::InProcess(_)) && config.queues.is_empty() {
        let mut all = config.clone();
        all.queues = vec!["default".into()];
        all.validate()?;
    } else {
        config.validate()?;
    }
    // Built once for both of the worker's broker connections (jobs and
    // control): a custom CA that only one of them used would leave the
    // other unable to connect.
    let amqp_tls = match source {
        Source::Rabbitmq => {
            orchestrator::tls::amqp_tls(&config.amqp_url, config.amqp_ca_cert.as_deref())
                .map_err(|e| WorkerError::Config(e.to_string()))?
        }
        Source::InProcess(_) => lapin::tcp::OwnedTLSConfig::default(),
    };
    let worker_id = config.new_worker_id();
    let client = rpc::connect(&config)?;
    let namespace = match source {
        Source::Rabbitmq => {
            rpc::check_server(&client, &config.server, config.namespace.as_deref()).await?
        }
        Source::InProcess(_) => config
            .namespace
            .clone()
            .unwrap_or_else(|| orchestrator::auth::DEFAULT_NAMESPACE.to_owned()),
    };
    let leases = Arc::new(lease::Leases::default());
    let shared = Arc::new(attempt::Shared::new(
        client.clone(),
        registry,
        leases.clone(),
        worker_id.clone(),
        config.lease,
        config.cancel_grace,
    ));
    tracing::info!(
        worker_id = %worker_id,
        server = %config.server,
        namespace = %namespace,
        queues = ?config.queues,
        concurrency = config.concurrency,
        kinds = ?shared.registry.kinds(),
        exec = config.enable_exec,
        cancel_push = config.cancel_push,
        "worker starting"
    );

    let heartbeats_stop = CancellationToken::new();
    let heartbeats = tokio::spawn(lease::run_heartbeats(
        client,
        leases.clone(),
        lease::HeartbeatSettings {
            worker_id: worker_id.clone(),
            lease: config.lease,
            tick: config.tick_interval(),
        },
        heartbeats_stop.clone(),
    ));

    // The control queue first, so that no cancel for a job of this worker
    // is pushed before it exists.
    let control_stop = CancellationToken::new();
    let control = if config.cancel_push {
        match &source {
            Source::Rabbitmq => {
                let (ready, up) = tokio::sync::oneshot::channel();
                let settings = control::ControlSettings {
                    amqp_url: config.amqp_url.clone(),
                    amqp_tls: amqp_tls.clone(),
                    worker_id: worker_id.clone(),
                };
                let task = tokio::spawn(control::consume_amqp(
                    leases.clone(),
                    settings,
                    ready,
                    control_stop.clone(),
                ));
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    up = tokio::time::timeout(CONTROL_READY_WAIT, up) => if up.is_err() {
                        tracing::warn!(wait = ?CONTROL_READY_WAIT, "control queue not ready; consuming jobs anyway");
                    }
                }
                Some(task)
            }
            Source::InProcess(queue) => Some(tokio::spawn(control::consume_memory(
                leases.clone(),
                queue.subscribe_control(&worker_id),
                control_stop.clone(),
            ))),
        }
    } else {
        None
    };

    let attempts = TaskTracker::new();
    match source {
        Source::Rabbitmq => {
            let settings = consumer::ConsumerSettings {
                amqp_url: config.amqp_url.clone(),
                namespace,
                amqp_tls,
                queues: config.queues.clone(),
                concurrency: config.concurrency,
                worker_id: worker_id.clone(),
            };
            consumer::consume(shared.clone(), settings, attempts.clone(), shutdown).await;
        }
        Source::InProcess(queue) => {
            memory::consume(
                shared.clone(),
                queue,
                // In-process queues are named by routing key; none means all.
                config
                    .queues
                    .iter()
                    .map(|q| topology::routing_key(&namespace, q))
                    .collect(),
                config.concurrency,
                attempts.clone(),
                shutdown,
            )
            .await;
        }
    }

    attempts.close();
    if !attempts.is_empty() {
        tracing::info!(
            running = attempts.len(),
            drain_timeout = %humantime::format_duration(config.drain_timeout),
            "waiting for running jobs to finish"
        );
    }
    if tokio::time::timeout(config.drain_timeout, attempts.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = attempts.len(),
            "drain timeout passed; stopping the remaining jobs (they are reported as interrupted and retried elsewhere)"
        );
        shared.hard_stop.cancel();
        let last_call = config.cancel_grace + FINAL_REPORT_TIME;
        if tokio::time::timeout(last_call, attempts.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = attempts.len(),
                "some attempts could not be reported; orchd's sweeper recovers them when their leases expire"
            );
        }
    }
    heartbeats_stop.cancel();
    control_stop.cancel();
    let _ = heartbeats.await;
    if let Some(control) = control {
        let _ = control.await;
    }
    tracing::info!(worker_id = %worker_id, "worker stopped");
    Ok(())
}
