//! The sink: where analysed batches are stored, retried or dead-lettered, and then acked.
//!
//! Results are written many at a time (one pipelined round trip of idempotent scripts), and a
//! batch is acked only after Redis said OK. Retries and dead letters are published with
//! confirms on a connection of their own, and the original is acked only after the broker
//! confirmed the copy. Those publishes run beside the storing of results, so that a broker
//! that blocks publishers (a memory or disk alarm) never stops the worker from storing and
//! acking, which is what clears the alarm. While Redis is unreachable the sink keeps trying
//! with backoff and acks nothing.

use std::{
    collections::{BTreeSet, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

use futures::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions},
    types::{AMQPValue, LongString},
    Channel,
};
use serde_json::json;
use taskmill_common::{
    amqp::with_extra_headers,
    envelope::{
        bounded, HEADER_ATTEMPT, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_KIND,
        HEADER_ORIGINAL_QUEUE, MAX_HEADER_TEXT,
    },
    now_ms,
    store::{DoneBatch, Recorded, Store, StoreError},
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

/// What the sink and its retry and dead-letter publishes share.
pub(crate) struct Sink {
    pub(crate) store: Store,
    /// Confirm-mode channel for retries and dead letters, on the publishing connection.
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
    pub(crate) declared: tokio::sync::Mutex<HashSet<String>>,
}

impl Sink {
    /// Handles analysed batches until the sender side closes and every retry and dead letter
    /// in progress is settled.
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<Processed>) -> anyhow::Result<()> {
        let sink = Arc::new(self);
        let mut others = FuturesUnordered::new();
        let mut open = true;
        while open || !others.is_empty() {
            tokio::select! {
                Some(res) = others.next(), if !others.is_empty() => res?,
                msg = rx.recv(), if open => match msg {
                    Some(first) => {
                        let mut group = vec![first];
                        while group.len() < MAX_GROUP {
                            match rx.try_recv() {
                                Ok(p) => group.push(p),
                                Err(_) => break,
                            }
                        }
                        for p in sink.store_done(group).await? {
                            others.push(Arc::clone(&sink).handle_other(p));
                        }
                    }
                    None => open = false,
                },
            }
        }
        Ok(())
    }

    /// Stores and acks the batches whose task ran; returns the rest (failures, and batches
    /// the store refused because their job or batch number is unknown).
    async fn store_done(&self, group: Vec<Processed>) -> anyhow::Result<Vec<Processed>> {
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
        if done.is_empty() {
            return Ok(others);
        }
        let store = self.store.clone();
        let recorded = self
            .redis("storing results", || store.record_done_many(&batches))
            .await?;
        let now = now_ms();
        let mut latencies = Vec::with_capacity(done.len());
        let mut acks = Vec::with_capacity(done.len());
        for ((b, rec), mut p) in batches.iter().zip(recorded).zip(done) {
            let label = label(&p);
            match rec {
                Recorded::Stored => {
                    if let Some(created) = p.analysed.as_ref().and_then(|a| a.0.created_ms) {
                        let ms = now.saturating_sub(created);
                        latencies.push(ms);
                        metrics::histogram!("taskmill_batch_latency_seconds", "task" => label)
                            .record(ms as f64 / 1000.0);
                    }
                    metrics::counter!("taskmill_batches_total", "task" => label, "outcome" => "done")
                        .increment(1);
                    metrics::counter!("taskmill_records_total", "task" => label, "outcome" => "done")
                        .increment(b.records_done);
                    if b.records_invalid > 0 {
                        metrics::counter!("taskmill_records_total", "task" => label, "outcome" => "invalid")
                            .increment(b.records_invalid);
                    }
                    Stats::add(&self.stats.batches_done, 1);
                    Stats::add(&self.stats.records_done, b.records_done);
                    acks.push(p);
                }
                Recorded::Duplicate => {
                    Stats::add(&self.stats.batches_duplicate, 1);
                    debug!(job = %b.job, batch = b.batch, task = label, attempt = p.attempt,
                        "already stored: a redelivery");
                    acks.push(p);
                }
                Recorded::UnknownJob | Recorded::UnknownBatch => {
                    let (kind, why) = refusal(rec, &b.job, b.batch);
                    if let Some((_, outcome)) = p.analysed.as_mut() {
                        *outcome = Outcome::Dead(kind, why);
                    }
                    others.push(p);
                }
            }
        }
        self.stats.record_latencies(latencies.into_iter());
        self.ack_group(&acks).await?;
        Ok(others)
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

    /// Acks or nacks one batch on its own, then forgets its tag (only then: until it is
    /// settled, multiple-acks of other batches must stop below it).
    async fn settle_one(&self, p: &Processed, ack: bool) -> anyhow::Result<()> {
        let res = if ack {
            p.delivery.acker.ack(BasicAckOptions::default()).await
        } else {
            p.delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        };
        if let Some(set) = self.unacked.get(p.chan) {
            set.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p.delivery.delivery_tag);
        }
        metrics::gauge!("taskmill_batches_in_flight").decrement(1.0);
        res.map(|_| ())
            .map_err(|e| anyhow::Error::new(e).context(if ack { "acking" } else { "nacking" }))
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

    /// A batch that was not stored: retry it, dead-letter it, or give it back.
    async fn handle_other(self: Arc<Self>, p: Processed) -> anyhow::Result<()> {
        let Some((id, outcome)) = p.analysed.clone() else {
            warn!("analysis thread lost a batch; giving it back to the queue");
            return self.settle_one(&p, false).await;
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
                self.dead(&p, &id, DeadKind::UnknownJob, "batch without identity")
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

    async fn retry(
        &self,
        p: &Processed,
        id: &BatchId,
        policy: &RetryPolicy,
        error: &str,
    ) -> anyhow::Result<()> {
        let (Some(job), Some(batch)) = (id.job.clone(), id.batch) else {
            return self
                .dead(p, id, DeadKind::UnknownJob, "batch without identity")
                .await;
        };
        // A batch of no known job (or outside it) is not retried: it would only come back.
        let store = self.store.clone();
        let counted = self
            .redis("counting a retry", || store.add_retry(&job, batch))
            .await?;
        if matches!(counted, Recorded::UnknownJob | Recorded::UnknownBatch) {
            let (kind, why) = refusal(counted, &job, batch);
            return self.dead(p, id, kind, &why).await;
        }
        let delay = policy.delay_ms(p.attempt, &job, batch);
        let name = self.names.delay_queue(&p.queue, delay);
        {
            let mut declared = self.declared.lock().await;
            if !declared.contains(&name) {
                topology::declare_delay_queue(&self.channel, &self.names, &p.queue, delay).await?;
                declared.insert(name.clone());
            }
        }
        let props = with_extra_headers(
            &p.delivery.properties,
            [(
                HEADER_ATTEMPT,
                AMQPValue::LongLongInt(i64::from(p.attempt) + 1),
            )],
        );
        let task = label(p);
        if !self.publish_confirmed("", &name, &p.body, props).await? {
            warn!(%job, batch, task, attempt = p.attempt,
                "the broker refused a retry copy; the batch goes back to the queue");
            return self.settle_one(p, false).await;
        }
        Stats::add(&self.stats.batches_retried, 1);
        metrics::counter!("taskmill_batches_total", "task" => task, "outcome" => "retried")
            .increment(1);
        warn!(%job, batch, task, attempt = p.attempt, delay_ms = delay,
            "transient failure, retrying: {}", bounded(error, MAX_HEADER_TEXT));
        self.settle_one(p, true).await
    }

    async fn dead(
        &self,
        p: &Processed,
        id: &BatchId,
        kind: DeadKind,
        error: &str,
    ) -> anyhow::Result<()> {
        let at = now_ms();
        let original = self.names.queue(&p.queue);
        let error = bounded(error, MAX_HEADER_TEXT);
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.to_string()));
        let props = with_extra_headers(
            &p.delivery.properties,
            [
                (HEADER_ERROR, text(&error)),
                (HEADER_ERROR_KIND, text(kind.as_str())),
                (HEADER_ATTEMPT, AMQPValue::LongLongInt(i64::from(p.attempt))),
                (HEADER_ORIGINAL_QUEUE, text(&original)),
                (HEADER_DEAD_AT, AMQPValue::LongLongInt(at as i64)),
            ],
        );
        let job = id.job.as_deref().unwrap_or("-");
        let batch = id.batch.map_or_else(|| "-".to_string(), |b| b.to_string());
        let task = id.task.as_deref().unwrap_or("-");
        if !self
            .publish_confirmed(&self.names.dead_exchange(), &original, &p.body, props)
            .await?
        {
            warn!(
                job,
                batch,
                task,
                attempt = p.attempt,
                "the broker refused a dead letter; the batch goes back to the queue"
            );
            return self.settle_one(p, false).await;
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
        metrics::counter!("taskmill_batches_total", "task" => label(p), "outcome" => "dead")
            .increment(1);
        warn!(
            job,
            batch,
            task,
            attempt = p.attempt,
            kind = kind.as_str(),
            "dead-lettered: {error}"
        );
        self.settle_one(p, true).await
    }
}

/// Why the store refused a batch, as a dead-letter kind and text.
fn refusal(rec: Recorded, job: &str, batch: u64) -> (DeadKind, String) {
    if rec == Recorded::UnknownJob {
        (
            DeadKind::UnknownJob,
            format!("no job {job:?} in this namespace (never registered, or expired)"),
        )
    } else {
        (
            DeadKind::UnknownBatch,
            format!("job {job:?} never published a batch {batch}"),
        )
    }
}

/// The `task` label of a batch: a task this worker knows, else `unknown`.
fn label(p: &Processed) -> &'static str {
    p.analysed.as_ref().map_or("unknown", |(id, _)| id.label)
}
