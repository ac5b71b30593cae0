//! Leases of running attempts and the signals that stop them.
//!
//! Every running attempt is registered in [`Leases`] with its lease token
//! and an [`AttemptControl`]: its handler's cancellation token plus why the
//! worker asked it to stop. One heartbeat loop renews all leases with a
//! single batched `Heartbeat` call and turns the answers into signals:
//! `held = false` marks the attempt lost (stop, report nothing),
//! `cancel_requested` stops it as cancelled by the user.
//!
//! Cancellations arrive two ways. orchd pushes them (see `crate::control`):
//! [`Leases::cancel_pushed`] asks the heartbeat loop to check the attempt a
//! push names at once, with a Heartbeat for that lease alone, and the answer
//! stops it. A push is a hint, not an order: anyone who may publish to the
//! broker can send one, so only orchd's `cancel_requested` stops an attempt,
//! and a forged or stale push costs one Heartbeat call. The
//! heartbeat poll is the fallback for a push that got lost: the protocol has
//! no way to ask about cancellations without renewing leases, so while
//! attempts run, the loop sends its batched Heartbeat every
//! `min(--heartbeat-interval, --cancel-poll-interval)` (250ms by default);
//! each one also renews the leases, which is harmless. While nothing runs it
//! sends nothing. `--cancel-poll-interval 0s` falls back to heartbeats every
//! `--heartbeat-interval` (a lost push is then seen that late).
//!
//! A push can overtake the registration of the attempt it is about (orchd
//! records the attempt as RUNNING before this worker has registered it), so
//! a push for an attempt not registered here is remembered for a while and
//! checked if that attempt registers.
//!
//! Each attempt also keeps the time its lease runs out as far as this worker
//! knows: when the start or the last renewal orchd answered was sent, plus
//! the lease asked for (orchd grants exactly that or refuses). A worker cut
//! off from orchd cannot renew, and once that time passes orchd may give the
//! job to another worker; so the lease watchdog stops the attempt then, as
//! lost, instead of letting it run beside the next one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use orchestrator::job::duration_to_proto;
use orchestrator::proto::v1::{HeartbeatRequest, Lease, LeaseStatus};
use tokio::sync::Notify;
use tokio::time::Instant as Deadline;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::rpc::{self, Client};

/// Why the worker asked a handler to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// A user cancelled the job: report `cancelled`.
    CancelRequested,
    /// The attempt ran past the job's timeout: report a retryable failure.
    TimedOut(Duration),
    /// The worker is shutting down and the drain timeout passed: report a
    /// retryable failure so that another worker runs it.
    Shutdown,
}

/// The stop signals of one running attempt.
#[derive(Debug, Default)]
pub(crate) struct AttemptControl {
    /// The handler's cancellation token.
    pub token: CancellationToken,
    reason: Mutex<Option<StopReason>>,
    lost: AtomicBool,
    /// When the lease runs out unless renewed (`None`: not known yet).
    lease_until: Mutex<Option<Deadline>>,
}

impl AttemptControl {
    /// Asks the handler to stop. The first reason given is the one reported.
    pub fn stop(&self, reason: StopReason) {
        let mut current = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if current.is_none() {
            *current = Some(reason);
        }
        drop(current);
        self.token.cancel();
    }

    /// The lease is gone (another attempt may own the job now): stop the
    /// handler and report nothing, whatever other reason there was.
    pub fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Why the handler was asked to stop, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the lease was lost.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Records that orchd holds the lease until at least `until`. Answers
    /// can arrive out of order, so an earlier time never replaces a later.
    pub fn held_until(&self, until: Deadline) {
        let mut current = self
            .lease_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.is_none_or(|c| c < until) {
            *current = Some(until);
        }
    }

