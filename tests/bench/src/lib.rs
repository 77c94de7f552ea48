//! The benchmark harness: taskmill against the broker's own limit, on this machine.
//!
//! Every workload runs in a fresh namespace with the release `worker` (and `producer`) as
//! separate processes, like in production. CPU time and peak RSS of each process are read from
//! `/proc` (utime+stime of the exited process before it is reaped; `VmHWM` while it runs).

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{FutureExt, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use serde_json::{json, Value};
use taskmill_common::{
    amqp::batch_properties_of,
    envelope::{encode, encode_records, Envelope, Record, FORMAT_VERSION},
    now_ms,
    store::{NewJob, PublishTotals, Store},
    task::{Records, TaskContext},
    topology::{self, Names},
};

use taskmill_sample_server as sample;
use taskmill_tests as kit;

/// CPU seconds and peak memory of one process.
#[derive(Debug, Clone, Default)]
pub struct ProcStats {
    /// User + system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size, MiB.
    pub peak_rss_mib: f64,
    /// Context switches of all its threads (voluntary: it waited; involuntary: it was
    /// preempted), as last seen before it exited.
    pub ctxt: (u64, u64),
    /// The same by thread name (`/proc/PID/task/TID/comm`: the main thread, `lapin-io-loop`,
    /// the analysis pumps...), summed over the threads of a name: which hops cost the switches.
    pub ctxt_by_thread: std::collections::BTreeMap<String, (u64, u64)>,
}

/// A thread's name and its voluntary and involuntary context switches.
type ThreadCtxt = (String, u64, u64);

/// A child process whose CPU and peak RSS are watched through /proc.
pub struct Watched {
    child: Child,
    peak_kb: Arc<AtomicU64>,
    /// Thread id → (name, voluntary, involuntary), as last seen.
    threads: Arc<std::sync::Mutex<std::collections::HashMap<String, ThreadCtxt>>>,
}

/// Voluntary and involuntary context switches of every thread of `pid` now (the sum over
/// `/proc/PID/task/*/status`), None once it is gone. A thread that ended takes its own with it:
/// taskmill's threads live as long as the process.
pub fn proc_ctxt(pid: u32) -> Option<(u64, u64)> {
    let threads = proc_thread_ctxt(pid)?;
    Some(
        threads
            .iter()
            .fold((0, 0), |(v, i), (_, (_, tv, ti))| (v + tv, i + ti)),
    )
}

/// Every thread of `pid` now: thread id → (its name, voluntary and involuntary context
/// switches); None once the process is gone.
fn proc_thread_ctxt(pid: u32) -> Option<Vec<(String, ThreadCtxt)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        out.push((
            t.file_name().to_string_lossy().into_owned(),
            (
                name.trim().to_string(),
                field("voluntary_ctxt_switches:"),
                field("nonvoluntary_ctxt_switches:"),
            ),
        ));
    }
    Some(out)
}

fn proc_cpu_and_state(pid: u32) -> Option<(char, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3 of stat, utime 14 and stime 15 (1-based).
    let state = f.first()?.chars().next()?;
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((state, ticks / 100.0))
}

fn proc_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Watched {
    /// Spawns `cmd` and starts watching it.
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd.spawn().context("starting a benchmark process")?;
        let pid = child.id();
        let peak_kb = Arc::new(AtomicU64::new(0));
        let threads: Arc<std::sync::Mutex<std::collections::HashMap<_, _>>> = Arc::default();
        let (peak, seen) = (peak_kb.clone(), threads.clone());
        std::thread::spawn(move || loop {
            match proc_hwm_kb(pid) {
                Some(kb) => {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                None => return,
            }
            if let Some(now) = proc_thread_ctxt(pid) {
                // A thread that ended keeps its last figures here.
                seen.lock().unwrap_or_else(|e| e.into_inner()).extend(now);
            }
            std::thread::sleep(Duration::from_millis(20));
        });
        Ok(Self {
            child,
            peak_kb,
            threads,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        kit::sigterm(self.pid());
    }

    /// Waits for the process to exit and returns its figures and exit success.
    pub fn finish(
        mut self,
    ) -> anyhow::Result<(ProcStats, bool, Option<std::process::ChildStderr>)> {
        let pid = self.pid();
        // Until reaped, an exited process stays a zombie whose stat keeps its CPU times.
        let cpu = loop {
            match proc_cpu_and_state(pid) {
                Some(('Z', cpu)) => break cpu,
                Some(_) => std::thread::sleep(Duration::from_millis(5)),
                None => break 0.0,
            }
        };
        let stderr = self.child.stderr.take();
        let status = self.child.wait()?;
        let mut ctxt = (0, 0);
        let mut ctxt_by_thread = std::collections::BTreeMap::new();
        // Threads of one name (lapin's I/O thread of each connection, the analysis threads,
        // whose names the kernel cuts at 15 bytes) apart, numbered in the order they started.
        let mut threads: Vec<(u64, ThreadCtxt)> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(tid, t)| (tid.parse().unwrap_or(0), t.clone()))
            .collect();
        threads.sort_by_key(|(tid, _)| *tid);
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        let many: std::collections::HashSet<String> = threads
            .iter()
            .filter(|(_, (n, ..))| threads.iter().filter(|(_, (m, ..))| m == n).count() > 1)
            .map(|(_, (n, ..))| n.clone())
            .collect();
        for (_, (name, v, i)) in threads {
            ctxt = (ctxt.0 + v, ctxt.1 + i);
            let key = if many.contains(&name) {
                let k = seen.entry(name.clone()).or_default();
                *k += 1;
                format!("{name}#{k}")
            } else {
                name
            };
            ctxt_by_thread.insert(key, (v, i));
        }
        Ok((
            ProcStats {
                cpu_s: cpu,
                peak_rss_mib: self.peak_kb.load(Ordering::Relaxed) as f64 / 1024.0,
                ctxt,
                ctxt_by_thread,
            },
            status.success(),
            stderr,
        ))
    }
}

/// Where the release binaries are.
pub fn release_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().map(|d| d.join(name)).unwrap_or_default()
}

