//! The sink: where analysed batches are stored, retried or dead-lettered, and then acked.
//!
//! Results are written many at a time (one pipelined round trip of idempotent scripts), and a
//! batch is acked only after Redis said OK. Retries and dead letters are published with
//! confirms, and the original is acked only after the broker confirmed the copy. While Redis is
//! unreachable the sink keeps trying with backoff and acks nothing.

use std::{
    collections::{BTreeSet, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

use lapin::{
    options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions},
    types::{AMQPValue, LongString},
    Channel,
};
use serde_json::json;
use taskmill_common::{
    amqp::with_extra_headers,
    envelope::{
        HEADER_ATTEMPT, HEADER_ATTEMPTS, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_KIND,
        HEADER_ORIGINAL_QUEUE,
    },
    now_ms,
    store::{DoneBatch, Store, StoreError},
    topology::{self, Names},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    analyse::{BatchId, DeadKind, Outcome},
    retry::RetryPolicy,
    Processed, Stats,
};

/// Most batches stored in one Redis round trip.
const MAX_GROUP: usize = 256;

/// Per consuming channel, the delivery tags handed out and not yet acked or nacked.
pub(crate) type Unacked = Arc<Vec<std::sync::Mutex<BTreeSet<u64>>>>;

pub(crate) struct Sink {
    pub(crate) store: Store,
    /// Confirm-mode channel for retries and dead letters.
    pub(crate) channel: Channel,
    /// Outstanding delivery tags of each consuming channel.
    pub(crate) unacked: Unacked,
    pub(crate) names: Names,
    pub(crate) policy: RetryPolicy,
    pub(crate) stats: Arc<Stats>,
    /// Readiness, for `/readyz` and `taskmill_connected`.
    pub(crate) health: Arc<crate::metrics::Health>,
    /// Cancelled when the shutdown timeout ends: stop retrying Redis, ack nothing more.
    pub(crate) hard_stop: CancellationToken,
    /// Delay queues declared in this session.
    pub(crate) declared: HashSet<String>,
}

impl Sink {
    /// Handles analysed batches until the sender side closes.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Processed>) -> anyhow::Result<()> {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(p) => group.push(p),
                    Err(_) => break,
                }
            }
            self.handle(group).await?;
        }
        Ok(())
    }

    async fn handle(&mut self, group: Vec<Processed>) -> anyhow::Result<()> {
        let mut done = Vec::new();
        let mut batches = Vec::new();
        let mut others = Vec::new();
        for p in group {
            match &p.analysed {
                Some((
                    BatchId {
                        job: Some(job),
                        batch: Some(batch),
                        ..
                    },
                    Outcome::Done(out),
                )) => {
                    batches.push(DoneBatch {
                        job: job.clone(),
                        batch: *batch,
                        result: out.result.to_string(),
                        records_done: out.records_done,
                        records_invalid: out.records_invalid,
                    });
                    done.push(p);
                }
                _ => others.push(p),
            }
        }
        if !done.is_empty() {
            let store = self.store.clone();
            let fresh = self
                .redis("storing results", || store.record_done_many(&batches))
                .await?;
            let now = now_ms();
            let mut latencies = Vec::with_capacity(done.len());
            for ((b, new), p) in batches.iter().zip(fresh).zip(&done) {
                let task = task_label(p);
                if let Some(created) = p.analysed.as_ref().and_then(|a| a.0.created_ms) {
                    let ms = now.saturating_sub(created);
                    latencies.push(ms);
                    metrics::histogram!("taskmill_batch_latency_seconds", "task" => task.clone())
                        .record(ms as f64 / 1000.0);
                }
                if new {
                    metrics::counter!("taskmill_batches_total", "task" => task.clone(), "outcome" => "done")
                        .increment(1);
                    metrics::counter!("taskmill_records_total", "task" => task.clone(), "outcome" => "done")
                        .increment(b.records_done);
                    if b.records_invalid > 0 {
                        metrics::counter!("taskmill_records_total", "task" => task, "outcome" => "invalid")
                            .increment(b.records_invalid);
                    }
                    Stats::add(&self.stats.batches_done, 1);
                    Stats::add(&self.stats.records_done, b.records_done);
                } else {
                    Stats::add(&self.stats.batches_duplicate, 1);
                    debug!(
                        job = %b.job,
                        batch = b.batch,
                        %task,
                        attempt = p.attempt,
                        "already stored: a redelivery"
                    );
                }
            }
            self.stats.record_latencies(latencies.into_iter());
            self.ack_group(&done).await?;
        }
        for p in others {
            self.handle_other(p).await?;
        }
        Ok(())
    }

    /// Acks a group of stored batches: on each channel, one multiple-ack up to the highest tag
    /// below which nothing else is outstanding, single acks for the rest.
    async fn ack_group(&self, group: &[Processed]) -> anyhow::Result<()> {
        metrics::gauge!("taskmill_batches_in_flight").decrement(group.len() as f64);
        let mut by_chan: std::collections::BTreeMap<usize, Vec<&Processed>> = Default::default();
        for p in group {
            by_chan.entry(p.chan).or_default().push(p);
        }
        for (chan, mut items) in by_chan {
            items.sort_by_key(|p| p.delivery.delivery_tag);
            let cut = match self.unacked.get(chan) {
                Some(set) => {
                    let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
                    for p in &items {
                        set.remove(&p.delivery.delivery_tag);
                    }
                    // The smallest tag still outstanding that is not in this group.
                    set.first().copied().unwrap_or(u64::MAX)
                }
                None => 0,
            };
            let below = items
                .iter()
                .take_while(|p| p.delivery.delivery_tag < cut)
                .count();
            if below > 0 {
                items[below - 1]
                    .delivery
                    .acker
                    .ack(BasicAckOptions {
                        multiple: below > 1,
                    })
                    .await
                    .map_err(|e| anyhow::Error::new(e).context("acking"))?;
            }
            for p in &items[below..] {
                p.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| anyhow::Error::new(e).context("acking"))?;
            }
        }
        Ok(())
    }

    /// Forgets an outstanding tag that is acked or nacked on its own.
    fn forget(&self, p: &Processed) {
        if let Some(set) = self.unacked.get(p.chan) {
            set.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p.delivery.delivery_tag);
        }
    }

    /// Retries Redis calls with backoff until they succeed or the hard stop comes.
    async fn redis<T, F, Fut>(&self, what: &str, mut f: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match f().await {
                Ok(v) => {
                    self.health.set_redis(true);
                    return Ok(v);
                }
                Err(e) => {
                    Stats::add(&self.stats.store_errors, 1);
                    self.health.set_redis(false);
                    warn!("{what}: {e}; trying again in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.hard_stop.cancelled() => {
                            anyhow::bail!("stopped while {what}: {e}");
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn handle_other(&mut self, p: Processed) -> anyhow::Result<()> {
        self.forget(&p);
        metrics::gauge!("taskmill_batches_in_flight").decrement(1.0);
        let Some((id, outcome)) = p.analysed.clone() else {
            warn!("analysis thread lost a batch; giving it back to the queue");
            return Self::nack_requeue(&p).await;
        };
        match outcome {
            Outcome::Retry(error) => {
                let policy = self.policy.for_params(&id.params);
                if policy.may_retry(p.attempt) {
                    self.retry(&p, &id, &policy, &error).await
                } else {
                    let error = format!("{error} (gave up after {} attempts)", p.attempt);
                    self.dead(&p, &id, DeadKind::RetriesExhausted, &error).await
                }
            }
            Outcome::Dead(kind, error) => self.dead(&p, &id, kind, &error).await,
            Outcome::Done(_) => {
                // A Done without job or batch cannot come out of a decoded envelope.
                self.dead(&p, &id, DeadKind::Undecodable, "batch without identity")
                    .await
            }
        }
    }

    /// Publishes with mandatory and waits for the confirm; true when the broker took it.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: lapin::BasicProperties,
    ) -> anyhow::Result<bool> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await?
            .await?;
        Ok(confirm.is_ack() && confirm.take_message().is_none())
    }

    async fn nack_requeue(p: &Processed) -> anyhow::Result<()> {
        p.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await?;
        Ok(())
    }

    async fn retry(
        &mut self,
        p: &Processed,
        id: &BatchId,
        policy: &RetryPolicy,
        error: &str,
    ) -> anyhow::Result<()> {
        let job = id.job.clone().unwrap_or_default();
        let batch = id.batch.unwrap_or(0);
        let delay = policy.delay_ms(p.attempt, &job, batch);
        let queue = p.queue.clone();
        let name = self.names.delay_queue(&queue, delay);
        if !self.declared.contains(&name) {
            topology::declare_delay_queue(&self.channel, &self.names, &queue, delay).await?;
            self.declared.insert(name.clone());
        }
        let props = with_extra_headers(
            &p.delivery.properties,
            [(
                HEADER_ATTEMPT,
                AMQPValue::LongLongInt(i64::from(p.attempt) + 1),
            )],
        );
        if !self.publish_confirmed("", &name, &p.body, props).await? {
            warn!(%job, batch, task = %task_label(p), attempt = p.attempt,
                "the broker refused a retry copy; the batch goes back to the queue");
            return Self::nack_requeue(p).await;
        }
        let store = self.store.clone();
        self.redis("counting a retry", || store.add_retry(&job))
            .await?;
        Stats::add(&self.stats.batches_retried, 1);
        metrics::counter!("taskmill_batches_total", "task" => task_label(p), "outcome" => "retried")
            .increment(1);
        warn!(%job, batch, task = %task_label(p), attempt = p.attempt, delay_ms = delay,
            "transient failure, retrying: {error}");
        p.delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn dead(
        &mut self,
        p: &Processed,
        id: &BatchId,
        kind: DeadKind,
        error: &str,
    ) -> anyhow::Result<()> {
        let at = now_ms();
        let original = self.names.queue(&p.queue);
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.to_string()));
        let props = with_extra_headers(
            &p.delivery.properties,
            [
                (HEADER_ERROR, text(error)),
                (HEADER_ERROR_KIND, text(kind.as_str())),
                (
                    HEADER_ATTEMPTS,
                    AMQPValue::LongLongInt(i64::from(p.attempt)),
                ),
                (HEADER_ORIGINAL_QUEUE, text(&original)),
                (HEADER_DEAD_AT, AMQPValue::LongLongInt(at as i64)),
            ],
        );
        if !self
            .publish_confirmed(&self.names.dead_exchange(), &original, &p.body, props)
            .await?
        {
            warn!(
                job = id.job.as_deref().unwrap_or("?"),
                batch = ?id.batch,
                task = %task_label(p),
                attempt = p.attempt,
                "the broker refused a dead letter; the batch goes back to the queue"
            );
            return Self::nack_requeue(p).await;
        }
        if let (Some(job), Some(batch)) = (&id.job, id.batch) {
            let reason = json!({
                "kind": kind.as_str(),
                "error": error,
                "attempts": p.attempt,
                "queue": original,
                "at_ms": at,
            });
            let store = self.store.clone();
            self.redis("marking a batch dead", || {
                store.record_dead(job, batch, &reason)
            })
            .await?;
        }
        Stats::add(&self.stats.batches_dead, 1);
        metrics::counter!("taskmill_batches_total", "task" => task_label(p), "outcome" => "dead")
            .increment(1);
        warn!(
            job = id.job.as_deref().unwrap_or("?"),
            batch = ?id.batch,
            task = id.task.as_deref().unwrap_or("?"),
            attempt = p.attempt,
            kind = kind.as_str(),
            "dead-lettered: {error}"
        );
        p.delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

/// The `task` label of a batch (`unknown` when its body could not be read).
fn task_label(p: &Processed) -> String {
    p.analysed
        .as_ref()
        .and_then(|(id, _)| id.task.clone())
        .unwrap_or_else(|| "unknown".into())
}
