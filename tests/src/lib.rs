//! taskmill-tests: the test kit the integration tests (and the benchmark) share.
//!
//! # Layout
//! - [`sample`]: deterministic sample posts and a local HTTP server for them.
//! - [`broker`]: a private RabbitMQ node that a test can put under a memory alarm.
//! - [`proxy`]: a TCP proxy that cuts and restores connections.
//! - [`redis_server`]: a private redis-server that a test can kill and restart.
//! - [`TestNs`]: a fresh namespace per test, with helpers to run workers and clean up.

pub mod broker;
pub mod cluster;
pub mod proxy;
pub mod redis_server;
pub mod sentinel;

/// Deterministic sample posts and their HTTP server (the `taskmill-sample-server` crate).
pub use taskmill_sample_server as sample;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use taskmill_common::{
    config::ConnArgs,
    store::{JobStatus, Store},
    task::Registry,
};
use taskmill_worker::{Stats, WorkerArgs};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Prefix of every test namespace, so that leftovers are easy to find and remove.
pub const TEST_PREFIX: &str = "tmt-";

/// A namespace of its own for one test. Its queues, exchanges and keys are deleted by
/// [`TestNs::cleanup`], or when it is dropped without that (a failing test leaks nothing).
pub struct TestNs {
    /// The namespace.
    pub ns: String,
    cleaned: std::sync::atomic::AtomicBool,
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if self.cleaned.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // Drop cannot await: clean up on a thread of its own with a runtime of its own.
        let ns = self.ns.clone();
        let cleaner = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup_namespace(&ns));
            }
        });
        let _ = cleaner.join();
    }
}

/// A worker running inside the test process.
pub struct RunningWorker {
    /// Cancel to make it drain and stop.
    pub shutdown: CancellationToken,
    /// What it counted.
    pub stats: Arc<Stats>,
    /// Its task.
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// Asks the worker to drain and waits until it stopped.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await?
    }
}

impl Default for TestNs {
    fn default() -> Self {
        Self::new()
    }
}

impl TestNs {
    /// A fresh namespace.
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        // Random first (tests take tags from it), then when it was made (seconds, hex), so
        // that `tmt-cleanup` can tell a failed run's leftovers from a running run's.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            ns: format!("{TEST_PREFIX}{}{:08x}", &id[..12], secs as u32),
            cleaned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Connection settings for this namespace on the local services.
    pub fn conn(&self) -> ConnArgs {
        ConnArgs::local(&self.ns)
    }

    /// Worker settings for this namespace.
    pub fn worker_args(&self) -> WorkerArgs {
        let mut a = WorkerArgs::local(&self.ns);
        a.threads = 2;
        a
    }

    /// The Redis store of this namespace.
    pub async fn store(&self) -> Store {
        Store::connect(&self.conn().redis_url, &self.ns, 3600)
            .await
            .expect("Redis on 127.0.0.1:6379")
    }

    /// Starts a worker with the built-in tasks.
    pub fn spawn_worker(&self, args: WorkerArgs) -> RunningWorker {
        self.spawn_worker_with(args, taskmill_common::tasks::builtin())
    }

    /// Starts a worker with the given tasks.
    pub fn spawn_worker_with(&self, args: WorkerArgs, registry: Registry) -> RunningWorker {
        let shutdown = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let handle = tokio::spawn(taskmill_worker::run_with_stats(
            args,
            registry,
            shutdown.clone(),
            stats.clone(),
        ));
        RunningWorker {
            shutdown,
            stats,
            handle,
        }
    }

    /// Waits until the job is finished; panics after `limit` (a hung test, not a timing check).
    pub async fn wait_finished(&self, store: &Store, job: &str, limit: Duration) -> JobStatus {
        match job_finished(store, job, limit).await {
            Ok(s) => s,
            // Where the batches are, before the test's cleanup deletes the evidence.
            Err(e) => panic!("{e}\nqueues now:\n{}", queue_snapshot(&self.ns).await),
        }
    }

