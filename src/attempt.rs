//! The rules of an attempt's life, as pure functions from a job to the
//! store [`Change`] that records the next step: start, complete, fail (retry
//! or give up), cancel, or lose the worker. No I/O here; the server applies
//! the changes, so these rules are the same for every store.

use std::time::Duration;

use pbjson_types::Struct;
use rand::Rng;

use crate::error::{Error, Result};
use crate::job::{job_retry, job_state, ms_to_timestamp};
use crate::proto::v1::{Job, Transition};
use crate::state::{self, State};
use crate::store::{Change, Due, LeaseChange};

/// Why a job that a worker received must not run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Tell the worker to drop the message; the reason is for its logs.
    Drop(String),
}

/// A history entry.
pub fn transition(
    from: State,
    to: State,
    at_ms: i64,
    attempt: u32,
    reason: &str,
    worker_id: &str,
) -> Transition {
    Transition {
        from: from.to_proto() as i32,
        to: to.to_proto() as i32,
        at: Some(ms_to_timestamp(at_ms)),
        attempt,
        reason: reason.to_owned(),
        worker_id: worker_id.to_owned(),
    }
}

fn state_of(job: &Job) -> Result<State> {
    job_state(job).ok_or_else(|| Error::Internal(format!("job {} has no state", job.id)))
}

/// The change that starts the next attempt of `job` on `worker_id`, or why
/// it must not start. `dispatched_attempt` is the attempt the message was
/// published for (0: unknown).
pub fn start(
    job: &Job,
    worker_id: &str,
    dispatched_attempt: u32,
    token: String,
    lease: Duration,
    now_ms: i64,
) -> Result<Result<Change, Refusal>> {
    let current = state_of(job)?;
    let next = job.attempt + 1;
    match current {
        State::Created | State::Retrying => {}
        State::Running => {
            return Ok(Err(Refusal::Drop(format!(
                "job is RUNNING attempt {} on worker {:?} under a lease",
                job.attempt, job.worker_id
            ))));
        }
        terminal => return Ok(Err(Refusal::Drop(format!("job is {terminal}")))),
    }
    if dispatched_attempt != 0 && dispatched_attempt != next {
        return Ok(Err(Refusal::Drop(format!(
            "message was for attempt {dispatched_attempt}, the job's next attempt is {next}"
        ))));
    }
    if next > job.max_attempts.max(1) {
        return Err(Error::Internal(format!(
            "job {} would start attempt {next} of {}",
            job.id, job.max_attempts
        )));
    }
    state::check(current, State::Running)?;
    let mut change = start_change(
        current,
        next,
        job.max_attempts,
        job.started_at.is_none(),
        worker_id,
        token,
        lease,
        now_ms,
    );
    // The decision stands on the attempt read: an attempt that started
    // (and maybe failed back to RETRYING) since must not be started again.
    change.expect_attempt = Some(job.attempt);
    Ok(Ok(change))
}

/// What a user's cancel does to `job`.
#[derive(Debug, Clone)]
pub enum CancelStep {
    /// Nothing to write: the job is CANCELLED already, or RUNNING with its
    /// cancel requested already.
    Nothing,
    /// Write this change: CREATED or RETRYING become CANCELLED at once; a
    /// RUNNING job gets `cancel_requested` for its worker to act on.
    Apply(Box<Change>),
}

