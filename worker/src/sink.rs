//! The sink carries out what [`crate::decide`] decides: it stores results, publishes retries
//! and dead letters, and acks as the [`AckTracker`] plans. It does I/O only; the policy is in
//! `decide`, `retry` and `ack`.
//!
//! Results are written many at a time (one pipelined round trip of idempotent scripts), and a
//! batch is acked only after Redis said OK. Retries and dead letters are published with
//! confirms on a connection of their own, and the original is acked only after the broker
//! confirmed the copy. Those publishes run beside the storing of results, so that a broker
//! that blocks publishers (a memory or disk alarm) never stops the worker from storing and
//! acking, which is what clears the alarm.
//!
//! Redis errors: a transient one (connection trouble, a restarting server) is retried with
//! backoff while nothing is acked; refused credentials or permissions end the session (the
//! worker stops); any other error is permanent for the batches of that call (a key of the
//! job holds the wrong type, say), which are dead-lettered as `store_error` instead of being
//! retried for ever.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{BasicAckOptions, BasicNackOptions},
    types::{AMQPValue, LongString},
    Channel,
};
use taskmill_common::dead::DeadReason;
use taskmill_common::{
    amqp::{self, with_extra_headers},
    envelope::{
        bounded, HEADER_ATTEMPT, HEADER_DEAD_AT, HEADER_ERROR, HEADER_ERROR_KIND,
        HEADER_ORIGINAL_QUEUE, MAX_HEADER_TEXT,
    },
    now_ms,
    store::{DoneBatch, Recorded, Store, StoreError},
    topology::{self, Names},
    Backoff,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::{
    ack::{AckPlan, AckTracker},
    analyse::{DeadKind, Outcome},
    decide::{self, Action},
    pool::Processed,
    retry::RetryPolicy,
    Stats,
};

/// Most batches stored in one Redis round trip.
const MAX_GROUP: usize = 256;

/// How long a copy of a batch (a retry, a delayed or dead copy) may wait for its confirm
/// before the batch's tag stops holding back the acks of the stored batches above it.
const HOLD_AFTER: Duration = Duration::from_millis(250);

/// What the sink and its retry and dead-letter publishes share.
pub(crate) struct Sink {
    pub(crate) store: Store,
    /// Confirm-mode channel for retries and dead letters, on the publishing connection.
    pub(crate) channel: Channel,
    /// Outstanding delivery tags of each consuming channel.
    pub(crate) tracker: Arc<std::sync::Mutex<AckTracker>>,
    /// The consuming channels (index = the tracker's channel), to ack by tag.
    pub(crate) consumers: Vec<Channel>,
    pub(crate) names: Names,
    pub(crate) policy: RetryPolicy,
    pub(crate) stats: Arc<Stats>,
    /// Readiness, for `/readyz` and `taskmill_connected`.
    pub(crate) health: Arc<crate::metrics::Health>,
    /// Cancelled when the shutdown timeout ends: stop retrying Redis, ack nothing more.
    pub(crate) hard_stop: CancellationToken,
    /// Delay queues declared in this session.
    pub(crate) declared: crate::sweep::Declared,
    /// The tasks, to fold a finished job's results into its summary.
    pub(crate) registry: taskmill_common::task::Registry,
    /// How long a batch of a task no live worker of its queue serves waits for one.
    pub(crate) unknown_task_wait: std::time::Duration,
    /// The publishing connection's status: blocked by a broker alarm or not.
    pub(crate) publishing: lapin::ConnectionStatus,
    /// Who claims parked copies (this session).
    pub(crate) id: String,
}

/// A copy parked in Redis while the publishing connection was blocked: where it goes.
#[derive(serde::Serialize, serde::Deserialize)]
struct ParkedCopy {
    exchange: String,
    routing_key: String,
    /// A delay queue's work queue and delay: declared again before publishing.
    delay: Option<(String, u64)>,
    props: lapin::BasicProperties,
}

/// How often parked copies are looked for while the publishing connection is unblocked, and
/// how often a pending copy checks whether the connection is blocked.
const PARKED_CHECK: Duration = Duration::from_millis(500);

/// How a Redis call ended, once transient errors were retried away.
enum Stored<T> {
    Ok(T),
    /// A permanent error for this call's batches.
    Failed(StoreError),
}

impl Sink {
    /// Handles analysed batches until the sender side closes and every retry and dead letter
    /// in progress is settled.
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<Processed>) -> anyhow::Result<()> {
        let sink = Arc::new(self);
        let parked = tokio::spawn(Arc::clone(&sink).publish_parked());
        // (The parked copies' publisher ends with its sink.)
        let _abort = tokio_util::task::AbortOnDropHandle::new(parked);
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
                        record_durations(&group);
                        for (p, action) in sink.store_done(group).await? {
                            others.push(Arc::clone(&sink).carry_out(p, action));
                        }
                    }
                    None => open = false,
                },
            }
        }
        // The session ends: what was stored and waits for lower tags is acked now.
        if !sink.hard_stop.is_cancelled() {
            let plans = sink
                .tracker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flush();
            for (chan, plan) in plans {
                sink.send_acks(chan, plan).await?;
            }
        }
        Ok(())
    }

    /// Sends an ack plan on consuming channel `chan`.
    async fn send_acks(&self, chan: usize, plan: AckPlan) -> anyhow::Result<()> {
        let Some(ch) = self.consumers.get(chan) else {
            return Ok(());
        };
        Stats::add(&self.stats.acks_sent, plan.frames() as u64);
        if let Some(tag) = plan.multiple_up_to {
            ch.basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| anyhow::Error::new(e).context("acking"))?;
        }
        for tag in plan.singles {
            ch.basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(|e| anyhow::Error::new(e).context("acking"))?;
        }
        Ok(())
    }

    /// Stores and acks the batches whose task ran; returns the rest with their action
    /// (failures, and batches the store refused or could not take).
    async fn store_done(&self, group: Vec<Processed>) -> anyhow::Result<Vec<(Processed, Action)>> {
        let mut done = Vec::new();
        let mut others = Vec::new();
        for p in group {
            match decide::decide(p.analysed.as_ref(), p.attempt, &self.policy) {
                Action::Store => done.push(p),
                action => others.push((p, action)),
            }
        }
        if done.is_empty() {
            return Ok(others);
        }
        // Jobs are stored together; when that fails for good, each job alone, so that one
        // job's broken keys cost only its own batches.
        let batches: Vec<DoneBatch> = done.iter().filter_map(done_batch).collect();
        let recorded: Vec<Result<Recorded, String>> = match self
            .redis("storing results", || {
                self.store.record_done_finishing(&batches)
            })
            .await?
        {
            Stored::Ok((r, finished)) => {
                for job in finished {
                    self.fold_summary(job, &done);
                }
                r.into_iter().map(Ok).collect()
            }
            Stored::Failed(_) => self.store_each_job(&batches).await?,
        };
        let now = now_ms();
        let mut counts = GroupCounts::default();
        let mut acks = Vec::with_capacity(done.len());
        for ((b, rec), p) in batches.iter().zip(recorded).zip(done) {
            match rec {
                Ok(Recorded::Stored) => {
                    let latency = p.analysed.as_ref().and_then(|a| a.0.created_ms);
                    let latency = latency.map(|ms| now.saturating_sub(ms));
                    let here = u64::try_from(p.arrived.elapsed().as_micros()).unwrap_or(u64::MAX);
                    counts.done(p.label(), b, latency, here);
                    Stats::add(&self.stats.batches_done, 1);
                    Stats::add(&self.stats.records_done, b.records_done);
                    acks.push(p);
                }
                Ok(Recorded::Duplicate) => {
                    Stats::add(&self.stats.batches_duplicate, 1);
                    debug!(job = %b.job, batch = b.batch, "already stored: a redelivery");
                    acks.push(p);
                }
                Ok(rec) => {
                    let action = decide::refused(rec, &b.job, b.batch).unwrap_or(Action::GiveBack);
                    others.push((p, action));
                }
                Err(e) => others.push((p, store_failed(&e))),
            }
        }
        counts.publish(&self.stats);
        self.ack_group(&acks).await?;
        Ok(others)
    }

    /// Folds a job that just finished into its summary, beside the storing (off the sink's
    /// path).
    fn fold_summary(&self, job: String, group: &[Processed]) {
        let name = group.iter().find_map(|p| match &p.analysed {
            Some((id, _)) if id.job.as_deref() == Some(job.as_str()) => Some(id.label),
            _ => None,
        });
        let Some(task) = name.and_then(|n| self.registry.get(n)) else {
            return;
        };
        tokio::spawn(fold(self.store.clone(), job, task));
    }

    /// A request to fold a job's summary (sent when publishing ended): done when the job is
    /// finished without one and this worker knows its task; acked either way.
    async fn summarize(&self, p: &Processed) -> anyhow::Result<()> {
        if let Some((job, _)) = identity(p) {
            if let Ok(Some(status)) = self.store.job_status(&job).await {
                let task = self.registry.get(status.task());
                if let (true, None, Some(task)) = (status.is_finished(), &status.summary, task) {
                    fold(self.store.clone(), job, task).await;
                }
            }
        }
        self.settle_one(p, true).await
    }

    /// Stores each job's batches with a call of its own; a permanent error fails that job's.
    async fn store_each_job(
        &self,
        batches: &[DoneBatch],
    ) -> anyhow::Result<Vec<Result<Recorded, String>>> {
        let mut out: Vec<Result<Recorded, String>> = vec![Err(String::new()); batches.len()];
        let mut jobs: Vec<&str> = batches.iter().map(|b| b.job.as_str()).collect();
        jobs.dedup();
        jobs.sort_unstable();
        jobs.dedup();
        for job in jobs {
            let idx: Vec<usize> = (0..batches.len())
                .filter(|&i| batches[i].job == job)
                .collect();
            let part: Vec<DoneBatch> = idx.iter().map(|&i| batches[i].clone()).collect();
            match self
                .redis("storing results", || self.store.record_done_many(&part))
                .await?
            {
                Stored::Ok(recs) => {
                    for (&i, r) in idx.iter().zip(recs) {
                        out[i] = Ok(r);
                    }
                }
                Stored::Failed(e) => {
                    warn!(job, "Redis refused the results of this job: {e}");
                    for &i in &idx {
                        out[i] = Err(e.to_string());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Acks a group of stored batches: one multiple-ack a channel, now or with a later group
    /// (the tracker decides).
    async fn ack_group(&self, group: &[Processed]) -> anyhow::Result<()> {
        self.stats.in_flight(-(group.len() as i64));
        let mut by_chan: std::collections::BTreeMap<usize, Vec<u64>> = Default::default();
        for p in group {
            by_chan
                .entry(p.chan)
                .or_default()
                .push(p.delivery.delivery_tag);
        }
        for (chan, tags) in by_chan {
            let plan = self
                .tracker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .settle(chan, tags);
            self.send_acks(chan, plan).await?;
        }
        Ok(())
    }

    /// Acks or nacks one batch on its own, then forgets its tag (only then: until it is
    /// settled, multiple-acks of other batches must stop below it).
    async fn settle_one(&self, p: &Processed, ack: bool) -> anyhow::Result<()> {
        let res = if ack {
            p.delivery.acker.ack(BasicAckOptions::default()).await
        } else {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            p.delivery.acker.nack(requeue).await
        };
        Stats::add(&self.stats.acks_sent, 1);
        let released = self
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(p.chan, p.delivery.delivery_tag);
        self.stats.in_flight(-1);
        res.map_err(|e| anyhow::Error::new(e).context(if ack { "acking" } else { "nacking" }))?;
        // Stored batches above this one may have waited for it.
        self.send_acks(p.chan, released).await
    }

    /// Runs a Redis call: transient errors are retried with backoff until the hard stop;
    /// refused credentials end the session (Err); other errors are returned as permanent.
    async fn redis<T, F, Fut>(&self, what: &str, mut f: F) -> anyhow::Result<Stored<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let e = match f().await {
                Ok(v) => {
                    self.health.set_redis(true);
                    return Ok(Stored::Ok(v));
                }
                Err(e) => e,
            };
            Stats::add(&self.stats.store_errors, 1);
            if e.refused() {
                self.health.set_redis(false);
                return Err(anyhow::Error::new(e).context(format!("{what}: Redis refused")));
            }
            if !e.is_transient() {
                return Ok(Stored::Failed(e));
            }
            self.health.set_redis(false);
            let delay = backoff.next_delay();
            warn!("{what}: {e}; trying again in {delay:?}");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.hard_stop.cancelled() => anyhow::bail!("stopped while {what}: {e}"),
            }
        }
    }

    /// Carries out the action for a batch that was not stored, in a span that names it.
    async fn carry_out(self: Arc<Self>, p: Processed, action: Action) -> anyhow::Result<()> {
        let (job, batch, task) = match &p.analysed {
            Some((id, _)) => (
                id.job.clone().unwrap_or_else(|| "-".into()),
                id.batch.map_or_else(|| "-".into(), |b| b.to_string()),
                id.task.clone().unwrap_or_else(|| "-".into()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let span = tracing::info_span!("batch", %job, %batch, %task, attempt = p.attempt);
        async move {
            match action {
                Action::GiveBack => {
                    warn!("the analysis thread lost the batch; giving it back to the queue");
                    self.settle_one(&p, false).await
                }
                Action::Retry { delay_ms } => self.retry(&p, delay_ms).await,
                Action::Summarize => self.summarize(&p).await,
                Action::Cancel => self.dropped(&p, false).await,
                Action::Expire => self.dropped(&p, true).await,
                Action::Delay { delay_ms } => self.delay(&p, delay_ms).await,
                Action::Dead {
                    kind: DeadKind::UnknownTask,
                    error,
                } => self.unknown_task(&p, &error).await,
                Action::Dead { kind, error } => self.dead(&p, kind, &error).await,
                Action::Store => {
                    self.dead(&p, DeadKind::UnknownJob, "batch without identity")
                        .await
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Publishes a copy of batch `p` (a retry, a delayed or dead copy; `delay`: the delay
    /// queue's work queue and delay) and waits for the confirm: true once the broker took it
    /// or it is parked in Redis. While a broker alarm blocks the publishing connection, the
    /// copy is parked instead (the original is then acked, and its prefetch slot goes to a
    /// batch that may succeed); one already handed to the connection when the block came is
    /// parked too, so it may reach the queue twice (the store counts each batch once). After
    /// [`HOLD_AFTER`] without a confirm, `p`'s tag stops holding back the acks of the stored
    /// batches above it.
    async fn publish_for(
        &self,
        p: &Processed,
        (exchange, routing_key): (&str, &str),
        delay: Option<(&str, u64)>,
        body: &[u8],
        props: lapin::BasicProperties,
    ) -> anyhow::Result<bool> {
        let copy = || ParkedCopy {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            delay: delay.map(|(q, ms)| (q.to_string(), ms)),
            props: props.clone(),
        };
        if self.publishing.blocked() && self.park(p, copy(), body).await {
            return Ok(true);
        }
        // A delay queue is declared first: on a blocked connection the broker reads nothing,
        // so the declaration waits as long as the publish (and is covered as it is).
        let publish = async {
            if let Some((queue, ms)) = delay {
                self.delay_queue(queue, ms).await?;
            }
            self.publish_confirmed(exchange, routing_key, body, props.clone())
                .await
        };
        tokio::pin!(publish);
        tokio::select! {
            res = &mut publish => return res,
            _ = tokio::time::sleep(HOLD_AFTER) => {}
        }
        let released = self
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hold(p.chan, p.delivery.delivery_tag);
        self.send_acks(p.chan, released).await?;
        loop {
            tokio::select! {
                res = &mut publish => return res,
                _ = tokio::time::sleep(PARKED_CHECK) => {
                    if self.publishing.blocked() && self.park(p, copy(), body).await {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Parks a copy of batch `p` in Redis: false when it cannot be (Redis full of parked
    /// copies, a large body, Redis failing), and the copy then waits for the broker.
    async fn park(&self, p: &Processed, copy: ParkedCopy, body: &[u8]) -> bool {
        let Ok(meta) = serde_json::to_string(&copy) else {
            return false;
        };
        let id = format!(
            "{}:{}",
            identity(p).map_or_else(|| "-".to_string(), |(j, b)| format!("{j}:{b}")),
            uuid::Uuid::new_v4().simple()
        );
        match self.store.park(&id, &meta, body).await {
            Ok(true) => {
                Stats::add(&self.stats.copies_parked, 1);
                debug!(to = %copy.routing_key, "the broker blocks publishing (an alarm): copy parked in Redis");
                true
            }
            Ok(false) => false,
            Err(e) => {
                warn!("parking a copy while the broker blocks publishing: {e}");
                false
            }
        }
    }

    /// Until the session ends: publishes the namespace's parked copies (any worker's) while
    /// the publishing connection is not blocked, each under a claim, and removes them once
    /// confirmed. A copy that does not go out (blocked again, refused) is left for later.
    async fn publish_parked(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PARKED_CHECK).await;
            if self.publishing.blocked() {
                continue;
            }
            let copies = match self.store.claim_parked(&self.id, 100).await {
                Ok(c) => c,
                Err(e) => {
                    debug!("reading parked copies: {e}");
                    continue;
                }
            };
            for (id, meta, body) in copies {
                let Ok(copy) = serde_json::from_str::<ParkedCopy>(&meta) else {
                    warn!(%id, "a parked copy that cannot be read (edited by hand?): dropped");
                    let _ = self.store.unpark(&id).await;
                    continue;
                };
                let routing_key = match &copy.delay {
                    Some((queue, ms)) => match self.delay_queue(queue, *ms).await {
                        Ok(name) => name,
                        Err(e) => {
                            debug!("declaring a delay queue for a parked copy: {e:#}");
                            let _ = self.store.release_parked(&id).await;
                            break;
                        }
                    },
                    None => copy.routing_key.clone(),
                };
                let sent = tokio::time::timeout(
                    Duration::from_secs(10),
                    self.publish_confirmed(&copy.exchange, &routing_key, &body, copy.props),
                )
                .await;
                if matches!(sent, Ok(Ok(true))) {
                    if let Err(e) = self.store.unpark(&id).await {
                        warn!(%id, "removing a published parked copy: {e}");
                    }
                } else {
                    let _ = self.store.release_parked(&id).await;
                    break;
                }
            }
        }
    }

    /// Publishes on the publishing channel and waits for the confirm.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: lapin::BasicProperties,
    ) -> anyhow::Result<bool> {
        Ok(amqp::publish_confirmed(&self.channel, exchange, routing_key, body, props).await?)
    }

    /// A batch dropped unrun (its job was cancelled, or it expired): counted, then acked.
    async fn dropped(&self, p: &Processed, expired: bool) -> anyhow::Result<()> {
        let Some((job, batch)) = identity(p) else {
            return self
                .dead(p, DeadKind::UnknownJob, "batch without identity")
                .await;
        };
        let recorded = self.redis("counting a dropped batch", || {
            self.store.record_dropped(&job, batch, expired)
        });
        match recorded.await? {
            // A cancelled job whose keys are gone was deleted: its batches are dropped
            // quietly, counted nowhere (there is no job to count them in), no dead letter.
            Stored::Ok(Recorded::UnknownJob) if !expired => {
                metrics::counter!("taskmill_batches_total", "task" => p.label(), "outcome" => "deleted")
                    .increment(1);
                Stats::add(&self.stats.batches_deleted, 1);
                debug!("dropped unrun: its job was deleted");
                return self.settle_one(p, true).await;
            }
            Stored::Ok(rec) => {
                if let Some(Action::Dead { kind, error }) = decide::refused(rec, &job, batch) {
                    return self.dead(p, kind, &error).await;
                }
            }
            Stored::Failed(e) => return self.dead(p, DeadKind::StoreError, &e.to_string()).await,
        }
        let outcome = if expired { "expired" } else { "cancelled" };
        Stats::add(&self.stats.batches_cancelled, 1);
        metrics::counter!("taskmill_batches_total", "task" => p.label(), "outcome" => outcome)
            .increment(1);
        debug!("dropped unrun: {outcome}");
        self.settle_one(p, true).await
    }

    /// A batch of a task this worker lacks: back through the 1 s delay queue while a live
    /// worker of its queue serves the task, or while it has waited less than
    /// `unknown_task_wait` for one (at most [`MAX_DEFERRAL`] in all); else dead-lettered.
    async fn unknown_task(&self, p: &Processed, error: &str) -> anyhow::Result<()> {
        let now = now_ms();
        let since = taskmill_common::amqp::header_i64(
            &p.delivery.properties,
            taskmill_common::envelope::HEADER_DEFERRED_SINCE,
        )
        .and_then(|s| u64::try_from(s).ok())
        .filter(|&s| s <= now)
        .unwrap_or(now);
        let waited = std::time::Duration::from_millis(now - since);
        let task = p.analysed.as_ref().and_then(|(id, _)| id.task.clone());
        // Served on the queue the batch came from, priority bands included.
        let queue = topology::base_queue(&p.queue);
        let served = match &task {
            Some(t) => match self.store.served(queue, t).await {
                Ok(s) => s,
                Err(e) => {
                    // Cannot tell: give it back rather than lose it to a dead letter.
                    warn!("reading who serves the task: {e}");
                    true
                }
            },
            None => false,
        };
        let defer = identity(p).is_some()
            && waited < MAX_DEFERRAL
            && (served || waited < self.unknown_task_wait);
        if !defer {
            let why = if served {
                format!(
                    "{error} (given back for {} s: no worker took it)",
                    waited.as_secs()
                )
            } else {
                format!("{error}; no live worker of queue {queue} serves it")
            };
            return self.dead(p, DeadKind::UnknownTask, &why).await;
        }
        let props = with_extra_headers(
            &p.delivery.properties,
            [
                (
                    taskmill_common::envelope::HEADER_DEFERRED_SINCE,
                    AMQPValue::LongLongInt(i64::try_from(since).unwrap_or(i64::MAX)),
                ),
                delayed_at(),
            ],
        );
        if !self
            .publish_delayed(p, &p.queue, DEFER_MS, &p.body, props)
            .await?
        {
            warn!("the broker refused a deferred copy; the batch goes back to the queue");
            return self.settle_one(p, false).await;
        }
        Stats::add(&self.stats.batches_deferred, 1);
        metrics::counter!("taskmill_batches_total", "task" => "unknown", "outcome" => "deferred")
            .increment(1);
        debug!(
            served,
            "a task this worker lacks: given back for a worker that has it"
        );
        self.settle_one(p, true).await
    }

    /// A batch too early to run: back to wait in a delay queue (in the broker, not here),
    /// attempt unchanged, then acked.
    async fn delay(&self, p: &Processed, delay_ms: u64) -> anyhow::Result<()> {
        let props = with_extra_headers(&p.delivery.properties, [delayed_at()]);
        if !self
            .publish_delayed(p, &p.queue, delay_ms, &p.body, props)
            .await?
        {
            warn!("the broker refused a delayed copy; the batch goes back to the queue");
            return self.settle_one(p, false).await;
        }
        debug!(delay_ms, "too early: waiting in the broker");
        self.settle_one(p, true).await
    }

    /// Publishes a copy into the delay queue of `queue` (a shard's: its work queue's) for
    /// `delay_ms`: true once the broker
    /// took it. A copy returned unroutable means the queue is gone (deleted in the console,
    /// say, after this session declared it): it is declared again and the copy published
    /// once more, rather than the batch going back until its delivery limit.
    async fn publish_delayed(
        &self,
        p: &Processed,
        queue: &str,
        delay_ms: u64,
        body: &[u8],
        props: lapin::BasicProperties,
    ) -> anyhow::Result<bool> {
        // A shard's batch waits in its work queue's delay queues and comes back to shard 0.
        let queue = topology::retry_queue(queue);
        for _ in 0..2 {
            let name = self.names.delay_queue(queue, delay_ms);
            if self
                .publish_for(p, ("", &name), Some((queue, delay_ms)), body, props.clone())
                .await?
            {
                return Ok(true);
            }
            warn!(queue = %name, "a delayed copy came back: declaring its delay queue again");
            self.declared.lock().await.remove(&name);
        }
        Ok(false)
    }

    /// The delay queue of `queue` for `delay_ms`, declared once a session and recorded in
    /// Redis (the stalled-job watcher looks into every delay queue of a job's queue).
    async fn delay_queue(&self, queue: &str, delay_ms: u64) -> anyhow::Result<String> {
        let name = self.names.delay_queue(queue, delay_ms);
        let mut declared = self.declared.lock().await;
        if !declared.contains(&name) {
            topology::declare_delay_queue(&self.channel, &self.names, queue, delay_ms).await?;
            // Redis refusing for good (a key edited by hand) must not stop retries: the
            // watcher then misses this queue, and treats a job as stalled only after
            // --stall-after with nothing else of its queue anywhere.
            if let Stored::Failed(e) = self
                .redis("recording a delay queue", || {
                    self.store.add_delay_queue(&name)
                })
                .await?
            {
                warn!(queue = %name, "recording a delay queue for the stalled-job watcher: {e}");
            }
            declared.insert(name.clone());
        }
        Ok(name)
    }

    async fn retry(&self, p: &Processed, delay_ms: u64) -> anyhow::Result<()> {
        let Some((job, batch)) = identity(p) else {
            return self
                .dead(p, DeadKind::UnknownJob, "batch without identity")
                .await;
        };
        // A batch of no known job (or outside it) is not retried: it would only come back.
        let counted = match self
            .redis("counting a retry", || {
                self.store.add_retry(&job, batch, p.attempt)
            })
            .await?
        {
            Stored::Ok(rec) => rec,
            Stored::Failed(e) => return self.dead(p, DeadKind::StoreError, &e.to_string()).await,
        };
        if let Some(Action::Dead { kind, error }) = decide::refused(counted, &job, batch) {
            return self.dead(p, kind, &error).await;
        }
        let attempt = AMQPValue::LongLongInt(i64::from(p.attempt) + 1);
        let props = with_extra_headers(
            &p.delivery.properties,
            [(HEADER_ATTEMPT, attempt), delayed_at()],
        );
        if !self
            .publish_delayed(p, &p.queue, delay_ms, &p.body, props)
            .await?
        {
            warn!("the broker refused a retry copy; the batch goes back to the queue");
            return self.settle_one(p, false).await;
        }
        Stats::add(&self.stats.batches_retried, 1);
        metrics::counter!("taskmill_batches_total", "task" => p.label(), "outcome" => "retried")
            .increment(1);
        let error = match &p.analysed {
            Some((_, Outcome::Retry(e) | Outcome::OverTime(e))) => {
                bounded(e, MAX_HEADER_TEXT).into_owned()
            }
            _ => String::new(),
        };
        warn!(delay_ms, "transient failure, retrying: {error}");
        self.settle_one(p, true).await
    }

    async fn dead(&self, p: &Processed, kind: DeadKind, error: &str) -> anyhow::Result<()> {
        let at = now_ms();
        let original = self.names.queue(&p.queue);
        let error = bounded(error, MAX_HEADER_TEXT);
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.to_string()));
        let headers = [
            (HEADER_ERROR, text(&error)),
            (HEADER_ERROR_KIND, text(kind.as_str())),
            (HEADER_ATTEMPT, AMQPValue::LongLongInt(i64::from(p.attempt))),
            (HEADER_ORIGINAL_QUEUE, text(&original)),
            (HEADER_DEAD_AT, AMQPValue::LongLongInt(at as i64)),
        ];
        let props = with_extra_headers(&p.delivery.properties, headers);
        let dlx = self.names.dead_exchange();
        if !self
            .publish_for(p, (&dlx, &original), None, &p.body, props)
            .await?
        {
            warn!("the broker refused a dead letter; the batch goes back to the queue");
            return self.settle_one(p, false).await;
        }
        if let Some((job, batch)) = identity(p) {
            let reason = serde_json::to_value(DeadReason {
                kind: kind.as_str().into(),
                error: error.to_string(),
                attempts: i64::from(p.attempt),
                queue: Some(original),
                at_ms: at as i64,
            })
            .unwrap_or_default();
            let marked = self.redis("marking a batch dead", || {
                self.store.record_dead_finishing(&job, batch, &reason)
            });
            match marked.await? {
                Stored::Failed(e) => {
                    warn!("Redis refused to mark the batch dead (it stays a dead letter): {e}");
                }
                // The job is finished without a summary (this dead batch was its last to
                // settle): nobody else will fold it.
                Stored::Ok((_, true)) => self.fold_summary(job, std::slice::from_ref(p)),
                Stored::Ok(_) => {}
            }
        }
        Stats::add(&self.stats.batches_dead, 1);
        metrics::counter!("taskmill_batches_total", "task" => p.label(), "outcome" => "dead")
            .increment(1);
        warn!(kind = kind.as_str(), "dead-lettered: {error}");
        self.settle_one(p, true).await
    }
}

/// Folds a job's results into its summary with its task (the fold on a blocking thread, never
/// on tokio's) and stores it. A fold that fails (the task's `aggregate` panicked) is said in
/// the job's problems and counted, never a silent `summary: null`.
pub(crate) async fn fold(
    store: Store,
    job: String,
    task: std::sync::Arc<dyn taskmill_common::task::Task>,
) {
    let summary = if task.folds_in_pages() {
        fold_in_pages(&store, &job, task.clone()).await
    } else {
        match store.results(&job).await {
            Ok(r) => {
                let results: Vec<_> = r.into_iter().map(|(_, v)| v).collect();
                let task = task.clone();
                Some(aggregate(move || task.aggregate(&results)).await)
            }
            Err(e) => return warn!(%job, "reading the results to sum them up: {e}"),
        }
    };
    use taskmill_common::task::{json_depth, MAX_JSON_DEPTH};
    // A summary nested deeper than readers parse would read back as none at all.
    let summary = summary.map(|s| {
        s.and_then(|v| match json_depth(&v, MAX_JSON_DEPTH) {
            d if d > MAX_JSON_DEPTH => Err(format!(
                "the task's aggregate returned a summary nested more than {MAX_JSON_DEPTH} \
                 levels deep, which JSON readers refuse"
            )),
            _ => Ok(v),
        })
    });
    let summary = match summary {
        None => return,
        Some(Ok(summary)) => summary,
        Some(Err(why)) => {
            metrics::counter!("taskmill_summary_failures_total", "task" => task.name())
                .increment(1);
            warn!(%job, "the summary failed: {why}");
            let text = format!("summary failed: {}", bounded(&why, MAX_HEADER_TEXT));
            if let Err(e) = store.add_problem(&job, &text).await {
                warn!(%job, "recording that the summary failed: {e}");
            }
            return;
        }
    };
    if let Err(e) = store.set_summary(&job, &summary).await {
        warn!(%job, "storing the summary: {e}");
    }
}

/// Runs a task's `aggregate` on a blocking thread: its value, or what its panic said.
async fn aggregate(
    f: impl FnOnce() -> serde_json::Value + Send + 'static,
) -> Result<serde_json::Value, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => {
            let msg = crate::analyse::panic_message(e.into_panic().as_ref());
            Err(format!("the task's aggregate panicked: {msg}"))
        }
        Err(e) => Err(format!("the fold did not finish: {e}")),
    }
}

/// Results folded per page of this many batches (a task whose summaries fold like results).
const FOLD_PAGE: u64 = 1000;

/// Folds a job's results a page at a time: each page with the summary so far, so memory
/// holds one page however many batches the job has.
async fn fold_in_pages(
    store: &Store,
    job: &str,
    task: std::sync::Arc<dyn taskmill_common::task::Task>,
) -> Option<Result<serde_json::Value, String>> {
    let total = match store.job_status(job).await {
        Ok(Some(s)) => s.batches_total.unwrap_or(s.batches_published),
        Ok(None) => return None,
        Err(e) => {
            warn!(%job, "reading the job to sum it up: {e}");
            return None;
        }
    };
    let stored = match store.results_count(job).await {
        Ok(n) => n,
        Err(e) => {
            warn!(%job, "counting the results to sum them up: {e}");
            return None;
        }
    };
    let mut so_far: Option<serde_json::Value> = None;
    let (mut from, mut seen) = (0, 0);
    while from < total && seen < stored {
        let to = (from + FOLD_PAGE).min(total);
        let page = match store.results_range(job, from, to).await {
            Ok(p) => p,
            Err(e) => {
                warn!(%job, "reading the results to sum them up: {e}");
                return None;
            }
        };
        seen += page.len() as u64;
        let mut values: Vec<serde_json::Value> = so_far.take().into_iter().collect();
        values.extend(page.into_iter().map(|(_, v)| v));
        let task = task.clone();
        match aggregate(move || task.aggregate(&values)).await {
            Ok(v) => so_far = Some(v),
            Err(why) => return Some(Err(why)),
        }
        from = to;
    }
    match so_far {
        Some(v) => Some(Ok(v)),
        None => Some(aggregate(move || task.aggregate(&[])).await),
    }
}

/// The job and batch of an analysed batch, when it names them.
fn identity(p: &Processed) -> Option<(String, u64)> {
    let (id, _) = p.analysed.as_ref()?;
    Some((id.job.clone()?, id.batch?))
}

/// What to store of a batch whose task ran.
fn done_batch(p: &Processed) -> Option<DoneBatch> {
    match &p.analysed {
        Some((id, Outcome::Done(out))) => Some(DoneBatch {
            job: id.job.clone()?,
            batch: id.batch?,
            result: out.result.clone(),
            records_done: out.records_done,
            records_invalid: out.records_invalid,
        }),
        _ => None,
    }
}

/// The metrics of a group of stored batches, added up by task: a handful of metric updates a
/// group rather than four a batch (each one looks its series up by name and labels).
#[derive(Default)]
struct GroupCounts {
    by_task: Vec<(&'static str, TaskCounts)>,
}

#[derive(Default)]
struct TaskCounts {
    batches: u64,
    records: u64,
    invalid: u64,
    latencies_ms: Vec<u64>,
    in_worker_us: Vec<u64>,
}

impl GroupCounts {
    fn done(&mut self, label: &'static str, b: &DoneBatch, latency_ms: Option<u64>, us: u64) {
        let c = by_label(&mut self.by_task, label, TaskCounts::default);
        c.batches += 1;
        c.records += b.records_done;
        c.invalid += b.records_invalid;
        c.latencies_ms.extend(latency_ms);
        c.in_worker_us.push(us);
    }

    /// Into the worker's `/stats` and the Prometheus metrics.
    fn publish(self, stats: &Stats) {
        let tasks = self.by_task.iter().map(|(_, c)| c);
        stats.record_latencies(
            tasks.clone().flat_map(|c| c.latencies_ms.iter().copied()),
            tasks.flat_map(|c| c.in_worker_us.iter().copied()),
        );
        for (label, c) in self.by_task {
            metrics::counter!("taskmill_batches_total", "task" => label, "outcome" => "done")
                .increment(c.batches);
            metrics::counter!("taskmill_records_total", "task" => label, "outcome" => "done")
                .increment(c.records);
            if c.invalid > 0 {
                metrics::counter!("taskmill_records_total", "task" => label, "outcome" => "invalid")
                    .increment(c.invalid);
            }
            let h = metrics::histogram!("taskmill_batch_latency_seconds", "task" => label);
            for ms in c.latencies_ms {
                h.record(ms as f64 / 1000.0);
            }
            let h = metrics::histogram!("taskmill_batch_in_worker_seconds", "task" => label);
            for us in c.in_worker_us {
                h.record(us as f64 / 1e6);
            }
        }
    }
}

/// The entry for `label` (a group holds one task or a few: a list beats a map), made on first
/// use.
fn by_label<'v, T>(
    entries: &'v mut Vec<(&'static str, T)>,
    label: &'static str,
    make: impl FnOnce() -> T,
) -> &'v mut T {
    let i = match entries.iter().position(|(l, _)| *l == label) {
        Some(i) => i,
        None => {
            entries.push((label, make()));
            entries.len() - 1
        }
    };
    &mut entries[i].1
}

/// Records how long each task of a group ran, one histogram lookup a task.
fn record_durations(group: &[Processed]) {
    let mut handles: Vec<(&'static str, metrics::Histogram)> = Vec::new();
    for p in group {
        let Some(took) = p.analysed.as_ref().and_then(|(id, _)| id.ran_for) else {
            continue;
        };
        let label = p.label();
        by_label(
            &mut handles,
            label,
            || metrics::histogram!("taskmill_task_duration_seconds", "task" => label),
        )
        .record(took.as_secs_f64());
    }
}

/// The header that says when a batch went into a delay queue (now).
fn delayed_at() -> (&'static str, AMQPValue) {
    (
        taskmill_common::envelope::HEADER_DELAYED_AT,
        AMQPValue::LongLongInt(i64::try_from(now_ms()).unwrap_or(i64::MAX)),
    )
}

/// The delay tier a batch of a task this worker lacks waits in before it comes back.
const DEFER_MS: u64 = 1000;
/// The longest a batch is given back for a worker that has its task, in all.
const MAX_DEFERRAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// The action for a batch whose result Redis refused for good.
fn store_failed(error: &str) -> Action {
    Action::Dead {
        kind: DeadKind::StoreError,
        error: format!("Redis refused the result: {error}"),
    }
}
