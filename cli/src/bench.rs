//! `orchctl bench`: a load generator and checker. It submits many jobs over
//! gRPC or REST (one by one at a chosen concurrency, or in `SubmitJobs`
//! batches), waits until every one of them is terminal, checks that each
//! COMPLETED exactly once, and reports the submit rate, the end-to-end
//! throughput and the latency percentiles. `--latency N` runs one job at a
//! time instead, to measure the latency of an idle system, and `--cancel N`
//! measures cancellation: one running job at a time is cancelled and timed
//! until it is CANCELLED.
//!
//! ## How completion is detected
//!
//! Watching every job (one WatchJob stream each) does not scale to 10,000
//! jobs, and polling every job is worse. Instead the jobs go to a queue of
//! their own (`bench-<random>` unless `--queue` says otherwise), and once
//! every submit was acknowledged the bench polls `ListJobs(queue, state)`
//! for the three non-terminal states (CREATED, RUNNING, RETRYING). Those
//! lists only hold the jobs still in flight, so a poll costs little once
//! the workers keep up, and the poll interval grows with the backlog. When
//! no job is in flight any more, one listing of the whole queue (stopping
//! as soon as every submitted id was seen) is the authoritative answer: a
//! job seen terminal stays terminal, so if all of them are, the bench is
//! over; otherwise (a job moved between two state lists while they were
//! read) polling goes on.
//!
//! The figures never depend on when a poll happened: latencies are each
//! job's own `createdAt → finishedAt` (server clock) and the end-to-end time
//! runs from the first submit (client clock, the same host in the usual
//! setup) to the latest `finishedAt`. In latency mode the bench also times
//! each job on the client: from the submit call to the moment its WatchJob
//! stream shows it COMPLETED, which is what a caller waiting for a result
//! sees. In cancel mode the clock runs from the CancelJob call to the moment
//! the job's WatchJob stream (opened before the call) shows it CANCELLED;
//! the server-side figure is the job's own `updatedAt` when the cancel was
//! recorded → `finishedAt`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use orchestrator::proto::v1::{
    CancelJobRequest, Job, ListJobsRequest, ListJobsResponse, SubmitJobRequest, SubmitJobsRequest,
    WatchJobRequest, job::State,
};
use orchestrator::tls::ClientTls;
use pbjson_types::Struct;
use serde::Serialize;
use tonic::Code;

use crate::args::OutputFormat;
use crate::client::{CALL_TIMEOUT, CONNECT_TIMEOUT, Client, call};
use crate::commands::Global;
use crate::exit::{CliError, error_chain};
use crate::output::{self, Table};
use crate::request::{MAX_PAGE_SIZE, parse_payload};

/// Jobs submitted unless `-n` says otherwise.
pub const DEFAULT_JOBS: u32 = 10_000;
/// Submits in flight unless `--concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: u32 = 64;
/// Most jobs in one `--batch` (the server's SubmitJobs limit).
pub const MAX_BATCH: u32 = 1000;
/// The slowest completion poll, for a large backlog.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The fastest completion poll, once (almost) nothing is in flight.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How many jobs in flight one millisecond of poll interval pays for: a
/// poll reads every job in flight, so this bounds the reads the bench adds
/// to the server's load to about 1000 jobs per second.
const IN_FLIGHT_PER_MS: u64 = 1;
/// Largest gRPC response the bench accepts: a ListJobs page of 1000 jobs
/// with large payloads is far over tonic's 4 MiB default.
const MAX_RESPONSE_BYTES: usize = 1 << 30;
/// How many problems the report lists (the counts cover all of them).
const MAX_PROBLEMS: usize = 20;

const NON_TERMINAL: [State; 3] = [State::Created, State::Running, State::Retrying];
/// Kind of the jobs unless `--kind` says otherwise.
pub const DEFAULT_KIND: &str = "noop";
/// Kind of the jobs of cancel mode unless `--kind` says otherwise.
pub const DEFAULT_CANCEL_KIND: &str = "sleep";
/// Payload of the default cancel-mode jobs: long enough that none ends by
/// itself, short enough that one left behind by a failed run goes away.
pub const DEFAULT_CANCEL_PAYLOAD: &str = r#"{"seconds": 300}"#;

/// The long help of `orchctl bench`.
pub const LONG_ABOUT: &str = "\
Benchmark orchd end to end: submit -n jobs (default 10000 `noop` jobs) at
--concurrency submit calls in flight (default 64), over gRPC or, with
--rest URL, over REST; with --batch N, N jobs per SubmitJobs call. Then wait
until every job is terminal, check that each one COMPLETED exactly once
(one transition to COMPLETED in its history), and report:

  submit rate            jobs / (first submit sent -> last submit answered)
  end-to-end throughput  jobs / (first submit sent -> last job finishedAt)
  latency                p50/p90/p99/max of each job's createdAt -> finishedAt
                         (server clock, millisecond resolution)

--latency N runs N jobs one at a time instead (submit, follow it with
WatchJob until it is terminal, then the next) and also reports the latency
seen by the client, from the submit call to COMPLETED on the stream.

--cancel N measures cancellation latency: N jobs one at a time (default
`sleep` jobs of 300 s): submit, follow it with WatchJob until it is
RUNNING, call CancelJob, and time until the stream shows it CANCELLED.
It reports that client-side latency, and the server's own figure (the
job's updatedAt when the cancel was recorded -> finishedAt). Every job must
end CANCELLED.

The jobs go to a new queue `bench-<random>` unless --queue is given, so that
counting them is cheap and exact: orch-worker must consume that queue, so
either start the workers with `--queues default,<QUEUE>` and pass the same
--queue here, or use `--queue default`. (`orchd dev` workers consume every
queue.) Completion is detected by polling ListJobs for the queue's
CREATED, RUNNING and RETRYING jobs, then one listing of the queue confirms
that every job is terminal; the figures come from the jobs' own timestamps,
never from when a poll happened.

A progress bar is drawn on stderr when it is a terminal; the report goes
to stdout, as a table or, with -o json, as one JSON object.

Exit codes: 0 every job COMPLETED exactly once (with --cancel: every job
CANCELLED); 1 (DATA_LOSS) some job FAILED, was CANCELLED (with --cancel:
was not CANCELLED), is missing, or COMPLETED a wrong number of times;
5 (DEADLINE_EXCEEDED) jobs still not terminal after --timeout; the report
is printed in both cases.";

/// Arguments of `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// How many jobs to submit
    #[arg(
        short = 'n',
        long = "jobs",
        value_name = "N",
        default_value_t = DEFAULT_JOBS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub jobs: u32,

    /// Kind of every job [default: noop, which returns at once; with
    /// --cancel: sleep]
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,

    /// Payload of every job: a JSON object [with --cancel and no --kind:
    /// {"seconds": 300}]
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,

    /// Queue of the jobs (default: a new `bench-<random>` queue per run,
    /// which the workers must consume)
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,

    /// Submit calls in flight at once
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_CONCURRENCY,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub concurrency: u32,

    /// Use orchd's REST API at URL (e.g. http://127.0.0.1:8000) instead of
    /// gRPC
    #[arg(long, value_name = "URL")]
    pub rest: Option<String>,

    /// Submit N jobs per call (SubmitJobs, POST /jobs:batchSubmit)
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BATCH))
    )]
    pub batch: Option<u32>,

    /// Latency mode: N jobs one at a time (submit, wait until it is
    /// terminal, then the next)
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["jobs", "batch", "concurrency"],
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub latency: Option<u32>,

    /// Cancel mode: N jobs one at a time (submit, wait until it is
    /// RUNNING, cancel it, time until it is CANCELLED)
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["jobs", "batch", "concurrency", "latency"],
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub cancel: Option<u32>,

    /// Jobs run through the system (and waited for) before measuring
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub warmup: u32,

    /// How long to wait, after the last submit, for every job to be terminal
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub timeout: humantime::Duration,
}

/// What a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Many jobs at once: submit rate and end-to-end throughput.
    Throughput,
    /// One job at a time: latency.
    Latency,
    /// One running job at a time, cancelled: cancellation latency.
    Cancel,
}

