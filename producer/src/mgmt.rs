//! What the RabbitMQ management API says about a namespace: its queues (depths, consumers,
//! rates) and the consumers on them (which machine, which queue, what prefetch). Below the
//! command line's `queues`, `workers` and `namespace delete` and the dashboard. (Not in the
//! client crate, which stays free of an HTTP stack: these are the operator's views.)

use serde_json::{json, Value};
use taskmill_client::{Error, Result};
use taskmill_common::config::redact;

/// A client of the management API (credentials taken from the URL). With several nodes'
/// APIs (comma-separated, one cluster), each request goes to the first that answers, starting
/// with the one that answered last.
pub struct ManagementApi {
    http: reqwest::Client,
    nodes: Vec<Node>,
    /// The node that answered last.
    current: std::sync::atomic::AtomicUsize,
}

/// One node's API: its base URL without credentials, the credentials, and how it is shown.
struct Node {
    base: url::Url,
    user: String,
    password: String,
    shown: String,
}

impl Node {
    fn parse(raw: &str) -> Result<Self> {
        let mut base = url::Url::parse(raw).map_err(|e| {
            Error::Invalid(format!(
                "the RabbitMQ management API URL {} is not a URL: {e}",
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
            shown: base.to_string(),
            base,
            user,
            password,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base.as_str().trim_end_matches('/'))
    }
}

impl ManagementApi {
    /// A client of the API at `raw` (`http://user:password@host:15672/api`, or several such
    /// URLs of one cluster's nodes separated by commas).
    pub fn new(raw: &str) -> Result<Self> {
        let nodes = taskmill_common::url_list(raw)
            .into_iter()
            .map(Node::parse)
            .collect::<Result<Vec<_>>>()?;
        if nodes.is_empty() {
            return Err(Error::Invalid(
                "the RabbitMQ management API URL is empty".into(),
            ));
        }
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| {
                    Error::Broker(format!(
                        "the management API's HTTP client: {}",
                        taskmill_common::error_text(&e)
                    ))
                })?,
            nodes,
            current: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Sends `method path` to the node that answered last, else to each other in turn; the
    /// answer and the node that gave it. Only a node that cannot be reached (or answers 5xx:
    /// a node starting or stopping) moves on to the next.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<(reqwest::Response, &Node)> {
        use std::sync::atomic::Ordering::Relaxed;
        let first = self.current.load(Relaxed);
        let mut failed = None;
        for i in 0..self.nodes.len() {
            let at = (first + i) % self.nodes.len();
            let node = &self.nodes[at];
            let sent = self
                .http
                .request(method.clone(), node.url(path))
                .basic_auth(&node.user, Some(&node.password))
                .send()
                .await;
            match sent {
                Ok(resp) if !resp.status().is_server_error() || i + 1 == self.nodes.len() => {
                    self.current.store(at, Relaxed);
                    return Ok((resp, node));
                }
                Ok(resp) => {
                    failed = Some(format!("{} answered {}", node.shown, resp.status()));
                }
                Err(e) => {
                    failed = Some(format!(
                        "cannot reach the RabbitMQ management API at {}: {} (is the rabbitmq_management plugin enabled?)",
                        node.shown,
                        taskmill_common::error_text(&e)
                    ));
                }
            }
        }
        Err(Error::Broker(failed.unwrap_or_default()))
    }

    /// Deletes `path` (a queue, an exchange); one already gone is fine.
    pub async fn delete(&self, path: &str) -> Result<()> {
        let (resp, node) = self.send(reqwest::Method::DELETE, path).await?;
        let status = resp.status();
        if !status.is_success() && status != reqwest::StatusCode::NOT_FOUND {
            return Err(Error::Broker(format!(
                "the RabbitMQ management API at {} answered {status} to deleting {path}",
                node.shown
            )));
        }
        Ok(())
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let (resp, node) = self.send(reqwest::Method::GET, path).await?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Error::Broker(format!(
                "the RabbitMQ management API at {} refused the credentials of --rabbitmq-api-url",
                node.shown
            )));
        }
        if !status.is_success() {
            return Err(Error::Broker(format!(
                "the RabbitMQ management API at {} answered {status} for {path}",
                node.shown
            )));
        }
        resp.json().await.map_err(|e| {
            Error::Broker(format!(
                "reading the management API's answer: {}",
                taskmill_common::error_text(&e)
            ))
        })
    }
}

fn rate(v: &Value, stat: &str) -> f64 {
    v["message_stats"][format!("{stat}_details")]["rate"]
        .as_f64()
        .unwrap_or(0.0)
}

/// The namespace's queues: ready, unacked, consumers, publish and deliver rates, the node
/// that leads each.
pub async fn queues(api_url: &str, namespace: &str) -> Result<Vec<Value>> {
    let api = ManagementApi::new(api_url)?;
    let all = api.get("queues").await?;
    let prefix = format!("{namespace}.");
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
                // Where the queue's leader runs (a quorum queue's; a classic queue's node).
                "node": if q["leader"].is_string() { &q["leader"] } else { &q["node"] },
            })
        })
        .collect();
    out.sort_by(|a, b| a["queue"].as_str().cmp(&b["queue"].as_str()));
    Ok(out)
}

/// The consumers on the namespace's queues: which machine, which queue, what prefetch.
pub async fn consumers(api_url: &str, namespace: &str) -> Result<Vec<Value>> {
    let api = ManagementApi::new(api_url)?;
    let all = api.get("consumers").await?;
    // The name a client gave its connection (taskmill-worker@host:pid) is on the connection.
    let connections = api.get("connections").await?;
    let named: std::collections::HashMap<&str, &str> = connections
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["name"].as_str()?, c["user_provided_name"].as_str()?)))
        .collect();
    let prefix = format!("{namespace}.");
    // Every worker also consumes the dead-letter events queue (to count dead letters): one
    // row a worker and work queue is what people want to see.
    let events = taskmill_common::topology::Names::new(namespace).dead_events();
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
