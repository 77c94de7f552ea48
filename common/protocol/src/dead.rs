//! Why a batch was dead-lettered: written by the worker into `x-taskmill-error-kind`, read by
//! `producer dlq`, stored in the job's dead hash.

/// The kinds of dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadKind {
    /// The body is not a taskmill envelope.
    Undecodable,
    /// The envelope has a format version this worker does not read.
    UnsupportedVersion,
    /// The body exceeds the size limit.
    TooLarge,
    /// No task of that name is registered in this worker.
    UnknownTask,
    /// The job's parameters do not fit the task (unknown name, wrong type).
    BadParams,
    /// The task reported a permanent error.
    Permanent,
    /// The task panicked.
    Panic,
    /// The task failed transiently on every allowed attempt.
    RetriesExhausted,
    /// The batch names a job that does not exist (never registered, expired, or a forged or
    /// invalid id): dead-lettered without touching any job.
    UnknownJob,
    /// The batch number is outside what its job published: dead-lettered without touching
    /// the job.
    UnknownBatch,
    /// Redis refused the batch's result for good (a key of its job holds the wrong type).
    StoreError,
    /// The broker dead-lettered it after too many deliveries without an ack (workers died or
    /// lost their connection while holding it).
    DeliveryLimit,
    /// The broker dropped it when its time to live ran out.
    Expired,
    /// The broker dead-lettered it after a reject without requeue.
    Rejected,
    /// The broker dropped it from a full queue.
    QueueFull,
    /// The task's result is larger than the worker's `--max-result-bytes`.
    ResultTooLarge,
    /// The batch ran past its time limit (`--time-limit`) on every allowed attempt.
    TimeLimit,
    /// Workers died while the batch ran alone in them: it kills workers (an abort, a crash,
    /// memory). Batches that were merely in a dying worker's hands go back to work.
    WorkerCrash,
}

impl DeadKind {
    /// Every kind.
    pub const ALL: [DeadKind; 18] = [
        DeadKind::Undecodable,
        DeadKind::UnsupportedVersion,
        DeadKind::TooLarge,
        DeadKind::UnknownTask,
        DeadKind::BadParams,
        DeadKind::Permanent,
        DeadKind::Panic,
        DeadKind::RetriesExhausted,
        DeadKind::UnknownJob,
        DeadKind::UnknownBatch,
        DeadKind::StoreError,
        DeadKind::DeliveryLimit,
        DeadKind::Expired,
        DeadKind::Rejected,
        DeadKind::QueueFull,
        DeadKind::ResultTooLarge,
        DeadKind::TimeLimit,
        DeadKind::WorkerCrash,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::Undecodable => "undecodable",
            DeadKind::UnsupportedVersion => "unsupported_version",
            DeadKind::TooLarge => "too_large",
            DeadKind::UnknownTask => "unknown_task",
            DeadKind::BadParams => "bad_params",
            DeadKind::Permanent => "permanent",
            DeadKind::Panic => "panic",
            DeadKind::RetriesExhausted => "retries_exhausted",
            DeadKind::UnknownJob => "unknown_job",
            DeadKind::UnknownBatch => "unknown_batch",
            DeadKind::StoreError => "store_error",
            DeadKind::DeliveryLimit => "delivery_limit",
            DeadKind::Expired => "expired",
            DeadKind::Rejected => "rejected",
            DeadKind::QueueFull => "queue_full",
            DeadKind::ResultTooLarge => "result_too_large",
            DeadKind::TimeLimit => "time_limit",
            DeadKind::WorkerCrash => "worker_crash",
        }
    }

    /// The kind for the broker's `x-first-death-reason` (`delivery_limit`, `expired`,
    /// `rejected`, `maxlen`).
    pub fn from_broker_reason(reason: &str) -> Option<Self> {
        match reason {
            "delivery_limit" => Some(DeadKind::DeliveryLimit),
            "expired" => Some(DeadKind::Expired),
            "rejected" => Some(DeadKind::Rejected),
            "maxlen" => Some(DeadKind::QueueFull),
            _ => None,
        }
    }
}

impl std::fmt::Display for DeadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown dead-letter kind {s:?}"))
    }
}

/// Why one batch died: stored in its job's dead hash (as JSON), shown by `producer dlq`,
/// `status` and the dashboard. Read from a dead letter's headers by one reader
/// (`taskmill_broker::dead::reason_of`), whoever dead-lettered it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadReason {
    /// A [`DeadKind`] name (a broker reason taskmill does not know stays as the broker gave it).
    pub kind: String,
    /// What went wrong, for people.
    pub error: String,
    /// Attempts made (1 for the first delivery).
    pub attempts: i64,
    /// Full name of the queue it died in, when known.
    pub queue: Option<String>,
    /// When it died, ms since the epoch (0 when unknown).
    pub at_ms: i64,
}

impl DeadReason {
    /// The broker's explanation of a death it caused, for people.
    pub fn broker_text(reason: &str, queue: Option<&str>, deliveries: Option<i64>) -> String {
        let queue = queue.unwrap_or("its queue");
        match DeadKind::from_broker_reason(reason) {
            Some(DeadKind::DeliveryLimit) => {
                // The header a dead letter carries may say 0 (it is the count before the last
                // delivery, or absent): the queue's limit says how many there were.
                let limit = crate::names::DELIVERY_LIMIT;
                let count = deliveries.filter(|c| *c > limit).unwrap_or(limit + 1);
                format!(
                    "dead-lettered by the broker: delivered {count} times without an ack (the \
                     delivery limit of {queue} is {limit}; workers died or lost their connection \
                     while holding it)"
                )
            }
            Some(DeadKind::Expired) => {
                format!("dead-lettered by the broker: its time to live ran out in {queue}")
            }
            Some(DeadKind::QueueFull) => format!(
                "dropped by the broker from a full queue, {queue} (a length limit, by policy or \
                 x-max-length, is set on it)"
            ),
            Some(DeadKind::Rejected) => {
                format!("dead-lettered by the broker: a consumer of {queue} rejected it")
            }
            _ => format!("dead-lettered by the broker: {reason} in {queue}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in DeadKind::ALL {
            assert_eq!(k.as_str().parse::<DeadKind>(), Ok(k));
        }
        assert_eq!(
            DeadKind::from_broker_reason("maxlen"),
            Some(DeadKind::QueueFull)
        );
        assert!("nope".parse::<DeadKind>().is_err());
    }

    #[test]
    fn broker_texts_name_the_queue_and_the_cause() {
        let t = DeadReason::broker_text("maxlen", Some("ns.tasks"), None);
        assert!(t.contains("full queue, ns.tasks"), "{t}");
        let t = DeadReason::broker_text("delivery_limit", Some("ns.tasks"), Some(0));
        assert!(t.contains("delivered 11 times"), "{t}");
        let t = DeadReason::broker_text("delivery_limit", Some("ns.tasks"), Some(14));
        assert!(t.contains("delivered 14 times"), "{t}");
        let t = DeadReason::broker_text("odd", None, None);
        assert_eq!(t, "dead-lettered by the broker: odd in its queue");
    }
}
