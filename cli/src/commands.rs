//! The subcommands: each builds its request, calls orchd and prints the
//! answer on the given writer (stdout in `orchctl`).

use std::io::Write;

use orchestrator::proto::v1::{CancelJobRequest, GetJobRequest, Job, WatchJobRequest, job::State};

use crate::args::{JobIdArg, ListArgs, OutputFormat, SubmitArgs};
use crate::client::{Client, call};
use crate::exit::CliError;
use crate::output;
use crate::request::{MAX_PAGE_SIZE, list_request, submit_request};

/// Settings shared by every subcommand.
#[derive(Debug, Clone)]
pub struct Global {
    /// orchd URL.
    pub server: String,
    /// Bearer token, if any.
    pub token: Option<String>,
    /// TLS settings for an https:// server.
    pub tls: orchestrator::tls::ClientTls,
    /// Output format.
    pub output: OutputFormat,
}

impl Global {
    async fn connect(&self) -> Result<Client, CliError> {
        crate::client::connect(&self.server, self.token.as_deref(), &self.tls).await
    }
}

fn emit(out: &mut impl Write, text: &str) -> Result<(), CliError> {
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `orchctl submit`: validates the arguments, submits, prints the id (or
/// the job JSON), and with `--wait` follows the job.
pub async fn submit(g: &Global, args: &SubmitArgs, out: &mut impl Write) -> Result<(), CliError> {
    // Validate before connecting: invalid input sends nothing.
    let request = submit_request(args)?;
    let mut client = g.connect().await?;
    let job = call(client.submit_job(request)).await?;
    match (g.output, args.wait) {
        (OutputFormat::Table, _) => emit(out, &format!("{}\n", job.id))?,
        (OutputFormat::Json, false) => emit(out, &output::job_json_pretty(&job)?)?,
        // With --wait, the JSON output is only the watch's NDJSON stream.
        (OutputFormat::Json, true) => {}
    }
    if args.wait {
        follow(&mut client, g.output, &job.id, out).await
    } else {
        Ok(())
    }
}

/// `orchctl status ID`.
pub async fn status(g: &Global, args: &JobIdArg, out: &mut impl Write) -> Result<(), CliError> {
    let mut client = g.connect().await?;
    let job = call(client.get_job(GetJobRequest {
        job_id: args.id.clone(),
    }))
    .await?;
    match g.output {
        OutputFormat::Table => emit(out, &output::job_detail(&job)),
        OutputFormat::Json => emit(out, &output::job_json_pretty(&job)?),
    }
}

/// `orchctl cancel ID`.
pub async fn cancel(g: &Global, args: &JobIdArg, out: &mut impl Write) -> Result<(), CliError> {
    let mut client = g.connect().await?;
    let job = call(client.cancel_job(CancelJobRequest {
        job_id: args.id.clone(),
    }))
    .await?;
    match g.output {
        OutputFormat::Table => emit(out, &output::cancel_line(&job)),
        OutputFormat::Json => emit(out, &output::job_json_pretty(&job)?),
    }
}

/// `orchctl list`: follows `next_page_token` until `--limit` jobs were read
/// or the last page.
pub async fn list(g: &Global, args: &ListArgs, out: &mut impl Write) -> Result<(), CliError> {
    let mut client = g.connect().await?;
    let limit = args.limit as usize;
    let mut request = list_request(args);
    let mut jobs: Vec<Job> = Vec::new();
    loop {
        let remaining = limit - jobs.len();
        request.page_size = u32::try_from(remaining)
            .unwrap_or(u32::MAX)
            .min(MAX_PAGE_SIZE);
        let page = call(client.list_jobs(request.clone())).await?;
        jobs.extend(page.jobs);
        if jobs.len() >= limit {
            jobs.truncate(limit);
            break;
        }
        // The last page, or a server that repeats its token (which would
        // loop forever).
        if page.next_page_token.is_empty() || page.next_page_token == request.page_token {
            break;
        }
        request.page_token = page.next_page_token;
    }
    match g.output {
        OutputFormat::Json => emit(out, &output::jobs_json(&jobs)?),
        OutputFormat::Table if jobs.is_empty() => {
            eprintln!("no jobs found");
            Ok(())
        }
        OutputFormat::Table => emit(out, &output::jobs_table(&jobs)),
    }
}

/// `orchctl watch ID`.
pub async fn watch(g: &Global, args: &JobIdArg, out: &mut impl Write) -> Result<(), CliError> {
    let mut client = g.connect().await?;
    follow(&mut client, g.output, &args.id, out).await
}

/// Streams WatchJob, printing each change, until the job is terminal; the
/// result tells how it ended.
async fn follow(
    client: &mut Client,
    format: OutputFormat,
    id: &str,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let mut stream = call(client.watch_job(WatchJobRequest {
        job_id: id.to_owned(),
    }))
    .await?;
    let mut last: Option<Job> = None;
    while let Some(job) = stream.message().await? {
        if last.as_ref() != Some(&job) {
            match format {
                OutputFormat::Table => {
                    // Transitions that happened between two snapshots are
                    // only in the history: print them so no step is hidden.
                    if let Some(previous) = &last {
                        let seen = previous.history.len();
                        let newest = job.history.len().saturating_sub(1);
                        for t in job.history.iter().take(newest).skip(seen) {
                            emit(out, &output::transition_line(t, job.max_attempts))?;
                        }
                    }
                    emit(out, &output::watch_line(&job))?
                }
                OutputFormat::Json => emit(out, &output::job_json_line(&job)?)?,
            }
        }
        if output::is_terminal(job.state) {
            return outcome(&job);
        }
        last = Some(job);
    }
    Err(CliError::WatchEnded {
        id: id.to_owned(),
        state: last.map_or_else(|| "unknown".to_owned(), |j| output::state_name(j.state)),
    })
}

/// Success for a COMPLETED job, the matching error for FAILED / CANCELLED.
pub fn outcome(job: &Job) -> Result<(), CliError> {
    match State::try_from(job.state) {
        Ok(State::Failed) => Err(CliError::JobFailed {
            id: job.id.clone(),
            error: if job.error.is_empty() {
                "no error message".to_owned()
            } else {
                output::clean(&job.error)
            },
        }),
        Ok(State::Cancelled) => Err(CliError::JobCancelled {
            id: job.id.clone(),
            reason: output::clean(&job.error),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_of_terminal_states() {
        let job = |state: State, error: &str| Job {
            id: "j".into(),
            state: state as i32,
            error: error.into(),
            ..Job::default()
        };
        assert!(outcome(&job(State::Completed, "")).is_ok());
        let failed = outcome(&job(State::Failed, "boom")).unwrap_err();
        assert_eq!(failed.exit_code(), 10);
        assert_eq!(failed.to_string(), "job j FAILED: boom");
        let cancelled = outcome(&job(State::Cancelled, "cancelled by user")).unwrap_err();
        assert_eq!(cancelled.exit_code(), 11);
        assert_eq!(cancelled.to_string(), "job j CANCELLED: cancelled by user");
        let multi_line = outcome(&job(State::Failed, "boom\nat line 2")).unwrap_err();
        assert_eq!(multi_line.to_string(), "job j FAILED: boom at line 2");
    }
}
