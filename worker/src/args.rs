//! The worker's command line and settings.

use clap::Parser;
use taskmill_common::{
    config::ConnArgs, envelope::DEFAULT_MAX_MESSAGE_BYTES, logging::LogFormat, topology,
};

use crate::retry::RetryPolicy;

/// Default of `--max-result-bytes`: 1 MiB.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 1024 * 1024;

/// The worker's command line; every flag has an environment variable behind it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "worker",
    version,
    about = "taskmill worker: consumes batches and analyses them on all cores"
)]
pub struct WorkerArgs {
    /// Broker, Redis and namespace.
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Work queue to consume (short name; repeat or separate with commas for several).
    #[arg(
        long = "queue",
        env = "TASKMILL_QUEUES",
        value_delimiter = ',',
        default_value = "tasks"
    )]
    pub queues: Vec<String>,

    /// Spread each work queue over at least this many shards (quorum queues whose leaders a
    /// cluster places on different nodes, 1 to 16). The queue's count is kept in Redis and
    /// only grows; every worker consumes every shard, and one that sees the count grow
    /// (a producer's `--shards`) finishes what it holds and consumes the new shards too.
    #[arg(long, env = "TASKMILL_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(topology::MAX_SHARDS)))]
    pub shards: u16,

    /// Unacknowledged batches each consumer may hold (per-consumer QoS). Lower it for tasks
    /// that run long (a few per thread), so that workers share the end of a job.
    #[arg(long, env = "TASKMILL_PREFETCH", default_value_t = 256)]
    pub prefetch: u16,

    /// When a batch arrives at an idle worker, how long to let more arrive before handing
    /// them to the analysis threads together, in milliseconds (0: at once). Larger groups
    /// cost fewer wake-ups, Redis calls and acks per batch; priority bands never wait.
    #[arg(long, env = "TASKMILL_GATHER_MS", default_value_t = 1)]
    pub gather_ms: u64,

    /// Analysis threads (rayon); 0 means one per core.
    #[arg(long, env = "TASKMILL_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// On SIGTERM/SIGINT, how long to finish the batches in hand before giving the rest back
    /// to the broker, in seconds.
    #[arg(long, env = "TASKMILL_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` on this address.
    #[arg(long, env = "TASKMILL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Messages larger than this are dead-lettered unread, in bytes.
    #[arg(long, env = "TASKMILL_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// A task result larger than this (bytes, as JSON) is not stored: the batch is
    /// dead-lettered `result_too_large` (results live in Redis, a copy a batch).
    #[arg(long, env = "TASKMILL_MAX_RESULT_BYTES", default_value_t = DEFAULT_MAX_RESULT_BYTES)]
    pub max_result_bytes: usize,

    /// A batch of a task this worker lacks goes back (through a 1 s delay queue) while a live
    /// worker of its queue serves the task (a rolling deploy, a mixed fleet); when none does,
    /// it waits this many seconds for one to start before it is dead-lettered `unknown_task`.
    #[arg(long, env = "TASKMILL_UNKNOWN_TASK_WAIT", default_value_t = 0)]
    pub unknown_task_wait: u64,

    /// A job that made no progress for this many seconds, while nothing of its queue is in
    /// the broker (work queue, priority bands, delay queues) and no worker holds one of its
    /// batches, is given up on: its missing batches are counted lost and it finishes
    /// `stalled` (a queue purged or deleted in the console). 0: never.
    #[arg(long, env = "TASKMILL_STALL_AFTER", default_value_t = 300)]
    pub stall_after: u64,

    /// Retries of transient failures.
    #[command(flatten)]
    pub retry: RetryPolicy,

    /// Completion webhooks (`enqueue --on-complete`) are signed with this secret:
    /// `X-Taskmill-Signature: sha256=HEX`, the HMAC-SHA256 of the body (unsigned without it).
    #[arg(long, env = "TASKMILL_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Calls from Celery apps.
    #[command(flatten)]
    pub celery: CeleryArgs,

    /// Log format on stderr (`RUST_LOG` sets the filter).
    #[arg(
        long,
        env = "TASKMILL_LOG_FORMAT",
        value_enum,
        default_value_t,
        help_heading = "Output"
    )]
    pub log_format: LogFormat,
}

