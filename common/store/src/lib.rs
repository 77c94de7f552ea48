//! Jobs and results in Redis.
//!
//! All keys live under `{ns}:` and expire after the result TTL:
//! - `{ns}:job:{job}` hash: state, task, counters and times (see [`JobStatus`]);
//! - `{ns}:job:{job}:results` hash: batch number → result (JSON text);
//! - `{ns}:job:{job}:dead` hash: batch number → why it was dead-lettered (JSON text);
//! - `{ns}:jobs` sorted set: job ids by creation time.
//!
//! The scripts are the `.lua` files beside this one, each prefixed with the job states as a
//! Lua table (from [`JobState`]) and the shared functions of `prelude.lua`.
//!
//! Every change to a job is one Lua script, so that it is atomic and idempotent: a result is
//! stored with `HSETNX`, and the counters move only when that stored something. A batch that is
//! delivered twice therefore never counts twice.

use std::collections::BTreeMap;

use redis::aio::ConnectionManager;
use serde_json::{json, Value};

use serde::Serialize;
use taskmill_protocol::{now_ms, redact, JobState};

pub use taskmill_protocol::names::Keys;

/// Lua shared by the scripts that change a job: `finish` decides whether a job is finished
/// and sets its state and finish time; `expire_all` gives every key of the call the job's own
/// TTL (the one it was enqueued with, kept in its hash; `fallback` for jobs written before).
const FINISH_LUA: &str = include_str!("lua/prelude.lua");

/// What storing a batch's outcome did (the scripts' return codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Stored and counted.
    Stored,
    /// Already stored (a redelivery): nothing changed.
    Duplicate,
    /// No such job (never registered, expired, or a forged id): nothing changed.
    UnknownJob,
    /// The job never published this batch number: nothing changed.
    UnknownBatch,
}

impl Recorded {
    fn from_code(code: i64) -> Self {
        match code {
            1 => Recorded::Stored,
            -1 => Recorded::UnknownJob,
            -2 => Recorded::UnknownBatch,
            _ => Recorded::Duplicate,
        }
    }
}

/// Lua: store the results of several batches of one job, each at most once, and move the
/// counters once for all of them.
/// KEYS: job, results, dead. ARGV: now, ttl, n, then n × (batch, result, records_done,
/// records_invalid). Returns one code a batch: 1 stored, 0 already done, -1 no such job,
/// -2 a batch number the job never published.
const RECORD_DONE_LUA: &str = include_str!("lua/record_done.lua");

/// Lua: mark one batch dead once. KEYS: job, results, dead. ARGV: batch, reason, now, ttl.
/// Returns {code, summary}: code 1 when marked, 0 when it was already done or already dead,
/// -1 no such job, -2 a batch number the job never published; summary 1 when the job is
/// finished without a summary.
const RECORD_DEAD_LUA: &str = include_str!("lua/record_dead.lua");

/// Lua: count one retry of a batch of an existing job. KEYS: job. ARGV: batch. Returns 1
/// when counted, -1 no such job, -2 a batch number the job never published.
const ADD_RETRY_LUA: &str = include_str!("lua/add_retry.lua");

/// Lua: raise a counter of an existing job (never lowers it). KEYS: job. ARGV: field, n.
const RAISE_LUA: &str = include_str!("lua/raise.lua");

/// Lua: publishing ended. KEYS: job. ARGV: batches_total, records_total, records_invalid,
/// sources_failed, problems, now, ttl.
const FINISH_PUBLISHING_LUA: &str = include_str!("lua/finish_publishing.lua");

/// Lua: register a new job unless the id is taken. KEYS: job, jobs. ARGV: id, task, queue,
/// params, now, ttl, prefix of job keys. Returns 1 when registered, 0 when the id already
/// exists. The job keeps its TTL in its hash; the index lives as long as its longest-lived
/// job, and ids of expired jobs are dropped from it (the oldest few at each registration,
/// the rest when it is listed).
const REGISTER_LUA: &str = include_str!("lua/register.lua");

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Redis could not be reached or answered with an error.
    #[error("Redis at {url}: {source}")]
    Redis {
        /// The URL without its password.
        url: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// A job id given by the user is taken.
    #[error("job {0} already exists; choose another --job id")]
    JobExists(String),
    /// A job's hash holds something that is not a job (written by something else).
    #[error(transparent)]
    BadJob(#[from] BadJobHash),
}

impl StoreError {
    /// True when retrying later may succeed (connection trouble, a restarting server).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_timeout()
                    || server_codes(source).iter().any(|code| {
                        matches!(
                            code.as_str(),
                            // Redis is full (maxmemory with noeviction), busy with a script,
                            // loading, a replica that cannot write, a primary cut from its
                            // replicas, a cluster slot moving: each passes, none is the batch's
                            // fault. NOSCRIPT: the script cache was flushed (loaded again).
                            "LOADING"
                                | "NOSCRIPT"
                                | "OOM"
                                | "BUSY"
                                | "MASTERDOWN"
                                | "READONLY"
                                | "TRYAGAIN"
                                | "CLUSTERDOWN"
                                | "NOREPLICAS"
                        )
                    })
            }
            StoreError::JobExists(_) | StoreError::BadJob(_) => false,
        }
    }

    /// True when Redis refused the credentials or the permissions: trying again cannot help.
    pub fn refused(&self) -> bool {
        match self {
            StoreError::Redis { source, .. } => {
                matches!(source.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
                    || source.kind() == redis::ErrorKind::AuthenticationFailed
            }
            StoreError::JobExists(_) | StoreError::BadJob(_) => false,
        }
    }
}

/// The codes of the server errors in `e`: its own, or each failed command's in a pipeline
/// (whose error has no code of its own: "Pipeline failure: [(Index 0, error: OOM ...)]").
fn server_codes(e: &redis::RedisError) -> Vec<String> {
    let mut codes: Vec<String> = e.code().map(str::to_string).into_iter().collect();
    if let Some(items) = e.clone().into_server_errors() {
        codes.extend(items.iter().map(|(_, se)| se.code().to_string()));
    }
    codes
}