/// The rule of a user's cancel, by `actor` (the token's name; `None` when
/// authentication is off). COMPLETED and FAILED jobs cannot be cancelled.
pub fn user_cancel(job: &Job, actor: Option<&str>, now_ms: i64) -> Result<CancelStep> {
    let current = state_of(job)?;
    let cancelled = match actor {
        Some(name) => format!("cancelled by {name}"),
        None => "cancelled by user".to_owned(),
    };
    Ok(CancelStep::Apply(Box::new(match current {
        State::Cancelled => return Ok(CancelStep::Nothing),
        State::Completed | State::Failed => {
            return Err(Error::FailedPrecondition {
                state: current,
                message: "only CREATED, RETRYING or RUNNING jobs can be cancelled".into(),
            });
        }
        State::Running if job.cancel_requested => return Ok(CancelStep::Nothing),
        State::Running => Change {
            expect: Some(State::Running),
            to: Some(State::Running),
            at_ms: now_ms,
            cancel_requested: Some(true),
            history: actor.map(|name| {
                transition(
                    State::Running,
                    State::Running,
                    now_ms,
                    job.attempt,
                    &format!("cancel requested by {name}"),
                    &job.worker_id,
                )
            }),
            ..Change::default()
        },
        State::Created | State::Retrying => {
            state::check(current, State::Cancelled)?;
            Change {
                expect: Some(current),
                to: Some(State::Cancelled),
                at_ms: now_ms,
                history: Some(transition(
                    current,
                    State::Cancelled,
                    now_ms,
                    job.attempt,
                    &cancelled,
                    "",
                )),
                error: Some(cancelled),
                finished: true,
                next_attempt_ms: Some(None),
                due: Due::Remove,
                ..Change::default()
            }
        }
    })))
}

/// What a dispatch message says about the attempt it is meant to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    /// The attempt the message starts (1 for the first).
    pub attempt: u32,
    /// The job's max_attempts.
    pub max_attempts: u32,
}

/// The change that starts the attempt a dispatch was published for,
/// without reading the job: a compare-and-set on the state and attempt the
/// job had when the message was published (CREATED at attempt 0 for the
/// first attempt, RETRYING at attempt n-1 after that). When the store
/// refuses it, the job moved on, and [`start`] on the job as it is decides.
/// `None` when the dispatch does not say enough.
pub fn start_dispatched(
    dispatched: Dispatched,
    worker_id: &str,
    token: String,
    lease: Duration,
    now_ms: i64,
) -> Option<Change> {
    let Dispatched {
        attempt,
        max_attempts,
    } = dispatched;
    if attempt == 0 || attempt > max_attempts {
        return None;
    }
    let from = if attempt == 1 {
        State::Created
    } else {
        State::Retrying
    };
    let mut change = start_change(
        from,
        attempt,
        max_attempts,
        attempt == 1,
        worker_id,
        token,
        lease,
        now_ms,
    );
    change.expect_attempt = Some(attempt - 1);
    Some(change)
}

#[allow(clippy::too_many_arguments)]
fn start_change(
    from: State,
    next: u32,
    max_attempts: u32,
    first: bool,
    worker_id: &str,
    token: String,
    lease: Duration,
    now_ms: i64,
) -> Change {
    Change {
        expect: Some(from),
        to: Some(State::Running),
        at_ms: now_ms,
        history: Some(transition(
            from,
            State::Running,
            now_ms,
            next,
            &format!("attempt {next} of {max_attempts} started"),
            worker_id,
        )),
        attempt: Some(next),
        started: first,
        next_attempt_ms: Some(None),
        worker_id: Some(Some(worker_id.to_owned())),
        due: Due::Remove,
        lease: LeaseChange::Set {
            token,
            expires_ms: now_ms + lease.as_millis() as i64,
        },
        ..Change::default()
    }
}

/// Refuses an empty lease token: the stores read an empty expected token as
/// "any lease", so a report carrying one would pass the fence.
fn held_lease(lease_token: &str) -> Result<()> {
    if lease_token.is_empty() {
        return Err(Error::invalid("lease_token", "must not be empty"));
    }
    Ok(())
}

fn finish(
    job: &Job,
    to: State,
    lease_token: Option<&str>,
    reason: &str,
    now_ms: i64,
) -> Result<Change> {
    finish_attempt(job.attempt, &job.worker_id, to, lease_token, reason, now_ms)
}

fn finish_attempt(
    attempt: u32,
    worker_id: &str,
    to: State,
    lease_token: Option<&str>,
    reason: &str,
    now_ms: i64,
) -> Result<Change> {
    lease_token.map(held_lease).transpose()?;
    state::check(State::Running, to)?;
    Ok(Change {
        expect: Some(State::Running),
        expect_lease: lease_token.map(str::to_owned),
        to: Some(to),
        at_ms: now_ms,
        history: Some(transition(
            State::Running,
            to,
            now_ms,
            attempt,
            reason,
            worker_id,
        )),
        finished: to.is_terminal(),
        lease: LeaseChange::Clear,
        ..Change::default()
    })
}

