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
}

impl DeadKind {
    /// Every kind.
    pub const ALL: [DeadKind; 15] = [
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
}
