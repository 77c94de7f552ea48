//! `producer wait JOB`: follow a job until it finishes.
//!
//! Exit 0 when every batch is done, 1 when the job finished with dead batches or was
//! cancelled, 3 on timeout. On a terminal, a progress bar shows the batches done.

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use taskmill_common::{
    config::ConnArgs,
    store::{JobStatus, Store},
};

use super::status::{describe, load, rate, status_json, summary};

/// How often the job is read while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Arguments of `wait`.
#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// Job id.
    pub job: String,
    /// Give up after this many seconds (exit 3).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Print the final status as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// How waiting ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// Every batch done.
    Completed,
    /// Finished with dead batches, or cancelled.
    Failed,
    /// The timeout came first.
    TimedOut,
}

impl WaitEnd {
    /// The exit code of `wait`.
    pub fn code(self) -> u8 {
        match self {
            WaitEnd::Completed => 0,
            WaitEnd::Failed => crate::error::EXIT_UNFINISHED,
            WaitEnd::TimedOut => crate::error::EXIT_TIMEOUT,
        }
    }
}

/// Polls the job until it finishes or `timeout` passes; `progress` draws a bar on stderr.
pub async fn follow(
    store: &Store,
    job: &str,
    timeout: Option<Duration>,
    progress: bool,
) -> anyhow::Result<(JobStatus, WaitEnd)> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let bar = progress.then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} batches {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    loop {
        let status = load(store, job).await?;
        if let Some(bar) = &bar {
            let settled = status.batches_done + status.batches_dead + status.batches_cancelled;
            let (_, r) = rate(&status);
            let publishing = match status.batches_total {
                Some(total) => {
                    bar.set_length(total);
                    ""
                }
                None => {
                    // The total is not known while publishing: the bar's end moves with it.
                    bar.set_length(status.batches_published.max(settled));
                    ", still publishing"
                }
            };
            bar.set_position(settled);
            bar.set_message(format!(
                "{} dead, {} records/s{publishing}",
                status.batches_dead, r as u64
            ));
        }
        if status.is_finished() {
            if let Some(bar) = &bar {
                // The final status goes on lines of its own, under no bar.
                bar.finish_and_clear();
            }
            let status = with_summary(store, status).await?;
            let end = if status.state() == "completed" {
                WaitEnd::Completed
            } else {
                WaitEnd::Failed
            };
            return Ok((status, end));
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok((status, WaitEnd::TimedOut));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A finished job whose summary the worker is still folding (a custom task's, which only
/// the worker can fold): read it again for up to 2 s.
async fn with_summary(store: &Store, mut status: JobStatus) -> anyhow::Result<JobStatus> {
    let foldable_here = taskmill_common::tasks::builtin()
        .get(status.task())
        .is_some();
    for _ in 0..20 {
        if status.summary.is_some() || foldable_here || status.batches_done == 0 {
            break;
        }
        tokio::time::sleep(POLL).await;
        status = load(store, &status.job).await?;
    }
    Ok(status)
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &WaitArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let timeout = match args.timeout {
        Some(t) if !(t >= 0.0 && t.is_finite()) => {
            return Err(crate::error::CliError::Usage(
                "--timeout must be a number of seconds, 0 or more".into(),
            )
            .into())
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let progress = std::io::stderr().is_terminal() && !args.json;
    let (status, end) = follow(&store, &args.job, timeout, progress).await?;
    if args.json {
        crate::out::line(&status_json(&store, &status).await?.to_string());
    } else {
        let sum = summary(&store, &status).await?;
        crate::out::line(&describe(&status, sum.as_ref()));
        if end == WaitEnd::TimedOut {
            eprintln!("producer: timed out waiting for job {}", args.job);
        }
    }
    Ok(ExitCode::from(end.code()))
}
