//! Handing deliveries to the rayon pool and getting their outcomes back by a oneshot: tokio's
//! threads never decode or analyse.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt};
use lapin::message::Delivery;
use taskmill_common::{amqp, task::Registry, topology};
use tokio::sync::oneshot;

use crate::analyse::{analyse, BatchId, Outcome};

/// One analysed delivery on its way to the sink.
pub(crate) struct Processed {
    /// The delivery (its body moved into `body`), for its properties and acker.
    pub(crate) delivery: Delivery,
    /// The body, kept for retries and dead letters.
    pub(crate) body: Vec<u8>,
    /// Attempt number from the header.
    pub(crate) attempt: u32,
    /// Index of the consuming channel (for multiple-acks).
    pub(crate) chan: usize,
    /// Short name of the work queue it came from.
    pub(crate) queue: String,
    /// What the analysis found; None if the analysis thread vanished (requeue).
    pub(crate) analysed: Option<(BatchId, Outcome)>,
    /// When the delivery reached this worker's session (the time in the worker starts).
    pub(crate) arrived: Instant,
}

impl Processed {
    /// The `task` metrics label: a task this worker knows, else `unknown`.
    pub(crate) fn label(&self) -> &'static str {
        self.analysed.as_ref().map_or("unknown", |(id, _)| id.label)
    }
}

/// A delivery as it arrived: channel index, short queue name, delivery, when it arrived.
pub(crate) type Arrived = (usize, String, Delivery, Instant);

/// Ids of the cancelled jobs, refreshed from Redis by the worker.
pub(crate) type Cancelled = Arc<std::sync::RwLock<std::collections::HashSet<String>>>;

/// A batch with a time limit on an analysis thread.
pub(crate) struct RunningBatch {
    since: Instant,
    limit: Duration,
    /// Its group's outcomes and its place there: at its limit the watchdog settles it there,
    /// without its thread.
    group: Arc<GroupResults>,
    index: usize,
    /// What it is (once decoded: job, batch, params, for its retry).
    id: BatchId,
    /// A copy of its body, for the retry or dead copy.
    body: Vec<u8>,
    /// Settled without its thread: the thread is stuck in the task past the limit.
    abandoned: bool,
}

/// What each analysis thread runs now, when its batch has a time limit.
pub(crate) type Running = Arc<Vec<std::sync::Mutex<Option<RunningBatch>>>>;

/// Settles every batch that ran past its time limit, without waiting for its thread: its
/// outcome is `OverTime` (retried, or dead-lettered `time_limit` once out of attempts); what
/// its thread returns later is dropped. Returns how many threads are stuck in a batch past
/// its limit, and how many of those for good: past twice the limit and at least
/// [`HOPELESS_AFTER`] past it.
pub(crate) fn settle_overtime(running: &Running) -> (usize, usize) {
    let (mut stuck, mut hopeless) = (0, 0);
    for slot in running.iter() {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rb) = slot.as_mut() else { continue };
        let ran = rb.since.elapsed();
        if ran <= rb.limit {
            continue;
        }
        stuck += 1;
        if ran > (rb.limit * 2).max(rb.limit + HOPELESS_AFTER) {
            hopeless += 1;
        }
        if rb.abandoned {
            continue;
        }
        rb.abandoned = true;
        metrics::counter!("taskmill_time_limit_overruns_total", "task" => rb.id.label).increment(1);
        let msg = format!(
            "time_limit: the batch ran past its limit of {} ms (still running after {} ms: \
             settled without waiting for its thread)",
            rb.limit.as_millis(),
            ran.as_millis()
        );
        tracing::warn!(job = ?rb.id.job, batch = ?rb.id.batch, "{msg}");
        let mut id = rb.id.clone();
        id.ran_for = Some(ran);
        rb.group.put(
            rb.index,
            (
                Some((id, Outcome::OverTime(msg))),
                std::mem::take(&mut rb.body),
            ),
        );
    }
    (stuck, hopeless)
}

/// How long past its limit a thread must still run its batch to count as stuck for good
/// (every thread so stuck: the worker exits for its supervisor to restart it).
pub(crate) const HOPELESS_AFTER: Duration = Duration::from_secs(5);