    fn lease_until(&self) -> Option<Deadline> {
        *self
            .lease_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

struct Entry {
    attempt: u32,
    lease_token: String,
    control: Arc<AttemptControl>,
}

/// How long a pushed cancel for an attempt not registered here is kept, in
/// case the attempt registers after all.
const EARLY_PUSH_TTL: Duration = Duration::from_secs(60);
/// Most such pushes kept (pushes for attempts that already ended land here
/// too, and must not pile up).
const MAX_EARLY_PUSHES: usize = 1024;

#[derive(Default)]
struct Table {
    running: HashMap<String, Entry>,
    /// Pushed cancels for attempts not registered: job id → (attempt, when).
    early: HashMap<String, (u32, Instant)>,
    /// Attempts a push named, to be checked with orchd now: job id → lease
    /// token.
    checks: HashMap<String, String>,
    /// When the lease watchdog wakes next (`None`: it waits for a lease).
    watch_at: Option<Deadline>,
}

/// The leases this worker holds, by job id.
#[derive(Default)]
pub(crate) struct Leases {
    table: Mutex<Table>,
    added: Notify,
    /// Woken when a check is queued.
    check_now: Notify,
    /// Woken when an attempt registers whose lease runs out before the
    /// lease watchdog would wake.
    armed: Notify,
}

/// One registered attempt, as the heartbeat loop sees it.
#[derive(Clone)]
pub(crate) struct Held {
    pub job_id: String,
    pub lease_token: String,
    pub control: Arc<AttemptControl>,
}

/// What a pushed cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// The attempt runs here: it is checked with orchd now.
    Checking,
    /// The attempt runs here and was already stopping (for any reason).
    AlreadyStopping,
    /// Another attempt of the job runs here: ignored.
    Stale {
        /// The attempt that runs.
        running: u32,
    },
    /// No attempt of the job runs here: kept for a while in case the
    /// attempt has yet to register.
    NotRunning,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers attempt `attempt` of a job. An earlier attempt of the same
    /// job still registered here has lost its lease for sure (orchd just
    /// gave the job a new one), so it is marked lost. A cancel pushed for
    /// this attempt before it registered has it checked at once.
    pub fn insert(
        &self,
        job_id: &str,
        attempt: u32,
        lease_token: &str,
        control: Arc<AttemptControl>,
    ) {
        let mut table = self.lock();
        let early = table
            .early
            .remove(job_id)
            .is_some_and(|(pushed, at)| pushed == attempt && at.elapsed() < EARLY_PUSH_TTL);
        if early {
            tracing::info!(job_id = %job_id, attempt, "cancel pushed before the attempt started here; checking it with orchd");
            table
                .checks
                .insert(job_id.to_owned(), lease_token.to_owned());
            self.check_now.notify_one();
        }
        // Waking the watchdog for every start would have it walk every lease
        // each time; it only needs to when this lease runs out first.
        let arm = control
            .lease_until()
            .is_some_and(|until| table.watch_at.is_none_or(|at| until < at));
        let replaced = table.running.insert(
            job_id.to_owned(),
            Entry {
                attempt,
                lease_token: lease_token.to_owned(),
                control,
            },
        );
        drop(table);
        if arm {
            self.armed.notify_one();
        }
        if let Some(old) = replaced.filter(|old| old.lease_token != lease_token) {
            tracing::warn!(job_id = %job_id, "a new attempt of this job started here; abandoning the old one");
            old.control.lose();
        }
        self.added.notify_one();
    }

    /// Unregisters an attempt (only if it still holds `lease_token`).
    pub fn remove(&self, job_id: &str, lease_token: &str) {
        let mut table = self.lock();
        if table
            .running
            .get(job_id)
            .is_some_and(|e| e.lease_token == lease_token)
        {
            table.running.remove(job_id);
        }
    }

    /// Takes a cancel pushed for attempt `attempt` of a job: when that
    /// attempt runs here, queues a check of its lease with orchd, whose
    /// answer stops it if the cancel is real (see [`apply`]).
    pub fn cancel_pushed(&self, job_id: &str, attempt: u32) -> Pushed {
        let mut table = self.lock();
        let Some(entry) = table.running.get(job_id) else {
            let now = Instant::now();
            table
                .early
                .retain(|_, (_, at)| now.duration_since(*at) < EARLY_PUSH_TTL);
            if table.early.len() < MAX_EARLY_PUSHES {
                table.early.insert(job_id.to_owned(), (attempt, now));
            }
            return Pushed::NotRunning;
        };
        if entry.attempt != attempt {
            return Pushed::Stale {
                running: entry.attempt,
            };
        }
        if entry.control.reason().is_some() || entry.control.is_lost() {
            return Pushed::AlreadyStopping;
        }
        let lease_token = entry.lease_token.clone();
        table.checks.insert(job_id.to_owned(), lease_token);
        drop(table);
        self.check_now.notify_one();
        Pushed::Checking
    }

    /// The queued checks whose attempts still run here, emptying the queue.
    fn take_checks(&self) -> Vec<Held> {
        let mut table = self.lock();
        let checks = std::mem::take(&mut table.checks);
        checks
            .into_iter()
            .filter_map(|(job_id, lease_token)| {
                let entry = table.running.get(&job_id)?;
                (entry.lease_token == lease_token).then(|| Held {
                    control: entry.control.clone(),
                    job_id,
                    lease_token,
                })
            })
            .collect()
    }

    /// Every registered attempt.
    pub fn snapshot(&self) -> Vec<Held> {
        self.lock()
            .running
            .iter()
            .map(|(job_id, e)| Held {
                job_id: job_id.clone(),
                lease_token: e.lease_token.clone(),
                control: e.control.clone(),
            })
            .collect()
    }

    /// How many attempts are registered.
    pub fn len(&self) -> usize {
        self.lock().running.len()
    }

    /// Stops, as lost, every attempt whose lease ran out by `now` without a
    /// renewal; answers (and records for [`Leases::insert`]) the earliest
    /// time a lease still held runs out.
    fn give_up_run_out(&self, now: Deadline) -> Option<Deadline> {
        let mut table = self.lock();
        let mut earliest: Option<Deadline> = None;
        let mut run_out = Vec::new();
        for (job_id, entry) in &table.running {
            let Some(until) = entry.control.lease_until() else {
                continue;
            };
            if entry.control.is_lost() {
                continue;
            }
            if until <= now {
                run_out.push((job_id.clone(), entry.control.clone()));
            } else {
                earliest = Some(earliest.map_or(until, |e| e.min(until)));
            }
        }
        // Recorded under the same lock as the walk, so that an attempt
        // registering meanwhile either was walked or compares with this.
        table.watch_at = earliest;
        drop(table);
        for (job_id, control) in run_out {
            tracing::warn!(job_id = %job_id, "lease ran out without a renewal (orchd unreachable?); stopping the attempt, which orchd may give to another worker now");
            control.lose();
        }
        earliest
    }
}

/// The lease watchdog: sleeps until the earliest time a registered lease
/// runs out and stops the attempts whose lease was not renewed by then.
async fn watch_lease_deadlines(leases: &Leases, stop: &CancellationToken) {
    loop {
        let earliest = leases.give_up_run_out(Deadline::now());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = leases.armed.notified() => {}
            _ = async {
                match earliest {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Applies one Heartbeat answer to the attempts it was sent for; a lease
/// still held is held until `renewed_until` (when the call was sent plus
/// the lease it asked for).
pub(crate) fn apply(sent: &[Held], statuses: &[LeaseStatus], renewed_until: Deadline) {
    let by_job: HashMap<&str, &LeaseStatus> =
        statuses.iter().map(|s| (s.job_id.as_str(), s)).collect();
    for held in sent {
        let Some(status) = by_job.get(held.job_id.as_str()) else {
            // orchd answered for fewer leases than asked: try again next tick.
            continue;
        };
        if !status.held {
            if !held.control.is_lost() {
                tracing::warn!(job_id = %held.job_id, "lease lost (expired or taken over); abandoning the attempt without reporting");
            }
            held.control.lose();
            continue;
        }
        held.control.held_until(renewed_until);
        if status.cancel_requested {
            if held.control.reason().is_none() {
                tracing::info!(job_id = %held.job_id, "cancel requested; stopping the handler");
            }
            held.control.stop(StopReason::CancelRequested);
        }
    }
}

/// What the heartbeat loop needs to know.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatSettings {
    pub worker_id: String,
    /// Lease asked for on each renewal.
    pub lease: Duration,
    /// Interval between heartbeats while attempts run.
    pub tick: Duration,
}

impl HeartbeatSettings {
    /// Deadline of one Heartbeat call: well inside the lease, so that a hung
    /// call is retried before the lease runs out.
    fn call_timeout(&self) -> Duration {
        (self.lease / 3).clamp(Duration::from_millis(500), rpc::CALL_TIMEOUT)
    }
}

/// Renews the leases of all running attempts until `stop`, checks the
/// attempts pushes named as soon as they are queued, and stops the attempts
/// whose lease ran out unrenewed.
pub(crate) async fn run_heartbeats(
    client: Client,
    leases: Arc<Leases>,
    settings: HeartbeatSettings,
    stop: CancellationToken,
) {
    tokio::join!(
        renew_leases(client, &leases, &settings, &stop),
        watch_lease_deadlines(&leases, &stop),
    );
}

async fn renew_leases(
    mut client: Client,
    leases: &Leases,
    settings: &HeartbeatSettings,
    stop: &CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        if leases.len() == 0 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = leases.added.notified() => {}
            }
        }
        // A new lease is fresh: the first renewal is due a tick later.
        let tick = tokio::time::sleep(settings.tick);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut tick => break,
                _ = leases.check_now.notified() => {
                    let checked = leases.take_checks();
                    if checked.is_empty() {
                        continue;
                    }
                    if let Err(status) = renew(&mut client, settings, &checked).await {
                        for held in &checked {
                            tracing::warn!(job_id = %held.job_id, code = ?status.code(), error = %status.message(), "checking a pushed cancel failed; the heartbeat poll will see it");
                        }
                    }
                }
            }
        }
        let sent = leases.snapshot();
        if sent.is_empty() {
            continue;
        }
        match renew(&mut client, settings, &sent).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(failures, "heartbeats work again");
                }
                failures = 0;
            }
            Err(status) => {
                failures += 1;
                // Every tick is 250ms: log the first failure and then about
                // every 30 seconds, not four times a second.
                if failures == 1 || failures.is_multiple_of(120) {
                    tracing::warn!(
                        failures,
                        running = sent.len(),
                        code = ?status.code(),
                        error = %status.message(),
                        "heartbeat failed; leases are not being renewed"
                    );
                }
            }
        }
    }
}