/// Posts `1..=n` as a JSON Lines file, generated once and kept.
pub fn posts_file(dir: &Path, n: u64) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("posts-{n}.jsonl"));
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for p in sample::posts(n) {
            writeln!(f, "{p}")?;
        }
        f.flush()?;
        drop(f);
        std::fs::rename(tmp, &path)?;
    }
    Ok(path)
}

fn bench_ns(name: &str) -> String {
    format!(
        "bench-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A worker process on namespace `ns`, serving its `/stats` on a free loopback port.
fn start_worker(ns: &str, threads: usize, prefetch: Option<u16>) -> anyhow::Result<(Watched, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = Command::new(release_bin("worker"));
    cmd.env("TASKMILL_NAMESPACE", ns)
        .env("TASKMILL_THREADS", threads.to_string())
        .env("TASKMILL_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = prefetch {
        cmd.env("TASKMILL_PREFETCH", p.to_string());
    }
    let watched = Watched::spawn(&mut cmd)?;
    Ok((watched, port))
}

/// The worker's own figures (counters, exact latency quantiles) from its `/stats`.
async fn worker_stats(port: u16) -> anyhow::Result<Value> {
    Ok(reqwest::get(format!("http://127.0.0.1:{port}/stats"))
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn wait_consumers(ns: &str, queue: &str) -> anyhow::Result<()> {
    wait_queue_consumers(&format!("{ns}.{queue}")).await
}

/// How long a benchmark job may take before the harness gives up on it.
const JOB_LIMIT: Duration = Duration::from_secs(600);

/// Figures of one end-to-end run.
#[derive(Debug, Clone, Default)]
pub struct RunFigures {
    /// Records.
    pub records: u64,
    /// Batches.
    pub batches: u64,
    /// Seconds from the producer's start to the last result stored.
    pub seconds: f64,
    /// Producer process.
    pub producer: ProcStats,
    /// Worker process.
    pub worker: ProcStats,
    /// CPU seconds the broker (the Erlang VM) spent during the run.
    pub broker_cpu_s: f64,
    /// CPU seconds Redis spent during the run.
    pub redis_cpu_s: f64,
}

impl RunFigures {
    /// Records a second.
    pub fn records_per_s(&self) -> f64 {
        self.records as f64 / self.seconds
    }
    /// Batches a second.
    pub fn batches_per_s(&self) -> f64 {
        self.batches as f64 / self.seconds
    }
    /// As JSON.
    pub fn to_json(&self) -> Value {
        let per_k = |cpu: f64| cpu / self.batches.max(1) as f64 * 1000.0;
        json!({
            "records": self.records, "batches": self.batches, "seconds": self.seconds,
            "records_per_s": self.records_per_s(), "batches_per_s": self.batches_per_s(),
            "producer_cpu_s_per_1000_batches": per_k(self.producer.cpu_s),
            "broker_cpu_s_per_1000_batches": per_k(self.broker_cpu_s),
            "redis_cpu_s_per_1000_batches": per_k(self.redis_cpu_s),
            "worker_cpu_s_per_1000_batches": per_k(self.worker.cpu_s),
            "producer_peak_rss_mib": self.producer.peak_rss_mib,
            "worker_peak_rss_mib": self.worker.peak_rss_mib,
            "producer_ctxt_per_1000_batches": self.ctxt_per_k(self.producer.ctxt),
            "worker_ctxt_per_1000_batches": self.ctxt_per_k(self.worker.ctxt),
            "producer_ctxt_by_thread_per_1000_batches": self.by_thread(&self.producer),
            "worker_ctxt_by_thread_per_1000_batches": self.by_thread(&self.worker),
        })
    }
    /// Context switches a 1,000 batches by thread name.
    fn by_thread(&self, p: &ProcStats) -> Value {
        p.ctxt_by_thread
            .iter()
            .map(|(name, c)| (name.clone(), self.ctxt_per_k(*c)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
    /// Context switches a 1,000 batches, voluntary and involuntary.
    fn ctxt_per_k(&self, (v, i): (u64, u64)) -> Value {
        let per_k = |n: u64| n as f64 / self.batches.max(1) as f64 * 1000.0;
        json!({"voluntary": per_k(v), "involuntary": per_k(i)})
    }
}

/// Waits (at most 30 s) until the broker has been nearly idle (under a tenth of a core) for
/// half a second: what a run leaves behind (queue deletions, log compaction, stats) must not
/// be billed to the next one. Returns the seconds waited.
pub async fn quiesce() -> f64 {
    let started = Instant::now();
    let mut last = broker_cpu_s();
    while started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = broker_cpu_s();
        if now - last < 0.05 {
            break;
        }
        last = now;
    }
    started.elapsed().as_secs_f64()
}

/// CPU seconds the RabbitMQ node (its Erlang VM, `beam.smp`) has used so far; 0 when it
/// cannot be found. Read before and after a run, the difference is the broker's cost of it.
pub fn broker_cpu_s() -> f64 {
    service_cpu_s(|c| c.contains("beam.smp") && c.contains("rabbit"))
}

/// CPU seconds the Redis server on this machine has used so far (0 when not found).
pub fn redis_cpu_s() -> f64 {
    service_cpu_s(|c| c.contains("redis-server") && c.contains("6379"))
}

/// CPU seconds this process has used so far.
pub fn own_cpu_s() -> f64 {
    proc_cpu_and_state(std::process::id()).map_or(0.0, |(_, cpu)| cpu)
}

/// CPU seconds of the oldest process whose command line `is_it` recognises.
fn service_cpu_s(is_it: impl Fn(&str) -> bool) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut beams: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| is_it(&String::from_utf8_lossy(&c).replace('\0', " ")))
        })
        .collect();
    // The machine's own node (started first), not a test's private one.
    beams.sort();
    beams
        .first()
        .and_then(|pid| proc_cpu_and_state(*pid))
        .map_or(0.0, |(_, cpu)| cpu)
}

/// One job through the producer and one worker process (all cores), the worker with its
/// default flags unless `prefetch` is given.
pub async fn end_to_end(
    file: &Path,
    batch_size: usize,
    task: &str,
    params: &[&str],
    prefetch: Option<u16>,
) -> anyhow::Result<RunFigures> {
    let ns = bench_ns("e2e");
    let (worker, _) = start_worker(&ns, 0, prefetch)?;
    wait_consumers(&ns, "tasks").await?;
    quiesce().await;
    let broker_before = broker_cpu_s();
    let redis_before = redis_cpu_s();
    let spawned_ms = now_ms();
    let job = "bench";
    let mut cmd = Command::new(release_bin("producer"));
    cmd.env("TASKMILL_NAMESPACE", &ns)
        .args(["enqueue", "--file"])
        .arg(file)
        .args([
            "--batch-size",
            &batch_size.to_string(),
            "--task",
            task,
            "--job",
            job,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for p in params {
        cmd.args(["--param", p]);
    }
    let producer = Watched::spawn(&mut cmd)?;
    let store = Store::connect("redis://127.0.0.1:6379/0", &ns, 3600).await?;
    let (pstats, ok, _) = tokio::task::spawn_blocking(move || producer.finish()).await??;
    anyhow::ensure!(ok, "the producer failed");
    let status = kit::job_finished(&store, job, JOB_LIMIT).await?;
    worker.term();
    let (wstats, _, _) = tokio::task::spawn_blocking(move || worker.finish()).await??;
    anyhow::ensure!(
        status.state() == "completed",
        "the job ended {}",
        status.state()
    );
    let broker_cpu_s = broker_cpu_s() - broker_before;
    let redis_cpu_s = redis_cpu_s() - redis_before;
    let figures = RunFigures {
        records: status.records_done,
        batches: status.batches_done,
        seconds: status.finished_ms.unwrap_or(0).saturating_sub(spawned_ms) as f64 / 1000.0,
        producer: pstats,
        worker: wstats,
        broker_cpu_s,
        redis_cpu_s,
    };
    kit::cleanup_namespace(&ns).await;
    Ok(figures)
}

/// The bodies of the throughput workload's messages: `n` posts in batches of `size`.
fn bodies(n: u64, size: usize) -> Vec<(String, Vec<u8>)> {
    let posts: Vec<Value> = sample::posts(n).collect();
    posts
        .chunks(size)
        .enumerate()
        .map(|(i, c)| {
            let e = Envelope {
                v: FORMAT_VERSION,
                job: "raw".into(),
                batch: i as u64,
                task: "post-stats".into(),
                params: BTreeMap::new(),
                records: c.to_vec(),
                created_ms: now_ms(),
            };
            (e.message_id(), encode(&e))
        })
        .collect()
}

/// A quorum queue of its own for the bare round trip, with a confirm-mode publishing channel
/// and a consumer on another connection.
struct RawQueue {
    queue: String,
    pconn: lapin::Connection,
    cconn: lapin::Connection,
    pch: lapin::Channel,
}

/// The broker the harness measures.
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A consumer of `queue` with `prefetch` on a channel of its own on `conn`.
async fn bare_consumer(
    conn: &lapin::Connection,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<lapin::Consumer> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    Ok(ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

impl RawQueue {
    /// The queue and its consumer.
    async fn open(name: &str, prefetch: u16) -> anyhow::Result<(Self, lapin::Consumer)> {
        let raw = Self::declare(name).await?;
        let consumer = bare_consumer(&raw.cconn, &raw.queue, prefetch).await?;
        Ok((raw, consumer))
    }

    /// The queue, no consumer yet.
    async fn declare(name: &str) -> anyhow::Result<Self> {
        let queue = format!("{}.{name}", bench_ns(name));
        let pconn = taskmill_common::amqp::connect(AMQP_URL, &format!("bench-{name}-pub")).await?;
        let cconn = taskmill_common::amqp::connect(AMQP_URL, &format!("bench-{name}-con")).await?;
        let pch = pconn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        if std::env::var("XP_QARGS").is_ok() {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("nowhere")),
            );
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(10));
        }
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        pch.queue_declare(queue.as_str().into(), opts, args).await?;
        pch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self {
            queue,
            pconn,
            cconn,
            pch,
        })
    }

    /// Publishes `msgs` (message id, body) with at most `window` confirms outstanding, and
    /// waits for the last confirms.
    async fn publish_all(
        &self,
        msgs: &[(String, Vec<u8>)],
        window: usize,
        props: impl Fn(&str) -> BasicProperties,
    ) -> anyhow::Result<()> {
        let mut in_flight = std::collections::VecDeque::new();
        for (id, body) in msgs {
            in_flight.push_back(self.publish(body, props(id)).await?);
            if in_flight.len() >= window {
                if let Some(c) = in_flight.pop_front() {
                    c.await?;
                }
            }
        }
        for c in in_flight {
            c.await?;
        }
        Ok(())
    }

    /// Publishes one persistent message to the queue (default exchange).
    async fn publish(
        &self,
        body: &[u8],
        props: BasicProperties,
    ) -> lapin::Result<lapin::PublisherConfirm> {
        self.pch
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: std::env::var("XP_MANDATORY").is_ok(),
                    ..BasicPublishOptions::default()
                },
                body,
                props.with_delivery_mode(2),
            )
            .await
    }

    /// Deletes the queue and its Redis keys, and closes the connections.
    async fn close(self) -> anyhow::Result<()> {
        self.pch
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let _ = self.pconn.close(200, "done".into()).await;
        let _ = self.cconn.close(200, "done".into()).await;
        kit::cleanup_namespace(&self.queue).await;
        Ok(())
    }
}

