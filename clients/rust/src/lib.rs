//! taskmill-client: enqueue taskmill jobs and follow them, from Rust. The `producer` command
//! line and its dashboard are built on it; so can your own code be.
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
//! use taskmill_client::{Client, JobSpec, Settings};
//!
//! # async fn demo() -> Result<(), taskmill_client::Error> {
//! let client = Client::connect(Settings::from_env()?).await?;
//! let posts = (1..=100).map(|id| json!({"id": id, "title": "hello", "body": "lorem ipsum"}));
//! let job = client.enqueue(&JobSpec::new("post-stats").batch_size(10), posts).await?;
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
//! Errors are one [`Error`] enum; [`Error::kind`] says what kind ([`ErrorKind`]), which is what
//! the command line's exit codes and the HTTP API's statuses are made of.
//!
//! # Layout
//! - [`spec`]: [`JobSpec`], the typed job every front door builds and validates the same way,
//!   and the parsers of its text forms (`30s`, `100/s`, RFC 3339 times).
//! - [`enqueue`]: the enqueue core (catalog check, registration, reservation, lease, totals).
//! - [`handle`]: [`JobHandle`]: status, wait, results, cancel, delete.
//! - [`batcher`] and [`publisher`]: records into encoded batches; confirm-window publishing
//!   with republish on nack, return or reconnect.
//! - [`problems`]: what could not be read or sent, counted and described.
//! - [`schedules`]: periodic schedules (add, list, pause, resume, remove) and closing a group
//!   with its chord follow-up.
//! - [`error`]: [`Error`] and [`ErrorKind`].

pub mod batcher;
pub mod dead;
pub mod enqueue;
pub mod error;
pub mod handle;
pub mod problems;
pub mod publisher;
pub mod schedules;
pub mod spec;

use futures::{Stream, StreamExt as _};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use dead::{DeadLetter, Replayed};
pub use enqueue::{EnqueueReport, Hooks};
pub use error::{Error, ErrorKind, Result};
pub use handle::JobHandle;
pub use problems::{ProblemLog, Problems};
pub use schedules::{NewSchedule, Period, ScheduleInfo};
pub use spec::{Chain, JobSpec, Rate, Start, Step, Trigger};
pub use taskmill_protocol::JobState;
pub use taskmill_store::{Cancelled, JobStatus, Store};

/// Records converted and handed to the batcher at a time.
const CHUNK: usize = 1024;

/// Where the services are, and the namespace.
#[derive(Debug, Clone)]
pub struct Settings {
    /// RabbitMQ (`amqp://` or `amqps://`).
    pub amqp_url: String,
    /// Redis (`redis://` or `rediss://`).
    pub redis_url: String,
    /// The prefix of every queue, exchange and key.
    pub namespace: String,
    /// How long a job's keys live in Redis, in seconds.
    pub result_ttl: u64,
}

impl Settings {
    /// The local services under `namespace`, results kept 7 days.
    pub fn local(namespace: &str) -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            namespace: namespace.into(),
            result_ttl: 7 * 24 * 3600,
        }
    }

    /// From the environment, as the command line reads it: `AMQP_URL`, `REDIS_URL`,
    /// `TASKMILL_NAMESPACE`, `TASKMILL_RESULT_TTL`, with the same defaults.
    pub fn from_env() -> Result<Self> {
        let mut s = Self::local("taskmill");
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("AMQP_URL") {
            s.amqp_url = v;
        }
        if let Some(v) = var("REDIS_URL") {
            s.redis_url = v;
        }
        if let Some(v) = var("TASKMILL_NAMESPACE") {
            s.namespace = v;
        }
        if let Some(v) = var("TASKMILL_RESULT_TTL") {
            s.result_ttl = v.parse().map_err(|_| {
                Error::Invalid(format!(
                    "TASKMILL_RESULT_TTL {v:?} is not a whole number of seconds"
                ))
            })?;
        }
        Ok(s)
    }
}

/// A connection to one namespace: enqueues jobs and follows them. Redis is connected at once,
/// RabbitMQ for each enqueue. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    settings: Settings,
    store: Store,
}

impl Client {
    /// Connects to Redis with `settings` (RabbitMQ is connected for each enqueue).
    pub async fn connect(settings: Settings) -> Result<Self> {
        taskmill_protocol::names::validate_name("namespace", &settings.namespace)
            .map_err(Error::Invalid)?;
        let store = Store::connect(
            &settings.redis_url,
            &settings.namespace,
            settings.result_ttl,
        )
        .await?;
        Ok(Self { settings, store })
    }

    /// The settings this client uses.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The namespace's Redis store (jobs, results, the catalog), for what the client has no
    /// verb for.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Enqueues `records` (anything serde can turn into JSON objects) as a new job, and
    /// returns once every batch is confirmed by the broker. A record that cannot be turned
    /// into JSON is skipped and reported in the job's problems; no record at all is
    /// [`Error::Invalid`] and registers nothing.
    pub async fn enqueue<T, I>(&self, spec: &JobSpec, records: I) -> Result<JobHandle>
    where
        T: Serialize,
        I: IntoIterator<Item = T>,
    {
        self.enqueue_stream(spec, futures::stream::iter(records))
            .await
    }

    /// [`Client::enqueue`] from an asynchronous stream: batches go out while the stream is
    /// still producing (a partial batch after the spec's linger without a record).
    pub async fn enqueue_stream<T, S>(&self, spec: &JobSpec, records: S) -> Result<JobHandle>
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
                    Ok(v) => Some(taskmill_protocol::envelope::Record::from_value(&v)),
                    Err(e) => {
                        log.invalid(format!("record {seen}: cannot be turned into JSON: {e}"));
                        None
                    }
                };
                futures::future::ready(v)
            })
            .ready_chunks(CHUNK);
        let hooks = Hooks {
            problems,
            on_registered: |_: &str| {},
            stop: CancellationToken::new(),
        };
        let report = self
            .enqueue_chunks(spec, || Box::pin(chunks), hooks)
            .await?;
        Ok(JobHandle::new(
            report.job.clone(),
            self.store.clone(),
            Some(report),
        ))
    }

    /// The general enqueue, for front doors with readers of their own: the chunks of records
    /// of the stream `start` gives (called once the spec, the services and the catalog have
    /// accepted the job, so that nothing is read for a job that is refused).
    #[tracing::instrument(level = "debug", name = "enqueue", skip_all, fields(task = %spec.task, queue = %spec.queue))]
    pub async fn enqueue_chunks<S, F>(
        &self,
        spec: &JobSpec,
        start: impl FnOnce() -> S,
        hooks: Hooks<F>,
    ) -> Result<EnqueueReport>
    where
        S: Stream<Item = Vec<taskmill_protocol::envelope::Record>> + Unpin,
        F: FnOnce(&str),
    {
        enqueue::enqueue_records(&self.settings, &self.store, spec, start, hooks).await
    }

    /// A handle on an existing job (enqueued by anyone), to follow or steer it.
    pub fn job(&self, id: &str) -> JobHandle {
        JobHandle::new(id.to_string(), self.store.clone(), None)
    }

    /// The tasks the live workers serve (the task catalog), as `producer tasks --json`.
    pub async fn tasks(&self) -> Result<Vec<Value>> {
        Ok(self.store.catalog().await?)
    }
}
