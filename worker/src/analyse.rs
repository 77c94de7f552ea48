//! Turning a message body into an outcome: decode, look the task up, run it, catch panics.
//!
//! This is the CPU side of the worker. It runs on the rayon pool, never on tokio's threads.

use std::panic::{catch_unwind, AssertUnwindSafe};

use taskmill_common::{
    config::validate_job_id,
    envelope::{self, bounded, DecodeError, MAX_HEADER_TEXT},
    task::{Records, Registry, TaskContext, TaskError, TaskOutput},
};

/// Why a batch was dead-lettered (one type for the worker, the dead-letter tools and Redis).
pub use taskmill_common::DeadKind;

/// Identity of a batch, as far as it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchId {
    /// Job id (from the envelope, else from the message id).
    pub job: Option<String>,
    /// Batch number.
    pub batch: Option<u64>,
    /// Task name as the message gave it (cut to a header's length).
    pub task: Option<String>,
    /// The task's name when this worker knows it, else `unknown`: the only values used as a
    /// metrics label, so that names taken from messages cannot grow `/metrics`.
    pub label: &'static str,
    /// Records in the batch (0 when undecodable).
    pub records: u64,
    /// Batch creation time, ms since the epoch.
    pub created_ms: Option<u64>,
    /// Task parameters (for per-task retry settings).
    pub params: std::collections::BTreeMap<String, String>,
    /// How long the task ran (None when it did not run).
    pub ran_for: Option<std::time::Duration>,
}

impl Default for BatchId {
    fn default() -> Self {
        Self {
            job: None,
            batch: None,
            task: None,
            label: "unknown",
            records: 0,
            created_ms: None,
            params: Default::default(),
            ran_for: None,
        }
    }
}

/// What a task that ran gave, its result already serialized (on the analysis thread, so that
/// the sink only writes it).
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// The result as JSON text.
    pub result: String,
    /// Records the task used.
    pub records_done: u64,
    /// Records it skipped.
    pub records_invalid: u64,
}

impl From<TaskOutput> for Done {
    fn from(out: TaskOutput) -> Self {
        Self {
            // A JSON value always serializes.
            result: serde_json::to_string(&out.result).unwrap_or_default(),
            records_done: out.records_done,
            records_invalid: out.records_invalid,
        }
    }
}

/// What became of one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task ran: store the result, then ack.
    Done(Done),
    /// A transient failure: retry later.
    Retry(String),
    /// It ran past its time limit: retry later, or dead-letter `time_limit` once out of
    /// attempts.
    OverTime(String),
    /// Give up: dead-letter with this kind and error text.
    Dead(DeadKind, String),
    /// The job was cancelled: drop the batch unrun (counted in `batches_cancelled`).
    Cancelled,
    /// Not started before its expiry: drop it unrun (counted in `batches_expired`).
    Expired,
    /// Too early (`--countdown`, `--eta`): it must wait this many ms more, in the broker.
    NotYet(u64),
    /// Not a batch: a request to fold the job's summary.
    Summarize,
}

