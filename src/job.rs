//! The job model: a validated job spec, retry settings with their backoff
//! rule, and the conversions between domain values and wire types.

use std::collections::HashMap;
use std::time::Duration;

use pbjson_types::{Struct, Timestamp};
use rand::Rng;

use crate::proto::v1::{Job, RetryPolicy};
use crate::state::State;

/// Queue a job goes to when the spec names none.
pub const DEFAULT_QUEUE: &str = "default";
/// Attempts a job gets when the spec says nothing.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Upper bound of `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

/// Backoff between attempts: exponential with full jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    /// Ceiling of the first delay.
    pub initial_backoff: Duration,
    /// Growth factor per attempt, at least 1.
    pub multiplier: f64,
    /// Ceiling of any delay.
    pub max_backoff: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl RetrySettings {
    /// The ceiling of the delay after failed attempt `attempt` (1-based):
    /// `min(max_backoff, initial_backoff * multiplier^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(1000) as i32;
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        let max = self.max_backoff.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]` ("full jitter"),
    /// so that many jobs failing together do not retry together.
    pub fn backoff(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt).as_secs_f64();
        if ceiling <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(rng.random_range(0.0..=ceiling))
    }

    /// The wire form.
    pub fn to_proto(self) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Some(duration_to_proto(self.initial_backoff)),
            multiplier: self.multiplier,
            max_backoff: Some(duration_to_proto(self.max_backoff)),
        }
    }
}

/// A validated job spec, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Handler name.
    pub kind: String,
    /// Handler input.
    pub payload: Struct,
    /// Queue name.
    pub queue: String,
    /// 1..=100.
    pub max_attempts: u32,
    /// Backoff between attempts.
    pub retry: RetrySettings,
    /// User labels.
    pub labels: HashMap<String, String>,
    /// Empty when none was given.
    pub idempotency_key: String,
    /// Per-attempt time limit.
    pub timeout: Option<Duration>,
    /// Name of the token that submitted the job; empty when authentication
    /// is off. Recorded in the first history entry ("submitted by NAME").
    pub submitted_by: String,
    /// The tenant the job belongs to. Empty only before the service has
    /// resolved the caller's namespace; stored jobs always have one.
    pub namespace: String,
}

impl NewJob {
    /// The job as it is right after it was stored: CREATED, attempt 0.
    pub fn to_job(&self, id: &str, now_ms: i64) -> Job {
        Job {
            id: id.to_owned(),
            kind: self.kind.clone(),
            payload: Some(self.payload.clone()),
            queue: self.queue.clone(),
            state: State::Created.to_proto() as i32,
            max_attempts: self.max_attempts,
            retry: Some(self.retry.to_proto()),
            labels: self.labels.clone(),
            idempotency_key: self.idempotency_key.clone(),
            created_at: Some(ms_to_timestamp(now_ms)),
            updated_at: Some(ms_to_timestamp(now_ms)),
            timeout: self.timeout.map(duration_to_proto),
            namespace: crate::validate::namespace_or_default(&self.namespace).to_owned(),
            ..Job::default()
        }
    }

    /// The first history entry: CREATED, "submitted" or "submitted by NAME".
    pub fn created_transition(&self, now_ms: i64) -> crate::proto::v1::Transition {
        let reason = if self.submitted_by.is_empty() {
            "submitted".to_owned()
        } else {
            format!("submitted by {}", self.submitted_by)
        };
        crate::proto::v1::Transition {
            from: 0,
            to: State::Created.to_proto() as i32,
            at: Some(ms_to_timestamp(now_ms)),
            attempt: 0,
            reason,
            worker_id: String::new(),
        }
    }
}

/// The domain state of a stored job. Stored jobs always have a real state;
/// an unspecified one means corrupt data.
pub fn job_state(job: &Job) -> Option<State> {
    crate::proto::v1::job::State::try_from(job.state)
        .ok()
        .and_then(State::from_proto)
}

/// Retry settings of a stored job (defaults where unset).
pub fn job_retry(job: &Job) -> RetrySettings {
    let defaults = RetrySettings::default();
    let Some(policy) = &job.retry else {
        return defaults;
    };
    RetrySettings {
        initial_backoff: policy
            .initial_backoff
            .and_then(duration_from_proto)
            .unwrap_or(defaults.initial_backoff),
        multiplier: if policy.multiplier >= 1.0 {
            policy.multiplier
        } else {
            defaults.multiplier
        },
        max_backoff: policy
            .max_backoff
            .and_then(duration_from_proto)
            .unwrap_or(defaults.max_backoff),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A wire timestamp from epoch milliseconds.
pub fn ms_to_timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Epoch milliseconds of a wire timestamp.
pub fn timestamp_to_ms(ts: &Timestamp) -> i64 {
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

/// A wire duration.
pub fn duration_to_proto(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A std duration from a wire one; `None` when negative or malformed.
pub fn duration_from_proto(d: pbjson_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_ceiling_grows_exponentially_up_to_the_maximum() {
        let r = RetrySettings {
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(r.ceiling(1), Duration::from_millis(100));
        assert_eq!(r.ceiling(2), Duration::from_millis(200));
        assert_eq!(r.ceiling(4), Duration::from_millis(800));
        assert_eq!(r.ceiling(5), Duration::from_secs(1));
        assert_eq!(r.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn backoff_is_jittered_within_the_ceiling() {
        let r = RetrySettings::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples: Vec<_> = (0..200).map(|_| r.backoff(3, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(4)));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 150, "full jitter spreads the delays");
        assert!(samples.iter().any(|d| *d < Duration::from_secs(1)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(3)));
    }

    #[test]
    fn zero_backoff_retries_at_once() {
        let r = RetrySettings {
            initial_backoff: Duration::ZERO,
            ..RetrySettings::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(r.backoff(5, &mut rng), Duration::ZERO);
    }

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            assert_eq!(timestamp_to_ms(&ms_to_timestamp(ms)), ms);
        }
        let ts = ms_to_timestamp(-1);
        assert!(ts.nanos >= 0);
    }

    #[test]
    fn retry_settings_round_trip_through_the_wire_form() {
        let r = RetrySettings {
            initial_backoff: Duration::from_millis(250),
            multiplier: 3.0,
            max_backoff: Duration::from_secs(60),
        };
        let job = Job {
            retry: Some(r.to_proto()),
            ..Job::default()
        };
        assert_eq!(job_retry(&job), r);
        assert_eq!(job_retry(&Job::default()), RetrySettings::default());
    }
}
