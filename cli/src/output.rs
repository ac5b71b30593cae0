//! Rendering jobs for stdout: aligned tables, the key/value view of
//! `status`, the one-line-per-change view of `watch`, and the proto3 JSON
//! of `-o json`.
//!
//! Every function returns a `String` (one line or several, each ending in
//! `\n`), so rendering is tested without a terminal. Times are RFC 3339 in
//! UTC with second precision. Text that comes from the server is cleaned of
//! control characters so it cannot break the layout or drive the terminal.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use orchestrator::proto::v1::{Job, Transition, job::State};

use crate::request::struct_to_json;

/// Placeholder for an unset value.
const NONE: &str = "-";

/// Longest error shown in a `list` row before it is cut.
const LIST_ERROR_WIDTH: usize = 60;

/// The upper-case name of a wire state (`RUNNING`), or `UNKNOWN(n)` for a
/// value this build does not know.
pub fn state_name(state: i32) -> String {
    match State::try_from(state) {
        Ok(State::Unspecified) => NONE.to_owned(),
        Ok(s) => s.as_str_name().to_owned(),
        Err(_) => format!("UNKNOWN({state})"),
    }
}

/// Whether a wire state is COMPLETED, FAILED or CANCELLED.
pub fn is_terminal(state: i32) -> bool {
    matches!(
        State::try_from(state),
        Ok(State::Completed | State::Failed | State::Cancelled)
    )
}

/// A timestamp as RFC 3339 in UTC, whole seconds (`2025-01-02T03:04:05Z`);
/// `-` when unset.
pub fn format_time(ts: Option<&pbjson_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return NONE.to_owned();
    };
    match DateTime::<Utc>::try_from(*ts) {
        Ok(t) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
        Err(_) => format!("{}s since epoch", ts.seconds),
    }
}

/// A duration in humantime style (`30s`, `1m 30s`); `-` when unset.
pub fn format_duration(d: Option<&pbjson_types::Duration>) -> String {
    let Some(d) = d else {
        return NONE.to_owned();
    };
    match std::time::Duration::try_from(*d) {
        Ok(d) => humantime::format_duration(d).to_string(),
        Err(_) => format!("{}s", d.seconds),
    }
}

/// A protobuf `Struct` as compact JSON with sorted keys; `-` when unset.
pub fn compact_struct(s: Option<&pbjson_types::Struct>) -> String {
    match s {
        Some(s) => struct_to_json(s).to_string(),
        None => NONE.to_owned(),
    }
}

/// Replaces control characters (newlines, tabs, escape sequences) with
/// spaces so that server-provided text stays on one line.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Cuts `text` to at most `max` characters, ending with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

fn or_none(text: &str) -> String {
    if text.is_empty() {
        NONE.to_owned()
    } else {
        clean(text)
    }
}