/// One Heartbeat for the leases `sent`, its answer applied to them. The
/// protocol's "stale lease" answer (FAILED_PRECONDITION) does not say which
/// lease of a batch it is about, so each is then asked alone. Errs only
/// when orchd could not answer at all.
async fn renew(
    client: &mut Client,
    settings: &HeartbeatSettings,
    sent: &[Held],
) -> Result<(), tonic::Status> {
    let lost = |held: &Held| LeaseStatus {
        job_id: held.job_id.clone(),
        ..LeaseStatus::default()
    };
    // Taken before the call: orchd counts the lease from when it got the
    // call, never earlier.
    let renewed_until = Deadline::now() + settings.lease;
    match heartbeat(client, settings, sent).await {
        Ok(statuses) => apply(sent, &statuses, renewed_until),
        Err(status) if status.code() == Code::FailedPrecondition => {
            if let [held] = sent {
                apply(sent, &[lost(held)], renewed_until);
                return Ok(());
            }
            for held in sent {
                let one = std::slice::from_ref(held);
                let renewed_until = Deadline::now() + settings.lease;
                match heartbeat(client, settings, one).await {
                    Ok(statuses) => apply(one, &statuses, renewed_until),
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        apply(one, &[lost(held)], renewed_until)
                    }
                    Err(s) => {
                        tracing::warn!(job_id = %held.job_id, code = ?s.code(), error = %s.message(), "heartbeat failed")
                    }
                }
            }
        }
        Err(status) => return Err(status),
    }
    Ok(())
}

