//! `producer jobs`: the namespace's jobs, oldest first.

use clap::Args;

use taskmill_common::{config::ConnArgs, store::Store};

/// Arguments of `jobs`.
#[derive(Args, Debug, Clone)]
pub struct JobsArgs {
    /// One JSON object a line (the job's status).
    #[arg(long)]
    pub json: bool,
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &JobsArgs) -> anyhow::Result<std::process::ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let mut out = String::new();
    if !args.json {
        out.push_str(&format!(
            "{:<34} {:<22} {:<12} {:>16} {:>8}\n",
            "JOB", "STATE", "TASK", "BATCHES DONE", "DEAD"
        ));
    }
    for (job, _) in store.jobs().await? {
        // A job whose hash expired before the index is left out.
        let Some(status) = store.job_status(&job).await? else {
            continue;
        };
        if args.json {
            out.push_str(&status.to_json().to_string());
        } else {
            let total = status
                .batches_total
                .map(|t| t.to_string())
                .unwrap_or_else(|| "?".into());
            out.push_str(&format!(
                "{:<34} {:<22} {:<12} {:>16} {:>8}",
                job,
                status.state(),
                status.task(),
                format!("{}/{}", status.batches_done, total),
                status.batches_dead,
            ));
        }
        out.push('\n');
    }
    crate::out::print(&out);
    Ok(std::process::ExitCode::SUCCESS)
}
