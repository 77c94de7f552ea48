//! What to do with an analysed batch: a pure function of its outcome, its attempt and the
//! retry policy. The sink carries the action out (store, publish, ack); nothing here does I/O.

use taskmill_common::store::Recorded;

use crate::{
    analyse::{BatchId, DeadKind, Outcome},
    retry::RetryPolicy,
};

/// The action for one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Store the result, then ack.
    Store,
    /// Publish a copy to the delay queue of this delay, then ack.
    Retry {
        /// The delay, one of the tiers.
        delay_ms: u64,
    },
    /// Publish to the dead-letter queue with this kind and text, mark it dead, then ack.
    Dead {
        /// Why.
        kind: DeadKind,
        /// The error text.
        error: String,
    },
    /// Give it back to the queue unacked (the analysis thread was lost).
    GiveBack,
    /// Its job was cancelled: count it dropped, then ack.
    Cancel,
    /// Its time ran out before it started: count it expired, then ack.
    Expire,
    /// A request to fold the job's summary: fold it (if finished and without one), then ack.
    Summarize,
    /// Too early: publish a copy (attempt unchanged) to the delay queue of this delay, then
    /// ack.
    Delay {
        /// The delay, one of the tiers, never past the batch's time.
        delay_ms: u64,
    },
}

/// Decides what becomes of a batch. `analysed` is None when the analysis thread vanished.
/// The job's `retry_*` params override `policy`.
pub fn decide(analysed: Option<&(BatchId, Outcome)>, attempt: u32, policy: &RetryPolicy) -> Action {
    let Some((id, outcome)) = analysed else {
        return Action::GiveBack;
    };
    let identified = id.job.is_some() && id.batch.is_some();
    match outcome {
        Outcome::Summarize if identified => Action::Summarize,
        Outcome::Cancelled if identified => Action::Cancel,
        Outcome::Expired if identified => Action::Expire,
        Outcome::NotYet(ms) if identified => Action::Delay {
            delay_ms: taskmill_common::topology::tier_at_most(*ms),
        },
        Outcome::Cancelled | Outcome::Expired | Outcome::NotYet(_) | Outcome::Summarize => {
            Action::Dead {
                kind: DeadKind::UnknownJob,
                error: "batch without identity".into(),
            }
        }
        Outcome::Done(_) if identified => Action::Store,
        Outcome::Done(_) | Outcome::Retry(_) | Outcome::OverTime(_) if !identified => {
            Action::Dead {
                kind: DeadKind::UnknownJob,
                error: "batch without identity".into(),
            }
        }
        Outcome::Retry(error) | Outcome::OverTime(error) => {
            let policy = policy.for_params(&id.params);
            if policy.may_retry(attempt) {
                let job = id.job.as_deref().unwrap_or_default();
                Action::Retry {
                    delay_ms: policy.delay_ms(attempt, job, id.batch.unwrap_or(0)),
                }
            } else {
                let kind = match outcome {
                    Outcome::OverTime(_) => DeadKind::TimeLimit,
                    _ => DeadKind::RetriesExhausted,
                };
                Action::Dead {
                    kind,
                    error: format!("{error} (gave up after {attempt} attempts)"),
                }
            }
        }
        Outcome::Dead(kind, error) => Action::Dead {
            kind: *kind,
            error: error.clone(),
        },
        Outcome::Done(_) => Action::Store,
    }
}

