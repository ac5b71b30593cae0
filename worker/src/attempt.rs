//! One attempt's life on this worker: ask orchd to start it
//! (`StartAttempt`), run its handler under the lease with the job's timeout
//! and the stop signals of [`crate::lease`], and report how it ended
//! (`FinishAttempt`), retrying that report while orchd is unreachable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use orchestrator::job::{duration_from_proto, duration_to_proto};
use orchestrator::proto::v1::JobView;
use orchestrator::proto::v1::finish_attempt_request::Outcome;
use orchestrator::proto::v1::start_attempt_response::Decision;
use orchestrator::proto::v1::{
    AttemptCancelled, AttemptFailure, DispatchMessage, FinishAttemptRequest, Job,
    StartAttemptRequest,
};
use pbjson_types::Struct;
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::batch::{self, Batcher};
use crate::error::HandlerError;
use crate::handler::{JobContext, Registry};
use crate::lease::{AttemptControl, Leases, StopReason};
use crate::rpc::{self, Client};

/// Everything attempts share.
pub(crate) struct Shared {
    /// StartAttempt calls, batched when many are due at once.
    starts: Batcher<batch::Start>,
    /// FinishAttempt calls, batched likewise.
    finishes: Batcher<batch::Finish>,
    pub registry: Registry,
    pub leases: Arc<Leases>,
    pub worker_id: String,
    /// Lease asked for each attempt.
    pub lease: Duration,
    /// How long a handler may take to stop once asked.
    pub cancel_grace: Duration,
    /// Fired when the drain timeout passed: running attempts must stop.
    pub hard_stop: CancellationToken,
    /// Consecutive failed StartAttempt calls, for the requeue backoff.
    start_failures: AtomicU32,
}

impl Shared {
    pub fn new(
        client: Client,
        registry: Registry,
        leases: Arc<Leases>,
        worker_id: String,
        lease: Duration,
        cancel_grace: Duration,
    ) -> Self {
        Shared {
            starts: Batcher::spawn(client.clone()),
            finishes: Batcher::spawn(client),
            registry,
            leases,
            worker_id,
            lease,
            cancel_grace,
            hard_stop: CancellationToken::new(),
            start_failures: AtomicU32::new(0),
        }
    }

    /// How long to hold a message whose StartAttempt failed before handing
    /// it back to the broker: 0.5s doubling per consecutive failure up to
    /// 10s, jittered, so that an unreachable orchd is not hammered by
    /// redeliveries.
    pub fn start_backoff(&self) -> Duration {
        let failures = self.start_failures.load(Ordering::Relaxed);
        backoff(
            failures,
            Duration::from_millis(500),
            Duration::from_secs(10),
        )
    }
}

/// `initial * 2^(n-1)`, capped, with ±20% jitter.
pub(crate) fn backoff(n: u32, initial: Duration, max: Duration) -> Duration {
    let base = initial
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(max);
    base.mul_f64(rand::rng().random_range(0.8..=1.2))
}

/// A started attempt: the job as orchd recorded it, the lease token, and
/// when the lease runs out unless renewed.
#[derive(Debug)]
pub(crate) struct Started {
    pub job: Job,
    pub lease_token: String,
    pub lease_until: tokio::time::Instant,
}

/// orchd's answer to StartAttempt, as the consumer acts on it.
#[derive(Debug)]
pub(crate) enum StartOutcome {
    /// Ack, then run.
    Run(Box<Started>),
    /// Ack and skip.
    Drop(String),
    /// No such job: a poison message; reject it without requeue.
    UnknownJob(String),
    /// orchd could not answer: hand the message back after a backoff.
    Failed(Status),
}

/// Asks orchd to start the attempt `message` is for.
pub(crate) async fn start(shared: &Shared, message: &DispatchMessage) -> StartOutcome {
    let request = StartAttemptRequest {
        job_id: message.job_id.clone(),
        worker_id: shared.worker_id.clone(),
        lease: Some(duration_to_proto(shared.lease)),
        attempt: message.attempt,
        max_attempts: message.max_attempts,
        // The handler gets the spec and attempt, never the history.
        view: JobView::Basic as i32,
    };
    // Taken before the call: orchd counts the lease from when it got it.
    let lease_until = tokio::time::Instant::now() + shared.lease;
    let result = shared.starts.call(request).await;
    let outcome = match result {
        Ok(response) => match Decision::try_from(response.decision) {
            Ok(Decision::Run) if response.job.is_some() && !response.lease_token.is_empty() => {
                StartOutcome::Run(Box::new(Started {
                    job: response.job.unwrap_or_default(),
                    lease_token: response.lease_token,
                    lease_until,
                }))
            }
            Ok(Decision::Drop) => StartOutcome::Drop(response.reason),
            _ => StartOutcome::Failed(Status::internal(format!(
                "unexpected StartAttempt answer: decision {} with{} job and {} lease token",
                response.decision,
                if response.job.is_some() { "" } else { "out" },
                if response.lease_token.is_empty() {
                    "no"
                } else {
                    "a"
                }
            ))),
        },
        Err(status) if status.code() == Code::NotFound => {
            StartOutcome::UnknownJob(status.message().to_owned())
        }
        Err(status) => StartOutcome::Failed(status),
    };
    match outcome {
        StartOutcome::Failed(_) => shared.start_failures.fetch_add(1, Ordering::Relaxed),
        _ => shared.start_failures.swap(0, Ordering::Relaxed),
    };
    outcome
}

