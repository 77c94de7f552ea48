//! A job as read from its hash: [`JobStatus`], and [`BadJobHash`] for one that is not a job's.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};
use taskmill_protocol::JobState;

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
    /// The group it belongs to (`enqueue --group`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The job this one follows up (`enqueue --then`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// How the job (or group) it follows up ended: `state` and counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_outcome: Option<Value>,
    /// The follow-up steps still to run after this job (a [`crate::chains::Chain`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub then: Option<Value>,
    /// When the job's end fired its follow-up (into the outbox).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub then_fired_ms: Option<u64>,
    /// The follow-up job, once published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub then_job: Option<String>,
    /// What became of the follow-up: published, skipped (and why), or not enqueued (why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub then_note: Option<String>,
    /// A job made from a Celery call: where its Celery result goes, its workflow ids and the
    /// rest of its chain ([`crate::celery::CelerySettings`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub celery: Option<Value>,
    /// The completion webhook's URL (`enqueue --on-complete`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_complete: Option<String>,
    /// Attempts made to deliver it.
    #[serde(skip_serializing_if = "is_zero")]
    pub hook_attempts: u64,
    /// When it was delivered (a 2xx answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_delivered_ms: Option<u64>,
    /// The last attempt's error, while it is not delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_error: Option<String>,
    /// When the attempts were given up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_gave_up_ms: Option<u64>,
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
    pub(crate) fn new(job: &str, field: &str, why: impl Into<String>) -> Self {
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
            group: f.get("group").cloned(),
            parent: f.get("parent").cloned(),
            parent_outcome: f
                .get("parent_outcome")
                .and_then(|v| serde_json::from_str(v).ok()),
            then: f.get("then").and_then(|v| serde_json::from_str(v).ok()),
            then_fired_ms: opt("then_fired_ms")?,
            then_job: f.get("then_job").cloned(),
            then_note: f.get("then_note").cloned(),
            celery: f.get("celery").and_then(|v| serde_json::from_str(v).ok()),
            on_complete: f.get("on_complete").cloned(),
            hook_attempts: opt("hook_attempts")?.unwrap_or(0),
            hook_delivered_ms: opt("hook_delivered_ms")?,
            hook_error: f.get("hook_error").cloned(),
            hook_gave_up_ms: opt("hook_gave_up_ms")?,
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