/// Decodes `body` and runs its task. `message_id` identifies undecodable messages.
/// `time_limit` (from the batch's `x-taskmill-time-limit-ms` header) makes a run longer than
/// it a transient failure (`time_limit`), whatever the task returned.
pub fn analyse(
    registry: &Registry,
    body: &[u8],
    message_id: Option<&str>,
    attempt: u32,
    max_bytes: usize,
    time_limit: Option<std::time::Duration>,
    started: Option<&dyn Fn(&BatchId)>,
) -> (BatchId, Outcome) {
    let mut id = BatchId::default();
    if let Some((job, batch)) = message_id.and_then(envelope::parse_message_id) {
        // An id that no producer could have made names no job: it must not touch one.
        if validate_job_id(&job).is_ok() {
            id.job = Some(job);
            id.batch = Some(batch);
        }
    }
    let env = match envelope::decode_view(body, max_bytes) {
        Ok(env) => env,
        Err(e) => {
            let kind = match e {
                DecodeError::TooLarge { .. } => DeadKind::TooLarge,
                DecodeError::UnsupportedVersion(_) => DeadKind::UnsupportedVersion,
                _ => DeadKind::Undecodable,
            };
            return (id, Outcome::Dead(kind, e.to_string()));
        }
    };
    id.task = Some(bounded(env.task, MAX_HEADER_TEXT).into_owned());
    id.records = env.records.len() as u64;
    id.created_ms = Some(env.created_ms);
    if let Err(e) = validate_job_id(env.job) {
        id.job = None;
        id.batch = None;
        return (id, Outcome::Dead(DeadKind::UnknownJob, e));
    }
    id.job = Some(env.job.to_string());
    id.batch = Some(env.batch);
    let Some(task) = registry.get(env.task) else {
        let msg = format!(
            "unknown task {:?}; this worker has: {}",
            bounded(env.task, 200),
            registry.names().join(", ")
        );
        id.params = env.params;
        return (id, Outcome::Dead(DeadKind::UnknownTask, msg));
    };
    id.label = task.name();
    if !env.params.is_empty() {
        if let Err(e) = taskmill_common::task::check_params(
            task.name(),
            registry.params(task.name()),
            &env.params,
        ) {
            id.params = env.params;
            return (id, Outcome::Dead(DeadKind::BadParams, e));
        }
    }
    if let Some(f) = started {
        // What the batch is, for settling it without this thread at its time limit.
        let mut known = id.clone();
        known.params = env.params.clone();
        f(&known);
    }
    let started = std::time::Instant::now();
    let ctx = TaskContext {
        params: &env.params,
        job: env.job,
        batch: env.batch,
        attempt,
        deadline: time_limit.map(|l| started + l),
    };
    let records = Records::new(env.records);
    let result = catch_unwind(AssertUnwindSafe(|| task.run_records(&ctx, &records)));
    let took = started.elapsed();
    id.ran_for = Some(took);
    if let Some(limit) = time_limit.filter(|&l| took > l) {
        id.params = env.params;
        let msg = format!(
            "time_limit: the batch ran {} ms, over its limit of {} ms",
            took.as_millis(),
            limit.as_millis()
        );
        return (id, Outcome::OverTime(msg));
    }
    let outcome = outcome_of(task.name(), result, id.records);
    id.params = env.params;
    (id, outcome)
}

/// What a task's run comes to: its output, checked (counts that fit the batch of `records`,
/// a result readers can parse back), its error's kind, or its panic.
fn outcome_of(
    task: &str,
    result: std::thread::Result<Result<taskmill_common::task::TaskOutput, TaskError>>,
    records: u64,
) -> Outcome {
    match result {
        // Counts that do not fit the batch are the task's bug: reported, never stored (they
        // would make a job read "228 done of 20").
        Ok(Ok(output)) if output.records_done.saturating_add(output.records_invalid) > records => {
            Outcome::Dead(
                DeadKind::Permanent,
                format!(
                    "task error: {} reported {} records done and {} invalid of a batch of {}",
                    task, output.records_done, output.records_invalid, records
                ),
            )
        }
        // A result nested deeper than readers parse would read back as something else.
        Ok(Ok(output))
            if taskmill_common::task::json_depth(
                &output.result,
                taskmill_common::task::MAX_JSON_DEPTH,
            ) > taskmill_common::task::MAX_JSON_DEPTH =>
        {
            Outcome::Dead(
                DeadKind::Permanent,
                format!(
                    "task error: {} returned a result nested more than {} levels deep, \
                     which JSON readers refuse (nothing stored)",
                    task,
                    taskmill_common::task::MAX_JSON_DEPTH
                ),
            )
        }
        Ok(Ok(output)) => Outcome::Done(output.into()),
        Ok(Err(TaskError::Transient(e))) => Outcome::Retry(e),
        Ok(Err(TaskError::Permanent(e))) => Outcome::Dead(DeadKind::Permanent, e),
        Ok(Err(TaskError::BadRecord(e))) => Outcome::Dead(DeadKind::Undecodable, e),
        Ok(Err(e)) => Outcome::Dead(DeadKind::Permanent, e.to_string()),
        Err(panic) => {
            let msg = panic_message(panic.as_ref());
            Outcome::Dead(DeadKind::Panic, format!("task panicked: {msg}"))
        }
    }
}

