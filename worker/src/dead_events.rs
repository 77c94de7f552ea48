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
use taskmill_common::{config::validate_job_id, envelope, now_ms, store::Store, Backoff};
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
    let why = taskmill_common::dead::reason_of(&d.properties, now_ms() as i64);
    serde_json::to_value(why).unwrap_or_default()
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
