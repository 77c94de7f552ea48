//! `producer wait JOB`: follow a job until it finishes.
//!
//! Exit 0 when every batch is done, 1 when the job finished with dead or lost batches (stalled)
//! or was cancelled, 3 on timeout. On a terminal, a progress bar shows the batches done.

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use taskmill_client::{Client, Error};
use taskmill_common::{config::ConnArgs, store::JobStatus};

use super::status::{describe, describe_dead, rate};

/// Arguments of `wait`.
#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// Job id.
    #[arg(required_unless_present = "group")]
    pub job: Option<String>,
    /// Every job of a group instead (`enqueue --group`): exit 0 when all completed.
    #[arg(long, value_name = "G", conflicts_with = "job")]
    pub group: Option<String>,
    /// Give up after this long (exit 3): `90s`, `5m`, `1h`, `500ms`, or seconds (`2.5`).
    #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
    pub timeout: Option<Duration>,
    /// Print the final status as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Wait for the job's follow-ups too (`enqueue --then`), to the last step of its chain,
    /// and print that job's status (a skipped step ends the chain: its reason is in the status
    /// of the job before it). With --group: the group's chord follow-up (`group close --then`)
    /// and its chain.
    #[arg(long)]
    pub chain: bool,
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

/// Follows the job until it finishes or `timeout` passes; `progress` draws a bar on stderr.
pub async fn follow(
    client: &Client,
    job: &str,
    timeout: Option<Duration>,
    progress: bool,
) -> anyhow::Result<(JobStatus, WaitEnd)> {
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
    let draw = |status: &JobStatus| {
        let Some(bar) = &bar else { return };
        let settled = status.batches_done + status.batches_dead + status.batches_cancelled;
        let (_, r) = rate(status);
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
    };
    let waited = client.job(job).wait_with(timeout, draw).await;
    if let Some(bar) = &bar {
        // The final status goes on lines of its own, under no bar.
        bar.finish_and_clear();
    }
    match waited {
        Ok(status) => {
            let end = if status.state() == "completed" {
                WaitEnd::Completed
            } else {
                WaitEnd::Failed
            };
            Ok((status, end))
        }
        Err(Error::Timeout(status)) => Ok((*status, WaitEnd::TimedOut)),
        Err(e) => Err(e.into()),
    }
}

/// What follows a finished job in its chain.
enum Link {
    /// Its follow-up, published.
    Next(String),
    /// None: it has none, or none runs (the step was skipped or could not be enqueued: the
    /// job's `then_note` says why); the job's latest status.
    End(JobStatus),
    /// The deadline came before the follow-up was published.
    TimedOut(JobStatus),
}

/// Reads a finished job until its follow-up is published or will not be.
async fn follow_up(
    client: &Client,
    status: &JobStatus,
    deadline: Option<tokio::time::Instant>,
) -> anyhow::Result<Link> {
    let mut cur = status.clone();
    loop {
        if let Some(child) = &cur.then_job {
            return Ok(Link::Next(child.clone()));
        }
        // A follow-up fires in the same script that finishes the job: a finished job that has
        // not fired never will (it was cancelled).
        if cur.then.is_none() || cur.then_fired_ms.is_none() || cur.then_note.is_some() {
            return Ok(Link::End(cur));
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(Link::TimedOut(cur));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        match client.store().job_status(&status.job).await? {
            Some(s) => cur = s,
            None => return Ok(Link::End(cur)),
        }
    }
}

/// `--timeout`: a duration (`90s`, `5m`, `500ms`) or a number of seconds, 0 or more.
pub fn timeout_arg(raw: &str) -> Result<Duration, String> {
    taskmill_client::spec::parse_duration(raw).map(Duration::from_millis)
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &WaitArgs) -> anyhow::Result<ExitCode> {
    let client = crate::client(conn).await?;
    let timeout = args.timeout;
    let progress = std::io::stderr().is_terminal() && !args.json;
    if let Some(g) = &args.group {
        return super::group::wait(&client, g, timeout, args.chain, args.json).await;
    }
    let first = args.job.as_deref().unwrap_or_default();
    if args.chain {
        return chain_from(&client, first, timeout, args.json).await;
    }
    let (status, end) = follow(&client, first, timeout, progress).await?;
    print_end(&client, &status, end, args.json).await
}

/// Waits for `first` and its follow-ups, to the last step of its chain, and prints that
/// job's status.
pub(crate) async fn chain_from(
    client: &Client,
    first: &str,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let progress = std::io::stderr().is_terminal() && !json;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let client = client.clone();
    let (mut status, mut end) = follow(&client, first, timeout, progress).await?;
    {
        while end != WaitEnd::TimedOut {
            let child = match follow_up(&client, &status, deadline).await? {
                Link::Next(child) => child,
                Link::End(latest) => {
                    // The status with the note saying why no follow-up runs.
                    status = latest;
                    break;
                }
                Link::TimedOut(latest) => {
                    (status, end) = (latest, WaitEnd::TimedOut);
                    break;
                }
            };
            let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            (status, end) = follow(&client, &child, left, progress).await?;
        }
    }
    print_end(&client, &status, end, json).await
}

/// Prints how waiting ended: the status (and the dead batches), or one JSON object.
async fn print_end(
    client: &Client,
    status: &JobStatus,
    end: WaitEnd,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let job = status.job.clone();
    if json {
        crate::out::line(&status.to_json().to_string());
    } else {
        let mut text = describe(status);
        if status.batches_dead > 0 {
            if let Some(d) = describe_dead(&client.store().dead_batches(&job).await?) {
                text.push('\n');
                text.push_str(&d);
            }
        }
        crate::out::line(&text);
        if end == WaitEnd::TimedOut {
            eprintln!("producer: timed out waiting for job {job}");
        }
    }
    Ok(ExitCode::from(end.code()))
}