    /// Deletes this namespace's queues, exchanges and Redis keys.
    pub async fn cleanup(&self) {
        cleanup_namespace(&self.ns).await;
        self.cleaned
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A line a queue whose name starts with `prefix`: ready, unacked and consumers (management
/// API), to say where a stalled job's batches wait.
pub async fn queue_snapshot(prefix: &str) -> String {
    let Ok(list) = mgmt::Client::new().get_json("/api/queues/%2f").await else {
        return "(the management API did not answer)".into();
    };
    let mut lines: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|q| {
            format!(
                "{}: ready {}, unacked {}, consumers {}",
                q["name"].as_str().unwrap_or("?"),
                q["messages_ready"],
                q["messages_unacknowledged"],
                q["consumers"]
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Deletes every queue and exchange whose name starts with `prefix` (through the management
/// API) and every Redis key under it.
pub async fn cleanup_namespace(prefix: &str) {
    let client = mgmt::Client::new();
    for kind in ["queues", "exchanges"] {
        let Ok(list) = client.get_json(&format!("/api/{kind}/%2f")).await else {
            continue;
        };
        for item in list.as_array().into_iter().flatten() {
            let Some(name) = item["name"].as_str() else {
                continue;
            };
            if name.starts_with(prefix) {
                let _ = client
                    .delete(&format!("/api/{kind}/%2f/{}", urlencode(name)))
                    .await;
            }
        }
    }
    if let Ok(client) = redis::Client::open("redis://127.0.0.1:6379/0") {
        if let Ok(mut con) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut con)
                .await
                .unwrap_or_default();
            for chunk in keys.chunks(500) {
                let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(&mut con).await;
            }
        }
    }
}

/// When test namespace `ns` was made (seconds since the epoch), read from its name; None for
/// a name that does not carry it (made by an older test kit).
fn made_at(ns: &str) -> Option<u64> {
    let rest = ns.strip_prefix(TEST_PREFIX)?;
    (rest.len() == 20)
        .then(|| u64::from_str_radix(&rest[12..], 16).ok())
        .flatten()
}

/// Deletes the test namespaces (broker objects and Redis keys under `tmt-`) made longer than
/// `older_than` ago, and those whose name does not say when: what failed runs left behind,
/// never the namespaces of a run still going on beside this one.
pub async fn cleanup_stale(older_than: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stale = |ns: &str| made_at(ns).is_none_or(|t| now.saturating_sub(t) > older_than.as_secs());
    let mut namespaces = std::collections::BTreeSet::new();
    let client = mgmt::Client::new();
    for kind in ["queues", "exchanges"] {
        if let Ok(list) = client.get_json(&format!("/api/{kind}/%2f")).await {
            for item in list.as_array().into_iter().flatten() {
                if let Some(name) = item["name"].as_str().filter(|n| n.starts_with(TEST_PREFIX)) {
                    namespaces.insert(name.split('.').next().unwrap_or(name).to_string());
                }
            }
        }
    }
    if let Ok(client) = redis::Client::open("redis://127.0.0.1:6379/0") {
        if let Ok(mut con) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{TEST_PREFIX}*"))
                .query_async(&mut con)
                .await
                .unwrap_or_default();
            for k in keys {
                namespaces.insert(k.split(':').next().unwrap_or(&k).to_string());
            }
        }
    }
    for ns in namespaces.into_iter().filter(|ns| stale(ns)) {
        // The separator too: a namespace is never taken for the prefix of another.
        cleanup_namespace(&format!("{ns}.")).await;
        cleanup_namespace(&format!("{ns}:")).await;
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A minimal client for the RabbitMQ management API on 127.0.0.1:15672 (guest/guest).
pub mod mgmt {
    use serde_json::Value;

    pub struct Client {
        http: reqwest::Client,
    }

    impl Default for Client {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Client {
        pub fn new() -> Self {
            Self {
                http: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(20))
                    .build()
                    .unwrap_or_default(),
            }
        }
        pub async fn get_json(&self, path: &str) -> reqwest::Result<Value> {
            self.http
                .get(format!("http://127.0.0.1:15672{path}"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
        }
        pub async fn put_json(&self, path: &str, body: &Value) -> reqwest::Result<()> {
            self.http
                .put(format!("http://127.0.0.1:15672{path}"))
                .basic_auth("guest", Some("guest"))
                .json(body)
                .send()
                .await?
                .error_for_status()?;
            Ok(())
        }
        pub async fn delete(&self, path: &str) -> reqwest::Result<()> {
            self.http
                .delete(format!("http://127.0.0.1:15672{path}"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await?;
            Ok(())
        }
    }
}

/// Runs the `producer` binary in namespace `ns` (without `RUST_LOG`, so stderr holds only
/// what the command itself says) and returns what it printed.
pub fn producer(ns: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin_path("producer"))
        .args(args)
        .env("TASKMILL_NAMESPACE", ns)
        .env_remove("RUST_LOG")
        .output()
        .expect("running the producer binary")
}

/// Writes posts `1..=n` as JSON Lines into `stdin` from a thread: the first half at once, the
/// second half once `go` is sent (or dropped). Join the thread for the writing's outcome.
pub fn posts_in_two_halves(
    stdin: std::process::ChildStdin,
    n: u64,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<std::io::Result<()>>,
) {
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut stdin = std::io::BufWriter::new(stdin);
        let posts: Vec<String> = sample::posts(n).map(|p| p.to_string()).collect();
        let (first, second) = posts.split_at(posts.len() / 2);
        for line in first {
            writeln!(stdin, "{line}")?;
        }
        stdin.flush()?;
        let _ = gate.recv();
        for line in second {
            writeln!(stdin, "{line}")?;
        }
        stdin.flush()
    });
    (go, writer)
}

/// Waits until a live worker has recorded its tasks in the namespace's catalog.
pub async fn catalog_ready(store: &Store) {
    until("the workers' catalog", Duration::from_secs(30), || async {
        !store.catalog().await.unwrap_or_default().is_empty()
    })
    .await;
}

/// Path of a workspace binary (`producer`, `worker`, `sample-server`) next to the test
/// executable; `cargo build --workspace --bins` puts them there.
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    // A test run straight after a change to the binary's sources would test the old one.
    if let Some(source) = newer_source(&path) {
        panic!(
            "{} is older than {}: run `cargo build --workspace --bins` first (make test does)",
            path.display(),
            source.display()
        );
    }
    path
}

/// A source file of the workspace that changed after `binary` was built, from the dep-info
/// file cargo writes beside it (`{binary}.d`: every source file the binary was built from).
fn newer_source(binary: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let deps = std::fs::read_to_string(binary.with_extension("d")).ok()?;
    let root = workspace_root().canonicalize().ok()?;
    let (_, sources) = deps.split_once(": ")?;
    sources
        .split_whitespace()
        .map(PathBuf::from)
        .filter(|p| p.starts_with(&root))
        .find(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
        })
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Writes records as JSON Lines into a temporary file and returns its path.
pub fn write_jsonl(records: impl IntoIterator<Item = serde_json::Value>) -> std::path::PathBuf {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!(
        "taskmill-test-{}.jsonl",
        uuid::Uuid::new_v4().simple()
    ));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("temp file"));
    for r in records {
        writeln!(f, "{r}").expect("write");
    }
    f.flush().expect("flush");
    path
}

/// Opens a channel on the local broker (for tests that publish or read raw messages).
pub async fn raw_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = taskmill_common::amqp::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "test")
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Messages ready in `queue`, asked of the broker with a passive declare on a channel of its
/// own (a failed one closes its channel); None when the queue does not exist.
pub async fn queue_messages(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    queue_counts(conn, queue)
        .await
        .map(|(messages, _)| messages)
}

/// Consumers on `queue` (full name) now, as a passive declare tells; None when it does not
/// exist.
pub async fn queue_consumers(conn: &lapin::Connection, queue: &str) -> Option<u32> {
    queue_counts(conn, queue)
        .await
        .map(|(_, consumers)| consumers)
}

/// `queue`'s ready messages and consumers (a passive declare on a channel of its own).
async fn queue_counts(conn: &lapin::Connection, queue: &str) -> Option<(u32, u32)> {
    use lapin::{options::QueueDeclareOptions, types::FieldTable};
    let ch = conn.create_channel().await.ok()?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()?;
    let _ = ch.close(200, "done".into()).await;
    Some((q.message_count(), q.consumer_count()))
}

/// Takes every message now in `queue` (basic.get until empty), acking each.
pub async fn drain_queue(ch: &lapin::Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        m.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        out.push(m);
    }
    out
}

/// Polls `cond` every 10 ms until it holds; panics after `limit` (a hung test, not a timing
/// assertion).
pub async fn until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Batches done of a job so far (0 when unknown).
pub async fn batches_done(store: &Store, job: &str) -> u64 {
    store
        .job_status(job)
        .await
        .ok()
        .flatten()
        .map(|s| s.batches_done)
        .unwrap_or(0)
}

/// Waits until at least `n` batches of the job are done (panics after a minute: a hung test).
pub async fn wait_batches_done(store: &Store, job: &str, n: u64) {
    until(
        &format!("{n} batches of {job} done"),
        Duration::from_secs(60),
        || async { batches_done(store, job).await >= n },
    )
    .await;
}

/// Waits until the job is finished, reading it every 20 ms; an error (a Redis that is
/// restarting) is simply read again. Err after `limit`, with the last status read.
pub async fn job_finished(store: &Store, job: &str, limit: Duration) -> anyhow::Result<JobStatus> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = store.job_status(job).await;
        if let Ok(Some(s)) = &status {
            if s.is_finished() {
                return Ok(s.clone());
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() <= deadline,
            "job {job} did not finish within {limit:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to a process; true when `kill` succeeded.
pub fn sigterm(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Names of the broker's queues that start with `prefix` (management API), sorted.
pub async fn broker_queues(prefix: &str) -> Vec<String> {
    let list = mgmt::Client::new()
        .get_json("/api/queues/%2f")
        .await
        .expect("the RabbitMQ management API on 127.0.0.1:15672");
    let mut out: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect();
    out.sort();
    out
}

/// Publishes one message with confirms and waits for the broker's ack.
pub async fn publish_raw(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let _ = ch.confirm_select(ConfirmSelectOptions::default()).await;
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker refused a test message");
}

/// Peak resident memory (VmHWM) of a running process in KiB, 0 when it is gone.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `producer enqueue --file FILE` and the rest of the arguments, in namespace `ns`.
pub fn enqueue_file(ns: &str, file: &Path, rest: &[&str]) -> std::process::Output {
    let file = file.to_string_lossy();
    let args: Vec<&str> = ["enqueue", "--file", &file]
        .iter()
        .copied()
        .chain(rest.iter().copied())
        .collect();
    producer(ns, &args)
}

/// Enqueue options of a chaos job whose every batch is dead-lettered.
pub const ALL_DIE: [&str; 6] = [
    "--task",
    "chaos",
    "--param",
    "fail_rate=1",
    "--param",
    "fail=permanent",
];

/// A new virtualenv under `target/py-{kind}-…`, with `pip install ARGS` run in it (`what`
/// names it in a failure).
fn venv_with(kind: &str, args: &[&std::ffi::OsStr], what: &str) -> PathBuf {
    let dir = workspace_root().join(format!(
        "target/py-{kind}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .expect("python3");
    assert!(ok.success(), "python3 -m venv failed");
    let out = Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(args)
        .output()
        .expect("pip");
    assert!(
        out.status.success(),
        "pip install {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Runs `code` with the virtualenv's Python (`python -c`) in namespace `ns`, with `RECORDS`
/// set to `records` when given; its stdout as one JSON value (the script's exit and stderr
/// are checked first).
pub fn run_python(venv: &Path, code: &str, ns: &str, records: Option<&Path>) -> serde_json::Value {
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.args(["-c", code]).env("TASKMILL_NAMESPACE", ns);
    if let Some(r) = records {
        cmd.env("RECORDS", r);
    }
    let out = cmd.output().expect("running python");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A fresh virtualenv with the client installed by pip, as a user would.
pub fn python_venv() -> PathBuf {
    // pip builds a local project in place (build/, *.egg-info): install from a copy so that
    // the source tree stays as it is.
    let src =
        std::env::temp_dir().join(format!("taskmill-py-src-{}", uuid::Uuid::new_v4().simple()));
    let copied = Command::new("cp")
        .arg("-r")
        .arg(workspace_root().join("clients/python"))
        .arg(&src)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying clients/python failed");
    let constraints = workspace_root().join("clients/python/test-constraints.txt");
    let dir = venv_with(
        "client",
        &["-c".as_ref(), constraints.as_os_str(), src.as_os_str()],
        "./clients/python",
    );
    let _ = std::fs::remove_dir_all(&src);
    dir
}

/// A fresh virtualenv with Celery installed by pip (`tests/celery/requirements.txt`), as a
/// Celery shop's app has it.
pub fn celery_venv() -> PathBuf {
    let requirements = workspace_root().join("tests/celery/requirements.txt");
    venv_with(
        "celery",
        &["-r".as_ref(), requirements.as_os_str()],
        "celery",
    )
}

/// `POST /api/jobs` with `body` to the dashboard at `dash_url`; the answer's status code.
pub async fn post_job(dash_url: &str, body: &serde_json::Value) -> u16 {
    reqwest::Client::new()
        .post(format!("{dash_url}api/jobs"))
        .body(body.to_string())
        .send()
        .await
        .expect("the dashboard answers")
        .status()
        .as_u16()
}

/// A running `producer dashboard` and its URL (it listens on a free port and prints it).
pub struct Dashboard {
    /// The process.
    pub child: Child,
    /// Where it serves, `http://127.0.0.1:PORT/`.
    pub url: String,
}

impl Dashboard {
    /// Starts `producer dashboard` on a free loopback port in namespace `ns`.
    pub fn start(ns: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(bin_path("producer"))
            .args([
                "dashboard",
                "--listen",
                "127.0.0.1:0",
                "--sample-seconds",
                "1",
            ])
            .args(extra)
            .env("TASKMILL_NAMESPACE", ns)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("running producer dashboard");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the dashboard's first line");
        assert!(line.starts_with("http://127.0.0.1:"), "{line:?}");
        Self {
            child,
            url: line.trim().to_string(),
        }
    }

    /// Stops it with SIGTERM; it exits 0.
    pub fn stop(mut self) {
        assert!(sigterm(self.child.id()));
        assert_eq!(self.child.wait().expect("wait").code(), Some(0));
    }
}

impl Drop for Dashboard {
    /// A failing test does not leave it running (after `stop` it has exited already).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `producer` binary in namespace `ns` like [`producer`], failing the test when it
/// has not ended after `limit` (a hung command, not a timing check: it is killed first).
pub fn producer_within(ns: &str, args: &[&str], limit: Duration) -> std::process::Output {
    let mut child = Command::new(bin_path("producer"))
        .args(args)
        .env("TASKMILL_NAMESPACE", ns)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the producer binary");
    // Read both pipes on threads, so that a full pipe cannot stall the command.
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out_pipe, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err_pipe, &mut v);
        v
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the producer") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("producer {args:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A task that counts its records (`{"records": n}`) and folds to `{"batches": n}`, under a
/// name of the test's choosing: the task some workers have and others lack.
pub struct CountingTask(pub &'static str);

impl taskmill_common::task::Task for CountingTask {
    fn name(&self) -> &'static str {
        self.0
    }
    fn run(
        &self,
        _: &taskmill_common::task::TaskContext<'_>,
        records: &[serde_json::Value],
    ) -> Result<taskmill_common::task::TaskOutput, taskmill_common::task::TaskError> {
        Ok(taskmill_common::task::TaskOutput {
            result: serde_json::json!({"records": records.len()}),
            records_done: records.len() as u64,
            records_invalid: 0,
        })
    }
    fn aggregate(&self, results: &[serde_json::Value]) -> serde_json::Value {
        serde_json::json!({"batches": results.len()})
    }
}

/// A connection to the local Redis (127.0.0.1:6379, db 0), for tests that read or edit keys
/// by hand.
pub async fn redis_con() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379/0")
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379")
}

/// Gives back (nack, requeue) every message taken on `ch` and not acked yet.
pub async fn nack_all(ch: &lapin::Channel) {
    use lapin::options::BasicNackOptions;
    let all = BasicNackOptions {
        multiple: true,
        requeue: true,
    };
    ch.basic_nack(0, all).await.expect("basic.nack");
}

/// A child process killed (and reaped) when dropped, so that a failing test leaves no worker
/// running; one that ended already is left alone.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl KillOnDrop {
    /// Waits (without holding a tokio thread) until the process exits, at most `limit`:
    /// its exit code (None for a signal), or Err when it still runs (it is killed on drop).
    pub async fn exit_within(mut self, limit: Duration) -> Result<Option<i32>, String> {
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + limit;
            while std::time::Instant::now() < deadline {
                if let Some(status) = self.0.try_wait().map_err(|e| e.to_string())? {
                    return Ok(status.code());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(format!("still running after {limit:?}"))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// A binary of the workspace run with its stderr in a temporary file (read while it runs,
/// removed when this is dropped), killed when dropped: the scenario tests' workers and
/// producers, given the environment that points them at a cluster or a Sentinel set.
pub struct Logged {
    pub process: KillOnDrop,
    stderr: std::path::PathBuf,
}

impl Logged {
    /// Starts `bin` with `args` in namespace `ns`, with `env` added, stdin as given and stdout
    /// discarded.
    pub fn spawn(ns: &str, bin: &str, args: &[&str], env: &[(&str, String)], stdin: Stdio) -> Self {
        let stderr = std::env::temp_dir().join(format!(
            "taskmill-{bin}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&stderr).expect("a log file");
        let process = KillOnDrop(
            Command::new(bin_path(bin))
                .args(args)
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("TASKMILL_NAMESPACE", ns)
                .stdin(stdin)
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {bin}: {e}")),
        );
        Self { process, stderr }
    }

    /// What it has written to stderr so far.
    pub fn said(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for it to exit (blocking); its exit status and what it said.
    pub fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.process.0.wait().expect("waiting for a child");
        (status, self.said())
    }

    /// Waits without blocking the runtime's threads.
    pub async fn exited(self) -> (std::process::ExitStatus, String) {
        tokio::task::spawn_blocking(move || self.wait())
            .await
            .expect("the waiting thread")
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.stderr);
    }
}

#[cfg(test)]
mod kit_tests {
    use super::made_at;

    #[test]
    fn a_test_namespace_says_when_it_was_made() {
        assert_eq!(made_at("tmt-0123456789ab6565a1f0"), Some(0x6565_a1f0));
        // Made by an older kit, or not a test namespace at all.
        assert_eq!(made_at("tmt-0123456789ab"), None);
        assert_eq!(made_at("taskmill"), None);
    }
}