/// The action for a batch the store refused (its job or batch number is unknown), or `None`
/// when it was stored or a duplicate.
pub fn refused(rec: Recorded, job: &str, batch: u64) -> Option<Action> {
    let (kind, error) = match rec {
        Recorded::Stored | Recorded::Duplicate => return None,
        Recorded::UnknownJob => (
            DeadKind::UnknownJob,
            format!("no job {job:?} in this namespace (never registered, or expired)"),
        ),
        Recorded::UnknownBatch => (
            DeadKind::UnknownBatch,
            format!("job {job:?} never published a batch {batch}"),
        ),
    };
    Some(Action::Dead { kind, error })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> BatchId {
        BatchId {
            job: Some("j".into()),
            batch: Some(3),
            ..BatchId::default()
        }
    }

    fn done() -> Outcome {
        Outcome::Done(crate::analyse::Done {
            result: "{}".into(),
            records_done: 1,
            records_invalid: 0,
        })
    }

    #[test]
    fn done_batches_are_stored_unless_they_name_no_job() {
        let p = RetryPolicy::default();
        assert_eq!(decide(Some(&(id(), done())), 1, &p), Action::Store);
        let anon = (BatchId::default(), done());
        assert!(matches!(
            decide(Some(&anon), 1, &p),
            Action::Dead {
                kind: DeadKind::UnknownJob,
                ..
            }
        ));
        assert_eq!(decide(None, 1, &p), Action::GiveBack);
    }

    #[test]
    fn transient_failures_retry_until_the_last_attempt() {
        let p = RetryPolicy::default();
        let failed = (id(), Outcome::Retry("boom".into()));
        let Action::Retry { delay_ms } = decide(Some(&failed), 1, &p) else {
            panic!()
        };
        assert!(taskmill_common::topology::DELAY_TIERS_MS.contains(&delay_ms));
        let last = decide(Some(&failed), p.max_attempts, &p);
        let Action::Dead { kind, error } = last else {
            panic!("{last:?}")
        };
        assert_eq!(kind, DeadKind::RetriesExhausted);
        assert!(error.contains("gave up after 5 attempts"), "{error}");
        // A batch that ran over its time limit is retried the same way, and its last
        // overrun says so in its kind.
        let over = (id(), Outcome::OverTime("time_limit: ran 2000 ms".into()));
        assert!(matches!(decide(Some(&over), 1, &p), Action::Retry { .. }));
        let last = decide(Some(&over), p.max_attempts, &p);
        assert!(
            matches!(
                last,
                Action::Dead {
                    kind: DeadKind::TimeLimit,
                    ..
                }
            ),
            "{last:?}"
        );
    }

    #[test]
    fn a_jobs_params_override_the_policy() {
        let mut with = id();
        with.params.insert("retry_max_attempts".into(), "2".into());
        let failed = (with, Outcome::Retry("boom".into()));
        let p = RetryPolicy::default();
        assert!(matches!(decide(Some(&failed), 1, &p), Action::Retry { .. }));
        assert!(matches!(decide(Some(&failed), 2, &p), Action::Dead { .. }));
    }

    #[test]
    fn permanent_failures_die_at_once_with_their_kind() {
        let failed = (id(), Outcome::Dead(DeadKind::Panic, "oops".into()));
        assert_eq!(
            decide(Some(&failed), 1, &RetryPolicy::default()),
            Action::Dead {
                kind: DeadKind::Panic,
                error: "oops".into()
            }
        );
    }

    #[test]
    fn batches_of_cancelled_jobs_are_dropped() {
        let c = (id(), Outcome::Cancelled);
        assert_eq!(decide(Some(&c), 1, &RetryPolicy::default()), Action::Cancel);
        let e = (id(), Outcome::Expired);
        assert_eq!(decide(Some(&e), 1, &RetryPolicy::default()), Action::Expire);
    }

    #[test]
    fn early_batches_wait_a_tier_that_never_overshoots() {
        let p = RetryPolicy::default();
        let early = (id(), Outcome::NotYet(4_999));
        assert_eq!(
            decide(Some(&early), 1, &p),
            Action::Delay { delay_ms: 2_000 }
        );
        let nearly = (id(), Outcome::NotYet(3));
        assert_eq!(
            decide(Some(&nearly), 1, &p),
            Action::Delay { delay_ms: 100 }
        );
    }

    #[test]
    fn refusals_by_the_store() {
        assert_eq!(refused(Recorded::Stored, "j", 1), None);
        assert_eq!(refused(Recorded::Duplicate, "j", 1), None);
        assert!(matches!(
            refused(Recorded::UnknownBatch, "j", 7),
            Some(Action::Dead { kind: DeadKind::UnknownBatch, error }) if error.contains("batch 7")
        ));
    }
}
