//! Jobs and results in Redis.
//!
//! All keys live under `{ns}:` and expire after the result TTL:
//! - `{ns}:job:{job}` hash: state, task, counters and times (see [`JobStatus`]);
//! - `{ns}:job:{job}:results` hash: batch number → result (JSON text);
//! - `{ns}:job:{job}:dead` hash: batch number → why it was dead-lettered (JSON text);
//! - `{ns}:jobs` sorted set: job ids by creation time.
//!
//! Here: connecting, registering, publishing, storing outcomes, cancel and delete; `read`:
//! statuses, results, listings; `fleet`: the catalog, heartbeats, locks, samples and what
//! the stalled-job watcher uses; `status`: a job as read from its hash.
//!
//! The scripts are the `.lua` files beside this one, each prefixed with the job states as a
//! Lua table (from [`JobState`]) and the shared functions of `prelude.lua`.
//!
//! Every change to a job is one Lua script, so that it is atomic and idempotent: a result is
//! stored with `HSETNX`, and the counters move only when that stored something. A batch that is
//! delivered twice therefore never counts twice.

pub mod celery;
pub mod chains;
mod conn;
pub mod crashes;
mod fleet;
pub mod hooks;
pub mod parked;
mod read;
mod schedules;
mod status;

pub use status::{heartbeat_alive, BadJobHash, Cancelled, JobRead, JobStatus, LEASE_GRACE_MS};

use std::collections::BTreeMap;

