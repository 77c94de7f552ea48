//! Enqueue jobs from your own Rust code: what `producer enqueue`, `status`, `wait` and
//! `results` do, as a library.
//!
//! The guarantees are the command line's: the job is checked against the task catalog (an
//! unknown task, parameter or value is refused before anything is registered), registered in
//! Redis before its first batch is published, every batch is published persistent and counted
//! only once the broker confirmed it (a nack, a return or a lost connection means it is
//! published again), and the job's `batches_total` is written when the last batch is
//! confirmed.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use futures::TryStreamExt as _;
//! use serde_json::json;
//! use taskmill_producer::client::{Client, Job};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let client = Client::connect(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     "redis://127.0.0.1:6379/0",
//!     "taskmill",
//! )
//! .await?;
//! let posts = (1..=100).map(|id| json!({"id": id, "title": "hello", "body": "lorem ipsum"}));
//! let job = client.enqueue(&Job::new("post-stats").batch_size(10), posts).await?;
//! let status = job.wait(Duration::from_secs(60)).await?;
//! assert_eq!(status.records_done, 100);
//! let mut results = job.results();
//! while let Some((batch, result)) = results.try_next().await? {
//!     println!("batch {batch}: {result}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Errors are [`anyhow::Error`]s; [`crate::error::CliError`] in their chain says what kind
//! (`Usage`: refused before anything happened, like an unknown task; `NoSuchJob`; `Service`:
//! RabbitMQ or Redis unreachable or refusing), and a wait that ran out of time is a
//! [`TimedOut`].

use std::{fmt::Display, time::Duration};

use futures::{Stream, StreamExt as _};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use taskmill_common::{
    config::ConnArgs,
    store::{JobStatus, Store},
};

use crate::{
    cmd::{
        enqueue::{enqueue_records, EnqueueArgs, EnqueueReport},
        status::{load, summary},
        wait::{follow, WaitEnd},
    },
    sources::ProblemLog,
};

/// Records converted and handed to the batcher at a time.
const CHUNK: usize = 1024;
/// Batch results read from Redis in one round trip by [`JobHandle::results`].
const RESULTS_PAGE: u64 = 500;

/// A connection to one namespace: enqueues jobs and follows them.
#[derive(Clone)]
pub struct Client {
    conn: ConnArgs,
    store: Store,
}

impl Client {
    /// Connects to Redis (now) and RabbitMQ (for each enqueue) under `namespace`, with the
    /// command line's defaults for the rest (results kept 7 days).
    pub async fn connect(amqp_url: &str, redis_url: &str, namespace: &str) -> anyhow::Result<Self> {
        let mut conn = ConnArgs::local(namespace);
        conn.amqp_url = amqp_url.into();
        conn.redis_url = redis_url.into();
        conn.result_ttl = 7 * 24 * 3600;
        Self::with_settings(conn).await
    }

    /// Connects with the environment's settings, like the command line without flags:
    /// `AMQP_URL`, `REDIS_URL`, `TASKMILL_NAMESPACE`, `TASKMILL_RESULT_TTL`, with the same
    /// defaults.
    pub async fn from_env() -> anyhow::Result<Self> {
        /// The connection flags alone, read from the environment as the binaries read them.
        #[derive(clap::Parser)]
        struct FromEnv {
            #[command(flatten)]
            conn: ConnArgs,
        }
        let parsed = <FromEnv as clap::Parser>::try_parse_from(["taskmill"])
            .map_err(|e| crate::error::CliError::Usage(e.to_string()))?;
        Self::with_settings(parsed.conn).await
    }

    /// Connects with explicit settings (those the binaries take as flags).
    pub async fn with_settings(conn: ConnArgs) -> anyhow::Result<Self> {
        conn.check().map_err(crate::error::CliError::Usage)?;
        let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
        Ok(Self { conn, store })
    }

    /// The settings this client uses.
    pub fn settings(&self) -> &ConnArgs {
        &self.conn
    }

