//! `producer results JOB`: each batch's result, one a line.

use clap::Args;
use serde_json::json;

use taskmill_common::{config::ConnArgs, store::Store};

/// Arguments of `results`.
#[derive(Args, Debug, Clone)]
pub struct ResultsArgs {
    /// Job id.
    pub job: String,
    /// One JSON object a line: `{"batch": N, "result": {...}}`.
    #[arg(long)]
    pub json: bool,
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &ResultsArgs) -> anyhow::Result<std::process::ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let status = crate::client(conn).await?.job(&args.job).read().await?;
    let mut out = String::new();
    let results = store.results(&args.job).await?;
    let missing = status.batches_done.saturating_sub(results.len() as u64);
    if missing > 0 {
        eprintln!(
            "results missing for {missing} of the {} done batches (deleted, renamed or expired in Redis)",
            status.batches_done
        );
    }
    for (batch, result) in results {
        if args.json {
            out.push_str(&json!({"batch": batch, "result": result}).to_string());
        } else {
            out.push_str(&format!("batch {batch}: {result}"));
        }
        out.push('\n');
    }
    if !args.json {
        for (batch, reason) in store.dead_batches(&args.job).await? {
            out.push_str(&format!("batch {batch}: DEAD {reason}\n"));
        }
    }
    crate::out::print(&out);
    Ok(std::process::ExitCode::SUCCESS)
}
