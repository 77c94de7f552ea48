//! `producer jobs`: the namespace's jobs, newest first, in aligned columns.
//!
//! A job whose hash cannot be read as a job is listed as `unreadable`, with what is wrong,
//! and never hides the others.

use clap::Args;

use taskmill_common::{
    config::ConnArgs,
    store::{JobRead, Store},
    JobState,
};

use crate::error::CliError;

/// Arguments of `jobs`.
#[derive(Args, Debug, Clone)]
pub struct JobsArgs {
    /// One JSON object a line (the job's status; `{"job", "unreadable"}` for a job whose
    /// record cannot be read).
    #[arg(long)]
    pub json: bool,
    /// Only jobs in this state (pending, running, completed, completed_with_errors,
    /// cancelled, interrupted).
    #[arg(long)]
    pub state: Option<String>,
    /// Only jobs of this task.
    #[arg(long)]
    pub task: Option<String>,
    /// At most this many jobs, the newest (0: all).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// First put every job of the namespace back into its index (after the index key
    /// `{ns}:jobs` was deleted or damaged by hand); says how many were missing.
    #[arg(long)]
    pub reindex: bool,
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &JobsArgs) -> anyhow::Result<std::process::ExitCode> {
    let state = match args.state.as_deref() {
        None => None,
        Some(s) => Some(s.parse::<JobState>().map_err(|e| {
            let all: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            CliError::Usage(format!("--state: {e}; states: {}", all.join(", ")))
        })?),
    };
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    if args.reindex {
        let added = store.reindex().await?;
        eprintln!("reindexed: {added} job(s) were missing from the index");
    }
    let mut ids: Vec<String> = store.jobs().await?.into_iter().map(|(j, _)| j).collect();
    ids.reverse();
    let filtered = state.is_some() || args.task.is_some();
    let limit = if args.limit == 0 {
        usize::MAX
    } else {
        args.limit
    };
    if !filtered {
        ids.truncate(limit);
    }
    let rows: Vec<JobRead> = store
        .job_statuses(&ids)
        .await?
        .into_iter()
        // A job whose hash expired after the index was read is left out.
        .flatten()
        .filter(|r| match r {
            Ok(s) => {
                state.is_none_or(|st| s.state == st)
                    && args.task.as_deref().is_none_or(|t| s.task == t)
            }
            // An unreadable job has no state or task to match: it shows when nothing filters.
            Err(_) => !filtered,
        })
        .take(limit)
        .collect();
    let out = if args.json {
        rows.iter()
            .map(|r| match r {
                Ok(s) => s.to_json().to_string() + "\n",
                Err(bad) => bad.to_json().to_string() + "\n",
            })
            .collect()
    } else {
        table(&rows)
    };
    crate::out::print(&out);
    Ok(std::process::ExitCode::SUCCESS)
}

/// The rows as text, each column as wide as its widest cell; an unreadable job's reason
/// follows its state, outside the columns.
fn table(rows: &[JobRead]) -> String {
    let header: [String; 5] = ["JOB", "STATE", "TASK", "BATCHES DONE", "DEAD"].map(String::from);
    let cells: Vec<Result<[String; 5], (String, String)>> = std::iter::once(Ok(header))
        .chain(rows.iter().map(|r| match r {
            Ok(s) => {
                let total = s
                    .batches_total
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "?".into());
                Ok([
                    s.job.clone(),
                    s.state.to_string(),
                    s.task.clone(),
                    format!("{}/{total}", s.batches_done),
                    s.batches_dead.to_string(),
                ])
            }
            Err(bad) => Err((bad.job.clone(), bad.reason())),
        }))
        .collect();
    let mut w = [0usize; 5];
    for c in cells.iter().flatten() {
        for (i, cell) in c.iter().enumerate() {
            w[i] = w[i].max(cell.chars().count());
        }
    }
    w[0] = w[0].max(
        rows.iter()
            .map(|r| job_of(r).chars().count())
            .max()
            .unwrap_or(0),
    );
    w[1] = w[1].max("unreadable".len());
    let mut out = String::new();
    for c in &cells {
        let line = match c {
            Ok(c) => format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}",
                c[0],
                c[1],
                c[2],
                c[3],
                c[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4],
            ),
            Err((job, why)) => format!(
                "{job:<w0$}  {:<w1$}  {why}",
                "unreadable",
                w0 = w[0],
                w1 = w[1]
            ),
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn job_of(r: &JobRead) -> &str {
    match r {
        Ok(s) => &s.job,
        Err(bad) => &bad.job,
    }
}