/// A new job, as the producer registers it before its first batch.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// Job id.
    pub id: &'a str,
    /// Task name.
    pub task: &'a str,
    /// Short name of the work queue.
    pub queue: &'a str,
    /// Task parameters.
    pub params: &'a BTreeMap<String, String>,
    /// While this job is pending or running, no other job with this key is registered.
    pub unique_key: Option<&'a str>,
}

/// What registering a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The job is registered.
    New,
    /// Another job holds the unique key and is still pending or running: nothing registered.
    Duplicate(String),
}

/// What the producer knows once publishing has ended.
#[derive(Debug, Clone, Default)]
pub struct PublishTotals {
    /// Batches published (and confirmed).
    pub batches: u64,
    /// Records in those batches.
    pub records: u64,
    /// Records the producer skipped (unparseable, not an object, too large).
    pub records_invalid: u64,
    /// Sources (URLs, files) that could not be read at all.
    pub sources_failed: u64,
    /// The first few problems, one sentence each, with source and line.
    pub problems: Vec<String>,
    /// The enqueue was interrupted (a signal): what was published runs, the job is
    /// `interrupted`.
    pub interrupted: bool,
}

/// One batch's outcome to store.
#[derive(Debug, Clone)]
pub struct DoneBatch {
    /// Job id.
    pub job: String,
    /// Batch number.
    pub batch: u64,
    /// The task's result, as JSON text.
    pub result: String,
    /// Records the task used.
    pub records_done: u64,
    /// Records the task skipped.
    pub records_invalid: u64,
}

/// A job as read from its Redis hash.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobStatus {
    /// Job id.
    pub job: String,
    /// Where the job is.
    pub state: JobState,
    /// Task name.
    pub task: String,
    /// Short name of the work queue.
    pub queue: String,
    /// Task parameters.
    pub params: BTreeMap<String, String>,
    /// Seconds every key of the job lives (as enqueued).
    pub ttl: u64,
    /// Batches in the job, known once publishing ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches_total: Option<u64>,
    /// Batches published so far (never behind `batches_done + batches_dead`).
    pub batches_published: u64,
    /// Batches whose result is stored.
    pub batches_done: u64,
    /// Batches dead-lettered.
    pub batches_dead: u64,
    /// Records published.
    pub records_total: u64,
    /// Records the tasks used.
    pub records_done: u64,
    /// Records skipped (by the producer or by a task).
    pub records_invalid: u64,
    /// Batches dropped unrun because the job was cancelled.
    pub batches_cancelled: u64,
    /// Batches dropped unrun because they were not started before the job's expiry.
    pub batches_expired: u64,
    /// Batches given up on: they could no longer arrive (a stalled job). Left out of the
    /// JSON while 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub batches_lost: u64,
    /// Retries of the job's batches.
    pub retries: u64,
    /// Sources (URLs, files) that could not be read.
    pub sources_failed: u64,
    /// The first problems the producer reported, with source and line.
    pub problems: Vec<String>,
    /// When it was registered, ms since the epoch.
    pub created_ms: u64,
    /// When its first batch settled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// When it finished (for a cancelled job: when it was cancelled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// When it was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancelled_ms: Option<u64>,
    /// When its enqueue was interrupted (a signal, or its lease lapsed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted_ms: Option<u64>,
    /// Priority, 0 to 9 (`--priority`).
    pub priority: u64,
    /// Once finished: the task's fold of every batch result, stored by the worker that
    /// stored the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Value>,
    /// No batch starts before this time (`--countdown`, `--eta`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// Batches not started by this time are dropped (`--expires`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// The longest one batch may run (`--time-limit`), in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_limit_ms: Option<u64>,
    /// The least interval between two batch starts (`--rate-limit`), in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_interval_ms: Option<u64>,
    /// The key the rate limit is shared under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_key: Option<String>,
    /// While it publishes, the producer's lease on the job: past it, with no `batches_total`,
    /// the producer is taken to be dead and publishing to have ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_until_ms: Option<u64>,
}

/// One job of a listing: its status, or why its hash cannot be read.
pub type JobRead = Result<JobStatus, BadJobHash>;

/// What cancelling an existing job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// The state it had.
    pub was: JobState,
    /// True when it is cancelled now; false when it had finished already (nothing changed).
    pub now: bool,
}

/// Whether a worker's heartbeat (as [`Store::workers`] returns it) says it is alive at `now`:
/// it has not said it stopped and has beaten within three of its periods.
pub fn heartbeat_alive(heartbeat: &Value, now: u64) -> bool {
    let seen = heartbeat["last_seen_ms"].as_u64().unwrap_or(0);
    let period = heartbeat["heartbeat_ms"].as_u64().unwrap_or(2000);
    heartbeat["stopped_ms"].as_u64().is_none() && now.saturating_sub(seen) <= period * 3
}

/// A job whose hash cannot be read as a job: edited by hand, or written by another program.
/// Readers report it (its id and what is wrong) and go on with the other jobs; `delete`
/// removes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {job} is unreadable: {field}: {why}")]
pub struct BadJobHash {
    /// The job.
    pub job: String,
    /// The field (or `key` when the job's key is not a hash at all).
    pub field: String,
    /// What is wrong with it, with what it holds.
    pub why: String,
}

impl BadJobHash {
    fn new(job: &str, field: &str, why: impl Into<String>) -> Self {
        Self {
            job: job.to_string(),
            field: field.to_string(),
            why: why.into(),
        }
    }

    /// `field: why`, the part after the job's id.
    pub fn reason(&self) -> String {
        format!("{}: {}", self.field, self.why)
    }

    /// The job in a listing: its id and why it cannot be read.
    pub fn to_json(&self) -> Value {
        json!({"job": self.job, "unreadable": self.reason()})
    }
}

/// A job hash without a lease whose job was registered longer ago than this counts as
/// abandoned by its producer (which writes its lease right after registering).
pub const LEASE_GRACE_MS: u64 = 60_000;