    /// Enqueues `records` (anything serde can turn into JSON objects) as a new job, and
    /// returns once every batch is confirmed by the broker. A record that cannot be turned
    /// into JSON is skipped and reported in the job's problems; no record at all is an error
    /// and registers nothing.
    pub async fn enqueue<T, I>(&self, job: &Job, records: I) -> anyhow::Result<JobHandle>
    where
        T: Serialize,
        I: IntoIterator<Item = T>,
    {
        self.enqueue_stream(job, futures::stream::iter(records))
            .await
    }

    /// [`Client::enqueue`] from an asynchronous stream: batches go out while the stream is
    /// still producing (a partial batch after 200 ms without a record).
    pub async fn enqueue_stream<T, S>(&self, job: &Job, records: S) -> anyhow::Result<JobHandle>
    where
        T: Serialize,
        S: Stream<Item = T>,
    {
        let problems = ProblemLog::default();
        let log = problems.clone();
        let mut seen = 0u64;
        let chunks = records
            .filter_map(move |r| {
                seen += 1;
                let v = match serde_json::to_value(r) {
                    Ok(v) => Some(taskmill_common::envelope::Record::from_value(&v)),
                    Err(e) => {
                        log.invalid(format!("record {seen}: cannot be turned into JSON: {e}"));
                        None
                    }
                };
                futures::future::ready(v)
            })
            .ready_chunks(CHUNK);
        let report = enqueue_records(
            &self.conn,
            &job.args,
            || (Box::pin(chunks), None),
            problems,
            |_| {},
            CancellationToken::new(),
        )
        .await?;
        Ok(JobHandle {
            id: report.job.clone(),
            store: self.store.clone(),
            report: Some(report),
        })
    }

    /// A handle on an existing job (enqueued by anyone), to follow it.
    pub fn job(&self, id: &str) -> JobHandle {
        JobHandle {
            id: id.to_string(),
            store: self.store.clone(),
            report: None,
        }
    }

    /// The tasks the live workers serve (the task catalog), as `producer tasks --json`.
    pub async fn tasks(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self.store.catalog().await?)
    }
}

/// What to enqueue: the task, its parameters and how to batch and route the records. The
/// defaults are the command line's.
#[derive(Debug, Clone)]
pub struct Job {
    args: EnqueueArgs,
}

impl Job {
    /// A job of `task`, batches of 10, the `default` queue, a new UUID as id.
    pub fn new(task: &str) -> Self {
        Self {
            args: EnqueueArgs::new(task),
        }
    }

    /// A task parameter (checked against the catalog's declared type).
    pub fn param(mut self, key: &str, value: impl Display) -> Self {
        self.args.params.push(format!("{key}={value}"));
        self
    }

    /// Records per batch (one message each).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.args.batch_size = n;
        self
    }

    /// Work queue (short name).
    pub fn queue(mut self, queue: &str) -> Self {
        self.args.queue = queue.into();
        self
    }

    /// The job's id, instead of a new UUID (refused when a job has it already).
    pub fn id(mut self, id: &str) -> Self {
        self.args.job = Some(id.into());
        self
    }

    /// Priority 0 (default) to 9.
    pub fn priority(mut self, priority: u8) -> Self {
        self.args.priority = priority.min(9);
        self
    }

    /// While a job with this key is pending or running, enqueue nothing: the handle returned
    /// is that job's ([`JobHandle::duplicate`] tells).
    pub fn unique_key(mut self, key: &str) -> Self {
        self.args.unique_key = Some(key.into());
        self
    }

    /// Start no batch before this long from now.
    pub fn countdown(mut self, after: Duration) -> Self {
        self.args.countdown = Some(format!("{}ms", after.as_millis()));
        self
    }

    /// Drop the batches not started within this long from now.
    pub fn expires(mut self, within: Duration) -> Self {
        self.args.expires = Some(format!("{}ms", within.as_millis()));
        self
    }

    /// The longest one batch may run.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.args.time_limit = Some(format!("{}ms", limit.as_millis()));
        self
    }

    /// At most this many batches start, across all workers: `100/s`, `30/m`, `500/h`.
    pub fn rate_limit(mut self, rate: &str) -> Self {
        self.args.rate_limit = Some(rate.into());
        self
    }

    /// Enqueue even when no live worker declares the task or its parameters.
    pub fn no_check(mut self) -> Self {
        self.args.no_check = true;
        self
    }

    /// Publisher confirms in flight at once.
    pub fn confirm_window(mut self, n: usize) -> Self {
        self.args.confirm_window = n.max(1);
        self
    }
}

