//! The one reader of a dead letter's headers: what the worker stores in the job's dead hash
//! and what `producer dlq` shows come from here, so they cannot disagree.
//!
//! A batch dies in one of two ways. The worker dead-letters it (unknown task, permanent
//! error, retries exhausted...) and writes `x-taskmill-error-kind`, `x-taskmill-error`,
//! `x-taskmill-original-queue` and `x-taskmill-dead-at-ms`. Or the broker does (delivery
//! limit, a full queue, a time to live, a reject) and writes `x-death`: an array of its
//! dead-letterings, the most recent first. The most recent is the one that counts: a batch
//! that once waited in a delay queue (an `expired` death, how retries come back) and then hit
//! the delivery limit died of the delivery limit, although its `x-first-death-reason` still
//! says `expired`.

use lapin::{
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
pub use taskmill_protocol::dead::DeadReason;
use taskmill_protocol::{
    dead::DeadKind,
    envelope::{
        bounded, HEADER_ATTEMPT, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_KIND,
        HEADER_ORIGINAL_QUEUE, MAX_HEADER_TEXT,
    },
};

use crate::amqp::{header_i64, header_str, int_value};

/// Longest kind kept from a header (a forged one may be anything).
const MAX_KIND: usize = 100;

/// The broker's most recent dead-lettering of a message: reason, queue, when (ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    pub reason: Option<String>,
    pub queue: Option<String>,
    pub at_ms: Option<i64>,
}

/// The most recent entry of `x-death`, else the `x-first-death-*` headers; None when the
/// broker never dead-lettered the message.
pub fn last_death(p: &BasicProperties) -> Option<Death> {
    let from_array = p
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get("x-death")? {
            AMQPValue::FieldArray(a) => match a.as_slice().first()? {
                AMQPValue::FieldTable(t) => Some(death_of(t)),
                _ => None,
            },
            _ => None,
        });
    from_array.or_else(|| {
        let reason = header_str(p, "x-first-death-reason");
        let queue = header_str(p, "x-first-death-queue");
        (reason.is_some() || queue.is_some()).then_some(Death {
            reason,
            queue,
            at_ms: None,
        })
    })
}

fn death_of(t: &FieldTable) -> Death {
    let text = |k: &str| match t.inner().get(k)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    };
    Death {
        reason: text("reason"),
        queue: text("queue"),
        // An AMQP timestamp: seconds.
        at_ms: t
            .inner()
            .get("time")
            .and_then(int_value)
            .map(|s| s.saturating_mul(1000)),
    }
}

/// Why the batch of this dead letter died (texts bounded: a forged header may be anything).
/// `now_ms` stands in for a time nobody wrote down.
pub fn reason_of(p: &BasicProperties, now_ms: i64) -> DeadReason {
    let attempts = header_i64(p, HEADER_ATTEMPT).unwrap_or(1);
    if let Some(kind) = header_str(p, HEADER_ERROR_KIND) {
        return DeadReason {
            kind: bounded(&kind, MAX_KIND).into_owned(),
            error: header_str(p, HEADER_ERROR).map_or_else(
                || "no reason given".into(),
                |e| bounded(&e, MAX_HEADER_TEXT).into_owned(),
            ),
            attempts,
            queue: header_str(p, HEADER_ORIGINAL_QUEUE),
            at_ms: header_i64(p, HEADER_DEAD_AT).unwrap_or(now_ms),
        };
    }
    let death = last_death(p);
    let reason = death.as_ref().and_then(|d| d.reason.clone());
    let queue = death.as_ref().and_then(|d| d.queue.clone());
    let kind = match &reason {
        Some(r) => DeadKind::from_broker_reason(r).map_or_else(
            || bounded(r, MAX_KIND).into_owned(),
            |k| k.as_str().to_string(),
        ),
        None => "unknown".into(),
    };
    let error = match &reason {
        Some(r) => DeadReason::broker_text(r, queue.as_deref(), header_i64(p, "x-delivery-count")),
        None => "no reason given".into(),
    };
    DeadReason {
        kind,
        error: bounded(&error, MAX_HEADER_TEXT).into_owned(),
        attempts,
        queue: queue.or_else(|| header_str(p, HEADER_ORIGINAL_QUEUE)),
        at_ms: death.and_then(|d| d.at_ms).unwrap_or(now_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.to_string()))
    }

    #[test]
    fn the_most_recent_broker_death_counts() {
        // Waited in a delay queue (expired), then hit the delivery limit in the work queue.
        let deaths = FieldArray::from(vec![
            AMQPValue::FieldTable(table(&[
                ("reason", text("delivery_limit")),
                ("queue", text("ns.tasks")),
                ("time", AMQPValue::Timestamp(1_700_000_000)),
            ])),
            AMQPValue::FieldTable(table(&[
                ("reason", text("expired")),
                ("queue", text("ns.tasks.delay.1000")),
            ])),
        ]);
        let headers = table(&[
            ("x-death", AMQPValue::FieldArray(deaths)),
            ("x-first-death-reason", text("expired")),
            ("x-first-death-queue", text("ns.tasks.delay.1000")),
            ("x-delivery-count", AMQPValue::LongLongInt(11)),
        ]);
        let r = reason_of(&BasicProperties::default().with_headers(headers), 5);
        assert_eq!(r.kind, "delivery_limit");
        assert_eq!(r.queue.as_deref(), Some("ns.tasks"));
        assert_eq!(r.at_ms, 1_700_000_000_000);
        assert!(r.error.contains("delivered 11 times"), "{}", r.error);
    }

    #[test]
    fn the_broker_s_maxlen_reads_queue_full_and_the_worker_s_own_kind_wins() {
        let headers = table(&[
            ("x-first-death-reason", text("maxlen")),
            ("x-first-death-queue", text("ns.tasks")),
        ]);
        let r = reason_of(&BasicProperties::default().with_headers(headers.clone()), 5);
        assert_eq!((r.kind.as_str(), r.at_ms), ("queue_full", 5));
        let mut own = headers;
        own.insert(HEADER_ERROR_KIND.into(), text("permanent"));
        own.insert(HEADER_ERROR.into(), text("bad record"));
        own.insert(HEADER_ORIGINAL_QUEUE.into(), text("ns.other"));
        let r = reason_of(&BasicProperties::default().with_headers(own), 5);
        assert_eq!(r.kind, "permanent");
        assert_eq!(r.error, "bad record");
        assert_eq!(r.queue.as_deref(), Some("ns.other"));
        let none = reason_of(&BasicProperties::default(), 5);
        assert_eq!(
            (none.kind.as_str(), none.error.as_str()),
            ("unknown", "no reason given")
        );
    }
}