impl JobStatus {
    /// Reads a job hash (all fields as strings).
    pub fn from_hash(job: &str, f: &BTreeMap<String, String>) -> Result<Self, BadJobHash> {
        let bad = |field: &str, value: &str, what: &str| {
            let shown: String = value.chars().take(100).collect();
            BadJobHash::new(job, field, format!("holds {shown:?}, {what}"))
        };
        let opt = |field: &str| -> Result<Option<u64>, BadJobHash> {
            match f.get(field) {
                None => Ok(None),
                Some(v) => v
                    .parse::<i64>()
                    .map(|n| Some(n.max(0) as u64))
                    .map_err(|_| bad(field, v, "not a whole number")),
            }
        };
        let num = |field: &str| opt(field).map(Option::unwrap_or_default);
        let text = |field: &str| f.get(field).cloned().unwrap_or_default();
        let state = match f.get("state") {
            None => return Err(BadJobHash::new(job, "state", "missing")),
            Some(raw) => raw
                .parse()
                .map_err(|_| bad("state", raw, "not a job state"))?,
        };
        Ok(Self {
            job: job.to_string(),
            state,
            task: text("task"),
            queue: text("queue"),
            params: f
                .get("params")
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or_default(),
            ttl: num("ttl")?,
            batches_total: opt("batches_total")?,
            batches_published: num("batches_published")?,
            batches_done: num("batches_done")?,
            batches_dead: num("batches_dead")?,
            records_total: num("records_total")?,
            records_done: num("records_done")?,
            records_invalid: num("records_invalid")?,
            batches_cancelled: num("batches_cancelled")?,
            batches_expired: num("batches_expired")?,
            batches_lost: num("batches_lost")?,
            retries: num("retries")?,
            sources_failed: num("sources_failed")?,
            problems: f
                .get("problems")
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or_default(),
            created_ms: num("created_ms")?,
            started_ms: opt("started_ms")?,
            finished_ms: opt("finished_ms")?,
            cancelled_ms: opt("cancelled_ms")?,
            interrupted_ms: opt("interrupted_ms")?,
            priority: num("priority")?,
            summary: f.get("summary").and_then(|v| serde_json::from_str(v).ok()),
            eta_ms: opt("eta_ms")?,
            expires_ms: opt("expires_ms")?,
            lease_until_ms: opt("lease_until_ms")?,
            time_limit_ms: opt("time_limit_ms")?,
            rate_interval_ms: opt("rate_interval_ms")?,
            rate_key: f.get("rate_key").cloned(),
        })
    }

    /// The state.
    pub fn state(&self) -> JobState {
        self.state
    }
    /// The task name.
    pub fn task(&self) -> &str {
        &self.task
    }
    /// Finished: completed, completed with errors, cancelled, or interrupted with everything
    /// it published settled.
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
            || (self.state == JobState::Interrupted && self.finished_ms.is_some())
    }
    /// Publishing has no total and nobody is renewing the lease any more (the producer died):
    /// the lease script settles it. The same rule as `check_lease.lua`.
    pub fn lease_lapsed(&self, now: u64) -> bool {
        self.batches_total.is_none()
            && match self.lease_until_ms {
                Some(until) => until < now,
                None => self.created_ms.saturating_add(LEASE_GRACE_MS) < now,
            }
    }
    /// The problems the producer reported (first few).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
    /// The status as one JSON object: numbers as numbers, plus `job`.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| json!({"job": self.job}))
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The Lua scripts, built once.
struct Scripts {
    done: redis::Script,
    dead: redis::Script,
    finish_publishing: redis::Script,
    register: redis::Script,
    add_retry: redis::Script,
    cancel: redis::Script,
    take_slot: redis::Script,
    check_lease: redis::Script,
    delete: redis::Script,
    record_dropped: redis::Script,
    raise: redis::Script,
    reopen: redis::Script,
    stall: redis::Script,
    add_problem: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let states = JobState::lua_table();
        let with_finish = |body: &str| redis::Script::new(&format!("{states}{FINISH_LUA}\n{body}"));
        Self {
            done: with_finish(RECORD_DONE_LUA),
            dead: with_finish(RECORD_DEAD_LUA),
            finish_publishing: with_finish(FINISH_PUBLISHING_LUA),
            register: with_finish(REGISTER_LUA),
            add_retry: with_finish(ADD_RETRY_LUA),
            cancel: with_finish(include_str!("lua/cancel.lua")),
            take_slot: redis::Script::new(include_str!("lua/take_slot.lua")),
            check_lease: with_finish(include_str!("lua/check_lease.lua")),
            delete: with_finish(include_str!("lua/delete.lua")),
            record_dropped: with_finish(include_str!("lua/record_dropped.lua")),
            raise: with_finish(RAISE_LUA),
            reopen: with_finish(include_str!("lua/reopen.lua")),
            stall: with_finish(include_str!("lua/stall.lua")),
            add_problem: with_finish(
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end\n\
                 append_problem(KEYS[1], ARGV[1])\nreturn 1",
            ),
        }
    }
}

/// A handle on one namespace's jobs in Redis. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub struct Store {
    con: ConnectionManager,
    keys: Keys,
    ttl: u64,
    url: String,
    scripts: std::sync::Arc<Scripts>,
}

impl Store {
    /// Connects to Redis at `url`, for namespace `ns`, keys expiring after `ttl` seconds.
    pub async fn connect(url: &str, ns: &str, ttl: u64) -> Result<Self, StoreError> {
        let err = |source| StoreError::Redis {
            url: redact(url),
            source,
        };
        let client = redis::Client::open(url).map_err(err)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(3)
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        let con = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(err)?;
        let store = Self {
            con,
            keys: Keys::new(ns),
            ttl: ttl.max(1),
            url: redact(url),
            scripts: std::sync::Arc::new(Scripts::new()),
        };
        store.load_scripts().await?;
        Ok(store)
    }