/// The consuming side of the bare round trip: for `n` messages, one pipelined Redis `SET`
/// (of `value`) a message, then one multiple ack a group; `stored` sees each group (with the
/// time it was stored, ms) once Redis said OK.
/// Ack frames the bare consumers sent (a diagnostic).
pub static RAW_ACKS: AtomicU64 = AtomicU64::new(0);

async fn consume_raw(
    mut consumer: lapin::Consumer,
    n: u64,
    key_prefix: String,
    value: String,
    mut stored: impl FnMut(u64, &[lapin::message::Delivery]),
) -> anyhow::Result<()> {
    let redis = redis::Client::open("redis://127.0.0.1:6379/0")?;
    let mut con = redis.get_multiplexed_async_connection().await?;
    let mut seen = 0u64;
    while seen < n {
        let Some(first) = consumer.next().await else {
            anyhow::bail!("consumer ended");
        };
        let mut batch = vec![first?];
        while let Some(Some(d)) = consumer.next().now_or_never() {
            batch.push(d?);
            if batch.len() >= 1000 {
                break;
            }
        }
        let mut pipe = redis::pipe();
        for d in &batch {
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            pipe.cmd("SET")
                .arg(format!("{key_prefix}:{id}"))
                .arg(&value)
                .arg("EX")
                .arg(600)
                .ignore();
        }
        pipe.query_async::<()>(&mut con).await?;
        stored(now_ms(), &batch);
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
            RAW_ACKS.fetch_add(1, Ordering::Relaxed);
        }
        seen += batch.len() as u64;
    }
    Ok(())
}

