//! Readiness: orchd reports SERVING on grpc.health.v1 (and 200 on
//! `/healthz`) only while both Redis and RabbitMQ answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use orchestrator::proto::v1::{job_service_server, worker_service_server};
use orchestrator::queue::JobQueue;
use orchestrator::store::JobStore;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

/// Every service whose status follows the dependencies; "" is the whole
/// server, which is what Kubernetes' gRPC probes ask about by default.
const SERVICES: [&str; 3] = [
    "",
    job_service_server::SERVICE_NAME,
    worker_service_server::SERVICE_NAME,
];

/// The last health verdict, shared with the REST `/healthz` route.
#[derive(Debug, Clone, Default)]
pub struct Health {
    serving: Arc<AtomicBool>,
    detail: Arc<std::sync::Mutex<String>>,
}

impl Health {
    /// Whether Redis and RabbitMQ both answered at the last check.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// What failed at the last check, if anything.
    pub fn detail(&self) -> String {
        self.detail.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// Reports every service NOT_SERVING.
pub async fn mark_not_serving(reporter: &HealthReporter) {
    for service in SERVICES {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Checks the dependencies every `interval` and publishes the verdict to
/// the gRPC health service and to `health`.
pub async fn run(
    store: Arc<dyn JobStore>,
    queue: Arc<dyn JobQueue>,
    reporter: HealthReporter,
    health: Health,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut last: Option<bool> = None;
    loop {
        let (redis, rabbit) = tokio::join!(
            tokio::time::timeout(interval.max(Duration::from_secs(2)), store.ping()),
            tokio::time::timeout(interval.max(Duration::from_secs(2)), queue.ping())
        );
        let mut problems = Vec::new();
        match redis {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("redis: {e}")),
            Err(_) => problems.push("redis: ping timed out".to_owned()),
        }
        match rabbit {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("rabbitmq: {e}")),
            Err(_) => problems.push("rabbitmq: ping timed out".to_owned()),
        }
        let serving = problems.is_empty();
        if let Ok(mut d) = health.detail.lock() {
            *d = problems.join("; ");
        }
        health.serving.store(serving, Ordering::Relaxed);
        if last != Some(serving) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in SERVICES {
                reporter.set_service_status(service, status).await;
            }
            if serving {
                tracing::info!("ready: the store and the queue answer");
            } else {
                tracing::warn!(problems = %health.detail(), "not ready");
            }
            last = Some(serving);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