/// The change that records a successful attempt.
pub fn complete(job: &Job, lease_token: &str, result: Struct, now_ms: i64) -> Result<Change> {
    complete_attempt(job.attempt, &job.worker_id, lease_token, result, now_ms)
}

/// [`complete`] without reading the job: the attempt number and worker id
/// come from the worker's report and are checked by the store along with
/// the lease token (`expect_attempt`), so a wrong one changes nothing.
pub fn complete_attempt(
    attempt: u32,
    worker_id: &str,
    lease_token: &str,
    result: Struct,
    now_ms: i64,
) -> Result<Change> {
    let mut change = finish_attempt(
        attempt,
        worker_id,
        State::Completed,
        Some(lease_token),
        "completed",
        now_ms,
    )?;
    change.expect_attempt = Some(attempt);
    change.result = Some(result);
    change.error = Some(String::new());
    Ok(change)
}

/// The change that records a cancelled attempt.
pub fn cancelled(job: &Job, lease_token: &str, reason: &str, now_ms: i64) -> Result<Change> {
    let reason = if reason.is_empty() {
        "cancelled by user"
    } else {
        reason
    };
    let mut change = finish(job, State::Cancelled, Some(lease_token), reason, now_ms)?;
    change.error = Some(reason.to_owned());
    Ok(change)
}

/// The change that records a failed attempt: RETRYING with a jittered
/// backoff while attempts are left and the failure is not permanent,
/// otherwise FAILED. A job whose cancel was requested becomes CANCELLED
/// instead of retrying. `lease_token` is `None` for the sweeper, which
/// fences with the lease expiry instead.
///
/// The change expects the cancel request as `job` had it: a user's cancel
/// written between that read and this write is a conflict, so the caller
/// reads again and cancels instead of retrying.
pub fn fail(
    job: &Job,
    lease_token: Option<&str>,
    message: &str,
    permanent: bool,
    now_ms: i64,
    rng: &mut impl Rng,
) -> Result<Change> {
    let attempt = job.attempt;
    let max = job.max_attempts;
    let mut retry_at = None;
    let (to, why) = if job.cancel_requested {
        let why = format!("cancelled by user (attempt {attempt} ended: {message})");
        (State::Cancelled, why)
    } else if permanent {
        let why = format!("attempt {attempt} of {max} failed permanently: {message}");
        (State::Failed, why)
    } else if attempt >= max {
        let why = format!("attempt {attempt} of {max} failed, no attempts left: {message}");
        (State::Failed, why)
    } else {
        let delay = job_retry(job).backoff(attempt, rng);
        retry_at = Some(now_ms + delay.as_millis() as i64);
        let why = format!(
            "attempt {attempt} of {max} failed: {message}; retrying in {:.3}s",
            delay.as_secs_f64()
        );
        (State::Retrying, why)
    };
    let mut change = finish(job, to, lease_token, &why, now_ms)?;
    change.error = Some(message.to_owned());
    change.expect_cancel_requested = Some(job.cancel_requested);
    if let Some(due) = retry_at {
        change.next_attempt_ms = Some(Some(due));
        change.due = Due::At(due);
        change.worker_id = Some(None);
    }
    Ok(change)
}

/// The change the sweeper applies to a RUNNING job whose lease expired:
/// the attempt failed with "worker lost". Fenced on the expiry, so a
/// heartbeat that renews the lease first wins.
pub fn worker_lost(job: &Job, now_ms: i64, rng: &mut impl Rng) -> Result<Change> {
    let message = format!(
        "worker lost: {:?} stopped renewing its lease",
        job.worker_id
    );
    let mut change = fail(job, None, &message, false, now_ms, rng)?;
    change.expect_lease_expired_by = Some(now_ms);
    Ok(change)
}