/// Publishes `total` messages at `rate` a second (`publish(i)` sends message `i`), with the
/// confirms awaited on the side.
async fn publish_at_rate<F, Fut>(rate: f64, total: u64, mut publish: F) -> anyhow::Result<()>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<lapin::PublisherConfirm>>,
{
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (ctx, mut crx) = tokio::sync::mpsc::unbounded_channel::<lapin::PublisherConfirm>();
    let confirms = tokio::spawn(async move {
        while let Some(c) = crx.recv().await {
            c.await?;
        }
        anyhow::Ok(())
    });
    for i in 0..total {
        tick.tick().await;
        let _ = ctx.send(publish(i).await?);
    }
    drop(ctx);
    confirms.await?
}

/// The bare round trip: publish with a window of confirms into a quorum queue, consume with a
/// large prefetch, one pipelined Redis SET a message, multiple ack. Returns messages a second.
pub async fn raw_round_trip(
    n_posts: u64,
    batch_size: usize,
    window: usize,
) -> anyhow::Result<RawFigures> {
    let msgs = bodies(n_posts, batch_size);
    let n = msgs.len() as u64;
    let (raw, consumer) = RawQueue::open("raw", 1000).await?;
    quiesce().await;
    let broker_before = broker_cpu_s();
    let (redis_before, own_before) = (redis_cpu_s(), own_cpu_s());
    let ctxt_before = proc_ctxt(std::process::id()).unwrap_or_default();
    let started = Instant::now();
    let consume = tokio::spawn(consume_raw(
        consumer,
        n,
        raw.queue.clone(),
        "x".repeat(150),
        |_, _| {},
    ));
    let xp_props = std::env::var("XP_PROPS").is_ok();
    raw.publish_all(&msgs, window, |id| {
        if xp_props {
            let mut h = FieldTable::default();
            h.insert("x-taskmill-attempt".into(), AMQPValue::LongLongInt(1));
            BasicProperties::default()
                .with_message_id(id.into())
                .with_content_type("application/msgpack".into())
                .with_timestamp(now_ms() / 1000)
                .with_headers(h)
        } else {
            BasicProperties::default().with_message_id(id.into())
        }
    })
    .await?;
    consume.await??;
    let elapsed = started.elapsed();
    let broker_cpu_s = broker_cpu_s() - broker_before;
    let per_k = |cpu: f64| cpu / n.max(1) as f64 * 1000.0;
    let (redis_cpu, client_cpu) = (redis_cpu_s() - redis_before, own_cpu_s() - own_before);
    let ctxt_after = proc_ctxt(std::process::id()).unwrap_or_default();
    let ctxt_per_k = |a: u64, b: u64| a.saturating_sub(b) as f64 / n.max(1) as f64 * 1000.0;
    raw.close().await?;
    Ok(RawFigures {
        messages: n,
        messages_per_s: n as f64 / elapsed.as_secs_f64(),
        window,
        broker_cpu_s_per_1000: per_k(broker_cpu_s),
        redis_cpu_s_per_1000: per_k(redis_cpu),
        client_cpu_s_per_1000: per_k(client_cpu),
        client_ctxt_per_1000: (
            ctxt_per_k(ctxt_after.0, ctxt_before.0),
            ctxt_per_k(ctxt_after.1, ctxt_before.1),
        ),
    })
}

