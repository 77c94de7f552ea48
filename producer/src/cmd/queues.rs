//! `producer queues` and `producer workers`: what the RabbitMQ management API says about the
//! namespace's queues and the workers consuming them.

use clap::Args;
use serde_json::Value;

use crate::mgmt as broker_views;
use taskmill_common::config::ConnArgs;

/// Arguments of `queues` and `workers`.
#[derive(Args, Debug, Clone)]
pub struct ViewArgs {
    /// One JSON object a line.
    #[arg(long)]
    pub json: bool,
}

/// The namespace's queues: ready, unacked, consumers, publish and deliver rates, leader node.
pub async fn queues(conn: &ConnArgs) -> anyhow::Result<Vec<Value>> {
    Ok(broker_views::queues(&conn.rabbitmq_api_url, &conn.namespace).await?)
}

/// The consumers on the namespace's queues: which machine, which queue, what prefetch.
pub async fn workers(conn: &ConnArgs) -> anyhow::Result<Vec<Value>> {
    Ok(broker_views::consumers(&conn.rabbitmq_api_url, &conn.namespace).await?)
}

/// `producer queues`.
pub async fn run_queues(
    conn: &ConnArgs,
    args: &ViewArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let list = queues(conn).await?;
    let mut out = String::new();
    if !args.json {
        out.push_str(&format!(
            "{:<40} {:>9} {:>9} {:>10} {:>11} {:>11}  {}\n",
            "QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH/s", "DELIVER/s", "LEADER"
        ));
    }
    for q in &list {
        if args.json {
            out.push_str(&q.to_string());
        } else {
            out.push_str(&format!(
                "{:<40} {:>9} {:>9} {:>10} {:>11.1} {:>11.1}  {}",
                q["queue"].as_str().unwrap_or("?"),
                q["ready"].as_u64().unwrap_or(0),
                q["unacked"].as_u64().unwrap_or(0),
                q["consumers"].as_u64().unwrap_or(0),
                q["publish_rate"].as_f64().unwrap_or(0.0),
                q["deliver_rate"].as_f64().unwrap_or(0.0),
                q["node"].as_str().unwrap_or("-"),
            ));
        }
        out.push('\n');
    }
    crate::out::print(&out);
    if list.is_empty() && !args.json {
        eprintln!(
            "no queues in namespace {:?} yet (start a worker or enqueue a job)",
            conn.namespace
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `producer workers`.
pub async fn run_workers(
    conn: &ConnArgs,
    args: &ViewArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let list = workers(conn).await?;
    let mut out = String::new();
    if !args.json {
        out.push_str(&format!(
            "{:<44} {:<22} {:<30} {:>8}\n",
            "CONNECTION", "PEER", "QUEUE", "PREFETCH"
        ));
    }
    for w in &list {
        if args.json {
            out.push_str(&w.to_string());
        } else {
            out.push_str(&format!(
                "{:<44} {:<22} {:<30} {:>8}",
                w["connection"].as_str().unwrap_or("?"),
                format!(
                    "{}:{}",
                    w["host"].as_str().unwrap_or("?"),
                    w["port"].as_u64().unwrap_or(0)
                ),
                w["queue"].as_str().unwrap_or("?"),
                w["prefetch"].as_u64().unwrap_or(0),
            ));
        }
        out.push('\n');
    }
    crate::out::print(&out);
    Ok(std::process::ExitCode::SUCCESS)
}