/// What a pool thread about to run a suspect batch alone does first: it says so (`starting`)
/// and waits for tokio's side to count the start in Redis (`counted`), so that a worker dying
/// in the batch has counted it, and a batch that never reached a thread is not counted.
pub(crate) struct StartGate {
    starting: oneshot::Sender<()>,
    counted: std::sync::mpsc::Receiver<()>,
}

impl StartGate {
    /// The longest a thread waits for the count (Redis slow or away: it runs the batch).
    const WAIT: Duration = Duration::from_secs(10);
}

/// The current session's store, for rate limits (None between sessions).
pub(crate) type RateStore = Arc<std::sync::Mutex<Option<taskmill_common::store::Store>>>;

/// The rayon side of the worker.
#[derive(Clone)]
pub(crate) struct Analyser {
    /// The rayon pool, fed through pumps (see [`crate::pumps`]).
    pub(crate) pumps: Arc<crate::pumps::Pumps>,
    pub(crate) registry: Registry,
    pub(crate) max_message_bytes: usize,
    pub(crate) max_result_bytes: usize,
    pub(crate) cancelled: Cancelled,
    pub(crate) running: Running,
    pub(crate) rate_store: RateStore,
    /// Set once every analysis thread is stuck past a time limit: batches not started are
    /// given back unrun (the worker is on its way out).
    pub(crate) stuck: Arc<std::sync::atomic::AtomicBool>,
    /// Held shared by every group while it runs, and alone by a suspect batch (one that was
    /// running when a worker died): nothing else runs beside it (see
    /// `taskmill_store::crashes`).
    pub(crate) alone: Arc<tokio::sync::RwLock<()>>,
}

/// A batch's rate limit: at most one start per `interval_ms` for rate key `key`.
fn rate_of(props: &lapin::BasicProperties) -> Option<(String, u64)> {
    use taskmill_common::envelope::{HEADER_RATE_INTERVAL, HEADER_RATE_KEY};
    let interval = amqp::header_i64(props, HEADER_RATE_INTERVAL)?;
    let key = amqp::header_str(props, HEADER_RATE_KEY)?;
    Some((key, u64::try_from(interval).ok()?.max(1)))
}

/// The identity a message id (`{job}:{batch}`) gives, without decoding the body.
fn id_of(message_id: Option<&str>) -> Option<BatchId> {
    let (job, batch) = message_id.and_then(taskmill_common::envelope::parse_message_id)?;
    Some(BatchId {
        job: Some(job),
        batch: Some(batch),
        ..BatchId::default()
    })
}

/// A delivery that does not go to rayon, with what was decided for it.
fn settled_now(arrived: Arrived, analysed: Option<(BatchId, Outcome)>) -> Processed {
    let (chan, queue, mut delivery, arrived) = arrived;
    let body = std::mem::take(&mut delivery.data);
    let attempt = amqp::attempt_of(&delivery.properties);
    Processed {
        delivery,
        body,
        attempt,
        chan,
        queue,
        analysed,
        arrived,
    }
}

/// What the headers of a delivery say about when it may run.
#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    eta_ms: Option<u64>,
    expires_ms: Option<u64>,
    time_limit: Option<Duration>,
    summarize: bool,
}

impl Timing {
    fn of(props: &lapin::BasicProperties) -> Self {
        let ms = |h| amqp::header_i64(props, h).and_then(|v| u64::try_from(v).ok());
        Self {
            eta_ms: ms(taskmill_common::envelope::HEADER_ETA),
            expires_ms: ms(taskmill_common::envelope::HEADER_EXPIRES),
            time_limit: ms(taskmill_common::envelope::HEADER_TIME_LIMIT)
                .filter(|&l| l > 0)
                .map(Duration::from_millis),
            summarize: amqp::header_str(props, taskmill_common::envelope::HEADER_CONTROL)
                .is_some_and(|c| c == "summarize"),
        }
    }
}

