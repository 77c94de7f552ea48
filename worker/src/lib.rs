//! taskmill-worker: consumes batches from RabbitMQ and analyses them on all cores.
//!
//! # Layout
//! - [`run`]: connects, declares the topology, consumes; reconnects with backoff when the
//!   broker connection is lost; drains on shutdown.
//! - [`analyse`]: decoding and running a task, on the rayon pool (never on tokio's threads).
//! - `sink`: stores results in Redis (many batches a round trip), publishes retries and dead
//!   letters with confirms (on a connection of their own), and acks only what is safely
//!   stored or re-published.
//! - `dead_events`: counts every dead letter in its job, including those the broker
//!   dead-lettered by itself.
//! - [`retry`]: the retry policy (exponential delays with jitter, held in the broker).
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz` (`--metrics-addr`).
//!
//! A delivery flows: consumer stream → rayon (`analyse`, result back by a oneshot) → sink
//! channel → Redis/broker → ack.

pub mod analyse;
mod dead_events;
pub mod metrics;
pub mod retry;
mod sink;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::{FieldTable, ShortString},
};
use taskmill_common::{
    amqp,
    config::{redact, ConnArgs},
    envelope::DEFAULT_MAX_MESSAGE_BYTES,
    logging::LogFormat,
    store::Store,
    task::Registry,
    topology::{self, Names},
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    analyse::{analyse, BatchId, Outcome},
    retry::RetryPolicy,
};

/// Most deliveries handed to the rayon pool as one job.
const RAYON_GROUP: usize = 64;

/// The worker's command line; every flag has an environment variable behind it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "worker",
    version,
    about = "taskmill worker: consumes batches and analyses them on all cores"
)]
pub struct WorkerArgs {
    /// Broker, Redis and namespace.
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Work queue to consume (short name; repeat or separate with commas for several).
    #[arg(
        long = "queue",
        env = "TASKMILL_QUEUES",
        value_delimiter = ',',
        default_value = "tasks"
    )]
    pub queues: Vec<String>,

    /// Unacknowledged batches each consumer may hold (per-consumer QoS).
    #[arg(long, env = "TASKMILL_PREFETCH", default_value_t = 64)]
    pub prefetch: u16,

    /// Analysis threads (rayon); 0 means one per core.
    #[arg(long, env = "TASKMILL_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// On SIGTERM/SIGINT, how long to finish the batches in hand before giving the rest back
    /// to the broker, in seconds.
    #[arg(long, env = "TASKMILL_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Serve Prometheus metrics (`/metrics`), `/healthz` and `/readyz` on this address.
    #[arg(long, env = "TASKMILL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Messages larger than this are dead-lettered unread, in bytes.
    #[arg(long, env = "TASKMILL_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Retries of transient failures.
    #[command(flatten)]
    pub retry: RetryPolicy,

    /// Log format on stderr (`RUST_LOG` sets the filter).
    #[arg(
        long,
        env = "TASKMILL_LOG_FORMAT",
        value_enum,
        default_value_t,
        help_heading = "Output"
    )]
    pub log_format: LogFormat,
}

impl WorkerArgs {
    /// Defaults for the local services under namespace `ns` (tests and tools).
    pub fn local(ns: &str) -> Self {
        Self {
            conn: ConnArgs::local(ns),
            queues: vec![topology::DEFAULT_QUEUE.into()],
            prefetch: 64,
            threads: 0,
            shutdown_timeout: 30,
            metrics_addr: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            retry: RetryPolicy::default(),
            log_format: LogFormat::Pretty,
        }
    }
}

/// Counters of what this worker did; shared with whoever started it.
#[derive(Debug)]
pub struct Stats {
    /// Batches whose result this worker stored.
    pub batches_done: AtomicU64,
    /// Batches delivered again whose result was already stored (acked, not counted).
    pub batches_duplicate: AtomicU64,
    /// Batches sent to a delay queue for another attempt.
    pub batches_retried: AtomicU64,
    /// Batches dead-lettered.
    pub batches_dead: AtomicU64,
    /// Records in the batches stored.
    pub records_done: AtomicU64,
    /// Sessions started (1 + reconnects).
    pub sessions: AtomicU64,
    /// Failed Redis calls (each retried with backoff).
    pub store_errors: AtomicU64,
    /// Batch latency in ms: from the batch's creation to its result stored.
    pub latency_ms: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            batches_done: AtomicU64::new(0),
            batches_duplicate: AtomicU64::new(0),
            batches_retried: AtomicU64::new(0),
            batches_dead: AtomicU64::new(0),
            records_done: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            // 1 ms to 1 day, 3 significant figures; cannot fail with these bounds.
            latency_ms: std::sync::Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 86_400_000, 3)
                    .expect("constant histogram bounds are valid"),
            ),
        }
    }
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    /// A counter's current value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Records batch latencies (ms), for batches stored now.
    pub(crate) fn record_latencies(&self, latencies: impl Iterator<Item = u64>) {
        let mut h = self.latency_ms.lock().unwrap_or_else(|e| e.into_inner());
        for l in latencies {
            h.saturating_record(l.max(1));
        }
    }

    /// (p50, p95, p99, max) batch latency in ms.
    pub fn latency_quantiles(&self) -> (u64, u64, u64, u64) {
        let h = self.latency_ms.lock().unwrap_or_else(|e| e.into_inner());
        (
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.95),
            h.value_at_quantile(0.99),
            h.max(),
        )
    }
}

/// One analysed delivery on its way to the sink.
pub(crate) struct Processed {
    /// The delivery (its body moved into `body`), for its properties and acker.
    delivery: Delivery,
    /// The body, kept for retries and dead letters.
    body: Vec<u8>,
    /// Attempt number from the header.
    attempt: u32,
    /// Index of the consuming channel (for multiple-acks).
    chan: usize,
    /// Short name of the work queue it came from.
    queue: String,
    /// What the analysis found; None if the analysis thread vanished (requeue).
    analysed: Option<(BatchId, Outcome)>,
}

/// What a session needs, shared across reconnects.
struct Shared {
    args: WorkerArgs,
    registry: Registry,
    pool: Arc<rayon::ThreadPool>,
    names: Names,
    stats: Arc<Stats>,
    health: Arc<metrics::Health>,
}

/// Runs a worker until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    args: WorkerArgs,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_stats(args, registry, shutdown, Arc::new(Stats::default())).await
}

/// [`run`], counting into `stats`.
pub async fn run_with_stats(
    args: WorkerArgs,
    registry: Registry,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    args.conn.check().map_err(UsageError)?;
    for q in &args.queues {
        topology::validate_queue(q).map_err(UsageError)?;
    }
    if args.prefetch == 0 {
        return Err(UsageError("--prefetch must be at least 1".into()).into());
    }
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("taskmill-rayon-{i}"))
        .build()
        .context("cannot start the analysis thread pool")?;
    info!(
        namespace = %args.conn.namespace,
        queues = %args.queues.join(","),
        threads,
        prefetch = args.prefetch,
        amqp = %redact(&args.conn.amqp_url),
        redis = %redact(&args.conn.redis_url),
        "worker starting"
    );
    // The endpoints outlive the drain (so /readyz can say 503 while draining) and stop when
    // the worker returns.
    let metrics_stop = CancellationToken::new();
    let handle = args.metrics_addr.map(|_| metrics::recorder()).transpose()?;
    let health = Arc::new(metrics::Health::new());
    ::metrics::gauge!("taskmill_worker_threads").set(threads as f64);
    let mut metrics_server = None;
    if let (Some(addr), Some(handle)) = (args.metrics_addr, handle) {
        metrics_server =
            Some(metrics::serve(addr, handle, health.clone(), metrics_stop.clone()).await?);
        info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    let shared = Shared {
        names: Names::new(&args.conn.namespace),
        args,
        registry,
        pool: Arc::new(pool),
        stats,
        health,
    };
    let result = sessions(&shared, &shutdown).await;
    metrics_stop.cancel();
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    result
}

/// A bad setting, refused before anything connects (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Whether a session ended because RabbitMQ or Redis refused the credentials or permissions:
/// reconnecting cannot help, so the worker stops.
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<amqp::ConnectError>()
            .is_some_and(amqp::ConnectError::refused)
            || c.downcast_ref::<taskmill_common::store::StoreError>()
                .is_some_and(taskmill_common::store::StoreError::refused)
    })
}

/// The worker's exit code for an error: 2 for a bad setting, 5 for a service that refused it
/// or could not be reached, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<UsageError>()) {
        2
    } else if refused(e)
        || e.chain()
            .any(|c| c.is::<amqp::ConnectError>() || c.is::<taskmill_common::store::StoreError>())
    {
        5
    } else {
        1
    }
}

/// Runs sessions until shutdown, reconnecting with backoff.
async fn sessions(shared: &Shared, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    let report = |stats: &Stats| {
        let (p50, p95, p99, max) = stats.latency_quantiles();
        info!(
            batches_done = Stats::get(&stats.batches_done),
            batches_duplicate = Stats::get(&stats.batches_duplicate),
            batches_retried = Stats::get(&stats.batches_retried),
            batches_dead = Stats::get(&stats.batches_dead),
            records_done = Stats::get(&stats.records_done),
            latency_p50_ms = p50,
            latency_p95_ms = p95,
            latency_p99_ms = p99,
            latency_max_ms = max,
            "worker totals"
        );
    };
    loop {
        if shutdown.is_cancelled() {
            report(&shared.stats);
            return Ok(());
        }
        Stats::add(&shared.stats.sessions, 1);
        let outcome = session(shared, shutdown, &mut backoff).await;
        shared.health.set_rabbitmq(false);
        shared.health.set_consuming(false);
        match outcome {
            Ok(()) => {
                report(&shared.stats);
                return Ok(());
            }
            Err(e) if refused(&e) => {
                report(&shared.stats);
                return Err(e.context("stopping: a service refused the worker's credentials"));
            }
            Err(e) => {
                warn!(
                    "worker session ended: {}; reconnecting in {backoff:?}",
                    taskmill_common::error_text(&*e)
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

impl Shared {
    /// Hands a group of deliveries to the rayon pool as one job and returns the future of
    /// their outcomes. Grouping what arrived together saves a wake-up of the pool per batch
    /// (small batches take microseconds); inside the group, rayon spreads the batches over
    /// the threads.
    fn process_group(
        &self,
        group: Vec<(usize, String, Delivery)>,
    ) -> impl std::future::Future<Output = Vec<Processed>> {
        let mut inputs = Vec::with_capacity(group.len());
        let mut metas = Vec::with_capacity(group.len());
        for (chan, queue, mut delivery) in group {
            let body = std::mem::take(&mut delivery.data);
            let attempt = amqp::attempt_of(&delivery.properties);
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string());
            inputs.push((body, attempt, message_id));
            metas.push((chan, queue, delivery, attempt));
        }
        let registry = self.registry.clone();
        let max = self.args.max_message_bytes;
        let (tx, rx) = oneshot::channel();
        self.pool.spawn(move || {
            use rayon::prelude::*;
            let out: Vec<_> = inputs
                .into_par_iter()
                .map(|(body, attempt, message_id)| {
                    let analysed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        analyse(&registry, &body, message_id.as_deref(), attempt, max)
                    }))
                    .ok();
                    (analysed, body)
                })
                .collect();
            let _ = tx.send(out);
        });
        async move {
            let mut out = rx.await.unwrap_or_default().into_iter();
            metas
                .into_iter()
                .map(|(chan, queue, delivery, attempt)| {
                    let (analysed, body) = out.next().unwrap_or((None, Vec::new()));
                    Processed {
                        delivery,
                        body,
                        attempt,
                        chan,
                        queue,
                        analysed,
                    }
                })
                .collect()
        }
    }
}

/// One connection's life: consume until shutdown (Ok) or until the connection fails (Err).
async fn session(
    shared: &Shared,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let args = &shared.args;
    let store = Store::connect(
        &args.conn.redis_url,
        &args.conn.namespace,
        args.conn.result_ttl,
    )
    .await?;
    shared.health.set_redis(true);
    let conn = amqp::connect(&args.conn.amqp_url, "taskmill-worker").await?;
    // Retries and dead letters go out on a connection of their own: a broker alarm blocks
    // publishing connections, and this one must keep consuming and acking meanwhile.
    let publish_conn = amqp::connect(&args.conn.amqp_url, "taskmill-worker-publish").await?;
    let publish_ch = publish_conn.create_channel().await?;
    publish_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology::declare(&publish_ch, &shared.names, &args.queues).await?;
    let events_ch = conn.create_channel().await?;
    events_ch
        .basic_qos(32, BasicQosOptions { global: false })
        .await?;
    let events_consumer = events_ch
        .basic_consume(
            shared.names.dead_events().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let events_stop = CancellationToken::new();
    let mut events_task = tokio::spawn(dead_events::run(
        events_consumer,
        store.clone(),
        events_stop.clone(),
    ));
    // One channel a queue: delivery tags then arrive in order on each channel, which lets the
    // sink acknowledge many batches with one multiple-ack.
    let mut consumers = Vec::new();
    let mut channels = Vec::new();
    let mut tags: Vec<ShortString> = Vec::new();
    for (i, q) in args.queues.iter().enumerate() {
        let ch = conn.create_channel().await?;
        ch.basic_qos(args.prefetch, BasicQosOptions { global: false })
            .await?;
        let consumer = ch
            .basic_consume(
                shared.names.queue(q).into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tags.push(consumer.tag());
        channels.push(ch);
        let queue = q.clone();
        consumers.push(consumer.map(move |d| (i, queue.clone(), d)));
    }
    let unacked: sink::Unacked = Arc::new(
        (0..channels.len())
            .map(|_| std::sync::Mutex::new(std::collections::BTreeSet::new()))
            .collect(),
    );
    info!(queues = %args.queues.join(","), "consuming");
    shared.health.set_rabbitmq(true);
    shared.health.set_consuming(true);
    *backoff = Duration::from_millis(200);

    let hard_stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel::<Processed>(usize::from(args.prefetch) * tags.len() + 16);
    let sink = sink::Sink {
        store,
        channel: publish_ch,
        unacked: unacked.clone(),
        names: shared.names.clone(),
        policy: args.retry,
        stats: shared.stats.clone(),
        health: shared.health.clone(),
        hard_stop: hard_stop.clone(),
        declared: Default::default(),
    };
    let _stop_events = events_stop.clone().drop_guard();
    let mut sink_task = tokio::spawn(sink.run(rx));

    let mut deliveries = futures::stream::select_all(consumers);
    let mut inflight = FuturesUnordered::new();
    let mut draining = false;
    let mut stream_done = false;
    let drain_timer = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(drain_timer);
    let result: anyhow::Result<()> = loop {
        if draining && stream_done && inflight.is_empty() {
            break Ok(());
        }
        tokio::select! {
            Some(group) = inflight.next(), if !inflight.is_empty() => {
                let mut stopped = false;
                for p in group {
                    if tx.send(p).await.is_err() {
                        stopped = true;
                        break;
                    }
                }
                if stopped {
                    break Err(anyhow::anyhow!("the result writer stopped"));
                }
            }
            res = &mut sink_task => {
                break match res {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Err(anyhow::anyhow!("the result writer stopped")),
                    Err(e) => Err(anyhow::anyhow!("the result writer failed: {e}")),
                };
            }
            res = &mut events_task, if !draining => {
                break match res {
                    Ok(Err(e)) => Err(e.context("counting dead letters")),
                    Ok(Ok(())) => Err(anyhow::anyhow!("the broker cancelled the dead-letter consumer")),
                    Err(e) => Err(anyhow::anyhow!("the dead-letter counter failed: {e}")),
                };
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                events_stop.cancel();
                shared.health.set_consuming(false);
                info!(in_hand = inflight.len(), "shutting down: finishing the batches in hand");
                drain_timer.as_mut().reset(
                    tokio::time::Instant::now() + Duration::from_secs(args.shutdown_timeout),
                );
                for (ch, tag) in channels.iter().zip(&tags) {
                    if let Err(e) = ch.basic_cancel(tag.clone(), BasicCancelOptions::default()).await {
                        warn!("cancelling consumer {tag}: {e}");
                        stream_done = true;
                    }
                }
            }
            d = deliveries.next(), if !stream_done => match d {
                Some((chan, queue, Ok(delivery))) => {
                    // Take whatever else has already arrived, up to a group.
                    let mut group = vec![(chan, queue, delivery)];
                    let mut failed = None;
                    while group.len() < RAYON_GROUP {
                        match deliveries.next().now_or_never() {
                            Some(Some((c, q, Ok(d)))) => group.push((c, q, d)),
                            Some(Some((_, _, Err(e)))) => {
                                failed = Some(e);
                                break;
                            }
                            Some(None) => {
                                stream_done = draining;
                                break;
                            }
                            None => break,
                        }
                    }
                    for (c, _, d) in &group {
                        if let Some(set) = unacked.get(*c) {
                            set.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(d.delivery_tag);
                        }
                    }
                    ::metrics::gauge!("taskmill_batches_in_flight").increment(group.len() as f64);
                    inflight.push(shared.process_group(group));
                    if let Some(e) = failed {
                        break Err(anyhow::Error::new(e).context("consuming"));
                    }
                }
                Some((_, _, Err(e))) => break Err(anyhow::Error::new(e).context("consuming")),
                None if draining => stream_done = true,
                None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
            },
            _ = &mut drain_timer, if draining => {
                warn!(
                    left = inflight.len(),
                    "shutdown timeout: the batches still in hand go back to the queue"
                );
                hard_stop.cancel();
                break Ok(());
            }
        }
    };
    drop(tx);
    if result.is_ok() && !hard_stop.is_cancelled() {
        // Let the sink store and ack what it holds, within what is left of the timeout.
        tokio::select! {
            res = &mut sink_task => {
                if let Ok(Err(e)) = res {
                    warn!("result writer: {e:#}");
                }
            }
            _ = &mut drain_timer => {
                warn!("shutdown timeout while storing results: the rest go back to the queue");
                hard_stop.cancel();
            }
        }
    } else {
        hard_stop.cancel();
        sink_task.abort();
    }
    // Closing waits for the broker's answer; a broker that does not answer must not keep the
    // worker from exiting (it requeues everything unacked when the TCP connection ends).
    events_stop.cancel();
    let _ = events_task.await;
    let close = async {
        for ch in &channels {
            let _ = ch.close(200, "worker shutting down".into()).await;
        }
        let _ = events_ch.close(200, "worker shutting down".into()).await;
        let _ = conn.close(200, "worker shutting down".into()).await;
        let _ = publish_conn.close(200, "worker shutting down".into()).await;
    };
    if tokio::time::timeout(Duration::from_secs(5), close)
        .await
        .is_err()
    {
        warn!("the broker did not answer the close within 5 s");
    }
    if result.is_ok() {
        info!("worker stopped");
    }
    result
}