    /// The key names in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn err(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    /// Loads the scripts, so that pipelines can call them by hash (again after a Redis restart).
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        for s in [
            &self.scripts.done,
            &self.scripts.dead,
            &self.scripts.finish_publishing,
            &self.scripts.register,
            &self.scripts.add_retry,
            &self.scripts.cancel,
            &self.scripts.take_slot,
            &self.scripts.check_lease,
            &self.scripts.delete,
            &self.scripts.record_dropped,
            &self.scripts.raise,
            &self.scripts.reopen,
        ] {
            s.load_async(&mut con).await.map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Registers a job; fails when its id is taken.
    #[tracing::instrument(level = "debug", skip_all, fields(job = %job.id))]
    pub async fn register_job(&self, job: &NewJob<'_>) -> Result<Registered, StoreError> {
        let params = serde_json::to_string(job.params).unwrap_or_else(|_| "{}".into());
        let mut con = self.con.clone();
        let unique = job
            .unique_key
            .map(|k| self.keys.unique(k))
            .unwrap_or_default();
        let created: redis::Value = self
            .scripts
            .register
            .key(self.keys.job(job.id))
            .key(self.keys.jobs())
            .key(unique)
            .arg(job.id)
            .arg(job.task)
            .arg(job.queue)
            .arg(params)
            .arg(now_ms())
            .arg(self.ttl)
            .arg(self.keys.job(""))
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        match created {
            redis::Value::Int(1) => Ok(Registered::New),
            redis::Value::BulkString(holder) => Ok(Registered::Duplicate(
                String::from_utf8_lossy(&holder).into_owned(),
            )),
            _ => Err(StoreError::JobExists(job.id.to_string())),
        }
    }

    /// The job holding unique key `key` (pending or running), if any.
    pub async fn unique_holder(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut con = self.con.clone();
        let holder: Option<String> = redis::cmd("GET")
            .arg(self.keys.unique(key))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        let prefix = self.keys.job("");
        let Some(id) = holder.and_then(|h| h.strip_prefix(&prefix).map(str::to_string)) else {
            return Ok(None);
        };
        Ok(self
            .job_status(&id)
            .await?
            .filter(|s| !s.is_finished() && s.state != JobState::Cancelled)
            .map(|_| id))
    }

    /// Whether a job of that id exists.
    pub async fn job_exists(&self, job: &str) -> Result<bool, StoreError> {
        let mut con = self.con.clone();
        redis::cmd("EXISTS")
            .arg(self.keys.job(job))
            .query_async::<i64>(&mut con)
            .await
            .map(|n| n > 0)
            .map_err(|e| self.err(e))
    }

    /// Raises `batches_published` to `batches` (the batches confirmed so far; the workers also
    /// keep it at least `batches_done + batches_dead`, so it is never behind them).
    pub async fn set_published(&self, job: &str, batches: u64) -> Result<(), StoreError> {
        self.raise(job, "batches_published", batches).await
    }

    /// Raises `batches_reserved` to `batches`: the producer reserves batch numbers, ahead,
    /// before it publishes them; while a job is publishing, workers refuse batch numbers at or
    /// above it (afterwards, at or above `batches_total`).
    pub async fn reserve_batches(&self, job: &str, batches: u64) -> Result<(), StoreError> {
        self.raise(job, "batches_reserved", batches).await
    }

    async fn raise(&self, job: &str, field: &str, n: u64) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        self.scripts
            .raise
            .key(self.keys.job(job))
            .arg(field)
            .arg(n)
            .invoke_async::<i64>(&mut con)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Publishing ended: sets the totals, which may finish the job at once. True when it did
    /// and the job has no summary yet (ask a worker to fold it).
    pub async fn finish_publishing(
        &self,
        job: &str,
        totals: &PublishTotals,
    ) -> Result<bool, StoreError> {
        let problems = serde_json::to_string(&totals.problems).unwrap_or_else(|_| "[]".into());
        let mut con = self.con.clone();
        let code: i64 = self
            .scripts
            .finish_publishing
            .key(self.keys.job(job))
            .arg(totals.batches)
            .arg(totals.records)
            .arg(totals.records_invalid)
            .arg(totals.sources_failed)
            .arg(problems)
            .arg(now_ms())
            .arg(self.ttl)
            .arg(if totals.interrupted { "1" } else { "0" })
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(code == 2)
    }

    /// Rate limit: 0 when a batch of rate key `key` may start now (the slot is taken), else
    /// how many ms to wait; at most one start per `interval_ms` across all workers.
    pub async fn take_slot(&self, key: &str, interval_ms: u64) -> Result<u64, StoreError> {
        let mut con = self.con.clone();
        self.scripts
            .take_slot
            .key(self.keys.rate(key))
            .arg(interval_ms.max(1))
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Records the tasks a worker serves in the catalog (JSON entries by task name), each
    /// expiring after `ttl_secs` unless renewed: the catalog shows the tasks of the live
    /// workers.
    pub async fn publish_catalog(
        &self,
        entries: &[(String, Value)],
        ttl_secs: u64,
    ) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        for (name, entry) in entries {
            for queue in entry["queues"].as_array().into_iter().flatten() {
                if let Some(q) = queue.as_str() {
                    pipe.cmd("SET")
                        .arg(self.keys.served(q, name))
                        .arg(1)
                        .arg("EX")
                        .arg(ttl_secs.max(1))
                        .ignore();
                }
            }
            pipe.cmd("SADD").arg(self.keys.catalog()).arg(name).ignore();
            // The set of names lives as long as its entries (it never expired before).
            pipe.cmd("EXPIRE")
                .arg(self.keys.catalog())
                .arg(ttl_secs.max(1))
                .ignore();
            pipe.cmd("SET")
                .arg(self.keys.catalog_task(name))
                .arg(entry.to_string())
                .arg("EX")
                .arg(ttl_secs.max(1))
                .ignore();
        }
        pipe.query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Whether a live worker consuming `queue` (short name) serves `task`.
    pub async fn served(&self, queue: &str, task: &str) -> Result<bool, StoreError> {
        let mut con = self.con.clone();
        redis::cmd("EXISTS")
            .arg(self.keys.served(queue, task))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The catalog: the entries of the tasks live workers serve, by name.
    pub async fn catalog(&self) -> Result<Vec<Value>, StoreError> {
        let mut con = self.con.clone();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.catalog())
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        names.sort();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names.iter().map(|n| self.keys.catalog_task(n)).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for (name, entry) in names.iter().zip(raw) {
            match entry.and_then(|e| serde_json::from_str(&e).ok()) {
                Some(v) => out.push(v),
                None => {
                    // No live worker serves it any more.
                    let _: Result<i64, _> = redis::cmd("SREM")
                        .arg(self.keys.catalog())
                        .arg(name)
                        .query_async(&mut con)
                        .await;
                }
            }
        }
        Ok(out)
    }

    /// Records a worker's heartbeat: its JSON (kept `keep_secs` so that a worker that
    /// stopped is still shown, as gone), and its id in the index by `now_ms`. Ids older than
    /// `keep_secs` leave the index.
    pub async fn heartbeat(
        &self,
        id: &str,
        entry: &Value,
        now_ms: u64,
        keep_secs: u64,
    ) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        let index = self.keys.workers();
        redis::pipe()
            .cmd("SET")
            .arg(self.keys.worker(id))
            .arg(entry.to_string())
            .arg("EX")
            .arg(keep_secs)
            .ignore()
            .cmd("ZADD")
            .arg(&index)
            .arg(now_ms)
            .arg(id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(now_ms.saturating_sub(keep_secs * 1000))
            .ignore()
            .cmd("EXPIRE")
            .arg(&index)
            .arg(keep_secs)
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The workers' last heartbeats, most recent first.
    pub async fn workers(&self) -> Result<Vec<Value>, StoreError> {
        let mut con = self.con.clone();
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.keys.workers())
            .arg(0)
            .arg(-1)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.worker(id)).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(raw
            .into_iter()
            .flatten()
            .filter_map(|e| serde_json::from_str(&e).ok())
            .collect())
    }

    /// Every key of this namespace (`{ns}:*`, read with SCAN, so Redis is never blocked).
    pub async fn keys_of_namespace(&self) -> Result<Vec<String>, StoreError> {
        let mut con = self.con.clone();
        let pattern = format!("{}:*", self.keys.ns());
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            out.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Deletes these keys (a thousand a command).
    pub async fn delete_keys(&self, keys: &[String]) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        for chunk in keys.chunks(1000) {
            redis::cmd("DEL")
                .arg(chunk)
                .query_async::<i64>(&mut con)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Takes the lock `key` for `owner`, or keeps it when `owner` holds it already; it lapses
    /// after `ttl` unless taken again. True when `owner` holds it now.
    pub async fn hold_lock(&self, key: &str, owner: &str, ttl: std::time::Duration) -> bool {
        const HOLD: &str = r"
            if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
            if redis.call('GET', KEYS[1]) == ARGV[1] then
                redis.call('PEXPIRE', KEYS[1], ARGV[2])
                return 1
            end
            return 0
        ";
        let mut con = self.con.clone();
        redis::Script::new(HOLD)
            .key(key)
            .arg(owner)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async::<i64>(&mut con)
            .await
            .is_ok_and(|held| held == 1)
    }

    /// Jobs not finished whose last progress is at or before `before_ms` (ms), oldest first,
    /// at most `limit`, each with its score as stored (for [`Store::mark_stalled`]).
    pub async fn quiet_jobs(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let mut con = self.con.clone();
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.active_jobs())
            .arg("-inf")
            .arg(before_ms)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Takes `job` out of the jobs not finished (its hash is gone, or it is finished).
    pub async fn forget_active(&self, job: &str) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        redis::cmd("ZREM")
            .arg(self.keys.active_jobs())
            .arg(job)
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Records that a delay queue exists (full name): a job's retries may wait there.
    pub async fn add_delay_queue(&self, name: &str) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        redis::cmd("SADD")
            .arg(self.keys.delay_queues())
            .arg(name)
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The delay queues workers declared (full names; some may have been deleted since).
    pub async fn delay_queues(&self) -> Result<Vec<String>, StoreError> {
        let mut con = self.con.clone();
        redis::cmd("SMEMBERS")
            .arg(self.keys.delay_queues())
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Forgets a delay queue that no longer exists.
    pub async fn forget_delay_queue(&self, name: &str) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        redis::cmd("SREM")
            .arg(self.keys.delay_queues())
            .arg(name)
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Gives up on the batches of `job` not settled yet, if it made no progress since `score`
    /// (its last progress, as [`Store::quiet_jobs`] gave it): they are counted lost, `problem`
    /// (with `{lost}` replaced by their number) joins its problems, and the job finishes
    /// (`stalled`; an interrupted job keeps its state). Returns None when nothing changed
    /// (progress since, finished, still publishing), else the batches lost and whether the
    /// job wants a summary folded.
    pub async fn mark_stalled(
        &self,
        job: &str,
        score: f64,
        problem: &str,
    ) -> Result<Option<(u64, bool)>, StoreError> {
        let mut con = self.con.clone();
        let (code, lost, summary): (i64, i64, i64) = self
            .scripts
            .stall
            .key(self.keys.job(job))
            .arg(now_ms())
            .arg(score)
            .arg(problem)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok((code == 1).then_some((lost.max(0) as u64, summary == 1)))
    }

    /// Takes a lock that lapses after `ttl` (SET NX PX); true when this call took it.
    pub async fn try_lock(&self, key: &str, ttl: std::time::Duration) -> bool {
        let mut con = self.con.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(now_ms())
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async::<Option<String>>(&mut con)
            .await
            .ok()
            .flatten()
            .is_some()
    }

    /// Appends a sample to a capped list (newest last), keeping the last `keep` samples.
    pub async fn push_sample(
        &self,
        key: &str,
        sample: &Value,
        keep: usize,
    ) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        redis::pipe()
            .cmd("RPUSH")
            .arg(key)
            .arg(sample.to_string())
            .ignore()
            .cmd("LTRIM")
            .arg(key)
            .arg(-(keep as i64))
            .arg(-1)
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The samples of a capped list, oldest first.
    pub async fn samples(&self, key: &str) -> Result<Vec<Value>, StoreError> {
        let mut con = self.con.clone();
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(raw
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect())
    }

    /// Records a job's options (`eta_ms`, `expires_ms`, `priority`) in its hash, for people.
    pub async fn set_timing(
        &self,
        job: &str,
        eta_ms: Option<u64>,
        expires_ms: Option<u64>,
        priority: u8,
    ) -> Result<(), StoreError> {
        let priority = (priority > 0).then_some(u64::from(priority));
        for (field, v) in [
            ("eta_ms", eta_ms),
            ("expires_ms", expires_ms),
            ("priority", priority),
        ] {
            if let Some(v) = v {
                self.raise(job, field, v).await?;
            }
        }
        Ok(())
    }

    /// Records the job's limits, as its batches carry them in headers, so that readers can
    /// show them: `time_limit_ms`, `rate_interval_ms`, `rate_key` (those given).
    pub async fn set_limits(
        &self,
        job: &str,
        time_limit_ms: Option<u64>,
        rate_interval_ms: Option<u64>,
        rate_key: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some(t) = time_limit_ms {
            fields.push(("time_limit_ms", t.to_string()));
        }
        if let Some(r) = rate_interval_ms {
            fields.push(("rate_interval_ms", r.to_string()));
        }
        if let Some(k) = rate_key {
            fields.push(("rate_key", k.to_string()));
        }
        if fields.is_empty() {
            return Ok(());
        }
        let mut con = self.con.clone();
        redis::cmd("HSET")
            .arg(self.keys.job(job))
            .arg(fields)
            .query_async::<i64>(&mut con)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Extends the producer's lease on a publishing job to `until_ms`. A job whose lease
    /// lapses before publishing ended (the producer was killed) becomes `interrupted` when it
    /// is next read.
    pub async fn renew_lease(&self, job: &str, until_ms: u64) -> Result<(), StoreError> {
        self.raise(job, "lease_until_ms", until_ms).await
    }

    /// Stores many batches' results in one round trip (one script call per job). Returns, for
    /// each, what happened: stored, a duplicate (a redelivered batch whose result was already
    /// stored), or refused (no such job, or a batch number the job never published).
    pub async fn record_done_many(
        &self,
        batches: &[DoneBatch],
    ) -> Result<Vec<Recorded>, StoreError> {
        Ok(self.record_done_finishing(batches).await?.0)
    }

    /// [`Store::record_done_many`], also naming the jobs these results finished that have no
    /// summary yet (the caller folds their results into one: [`Store::set_summary`]).
    pub async fn record_done_finishing(
        &self,
        batches: &[DoneBatch],
    ) -> Result<(Vec<Recorded>, Vec<String>), StoreError> {
        if batches.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        // Group by job, keeping each batch's position in the input.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            match groups.iter_mut().find(|(job, _)| *job == b.job) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((&b.job, vec![i])),
            }
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (job, idx) in &groups {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.scripts.done.get_hash())
                .arg(3)
                .arg(self.keys.job(job))
                .arg(self.keys.results(job))
                .arg(self.keys.dead(job))
                .arg(now)
                .arg(self.ttl)
                .arg(idx.len());
            for &i in idx {
                let b = &batches[i];
                cmd.arg(b.batch)
                    .arg(&b.result)
                    .arg(b.records_done)
                    .arg(b.records_invalid);
            }
        }
        let flags: Vec<Vec<i64>> = self.query_with_scripts(&pipe).await?;
        let mut out = vec![Recorded::Duplicate; batches.len()];
        let mut finished = Vec::new();
        for ((job, idx), f) in groups.iter().zip(flags) {
            if f.get(idx.len()) == Some(&1) {
                finished.push(job.to_string());
            }
            for (&i, flag) in idx.iter().zip(f) {
                out[i] = Recorded::from_code(flag);
            }
        }
        Ok((out, finished))
    }

    /// Stores a finished job's summary (its task's fold of every batch result).
    pub async fn set_summary(&self, job: &str, summary: &Value) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        let key = self.keys.job(job);
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        if exists == 1 {
            redis::cmd("HSET")
                .arg(&key)
                .arg("summary")
                .arg(summary.to_string())
                .query_async::<()>(&mut con)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Adds `text` to the job's problems (shown by `status` and the dashboard), when the job
    /// exists: what went wrong after its batches ran (its summary could not be folded, say).
    pub async fn add_problem(&self, job: &str, text: &str) -> Result<(), StoreError> {
        let mut con = self.con.clone();
        self.scripts
            .add_problem
            .key(self.keys.job(job))
            .arg(text)
            .invoke_async::<i64>(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Counts one retry of a job's batch: `Stored` when counted, or refused (no such job, or
    /// a batch number the job never published) without changing anything.
    pub async fn add_retry(
        &self,
        job: &str,
        batch: u64,
        attempt: u32,
    ) -> Result<Recorded, StoreError> {
        let mut con = self.con.clone();
        let code = self
            .scripts
            .add_retry
            .key(self.keys.job(job))
            .key(self.keys.retried(job))
            .arg(batch)
            .arg(attempt)
            .arg(self.ttl)
            .arg(now_ms())
            .invoke_async::<i64>(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Recorded::from_code(code))
    }

    /// Marks a batch dead with its reason: `Stored` when counted now, `Duplicate` when it was
    /// already done or dead, or refused like [`Store::record_done_many`].
    pub async fn record_dead(
        &self,
        job: &str,
        batch: u64,
        reason: &Value,
    ) -> Result<Recorded, StoreError> {
        Ok(self.record_dead_finishing(job, batch, reason).await?.0)
    }

    /// [`Store::record_dead`], also saying whether the job is finished without a summary (the
    /// caller, when it has the job's task, folds one; whoever marked the batch).
    pub async fn record_dead_finishing(
        &self,
        job: &str,
        batch: u64,
        reason: &Value,
    ) -> Result<(Recorded, bool), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.scripts.dead.get_hash())
            .arg(3)
            .arg(self.keys.job(job))
            .arg(self.keys.results(job))
            .arg(self.keys.dead(job))
            .arg(batch)
            .arg(reason.to_string())
            .arg(now_ms())
            .arg(self.ttl);
        let got: Vec<(i64, i64)> = self.query_with_scripts(&pipe).await?;
        let (code, summary) = got.first().copied().unwrap_or((0, 0));
        Ok((Recorded::from_code(code), summary == 1))
    }

    /// A dead batch is about to be replayed: it stops counting as dead and its job is open
    /// again until it settles (`reopen.lua`). Returns the reason it died when it was dead
    /// (to restore it with [`Store::record_dead`] if the replay cannot be published), None
    /// when it was not (done since, or never counted) or there is no such job.
    #[tracing::instrument(level = "debug", skip_all, fields(job = %job, batch))]
    pub async fn reopen_batch(&self, job: &str, batch: u64) -> Result<Option<Value>, StoreError> {
        let mut con = self.con.clone();
        let got: Option<(i64, String)> = self
            .scripts
            .reopen
            .key(self.keys.job(job))
            .key(self.keys.dead(job))
            .arg(batch)
            .arg(now_ms())
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(match got {
            Some((1, reason)) => {
                Some(serde_json::from_str(&reason).unwrap_or(Value::String(reason)))
            }
            _ => None,
        })
    }

    /// Runs a pipeline of EVALSHA calls, loading the scripts again if Redis lost them.
    async fn query_with_scripts<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut con = self.con.clone();
        match pipe.query_async(&mut con).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.load_scripts().await?;
                pipe.query_async(&mut con).await.map_err(|e| self.err(e))
            }
            other => other.map_err(|e| self.err(e)),
        }
    }

    /// Cancels a job: `Ok(None)` when there is no such job; a job whose state cannot be read
    /// is left as it is ([`StoreError::BadJob`]).
    #[tracing::instrument(level = "debug", skip_all, fields(job = %job))]
    pub async fn cancel(&self, job: &str) -> Result<Option<Cancelled>, StoreError> {
        let mut con = self.con.clone();
        let got: Option<(i64, String)> = self
            .scripts
            .cancel
            .key(self.keys.job(job))
            .key(self.keys.cancelled_jobs())
            .arg(job)
            .arg(now_ms())
            .invoke_async(&mut con)
            .await
            .or_else(|e| Err(StoreError::from(self.unreadable(job, "key", e)?)))?;
        let Some((code, before)) = got else {
            return Ok(None);
        };
        let parsed = before.parse::<JobState>();
        match (code, parsed) {
            (1, Ok(was)) => Ok(Some(Cancelled { was, now: true })),
            (2, Ok(was)) => Ok(Some(Cancelled { was, now: false })),
            _ if before.is_empty() => Err(BadJobHash::new(job, "state", "missing").into()),
            _ => Err(BadJobHash::new(
                job,
                "state",
                format!(
                    "holds {:?}, not a job state",
                    before.chars().take(100).collect::<String>()
                ),
            )
            .into()),
        }
    }

    /// Deletes a job's keys (hash, results, dead and cancelled batches) and its index entries;
    /// true when it existed.
    #[tracing::instrument(level = "debug", skip_all, fields(job = %job))]
    pub async fn delete_job(&self, job: &str) -> Result<bool, StoreError> {
        let mut con = self.con.clone();
        let existed: i64 = self
            .scripts
            .delete
            .key(self.keys.job(job))
            .key(self.keys.results(job))
            .key(self.keys.dead(job))
            .key(self.keys.dropped(job))
            .key(self.keys.retried(job))
            .key(self.keys.jobs())
            .key(self.keys.cancelled_jobs())
            .arg(job)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(existed == 1)
    }

    /// Counts a batch dropped unrun (once): `expired` says why (its time ran out), else its
    /// job was cancelled.
    pub async fn record_dropped(
        &self,
        job: &str,
        batch: u64,
        expired: bool,
    ) -> Result<Recorded, StoreError> {
        let counter = if expired {
            "batches_expired"
        } else {
            "batches_cancelled"
        };
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg(self.scripts.record_dropped.get_hash())
            .arg(4)
            .arg(self.keys.job(job))
            .arg(self.keys.results(job))
            .arg(self.keys.dead(job))
            .arg(self.keys.dropped(job))
            .arg(batch)
            .arg(now_ms())
            .arg(self.ttl)
            .arg(counter);
        let flags: Vec<i64> = self.query_with_scripts(&pipe).await?;
        Ok(Recorded::from_code(flags.first().copied().unwrap_or(0)))
    }

    /// Ids of the cancelled jobs of the namespace.
    pub async fn cancelled_jobs(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut con = self.con.clone();
        redis::cmd("SMEMBERS")
            .arg(self.keys.cancelled_jobs())
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// A job's status, or None when no such job is known (or it expired); a hash that is
    /// not a job's is [`StoreError::BadJob`]. A lapsed publishing lease is settled first.
    pub async fn job_status(&self, job: &str) -> Result<Option<JobStatus>, StoreError> {
        let read = self.job_statuses(&[job.to_string()]).await?;
        match read.into_iter().next().flatten() {
            None => Ok(None),
            Some(Ok(status)) => Ok(Some(status)),
            Some(Err(bad)) => Err(bad.into()),
        }
    }

    /// Several jobs' statuses, one round trip a chunk of 500: None where a job is gone, `Err`
    /// where its hash cannot be read as a job (the others are read all the same). A job whose
    /// producer's lease lapsed is settled by the lease script, once, and read again only when
    /// the script changed it: no read loops.
    #[tracing::instrument(level = "debug", skip_all, fields(jobs = ids.len()))]
    pub async fn job_statuses(&self, ids: &[String]) -> Result<Vec<Option<JobRead>>, StoreError> {
        let mut out = self.read_hashes(ids).await?;
        let now = now_ms();
        let lapsed: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Some(Ok(s)) if s.lease_lapsed(now)))
            .map(|(i, _)| i)
            .collect();
        if lapsed.is_empty() {
            return Ok(out);
        }
        let mut pipe = redis::pipe();
        for &i in &lapsed {
            pipe.cmd("EVALSHA")
                .arg(self.scripts.check_lease.get_hash())
                .arg(1)
                .arg(self.keys.job(&ids[i]))
                .arg(now)
                .arg(LEASE_GRACE_MS);
        }
        let changed: Vec<i64> = self.query_with_scripts(&pipe).await?;
        let again: Vec<usize> = lapsed
            .into_iter()
            .zip(changed)
            .filter(|&(_, c)| c == 1)
            .map(|(i, _)| i)
            .collect();
        let ids_again: Vec<String> = again.iter().map(|&i| ids[i].clone()).collect();
        for (i, read) in again.into_iter().zip(self.read_hashes(&ids_again).await?) {
            out[i] = read;
        }
        Ok(out)
    }