/// What one bare round trip measured.
#[derive(Debug, Clone)]
pub struct RawFigures {
    /// Messages.
    pub messages: u64,
    /// Messages a second, from the first publish to the last ack.
    pub messages_per_s: f64,
    /// Publisher confirms in flight.
    pub window: usize,
    /// The broker's CPU seconds per 1,000 messages.
    pub broker_cpu_s_per_1000: f64,
    /// Redis's CPU seconds per 1,000 messages.
    pub redis_cpu_s_per_1000: f64,
    /// The publishing and consuming client's (this process's) CPU seconds per 1,000 messages.
    pub client_cpu_s_per_1000: f64,
    /// This process's context switches per 1,000 messages (voluntary, involuntary).
    pub client_ctxt_per_1000: (f64, f64),
}

/// The same task code in-process on a rayon pool of all cores, called as the worker calls it
/// (each batch a message body encoded beforehand, its records read in place): seconds for all
/// batches.
pub fn in_process(
    n_posts: u64,
    batch_size: usize,
    task: &str,
    params: &[(&str, &str)],
) -> anyhow::Result<f64> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    in_process_on(threads, n_posts, batch_size, task, params)
}

/// The work any queue must do for the throughput workload beyond moving bytes, which the bare
/// round trip (bodies encoded beforehand, no task) does not: the records' transcoding from
/// the file's JSON lines to MessagePack, and `task` over the batches, each alone on one
/// thread. CPU seconds per 1,000 batches of `batch_size`: (transcoding, task).
pub fn inherent_work(
    file: &Path,
    n_posts: u64,
    batch_size: usize,
    task: &str,
) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(file)?;
    let mut out = Vec::with_capacity(4096);
    let started = Instant::now();
    for (i, line) in text.lines().enumerate() {
        out.clear();
        taskmill_protocol::transcode::json_to_msgpack(line, &mut out)
            .map_err(|_| anyhow::anyhow!("line {} of the posts file is not JSON", i + 1))?;
    }
    let transcode_s = started.elapsed().as_secs_f64();
    let task_s = in_process_on(1, n_posts, batch_size, task, &[])?;
    let per_1000 = 1000.0 / (n_posts.div_ceil(batch_size as u64).max(1) as f64);
    Ok((transcode_s * per_1000, task_s * per_1000))
}

/// `n` generated posts in MessagePack, as the producer's readers hand records over.
fn sample_records(n: u64) -> anyhow::Result<Vec<Record>> {
    Ok(sample::posts(n)
        .map(|p| Record::from_json_str(&p.to_string()))
        .collect::<Result<_, _>>()?)
}

/// [`in_process`] on a pool of `threads`.
fn in_process_on(
    threads: usize,
    n_posts: u64,
    batch_size: usize,
    task: &str,
    params: &[(&str, &str)],
) -> anyhow::Result<f64> {
    use rayon::prelude::*;
    // Each batch one message body, its records read in place from it: the memory the worker's
    // task reads (decoding the envelope is not timed: the reference is the task alone).
    let records = sample_records(n_posts)?;
    let none = BTreeMap::new();
    let bodies: Vec<Vec<u8>> = records
        .chunks(batch_size)
        .enumerate()
        .map(|(i, c)| encode_records("inproc", i as u64, task, &none, c, 0))
        .collect();
    let batches = bodies
        .iter()
        .map(|b| {
            Ok(Records::new(
                taskmill_common::envelope::decode_view(b, usize::MAX)?.records,
            ))
        })
        .collect::<anyhow::Result<Vec<Records<'_>>>>()?;
    let task = taskmill_common::tasks::builtin()
        .get(task)
        .context("unknown task")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let params: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let started = Instant::now();
    let ok = pool.install(|| {
        batches
            .par_iter()
            .enumerate()
            .map(|(i, b)| {
                let ctx = TaskContext {
                    params: &params,
                    job: "inproc",
                    batch: i as u64,
                    attempt: 1,
                    deadline: None,
                };
                task.run_records(&ctx, b).is_ok()
            })
            .filter(|ok| *ok)
            .count()
    });
    anyhow::ensure!(ok == batches.len(), "the task failed in-process");
    Ok(started.elapsed().as_secs_f64())
}

