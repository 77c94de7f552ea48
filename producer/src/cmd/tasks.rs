//! `producer tasks`: the task catalog, i.e. the tasks the live workers serve, with their
//! parameters (the check `enqueue` makes against it is the client's).

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;
use taskmill_common::{config::ConnArgs, store::Store};

/// Arguments of `tasks`.
#[derive(Args, Debug, Clone)]
pub struct TasksArgs {
    /// One JSON object a line (a catalog entry).
    #[arg(long)]
    pub json: bool,
}

/// `tasks`.
pub async fn run(conn: &ConnArgs, args: &TasksArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let catalog = store.catalog().await?;
    let mut out = String::new();
    for e in &catalog {
        if args.json {
            out.push_str(&e.to_string());
            out.push('\n');
            continue;
        }
        out.push_str(&format!(
            "{}  (queues {})\n  {}\n",
            e["name"].as_str().unwrap_or("?"),
            e["queues"]
                .as_array()
                .map(|q| q
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            e["description"].as_str().unwrap_or("")
        ));
        for p in e["params"].as_array().into_iter().flatten() {
            // What it accepts beyond its type (a range, choices), as the check words it.
            let allowed = serde_json::from_value::<taskmill_common::task::ParamSpec>(p.clone())
                .map(|s| s.allowed())
                .unwrap_or_default();
            let allowed = if allowed.is_empty() {
                String::new()
            } else {
                format!(", {allowed}")
            };
            out.push_str(&format!(
                "    --param {}=…  {} (default {:?}{allowed}): {}\n",
                p["name"].as_str().unwrap_or("?"),
                p["kind"].as_str().unwrap_or("?"),
                p["default"].as_str().unwrap_or(""),
                p["description"].as_str().unwrap_or("")
            ));
        }
    }
    crate::out::print(&out);
    if catalog.is_empty() && !args.json {
        eprintln!(
            "no live worker has recorded its tasks in namespace {}",
            conn.namespace
        );
    }
    Ok(ExitCode::SUCCESS)
}