    /// The job hashes of `ids`, parsed, as they are (nothing settled).
    async fn read_hashes(&self, ids: &[String]) -> Result<Vec<Option<JobRead>>, StoreError> {
        let mut con = self.con.clone();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for id in chunk {
                pipe.cmd("HGETALL").arg(self.keys.job(id));
            }
            let hashes: Vec<redis::RedisResult<BTreeMap<String, String>>> =
                pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
            for (id, f) in chunk.iter().zip(hashes) {
                out.push(match f {
                    Ok(f) if f.is_empty() => None,
                    Ok(f) => Some(JobStatus::from_hash(id, &f)),
                    Err(e) => Some(Err(self.unreadable(id, "key", e)?)),
                });
            }
        }
        Ok(out)
    }

    /// A read of one of a job's keys that failed: unreadable when the key holds another
    /// type than taskmill writes there (edited by hand), else the error.
    fn unreadable(
        &self,
        job: &str,
        what: &str,
        e: redis::RedisError,
    ) -> Result<BadJobHash, StoreError> {
        if e.code() == Some("WRONGTYPE") {
            Ok(BadJobHash::new(
                job,
                what,
                "not a hash (the key holds another type: written by something else)",
            ))
        } else {
            Err(self.err(e))
        }
    }

    /// All stored batch results of a job, by batch number.
    pub async fn results(&self, job: &str) -> Result<Vec<(u64, Value)>, StoreError> {
        self.hash_by_batch(job, "results", &self.keys.results(job))
            .await
    }

    /// How many batch results are stored for a job: readers that page through batch numbers
    /// stop once they have seen this many (a total edited by hand cannot make them loop).
    pub async fn results_count(&self, job: &str) -> Result<u64, StoreError> {
        let mut con = self.con.clone();
        match redis::cmd("HLEN")
            .arg(self.keys.results(job))
            .query_async(&mut con)
            .await
        {
            Ok(n) => Ok(n),
            Err(e) => Err(self.unreadable(job, "results", e)?.into()),
        }
    }

    /// The stored results of batches `from..to` of a job, in batch order (batches without a
    /// result, dead or not done yet, are left out): one round trip, memory bounded by the
    /// range.
    pub async fn results_range(
        &self,
        job: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Value)>, StoreError> {
        if to <= from {
            return Ok(Vec::new());
        }
        let mut con = self.con.clone();
        let got: Vec<Option<String>> = match redis::cmd("HMGET")
            .arg(self.keys.results(job))
            .arg((from..to).collect::<Vec<u64>>())
            .query_async(&mut con)
            .await
        {
            Ok(got) => got,
            Err(e) => return Err(self.unreadable(job, "results", e)?.into()),
        };
        Ok((from..to)
            .zip(got)
            .filter_map(|(b, v)| {
                let v = v?;
                Some((b, serde_json::from_str(&v).unwrap_or(Value::String(v))))
            })
            .collect())
    }

    /// Why each dead batch of a job died, by batch number.
    pub async fn dead_batches(&self, job: &str) -> Result<Vec<(u64, Value)>, StoreError> {
        self.hash_by_batch(job, "dead batches", &self.keys.dead(job))
            .await
    }

    /// A hash of batch number → JSON text, parsed and in batch order.
    async fn hash_by_batch(
        &self,
        job: &str,
        what: &str,
        key: &str,
    ) -> Result<Vec<(u64, Value)>, StoreError> {
        let mut con = self.con.clone();
        let raw: BTreeMap<String, String> =
            match redis::cmd("HGETALL").arg(key).query_async(&mut con).await {
                Ok(raw) => raw,
                Err(e) => return Err(self.unreadable(job, what, e)?.into()),
            };
        let mut out: Vec<(u64, Value)> = raw
            .into_iter()
            .filter_map(|(k, v)| {
                let batch = k.parse().ok()?;
                Some((batch, serde_json::from_str(&v).unwrap_or(Value::String(v))))
            })
            .collect();
        out.sort_by_key(|(b, _)| *b);
        Ok(out)
    }

    /// Job ids, oldest first, with their creation time in ms. Ids whose job expired are
    /// left out, and dropped from the index.
    pub async fn jobs(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut con = self.con.clone();
        let raw: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.jobs())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        let mut exists = Vec::with_capacity(raw.len());
        for chunk in raw.chunks(1000) {
            let mut pipe = redis::pipe();
            for (j, _) in chunk {
                pipe.cmd("EXISTS").arg(self.keys.job(j));
            }
            let got: Vec<i64> = pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
            exists.extend(got);
        }
        let mut live = Vec::with_capacity(raw.len());
        let mut gone = Vec::new();
        for ((j, s), e) in raw.into_iter().zip(exists) {
            if e > 0 {
                live.push((j, s as u64));
            } else {
                gone.push(j);
            }
        }
        if !gone.is_empty() {
            redis::cmd("ZREM")
                .arg(self.keys.jobs())
                .arg(&gone)
                .query_async::<i64>(&mut con)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(live)
    }

    /// Puts every job hash of the namespace back into the `{ns}:jobs` index (by its creation
    /// time), for an index deleted or damaged by hand: the hashes are found with `SCAN`.
    /// Returns how many jobs were missing from it.
    pub async fn reindex(&self) -> Result<u64, StoreError> {
        let mut con = self.con.clone();
        let prefix = self.keys.job("");
        let mut cursor: u64 = 0;
        let mut added = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            // A job's own hash: `{ns}:job:{id}`, not one of its `:results`, `:dead`... keys
            // (ids never hold a `:`).
            let ids: Vec<&str> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter(|id| !id.is_empty() && !id.contains(':'))
                .collect();
            if !ids.is_empty() {
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.cmd("HGET").arg(self.keys.job(id)).arg("created_ms");
                }
                let created: Vec<Option<u64>> =
                    pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
                let mut pipe = redis::pipe();
                for (id, at) in ids.iter().zip(created) {
                    pipe.cmd("ZADD")
                        .arg(self.keys.jobs())
                        .arg("NX")
                        .arg(at.unwrap_or(0))
                        .arg(*id);
                }
                let got: Vec<u64> = pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
                added += got.iter().sum::<u64>();
            }
            cursor = next;
            if cursor == 0 {
                return Ok(added);
            }
        }
    }
}