/// A batch that must not run now, decided from its message id and headers alone (no
/// decoding): its job was cancelled, it expired, or it is too early. None: run it.
fn not_now(
    cancelled: &Cancelled,
    message_id: Option<&str>,
    timing: Timing,
) -> Option<(BatchId, Outcome)> {
    if timing.summarize {
        let job = message_id?.strip_suffix(":summary")?;
        let id = BatchId {
            job: Some(job.to_string()),
            batch: Some(0),
            ..BatchId::default()
        };
        return Some((id, Outcome::Summarize));
    }
    let outcome = {
        let set = cancelled.read().unwrap_or_else(|e| e.into_inner());
        let now = taskmill_common::now_ms();
        let job = || message_id.and_then(taskmill_common::envelope::parse_message_id);
        if !set.is_empty() && job().is_some_and(|(j, _)| set.contains(&j)) {
            Outcome::Cancelled
        } else if timing.expires_ms.is_some_and(|e| now > e) {
            Outcome::Expired
        } else if let Some(eta) = timing.eta_ms.filter(|&eta| eta > now) {
            Outcome::NotYet(eta - now)
        } else {
            return None;
        }
    };
    Some((id_of(message_id)?, outcome))
}

/// One analysed batch, with its body back.
type Analysed = (Option<(BatchId, Outcome)>, Vec<u8>);

/// A group's outcomes, filled in by its batches' jobs in any order (or by the watchdog, for
/// a batch past its time limit: the first outcome of a slot stands); the last one sends them.
pub(crate) struct GroupResults {
    slots: std::sync::Mutex<(Vec<Option<Analysed>>, usize)>,
    tx: std::sync::Mutex<Option<oneshot::Sender<Vec<Analysed>>>>,
}

impl GroupResults {
    fn new(n: usize, tx: oneshot::Sender<Vec<Analysed>>) -> Self {
        Self {
            slots: std::sync::Mutex::new(((0..n).map(|_| None).collect(), n)),
            tx: std::sync::Mutex::new(Some(tx)),
        }
    }

    fn put(&self, i: usize, analysed: Analysed) {
        let done = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.0.get_mut(i) {
                Some(slot) if slot.is_none() => {
                    *slot = Some(analysed);
                    slots.1 -= 1;
                }
                // Settled already (past its time limit): what the thread found is dropped.
                _ => return,
            }
            (slots.1 == 0).then(|| std::mem::take(&mut slots.0))
        };
        if let Some(all) = done {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(tx) = tx {
                // A slot never filled (cannot happen) reads as a lost analysis: requeued.
                let _ = tx.send(
                    all.into_iter()
                        .map(|a| a.unwrap_or((None, Vec::new())))
                        .collect(),
                );
            }
        }
    }
}

