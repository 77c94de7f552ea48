//! `producer cancel JOB` and `producer delete JOB`: steering jobs.
//!
//! Cancel: the job becomes `cancelled` at once; whichever worker meets one of its batches
//! still queued, waiting out a retry delay or held in a prefetch buffer drops it unrun
//! (counted in `batches_cancelled`); batches in progress finish and are stored. Cancelling a
//! finished job says so and changes nothing.
//!
//! Delete: removes a finished (or cancelled) job's keys and results; a job still pending or
//! running is refused unless `--cancel` is given.

use std::process::ExitCode;

use clap::Args;
use taskmill_common::{
    config::ConnArgs,
    store::{Store, StoreError},
    JobState,
};

use crate::error::CliError;

/// Arguments of `cancel`.
#[derive(Args, Debug, Clone)]
pub struct CancelArgs {
    /// Job id.
    pub job: String,
}

/// Arguments of `delete`.
#[derive(Args, Debug, Clone)]
pub struct DeleteArgs {
    /// Job id.
    pub job: String,
    /// Cancel the job first when it is still pending or running.
    #[arg(long)]
    pub cancel: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

fn no_such_job(job: &str) -> anyhow::Error {
    CliError::NoSuchJob(format!(
        "no job {:?} in this namespace (wrong --namespace, or it expired)",
        taskmill_common::envelope::bounded(job, 200)
    ))
    .into()
}

/// `cancel`.
pub async fn run_cancel(conn: &ConnArgs, args: &CancelArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    match store.cancel(&args.job).await? {
        None => Err(no_such_job(&args.job)),
        Some(c) if !c.now => {
            eprintln!(
                "job {} had already finished ({}); nothing changed",
                args.job, c.was
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(c) => {
            // The cancel is done: a count that cannot be read does not undo or hide it.
            let done = match store.job_status(&args.job).await {
                Ok(Some(s)) => format!("{} batches done; ", s.batches_done),
                _ => String::new(),
            };
            eprintln!(
                "cancelled job {} (was {}): {done}workers drop the rest unrun",
                args.job, c.was
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `delete`. A job whose hash cannot be read is deleted too (that is how it goes away).
pub async fn run_delete(conn: &ConnArgs, args: &DeleteArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let (running, what) = match store.job_status(&args.job).await {
        Ok(Some(status)) => {
            let running = matches!(status.state, JobState::Pending | JobState::Running)
                || (status.state == JobState::Interrupted && status.finished_ms.is_none());
            (running.then_some(status.state), String::new())
        }
        Ok(None) => return Err(no_such_job(&args.job)),
        Err(StoreError::BadJob(bad)) => (None, format!(" ({}, deleted as it is)", bad.reason())),
        Err(e) => return Err(e.into()),
    };
    if let (Some(state), false) = (running, args.cancel) {
        return Err(CliError::Usage(format!(
            "job {} is {state}: cancel it first, or add --cancel",
            args.job
        ))
        .into());
    }
    if !crate::out::confirm(
        &format!("delete job {}{what} and its results", args.job),
        args.yes,
    )? {
        eprintln!("nothing deleted");
        return Ok(ExitCode::from(crate::error::EXIT_USAGE));
    }
    if running.is_some() {
        store.cancel(&args.job).await?;
    }
    if !store.delete_job(&args.job).await? {
        return Err(no_such_job(&args.job));
    }
    eprintln!("deleted job {}{what}", args.job);
    Ok(ExitCode::SUCCESS)
}
