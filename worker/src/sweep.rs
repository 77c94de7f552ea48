//! Batches a delay queue kept past its TTL, moved back to their queue.
//!
//! A delay queue is a quorum queue whose message TTL dead-letters each batch back to its work
//! queue (at-least-once). On RabbitMQ 3.10 under load, batches were seen to stay in a delay
//! queue long after their TTL, with no consumer to notice: their job never finished. Every
//! worker therefore looks, every [`SWEEP_EVERY`], at the head of each delay queue it declared
//! in this session: a batch that went in (header `x-taskmill-delayed-at-ms`) longer ago than
//! the queue's TTL plus [`grace`] is published to its work queue as the broker would have
//! done, then acked; a batch not yet overdue goes back (and so do the ones behind it, which
//! went in later). Moving one twice is harmless: a result is stored once.

use std::{collections::HashSet, sync::Arc, time::Duration};

use lapin::{
    options::{BasicAckOptions, BasicGetOptions, BasicRejectOptions},
    Channel,
};
use taskmill_common::{amqp, envelope::HEADER_DELAYED_AT, now_ms, topology::Names};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the delay queues are looked at.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// How long past its queue's TTL (ms) a batch may stay before a worker moves it: the TTL
/// again, and at least 2 s (the broker is late, not just busy).
pub(crate) fn grace(ttl_ms: u64) -> u64 {
    ttl_ms.max(2_000)
}

/// The delay queues declared in this session (full names), shared with the sink.
pub(crate) type Declared = Arc<tokio::sync::Mutex<HashSet<String>>>;

/// Sweeps until `stop`; ends with a warning when the channel fails (the next session starts
/// again).
pub(crate) async fn run(
    channel: Channel,
    names: Names,
    declared: Declared,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let queues: Vec<String> = declared.lock().await.iter().cloned().collect();
        for queue in queues {
            match sweep(&channel, &names, &queue).await {
                Ok(0) => {}
                Ok(moved) => {
                    warn!(
                        queue = %queue, moved,
                        "batches left in a delay queue past its TTL: moved back to their queue"
                    );
                    metrics::counter!("taskmill_delayed_batches_moved_total").increment(moved);
                }
                Err(e) => {
                    warn!("looking at delay queue {queue}: {e:#}; not again this session");
                    return;
                }
            }
        }
    }
}

/// Moves the overdue batches at the head of delay queue `full`; returns how many.
async fn sweep(channel: &Channel, names: &Names, full: &str) -> anyhow::Result<u64> {
    let Some((queue, ttl_ms)) = names
        .short_queue(full)
        .and_then(|s| s.rsplit_once(".delay."))
        .and_then(|(q, ms)| Some((q, ms.parse::<u64>().ok()?)))
    else {
        return Ok(0);
    };
    let mut moved = 0;
    loop {
        let Some(got) = channel
            .basic_get(full.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            return Ok(moved);
        };
        let d = got.delivery;
        let at =
            amqp::header_i64(&d.properties, HEADER_DELAYED_AT).and_then(|v| u64::try_from(v).ok());
        // Without the header (put there by an older worker), the broker's TTL is left to it.
        let overdue = at.is_some_and(|at| now_ms().saturating_sub(at) > ttl_ms + grace(ttl_ms));
        let back = overdue
            && amqp::publish_confirmed(
                channel,
                &names.work_exchange(),
                queue,
                &d.data,
                d.properties.clone(),
            )
            .await?;
        if !back {
            d.acker.reject(BasicRejectOptions { requeue: true }).await?;
            return Ok(moved);
        }
        d.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::grace;

    #[test]
    fn a_batch_is_overdue_after_twice_its_ttl_and_at_least_two_seconds_more() {
        assert_eq!(grace(100), 2_000);
        assert_eq!(grace(5_000), 5_000);
        assert_eq!(grace(3_600_000), 3_600_000);
    }
}