/// How the handler ended.
#[derive(Debug)]
pub(crate) enum HandlerEnd {
    /// It returned.
    Returned(Result<Struct, HandlerError>),
    /// It panicked.
    Panicked(String),
    /// It did not stop within the grace period after being asked to.
    Abandoned,
}

/// What to report with FinishAttempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Report {
    Completed(Struct),
    Failed { message: String, permanent: bool },
    Cancelled(String),
}

impl Report {
    fn into_outcome(self) -> Outcome {
        match self {
            Report::Completed(result) => Outcome::Completed(result),
            Report::Failed { message, permanent } => {
                Outcome::Failed(AttemptFailure { message, permanent })
            }
            Report::Cancelled(reason) => Outcome::Cancelled(AttemptCancelled { reason }),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Report::Completed(_) => "completed",
            Report::Failed {
                permanent: true, ..
            } => "failed permanently",
            Report::Failed { .. } => "failed",
            Report::Cancelled(_) => "cancelled",
        }
    }
}

/// Message of an attempt that ran past its timeout.
pub(crate) fn timed_out_message(timeout: Duration) -> String {
    let secs = timeout.as_secs_f64();
    let shown = format!("{secs:.3}");
    let shown = shown.trim_end_matches('0').trim_end_matches('.');
    format!("timed out after {shown}s")
}

/// Message of an attempt stopped because the worker shuts down.
pub(crate) const SHUTDOWN_MESSAGE: &str = "worker shutting down";
/// Reason reported for an attempt a user cancelled.
pub(crate) const CANCELLED_BY_USER: &str = "cancelled by user";

/// What to report for an attempt, from how its handler ended and why the
/// worker asked it to stop; `None` when nothing may be reported (the lease
/// is lost, so the attempt no longer owns the job).
pub(crate) fn decide(end: HandlerEnd, reason: Option<StopReason>, lost: bool) -> Option<Report> {
    if lost {
        return None;
    }
    // Work that completed is reported as completed, even if a stop came too
    // late to prevent it: that is what happened.
    if let HandlerEnd::Returned(Ok(mut result)) = end {
        // orchd refuses a result JSON cannot carry (NaN, nesting too deep);
        // the same handler would produce it again, so the attempt fails for
        // good, with the reason, instead of being left to its lease.
        return Some(
            match orchestrator::validate::json_object("result", &mut result) {
                Ok(()) => Report::Completed(result),
                Err(e) => Report::Failed {
                    message: format!("the handler's result cannot be stored: {e}"),
                    permanent: true,
                },
            },
        );
    }
    // Once the worker asked the handler to stop, whatever error it ended
    // with is a consequence of that (e.g. a killed process's exit code), so
    // the reason decides.
    if let Some(reason) = reason {
        return Some(match reason {
            StopReason::CancelRequested => Report::Cancelled(CANCELLED_BY_USER.into()),
            StopReason::TimedOut(timeout) => Report::Failed {
                message: timed_out_message(timeout),
                permanent: false,
            },
            // Shutdown reports a retryable failure: not `cancelled` (terminal,
            // and nobody asked to cancel the job) and not silence (the job
            // would sit RUNNING until its lease expired, up to a lease later).
            // A failure makes orchd schedule the next attempt, on another
            // worker, right away. It does use up an attempt.
            StopReason::Shutdown => Report::Failed {
                message: SHUTDOWN_MESSAGE.into(),
                permanent: false,
            },
        });
    }
    Some(match end {
        HandlerEnd::Returned(Ok(_)) => unreachable!("handled above"),
        HandlerEnd::Returned(Err(HandlerError::Retryable(message))) => Report::Failed {
            message,
            permanent: false,
        },
        HandlerEnd::Returned(Err(HandlerError::Permanent(message))) => Report::Failed {
            message,
            permanent: true,
        },
        HandlerEnd::Returned(Err(HandlerError::Cancelled)) => Report::Failed {
            message: "handler stopped as cancelled although nothing cancelled it".into(),
            permanent: false,
        },
        HandlerEnd::Panicked(message) => Report::Failed {
            message: format!("handler panicked: {message}"),
            permanent: false,
        },
        HandlerEnd::Abandoned => Report::Failed {
            message: "handler abandoned".into(),
            permanent: false,
        },
    })
}