async fn heartbeat(
    client: &mut Client,
    settings: &HeartbeatSettings,
    sent: &[Held],
) -> Result<Vec<LeaseStatus>, tonic::Status> {
    let request = HeartbeatRequest {
        worker_id: settings.worker_id.clone(),
        leases: sent
            .iter()
            .map(|h| Lease {
                job_id: h.job_id.clone(),
                lease_token: h.lease_token.clone(),
            })
            .collect(),
        lease: Some(duration_to_proto(settings.lease)),
    };
    let response = client
        .heartbeat(rpc::request(request, settings.call_timeout()))
        .await?;
    Ok(response.into_inner().leases)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(job_id: &str) -> Held {
        Held {
            job_id: job_id.into(),
            lease_token: format!("tok-{job_id}"),
            control: Arc::new(AttemptControl::default()),
        }
    }

    fn status(job_id: &str, held: bool, cancel: bool) -> LeaseStatus {
        LeaseStatus {
            job_id: job_id.into(),
            held,
            cancel_requested: cancel,
            lease_expires_at: None,
        }
    }

    #[test]
    fn answers_become_signals() {
        let sent = vec![held("a"), held("b"), held("c"), held("d")];
        let until = Deadline::now() + Duration::from_secs(30);
        apply(
            &sent,
            &[
                status("a", true, false),
                status("b", false, false),
                status("c", true, true),
            ],
            until,
        );
        let [a, b, c, d] = &sent[..] else {
            unreachable!()
        };
        assert!(!a.control.token.is_cancelled());
        assert!(b.control.is_lost() && b.control.token.is_cancelled());
        assert_eq!(c.control.reason(), Some(StopReason::CancelRequested));
        assert!(c.control.token.is_cancelled() && !c.control.is_lost());
        assert!(!d.control.token.is_cancelled(), "no answer, no signal");
        // A lease still held is held until the renewal's time; a lost one
        // and one without an answer learn nothing.
        assert_eq!(a.control.lease_until(), Some(until));
        assert_eq!(c.control.lease_until(), Some(until));
        assert_eq!(b.control.lease_until(), None);
        assert_eq!(d.control.lease_until(), None);
        // An answer that arrives late never moves the time back.
        a.control.held_until(until - Duration::from_secs(5));
        assert_eq!(a.control.lease_until(), Some(until));
    }

    // Injected: no renewal reaches orchd for one attempt (the worker cut off
    // from it) while another's renewals are answered. Asserted, on a paused
    // clock: the unrenewed attempt is stopped as lost when its lease runs
    // out, not before; the renewed one runs on until its own renewed lease
    // runs out; one registered later with a lease that runs out first is
    // stopped on time too; an attempt with no known lease time is left
    // alone.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_whose_lease_ran_out_unrenewed_is_stopped_as_lost() {
        let lease = Duration::from_secs(30);
        let leases = Arc::new(Leases::default());
        let stop = CancellationToken::new();
        let started = Deadline::now();
        let [renewed, cut_off, unknown] =
            ["renewed", "cut-off", "unknown"].map(|_| Arc::new(AttemptControl::default()));
        renewed.held_until(started + lease);
        cut_off.held_until(started + lease);
        leases.insert("renewed", 1, "t1", renewed.clone());
        leases.insert("cut-off", 1, "t2", cut_off.clone());
        leases.insert("unknown", 1, "t3", unknown.clone());
        let watchdog = tokio::spawn({
            let (leases, stop) = (leases.clone(), stop.clone());
            async move { watch_lease_deadlines(&leases, &stop).await }
        });

        tokio::time::sleep(Duration::from_secs(20)).await;
        let sent: Vec<Held> = leases
            .snapshot()
            .into_iter()
            .filter(|h| h.job_id == "renewed")
            .collect();
        apply(
            &sent,
            &[status("renewed", true, false)],
            Deadline::now() + lease,
        );
        // Registered while the watchdog sleeps until 30 s, with a lease that
        // runs out before that (at 25 s): it is woken for it.
        let short = Arc::new(AttemptControl::default());
        short.held_until(Deadline::now() + Duration::from_secs(5));
        leases.insert("short", 1, "t4", short.clone());

        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert!(!short.is_lost(), "24.9 s");
        tokio::time::sleep(Duration::from_millis(5_000)).await;
        assert!(short.is_lost() && short.token.is_cancelled(), "29.9 s");
        assert!(
            !cut_off.is_lost() && !cut_off.token.is_cancelled(),
            "29.9 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(cut_off.is_lost() && cut_off.token.is_cancelled(), "30.1 s");
        assert!(!renewed.token.is_cancelled(), "renewed at 20 s until 50 s");

        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(renewed.is_lost() && renewed.token.is_cancelled(), "50.1 s");
        assert!(!unknown.token.is_cancelled());

        stop.cancel();
        watchdog.await.unwrap();
    }

    #[test]
    fn the_first_stop_reason_wins_but_a_lost_lease_overrides_all() {
        let control = AttemptControl::default();
        control.stop(StopReason::TimedOut(Duration::from_secs(1)));
        control.stop(StopReason::CancelRequested);
        assert_eq!(
            control.reason(),
            Some(StopReason::TimedOut(Duration::from_secs(1)))
        );
        assert!(!control.is_lost());
        control.lose();
        assert!(control.is_lost());
    }

    #[test]
    fn removal_is_fenced_on_the_token() {
        let leases = Leases::default();
        let control = Arc::new(AttemptControl::default());
        leases.insert("j", 2, "t2", control.clone());
        leases.remove("j", "t1");
        assert_eq!(
            leases.len(),
            1,
            "an older attempt's removal keeps the newer one"
        );
        let newer = Arc::new(AttemptControl::default());
        leases.insert("j", 3, "t3", newer.clone());
        assert!(
            control.is_lost(),
            "a new attempt of the same job supersedes the old one"
        );
        assert!(!newer.is_lost());
        leases.remove("j", "t2");
        assert_eq!(leases.len(), 1);
        leases.remove("j", "t3");
        assert_eq!(leases.len(), 0);
    }

    fn checked(leases: &Leases) -> Vec<(String, String)> {
        let mut checks: Vec<_> = leases
            .take_checks()
            .into_iter()
            .map(|h| (h.job_id, h.lease_token))
            .collect();
        checks.sort();
        checks
    }

    #[test]
    fn a_push_only_has_the_attempt_it_names_checked_and_orchd_decides() {
        let leases = Leases::default();
        let control = Arc::new(AttemptControl::default());
        leases.insert("j", 2, "t2", control.clone());
        assert_eq!(leases.cancel_pushed("j", 1), Pushed::Stale { running: 2 });
        assert!(
            checked(&leases).is_empty(),
            "an older attempt's push is ignored"
        );

        assert_eq!(leases.cancel_pushed("j", 2), Pushed::Checking);
        assert!(!control.token.is_cancelled(), "a push alone stops nothing");
        let sent = leases.take_checks();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].job_id.as_str(), sent[0].lease_token.as_str()),
            ("j", "t2")
        );
        assert!(
            checked(&leases).is_empty(),
            "taking the checks empties the queue"
        );

        // orchd says nobody cancelled the job (a forged push): it runs on.
        apply(&sent, &[status("j", true, false)], Deadline::now());
        assert!(!control.token.is_cancelled());
        // The next push is checked again; this time orchd has the cancel.
        assert_eq!(leases.cancel_pushed("j", 2), Pushed::Checking);
        apply(
            &leases.take_checks(),
            &[status("j", true, true)],
            Deadline::now(),
        );
        assert_eq!(control.reason(), Some(StopReason::CancelRequested));
        assert!(!control.is_lost());
        assert_eq!(leases.cancel_pushed("j", 2), Pushed::AlreadyStopping);
        assert!(checked(&leases).is_empty());
    }

    #[test]
    fn a_check_for_an_attempt_that_ended_meanwhile_is_dropped() {
        let leases = Leases::default();
        leases.insert("j", 1, "t1", Arc::new(AttemptControl::default()));
        leases.insert("k", 1, "tk", Arc::new(AttemptControl::default()));
        assert_eq!(leases.cancel_pushed("j", 1), Pushed::Checking);
        assert_eq!(leases.cancel_pushed("k", 1), Pushed::Checking);
        leases.remove("j", "t1");
        // Job k's attempt ended and its next one registered here.
        leases.remove("k", "tk");
        leases.insert("k", 2, "tk2", Arc::new(AttemptControl::default()));
        assert!(checked(&leases).is_empty());
    }

    #[test]
    fn a_push_that_overtakes_its_attempt_is_checked_when_it_registers() {
        let leases = Leases::default();
        assert_eq!(leases.cancel_pushed("j", 1), Pushed::NotRunning);
        assert!(checked(&leases).is_empty());
        let other = Arc::new(AttemptControl::default());
        leases.insert("k", 1, "tk", other.clone());
        assert!(checked(&leases).is_empty(), "another job is not checked");
        let control = Arc::new(AttemptControl::default());
        leases.insert("j", 1, "t1", control.clone());
        assert!(
            !control.token.is_cancelled(),
            "not stopped before orchd says so"
        );
        assert_eq!(checked(&leases), [("j".to_owned(), "t1".to_owned())]);
        // Used up: the next attempt of the job is not checked for it.
        leases.remove("j", "t1");
        leases.insert("j", 2, "t2", Arc::new(AttemptControl::default()));
        assert!(checked(&leases).is_empty());
        // A push for an attempt that already ended never has a later one
        // checked.
        leases.remove("j", "t2");
        assert_eq!(leases.cancel_pushed("j", 2), Pushed::NotRunning);
        leases.insert("j", 3, "t3", Arc::new(AttemptControl::default()));
        assert!(checked(&leases).is_empty());
    }

    #[test]
    fn remembered_pushes_are_bounded() {
        let leases = Leases::default();
        for i in 0..(MAX_EARLY_PUSHES + 10) {
            leases.cancel_pushed(&format!("job-{i}"), 1);
        }
        assert_eq!(leases.lock().early.len(), MAX_EARLY_PUSHES);
    }

    #[test]
    fn heartbeat_calls_time_out_well_inside_the_lease() {
        let s = |lease| HeartbeatSettings {
            worker_id: "w".into(),
            lease,
            tick: Duration::from_millis(250),
        };
        assert_eq!(
            s(Duration::from_secs(30)).call_timeout(),
            Duration::from_secs(10)
        );
        assert_eq!(
            s(Duration::from_secs(3)).call_timeout(),
            Duration::from_secs(1)
        );
        assert_eq!(
            s(Duration::from_millis(600)).call_timeout(),
            Duration::from_millis(500)
        );
    }
}