use redis::aio::ConnectionManager;
use serde_json::Value;

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
/// params, now, ttl, prefix of job keys, token. Returns 1 when registered, 0 when the id already
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
    /// The group a job was to join is closed (`producer group close`).
    #[error("group {0} is closed (producer group close): a closed group takes no more jobs")]
    GroupClosed(String),
    /// A job's hash holds something that is not a job (written by something else).
    #[error(transparent)]
    BadJob(#[from] BadJobHash),
    /// A write reached fewer replicas than `wait_replicas` asks for, in time.
    #[error("Redis at {url}: a write reached {got} of the {wanted} replica(s) asked for within {timeout_ms} ms (is a replica down? the REDIS_URL option wait_replicas sets how many)")]
    NotReplicated {
        /// The URL without its password.
        url: String,
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged.
        got: i64,
        /// How long WAIT blocked.
        timeout_ms: u64,
    },
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
            StoreError::NotReplicated { .. } => true,
            StoreError::JobExists(_) | StoreError::GroupClosed(_) | StoreError::BadJob(_) => false,
        }
    }

    /// True when Redis refused the credentials or the permissions: trying again cannot help.
    pub fn refused(&self) -> bool {
        match self {
            StoreError::Redis { source, .. } => {
                matches!(source.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
                    || source.kind() == redis::ErrorKind::AuthenticationFailed
            }
            StoreError::JobExists(_)
            | StoreError::GroupClosed(_)
            | StoreError::BadJob(_)
            | StoreError::NotReplicated { .. } => false,
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
    /// This registration's token (random): registering again with it after an error counts
    /// as registered when the first try got through; empty for none.
    pub token: &'a str,
    /// The follow-up steps ([`chains::Chain`] as JSON), empty for none.
    pub then: &'a str,
    /// The job this one follows up, empty for none.
    pub parent: &'a str,
    /// The group the job belongs to (`enqueue --group`), empty for none.
    pub group: &'a str,
    /// The URL its final status is POSTed to when it ends (`enqueue --on-complete`), empty
    /// for none.
    pub on_complete: &'a str,
    /// How the job (or group) it follows up ended (JSON: state and counters), empty for none.
    pub parent_outcome: &'a str,
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
    celery_result: redis::Script,
    close_group: redis::Script,
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
            celery_result: with_finish(include_str!("lua/celery_result.lua")),
            close_group: with_finish(include_str!("lua/close_group.lua")),
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
    conn: std::sync::Arc<conn::Conn>,
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
        let conn = conn::Conn::open(url).await.map_err(err)?;
        let store = Self {
            conn: std::sync::Arc::new(conn),
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

    /// A handle on the connection (under Sentinel, to the primary the sentinels name now).
    async fn con(&self) -> ConnectionManager {
        self.conn.get().await
    }

    /// After writes that must survive a failover (a result before its batch is acked, a
    /// registration, a retry): `WAIT` until `wait_replicas` replicas have them (a REDIS_URL
    /// option: 1 under Sentinel, else 0 and nothing is sent). `WAIT` covers every write sent
    /// before it on the connection, which all of this process's commands share. Fewer replicas
    /// in time is a passing error: the caller retries (a worker does not ack meanwhile).
    async fn replicated(&self, con: &mut ConnectionManager) -> Result<(), StoreError> {
        let wait = self.conn.wait;
        if wait.replicas == 0 {
            return Ok(());
        }
        let got: i64 = redis::cmd("WAIT")
            .arg(wait.replicas)
            .arg(wait.timeout_ms)
            .query_async(con)
            .await
            .map_err(|e| self.err(e))?;
        if got < i64::from(wait.replicas) {
            // Under Sentinel the primary may have lost its replicas to a failover under way
            // (and be about to turn replica): ask the sentinels again before the next try.
            self.conn.suspect();
            return Err(StoreError::NotReplicated {
                url: self.url.clone(),
                wanted: wait.replicas,
                got,
                timeout_ms: wait.timeout_ms,
            });
        }
        Ok(())
    }

    fn err(&self, source: redis::RedisError) -> StoreError {
        self.conn.saw(&source);
        StoreError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    /// Loads the scripts, so that pipelines can call them by hash (again after a Redis restart).
    pub async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut con = self.con().await;
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
        match self.register(job, None).await? {
            redis::Value::Int(1) => Ok(Registered::New),
            redis::Value::BulkString(holder) => Ok(Registered::Duplicate(
                String::from_utf8_lossy(&holder).into_owned(),
            )),
            redis::Value::Int(3) => Err(StoreError::GroupClosed(job.group.to_string())),
            _ => Err(StoreError::JobExists(job.id.to_string())),
        }
    }

    /// Runs `register.lua` for `job`; `whole`: (batches, records, Celery settings, options
    /// as JSON of field -> text) of a job published whole in one go. The script's answer as
    /// it gave it.
    async fn register(
        &self,
        job: &NewJob<'_>,
        whole: Option<(u64, u64, &str, &str)>,
    ) -> Result<redis::Value, StoreError> {
        let params = serde_json::to_string(job.params).unwrap_or_else(|_| "{}".into());
        let mut con = self.con().await;
        let unique = job
            .unique_key
            .map(|k| self.keys.unique(k))
            .unwrap_or_default();
        let mut call = self.scripts.register.prepare_invoke();
        call.key(self.keys.job(job.id))
            .key(self.keys.jobs())
            .key(unique)
            .key(if job.group.is_empty() {
                String::new()
            } else {
                self.keys.group(job.group)
            })
            .arg(job.id)
            .arg(job.task)
            .arg(job.queue)
            .arg(params)
            .arg(now_ms())
            .arg(self.ttl)
            .arg(self.keys.job(""))
            .arg(job.token)
            .arg(job.then)
            .arg(job.parent)
            .arg(job.group);
        let options = match whole {
            Some((batches, records, celery, options)) => {
                call.arg(batches).arg(records).arg(celery);
                options
            }
            None => {
                call.arg("").arg("").arg("");
                ""
            }
        };
        let outcome;
        let options = if job.parent_outcome.is_empty() {
            options
        } else {
            outcome = serde_json::json!({ "parent_outcome": job.parent_outcome }).to_string();
            &outcome
        };
        call.arg(job.on_complete).arg(options);
        let created: redis::Value = call.invoke_async(&mut con).await.map_err(|e| self.err(e))?;
        self.replicated(&mut con).await?;
        Ok(created)
    }

    /// The job holding unique key `key` (pending or running), if any.
    pub async fn unique_holder(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut con = self.con().await;
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
        let mut con = self.con().await;
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
        let mut con = self.con().await;
        self.scripts
            .raise
            .key(self.keys.job(job))
            .arg(field)
            .arg(n)
            .invoke_async::<i64>(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        self.replicated(&mut con).await
    }

    /// Publishing ended: sets the totals, which may finish the job at once. True when it did
    /// and the job has no summary yet (ask a worker to fold it).
    pub async fn finish_publishing(
        &self,
        job: &str,
        totals: &PublishTotals,
    ) -> Result<bool, StoreError> {
        let problems = serde_json::to_string(&totals.problems).unwrap_or_else(|_| "[]".into());
        let mut con = self.con().await;
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
        self.replicated(&mut con).await?;
        Ok(code == 2)
    }

    /// Rate limit: 0 when a batch of rate key `key` may start now (the slot is taken), else
    /// how many ms to wait; at most one start per `interval_ms` across all workers.
    pub async fn take_slot(&self, key: &str, interval_ms: u64) -> Result<u64, StoreError> {
        let mut con = self.con().await;
        self.scripts
            .take_slot
            .key(self.keys.rate(key))
            .arg(interval_ms.max(1))
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))
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
        let mut con = self.con().await;
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
        let mut con = self.con().await;
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
            self.replicated(&mut con).await?;
        }
        Ok(())
    }

    /// Adds `text` to the job's problems (shown by `status` and the dashboard), when the job
    /// exists: what went wrong after its batches ran (its summary could not be folded, say).
    pub async fn add_problem(&self, job: &str, text: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
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
        let mut con = self.con().await;
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
        self.replicated(&mut con).await?;
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
        let mut con = self.con().await;
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
        self.replicated(&mut con).await?;
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
        let mut con = self.con().await;
        let got = match pipe.query_async(&mut con).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.load_scripts().await?;
                pipe.query_async(&mut con).await.map_err(|e| self.err(e))
            }
            other => other.map_err(|e| self.err(e)),
        }?;
        self.replicated(&mut con).await?;
        Ok(got)
    }

    /// Cancels a job: `Ok(None)` when there is no such job; a job whose state cannot be read
    /// is left as it is ([`StoreError::BadJob`]).
    #[tracing::instrument(level = "debug", skip_all, fields(job = %job))]
    pub async fn cancel(&self, job: &str) -> Result<Option<Cancelled>, StoreError> {
        let mut con = self.con().await;
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
        self.replicated(&mut con).await?;
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
        let mut con = self.con().await;
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
            .arg(now_ms())
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
        let mut con = self.con().await;
        redis::cmd("SMEMBERS")
            .arg(self.keys.cancelled_jobs())
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }
}
