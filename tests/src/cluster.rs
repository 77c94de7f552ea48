//! The three-node RabbitMQ cluster of `deploy/scripts/cluster.sh` (nodes `tm1`..`tm3`, AMQP
//! 5681-5683, management 15681-15683), for tests of node loss: started by [`Cluster::up`]
//! (after stopping whatever a killed run left on those ports) and stopped on drop, also when
//! the test fails. The machine's own broker on 5672 is never touched. The ports are fixed, so
//! one test at a time uses it: the tests that do live in one test function.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::workspace_root;

/// A running cluster; `down` on drop.
pub struct Cluster {
    dir: PathBuf,
    http: reqwest::Client,
}

impl Cluster {
    /// Starts the three nodes and joins them (about 30 s); panics when the script fails.
    pub fn up() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "taskmill-cluster-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ));
        let cluster = Self {
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        };
        // Nodes a killed run left behind (found by their ports) go first.
        cluster.script(&["down"]);
        assert!(
            cluster.script(&["up"]),
            "deploy/scripts/cluster.sh up failed"
        );
        cluster
    }

    fn script(&self, args: &[&str]) -> bool {
        script(&self.dir, args)
    }

    /// The AMQP URL listing the three nodes.
    pub fn amqp_url(&self) -> String {
        (1..=3)
            .map(|n| format!("amqp://guest:guest@127.0.0.1:568{n}/%2f"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The management API URL listing the three nodes.
    pub fn api_url(&self) -> String {
        (1..=3)
            .map(|n| format!("http://guest:guest@127.0.0.1:1568{n}/api"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// kill -9 of node `n` (1-3).
    pub fn kill(&self, n: u8) {
        assert!(self.script(&["kill", &n.to_string()]), "killing tm{n}");
    }

    /// Starts node `n` again and waits until it has booted (it rejoins the cluster).
    pub fn start(&self, n: u8) {
        assert!(self.script(&["start", &n.to_string()]), "starting tm{n}");
    }

    /// CPU seconds (user and system) the three nodes have used so far, from their pid files
    /// and `/proc/PID/stat` (a node that is down counts nothing).
    pub fn cpu_seconds(&self) -> f64 {
        (1..=3)
            .filter_map(|n| {
                let pid = std::fs::read_to_string(self.dir.join(format!("n{n}/pid"))).ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).ok()?;
                // Fields after the command (which may hold spaces) in parentheses.
                let rest = stat.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                Some(ticks / 100.0)
            })
            .sum()
    }

    /// Stops RabbitMQ on node `n` as a rolling upgrade does (`stop_app`: its connections are
    /// closed; its VM stays, and [`Cluster::starter`] or `start` brings it back).
    pub fn stop(&self, n: u8) {
        assert!(self.script(&["stop", &n.to_string()]), "stopping tm{n}");
    }

    /// What starts node `n` again and waits until it has booted: to run on a thread of its own
    /// while a job runs.
    pub fn starter(&self, n: u8) -> impl FnOnce() + Send + 'static {
        let dir = self.dir.clone();
        move || assert!(script(&dir, &["start", &n.to_string()]), "starting tm{n}")
    }

    /// `GET path` of the management API from the first node that answers.
    pub async fn api(&self, path: &str) -> Option<Value> {
        for n in 1..=3 {
            let got = self
                .http
                .get(format!("http://127.0.0.1:1568{n}/api/{path}"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await;
            if let Ok(resp) = got {
                if resp.status().is_success() {
                    if let Ok(v) = resp.json().await {
                        return Some(v);
                    }
                }
            }
        }
        None
    }

    /// Deletes the cluster's queues whose names start with `prefix` (a namespace's: the test
    /// kit's cleanup talks to the machine's own broker). Quorum queues left behind would count
    /// in where the leader policy puts the next ones.
    pub async fn delete_queues(&self, prefix: &str) {
        let Some(Value::Array(queues)) = self.api("queues").await else {
            return;
        };
        for q in queues {
            let Some(name) = q["name"].as_str().filter(|n| n.starts_with(prefix)) else {
                continue;
            };
            for n in 1..=3 {
                let deleted = self
                    .http
                    .delete(format!("http://127.0.0.1:1568{n}/api/queues/%2f/{name}"))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success() || r.status().as_u16() == 404);
                if deleted {
                    break;
                }
            }
        }
    }

    /// The node (1-3) that leads quorum queue `queue`.
    pub async fn leader(&self, queue: &str) -> Option<u8> {
        let q = self.api(&format!("queues/%2f/{queue}")).await?;
        node_number(q["leader"].as_str().or(q["node"].as_str())?)
    }

    /// The connections whose name starts with `name`: each one's name and node (1-3), as
    /// the management API lists them (a few seconds after they open).
    pub async fn connections(&self, name: &str) -> Vec<(String, u8)> {
        let Some(Value::Array(conns)) = self.api("connections").await else {
            return Vec::new();
        };
        let mut found: Vec<(String, u8)> = conns
            .iter()
            .filter_map(|c| {
                let named = c["client_properties"]["connection_name"].as_str()?;
                let node = node_number(c["node"].as_str()?)?;
                named.starts_with(name).then(|| (named.to_string(), node))
            })
            .collect();
        found.sort();
        found
    }
}

/// `deploy/scripts/cluster.sh ARGS DIR`: whether it succeeded.
fn script(dir: &std::path::Path, args: &[&str]) -> bool {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("deploy/scripts/cluster.sh"));
    cmd.args(args);
    cmd.arg(dir);
    cmd.stdout(Stdio::null());
    cmd.status().is_ok_and(|s| s.success())
}

/// `tmN@localhost` → N.
fn node_number(node: &str) -> Option<u8> {
    node.strip_prefix("tm")?.split('@').next()?.parse().ok()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test keeps the nodes' logs (the directory goes with `down`).
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!(
                "taskmill-cluster-logs-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..10]
            ));
            for n in 1..=3 {
                let _ = std::fs::create_dir_all(keep.join(format!("n{n}")));
                let _ = Command::new("cp")
                    .arg("-r")
                    .arg(self.dir.join(format!("n{n}/log")))
                    .arg(keep.join(format!("n{n}")))
                    .status();
            }
            eprintln!("the cluster's logs: {}", keep.display());
        }
        self.script(&["down"]);
    }
}
