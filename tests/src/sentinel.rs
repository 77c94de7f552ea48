//! Redis with Sentinel, private to a test: a primary, two replicas and three sentinels on free
//! ports (the machine's Redis on 6379 is left alone), each a `redis-server` child of the test
//! with its files in a temp dir; every process is killed and the dir removed on drop, also
//! when the test fails.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::free_port;

/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "tm";

struct Node {
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A primary, two replicas and three sentinels.
pub struct SentinelSet {
    dir: PathBuf,
    /// The data nodes: [0] starts as the primary, the others as its replicas.
    data: Vec<Node>,
    sentinels: Vec<Node>,
}

fn spawn(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed")
}

async fn answers(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    match client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
    {
        Ok(mut con) => redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .is_ok(),
        Err(_) => false,
    }
}

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut con = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?;
    cmd.query_async(&mut con).await
}

impl SentinelSet {
    /// Starts the six processes and waits until every sentinel sees the primary and both
    /// replicas, and the replicas are in sync.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "taskmill-sentinel-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let mut set = Self {
            dir,
            data: Vec::new(),
            sentinels: Vec::new(),
        };
        let primary = free_port();
        for i in 0..3 {
            let port = if i == 0 { primary } else { free_port() };
            let d = set.dir.join(format!("data{i}"));
            std::fs::create_dir_all(&d).expect("data dir");
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                d.to_str().expect("utf-8 dir"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if i > 0 {
                args.extend([
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    primary.to_string(),
                ]);
            }
            set.data.push(Node {
                port,
                child: Some(spawn(&args)),
            });
        }
        for i in 0..3 {
            let port = free_port();
            let conf = set.dir.join(format!("sentinel{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 5000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    set.dir.display()
                ),
            )
            .expect("sentinel config");
            set.sentinels.push(Node {
                port,
                child: Some(spawn(&[
                    conf.to_str().expect("utf-8 path").to_string(),
                    "--sentinel".into(),
                ])),
            });
        }
        // Sentinels find the replicas by INFO every 10 s and each other every 2 s: on a loaded
        // machine that can take a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "the sentinel set did not come up in 60 s"
            );
            if set.ready().await {
                return set;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ready(&self) -> bool {
        for n in self.data.iter().chain(&self.sentinels) {
            if !answers(n.port).await {
                return false;
            }
        }
        for n in &self.data[1..] {
            let info: String = query(n.port, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            if !info.contains("master_link_status:up") {
                return false;
            }
        }
        for s in &self.sentinels {
            let replicas: Vec<redis::Value> =
                query(s.port, redis::cmd("SENTINEL").arg("replicas").arg(MASTER))
                    .await
                    .unwrap_or_default();
            let others: Vec<redis::Value> =
                query(s.port, redis::cmd("SENTINEL").arg("sentinels").arg(MASTER))
                    .await
                    .unwrap_or_default();
            if replicas.len() < 2 || others.len() < 2 {
                return false;
            }
        }
        true
    }

    /// The `redis+sentinel://` URL of the set, with `options` (`wait_replicas=...`) if any.
    pub fn url(&self, options: &str) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let q = if options.is_empty() {
            String::new()
        } else {
            format!("?{options}")
        };
        format!("redis+sentinel://{}/{MASTER}/0{q}", hosts.join(","))
    }

    /// The primary's port as the first sentinel that answers names it.
    pub async fn primary_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            let got: redis::RedisResult<Option<(String, u16)>> = query(
                s.port,
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER),
            )
            .await;
            if let Ok(Some((_, port))) = got {
                return Some(port);
            }
        }
        None
    }

    /// A `redis://` URL of the data node on `port`.
    pub fn node_url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}/0")
    }

    fn data_node(&mut self, port: u16) -> &mut Node {
        self.data
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a data node of this set")
    }

    /// Kills the data node on `port` with SIGKILL.
    pub fn kill(&mut self, port: u16) {
        self.data_node(port).kill();
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the data node on `port`: a stopped replica
    /// acknowledges nothing, as one cut off by the network.
    pub fn pause(&mut self, port: u16, stop: bool) {
        let pid = self.data_node(port).pid().expect("a running node");
        let sig = if stop { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// Cuts both replicas of the primary on `primary` off at the same point: the primary's
    /// writes paused (`CLIENT PAUSE WRITE`) until each replica has everything it had, the
    /// replicas stopped (SIGSTOP), the writes let go. What the primary takes after this
    /// reaches no replica (stopping them one after the other would let the second get writes
    /// the first never sees: `WAIT 1` counts them, and the sentinels may promote the first).
    pub async fn cut_replicas(&mut self, primary: u16) -> Vec<u16> {
        let replicas = self.others(primary);
        // The replicas' offsets as the primary has them, and its own.
        let offsets = || async move {
            let info: String = query(primary, redis::cmd("INFO").arg("replication"))
                .await
                .unwrap_or_default();
            let master = info
                .lines()
                .find_map(|l| l.strip_prefix("master_repl_offset:"))
                .and_then(|v| v.trim().parse::<u64>().ok());
            let theirs: Vec<u64> = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                .filter_map(|l| {
                    l.split(',')
                        .find_map(|kv| kv.strip_prefix("offset="))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .collect();
            (master, theirs, info)
        };
        // After a failover the replicas attach to their new primary one at a time, each with a
        // full copy (which a write pause would hold up): first wait for both.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, theirs, info) = offsets().await;
            if theirs.len() == replicas.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas did not attach: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let paused: redis::RedisResult<String> = query(
            primary,
            redis::cmd("CLIENT").arg("PAUSE").arg(20_000).arg("WRITE"),
        )
        .await;
        assert!(paused.is_ok(), "CLIENT PAUSE: {paused:?}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (master, theirs, info) = offsets().await;
            if master.is_some()
                && theirs.len() == replicas.len()
                && theirs.iter().all(|o| Some(*o) == master)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas did not catch up: {info}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for r in &replicas {
            self.pause(*r, true);
        }
        let unpaused: redis::RedisResult<String> =
            query(primary, redis::cmd("CLIENT").arg("UNPAUSE")).await;
        assert!(unpaused.is_ok(), "CLIENT UNPAUSE: {unpaused:?}");
        replicas
    }

    /// The ports of the data nodes still running other than `port`.
    pub fn others(&self, port: u16) -> Vec<u16> {
        self.data
            .iter()
            .filter(|n| n.port != port && n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Asks the sentinels for a failover (`SENTINEL FAILOVER`): the primary, still running,
    /// becomes a replica, and its clients' writes are answered `READONLY`.
    pub async fn failover(&self) {
        let ok: redis::RedisResult<String> = query(
            self.sentinels[0].port,
            redis::cmd("SENTINEL").arg("failover").arg(MASTER),
        )
        .await;
        assert!(ok.is_ok(), "SENTINEL FAILOVER: {ok:?}");
    }

    /// Waits until the sentinels name a primary other than `old` that says it is one; its
    /// port.
    pub async fn await_new_primary(&self, old: u16, limit: Duration) -> u16 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(port) = self.primary_port().await.filter(|p| *p != old) {
                let role: Vec<redis::Value> =
                    query(port, &redis::cmd("ROLE")).await.unwrap_or_default();
                if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                    return port;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no failover away from 127.0.0.1:{old} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for n in self.data.iter_mut().chain(self.sentinels.iter_mut()) {
            if let Some(pid) = n.pid() {
                // A stopped process must be continued to die of SIGKILL promptly everywhere.
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