/// Latency at a fixed publish rate (batches a second) for `seconds`: the worker's p50, p95,
/// p99 and max from a batch's creation to its result stored, in ms.
pub async fn latency(rate: f64, seconds: u64, batch_size: usize) -> anyhow::Result<Value> {
    let ns = bench_ns("lat");
    let (worker, port) = start_worker(&ns, 0, None)?;
    wait_consumers(&ns, "tasks").await?;
    quiesce().await;
    let store = Store::connect("redis://127.0.0.1:6379/0", &ns, 3600).await?;
    let job = "latency";
    let params = BTreeMap::new();
    store
        .register_job(&NewJob {
            id: job,
            task: "post-stats",
            queue: "tasks",
            params: &params,
            unique_key: None,
            token: "",
            then: "",
            parent: "",
            group: "",
            on_complete: "",
            parent_outcome: "",
        })
        .await?;
    let total = (rate * seconds as f64) as u64;
    // As a producer does: the batch numbers are reserved before they are published (workers
    // dead-letter numbers above the reservation as forgeries).
    store.reserve_batches(job, total).await?;
    let names = Names::new(&ns);
    let conn = taskmill_common::amqp::connect(AMQP_URL, "bench-lat").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare(&ch, &names, &[("tasks".to_string(), 1)]).await?;
    // The records in MessagePack beforehand, as the producer's readers hand them over (the
    // raw round trip's bodies are encoded beforehand too); the envelope is written around
    // them at each publish, as the producer's batcher does.
    let records = sample_records(batch_size as u64 * 100)?;
    let exchange = names.work_exchange();
    publish_at_rate(rate, total, |b| {
        let start = (b as usize % 100) * batch_size;
        let created_ms = now_ms();
        let body = encode_records(
            job,
            b,
            "post-stats",
            &params,
            &records[start..start + batch_size],
            created_ms,
        );
        let props = batch_properties_of(job, b, created_ms, 1);
        let (ch, exchange) = (&ch, exchange.as_str());
        async move {
            ch.basic_publish(
                exchange.into(),
                "tasks".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                props,
            )
            .await
        }
    })
    .await?;
    store
        .finish_publishing(
            job,
            &PublishTotals {
                batches: total,
                records: total * batch_size as u64,
                ..PublishTotals::default()
            },
        )
        .await?;
    kit::job_finished(&store, job, JOB_LIMIT).await?;
    let stats = worker_stats(port).await?;
    let totals = &stats["latency_ms"];
    let here = &stats["in_worker_us"];
    worker.term();
    tokio::task::spawn_blocking(move || worker.finish()).await??;
    let _ = conn.close(200, "done".into()).await;
    kit::cleanup_namespace(&ns).await;
    Ok(json!({
        "rate_batches_per_s": rate, "seconds": seconds, "batches": total,
        "p50_ms": totals["p50"], "p95_ms": totals["p95"],
        "p99_ms": totals["p99"], "max_ms": totals["max"],
        "in_worker_p50_ms": here["p50"].as_f64().map(|us| us / 1000.0),
        "in_worker_p99_ms": here["p99"].as_f64().map(|us| us / 1000.0),
        "in_worker_max_ms": here["max"].as_f64().map(|us| us / 1000.0),
    }))
}

