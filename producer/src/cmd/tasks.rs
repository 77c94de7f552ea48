//! `producer tasks`: the task catalog, i.e. the tasks the live workers serve, with their
//! parameters; and the check `enqueue` makes against it.

use std::{collections::BTreeMap, process::ExitCode};

use clap::Args;
use serde_json::Value;
use taskmill_common::{
    config::ConnArgs,
    store::Store,
    task::{check_params, ParamSpec},
};

use crate::error::CliError;

/// Arguments of `tasks`.
#[derive(Args, Debug, Clone)]
pub struct TasksArgs {
    /// One JSON object a line (a catalog entry).
    #[arg(long)]
    pub json: bool,
}

/// Checks a task and its parameters against the catalog of live workers: an unknown task, an
/// unknown parameter or a value of the wrong type is a usage error that says what is valid.
/// With no live worker to ask, it warns and lets the job go.
pub async fn check(
    store: &Store,
    task: &str,
    params: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let catalog = store.catalog().await?;
    if catalog.is_empty() {
        tracing::warn!(
            "no live worker has recorded its tasks in this namespace: task {task:?} and its parameters are not checked"
        );
        return Ok(());
    }
    let Some(entry) = catalog.iter().find(|e| e["name"] == task) else {
        let names: Vec<&str> = catalog.iter().filter_map(|e| e["name"].as_str()).collect();
        return Err(CliError::Usage(format!(
            "unknown task {:?}: the live workers serve {} (or add --no-check for a worker not deployed yet)",
            taskmill_common::envelope::bounded(task, 200),
            names.join(", ")
        ))
        .into());
    };
    let specs: Vec<ParamSpec> = serde_json::from_value(entry["params"].clone()).unwrap_or_default();
    check_params(task, &specs, params).map_err(|e| CliError::Usage(e).into())
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
            out.push_str(&format!(
                "    --param {}=…  {} (default {:?}): {}\n",
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
