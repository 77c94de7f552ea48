//! `producer dlq`: inspect, replay and purge dead letters: the command line over the client
//! library's dead-letter verbs (`taskmill_client::dead`, which the dashboard uses too: how
//! reading leaves them in place, what a replay keeps and why every call ends are said there).

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::error::CliError;
pub use taskmill_client::{DeadLetter, Replayed};
use taskmill_common::{config::ConnArgs, envelope};

/// Arguments of `dlq`.
#[derive(Args, Debug, Clone)]
pub struct DlqArgs {
    /// What to do with the dead letters.
    #[command(subcommand)]
    pub action: DlqAction,
}

/// The `dlq` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum DlqAction {
    /// One line a dead letter: JOB:BATCH, task, error kind, attempts, time, error (with
    /// --json: job, batch, task, kind, error, attempts, at_ms, queue).
    List {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter as JSON: job, batch, task, kind, error, attempts, at_ms, queue, params
    /// and records.
    Show {
        /// The batch, as `JOB:BATCH` (its message id).
        id: String,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their work queue with attempts reset.
    Replay {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// All of them.
        #[arg(long, conflicts_with = "job")]
        all: bool,
    },
    /// Delete dead letters.
    Purge {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// All of them.
        #[arg(long, conflicts_with = "job")]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (d, s) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Lists dead letters (all, or one job's) without removing them.
pub async fn list(conn: &ConnArgs, job: Option<&str>) -> anyhow::Result<Vec<DeadLetter>> {
    Ok(taskmill_client::dead::list(&conn.client_settings(), job).await?)
}

/// Republishes matching dead letters (of those there when it starts) to their work queue.
pub async fn replay(conn: &ConnArgs, job: Option<&str>) -> anyhow::Result<Replayed> {
    Ok(crate::client(conn).await?.replay_dead(job).await?)
}

/// Deletes matching dead letters; returns how many.
pub async fn purge(conn: &ConnArgs, job: Option<&str>) -> anyhow::Result<u64> {
    Ok(taskmill_client::dead::purge(&conn.client_settings(), job).await?)
}

/// One dead letter (by its message id `JOB:BATCH`) as JSON, None when it is not there.
pub async fn find(conn: &ConnArgs, id: &str) -> anyhow::Result<Option<Value>> {
    Ok(taskmill_client::dead::find(&conn.client_settings(), id).await?)
}

async fn show(conn: &ConnArgs, id: &str, as_json: bool) -> anyhow::Result<bool> {
    let Some(mut v) = find(conn, id).await? else {
        return Ok(false);
    };
    if let Some(o) = v.as_object_mut() {
        o.remove("headers");
    }
    if as_json {
        crate::out::line(&v.to_string());
    } else {
        crate::out::line(&serde_json::to_string_pretty(&v).context("formatting the dead letter")?);
    }
    Ok(true)
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &DlqArgs) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match &args.action {
        DlqAction::List { job, json } => {
            let letters = list(conn, job.as_deref()).await?;
            let mut out = String::new();
            for d in &letters {
                if *json {
                    out.push_str(&d.to_json().to_string());
                } else {
                    out.push_str(&format!(
                        "{}:{}  {}  {}  attempts={}  {}  {}",
                        d.job.as_deref().unwrap_or("?"),
                        d.batch.map(|b| b.to_string()).unwrap_or_else(|| "?".into()),
                        d.task.as_deref().unwrap_or("?"),
                        d.kind,
                        d.attempts,
                        when(d.at_ms),
                        d.error
                    ));
                }
                out.push('\n');
            }
            crate::out::print(&out);
            if !*json {
                eprintln!("{} dead letters", letters.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Show { id, json } => {
            if show(conn, id, *json).await? {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(CliError::NoSuchJob(format!(
                    "no dead letter {:?} (give it as JOB:BATCH, as `dlq list` shows)",
                    envelope::bounded(id, 200)
                ))
                .into())
            }
        }
        DlqAction::Replay { job, all } => {
            if job.is_none() && !all {
                return Err(CliError::Usage(
                    "say which dead letters to replay: --job JOB or --all".into(),
                )
                .into());
            }
            let r = replay(conn, job.as_deref()).await?;
            for s in &r.skipped {
                eprintln!("skipped {s}");
            }
            eprintln!(
                "replayed {} dead letters{}",
                r.replayed,
                if r.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; skipped {} (they stay dead letters)", r.skipped.len())
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Purge { job, all, yes } => {
            if job.is_none() && !all {
                return Err(CliError::Usage(
                    "say which dead letters to purge: --job JOB or --all".into(),
                )
                .into());
            }
            let what = match job {
                Some(j) => format!("purge the dead letters of job {j}"),
                None => "purge ALL dead letters".to_string(),
            };
            if !crate::out::confirm(&what, *yes)? {
                eprintln!("nothing purged");
                return Ok(ExitCode::from(crate::error::EXIT_USAGE));
            }
            let n = purge(conn, job.as_deref()).await?;
            eprintln!("purged {n} dead letters");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::when(0), "-");
        assert_eq!(super::when(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
