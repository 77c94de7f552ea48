//! `producer namespace delete NAME`: remove what trying taskmill out left behind: the
//! namespace's queues and exchanges (every broker name that starts with `NAME.`) and its Redis
//! keys (every key that starts with `NAME:`), never another namespace's. Refused while live
//! workers of the namespace beat (their heartbeats in Redis), unless `--force`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use taskmill_common::{
    config::{validate_name, ConnArgs},
    now_ms,
    store::Store,
};

use crate::error::CliError;
use crate::mgmt::ManagementApi as Api;

/// Arguments of `namespace`.
#[derive(Args, Debug, Clone)]
pub struct NamespaceArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: NamespaceAction,
}

/// What `namespace` does.
#[derive(Subcommand, Debug, Clone)]
pub enum NamespaceAction {
    /// Delete a namespace's queues, exchanges and Redis keys (jobs, results, dead letters).
    Delete {
        /// The namespace.
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Delete it even while workers of it are alive (they lose their queues).
        #[arg(long)]
        force: bool,
    },
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &NamespaceArgs) -> anyhow::Result<ExitCode> {
    let NamespaceAction::Delete { name, yes, force } = &args.action;
    validate_name("namespace", name).map_err(CliError::Usage)?;
    let store = Store::connect(&conn.redis_url, name, conn.result_ttl).await?;
    let live = live_workers(&store.workers().await?);
    if !live.is_empty() && !force {
        return Err(CliError::Usage(format!(
            "namespace {name} has {} live workers ({}): stop them first, or add --force",
            live.len(),
            live.join(", ")
        ))
        .into());
    }
    let api = Api::new(&conn.rabbitmq_api_url)?;
    let prefix = format!("{name}.");
    let mut doomed: Vec<(String, String)> = Vec::new();
    for kind in ["queues", "exchanges"] {
        for item in api.get(kind).await?.as_array().into_iter().flatten() {
            let (Some(n), Some(vhost)) = (item["name"].as_str(), item["vhost"].as_str()) else {
                continue;
            };
            if n.starts_with(&prefix) {
                doomed.push((kind.to_string(), format!("{}/{}", enc(vhost), enc(n))));
            }
        }
    }
    let keys = store.keys_of_namespace().await?;
    let queues = doomed.iter().filter(|(k, _)| k == "queues").count();
    let what = format!(
        "delete namespace {name}: {queues} queues, {} exchanges and {} Redis keys",
        doomed.len() - queues,
        keys.len()
    );
    if !crate::out::confirm(&what, *yes)? {
        eprintln!("nothing deleted");
        return Ok(ExitCode::from(crate::error::EXIT_USAGE));
    }
    // Queues first: an exchange's bindings go with them.
    for (kind, path) in &doomed {
        api.delete(&format!("{kind}/{path}")).await?;
    }
    store.delete_keys(&keys).await?;
    eprintln!(
        "deleted namespace {name}: {queues} queues, {} exchanges, {} Redis keys",
        doomed.len() - queues,
        keys.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `host:pid` of the workers whose heartbeat is fresh and who did not say they stopped.
fn live_workers(workers: &[Value]) -> Vec<String> {
    let now = now_ms();
    workers
        .iter()
        .filter(|w| taskmill_common::store::heartbeat_alive(w, now))
        .map(|w| format!("{}:{}", w["host"].as_str().unwrap_or("?"), w["pid"]))
        .collect()
}

/// A path segment of the management API (`/` of the default vhost is `%2F`).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
