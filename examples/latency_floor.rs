//! The latency floor under one job: each hop a fenced job crosses, timed
//! alone, one at a time, on the services and the orchd of a benchmark run
//! (`bench/run.sh` runs it after the latency scenario).
//!
//! - `amqp`: a persistent message published to a durable queue on a channel
//!   with publisher confirms (as orchd publishes) → delivered to a consumer on another
//!   connection (as a worker takes it); the publish call to the delivery.
//! - `redis`: a PING round trip on a multiplexed connection (as orchd's).
//! - `grpc`: a `grpc.health.v1.Health/Check` round trip to orchd over one
//!   HTTP/2 connection (no store behind it).
//!
//! Environment: `AMQP_URL`, `REDIS_URL`, `ORCH_SERVER` (required), `N`
//! (samples per hop, default 1000, after 100 unmeasured). Prints one JSON
//! object: per hop, its percentiles in ms.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const WARMUP: usize = 100;

type Failure = Box<dyn std::error::Error>;

fn env(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| format!("{name} must be set").into())
}

/// Times `n` calls of `hop` after [`WARMUP`] unmeasured ones.
async fn timed(
    n: usize,
    mut hop: impl AsyncFnMut() -> Result<Duration, Failure>,
) -> Result<Vec<Duration>, Failure> {
    for _ in 0..WARMUP {
        hop().await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(hop().await?);
    }
    Ok(samples)
}

/// Nearest-rank percentiles in ms, as `orchctl bench` reports them.
fn summary(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1].as_secs_f64() * 1000.0
    };
    serde_json::json!({
        "samples": samples.len(),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": at(1.0),
    })
}

async fn amqp(url: &str, n: usize) -> Result<Vec<Duration>, Failure> {
    let connect = || async {
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_with_config(
            url,
            ConnectionProperties::default(),
            Default::default(),
            runtime,
        )
        .await
    };
    let (publisher, consumer) = (connect().await?, connect().await?);
    let publishing = publisher.create_channel().await?;
    publishing
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consuming = consumer.create_channel().await?;
    // Durable as job queues are (RabbitMQ writes persistent messages of
    // durable queues only), and deleted when this consumer goes away.
    let name = format!("latency-floor-{}", std::process::id());
    let queue = consuming
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut deliveries = consuming
        .basic_consume(
            queue.name().clone(),
            "latency-floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let samples = timed(n, async || {
        let started = Instant::now();
        let confirm = publishing
            .basic_publish(
                "".into(),
                queue.name().clone(),
                BasicPublishOptions::default(),
                b"latency-floor",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        let delivery = deliveries.next().await.ok_or("the consumer ended")??;
        let elapsed = started.elapsed();
        delivery.ack(BasicAckOptions::default()).await?;
        confirm.await?;
        Ok(elapsed)
    })
    .await?;
    let _ = publisher.close(200, "done".into()).await;
    let _ = consumer.close(200, "done".into()).await;
    Ok(samples)
}

async fn redis(url: &str, n: usize) -> Result<Vec<Duration>, Failure> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    timed(n, async || {
        let started = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(started.elapsed())
    })
    .await
}

async fn grpc(server: &str, n: usize) -> Result<Vec<Duration>, Failure> {
    let channel = tonic::transport::Endpoint::from_shared(server.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    timed(n, async || {
        let started = Instant::now();
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(started.elapsed())
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let n = match std::env::var("N") {
        Ok(n) => n.parse().map_err(|_| "N must be a number")?,
        Err(_) => 1000,
    };
    let report = serde_json::json!({
        "amqp_publish_to_delivery_ms": summary(amqp(&env("AMQP_URL")?, n).await?),
        "redis_round_trip_ms": summary(redis(&env("REDIS_URL")?, n).await?),
        "grpc_round_trip_ms": summary(grpc(&env("ORCH_SERVER")?, n).await?),
    });
    println!("{report}");
    Ok(())
}