/// Runs a started attempt to its end and reports it.
pub(crate) async fn run(shared: Arc<Shared>, started: Started) {
    let Started {
        job,
        lease_token,
        lease_until,
    } = started;
    let job_id = job.id.clone();
    let control = Arc::new(AttemptControl::default());
    control.held_until(lease_until);
    shared
        .leases
        .insert(&job_id, job.attempt, &lease_token, control.clone());
    tracing::debug!(job_id = %job_id, kind = %job.kind, attempt = job.attempt, "attempt started");
    let attempt = job.attempt;
    let report = execute(&shared, job, &control).await;
    if let Some(report) = report {
        finish(&shared, &job_id, attempt, &lease_token, report, &control).await;
    } else {
        tracing::info!(job_id = %job_id, "attempt abandoned: lease lost, nothing reported");
    }
    // Unregister only now, so that heartbeats keep the lease while the
    // report is retried.
    shared.leases.remove(&job_id, &lease_token);
}

/// Runs the handler; returns what to report.
async fn execute(shared: &Shared, job: Job, control: &AttemptControl) -> Option<Report> {
    let handler = match shared.registry.resolve(&job.kind) {
        Ok(handler) => handler,
        Err(error) => return decide(HandlerEnd::Returned(Err(error)), None, control.is_lost()),
    };
    let timeout = job
        .timeout
        .and_then(duration_from_proto)
        .filter(|t| !t.is_zero());
    let job_id = job.id.clone();
    let ctx = JobContext::new(job, shared.worker_id.clone(), control.token.clone());
    // Its own task, so that a panic fails the attempt instead of the worker
    // and an abandoned handler can be aborted.
    let mut task = tokio::spawn(async move { handler.run(ctx).await });
    let deadline = timeout.map(|t| Instant::now() + t);
    let timed_out = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let joined = tokio::select! {
        joined = &mut task => Some(joined),
        _ = control.token.cancelled() => None,
        _ = timed_out => {
            tracing::info!(job_id = %job_id, "attempt timed out; stopping the handler");
            control.stop(StopReason::TimedOut(timeout.unwrap_or_default()));
            None
        }
        _ = shared.hard_stop.cancelled() => {
            control.stop(StopReason::Shutdown);
            None
        }
    };
    let joined = match joined {
        Some(joined) => joined,
        None => match tokio::time::timeout(shared.cancel_grace, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                task.abort();
                tracing::warn!(
                    job_id = %job_id,
                    grace = %humantime::format_duration(shared.cancel_grace),
                    "handler ignored its cancellation; abandoned"
                );
                return decide(HandlerEnd::Abandoned, control.reason(), control.is_lost());
            }
        },
    };
    let end = match joined {
        Ok(result) => HandlerEnd::Returned(result),
        Err(e) if e.is_panic() => HandlerEnd::Panicked(panic_message(e.into_panic())),
        Err(_) => HandlerEnd::Abandoned,
    };
    decide(end, control.reason(), control.is_lost())
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Reports `report`, retrying transient errors with backoff for up to the
/// lease duration; after that orchd's sweeper recovers the job.
async fn finish(
    shared: &Shared,
    job_id: &str,
    attempt: u32,
    lease_token: &str,
    report: Report,
    control: &AttemptControl,
) {
    let label = report.label();
    let request = FinishAttemptRequest {
        job_id: job_id.to_owned(),
        lease_token: lease_token.to_owned(),
        outcome: Some(report.into_outcome()),
        attempt,
        worker_id: shared.worker_id.clone(),
        // Nothing of the job is needed back: orchd need not read it.
        view: JobView::Basic as i32,
    };
    let deadline = Instant::now() + shared.lease;
    let mut tries = 0u32;
    loop {
        if control.is_lost() {
            tracing::info!(job_id = %job_id, "lease lost while reporting; dropping the report");
            return;
        }
        tries += 1;
        let result = shared.finishes.call(request.clone()).await;
        let status = match result {
            Ok(job) => {
                let state = orchestrator::job::job_state(&job)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                // Success is debug, like orchd's per-job lines; the rest is news.
                if label == "completed" {
                    tracing::debug!(job_id = %job_id, outcome = label, state = %state, "attempt reported");
                } else {
                    tracing::info!(job_id = %job_id, outcome = label, state = %state, "attempt reported");
                }
                return;
            }
            Err(status) => status,
        };
        match status.code() {
            Code::FailedPrecondition => {
                tracing::info!(job_id = %job_id, error = %status.message(), "stale lease: the job moved on; dropping the report");
                return;
            }
            Code::NotFound => {
                tracing::warn!(job_id = %job_id, "job no longer exists; dropping the report");
                return;
            }
            code if rpc::is_transient(code) => {
                let wait = backoff(tries, Duration::from_millis(250), Duration::from_secs(5));
                if Instant::now() + wait >= deadline {
                    tracing::error!(
                        job_id = %job_id, outcome = label, tries, code = ?code, error = %status.message(),
                        "giving up reporting the attempt; orchd's sweeper will recover the job when its lease expires"
                    );
                    return;
                }
                tracing::warn!(job_id = %job_id, tries, code = ?code, error = %status.message(), "reporting the attempt failed; retrying");
                tokio::time::sleep(wait).await;
            }
            code => {
                tracing::error!(job_id = %job_id, outcome = label, code = ?code, error = %status.message(), "orchd refused the report");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::handler::to_struct;

    fn ok() -> HandlerEnd {
        HandlerEnd::Returned(Ok(to_struct(json!({"x": 1})).unwrap()))
    }

    fn failed(message: &str, permanent: bool) -> Option<Report> {
        Some(Report::Failed {
            message: message.into(),
            permanent,
        })
    }

    #[test]
    fn handler_results_map_to_reports() {
        assert!(matches!(
            decide(ok(), None, false),
            Some(Report::Completed(_))
        ));
        let retry = HandlerEnd::Returned(Err(HandlerError::Retryable("flaky".into())));
        assert_eq!(decide(retry, None, false), failed("flaky", false));
        let perm = HandlerEnd::Returned(Err(HandlerError::Permanent("bad".into())));
        assert_eq!(decide(perm, None, false), failed("bad", true));
        let panic = HandlerEnd::Panicked("oops".into());
        assert_eq!(
            decide(panic, None, false),
            failed("handler panicked: oops", false)
        );
    }

    #[test]
    fn a_result_json_cannot_carry_fails_the_attempt_for_good() {
        let mut result = to_struct(json!({"x": 1})).unwrap();
        result.fields.insert("ratio".into(), f64::INFINITY.into());
        let Some(Report::Failed { message, permanent }) =
            decide(HandlerEnd::Returned(Ok(result)), None, false)
        else {
            panic!("an unstorable result is a failure");
        };
        assert!(permanent);
        assert!(
            message.starts_with("the handler's result cannot be stored"),
            "{message}"
        );
        assert!(message.contains("finite"), "{message}");
    }

    #[test]
    fn stop_reasons_decide_once_the_handler_was_asked_to_stop() {
        let cancelled = || HandlerEnd::Returned(Err(HandlerError::Cancelled));
        assert_eq!(
            decide(cancelled(), Some(StopReason::CancelRequested), false),
            Some(Report::Cancelled("cancelled by user".into()))
        );
        assert_eq!(
            decide(
                HandlerEnd::Abandoned,
                Some(StopReason::CancelRequested),
                false
            ),
            Some(Report::Cancelled("cancelled by user".into()))
        );
        // A killed process fails with its exit code; the timeout is what counts.
        let killed =
            HandlerEnd::Returned(Err(HandlerError::Retryable("exited with signal 15".into())));
        assert_eq!(
            decide(
                killed,
                Some(StopReason::TimedOut(Duration::from_secs(2))),
                false
            ),
            failed("timed out after 2s", false)
        );
        assert_eq!(
            decide(cancelled(), Some(StopReason::Shutdown), false),
            failed("worker shutting down", false)
        );
        // Work that finished anyway is reported as done.
        assert!(matches!(
            decide(ok(), Some(StopReason::CancelRequested), false),
            Some(Report::Completed(_))
        ));
    }

    #[test]
    fn a_lost_lease_reports_nothing() {
        assert_eq!(decide(ok(), None, true), None);
        assert_eq!(
            decide(HandlerEnd::Abandoned, Some(StopReason::Shutdown), true),
            None
        );
    }

    #[test]
    fn timeouts_are_shown_in_seconds() {
        assert_eq!(
            timed_out_message(Duration::from_secs(2)),
            "timed out after 2s"
        );
        assert_eq!(
            timed_out_message(Duration::from_millis(1500)),
            "timed out after 1.5s"
        );
        assert_eq!(
            timed_out_message(Duration::from_millis(250)),
            "timed out after 0.25s"
        );
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let initial = Duration::from_millis(500);
        let max = Duration::from_secs(10);
        for _ in 0..50 {
            let first = backoff(1, initial, max);
            assert!(first >= Duration::from_millis(400) && first <= Duration::from_millis(600));
            let third = backoff(3, initial, max);
            assert!(third >= Duration::from_millis(1600) && third <= Duration::from_millis(2400));
            assert!(backoff(40, initial, max) <= Duration::from_secs(12));
        }
        assert!(backoff(0, initial, max) <= Duration::from_millis(600));
    }
}