/// The change a heartbeat applies: extend the lease of the attempt that
/// holds `lease_token` (which must not be empty).
pub fn renew(lease_token: &str, lease: Duration, now_ms: i64) -> Result<Change> {
    held_lease(lease_token)?;
    Ok(Change {
        expect: Some(State::Running),
        expect_lease: Some(lease_token.to_owned()),
        to: Some(State::Running),
        at_ms: now_ms,
        lease: LeaseChange::Extend {
            expires_ms: now_ms + lease.as_millis() as i64,
        },
        silent: true,
        ..Change::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::RetrySettings;
    use rand::SeedableRng;

    fn job(state: State, attempt: u32, max: u32) -> Job {
        Job {
            id: "j".into(),
            state: state.to_proto() as i32,
            attempt,
            max_attempts: max,
            worker_id: "w1".into(),
            retry: Some(
                RetrySettings {
                    initial_backoff: Duration::from_secs(1),
                    multiplier: 2.0,
                    max_backoff: Duration::from_secs(10),
                }
                .to_proto(),
            ),
            ..Job::default()
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(3)
    }

    #[test]
    fn start_takes_created_and_retrying_jobs_only() {
        for s in [State::Created, State::Retrying] {
            let c = start(
                &job(s, 0, 3),
                "w",
                1,
                "tok".into(),
                Duration::from_secs(30),
                1000,
            )
            .unwrap()
            .unwrap();
            assert_eq!(
                (c.expect, c.to, c.attempt),
                (Some(s), Some(State::Running), Some(1))
            );
            assert_eq!(
                c.lease,
                LeaseChange::Set {
                    token: "tok".into(),
                    expires_ms: 31_000
                }
            );
            assert_eq!(c.due, Due::Remove);
            assert!(c.started);
        }
        for s in [
            State::Running,
            State::Completed,
            State::Failed,
            State::Cancelled,
        ] {
            let r = start(
                &job(s, 1, 3),
                "w",
                0,
                "tok".into(),
                Duration::from_secs(30),
                0,
            )
            .unwrap();
            assert!(matches!(r, Err(Refusal::Drop(_))), "{s}");
        }
    }

    #[test]
    fn a_late_duplicate_of_an_earlier_attempt_is_dropped() {
        let retrying = job(State::Retrying, 1, 3);
        let r = start(&retrying, "w", 1, "t".into(), Duration::from_secs(30), 0).unwrap();
        assert!(matches!(r, Err(Refusal::Drop(m)) if m.contains("attempt 1")));
        assert!(
            start(&retrying, "w", 2, "t".into(), Duration::from_secs(30), 0)
                .unwrap()
                .is_ok()
        );
        assert!(
            start(&retrying, "w", 0, "t".into(), Duration::from_secs(30), 0)
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    fn failures_retry_with_backoff_until_attempts_run_out() {
        let c = fail(
            &job(State::Running, 1, 3),
            Some("t"),
            "boom",
            false,
            10_000,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(c.to, Some(State::Retrying));
        assert_eq!(c.expect_cancel_requested, Some(false));
        let Due::At(due) = c.due else {
            panic!("no due time")
        };
        assert!((10_000..=11_000).contains(&due), "{due}");
        assert_eq!(c.next_attempt_ms, Some(Some(due)));
        assert_eq!(c.error.as_deref(), Some("boom"));
        assert!(
            c.history
                .unwrap()
                .reason
                .contains("attempt 1 of 3 failed: boom")
        );

        let c = fail(
            &job(State::Running, 3, 3),
            Some("t"),
            "boom",
            false,
            0,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(c.to, Some(State::Failed));
        assert!(c.finished);
        assert!(c.history.unwrap().reason.contains("no attempts left"));

        let c = fail(
            &job(State::Running, 1, 3),
            Some("t"),
            "bad input",
            true,
            0,
            &mut rng(),
        )
        .unwrap();
        assert_eq!(c.to, Some(State::Failed));
        assert!(c.history.unwrap().reason.contains("permanently"));
    }

    #[test]
    fn a_failure_after_a_cancel_request_cancels() {
        let mut j = job(State::Running, 1, 3);
        j.cancel_requested = true;
        let c = fail(&j, Some("t"), "interrupted", false, 0, &mut rng()).unwrap();
        assert_eq!(c.to, Some(State::Cancelled));
        assert_eq!(c.expect_cancel_requested, Some(true));
    }

    #[test]
    fn worker_lost_is_fenced_on_the_lease_expiry_not_the_token() {
        let c = worker_lost(&job(State::Running, 1, 3), 5000, &mut rng()).unwrap();
        assert_eq!(c.expect_lease, None);
        assert_eq!(c.expect_lease_expired_by, Some(5000));
        assert!(c.error.unwrap().contains("worker lost"));
        assert_eq!(c.to, Some(State::Retrying));
        assert_eq!(c.expect_cancel_requested, Some(false));
    }

    // Found by the state machine property tests: the stores read an empty
    // expected token as "any lease", so a heartbeat with an empty token
    // renewed whatever attempt held the job.
    #[test]
    fn reports_without_a_lease_token_are_refused() {
        let running = job(State::Running, 1, 3);
        let errors = [
            renew("", Duration::from_secs(30), 0).unwrap_err(),
            complete(&running, "", Struct::default(), 0).unwrap_err(),
            cancelled(&running, "", "", 0).unwrap_err(),
            fail(&running, Some(""), "boom", false, 0, &mut rng()).unwrap_err(),
        ];
        for err in errors {
            assert!(
                matches!(&err, Error::InvalidArgument { field, .. } if field == "lease_token"),
                "{err}"
            );
        }
        // The sweeper fences on the lease expiry instead of a token.
        assert!(worker_lost(&running, 0, &mut rng()).is_ok());
    }

    #[test]
    fn finishing_requires_the_lease_and_clears_it() {
        let c = complete(&job(State::Running, 1, 3), "tok", Struct::default(), 0).unwrap();
        assert_eq!(c.expect_lease.as_deref(), Some("tok"));
        assert_eq!(c.lease, LeaseChange::Clear);
        assert_eq!(c.to, Some(State::Completed));
        let c = cancelled(&job(State::Running, 1, 3), "tok", "", 0).unwrap();
        assert_eq!(c.error.as_deref(), Some("cancelled by user"));
        let c = renew("tok", Duration::from_secs(30), 100).unwrap();
        assert_eq!(c.lease, LeaseChange::Extend { expires_ms: 30_100 });
        assert_eq!(
            (c.expect, c.to),
            (Some(State::Running), Some(State::Running))
        );
    }

    #[test]
    fn a_dispatched_start_is_the_start_of_the_job_it_was_published_for() {
        // For every attempt a dispatch can start, the change built from the
        // message alone equals the one built from the job as it was at
        // publish time, the attempt check included: both stand on it.
        let lease = Duration::from_secs(30);
        for max in 1..=4 {
            for attempt in 1..=max {
                let (state, started) = if attempt == 1 {
                    (State::Created, None)
                } else {
                    (State::Retrying, Some(ms_to_timestamp(5)))
                };
                let published = Job {
                    started_at: started,
                    ..job(state, attempt - 1, max)
                };
                let from_job = start(&published, "w9", attempt, "tok".into(), lease, 77)
                    .unwrap()
                    .unwrap();
                let dispatched = Dispatched {
                    attempt,
                    max_attempts: max,
                };
                let blind = start_dispatched(dispatched, "w9", "tok".into(), lease, 77)
                    .expect("enough to start blind");
                assert_eq!(blind.expect_attempt, Some(attempt - 1));
                assert_eq!(
                    format!("{blind:?}"),
                    format!("{from_job:?}"),
                    "{attempt}/{max}"
                );
            }
        }
        for (attempt, max_attempts) in [(0, 3), (1, 0), (4, 3)] {
            let d = Dispatched {
                attempt,
                max_attempts,
            };
            assert!(
                start_dispatched(d, "w", "t".into(), lease, 0).is_none(),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_reported_completion_is_the_completion_of_that_attempt() {
        let running = job(State::Running, 2, 3);
        let from_job = complete(&running, "tok", Struct::default(), 9).unwrap();
        let reported = complete_attempt(2, "w1", "tok", Struct::default(), 9).unwrap();
        assert_eq!(reported.expect_attempt, Some(2));
        assert_eq!(from_job.expect_attempt, Some(2));
        assert_eq!(format!("{reported:?}"), format!("{from_job:?}"));
    }
}