impl Mode {
    /// The state every job must end in.
    pub fn expected(self) -> State {
        match self {
            Mode::Cancel => State::Cancelled,
            Mode::Throughput | Mode::Latency => State::Completed,
        }
    }
}

/// The validated settings of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Throughput, latency or cancel.
    pub mode: Mode,
    /// Measured jobs.
    pub jobs: u32,
    /// Kind of every job.
    pub kind: String,
    /// Payload of every job.
    pub payload: Option<Struct>,
    /// Queue of every job.
    pub queue: String,
    /// Submit calls in flight (1 in latency and cancel mode).
    pub concurrency: u32,
    /// Jobs per submit call, when batching.
    pub batch: Option<u32>,
    /// Unmeasured jobs run first.
    pub warmup: u32,
    /// How long to wait for the jobs after the last submit.
    pub timeout: Duration,
}

impl Plan {
    /// Checks the arguments and fills in the defaults (a fresh queue name).
    pub fn from_args(args: &BenchArgs) -> Result<Plan, CliError> {
        let (mode, jobs, concurrency, batch) = match (args.latency, args.cancel) {
            (Some(n), _) => (Mode::Latency, n, 1, None),
            (None, Some(n)) => (Mode::Cancel, n, 1, None),
            (None, None) => (Mode::Throughput, args.jobs, args.concurrency, args.batch),
        };
        let kind = match (&args.kind, mode) {
            (Some(kind), _) => kind.clone(),
            (None, Mode::Cancel) => DEFAULT_CANCEL_KIND.to_owned(),
            (None, _) => DEFAULT_KIND.to_owned(),
        };
        let payload = match (&args.payload, &args.kind, mode) {
            (Some(text), _, _) => Some(text.as_str()),
            (None, None, Mode::Cancel) => Some(DEFAULT_CANCEL_PAYLOAD),
            (None, _, _) => None,
        };
        let payload = payload
            .map(|text| parse_payload(text, "--payload"))
            .transpose()?;
        let queue = match &args.queue {
            Some(q) if q.trim().is_empty() => {
                return Err(CliError::InvalidInput("--queue must not be empty".into()));
            }
            Some(q) => q.trim().to_owned(),
            None => fresh_queue_name(),
        };
        Ok(Plan {
            mode,
            jobs,
            kind,
            payload,
            queue,
            concurrency,
            batch,
            warmup: args.warmup,
            timeout: *args.timeout,
        })
    }

    fn spec(&self) -> SubmitJobRequest {
        SubmitJobRequest {
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            queue: self.queue.clone(),
            ..SubmitJobRequest::default()
        }
    }
}

/// A queue name no other run uses: `bench-` and 12 hex digits.
pub fn fresh_queue_name() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bench-{}", &id[..12])
}

// ---------------------------------------------------------------------------
// Figures (pure)
// ---------------------------------------------------------------------------

/// The nearest-rank percentile `p` (0 < p <= 100) of sorted samples: the
/// smallest sample such that at least p % of the samples are at most it.
/// `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    /// How many samples.
    pub samples: usize,
    /// Smallest.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// The percentiles of these samples (any order); `None` for none.
    pub fn of(samples: &[f64]) -> Option<Latency> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let at = |p| percentile(&sorted, p).unwrap_or(f64::NAN);
        Some(Latency {
            samples: sorted.len(),
            min: sorted[0],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// A protobuf timestamp in milliseconds since the epoch.
pub fn timestamp_ms(ts: Option<&pbjson_types::Timestamp>) -> Option<f64> {
    ts.map(|t| t.seconds as f64 * 1000.0 + f64::from(t.nanos) / 1e6)
}

fn wall_clock_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The outcome of the exactly-once check over the submitted jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Verdict {
    /// Distinct job ids the server returned for the submits.
    pub submitted: usize,
    /// Ended COMPLETED (in the usual modes: with exactly one transition to
    /// COMPLETED in the history).
    pub completed: usize,
    /// Ended FAILED.
    pub failed: usize,
    /// Ended CANCELLED (in cancel mode: with exactly one transition to
    /// CANCELLED in the history).
    pub cancelled: usize,
    /// Still CREATED, RUNNING or RETRYING.
    pub unfinished: usize,
    /// Not found at all.
    pub missing: usize,
    /// Ended in the expected state (COMPLETED; CANCELLED in cancel mode),
    /// but with zero or several transitions to it.
    pub ended_not_once: usize,
    /// Submits that returned an id already returned by another submit.
    pub duplicate_ids: usize,
    /// Jobs that needed more than one attempt (allowed: at least once
    /// execution, exactly once completion).
    pub retried: usize,
    /// Every submitted job ended in the expected state exactly once.
    pub exactly_once: bool,
    /// The first problems found, one line each.
    pub problems: Vec<String>,
}

/// Checks that every submitted id names a distinct job that ended in
/// `expected` (COMPLETED, or CANCELLED in cancel mode), with exactly one
/// transition to that state in its history. `jobs` are the last known
/// snapshots (any order; other jobs are ignored).
pub fn check_outcome(submitted: &[String], jobs: &[Job], expected: State) -> Verdict {
    let by_id: HashMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    let mut v = Verdict::default();
    let problem = |v: &mut Verdict, text: String| {
        if v.problems.len() < MAX_PROBLEMS {
            v.problems.push(text);
        }
    };
    let mut seen = HashSet::with_capacity(submitted.len());
    let mut ok = 0;
    for id in submitted {
        if !seen.insert(id.as_str()) {
            v.duplicate_ids += 1;
            problem(
                &mut v,
                format!("job {id}: returned by more than one submit"),
            );
            continue;
        }
        let Some(job) = by_id.get(id.as_str()) else {
            v.missing += 1;
            problem(&mut v, format!("job {id}: not found"));
            continue;
        };
        if job.attempt > 1 {
            v.retried += 1;
        }
        let state = State::try_from(job.state).unwrap_or(State::Unspecified);
        if state == expected {
            let name = output::state_name(job.state);
            match job.history.iter().filter(|t| t.to == job.state).count() {
                1 => ok += 1,
                n => {
                    v.ended_not_once += 1;
                    problem(
                        &mut v,
                        format!("job {id}: {name} with {n} transitions to {name}"),
                    );
                    continue;
                }
            }
        }
        match state {
            State::Completed => {
                v.completed += 1;
                if expected != State::Completed {
                    problem(&mut v, format!("job {id}: COMPLETED"));
                }
            }
            State::Failed => {
                v.failed += 1;
                problem(
                    &mut v,
                    format!("job {id}: FAILED: {}", output::clean(&job.error)),
                );
            }
            State::Cancelled => {
                v.cancelled += 1;
                if expected != State::Cancelled {
                    problem(&mut v, format!("job {id}: CANCELLED"));
                }
            }
            _ => {
                v.unfinished += 1;
                problem(
                    &mut v,
                    format!("job {id}: still {}", output::state_name(job.state)),
                );
            }
        }
    }
    v.submitted = seen.len();
    v.exactly_once = ok == submitted.len() && ok > 0;
    v
}

/// Everything a run measured; the JSON of `-o json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `throughput`, `latency` or `cancel`.
    pub mode: Mode,
    /// `grpc` or `rest`.
    pub transport: &'static str,
    /// The URL the jobs were submitted to.
    pub endpoint: String,
    /// Kind of the jobs.
    pub kind: String,
    /// Queue of the jobs.
    pub queue: String,
    /// Jobs asked for.
    pub jobs: u32,
    /// Submit calls in flight.
    pub concurrency: u32,
    /// Jobs per submit call, when batching.
    pub batch: Option<u32>,
    /// Unmeasured warm-up jobs run first.
    pub warmup: u32,
    /// When the measured part started (RFC 3339).
    pub started_at: String,
    /// The exactly-once check.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// First submit sent → last submit acknowledged (client clock).
    pub submit_seconds: f64,
    /// Jobs / `submit_seconds`.
    pub submit_rate: f64,
    /// First submit sent → latest `finishedAt` of a terminal job.
    pub e2e_seconds: f64,
    /// Terminal jobs / `e2e_seconds`.
    pub e2e_rate: f64,
    /// Earliest `createdAt` → latest `finishedAt` (server clock only).
    pub server_seconds: f64,
    /// `createdAt → finishedAt` of the COMPLETED jobs, in ms (server clock,
    /// millisecond resolution).
    pub latency_ms: Option<Latency>,
    /// Latency mode: submit call → COMPLETED seen on the WatchJob stream,
    /// in ms (client clock).
    pub client_latency_ms: Option<Latency>,
    /// Cancel mode: CancelJob call → CANCELLED seen on the WatchJob stream,
    /// in ms (client clock).
    pub cancel_latency_ms: Option<Latency>,
    /// Cancel mode: the job's `updatedAt` when the cancel was recorded →
    /// `finishedAt`, in ms (server clock, millisecond resolution).
    pub cancel_server_latency_ms: Option<Latency>,
}

/// The figures of a run, from what was measured on the client and the
/// final snapshots of the jobs.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Ids returned by the submits, in order.
    pub ids: Vec<String>,
    /// Final snapshots.
    pub jobs: Vec<Job>,
    /// Wall clock (ms since the epoch) when the first submit was sent.
    pub first_submit_ms: f64,
    /// First submit sent → last submit acknowledged.
    pub submit_elapsed: Duration,
    /// Latency mode: client-side latency of each job, in ms.
    pub client_latencies_ms: Vec<f64>,
    /// Cancel mode: client-side cancellation latency of each job, in ms.
    pub cancel_latencies_ms: Vec<f64>,
    /// Cancel mode: server-side cancellation latency of each job, in ms.
    pub cancel_server_latencies_ms: Vec<f64>,
}

