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
use taskmill_client::{handle::running, Error};
use taskmill_common::config::ConnArgs;

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

/// `cancel`.
pub async fn run_cancel(conn: &ConnArgs, args: &CancelArgs) -> anyhow::Result<ExitCode> {
    let job = crate::client(conn).await?.job(&args.job);
    let c = job.cancel().await?;
    if !c.now {
        eprintln!(
            "job {} had already finished ({}); nothing changed",
            args.job, c.was
        );
        return Ok(ExitCode::SUCCESS);
    }
    // The cancel is done: a count that cannot be read does not undo or hide it.
    let done = match job.read().await {
        Ok(s) => format!("{} batches done; ", s.batches_done),
        Err(_) => String::new(),
    };
    eprintln!(
        "cancelled job {} (was {}): {done}workers drop the rest unrun",
        args.job, c.was
    );
    Ok(ExitCode::SUCCESS)
}

/// `delete`. A job whose record cannot be read is deleted too (that is how it goes away).
pub async fn run_delete(conn: &ConnArgs, args: &DeleteArgs) -> anyhow::Result<ExitCode> {
    let job = crate::client(conn).await?.job(&args.job);
    // Refused before asking, when it still runs and --cancel was not given.
    let what = match job.read().await {
        Ok(s) if running(&s) && !args.cancel => {
            return Err(CliError::Usage(format!(
                "job {} is {}: cancel it first, or add --cancel",
                args.job, s.state
            ))
            .into());
        }
        Ok(_) => String::new(),
        Err(Error::Unreadable(bad)) => format!(" ({}, deleted as it is)", bad.reason()),
        Err(e) => return Err(e.into()),
    };
    if !crate::out::confirm(
        &format!("delete job {}{what} and its results", args.job),
        args.yes,
    )? {
        eprintln!("nothing deleted");
        return Ok(ExitCode::from(crate::error::EXIT_USAGE));
    }
    job.delete(args.cancel).await?;
    eprintln!("deleted job {}{what}", args.job);
    Ok(ExitCode::SUCCESS)
}