impl WorkerArgs {
    /// Defaults for the local services under namespace `ns` (tests and tools).
    pub fn local(ns: &str) -> Self {
        Self {
            conn: ConnArgs::local(ns),
            queues: vec![topology::DEFAULT_QUEUE.into()],
            shards: 1,
            prefetch: 256,
            gather_ms: 1,
            threads: 0,
            shutdown_timeout: 30,
            metrics_addr: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            unknown_task_wait: 0,
            stall_after: 300,
            retry: RetryPolicy::default(),
            webhook_secret: None,
            celery: CeleryArgs::default(),
            log_format: LogFormat::Pretty,
        }
    }
}

/// Celery ingress: the queues Celery apps publish to, and how their calls map to tasks.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Celery ingress")]
pub struct CeleryArgs {
    /// Also consume this queue of Celery calls (Celery's default queue is `celery`; repeat or
    /// separate with commas for several). Each call runs as a job of one batch whose id is
    /// the Celery task id; its result goes where Celery's Redis result backend reads it, so
    /// the app's `AsyncResult.get()` returns it.
    #[arg(
        id = "celery_queue",
        long = "celery-queue",
        env = "TASKMILL_CELERY_QUEUES",
        value_delimiter = ','
    )]
    pub queues: Vec<String>,

    /// A Celery task name and the task it runs, `NAME=TASK` (repeatable), for names that are
    /// not a task's: `myapp.tasks.post_stats=post-stats`. Without one, a name runs the task
    /// of that name, else the task named by its last dotted part with `_` as `-`.
    #[arg(
        id = "celery_alias",
        long = "celery-alias",
        env = "TASKMILL_CELERY_ALIASES",
        value_delimiter = ','
    )]
    pub aliases: Vec<String>,

    /// How long results stay in Celery's backend, in seconds (Celery's `result_expires`).
    #[arg(
        id = "celery_result_expires",
        long = "celery-result-expires",
        env = "TASKMILL_CELERY_RESULT_EXPIRES",
        default_value_t = 86_400
    )]
    pub result_expires: u64,

    /// The key prefix of Celery's Redis result backend (its `result_backend_transport_options`
    /// `global_keyprefix` before `celery-task-meta-`).
    #[arg(
        id = "celery_key_prefix",
        long = "celery-key-prefix",
        env = "TASKMILL_CELERY_KEY_PREFIX",
        default_value = "celery-task-meta-"
    )]
    pub key_prefix: String,

    /// The type a Celery queue is declared with when the app has not declared it yet:
    /// `classic` (Celery's default) or `quorum` (an app with task_default_queue_type
    /// "quorum"). One declared already is used as it is.
    #[arg(id = "celery_queue_type", long = "celery-queue-type", env = "TASKMILL_CELERY_QUEUE_TYPE", default_value = "classic", value_parser = ["classic", "quorum"])]
    pub queue_type: String,

    /// How results are written for Celery's backend: `json` (Celery's default
    /// result_serializer) or `msgpack` (an app with result_serializer = "msgpack").
    #[arg(id = "celery_result_serializer", long = "celery-result-serializer", env = "TASKMILL_CELERY_RESULT_SERIALIZER", default_value = "json", value_parser = ["json", "msgpack"])]
    pub result_serializer: String,
}

impl Default for CeleryArgs {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            aliases: Vec::new(),
            result_expires: 86_400,
            key_prefix: "celery-task-meta-".into(),
            queue_type: "classic".into(),
            result_serializer: "json".into(),
        }
    }
}

impl CeleryArgs {
    /// The alias table, checked: `NAME=TASK` pairs.
    pub fn alias_table(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        self.aliases
            .iter()
            .filter(|a| !a.trim().is_empty())
            .map(|a| match a.split_once('=') {
                Some((name, task)) if !name.trim().is_empty() && !task.trim().is_empty() => {
                    Ok((name.trim().to_string(), task.trim().to_string()))
                }
                _ => Err(format!("--celery-alias {a:?} is not NAME=TASK")),
            })
            .collect()
    }
}
