//! How long the worker's RabbitMQ consumers (jobs and pushed cancels) wait
//! before they connect again after a session ended.
//!
//! A broker that refuses connections and one that accepts them but breaks
//! every session soon after (a hand-back it cannot route, a channel it
//! keeps closing) are the same fault to the worker: each such session
//! counts as one more failure, and the wait doubles from 0.5 s to 10 s.
//! Only a session that ran for [`STABLE`] starts the backoff over, so a
//! persistent fault is retried ever more slowly instead of every 0.5 s.

use std::time::Duration;

use tokio::time::Instant;

use crate::attempt;

/// The first wait.
const INITIAL: Duration = Duration::from_millis(500);
/// The longest wait.
const MAX: Duration = Duration::from_secs(10);
/// How long a session must have run for its end not to count as a failure.
const STABLE: Duration = Duration::from_secs(30);

/// The reconnection state of one consumer.
#[derive(Debug, Default)]
pub(crate) struct Reconnect {
    /// Sessions in a row that failed to start or ended before [`STABLE`].
    failures: u32,
    /// When the current session started consuming.
    began: Option<Instant>,
}

impl Reconnect {
    /// The session is set up and consuming.
    pub(crate) fn established(&mut self) {
        self.began = Some(Instant::now());
    }

    /// The session ended (or never started); how long to wait before the
    /// next one.
    pub(crate) fn ended(&mut self) -> Duration {
        match self.began.take() {
            Some(began) if began.elapsed() >= STABLE => self.failures = 1,
            _ => self.failures += 1,
        }
        attempt::backoff(self.failures, INITIAL, MAX)
    }

    /// Sessions in a row that failed, for the logs.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that each wait is its expected step, in seconds, give or
    /// take the ±20 % jitter.
    fn assert_steps(waits: &[Duration], steps: &[f64]) {
        assert_eq!(waits.len(), steps.len());
        for (wait, step) in waits.iter().zip(steps) {
            let secs = wait.as_secs_f64();
            assert!(
                (step * 0.8..=step * 1.2).contains(&secs),
                "{waits:?} are not the steps {steps:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connections_refused_in_a_row_wait_longer_each_time() {
        let mut reconnect = Reconnect::default();
        let waits: Vec<_> = (0..7).map(|_| reconnect.ended()).collect();
        assert_steps(&waits, &[0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]);
        assert_eq!(reconnect.failures(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_broken_soon_after_they_start_back_off_like_refusals() {
        let mut reconnect = Reconnect::default();
        let mut waits = Vec::new();
        for _ in 0..5 {
            reconnect.established();
            tokio::time::advance(Duration::from_secs(2)).await;
            waits.push(reconnect.ended());
        }
        assert_steps(&waits, &[0.5, 1.0, 2.0, 4.0, 8.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_ran_a_while_starts_the_backoff_over() {
        let mut reconnect = Reconnect::default();
        for _ in 0..4 {
            reconnect.ended();
        }
        reconnect.established();
        tokio::time::advance(STABLE).await;
        let after_a_stable_session = reconnect.ended();
        assert_eq!(reconnect.failures(), 1);
        // And the next quick failure continues from there.
        reconnect.established();
        assert_steps(&[after_a_stable_session, reconnect.ended()], &[0.5, 1.0]);
    }
}