/// A job: its id, and how to follow it.
#[derive(Clone)]
pub struct JobHandle {
    id: String,
    store: Store,
    report: Option<EnqueueReport>,
}

/// [`JobHandle::wait`] ran out of time; the job's status when it did.
#[derive(Debug, thiserror::Error)]
#[error("timed out waiting for job {}", .0.job)]
pub struct TimedOut(pub Box<JobStatus>);

impl JobHandle {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What enqueueing did (batches and records confirmed, records skipped and why), for a
    /// handle returned by [`Client::enqueue`].
    pub fn report(&self) -> Option<&EnqueueReport> {
        self.report.as_ref()
    }

    /// For a job enqueued with a unique key: the id of the job that held it, when nothing was
    /// enqueued (this handle is that job's).
    pub fn duplicate(&self) -> Option<&str> {
        self.report.as_ref()?.duplicate_of.as_deref()
    }

    /// The job's state and counters now.
    pub async fn status(&self) -> anyhow::Result<JobStatus> {
        let status = load(&self.store, &self.id).await?;
        self.with_summary(status).await
    }

    /// A finished job's summary, folded here from the results when no worker stored one (a
    /// built-in task's).
    async fn with_summary(&self, mut status: JobStatus) -> anyhow::Result<JobStatus> {
        if status.summary.is_none() {
            status.summary = summary(&self.store, &status).await?;
        }
        Ok(status)
    }

    /// Waits until the job finishes (completed, completed with errors, cancelled or
    /// interrupted) and returns its final status, with its summary; a [`TimedOut`] error after
    /// `timeout`.
    pub async fn wait(&self, timeout: Duration) -> anyhow::Result<JobStatus> {
        let (status, end) = follow(&self.store, &self.id, Some(timeout), false).await?;
        if end == WaitEnd::TimedOut {
            return Err(TimedOut(Box::new(status)).into());
        }
        self.with_summary(status).await
    }

    /// Each stored batch result, in batch order, read a page at a time (memory stays flat on
    /// large jobs). Batches not done (dead, or still running) are left out.
    pub fn results(&self) -> impl Stream<Item = anyhow::Result<(u64, Value)>> + Unpin + '_ {
        struct Page {
            next: u64,
            /// The last batch number + 1, and how many results are stored: paging stops at
            /// either (a total edited by hand cannot make it read empty pages for ever).
            end: Option<(u64, u64)>,
            seen: u64,
            buf: std::vec::IntoIter<(u64, Value)>,
        }
        let start = Page {
            next: 0,
            end: None,
            seen: 0,
            buf: Vec::new().into_iter(),
        };
        Box::pin(futures::stream::try_unfold(
            start,
            move |mut p| async move {
                loop {
                    if let Some(item) = p.buf.next() {
                        return Ok(Some((item, p)));
                    }
                    let (end, stored) = match p.end {
                        Some(end) => end,
                        None => {
                            let s = self.status().await?;
                            let end = s.batches_total.unwrap_or(s.batches_published);
                            let stored = self.store.results_count(&self.id).await?;
                            p.end = Some((end, stored));
                            (end, stored)
                        }
                    };
                    if p.next >= end || p.seen >= stored {
                        return Ok(None);
                    }
                    let to = (p.next + RESULTS_PAGE).min(end);
                    let page = self.store.results_range(&self.id, p.next, to).await?;
                    p.seen += page.len() as u64;
                    p.buf = page.into_iter();
                    p.next = to;
                }
            },
        ))
    }

    /// Cancels the job: batches not started yet are dropped unrun. Returns the state it was
    /// in.
    pub async fn cancel(&self) -> anyhow::Result<String> {
        match self.store.cancel(&self.id).await? {
            Some(c) => Ok(c.was.to_string()),
            None => Err(crate::error::CliError::NoSuchJob(format!("no job {:?}", self.id)).into()),
        }
    }
}