/// Aligned columns separated by two spaces, header first; the last column
/// is not padded and no line has trailing spaces.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column; cells are cleaned of control
    /// characters).
    pub fn row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|c| clean(c.as_ref())).collect());
    }

    /// Renders the table, each line prefixed with `indent`.
    pub fn render(&self, indent: &str) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::from(indent);
            for (i, cell) in line.iter().enumerate().take(columns) {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                if i + 1 < columns {
                    let pad = widths[i] - cell.chars().count();
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The `list` table: one row per job, in the given order.
pub fn jobs_table(jobs: &[Job]) -> String {
    let mut table = Table::new([
        "ID", "KIND", "STATE", "QUEUE", "ATTEMPT", "CREATED", "UPDATED", "ERROR",
    ]);
    for job in jobs {
        let mut state = state_name(job.state);
        if job.cancel_requested && !is_terminal(job.state) {
            state.push('*');
        }
        table.row([
            job.id.clone(),
            job.kind.clone(),
            state,
            job.queue.clone(),
            format!("{}/{}", job.attempt, job.max_attempts),
            format_time(job.created_at.as_ref()),
            format_time(job.updated_at.as_ref()),
            truncate(&clean(&job.error), LIST_ERROR_WIDTH),
        ]);
    }
    let mut out = table.render("");
    if jobs
        .iter()
        .any(|j| j.cancel_requested && !is_terminal(j.state))
    {
        out.push_str("* cancel requested\n");
    }
    out
}

/// The `status` view: one `key: value` line per field, then the history as
/// a table.
pub fn job_detail(job: &Job) -> String {
    let mut fields: Vec<(&str, String)> = vec![
        ("id", or_none(&job.id)),
        ("kind", or_none(&job.kind)),
        ("state", state_name(job.state)),
        ("namespace", or_none(&job.namespace)),
        ("queue", or_none(&job.queue)),
        ("attempt", format!("{}/{}", job.attempt, job.max_attempts)),
        ("cancel_requested", job.cancel_requested.to_string()),
    ];
    if !job.worker_id.is_empty() {
        fields.push(("worker", clean(&job.worker_id)));
    }
    fields.push(("created", format_time(job.created_at.as_ref())));
    fields.push(("updated", format_time(job.updated_at.as_ref())));
    fields.push(("started", format_time(job.started_at.as_ref())));
    fields.push(("finished", format_time(job.finished_at.as_ref())));
    if job.next_attempt_at.is_some() {
        fields.push(("next_attempt", format_time(job.next_attempt_at.as_ref())));
    }
    if job.timeout.is_some() {
        fields.push(("timeout", format_duration(job.timeout.as_ref())));
    }
    if let Some(retry) = &job.retry {
        fields.push((
            "retry",
            format!(
                "backoff {} x{} up to {}",
                format_duration(retry.initial_backoff.as_ref()),
                retry.multiplier,
                format_duration(retry.max_backoff.as_ref()),
            ),
        ));
    }
    if !job.idempotency_key.is_empty() {
        fields.push(("idempotency_key", clean(&job.idempotency_key)));
    }
    fields.push(("error", or_none(&job.error)));
    fields.push(("payload", compact_struct(job.payload.as_ref())));
    fields.push(("result", compact_struct(job.result.as_ref())));
    fields.push(("labels", labels_text(job)));

    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in fields {
        let key = format!("{key}:");
        let _ = writeln!(out, "{key:<width$} {value}");
    }
    if job.history.is_empty() {
        out.push_str("history: -\n");
    } else {
        out.push_str("history:\n");
        out.push_str(&history_table(&job.history).render("  "));
    }
    out
}

/// Labels as `k=v, k=v`, sorted by key; `-` when there are none.
fn labels_text(job: &Job) -> String {
    if job.labels.is_empty() {
        return NONE.to_owned();
    }
    let mut labels: Vec<_> = job.labels.iter().collect();
    labels.sort();
    labels
        .into_iter()
        .map(|(k, v)| clean(&format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The history of a job: AT, FROM → TO, ATTEMPT, REASON (and WORKER when a
/// transition names one).
fn history_table(history: &[Transition]) -> Table {
    let with_worker = history.iter().any(|t| !t.worker_id.is_empty());
    let mut header = vec!["AT", "TRANSITION", "ATTEMPT", "REASON"];
    if with_worker {
        header.push("WORKER");
    }
    let mut table = Table::new(header);
    for t in history {
        let mut row = vec![
            format_time(t.at.as_ref()),
            format!("{} → {}", state_name(t.from), state_name(t.to)),
            t.attempt.to_string(),
            t.reason.clone(),
        ];
        if with_worker {
            row.push(t.worker_id.clone());
        }
        table.row(row);
    }
    table
}

/// One `watch` line: time of the change, state, attempt and what happened
/// (reason of the last transition, error, next attempt time, ...).
pub fn watch_line(job: &Job) -> String {
    // The transition that led to the current state, if the history has it.
    let last = job.history.last().filter(|t| t.to == job.state);
    let at = last
        .and_then(|t| t.at.as_ref())
        .or(job.updated_at.as_ref())
        .or(job.created_at.as_ref());

    let mut details: Vec<String> = Vec::new();
    if let Some(t) = last
        && !t.reason.is_empty()
    {
        details.push(clean(&t.reason));
    }
    let state = State::try_from(job.state).ok();
    let shows_error = matches!(
        state,
        Some(State::Failed | State::Retrying | State::Cancelled)
    );
    // The server's reasons usually quote the error already.
    let error = clean(&job.error);
    if shows_error && !error.is_empty() && !details.iter().any(|d| d.contains(&error)) {
        details.push(format!("error: {error}"));
    }
    if state == Some(State::Retrying) && last.is_none() && job.next_attempt_at.is_some() {
        details.push(format!(
            "next attempt at {}",
            format_time(job.next_attempt_at.as_ref())
        ));
    }
    if state == Some(State::Running) && !job.worker_id.is_empty() {
        details.push(format!("worker {}", clean(&job.worker_id)));
    }
    if job.cancel_requested && !is_terminal(job.state) {
        details.push("cancel requested".to_owned());
    }

    let line = format!(
        "{:<20}  {:<9}  attempt {}/{}  {}",
        format_time(at),
        state_name(job.state),
        job.attempt,
        job.max_attempts,
        details.join("; "),
    );
    format!("{}\n", line.trim_end())
}

/// One line for a history entry that the watch saw only in the history
/// (the job moved on before the stream delivered that state).
pub fn transition_line(t: &orchestrator::proto::v1::Transition, max_attempts: u32) -> String {
    let mut details = clean(&t.reason);
    if !t.worker_id.is_empty() && !details.contains(&t.worker_id) {
        details.push_str(&format!("; worker {}", clean(&t.worker_id)));
    }
    let line = format!(
        "{:<20}  {:<9}  attempt {}/{}  {}",
        format_time(t.at.as_ref()),
        state_name(t.to),
        t.attempt,
        max_attempts,
        details,
    );
    format!("{}\n", line.trim_end())
}

/// The human answer to `cancel`: what became of the job.
pub fn cancel_line(job: &Job) -> String {
    let state = state_name(job.state);
    if job.cancel_requested && !is_terminal(job.state) {
        format!(
            "job {} is {state}: cancel requested, its worker will stop it\n",
            job.id
        )
    } else {
        format!("job {} is {state}\n", job.id)
    }
}

/// The proto3 JSON of a job, pretty-printed, with a final newline.
pub fn job_json_pretty(job: &Job) -> Result<String, serde_json::Error> {
    Ok(serde_json::to_string_pretty(job)? + "\n")
}

/// The proto3 JSON of a job on one line (NDJSON), with a final newline.
pub fn job_json_line(job: &Job) -> Result<String, serde_json::Error> {
    Ok(serde_json::to_string(job)? + "\n")
}

/// The `list -o json` document: `{"jobs": [...]}`, pretty-printed.
pub fn jobs_json(jobs: &[Job]) -> Result<String, serde_json::Error> {
    #[derive(serde::Serialize)]
    struct Jobs<'a> {
        jobs: &'a [Job],
    }
    Ok(serde_json::to_string_pretty(&Jobs { jobs })? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator::proto::v1::RetryPolicy;
    use pbjson_types::{Duration, Timestamp};
    use serde_json::json;

    use crate::request::json_to_struct;

    /// 2025-01-02T03:04:05Z plus `secs`, with sub-second noise.
    fn ts(secs: i64) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: 1_735_787_045 + secs,
            nanos: 987_000_000,
        })
    }

    fn transition(from: State, to: State, at: i64, attempt: u32, reason: &str) -> Transition {
        Transition {
            from: from as i32,
            to: to as i32,
            at: ts(at),
            attempt,
            reason: reason.into(),
            worker_id: if to == State::Running {
                "w-1".into()
            } else {
                String::new()
            },
        }
    }

    fn sample_job() -> Job {
        Job {
            id: "0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11".into(),
            kind: "sleep".into(),
            payload: Some(json_to_struct(json!({"seconds": 1})).unwrap()),
            queue: "default".into(),
            state: State::Completed as i32,
            attempt: 2,
            max_attempts: 3,
            retry: Some(RetryPolicy {
                initial_backoff: Some(Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                multiplier: 2.0,
                max_backoff: Some(Duration {
                    seconds: 300,
                    nanos: 0,
                }),
            }),
            cancel_requested: false,
            result: Some(json_to_struct(json!({"slept": 1, "ok": true})).unwrap()),
            error: "boom".into(),
            labels: [
                ("team".to_owned(), "ml".to_owned()),
                ("env".into(), "dev".into()),
            ]
            .into_iter()
            .collect(),
            idempotency_key: String::new(),
            created_at: ts(0),
            updated_at: ts(9),
            started_at: ts(1),
            finished_at: ts(9),
            history: vec![
                transition(State::Unspecified, State::Created, 0, 0, "submitted"),
                transition(State::Created, State::Running, 1, 1, ""),
                transition(State::Running, State::Retrying, 2, 1, "boom"),
                transition(State::Retrying, State::Running, 4, 2, ""),
                transition(State::Running, State::Completed, 9, 2, "completed"),
            ],
            timeout: Some(Duration {
                seconds: 30,
                nanos: 0,
            }),
            next_attempt_at: None,
            worker_id: String::new(),
            namespace: "team-a".into(),
        }
    }

    #[test]
    fn times_are_rfc3339_utc_seconds() {
        assert_eq!(format_time(ts(0).as_ref()), "2025-01-02T03:04:05Z");
        assert_eq!(format_time(None), "-");
        assert_eq!(
            format_duration(Some(&Duration {
                seconds: 90,
                nanos: 0
            })),
            "1m 30s"
        );
    }

    #[test]
    fn state_names() {
        assert_eq!(state_name(State::Running as i32), "RUNNING");
        assert_eq!(state_name(0), "-");
        assert_eq!(state_name(42), "UNKNOWN(42)");
        assert!(is_terminal(State::Cancelled as i32));
        assert!(!is_terminal(State::Retrying as i32));
        assert!(!is_terminal(42));
    }

    #[test]
    fn detail_view_shows_every_field() {
        let text = job_detail(&sample_job());
        for expected in [
            "id:               0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11\n",
            "kind:             sleep\n",
            "state:            COMPLETED\n",
            "namespace:        team-a\n",
            "queue:            default\n",
            "attempt:          2/3\n",
            "cancel_requested: false\n",
            "created:          2025-01-02T03:04:05Z\n",
            "started:          2025-01-02T03:04:06Z\n",
            "finished:         2025-01-02T03:04:14Z\n",
            "timeout:          30s\n",
            "retry:            backoff 1s x2 up to 5m\n",
            "error:            boom\n",
            "payload:          {\"seconds\":1}\n",
            "result:           {\"ok\":true,\"slept\":1}\n",
            "labels:           env=dev, team=ml\n",
            "history:\n",
            "  AT                    TRANSITION           ATTEMPT  REASON     WORKER\n",
            "  2025-01-02T03:04:05Z  - → CREATED          0        submitted\n",
            "  2025-01-02T03:04:06Z  CREATED → RUNNING    1                   w-1\n",
            "  2025-01-02T03:04:07Z  RUNNING → RETRYING   1        boom\n",
            "  2025-01-02T03:04:09Z  RETRYING → RUNNING   2                   w-1\n",
            "  2025-01-02T03:04:14Z  RUNNING → COMPLETED  2        completed\n",
        ] {
            assert!(text.contains(expected), "{expected:?} missing in\n{text}");
        }
        assert!(!text.contains("next_attempt"), "unset extras are hidden");
        assert!(text.lines().all(|l| l == l.trim_end()), "trailing spaces");
    }

    #[test]
    fn detail_view_of_a_bare_job() {
        let text = job_detail(&Job {
            id: "j".into(),
            state: State::Created as i32,
            max_attempts: 3,
            ..Job::default()
        });
        assert!(text.contains("state:            CREATED\n"), "{text}");
        assert!(text.contains("result:           -\n"));
        assert!(text.contains("labels:           -\n"));
        assert!(text.contains("history: -\n"));
    }

    #[test]
    fn list_table_is_aligned() {
        let mut running = sample_job();
        running.id = "11111111-2222-4333-8444-555555555555".into();
        running.kind = "transcode.video".into();
        running.state = State::Running as i32;
        running.cancel_requested = true;
        running.error = String::new();
        let text = jobs_table(&[running, sample_job()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID                                    KIND             STATE      QUEUE    ATTEMPT  CREATED               UPDATED               ERROR"
        );
        assert_eq!(
            lines[1],
            "11111111-2222-4333-8444-555555555555  transcode.video  RUNNING*   default  2/3      2025-01-02T03:04:05Z  2025-01-02T03:04:14Z"
        );
        assert_eq!(
            lines[2],
            "0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11  sleep            COMPLETED  default  2/3      2025-01-02T03:04:05Z  2025-01-02T03:04:14Z  boom"
        );
        assert_eq!(lines[3], "* cancel requested");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn list_table_cuts_long_errors_and_cleans_control_characters() {
        let mut job = sample_job();
        job.error = format!("line one\nline two\x1b[31m {}", "x".repeat(100));
        let text = jobs_table(&[job]);
        let row = text.lines().nth(1).unwrap();
        assert!(row.contains("line one line two [31m"), "{row}");
        assert!(row.ends_with('…'));
        assert!(!row.contains('\x1b'));
    }

    #[test]
    fn watch_lines_tell_what_happened() {
        let mut job = sample_job();
        assert_eq!(
            watch_line(&job),
            "2025-01-02T03:04:14Z  COMPLETED  attempt 2/3  completed\n"
        );

        job.state = State::Retrying as i32;
        job.attempt = 1;
        job.history.truncate(3);
        job.next_attempt_at = ts(4);
        // The reason already says "boom": the error is not repeated.
        assert_eq!(
            watch_line(&job),
            "2025-01-02T03:04:07Z  RETRYING   attempt 1/3  boom\n"
        );
        // Without the transition, the error and the next attempt time show.
        let mut bare = job.clone();
        bare.history.clear();
        assert_eq!(
            watch_line(&bare),
            "2025-01-02T03:04:14Z  RETRYING   attempt 1/3  error: boom; next attempt at 2025-01-02T03:04:09Z\n"
        );

        job.state = State::Failed as i32;
        job.history
            .push(transition(State::Running, State::Failed, 9, 3, "exhausted"));
        assert_eq!(
            watch_line(&job),
            "2025-01-02T03:04:14Z  FAILED     attempt 1/3  exhausted; error: boom\n"
        );

        job.state = State::Running as i32;
        job.history.clear();
        job.worker_id = "w-9".into();
        job.cancel_requested = true;
        assert_eq!(
            watch_line(&job),
            "2025-01-02T03:04:14Z  RUNNING    attempt 1/3  worker w-9; cancel requested\n"
        );
    }

    #[test]
    fn cancel_lines() {
        let mut job = sample_job();
        job.state = State::Cancelled as i32;
        assert_eq!(
            cancel_line(&job),
            "job 0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11 is CANCELLED\n"
        );
        job.state = State::Running as i32;
        job.cancel_requested = true;
        assert!(cancel_line(&job).contains("RUNNING: cancel requested"));
    }

    #[test]
    fn json_output_is_the_proto3_json() {
        let job = sample_job();
        let pretty = job_json_pretty(&job).unwrap();
        let v: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(v["id"], "0b7e0d6e-5b8e-4a43-9a57-1f1c2f0e8a11");
        assert_eq!(v["state"], "COMPLETED");
        assert_eq!(v["maxAttempts"], 3);
        // pbjson writes RFC 3339 with nanos and a +00:00 offset.
        let created = v["createdAt"].as_str().unwrap();
        assert!(created.starts_with("2025-01-02T03:04:05.987"), "{created}");
        assert_eq!(v["timeout"], "30s");
        assert_eq!(v["history"][0]["reason"], "submitted");
        // It parses back into the same job.
        assert_eq!(serde_json::from_str::<Job>(&pretty).unwrap(), job);

        let line = job_json_line(&job).unwrap();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));

        let list: serde_json::Value =
            serde_json::from_str(&jobs_json(&[job.clone(), job]).unwrap()).unwrap();
        assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
        assert_eq!(jobs_json(&[]).unwrap(), "{\n  \"jobs\": []\n}\n");
    }
}