pub(crate) use taskmill_common::panic_message;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;
    use taskmill_common::envelope::{encode, Envelope, FORMAT_VERSION};

    fn env(task: &str, params: &[(&str, &str)]) -> Vec<u8> {
        encode(&Envelope {
            v: FORMAT_VERSION,
            job: "j".into(),
            batch: 3,
            task: task.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            records: vec![json!({"title": "t", "body": "b"})],
            created_ms: 1,
        })
    }

    #[test]
    fn outcomes() {
        let reg = taskmill_common::tasks::builtin();
        let (id, out) = analyse(&reg, &env("post-stats", &[]), None, 1, 1 << 20, None, None);
        assert!(matches!(out, Outcome::Done(_)));
        assert_eq!(id.label, "post-stats");
        assert_eq!(id.job.as_deref(), Some("j"));
        assert_eq!(id.batch, Some(3));

        let (_, out) = analyse(&reg, &env("nope", &[]), None, 1, 1 << 20, None, None);
        assert!(matches!(out, Outcome::Dead(DeadKind::UnknownTask, _)));

        let (id, out) = analyse(&reg, b"garbage", Some("job9:4"), 1, 1 << 20, None, None);
        assert!(matches!(out, Outcome::Dead(DeadKind::Undecodable, _)));
        assert_eq!(id.job.as_deref(), Some("job9"));
        assert_eq!(id.batch, Some(4));

        // A message id that aliases another key names no job.
        let (id, _) = analyse(
            &reg,
            b"garbage",
            Some("job9:results:4"),
            1,
            1 << 20,
            None,
            None,
        );
        assert_eq!(id.job, None);

        let mut forged = Envelope {
            v: FORMAT_VERSION,
            job: "j:results".into(),
            batch: 0,
            task: "x".repeat(100_000),
            params: BTreeMap::new(),
            records: vec![],
            created_ms: 1,
        };
        let (id, out) = analyse(&reg, &encode(&forged), None, 1, 1 << 20, None, None);
        assert!(
            matches!(out, Outcome::Dead(DeadKind::UnknownJob, _)),
            "{out:?}"
        );
        assert_eq!(id.job, None);
        assert!(id.task.unwrap().len() <= MAX_HEADER_TEXT);
        assert_eq!(id.label, "unknown");
        forged.job = "ok".into();
        let (id, out) = analyse(&reg, &encode(&forged), None, 1, 1 << 20, None, None);
        let Outcome::Dead(DeadKind::UnknownTask, msg) = out else {
            panic!("{out:?}")
        };
        assert!(msg.len() < 1000, "{}", msg.len());
        assert_eq!(id.label, "unknown");

        let (_, out) = analyse(&reg, &env("post-stats", &[]), None, 1, 4, None, None);
        assert!(matches!(out, Outcome::Dead(DeadKind::TooLarge, _)));

        let panicky = env("chaos", &[("fail_rate", "1"), ("fail", "panic")]);
        let (_, out) = analyse(&reg, &panicky, None, 1, 1 << 20, None, None);
        assert!(matches!(out, Outcome::Dead(DeadKind::Panic, _)), "{out:?}");

        let slow = env("chaos", &[("sleep_ms", "30")]);
        let limit = Some(std::time::Duration::from_millis(5));
        let (_, out) = analyse(&reg, &slow, None, 1, 1 << 20, limit, None);
        let Outcome::OverTime(msg) = out else {
            panic!("{out:?}")
        };
        assert!(msg.starts_with("time_limit"), "{msg}");

        let transient = env("chaos", &[("fail_rate", "1")]);
        let (_, out) = analyse(&reg, &transient, None, 1, 1 << 20, None, None);
        assert!(matches!(out, Outcome::Retry(_)));
    }

    /// A task that reports more records than its batch had.
    struct Overcounts;

    impl taskmill_common::task::Task for Overcounts {
        fn name(&self) -> &'static str {
            "overcounts"
        }
        fn run(
            &self,
            _ctx: &TaskContext<'_>,
            records: &[serde_json::Value],
        ) -> Result<TaskOutput, TaskError> {
            Ok(TaskOutput {
                result: json!({}),
                records_done: records.len() as u64 * 10,
                records_invalid: 2,
            })
        }
        fn aggregate(&self, _results: &[serde_json::Value]) -> serde_json::Value {
            json!({})
        }
    }

    #[test]
    fn counts_that_do_not_fit_the_batch_are_a_task_error() {
        let reg = Registry::new().with(Overcounts);
        let (_, out) = analyse(&reg, &env("overcounts", &[]), None, 1, 1 << 20, None, None);
        let Outcome::Dead(DeadKind::Permanent, msg) = out else {
            panic!("{out:?}")
        };
        assert_eq!(
            msg,
            "task error: overcounts reported 10 records done and 2 invalid of a batch of 1"
        );
    }
}
