//! Turning a message body into an outcome: decode, look the task up, run it, catch panics.
//!
//! This is the CPU side of the worker. It runs on the rayon pool, never on tokio's threads.

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde_json::Value;
use taskmill_common::{
    envelope::{self, DecodeError},
    task::{Registry, TaskContext, TaskError, TaskOutput},
};

/// Why a batch was dead-lettered; travels in the `x-taskmill-error-kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    /// The body is not a taskmill envelope.
    Undecodable,
    /// The envelope has a format version this worker does not read.
    UnsupportedVersion,
    /// The body exceeds the size limit.
    TooLarge,
    /// No task of that name is registered in this worker.
    UnknownTask,
    /// The task reported a permanent error.
    Permanent,
    /// The task panicked.
    Panic,
    /// The task failed transiently on every allowed attempt.
    RetriesExhausted,
}

impl DeadKind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::Undecodable => "undecodable",
            DeadKind::UnsupportedVersion => "unsupported_version",
            DeadKind::TooLarge => "too_large",
            DeadKind::UnknownTask => "unknown_task",
            DeadKind::Permanent => "permanent",
            DeadKind::Panic => "panic",
            DeadKind::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// Identity of a batch, as far as it could be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchId {
    /// Job id (from the envelope, else from the message id).
    pub job: Option<String>,
    /// Batch number.
    pub batch: Option<u64>,
    /// Task name.
    pub task: Option<String>,
    /// Records in the batch (0 when undecodable).
    pub records: u64,
    /// Batch creation time, ms since the epoch.
    pub created_ms: Option<u64>,
    /// Task parameters (for per-task retry settings).
    pub params: std::collections::BTreeMap<String, String>,
}

/// What became of one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task ran: store the result, then ack.
    Done(TaskOutput),
    /// A transient failure: retry later.
    Retry(String),
    /// Give up: dead-letter with this kind and error text.
    Dead(DeadKind, String),
}

/// Decodes `body` and runs its task. `message_id` identifies undecodable messages.
pub fn analyse(
    registry: &Registry,
    body: &[u8],
    message_id: Option<&str>,
    attempt: u32,
    max_bytes: usize,
) -> (BatchId, Outcome) {
    let mut id = BatchId::default();
    if let Some((job, batch)) = message_id.and_then(envelope::parse_message_id) {
        id.job = Some(job);
        id.batch = Some(batch);
    }
    let env = match envelope::decode(body, max_bytes) {
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
    id.job = Some(env.job.clone());
    id.batch = Some(env.batch);
    id.task = Some(env.task.clone());
    id.records = env.records.len() as u64;
    id.created_ms = Some(env.created_ms);
    let Some(task) = registry.get(&env.task) else {
        let msg = format!(
            "unknown task {:?}; this worker has: {}",
            env.task,
            registry.names().join(", ")
        );
        id.params = env.params;
        return (id, Outcome::Dead(DeadKind::UnknownTask, msg));
    };
    let ctx = TaskContext {
        params: &env.params,
        job: &env.job,
        batch: env.batch,
        attempt,
    };
    let records: &[Value] = &env.records;
    let started = std::time::Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| task.run(&ctx, records)));
    metrics::histogram!("taskmill_task_duration_seconds", "task" => task.name())
        .record(started.elapsed().as_secs_f64());
    let outcome = match result {
        Ok(Ok(output)) => Outcome::Done(output),
        Ok(Err(TaskError::Transient(e))) => Outcome::Retry(e),
        Ok(Err(TaskError::Permanent(e))) => Outcome::Dead(DeadKind::Permanent, e),
        Ok(Err(e)) => Outcome::Dead(DeadKind::Permanent, e.to_string()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Outcome::Dead(DeadKind::Panic, format!("task panicked: {msg}"))
        }
    };
    id.params = env.params;
    (id, outcome)
}

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
        let reg = Registry::builtin();
        let (id, out) = analyse(&reg, &env("post-stats", &[]), None, 1, 1 << 20);
        assert!(matches!(out, Outcome::Done(_)));
        assert_eq!(id.job.as_deref(), Some("j"));
        assert_eq!(id.batch, Some(3));

        let (_, out) = analyse(&reg, &env("nope", &[]), None, 1, 1 << 20);
        assert!(matches!(out, Outcome::Dead(DeadKind::UnknownTask, _)));

        let (id, out) = analyse(&reg, b"garbage", Some("job9:4"), 1, 1 << 20);
        assert!(matches!(out, Outcome::Dead(DeadKind::Undecodable, _)));
        assert_eq!(id.job.as_deref(), Some("job9"));
        assert_eq!(id.batch, Some(4));

        let (_, out) = analyse(&reg, &env("post-stats", &[]), None, 1, 4);
        assert!(matches!(out, Outcome::Dead(DeadKind::TooLarge, _)));

        let panicky = env("chaos", &[("fail_rate", "1"), ("fail", "panic")]);
        let (_, out) = analyse(&reg, &panicky, None, 1, 1 << 20);
        assert!(matches!(out, Outcome::Dead(DeadKind::Panic, _)), "{out:?}");

        let transient = env("chaos", &[("fail_rate", "1")]);
        let (_, out) = analyse(&reg, &transient, None, 1, 1 << 20);
        assert!(matches!(out, Outcome::Retry(_)));
    }
}