impl Analyser {
    /// Hands a group of deliveries to the rayon pool as one job and returns the future of
    /// their outcomes. Grouping what arrived together saves a wake-up of the pool per batch
    /// (small batches take microseconds); inside the group, rayon spreads the batches over
    /// the threads. A group's batches come from queues of one priority rank, and run before
    /// the queued batches of lower ranks.
    pub(crate) fn analyse_group(&self, group: Vec<Arrived>) -> BoxFuture<'static, Vec<Processed>> {
        let redelivered = group.iter().any(|(_, _, d, _)| d.redelivered);
        let limited = group
            .iter()
            .any(|(_, _, d, _)| rate_of(&d.properties).is_some());
        if !redelivered && !limited {
            return self.beside_others(group);
        }
        let this = self.clone();
        async move {
            // Batches delivered again are counted as started just before they run, a pool's
            // worth at a time: should the worker die, only what was running is suspected.
            let chunk = if redelivered {
                this.running.len().max(1)
            } else {
                group.len().max(1)
            };
            let mut out = Vec::with_capacity(group.len());
            let mut rest = group.into_iter().peekable();
            while rest.peek().is_some() {
                let part: Vec<Arrived> = rest.by_ref().take(chunk).collect();
                let (settled, run, alone) = if redelivered {
                    this.sort_redelivered(part).await
                } else {
                    (Vec::new(), part, Vec::new())
                };
                out.extend(settled);
                for (part, alone) in [(run, false), (alone, true)] {
                    let (settled, run) = if limited {
                        this.rate_limit(part).await
                    } else {
                        (Vec::new(), part)
                    };
                    out.extend(settled);
                    if alone {
                        // Each forgotten as soon as it ran: the next may wait behind a stuck
                        // thread and go back unrun with this worker, and this one with it
                        // (its outcome leaves with the group's), not to be suspected again.
                        for arrived in run {
                            let ran = this.run_alone(arrived).await;
                            this.ran_through(&ran).await;
                            out.extend(ran);
                        }
                    } else {
                        let ran = this.beside_others(run).await;
                        if redelivered {
                            this.ran_through(&ran).await;
                        }
                        out.extend(ran);
                    }
                }
            }
            out
        }
        .boxed()
    }

    /// Runs a group while others run (a shared hold on [`Analyser::alone`]).
    fn beside_others(&self, group: Vec<Arrived>) -> BoxFuture<'static, Vec<Processed>> {
        if group.is_empty() {
            return futures::future::ready(Vec::new()).boxed();
        }
        match self.alone.clone().try_read_owned() {
            Ok(hold) => {
                let running = self.on_rayon(group);
                async move {
                    let out = running.await;
                    drop(hold);
                    out
                }
                .boxed()
            }
            Err(_) => {
                let this = self.clone();
                async move {
                    let hold = this.alone.clone().read_owned().await;
                    let out = this.on_rayon(group).await;
                    drop(hold);
                    out
                }
                .boxed()
            }
        }
    }

    /// Runs a suspect batch with nothing else running in this worker, its solo start counted
    /// first: if the worker dies now, this batch is what killed it. The start is counted once
    /// a pool thread is about to run it (see [`StartGate`]): a batch that waited behind a stuck
    /// thread and went back unrun with its worker never started, and is not suspected more.
    async fn run_alone(&self, arrived: Arrived) -> Vec<Processed> {
        let hold = self.alone.clone().write_owned().await;
        let store = self.store();
        let id = arrived
            .2
            .properties
            .message_id()
            .as_ref()
            .and_then(|m| taskmill_common::envelope::parse_message_id(m.as_str()));
        let (starting, starts) = oneshot::channel();
        let (counted, wait_count) = std::sync::mpsc::sync_channel(1);
        let running = self.on_rayon_gated(
            vec![arrived],
            Some(StartGate {
                starting,
                counted: wait_count,
            }),
        );
        if starts.await.is_ok() {
            if let (Some(store), Some((job, batch))) = (store, id) {
                tracing::info!(job = %job, batch, "running alone: it was running when a worker died");
                if let Err(e) = store.solo_start(&job, batch).await {
                    tracing::warn!("counting a start alone: {e}");
                }
            }
            let _ = counted.send(());
        }
        let out = running.await;
        drop(hold);
        out
    }

    /// Forgets the starts of the batches that ran to an end (an analysis thread that vanished
    /// did not).
    async fn ran_through(&self, ran: &[Processed]) {
        let Some(store) = self.store() else {
            return;
        };
        let ended: Vec<(String, u64)> = ran
            .iter()
            .filter(|p| p.delivery.redelivered)
            .filter_map(|p| match &p.analysed {
                Some((
                    BatchId {
                        job: Some(job),
                        batch: Some(batch),
                        ..
                    },
                    _,
                )) => Some((job.clone(), *batch)),
                _ => None,
            })
            .collect();
        if let Err(e) = store.ran_through(&ended).await {
            tracing::warn!("forgetting the starts of batches that ran: {e}");
        }
    }

    /// The session's store (set once a session is open).
    fn store(&self) -> Option<taskmill_common::store::Store> {
        self.rate_store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sorts the deliveries of a group of which some came again after a delivery ended
    /// without an ack: settled now (the culprit of workers' deaths, dead-lettered as
    /// `worker_crash`; an innocent batch delivered many times, published again with a fresh
    /// delivery count), to run as usual, and to run alone.
    async fn sort_redelivered(
        &self,
        group: Vec<Arrived>,
    ) -> (Vec<Processed>, Vec<Arrived>, Vec<Arrived>) {
        use taskmill_common::store::crashes::Redelivered;
        let store = self.store();
        let (mut settled, mut run, mut alone) = (Vec::new(), Vec::new(), Vec::new());
        for arrived in group {
            let props = &arrived.2.properties;
            let message_id = props.message_id().as_ref().map(|s| s.to_string());
            let id = message_id
                .as_deref()
                .and_then(taskmill_common::envelope::parse_message_id);
            let (Some(store), Some((job, batch)), true) = (&store, id, arrived.2.redelivered)
            else {
                run.push(arrived);
                continue;
            };
            let count = amqp::header_i64(props, "x-delivery-count");
            // Redis away: run it (its result cannot be stored either, and it comes back).
            match store
                .redelivered(&job, batch, count)
                .await
                .unwrap_or(Redelivered::Run)
            {
                Redelivered::Run => run.push(arrived),
                Redelivered::Alone => alone.push(arrived),
                Redelivered::Culprit(times) => {
                    tracing::warn!(job = %job, batch, "dead-lettered: workers died while it ran alone");
                    let why = format!(
                        "workers died while this batch ran alone in them, {times} times: it kills \
                         workers (an abort, a crash, running out of memory); the batches that \
                         were in the same workers' hands went back to work"
                    );
                    let id = id_of(message_id.as_deref()).unwrap_or_default();
                    let dead = Outcome::Dead(crate::analyse::DeadKind::WorkerCrash, why);
                    settled.push(settled_now(arrived, Some((id, dead))));
                }
                Redelivered::Renew => {
                    tracing::info!(job = %job, batch, "delivered {} times, never started: published again with a fresh delivery count", count.unwrap_or(0));
                    let id = id_of(message_id.as_deref()).unwrap_or_default();
                    settled.push(settled_now(arrived, Some((id, Outcome::NotYet(1)))));
                }
            }
        }
        (settled, run, alone)
    }

    /// Rate-limited deliveries take a slot in Redis (on tokio's side, never an analysis
    /// thread's); those that get none wait in the broker (`NotYet`), like early ones. Returns
    /// the settled ones and the ones to run.
    async fn rate_limit(&self, group: Vec<Arrived>) -> (Vec<Processed>, Vec<Arrived>) {
        let store = self.store();
        let mut settled = Vec::new();
        let mut run = Vec::new();
        for arrived in group {
            let props = &arrived.2.properties;
            let Some((key, interval)) = rate_of(props) else {
                run.push(arrived);
                continue;
            };
            let message_id = props.message_id().as_ref().map(|s| s.to_string());
            if let Some(skip) = not_now(&self.cancelled, message_id.as_deref(), Timing::of(props)) {
                settled.push(settled_now(arrived, Some(skip)));
                continue;
            }
            // Redis unreachable: wait a second rather than pass the limit.
            let wait = match &store {
                Some(s) => s.take_slot(&key, interval).await.unwrap_or(1000),
                None => 1000,
            };
            if wait == 0 {
                run.push(arrived);
                continue;
            }
            let id = id_of(message_id.as_deref()).unwrap_or_default();
            settled.push(settled_now(arrived, Some((id, Outcome::NotYet(wait)))));
        }
        (settled, run)
    }

    /// Analyses one batch on a pool thread (one that may not run now is settled unrun) and
    /// puts its outcome in slot `index` of `group`. A batch with a time limit is registered
    /// with the watchdog while it runs, which settles it at its limit if it has not returned.
    fn run_one(
        &self,
        body: Vec<u8>,
        attempt: u32,
        message_id: Option<&str>,
        timing: Timing,
        (group, index): (&Arc<GroupResults>, usize),
        gate: Option<StartGate>,
    ) {
        // Every thread is stuck: the worker gives back what it has not started, and exits.
        if self.stuck.load(std::sync::atomic::Ordering::Relaxed) {
            return group.put(index, (None, body));
        }
        if let Some(gate) = gate {
            if gate.starting.send(()).is_ok() {
                let _ = gate.counted.recv_timeout(StartGate::WAIT);
            }
        }
        let analysed = self.run_timed(&body, attempt, message_id, timing, (group, index));
        group.put(index, (analysed, body));
    }

    fn run_timed(
        &self,
        body: &[u8],
        attempt: u32,
        message_id: Option<&str>,
        timing: Timing,
        (group, index): (&Arc<GroupResults>, usize),
    ) -> Option<(BatchId, Outcome)> {
        // A batch of a cancelled job, an expired or an early one does not run, even one that
        // waited in this worker's prefetch.
        if let Some(skip) = not_now(&self.cancelled, message_id, timing) {
            return Some(skip);
        }
        let slot = rayon::current_thread_index()
            .and_then(|i| self.running.get(i))
            .filter(|_| timing.time_limit.is_some());
        let started = |id: &BatchId| {
            let (Some(slot), Some(limit)) = (slot, timing.time_limit) else {
                return;
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(RunningBatch {
                since: Instant::now(),
                limit,
                group: Arc::clone(group),
                index,
                id: id.clone(),
                body: body.to_vec(),
                abandoned: false,
            });
        };
        let analysed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let max = self.max_message_bytes;
            analyse(
                &self.registry,
                body,
                message_id,
                attempt,
                max,
                timing.time_limit,
                slot.is_some().then_some(&started as &dyn Fn(&BatchId)),
            )
        }))
        .ok();
        let abandoned = slot.is_some_and(|slot| {
            let was = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            was.is_some_and(|rb| rb.abandoned)
        });
        if let (false, Some((id, Outcome::OverTime(_)))) = (abandoned, &analysed) {
            // (One the watchdog settled was counted there.)
            metrics::counter!("taskmill_time_limit_overruns_total", "task" => id.label)
                .increment(1);
        }
        analysed.map(|(id, outcome)| match outcome {
            Outcome::Done(d) if d.result.len() > self.max_result_bytes => {
                let why = format!(
                    "the task's result is {} bytes, over this worker's limit of {} (--max-result-bytes)",
                    d.result.len(),
                    self.max_result_bytes
                );
                (id, Outcome::Dead(crate::analyse::DeadKind::ResultTooLarge, why))
            }
            other => (id, other),
        })
    }

    /// Hands deliveries to the rayon pool (see [`Analyser::analyse_group`]).
    fn on_rayon(&self, group: Vec<Arrived>) -> BoxFuture<'static, Vec<Processed>> {
        self.on_rayon_gated(group, None)
    }

    /// [`Analyser::on_rayon`], the first batch's start behind `gate`.
    fn on_rayon_gated(
        &self,
        group: Vec<Arrived>,
        mut gate: Option<StartGate>,
    ) -> BoxFuture<'static, Vec<Processed>> {
        let mut inputs = Vec::with_capacity(group.len());
        let mut metas = Vec::with_capacity(group.len());
        for (chan, queue, mut delivery, arrived) in group {
            let body = std::mem::take(&mut delivery.data);
            let attempt = amqp::attempt_of(&delivery.properties);
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string());
            inputs.push((body, attempt, message_id, Timing::of(&delivery.properties)));
            metas.push((chan, queue, delivery, attempt, arrived));
        }
        let rank = metas
            .first()
            .map_or(0, |(_, queue, ..)| topology::band_rank(queue));
        let (tx, rx) = oneshot::channel();
        let results = Arc::new(GroupResults::new(inputs.len(), tx));
        // A job a batch: the pool's threads share a group's batches as they come free, and the
        // group goes back (one wake-up of the session) when its last batch is done.
        let analyser = Arc::new(self.clone());
        let jobs = inputs
            .into_iter()
            .enumerate()
            .map(|(i, (body, attempt, message_id, timing))| {
                let this = Arc::clone(&analyser);
                let results = Arc::clone(&results);
                let gate = gate.take();
                Box::new(move || {
                    let at = (&results, i);
                    this.run_one(body, attempt, message_id.as_deref(), timing, at, gate);
                }) as crate::pumps::Job
            })
            .collect();
        self.pumps.run_all(rank, jobs);
        async move {
            let mut out = rx.await.unwrap_or_default().into_iter();
            metas
                .into_iter()
                .map(|(chan, queue, delivery, attempt, arrived)| {
                    let (analysed, body) = out.next().unwrap_or((None, Vec::new()));
                    Processed {
                        delivery,
                        body,
                        attempt,
                        chan,
                        queue,
                        analysed,
                        arrived,
                    }
                })
                .collect()
        }
        .boxed()
    }
}