/// The end-to-end window and per-job latencies of the submitted jobs.
fn server_figures(m: &Measured) -> (f64, f64, usize, Vec<f64>) {
    let wanted: HashSet<&str> = m.ids.iter().map(String::as_str).collect();
    let mut first_created = f64::INFINITY;
    let mut last_finished = f64::NEG_INFINITY;
    let mut terminal = 0;
    let mut latencies = Vec::new();
    let mut counted = HashSet::new();
    for job in &m.jobs {
        if !wanted.contains(job.id.as_str()) || !counted.insert(job.id.as_str()) {
            continue;
        }
        let created = timestamp_ms(job.created_at.as_ref());
        let finished = timestamp_ms(job.finished_at.as_ref());
        if let Some(c) = created {
            first_created = first_created.min(c);
        }
        if output::is_terminal(job.state) {
            terminal += 1;
            if let Some(f) = finished {
                last_finished = last_finished.max(f);
            }
        }
        if job.state == State::Completed as i32
            && let (Some(c), Some(f)) = (created, finished)
        {
            latencies.push(f - c);
        }
    }
    (first_created, last_finished, terminal, latencies)
}

fn rate(count: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

impl Report {
    /// Builds the report of a run.
    pub fn new(plan: &Plan, transport: &'static str, endpoint: &str, m: &Measured) -> Report {
        let verdict = check_outcome(&m.ids, &m.jobs, plan.mode.expected());
        let (first_created, last_finished, terminal, latencies) = server_figures(m);
        let submit_seconds = m.submit_elapsed.as_secs_f64();
        let e2e_seconds = if last_finished.is_finite() {
            ((last_finished - m.first_submit_ms) / 1000.0).max(0.0)
        } else {
            0.0
        };
        let server_seconds = if last_finished.is_finite() && first_created.is_finite() {
            ((last_finished - first_created) / 1000.0).max(0.0)
        } else {
            0.0
        };
        let started_at =
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(m.first_submit_ms as i64)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default();
        Report {
            mode: plan.mode,
            transport,
            endpoint: endpoint.to_owned(),
            kind: plan.kind.clone(),
            queue: plan.queue.clone(),
            jobs: plan.jobs,
            concurrency: plan.concurrency,
            batch: plan.batch,
            warmup: plan.warmup,
            started_at,
            submit_seconds,
            submit_rate: rate(m.ids.len(), submit_seconds),
            e2e_seconds,
            e2e_rate: rate(terminal, e2e_seconds),
            server_seconds,
            latency_ms: Latency::of(&latencies),
            client_latency_ms: Latency::of(&m.client_latencies_ms),
            cancel_latency_ms: Latency::of(&m.cancel_latencies_ms),
            cancel_server_latency_ms: Latency::of(&m.cancel_server_latencies_ms),
            verdict,
        }
    }

    /// The report for people: a headline, then one metric per row.
    pub fn table(&self) -> String {
        let v = &self.verdict;
        let mut out = format!(
            "orchctl bench: {} {} job{} on queue {} over {} {} ({})\n\n",
            self.jobs,
            self.kind,
            if self.jobs == 1 { "" } else { "s" },
            self.queue,
            self.transport,
            self.endpoint,
            match (self.mode, self.batch) {
                (Mode::Latency, _) => "one at a time".to_owned(),
                (Mode::Cancel, _) => "one at a time, each cancelled once RUNNING".to_owned(),
                (Mode::Throughput, Some(b)) =>
                    format!("concurrency {}, batches of {b}", self.concurrency),
                (Mode::Throughput, None) => format!("concurrency {}", self.concurrency),
            }
        );
        let mut table = Table::new(["METRIC", "VALUE"]);
        table.row([
            "jobs".to_owned(),
            format!(
                "{} submitted, {} COMPLETED, {} FAILED, {} CANCELLED, {} unfinished, {} missing",
                v.submitted, v.completed, v.failed, v.cancelled, v.unfinished, v.missing
            ),
        ]);
        let expected = match self.mode {
            Mode::Cancel => "CANCELLED",
            Mode::Throughput | Mode::Latency => "COMPLETED",
        };
        table.row([
            "exactly once".to_owned(),
            if v.exactly_once {
                format!("yes: every job {expected}, with one transition to {expected}")
            } else {
                "NO".to_owned()
            },
        ]);
        if v.retried > 0 {
            table.row(["retried jobs".to_owned(), v.retried.to_string()]);
        }
        if let Some(l) = &self.cancel_latency_ms {
            table.row(latency_row(
                "cancel latency, client",
                l,
                2,
                "CancelJob call → CANCELLED seen",
            ));
        }
        if let Some(l) = &self.cancel_server_latency_ms {
            table.row(latency_row(
                "cancel latency, server",
                l,
                0,
                "cancel recorded → finishedAt",
            ));
        }
        if self.mode == Mode::Cancel {
            out.push_str(&table.render(""));
            push_problems(&mut out, v);
            return out;
        }
        table.row([
            "submit rate".to_owned(),
            format!(
                "{:.0} jobs/s ({} in {:.3} s)",
                self.submit_rate, v.submitted, self.submit_seconds
            ),
        ]);
        table.row([
            "end-to-end throughput".to_owned(),
            format!(
                "{:.0} jobs/s ({:.3} s from the first submit to the last job finished)",
                self.e2e_rate, self.e2e_seconds
            ),
        ]);
        if let Some(l) = &self.client_latency_ms {
            table.row(latency_row(
                "latency, client",
                l,
                2,
                "submit call → COMPLETED seen",
            ));
        }
        if let Some(l) = &self.latency_ms {
            table.row(latency_row(
                "latency, server",
                l,
                0,
                "createdAt → finishedAt",
            ));
        }
        out.push_str(&table.render(""));
        push_problems(&mut out, v);
        out
    }
}

/// One table row of percentiles, shown with `digits` decimals, and what
/// was timed.
fn latency_row(label: &str, l: &Latency, digits: usize, what: &str) -> [String; 2] {
    let (p50, p90, p99, max) = (l.p50, l.p90, l.p99, l.max);
    [
        label.to_owned(),
        format!(
            "p50 {p50:.digits$}  p90 {p90:.digits$}  p99 {p99:.digits$}  max {max:.digits$} ms ({what})"
        ),
    ]
}

fn push_problems(out: &mut String, v: &Verdict) {
    if !v.problems.is_empty() {
        out.push_str("\nproblems:\n");
        for p in &v.problems {
            out.push_str(&format!("  {p}\n"));
        }
    }
}

// ---------------------------------------------------------------------------
// Talking to orchd: gRPC or REST
// ---------------------------------------------------------------------------

/// The JobService calls the bench needs, over either API.
#[derive(Clone)]
enum Api {
    Grpc(Client),
    Rest(Rest),
}

#[derive(Clone)]
struct Rest {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Whether the "throttled" warning was printed already.
static THROTTLE_WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `op` again after orchd's retry hint (100 ms without one) for as
/// long as it answers RESOURCE_EXHAUSTED: a per-token submit rate limit
/// slows the bench down instead of failing it, and the first time says so.
async fn until_admitted<T, F, Fut>(mut op: F) -> Result<T, CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CliError>>,
{
    loop {
        match op().await {
            Err(CliError::Rpc(status)) if status.code() == Code::ResourceExhausted => {
                if !THROTTLE_WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!(
                        "orchctl bench: orchd's limit throttles the submits ({}); they are retried, so the figures show the limit, not orchd's speed (start orchd with --submit-rate off to measure it)",
                        status.message()
                    );
                }
                let wait = crate::exit::retry_hint(&status).unwrap_or(Duration::from_millis(100));
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

impl Api {
    async fn submit(&self, spec: SubmitJobRequest) -> Result<Job, CliError> {
        until_admitted(|| async {
            match self {
                Api::Grpc(c) => call(c.clone().submit_job(spec.clone())).await,
                Api::Rest(r) => r.post("/jobs", &spec).await,
            }
        })
        .await
    }

    async fn submit_batch(&self, jobs: Vec<SubmitJobRequest>) -> Result<Vec<Job>, CliError> {
        let request = SubmitJobsRequest { jobs };
        let response = until_admitted(|| async {
            match self {
                Api::Grpc(c) => call(c.clone().submit_jobs(request.clone())).await,
                Api::Rest(r) => r.post("/jobs:batchSubmit", &request).await,
            }
        })
        .await?;
        Ok(response.jobs)
    }

    async fn list(&self, request: ListJobsRequest) -> Result<ListJobsResponse, CliError> {
        match self {
            Api::Grpc(c) => call(c.clone().list_jobs(request)).await,
            Api::Rest(r) => r.list(&request).await,
        }
    }

    async fn cancel(&self, id: &str) -> Result<Job, CliError> {
        match self {
            Api::Grpc(c) => {
                call(c.clone().cancel_job(CancelJobRequest {
                    job_id: id.to_owned(),
                }))
                .await
            }
            Api::Rest(r) => {
                r.send(r.request(reqwest::Method::DELETE, &format!("/jobs/{id}")))
                    .await
            }
        }
    }

    /// Starts following the job: its current snapshot, then each change.
    async fn watch(&self, id: &str) -> Result<JobWatch, CliError> {
        match self {
            Api::Grpc(c) => {
                let stream = call(c.clone().watch_job(WatchJobRequest {
                    job_id: id.to_owned(),
                }))
                .await?;
                Ok(JobWatch::Grpc {
                    id: id.to_owned(),
                    stream,
                    last: None,
                })
            }
            Api::Rest(r) => r.watch(id).await,
        }
    }

    /// Follows the job until it is terminal and returns that snapshot.
    async fn wait_terminal(&self, id: &str) -> Result<Job, CliError> {
        self.watch(id).await?.until(output::is_terminal).await
    }
}

/// One job's WatchJob stream, over either API.
enum JobWatch {
    Grpc {
        id: String,
        stream: tonic::Streaming<Job>,
        last: Option<i32>,
    },
    Rest {
        id: String,
        rest: Rest,
        response: reqwest::Response,
        buffer: Vec<u8>,
        last: Option<i32>,
    },
}

impl JobWatch {
    /// The next snapshot; an error when the stream ends before the job is
    /// terminal.
    async fn next(&mut self) -> Result<Job, CliError> {
        match self {
            JobWatch::Grpc { id, stream, last } => match stream.message().await? {
                Some(job) => {
                    *last = Some(job.state);
                    Ok(job)
                }
                None => Err(watch_ended(id, *last)),
            },
            JobWatch::Rest {
                id,
                rest,
                response,
                buffer,
                last,
            } => loop {
                while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    let mut value: serde_json::Value = serde_json::from_slice(line)?;
                    if let Some(error) = value.get("error") {
                        let error: RestError = serde_json::from_value(error.clone())?;
                        return Err(CliError::Rpc(tonic::Status::new(
                            Code::from(error.code),
                            error.message,
                        )));
                    }
                    let job: Job = serde_json::from_value(value["result"].take())?;
                    *last = Some(job.state);
                    return Ok(job);
                }
                match response
                    .chunk()
                    .await
                    .map_err(|e| rest.transport_error(&e))?
                {
                    Some(chunk) => buffer.extend_from_slice(&chunk),
                    None => return Err(watch_ended(id, *last)),
                }
            },
        }
    }

    /// Reads snapshots until one satisfies `done`, and returns it.
    async fn until(mut self, done: impl Fn(i32) -> bool) -> Result<Job, CliError> {
        loop {
            let job = self.next().await?;
            if done(job.state) {
                return Ok(job);
            }
        }
    }
}

fn watch_ended(id: &str, last: Option<i32>) -> CliError {
    CliError::WatchEnded {
        id: id.to_owned(),
        state: last.map_or_else(|| "unknown".to_owned(), output::state_name),
    }
}

/// A grpc-gateway error body.
#[derive(serde::Deserialize)]
struct RestError {
    code: i32,
    #[serde(default)]
    message: String,
}

impl Rest {
    fn new(
        base: &str,
        token: Option<&str>,
        tls: &ClientTls,
        pool: usize,
    ) -> Result<Rest, CliError> {
        let base = base.trim().trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| CliError::Usage(format!("invalid --rest URL {base:?}: {e}")))?;
        // reqwest builds its rustls config, even for http://, from the
        // process-wide crypto provider.
        orchestrator::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder();
        match parsed.scheme() {
            "http" => {}
            "https" => {
                tls.check(&base)
                    .map_err(|e| CliError::Usage(e.to_string()))?;
                let config = tls
                    .rustls_config(&[b"http/1.1"])
                    .map_err(|e| CliError::Usage(e.to_string()))?;
                builder = builder.use_preconfigured_tls(config);
            }
            _ => {
                return Err(CliError::Usage(format!(
                    "invalid --rest URL {base:?}: only http:// and https:// are supported"
                )));
            }
        }
        let http = builder
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(pool)
            .user_agent(concat!("orchctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Usage(error_chain(&e)))?;
        Ok(Rest {
            http,
            base,
            token: token
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> CliError {
        if let Some(why) = orchestrator::tls::handshake_failure(e) {
            CliError::Connect {
                server: self.base.clone(),
                reason: format!("TLS handshake failed: {why}"),
            }
        } else if e.is_connect() {
            CliError::Connect {
                server: self.base.clone(),
                reason: error_chain(e),
            }
        } else {
            CliError::Rpc(tonic::Status::unavailable(error_chain(e)))
        }
    }

    /// Sends the request within [`CALL_TIMEOUT`] and decodes a JSON answer,
    /// or the error body as a status.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<T, CliError> {
        let exchange = async {
            let response = builder.send().await.map_err(|e| self.transport_error(&e))?;
            let status = response.status();
            let body = response
                .bytes()
                .await
                .map_err(|e| self.transport_error(&e))?;
            if status.is_success() {
                serde_json::from_slice(&body).map_err(|e| {
                    CliError::Rpc(tonic::Status::internal(format!(
                        "orchd answered {status} with a body that is not the expected JSON: {e}"
                    )))
                })
            } else {
                Err(rest_error(status, &body))
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(CliError::Rpc(tonic::Status::deadline_exceeded(format!(
                "orchd did not answer within {}s",
                CALL_TIMEOUT.as_secs()
            )))),
        }
    }

    async fn post<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let body = serde_json::to_vec(body)?;
        self.send(
            self.request(reqwest::Method::POST, path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
        )
        .await
    }

    async fn list(&self, request: &ListJobsRequest) -> Result<ListJobsResponse, CliError> {
        let mut query: Vec<(&str, String)> = vec![("pageSize", request.page_size.to_string())];
        if let Ok(state) = State::try_from(request.state)
            && state != State::Unspecified
        {
            query.push(("state", state.as_str_name().to_owned()));
        }
        if !request.queue.is_empty() {
            query.push(("queue", request.queue.clone()));
        }
        if !request.kind.is_empty() {
            query.push(("kind", request.kind.clone()));
        }
        if !request.page_token.is_empty() {
            query.push(("pageToken", request.page_token.clone()));
        }
        self.send(self.request(reqwest::Method::GET, "/jobs").query(&query))
            .await
    }

    /// Opens the NDJSON stream of `GET /jobs/{id}:watch`.
    async fn watch(&self, id: &str) -> Result<JobWatch, CliError> {
        let response = tokio::time::timeout(
            CALL_TIMEOUT,
            self.request(reqwest::Method::GET, &format!("/jobs/{id}:watch"))
                .send(),
        )
        .await
        .map_err(|_| CliError::Rpc(tonic::Status::deadline_exceeded("watch did not start")))?
        .map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(rest_error(status, &body));
        }
        Ok(JobWatch::Rest {
            id: id.to_owned(),
            rest: self.clone(),
            response,
            buffer: Vec::new(),
            last: None,
        })
    }
}

fn rest_error(status: reqwest::StatusCode, body: &[u8]) -> CliError {
    match serde_json::from_slice::<RestError>(body) {
        Ok(e) => CliError::Rpc(tonic::Status::new(Code::from(e.code), e.message)),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let code = match status.as_u16() {
                400 => Code::InvalidArgument,
                401 => Code::Unauthenticated,
                403 => Code::PermissionDenied,
                404 => Code::NotFound,
                429 => Code::ResourceExhausted,
                503 => Code::Unavailable,
                504 => Code::DeadlineExceeded,
                _ => Code::Unknown,
            };
            CliError::Rpc(tonic::Status::new(
                code,
                format!("HTTP {status}: {}", output::clean(text.trim())),
            ))
        }
    }
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

fn progress(len: u64, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:40}] {pos}/{len} {per_sec:>12} {elapsed_precise} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Submits `count` jobs at the plan's concurrency (and batch size); returns
/// the ids, in no particular order.
async fn submit_all(
    api: &Api,
    plan: &Plan,
    count: u32,
    bar: &ProgressBar,
) -> Result<Vec<String>, CliError> {
    let count = count as usize;
    let per_call = plan.batch.unwrap_or(1) as usize;
    let calls = count.div_ceil(per_call);
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..(plan.concurrency as usize).min(calls) {
        let api = api.clone();
        let spec = plan.spec();
        let batching = plan.batch.is_some();
        let next = next.clone();
        let ids = ids.clone();
        let bar = bar.clone();
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(per_call, Ordering::Relaxed);
                if start >= count {
                    return Ok::<(), CliError>(());
                }
                let n = per_call.min(count - start);
                let got: Vec<String> = if batching {
                    let jobs = api.submit_batch(vec![spec.clone(); n]).await?;
                    if jobs.len() != n {
                        return Err(CliError::Rpc(tonic::Status::internal(format!(
                            "SubmitJobs returned {} jobs for {n}",
                            jobs.len()
                        ))));
                    }
                    jobs.into_iter().map(|j| j.id).collect()
                } else {
                    vec![api.submit(spec.clone()).await?.id]
                };
                ids.lock().unwrap_or_else(|e| e.into_inner()).extend(got);
                bar.inc(n as u64);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(CliError::Rpc(tonic::Status::internal(format!(
                "a submit task failed: {e}"
            ))))
        });
        if let Err(e) = result {
            tasks.abort_all();
            return Err(e);
        }
    }
    let ids = std::mem::take(&mut *ids.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(ids)
}

/// Follows `next_page_token` through a listing, calling `page` with each
/// page's jobs until it returns false or the pages end.
async fn for_each_page(
    api: &Api,
    mut request: ListJobsRequest,
    mut page: impl FnMut(Vec<Job>) -> bool,
) -> Result<(), CliError> {
    request.page_size = MAX_PAGE_SIZE;
    loop {
        let response = api.list(request.clone()).await?;
        if !page(response.jobs) {
            return Ok(());
        }
        // The last page, or a server that repeats its token.
        if response.next_page_token.is_empty() || response.next_page_token == request.page_token {
            return Ok(());
        }
        request.page_token = response.next_page_token;
    }
}

/// How many of `ids` are in a non-terminal state on `queue`, as far as the
/// three state lists tell (a hint: the lists are read one after the other).
async fn count_in_flight(api: &Api, queue: &str, ids: &HashSet<String>) -> Result<usize, CliError> {
    let mut in_flight = 0;
    for state in NON_TERMINAL {
        let request = ListJobsRequest {
            state: state as i32,
            queue: queue.to_owned(),
            ..ListJobsRequest::default()
        };
        for_each_page(api, request, |jobs| {
            in_flight += jobs.iter().filter(|j| ids.contains(&j.id)).count();
            true
        })
        .await?;
    }
    Ok(in_flight)
}

/// The current snapshots of `ids`, from a listing of the whole queue that
/// stops once every id was seen (newest first: the jobs of this run come
/// before older ones).
async fn snapshot(
    api: &Api,
    queue: &str,
    ids: &HashSet<String>,
) -> Result<HashMap<String, Job>, CliError> {
    let mut found: HashMap<String, Job> = HashMap::with_capacity(ids.len());
    let request = ListJobsRequest {
        queue: queue.to_owned(),
        ..ListJobsRequest::default()
    };
    for_each_page(api, request, |jobs| {
        for job in jobs {
            if ids.contains(&job.id) {
                found.insert(job.id.clone(), job);
            }
        }
        found.len() < ids.len()
    })
    .await?;
    Ok(found)
}

/// The poll interval for this many jobs in flight: a poll reads every job
/// in flight, so a large backlog is polled less often.
pub fn poll_interval(in_flight: usize) -> Duration {
    let ms = (in_flight as u64) / IN_FLIGHT_PER_MS;
    Duration::from_millis(ms).clamp(MIN_POLL_INTERVAL, MAX_POLL_INTERVAL)
}

/// Waits until every job of `ids` is terminal, or `timeout` passed; returns
/// the last snapshots and whether all were terminal.
async fn wait_all_terminal(
    api: &Api,
    queue: &str,
    ids: &[String],
    timeout: Duration,
    bar: &ProgressBar,
) -> Result<(Vec<Job>, bool), CliError> {
    let wanted: HashSet<String> = ids.iter().cloned().collect();
    let total = wanted.len();
    let deadline = Instant::now() + timeout;
    loop {
        let in_flight = count_in_flight(api, queue, &wanted).await?;
        bar.set_position(total.saturating_sub(in_flight) as u64);
        let timed_out = Instant::now() >= deadline;
        if in_flight == 0 || timed_out {
            let found = snapshot(api, queue, &wanted).await?;
            let terminal = found
                .values()
                .filter(|j| output::is_terminal(j.state))
                .count();
            bar.set_position(terminal as u64);
            if terminal == total || timed_out {
                return Ok((found.into_values().collect(), terminal == total));
            }
        }
        tokio::time::sleep(poll_interval(in_flight).min(deadline - Instant::now())).await;
    }
}

fn timed_out(plan: &Plan, jobs: &[Job], ids: &[String]) -> CliError {
    let verdict = check_outcome(ids, jobs, plan.mode.expected());
    let waiting = jobs
        .iter()
        .filter(|j| j.state == State::Created as i32)
        .count();
    let hint = if waiting > 0 {
        format!(
            "; {waiting} still CREATED: do workers consume queue {:?}? (orch-worker --queues {})",
            plan.queue, plan.queue
        )
    } else {
        String::new()
    };
    CliError::Rpc(tonic::Status::deadline_exceeded(format!(
        "bench: {} of {} jobs not terminal after {}{hint}",
        verdict.unfinished + verdict.missing,
        ids.len(),
        humantime::format_duration(plan.timeout)
    )))
}

/// Throughput mode: submit every job, then wait for all of them.
async fn run_throughput(api: &Api, plan: &Plan) -> Result<(Measured, bool), CliError> {
    if plan.warmup > 0 {
        let bar = progress(u64::from(plan.warmup), "warm-up");
        let ids = submit_all(api, plan, plan.warmup, &bar).await?;
        let (jobs, all) = wait_all_terminal(api, &plan.queue, &ids, plan.timeout, &bar).await?;
        bar.finish_and_clear();
        if !all {
            return Err(timed_out(plan, &jobs, &ids));
        }
    }
    let bar = progress(u64::from(plan.jobs), "submitted");
    let first_submit_ms = wall_clock_ms();
    let started = Instant::now();
    let ids = submit_all(api, plan, plan.jobs, &bar).await?;
    let submit_elapsed = started.elapsed();
    bar.finish_and_clear();

    let bar = progress(u64::from(plan.jobs), "finished");
    let (jobs, all) = wait_all_terminal(api, &plan.queue, &ids, plan.timeout, &bar).await?;
    bar.finish_and_clear();
    Ok((
        Measured {
            ids,
            jobs,
            first_submit_ms,
            submit_elapsed,
            client_latencies_ms: Vec::new(),
            cancel_latencies_ms: Vec::new(),
            cancel_server_latencies_ms: Vec::new(),
        },
        all,
    ))
}

/// Latency mode: one job at a time, each followed until it is terminal.
async fn run_latency(api: &Api, plan: &Plan) -> Result<(Measured, bool), CliError> {
    let one = |api: &Api| {
        let api = api.clone();
        let spec = plan.spec();
        async move {
            let started = Instant::now();
            let job = api.submit(spec).await?;
            let job = tokio::time::timeout(plan.timeout, api.wait_terminal(&job.id))
                .await
                .map_err(|_| {
                    timed_out(
                        plan,
                        std::slice::from_ref(&job),
                        std::slice::from_ref(&job.id),
                    )
                })??;
            Ok::<_, CliError>((job, started.elapsed()))
        }
    };
    if plan.warmup > 0 {
        let bar = progress(u64::from(plan.warmup), "warm-up");
        for _ in 0..plan.warmup {
            one(api).await?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let bar = progress(u64::from(plan.jobs), "finished");
    let first_submit_ms = wall_clock_ms();
    let started = Instant::now();
    let mut ids = Vec::with_capacity(plan.jobs as usize);
    let mut jobs = Vec::with_capacity(plan.jobs as usize);
    let mut latencies = Vec::with_capacity(plan.jobs as usize);
    for _ in 0..plan.jobs {
        let (job, elapsed) = one(api).await?;
        ids.push(job.id.clone());
        if job.state == State::Completed as i32 {
            latencies.push(elapsed.as_secs_f64() * 1000.0);
        }
        jobs.push(job);
        bar.inc(1);
    }
    let submit_elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok((
        Measured {
            ids,
            jobs,
            first_submit_ms,
            submit_elapsed,
            client_latencies_ms: latencies,
            cancel_latencies_ms: Vec::new(),
            cancel_server_latencies_ms: Vec::new(),
        },
        true,
    ))
}

/// How long one cancellation took.
struct CancelTiming {
    /// CancelJob call → CANCELLED seen on the stream (client clock).
    client_ms: f64,
    /// The job's `updatedAt` when the cancel was recorded → `finishedAt`.
    server_ms: Option<f64>,
}

/// Cancel mode: one job at a time is submitted, followed on its WatchJob
/// stream until it is RUNNING, cancelled, and followed until it is
/// terminal. A job that ends before it is RUNNING is not cancelled (the
/// verdict reports it).
async fn run_cancel(api: &Api, plan: &Plan) -> Result<(Measured, bool), CliError> {
    let one = |api: &Api| {
        let api = api.clone();
        let spec = plan.spec();
        async move {
            let job = api.submit(spec).await?;
            let id = job.id.clone();
            let cancel = async {
                let mut watch = api.watch(&id).await?;
                loop {
                    let seen = watch.next().await?;
                    if seen.state == State::Running as i32 {
                        break;
                    }
                    if output::is_terminal(seen.state) {
                        return Ok((seen, None));
                    }
                }
                let asked = Instant::now();
                let recorded = match api.cancel(&id).await {
                    Ok(job) => job,
                    // It ended by itself just before: the verdict says so.
                    Err(CliError::Rpc(status)) if status.code() == Code::FailedPrecondition => {
                        return Ok((watch.until(output::is_terminal).await?, None));
                    }
                    Err(e) => return Err(e),
                };
                let done = watch.until(output::is_terminal).await?;
                let client_ms = asked.elapsed().as_secs_f64() * 1000.0;
                if done.state != State::Cancelled as i32 {
                    return Ok((done, None));
                }
                let server_ms = timestamp_ms(recorded.updated_at.as_ref())
                    .zip(timestamp_ms(done.finished_at.as_ref()))
                    .map(|(from, to)| to - from);
                Ok::<_, CliError>((
                    done,
                    Some(CancelTiming {
                        client_ms,
                        server_ms,
                    }),
                ))
            };
            tokio::time::timeout(plan.timeout, cancel)
                .await
                .map_err(|_| {
                    timed_out(
                        plan,
                        std::slice::from_ref(&job),
                        std::slice::from_ref(&job.id),
                    )
                })?
        }
    };
    if plan.warmup > 0 {
        let bar = progress(u64::from(plan.warmup), "warm-up");
        for _ in 0..plan.warmup {
            one(api).await?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let bar = progress(u64::from(plan.jobs), "cancelled");
    let first_submit_ms = wall_clock_ms();
    let started = Instant::now();
    let mut measured = Measured {
        ids: Vec::with_capacity(plan.jobs as usize),
        jobs: Vec::with_capacity(plan.jobs as usize),
        first_submit_ms,
        submit_elapsed: Duration::ZERO,
        client_latencies_ms: Vec::new(),
        cancel_latencies_ms: Vec::with_capacity(plan.jobs as usize),
        cancel_server_latencies_ms: Vec::with_capacity(plan.jobs as usize),
    };
    for _ in 0..plan.jobs {
        let (job, timing) = one(api).await?;
        measured.ids.push(job.id.clone());
        measured.jobs.push(job);
        if let Some(timing) = timing {
            measured.cancel_latencies_ms.push(timing.client_ms);
            measured.cancel_server_latencies_ms.extend(timing.server_ms);
        }
        bar.inc(1);
    }
    measured.submit_elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok((measured, true))
}

/// `orchctl bench`: runs the benchmark, prints the report, and fails when
/// a job did not complete exactly once (or did not finish in time).
pub async fn bench(g: &Global, args: &BenchArgs, out: &mut impl Write) -> Result<(), CliError> {
    let plan = Plan::from_args(args)?;
    let (api, transport, endpoint) = match &args.rest {
        Some(url) => {
            let rest = Rest::new(url, g.token.as_deref(), &g.tls, plan.concurrency as usize)?;
            let endpoint = rest.base.clone();
            (Api::Rest(rest), "rest", endpoint)
        }
        None => {
            let client = crate::client::connect(&g.server, g.token.as_deref(), &g.tls)
                .await?
                .max_decoding_message_size(MAX_RESPONSE_BYTES);
            (
                Api::Grpc(client),
                "grpc",
                crate::client::normalize_server(&g.server),
            )
        }
    };
    let (measured, all_terminal) = match plan.mode {
        Mode::Throughput => run_throughput(&api, &plan).await?,
        Mode::Latency => run_latency(&api, &plan).await?,
        Mode::Cancel => run_cancel(&api, &plan).await?,
    };
    let report = Report::new(&plan, transport, &endpoint, &measured);
    let text = match g.output {
        OutputFormat::Table => report.table(),
        OutputFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
    };
    out.write_all(text.as_bytes())?;
    out.flush()?;
    if !all_terminal {
        return Err(timed_out(&plan, &measured.jobs, &measured.ids));
    }
    let v = &report.verdict;
    if !v.exactly_once {
        let (ok, expected, other, other_count) = match plan.mode {
            Mode::Cancel => (v.cancelled, "end CANCELLED", "COMPLETED", v.completed),
            Mode::Throughput | Mode::Latency => (v.completed, "complete", "CANCELLED", v.cancelled),
        };
        return Err(CliError::Rpc(tonic::Status::data_loss(format!(
            "bench: {} of {} jobs did not {expected} exactly once ({} FAILED, {other_count} {other}, \
             {} unfinished, {} missing, {} with a wrong number of transitions to it, {} duplicate ids)",
            measured.ids.len().saturating_sub(ok),
            measured.ids.len(),
            v.failed,
            v.unfinished,
            v.missing,
            v.ended_not_once,
            v.duplicate_ids
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;
    use orchestrator::proto::v1::Transition;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let cli =
            Cli::try_parse_from(["orchctl", "bench"].into_iter().chain(args.iter().copied()))?;
        match cli.command {
            Command::Bench(b) => Ok(b),
            other => panic!("not bench: {other:?}"),
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 50.0), Some(50.0));
        assert_eq!(percentile(&hundred, 90.0), Some(90.0));
        assert_eq!(percentile(&hundred, 99.0), Some(99.0));
        assert_eq!(percentile(&hundred, 100.0), Some(100.0));
        // Nearest rank never interpolates: ceil(0.5 * 4) = 2nd of 4.
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
        // ceil(0.9 * 10) = 9th, ceil(0.99 * 10) = 10th.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 90.0), Some(9.0));
        assert_eq!(percentile(&ten, 99.0), Some(10.0));
        assert_eq!(percentile(&ten, 0.1), Some(1.0));
    }

    #[test]
    fn latency_summary_sorts_and_averages() {
        assert_eq!(Latency::of(&[]), None);
        let l = Latency::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(l.samples, 5);
        assert_eq!((l.min, l.max, l.mean), (1.0, 5.0, 3.0));
        assert_eq!((l.p50, l.p90, l.p99), (3.0, 5.0, 5.0));
        let l = Latency::of(&[f64::NAN, 2.0]).unwrap();
        assert_eq!(l.samples, 1, "non-finite samples are dropped");
    }

    fn ts(ms: i64) -> pbjson_types::Timestamp {
        pbjson_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }
    }

    fn transition(from: State, to: State) -> Transition {
        Transition {
            from: from as i32,
            to: to as i32,
            ..Transition::default()
        }
    }

    /// A job that went CREATED → RUNNING → `end`, created at `created` ms
    /// and finished `took` ms later.
    fn job(id: &str, end: State, created: i64, took: i64) -> Job {
        let mut history = vec![
            transition(State::Unspecified, State::Created),
            transition(State::Created, State::Running),
        ];
        let terminal = output::is_terminal(end as i32);
        if terminal {
            history.push(transition(State::Running, end));
        }
        Job {
            id: id.into(),
            state: end as i32,
            attempt: 1,
            history,
            created_at: Some(ts(created)),
            finished_at: terminal.then(|| ts(created + took)),
            ..Job::default()
        }
    }

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn all_completed_once_is_exactly_once() {
        let jobs = vec![
            job("a", State::Completed, 1000, 5),
            job("b", State::Completed, 1001, 7),
            job("unrelated", State::Failed, 900, 1),
        ];
        let v = check_outcome(&ids(&["a", "b"]), &jobs, State::Completed);
        assert!(v.exactly_once, "{v:?}");
        assert_eq!((v.submitted, v.completed), (2, 2));
        assert_eq!(v.failed + v.cancelled + v.unfinished + v.missing, 0);
        assert!(v.problems.is_empty());
    }

    #[test]
    fn every_kind_of_violation_is_counted() {
        let mut twice = job("twice", State::Completed, 0, 1);
        twice
            .history
            .push(transition(State::Running, State::Completed));
        let mut never = job("never", State::Completed, 0, 1);
        never.history.truncate(2);
        let mut retried = job("retried", State::Completed, 0, 1);
        retried.attempt = 2;
        let jobs = vec![
            job("ok", State::Completed, 0, 1),
            job("failed", State::Failed, 0, 1),
            job("cancelled", State::Cancelled, 0, 1),
            job("running", State::Running, 0, 1),
            job("retrying", State::Retrying, 0, 1),
            twice,
            never,
            retried,
        ];
        let submitted = ids(&[
            "ok",
            "failed",
            "cancelled",
            "running",
            "retrying",
            "twice",
            "never",
            "retried",
            "gone",
            "ok",
        ]);
        let v = check_outcome(&submitted, &jobs, State::Completed);
        assert!(!v.exactly_once);
        assert_eq!(v.submitted, 9, "distinct ids");
        assert_eq!(v.completed, 2, "ok and retried");
        assert_eq!(v.retried, 1, "a retry is allowed, and counted");
        assert_eq!(v.failed, 1);
        assert_eq!(v.cancelled, 1);
        assert_eq!(v.unfinished, 2);
        assert_eq!(v.missing, 1);
        assert_eq!(v.ended_not_once, 2);
        assert_eq!(v.duplicate_ids, 1);
        assert_eq!(v.problems.len(), 8);
        assert!(v.problems.iter().any(|p| p == "job gone: not found"));
        assert!(
            v.problems
                .iter()
                .any(|p| p == "job twice: COMPLETED with 2 transitions to COMPLETED")
        );
    }

    #[test]
    fn nothing_submitted_is_not_exactly_once() {
        assert!(!check_outcome(&[], &[], State::Completed).exactly_once);
        assert!(!check_outcome(&[], &[], State::Cancelled).exactly_once);
    }

    #[test]
    fn report_figures_come_from_server_timestamps() {
        let plan = Plan::from_args(&parse(&["-n", "3", "--queue", "q"]).unwrap()).unwrap();
        let measured = Measured {
            ids: ids(&["a", "b", "c"]),
            jobs: vec![
                job("a", State::Completed, 10_000, 4),
                job("b", State::Completed, 10_001, 10),
                job("c", State::Completed, 10_002, 998),
                // Not ours: ignored by every figure.
                job("x", State::Completed, 0, 100_000),
            ],
            first_submit_ms: 9_999.0,
            submit_elapsed: Duration::from_millis(500),
            client_latencies_ms: Vec::new(),
            cancel_latencies_ms: Vec::new(),
            cancel_server_latencies_ms: Vec::new(),
        };
        let r = Report::new(&plan, "grpc", "http://h:1", &measured);
        assert!(r.verdict.exactly_once);
        assert_eq!(r.submit_rate, 6.0);
        // 9 999 ms (first submit) → 11 000 ms (c finished).
        assert!((r.e2e_seconds - 1.001).abs() < 1e-9, "{}", r.e2e_seconds);
        assert!((r.e2e_rate - 3.0 / 1.001).abs() < 1e-9);
        assert!((r.server_seconds - 1.0).abs() < 1e-9);
        let l = r.latency_ms.clone().unwrap();
        assert_eq!((l.p50, l.p99, l.max, l.samples), (10.0, 998.0, 998.0, 3));
        assert!(r.client_latency_ms.is_none());

        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["mode"], "throughput");
        assert_eq!(json["completed"], 3);
        assert_eq!(json["exactly_once"], true);
        assert_eq!(json["latency_ms"]["p50"], 10.0);
        let table = r.table();
        assert!(table.contains("exactly once"), "{table}");
        assert!(table.contains("6 jobs/s"), "{table}");
    }

    #[test]
    fn bench_defaults() {
        let b = parse(&[]).unwrap();
        assert_eq!(b.jobs, 10_000);
        assert_eq!(b.kind, None);
        assert_eq!(b.concurrency, 64);
        assert!(b.payload.is_none() && b.queue.is_none() && b.rest.is_none());
        assert!(b.batch.is_none() && b.latency.is_none() && b.cancel.is_none());
        assert_eq!(b.warmup, 0);
        let plan = Plan::from_args(&b).unwrap();
        assert_eq!(plan.mode, Mode::Throughput);
        assert_eq!(plan.kind, "noop");
        assert!(plan.payload.is_none());
        assert!(plan.queue.starts_with("bench-") && plan.queue.len() == 18);
        assert_ne!(
            plan.queue,
            Plan::from_args(&b).unwrap().queue,
            "fresh per run"
        );
    }

    #[test]
    fn bench_with_every_flag() {
        let b = parse(&[
            "-n",
            "50",
            "--kind",
            "sleep",
            "--payload",
            r#"{"seconds":0}"#,
            "--queue",
            "default",
            "--concurrency",
            "8",
            "--rest",
            "http://127.0.0.1:8000",
            "--batch",
            "100",
            "--warmup",
            "10",
            "--timeout",
            "30s",
        ])
        .unwrap();
        assert_eq!(b.jobs, 50);
        assert_eq!(b.rest.as_deref(), Some("http://127.0.0.1:8000"));
        let plan = Plan::from_args(&b).unwrap();
        assert_eq!(plan.queue, "default");
        assert_eq!(
            (plan.concurrency, plan.batch, plan.warmup),
            (8, Some(100), 10)
        );
        assert_eq!(plan.timeout, Duration::from_secs(30));
        assert_eq!(plan.spec().kind, "sleep");
        assert!(plan.spec().payload.unwrap().fields.contains_key("seconds"));
    }

    #[test]
    fn latency_mode_is_one_at_a_time() {
        let plan = Plan::from_args(&parse(&["--latency", "500"]).unwrap()).unwrap();
        assert_eq!(plan.mode, Mode::Latency);
        assert_eq!((plan.jobs, plan.concurrency, plan.batch), (500, 1, None));
        for conflicting in [["-n", "5"], ["--batch", "5"], ["--concurrency", "5"]] {
            let mut args = vec!["--latency", "5"];
            args.extend(conflicting);
            let err = parse(&args).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        }
    }

    #[test]
    fn cancel_mode_cancels_long_sleeps_one_at_a_time() {
        let plan = Plan::from_args(&parse(&["--cancel", "100"]).unwrap()).unwrap();
        assert_eq!(plan.mode, Mode::Cancel);
        assert_eq!(plan.mode.expected(), State::Cancelled);
        assert_eq!((plan.jobs, plan.concurrency, plan.batch), (100, 1, None));
        assert_eq!(plan.kind, "sleep");
        let payload = plan.spec().payload.unwrap();
        assert_eq!(
            payload.fields["seconds"].kind,
            Some(pbjson_types::value::Kind::NumberValue(300.0))
        );
        // A kind of one's own comes with no default payload.
        let plan = Plan::from_args(&parse(&["--cancel", "1", "--kind", "wait"]).unwrap()).unwrap();
        assert_eq!((plan.kind.as_str(), plan.payload), ("wait", None));
        let plan =
            Plan::from_args(&parse(&["--cancel", "1", "--payload", r#"{"seconds": 9}"#]).unwrap())
                .unwrap();
        assert_eq!(plan.kind, "sleep");
        assert!(plan.spec().payload.unwrap().fields.contains_key("seconds"));
        for conflicting in [
            ["-n", "5"],
            ["--batch", "5"],
            ["--concurrency", "5"],
            ["--latency", "5"],
        ] {
            let mut args = vec!["--cancel", "5"];
            args.extend(conflicting);
            let err = parse(&args).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        }
        assert!(parse(&["--cancel", "0"]).is_err());
    }

    #[test]
    fn in_cancel_mode_only_cancelled_jobs_pass() {
        let jobs = vec![
            job("c", State::Cancelled, 0, 1),
            job("done", State::Completed, 0, 1),
            job("running", State::Running, 0, 1),
        ];
        let v = check_outcome(&ids(&["c"]), &jobs, State::Cancelled);
        assert!(v.exactly_once, "{v:?}");
        assert_eq!((v.cancelled, v.completed), (1, 0));
        assert!(v.problems.is_empty());
        let v = check_outcome(&ids(&["c", "done", "running"]), &jobs, State::Cancelled);
        assert!(!v.exactly_once);
        assert_eq!((v.cancelled, v.completed, v.unfinished), (1, 1, 1));
        assert_eq!(
            v.problems,
            ["job done: COMPLETED", "job running: still RUNNING"]
        );
        let mut twice = job("twice", State::Cancelled, 0, 1);
        twice
            .history
            .push(transition(State::Running, State::Cancelled));
        let v = check_outcome(&ids(&["twice"]), &[twice], State::Cancelled);
        assert!(!v.exactly_once);
        assert_eq!((v.cancelled, v.ended_not_once), (0, 1));
        assert_eq!(
            v.problems,
            ["job twice: CANCELLED with 2 transitions to CANCELLED"]
        );
    }

    #[test]
    fn a_cancel_report_shows_cancellation_latency() {
        let plan = Plan::from_args(&parse(&["--cancel", "2", "--queue", "q"]).unwrap()).unwrap();
        let measured = Measured {
            ids: ids(&["a", "b"]),
            jobs: vec![
                job("a", State::Cancelled, 10_000, 500),
                job("b", State::Cancelled, 11_000, 500),
            ],
            first_submit_ms: 9_999.0,
            submit_elapsed: Duration::from_secs(2),
            client_latencies_ms: Vec::new(),
            cancel_latencies_ms: vec![12.5, 7.25],
            cancel_server_latencies_ms: vec![5.0, 9.0],
        };
        let r = Report::new(&plan, "grpc", "http://h:1", &measured);
        assert!(r.verdict.exactly_once);
        assert!(r.latency_ms.is_none(), "no job COMPLETED");
        let client = r.cancel_latency_ms.clone().unwrap();
        assert_eq!((client.p50, client.max, client.samples), (7.25, 12.5, 2));
        let server = r.cancel_server_latency_ms.clone().unwrap();
        assert_eq!((server.p50, server.p99), (5.0, 9.0));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["mode"], "cancel");
        assert_eq!(json["kind"], "sleep");
        assert_eq!(json["cancelled"], 2);
        assert_eq!(json["cancel_latency_ms"]["p99"], 12.5);
        assert_eq!(json["cancel_server_latency_ms"]["max"], 9.0);
        let table = r.table();
        assert!(
            table.contains("every job CANCELLED, with one transition to CANCELLED"),
            "{table}"
        );
        assert!(table.contains("cancel latency, client"), "{table}");
        assert!(table.contains("p50 7.25"), "{table}");
        assert!(!table.contains("submit rate"), "{table}");
    }

    #[test]
    fn bad_bench_arguments() {
        assert!(parse(&["-n", "0"]).is_err());
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--batch", "0"]).is_err());
        assert!(parse(&["--batch", "1001"]).is_err());
        assert!(parse(&["--latency", "0"]).is_err());
        assert!(parse(&["--timeout", "soon"]).is_err());
        let bad_payload = Plan::from_args(&parse(&["--payload", "[1]"]).unwrap()).unwrap_err();
        assert_eq!(bad_payload.exit_code(), 4);
        let empty_queue = Plan::from_args(&parse(&["--queue", " "]).unwrap()).unwrap_err();
        assert_eq!(empty_queue.exit_code(), 4);
        let tls = ClientTls::default();
        assert!(Rest::new("ftp://x", None, &tls, 1).is_err());
        assert!(Rest::new("http://127.0.0.1:8000/", None, &tls, 1).is_ok());
        assert!(Rest::new("https://127.0.0.1:8000/", None, &tls, 1).is_ok());
        let missing_ca = ClientTls {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..ClientTls::default()
        };
        let Err(err) = Rest::new("https://127.0.0.1:8000", None, &missing_ca, 1) else {
            panic!("a missing --ca-cert must be refused")
        };
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--ca-cert"), "{err}");
    }

    #[test]
    fn poll_interval_grows_with_the_backlog() {
        assert_eq!(poll_interval(0), MIN_POLL_INTERVAL);
        assert_eq!(poll_interval(100), MIN_POLL_INTERVAL);
        assert!(poll_interval(2000) > poll_interval(500));
        assert_eq!(poll_interval(1_000_000), MAX_POLL_INTERVAL);
    }

    #[test]
    fn rest_errors_become_statuses() {
        let err = rest_error(
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"code":3,"message":"invalid kind","details":[]}"#,
        );
        assert!(matches!(&err, CliError::Rpc(s) if s.code() == Code::InvalidArgument));
        assert_eq!(err.to_string(), "INVALID_ARGUMENT: invalid kind");
        let err = rest_error(reqwest::StatusCode::SERVICE_UNAVAILABLE, b"down\n");
        assert!(matches!(&err, CliError::Rpc(s) if s.code() == Code::Unavailable));
    }
}
