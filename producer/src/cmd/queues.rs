//! `producer queues` and `producer workers`: what the RabbitMQ management API says about the
//! namespace's queues and the workers consuming them.

use clap::Args;
use serde_json::{json, Value};

use crate::error::CliError;
use taskmill_common::config::{redact, ConnArgs};

/// Arguments of `queues` and `workers`.
#[derive(Args, Debug, Clone)]
pub struct ViewArgs {
    /// One JSON object a line.
    #[arg(long)]
    pub json: bool,
}

/// A client of the management API (credentials taken from the URL).
pub(crate) struct Api {
    http: reqwest::Client,
    base: url::Url,
    user: String,
    password: String,
    shown: String,
}

impl Api {
    pub(crate) fn new(raw: &str) -> anyhow::Result<Self> {
        let mut base = url::Url::parse(raw).map_err(|e| {
            CliError::Usage(format!(
                "--rabbitmq-api-url {} is not a URL: {e}",
                redact(raw)
            ))
        })?;
        let user = match base.username() {
            "" => "guest".to_string(),
            u => u.to_string(),
        };
        let password = base.password().unwrap_or("guest").to_string();
        let _ = base.set_username("");
        let _ = base.set_password(None);
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?,
            shown: base.to_string(),
            base,
            user,
            password,
        })
    }

    /// Deletes `path` (a queue, an exchange); one already gone is fine.
    pub(crate) async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let url = format!("{}/{path}", self.base.as_str().trim_end_matches('/'));
        let resp = self
            .http
            .delete(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| {
                CliError::Service(format!(
                    "cannot reach the RabbitMQ management API at {}: {}",
                    self.shown,
                    taskmill_common::error_text(&e)
                ))
            })?;
        let status = resp.status();
        if !status.is_success() && status != reqwest::StatusCode::NOT_FOUND {
            return Err(CliError::Service(format!(
                "the RabbitMQ management API at {} answered {status} to deleting {path}",
                self.shown
            ))
            .into());
        }
        Ok(())
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}/{path}", self.base.as_str().trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| {
                CliError::Service(format!(
                    "cannot reach the RabbitMQ management API at {}: {} (is the rabbitmq_management plugin enabled?)",
                    self.shown,
                    taskmill_common::error_text(&e)
                ))
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(CliError::Service(format!(
                "the RabbitMQ management API at {} refused the credentials of --rabbitmq-api-url",
                self.shown
            ))
            .into());
        }
        if !status.is_success() {
            return Err(CliError::Service(format!(
                "the RabbitMQ management API at {} answered {status} for {path}",
                self.shown
            ))
            .into());
        }
        Ok(resp.json().await?)
    }
}

fn rate(v: &Value, stat: &str) -> f64 {
    v["message_stats"][format!("{stat}_details")]["rate"]
        .as_f64()
        .unwrap_or(0.0)
}

/// The namespace's queues: ready, unacked, consumers, publish and deliver rates.
pub async fn queues(conn: &ConnArgs) -> anyhow::Result<Vec<Value>> {
    let api = Api::new(&conn.rabbitmq_api_url)?;
    let all = api.get("queues").await?;
    let prefix = format!("{}.", conn.namespace);
    let mut out: Vec<Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(&prefix)))
        .map(|q| {
            json!({
                "queue": q["name"],
                "vhost": q["vhost"],
                "type": q["type"],
                "ready": q["messages_ready"].as_u64().unwrap_or(0),
                "unacked": q["messages_unacknowledged"].as_u64().unwrap_or(0),
                "consumers": q["consumers"].as_u64().unwrap_or(0),
                "publish_rate": rate(q, "publish"),
                "deliver_rate": rate(q, "deliver_get"),
                "ack_rate": rate(q, "ack"),
            })
        })
        .collect();
    out.sort_by(|a, b| a["queue"].as_str().cmp(&b["queue"].as_str()));
    Ok(out)
}

/// The consumers on the namespace's queues: which machine, which queue, what prefetch.
pub async fn workers(conn: &ConnArgs) -> anyhow::Result<Vec<Value>> {
    let api = Api::new(&conn.rabbitmq_api_url)?;
    let all = api.get("consumers").await?;
    // The name a client gave its connection (taskmill-worker@host:pid) is on the connection.
    let connections = api.get("connections").await?;
    let named: std::collections::HashMap<&str, &str> = connections
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["name"].as_str()?, c["user_provided_name"].as_str()?)))
        .collect();
    let prefix = format!("{}.", conn.namespace);
    // Every worker also consumes the dead-letter events queue (to count dead letters): one
    // row a worker and work queue is what people want to see.
    let events = taskmill_common::topology::Names::new(&conn.namespace).dead_events();
    let mut out: Vec<Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["queue"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&prefix) && n != events)
        })
        .map(|c| {
            let ch = &c["channel_details"];
            let address = ch["connection_name"].as_str().unwrap_or("?");
            json!({
                "connection": named.get(address).copied().unwrap_or(address),
                "host": ch["peer_host"],
                "port": ch["peer_port"],
                "queue": c["queue"]["name"],
                "prefetch": c["prefetch_count"],
                "consumer_tag": c["consumer_tag"],
            })
        })
        .collect();
    out.sort_by(|a, b| a["connection"].as_str().cmp(&b["connection"].as_str()));
    Ok(out)
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
            "{:<40} {:>9} {:>9} {:>10} {:>11} {:>11}\n",
            "QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH/s", "DELIVER/s"
        ));
    }
    for q in &list {
        if args.json {
            out.push_str(&q.to_string());
        } else {
            out.push_str(&format!(
                "{:<40} {:>9} {:>9} {:>10} {:>11.1} {:>11.1}",
                q["queue"].as_str().unwrap_or("?"),
                q["ready"].as_u64().unwrap_or(0),
                q["unacked"].as_u64().unwrap_or(0),
                q["consumers"].as_u64().unwrap_or(0),
                q["publish_rate"].as_f64().unwrap_or(0.0),
                q["deliver_rate"].as_f64().unwrap_or(0.0),
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