/// The producer alone enqueuing `n` records from a file (no worker): its peak RSS and time.
pub async fn producer_memory(file: &Path) -> anyhow::Result<(ProcStats, f64)> {
    let ns = bench_ns("mem");
    let started = Instant::now();
    let producer = Watched::spawn(
        Command::new(release_bin("producer"))
            .env("TASKMILL_NAMESPACE", &ns)
            .args(["enqueue", "--file"])
            .arg(file)
            .args(["--batch-size", "100", "--task", "post-stats"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let (stats, ok, _) = tokio::task::spawn_blocking(move || producer.finish()).await??;
    anyhow::ensure!(ok, "the producer failed");
    let secs = started.elapsed().as_secs_f64();
    kit::cleanup_namespace(&ns).await;
    Ok((stats, secs))
}

/// Draws records/s against batch size as an SVG line chart.
pub fn sweep_chart(path: &Path, points: &[(usize, f64)], raw: Option<f64>) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = points.iter().map(|p| p.1).chain(raw).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "taskmill throughput by batch size (post-stats, 2 cores)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.5f64..1500f64).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("records per batch (log scale)")
        .y_desc("records / s")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|&(b, r)| (b as f64, r)),
            &BLUE,
        ))?
        .label("taskmill end to end")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.draw_series(
        points
            .iter()
            .map(|&(b, r)| Circle::new((b as f64, r), 4, BLUE.filled())),
    )?;
    if let Some(raw) = raw {
        chart
            .draw_series(LineSeries::new(
                [(0.5, raw), (1500.0, raw)],
                RED.stroke_width(1),
            ))?
            .label("bare lapin round trip, batches of 10 (records/s)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Waits until queue `name` has a consumer (through the management API).
async fn wait_queue_consumers(name: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:15672/api/queues/%2f/{name}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let why = match http
            .get(&url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await
        {
            Ok(resp) => match resp.json::<Value>().await {
                Ok(v) if v["consumers"].as_u64().unwrap_or(0) >= 1 => return Ok(()),
                Ok(_) => "no consumer yet".to_string(),
                Err(e) => format!("unreadable answer: {e}"),
            },
            Err(e) => {
                format!("the management API is unreachable ({e}); `make services` enables it")
            }
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "queue {name} got no consumer in 120 s: {why}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Python virtual environment with Celery and Dramatiq, made on first use. Err with the
/// reason when Python or the packages cannot be installed.
pub fn peers_venv(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let venv = std::fs::canonicalize(dir)?.join("peers-venv");
    let python = venv.join("bin/python");
    if !venv.join("bin/celery").exists() || !venv.join("bin/dramatiq").exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        anyhow::ensure!(ok, "python3 -m venv failed (is python3-venv installed?)");
        let ok = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "-q",
                "celery==5.7.0",
                "dramatiq[rabbitmq,redis]==2.2.1",
                // Pinned like the peers (the version a fresh install got when last checked),
                // so that a later release cannot change what is measured.
                "redis==8.1.0",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        anyhow::ensure!(ok, "pip could not install celery and dramatiq");
    }
    Ok(python)
}

/// One peer's run of the throughput workload: tasks a second.
pub async fn peer(
    venv_python: &Path,
    which: &str,
    file: &Path,
    size: usize,
) -> anyhow::Result<Value> {
    peer_run(venv_python, which, file, size, false).await
}

/// The workers alone: every task in the queue before the worker starts, the rate taken from
/// the first and the last result's `date_done` (Celery's peers only: `celery`, and
/// `taskmill-celery`, taskmill's worker taking the same Celery messages).
pub async fn peer_drain(
    venv_python: &Path,
    which: &str,
    file: &Path,
    size: usize,
) -> anyhow::Result<Value> {
    peer_run(venv_python, which, file, size, true).await
}

async fn peer_run(
    venv_python: &Path,
    which: &str,
    file: &Path,
    size: usize,
    drain: bool,
) -> anyhow::Result<Value> {
    // "taskmill-celery": Celery's producer (the same script) calling taskmill's worker through
    // its Celery ingress, in a namespace named as the queue (so that it is cleaned up with it).
    let bin = if which == "taskmill-celery" {
        release_bin("worker")
    } else {
        venv_python.with_file_name(which)
    };
    let queue = format!(
        "bench-{which}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let peers_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers");
    let (module, args): (&str, Vec<String>) = match which {
        "taskmill-celery" => (
            "celery_bench.py",
            ["--celery-queue", &queue]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        "celery" => (
            "celery_bench.py",
            [
                "-A",
                "celery_bench",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "-Q",
                &queue,
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        _ => (
            "dramatiq_bench.py",
            [
                "dramatiq_bench",
                "--processes",
                "2",
                "--threads",
                "4",
                "--queues",
                &queue,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
    };
    let ids = std::env::temp_dir().join(format!("{queue}.ids.json"));
    if drain {
        let out = Command::new(venv_python)
            .arg(module)
            .arg("preload")
            .arg(std::fs::canonicalize(file)?)
            .arg(size.to_string())
            .arg(&ids)
            .current_dir(&peers_dir)
            .env("PEER_QUEUE", &queue)
            .stderr(Stdio::inherit())
            .output()?;
        anyhow::ensure!(out.status.success(), "preloading the {which} queue failed");
    }
    let worker = Watched::spawn(
        Command::new(&bin)
            .args(&args)
            .current_dir(&peers_dir)
            .env("PEER_QUEUE", &queue)
            .env("TASKMILL_NAMESPACE", &queue)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let result = async {
        wait_queue_consumers(&queue).await?;
        let mut cmd = Command::new(venv_python);
        cmd.arg(module);
        if drain {
            cmd.arg("collect").arg(&ids);
        } else {
            cmd.args(["produce"])
                .arg(std::fs::canonicalize(file)?)
                .arg(size.to_string());
        }
        let out = cmd
            .current_dir(&peers_dir)
            .env("PEER_QUEUE", &queue)
            .stderr(Stdio::inherit())
            .output()?;
        anyhow::ensure!(out.status.success(), "the {which} producer failed");
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let tasks = v["tasks"].as_f64().unwrap_or(0.0);
        let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
        Ok(json!({"tasks": tasks, "seconds": secs, "tasks_per_s": tasks / secs}))
    }
    .await;
    worker.term();
    let _ = tokio::task::spawn_blocking(move || worker.finish()).await;
    kit::cleanup_namespace(&queue).await;
    let _ = std::fs::remove_file(&ids);
    result
}

/// The bare round trip at a fixed rate (messages a second) for `seconds`: p50, p95, p99 and
/// max in ms from publishing to the Redis SET done, for comparison with taskmill's latency.
pub async fn raw_latency(rate: f64, seconds: u64, batch_size: usize) -> anyhow::Result<Value> {
    let (raw, consumer) = RawQueue::open("rawlat", 1000).await?;
    quiesce().await;
    let total = (rate * seconds as f64) as u64;
    let hist = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?,
    ));
    let recorder = hist.clone();
    let consume = tokio::spawn(consume_raw(
        consumer,
        total,
        raw.queue.clone(),
        "x".into(),
        move |now, group| {
            let mut h = recorder.lock().unwrap_or_else(|e| e.into_inner());
            for d in group {
                let created = d.properties.timestamp().unwrap_or(now);
                h.saturating_record(now.saturating_sub(created).max(1));
            }
        },
    ));
    let body = bodies(batch_size as u64, batch_size)
        .pop()
        .map(|(_, b)| b)
        .unwrap_or_default();
    publish_at_rate(rate, total, |i| {
        // Timestamp in ms (the AMQP field is seconds by convention; this queue is ours).
        let props = BasicProperties::default()
            .with_message_id(i.to_string().into())
            .with_timestamp(now_ms());
        raw.publish(&body, props)
    })
    .await?;
    consume.await??;
    raw.close().await?;
    let h = hist.lock().unwrap_or_else(|e| e.into_inner());
    Ok(json!({
        "rate_messages_per_s": rate, "seconds": seconds, "messages": total,
        "p50_ms": h.value_at_quantile(0.5), "p95_ms": h.value_at_quantile(0.95),
        "p99_ms": h.value_at_quantile(0.99), "max_ms": h.max(),
    }))
}

/// The broker's CPU seconds per 1,000 messages, publishing and consuming measured apart (the
/// queue filled first, then drained), for taskmill's producer and worker and for the bare
/// round trip's publisher and consumer, plus the bare consumer draining taskmill's queue.
/// Tells which side makes the broker work more. A diagnostic: not part of the default run.
pub async fn split(file: &Path, n_posts: u64) -> anyhow::Result<Value> {
    let per_k = |cpu: f64, n: u64| cpu / n.max(1) as f64 * 1000.0;
    let n = n_posts / 10;
    // taskmill: producer alone, then the worker.
    let ns = bench_ns("split");
    let b0 = broker_cpu_s();
    producer_only(&ns, file).await?;
    let b1 = broker_cpu_s();
    let (worker, _) = start_worker(&ns, 0, None)?;
    let store = Store::connect("redis://127.0.0.1:6379/0", &ns, 3600).await?;
    kit::job_finished(&store, "bench", JOB_LIMIT).await?;
    let b2 = broker_cpu_s();
    worker.term();
    tokio::task::spawn_blocking(move || worker.finish()).await??;
    kit::cleanup_namespace(&ns).await;
    // taskmill's producer, the bare consumer.
    let ns = bench_ns("split");
    producer_only(&ns, file).await?;
    let b3 = broker_cpu_s();
    let cconn = taskmill_common::amqp::connect(AMQP_URL, "bench-split-con").await?;
    let queue = format!("{ns}.tasks");
    let consumer = bare_consumer(&cconn, &queue, 1000).await?;
    consume_raw(consumer, n, queue, "x".repeat(150), |_, _| {}).await?;
    let b4 = broker_cpu_s();
    let _ = cconn.close(200, "done".into()).await;
    kit::cleanup_namespace(&ns).await;
    // The bare round trip, its halves apart.
    let msgs = bodies(n_posts, 10);
    let raw = RawQueue::declare("split").await?;
    let b5 = broker_cpu_s();
    raw.publish_all(&msgs, 4000, |id| {
        BasicProperties::default().with_message_id(id.into())
    })
    .await?;
    let b6 = broker_cpu_s();
    let consumer = bare_consumer(&raw.cconn, &raw.queue, 1000).await?;
    consume_raw(consumer, n, raw.queue.clone(), "x".repeat(150), |_, _| {}).await?;
    let b7 = broker_cpu_s();
    raw.close().await?;
    Ok(json!({
        "messages": n,
        "taskmill_publish": per_k(b1 - b0, n),
        "taskmill_consume": per_k(b2 - b1, n),
        "bare_consume_of_taskmill_queue": per_k(b4 - b3, n),
        "bare_publish": per_k(b6 - b5, n),
        "bare_consume": per_k(b7 - b6, n),
    }))
}

/// The producer's path apart (batches of 10 of `file`'s `n_posts` posts): reading the file
/// alone (lines split, nothing parsed), transcoding every line alone (one thread, in
/// process), and the producer binary alone into the broker with no worker (enqueue start to
/// exit, every batch confirmed), each in batches a second, beside the producer's CPU a 1,000
/// batches. The producer must never be what limits a job: each must be well above the end to
/// end throughput.
pub async fn producer_path(file: &Path, n_posts: u64) -> anyhow::Result<Value> {
    let batches = n_posts.div_ceil(10).max(1) as f64;
    let started = Instant::now();
    let text = std::fs::read(file)?;
    let lines = memchr::memchr_iter(b'\n', &text).count() as u64;
    let read_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(lines >= n_posts, "the posts file has {lines} lines");
    drop(text);
    let (transcode, _) = inherent_work(file, n_posts, 10, "post-stats")?;
    let ns = bench_ns("producer");
    quiesce().await;
    let started = Instant::now();
    let cpu = producer_only(&ns, file).await?;
    let alone_s = started.elapsed().as_secs_f64();
    kit::cleanup_namespace(&ns).await;
    Ok(json!({
        "read_batches_per_s": batches / read_s.max(1e-9),
        "transcode_batches_per_s": 1000.0 / transcode.max(1e-12),
        "producer_alone_batches_per_s": batches / alone_s.max(1e-9),
        "producer_alone_cpu_s_per_1000_batches": cpu / batches * 1000.0,
    }))
}

/// The producer enqueuing `file` in batches of 10 as job `bench`, with no worker running; its
/// CPU seconds.
async fn producer_only(ns: &str, file: &Path) -> anyhow::Result<f64> {
    let mut cmd = Command::new(release_bin("producer"));
    cmd.env("TASKMILL_NAMESPACE", ns)
        .args(["enqueue", "--file"])
        .arg(file)
        .args([
            "--batch-size",
            "10",
            "--task",
            "post-stats",
            "--job",
            "bench",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let producer = Watched::spawn(&mut cmd)?;
    let (stats, ok, _) = tokio::task::spawn_blocking(move || producer.finish()).await??;
    anyhow::ensure!(ok, "the producer failed");
    Ok(stats.cpu_s)
}

/// Each `ours[i] / theirs[i]` (runs made one after the other, so each pair saw the same
/// machine), sorted; runs without a partner are left out.
pub fn pair_ratios(ours: &[f64], theirs: &[f64]) -> Vec<f64> {
    let mut r: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| a / b).collect();
    r.sort_by(f64::total_cmp);
    r
}

/// The middle of sorted values (the upper one of an even count).
pub fn median(sorted: &[f64]) -> Option<f64> {
    sorted.get(sorted.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ratios_pair_runs_in_order_and_the_median_is_the_middle_one() {
        // A machine that slows down run by run: the medians of each side compare runs made
        // at different speeds, the pairs compare runs made side by side.
        let ours = [9.0, 7.0, 5.0];
        let theirs = [10.0, 8.0, 6.0, 4.0];
        let r = pair_ratios(&ours, &theirs);
        assert_eq!(r.len(), 3);
        assert!((r[0] - 5.0 / 6.0).abs() < 1e-12);
        assert!((r[2] - 0.9).abs() < 1e-12);
        assert_eq!(median(&r), Some(7.0 / 8.0));
        assert_eq!(median(&[]), None);
    }
}
