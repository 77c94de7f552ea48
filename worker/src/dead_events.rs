//! Counting every dead letter in its job, whoever dead-lettered it.
//!
//! The dead-letter exchange `{ns}.dlx` is a fanout: besides `{ns}.dead` (for people), each
//! dead letter lands in `{ns}.dead.events`, which workers consume here. A batch dead-lettered
//! by a worker is already counted (marking it again changes nothing: the store's script is
//! idempotent); one the broker dead-lettered by itself (after the delivery limit, when
//! workers kept dying while holding it) is counted now, so that its job finishes. Events of
//! unknown jobs or batch numbers (forged messages) change nothing.

use std::time::Duration;

use futures::StreamExt;
use lapin::{message::Delivery, options::BasicAckOptions, Consumer};
use serde_json::json;
use taskmill_common::{
    amqp::{header_i64, header_str},
    config::validate_job_id,
    envelope::{self, bounded, HEADER_ATTEMPT, HEADER_ERROR, HEADER_ERROR_KIND, MAX_HEADER_TEXT},
    now_ms,
    store::Store,
    Backoff,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The job and batch a dead letter belongs to, from its message id or its body.
fn identity(d: &Delivery) -> Option<(String, u64)> {
    let from_id = d
        .properties
        .message_id()
        .as_ref()
        .and_then(|id| envelope::parse_message_id(id.as_str()));
    let (job, batch) = match from_id {
        Some(x) => x,
        None => {
            let env = envelope::decode(&d.data, usize::MAX).ok()?;
            (env.job, env.batch)
        }
    };
    validate_job_id(&job).ok()?;
    Some((job, batch))
}

/// What the dead letter says of why it died, as stored in the job's dead hash.
fn reason(d: &Delivery) -> serde_json::Value {
    let p = &d.properties;
    let broker_reason = header_str(p, "x-first-death-reason");
    let kind = header_str(p, HEADER_ERROR_KIND)
        .or_else(|| broker_reason.clone().map(|r| kind_of_broker_reason(&r)))
        .unwrap_or_else(|| "unknown".into());
    let error = header_str(p, HEADER_ERROR).unwrap_or_else(|| {
        let count = header_i64(p, "x-delivery-count").map_or(String::new(), |c| {
            format!(" after {} deliveries without an ack", c + 1)
        });
        format!(
            "dead-lettered by the broker: {}{count} (workers died or lost their connection while holding it)",
            broker_reason.as_deref().unwrap_or("unknown reason")
        )
    });
    json!({
        "kind": bounded(&kind, 100),
        "error": bounded(&error, MAX_HEADER_TEXT),
        "attempts": header_i64(p, HEADER_ATTEMPT).unwrap_or(1),
        "queue": header_str(p, "x-first-death-queue")
            .or_else(|| header_str(p, envelope::HEADER_ORIGINAL_QUEUE)),
        "at_ms": now_ms(),
    })
}

/// The broker's `x-first-death-reason` as a dead-letter kind.
fn kind_of_broker_reason(reason: &str) -> String {
    taskmill_common::DeadKind::from_broker_reason(reason)
        .map_or_else(|| bounded(reason, 100).into_owned(), |k| k.as_str().into())
}

/// Counts dead letters until the consumer ends or `stop` is cancelled. Redis trouble is
/// retried with backoff (the event stays unacked meanwhile).
pub(crate) async fn run(
    mut consumer: Consumer,
    store: Store,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(delivery) = delivery else {
            return Ok(());
        };
        let delivery = delivery?;
        if let Some((job, batch)) = identity(&delivery) {
            let why = reason(&delivery);
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                match store.record_dead(&job, batch, &why).await {
                    Ok(taskmill_common::store::Recorded::Stored) => {
                        info!(%job, batch, kind = %why["kind"], "counted a dead letter in its job");
                        break;
                    }
                    Ok(_) => break,
                    Err(e) if e.refused() => return Err(e.into()),
                    Err(e) if !e.is_transient() => {
                        warn!(%job, batch, "Redis refused to count a dead letter: {e}");
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        warn!("counting a dead letter: {e}; trying again in {delay:?}");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.cancelled() => return Ok(()),
                        }
                    }
                }
            }
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
}
