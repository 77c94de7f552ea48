//! taskmill-worker: consumes batches from RabbitMQ and analyses them on all cores.
//!
//! A custom worker is a `main.rs` of one line over [`main`], with the tasks it serves:
//!
//! ```no_run
//! use taskmill_common::task::Registry;
//! fn main() -> std::process::ExitCode {
//!     taskmill_worker::main(taskmill_common::tasks::builtin())
//! }
//! ```
//!
//! # Layout
//! Policy (pure, unit-tested without a broker or Redis):
//! - [`decide`]: what becomes of an analysed batch (store, retry after N ms, dead-letter with
//!   a kind, give back).
//! - [`ack`]: which deliveries to acknowledge, and how (one multiple-ack where it can).
//! - [`drain`]: the shutdown state machine (running → draining → drained, or hard stop).
//! - [`retry`]: the retry policy (delay tiers held in the broker).
//! - [`analyse`]: decoding a body and running its task (on the rayon pool).
//!
//! I/O:
//! - [`main`], [`run`]: the entry points; `run` loops over sessions, reconnecting with
//!   backoff, and stops on refused credentials.
//! - `session`: one connection's life (connect, declare, consume, drain, close).
//! - `pool`: handing deliveries to rayon and getting outcomes back by a oneshot.
//! - `sink`: carries the decisions out (Redis writes, retries, dead letters, acks).
//! - `dead_events`: counts every dead letter in its job, including those the broker
//!   dead-lettered by itself.
//! - [`metrics`]: Prometheus metrics, `/healthz` and `/readyz` (`--metrics-addr`).
//! - `upkeep`: beside the sessions, the cancelled jobs, the task catalog, the heartbeat and
//!   `stalls`, the watcher that finishes jobs whose batches can no longer arrive.
//! - `sweep`: batches a delay queue kept past its TTL, moved back.
//!
//! A delivery flows: consumer stream → rayon (`analyse`) → sink (`decide`, then store /
//! publish) → ack (as `ack` plans).

pub mod ack;
pub mod analyse;
mod args;
mod celery;
mod chains;
mod dead_events;
pub mod decide;
pub mod drain;
pub mod hooks;
pub mod metrics;
mod pool;
mod pumps;
pub mod retry;
mod session;
mod sink;
mod stalls;
mod stats;
mod sweep;
mod upkeep;

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use taskmill_common::{
    amqp,
    config::redact,
    logging,
    store::StoreError,
    task::Registry,
    topology::{self, Names},
    Backoff,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use args::{CeleryArgs, WorkerArgs};
pub use stats::Stats;

/// A whole worker binary: reads the config file and the command line (the stock worker's
/// flags), sets up logging, signals (the first SIGTERM/SIGINT drains, a second exits at once)
/// and the runtime, runs the worker with `registry`'s tasks, and returns the exit code (0, 2
/// for a bad setting, 5 when a service refused or could not be reached).
pub fn main(registry: Registry) -> ExitCode {
    use clap::{CommandFactory, Parser};
    taskmill_common::run_binary("worker", &WorkerArgs::command(), || async move {
        let args = WorkerArgs::parse();
        logging::init(args.log_format, "info,lapin=off");
        // A task's panic is one log event (the backtrace only when asked), not raw lines.
        logging::install_panic_hook();
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        match run(args, registry, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker: {}", taskmill_common::error_text(&*e));
                ExitCode::from(exit_code(&e))
            }
        }
    })
}

/// First SIGTERM/SIGINT: drain. Second: exit at once; the broker gives every unacked batch
/// back to the queue when the connection drops.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("worker: cannot install signal handlers");
        return;
    };
    for n in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n == 0 {
            info!("signal received: draining (send it again to stop at once)");
            shutdown.cancel();
        } else {
            warn!("second signal: stopping now; unacked batches go back to the queue");
            std::process::exit(130);
        }
    }
}

/// What a session needs, shared across reconnects.
pub(crate) struct Shared {
    pub(crate) args: WorkerArgs,
    pub(crate) analyser: pool::Analyser,
    pub(crate) names: Names,
    pub(crate) stats: Arc<Stats>,
    pub(crate) health: Arc<metrics::Health>,
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
    check(&args)?;
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
    let health = Arc::new(metrics::Health::new());
    let metrics_server = serve_metrics(&args, threads, &health, &stats, &metrics_stop).await?;
    let cancelled = pool::Cancelled::default();
    let upkeep = upkeep::Upkeep::start(
        &args,
        threads,
        &registry,
        &stats,
        &cancelled,
        metrics_stop.clone(),
    );
    // Calls from Celery apps (`--celery-queue`) become jobs beside the sessions.
    let ingress = celery::wanted(&args).then(|| {
        tokio::spawn(celery::run(
            args.clone(),
            registry.clone(),
            shutdown.clone(),
        ))
    });
    let running: pool::Running = Arc::new((0..threads).map(|_| Default::default()).collect());
    let analyser = pool::Analyser {
        pumps: pumps::Pumps::new(Arc::new(pool)),
        registry,
        max_message_bytes: args.max_message_bytes,
        max_result_bytes: args.max_result_bytes,
        cancelled,
        running,
        rate_store: Default::default(),
        stuck: Default::default(),
        alone: Default::default(),
    };
    // Batches past their time limit are settled without their threads; once every thread is
    // stuck, the worker drains and exits for its supervisor to restart it.
    let watchdog = tokio::spawn(watch_stuck(
        analyser.clone(),
        health.clone(),
        shutdown.clone(),
        metrics_stop.clone(),
    ));
    let shared = Shared {
        names: Names::new(&args.conn.namespace),
        analyser,
        args,
        stats,
        health,
    };
    let mut result = sessions(&shared, &shutdown).await;
    if result.is_ok()
        && shared
            .analyser
            .stuck
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        result = Err(ThreadsStuck.into());
    }
    if let Some(ingress) = ingress {
        let _ = ingress.await;
    }
    metrics_stop.cancel();
    let _ = watchdog.await;
    upkeep.stopped().await;
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    result
}

/// Every [`OVERTIME_CHECK`] until `stop`: settles the batches past their time limit without
/// their threads, says on `/readyz` (and `taskmill_analysis_threads_stuck`) how many threads
/// are stuck, and once every one is stuck for good, gives back what is queued and starts the
/// drain (the worker then exits [`EXIT_THREADS_STUCK`]).
async fn watch_stuck(
    analyser: pool::Analyser,
    health: Arc<metrics::Health>,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let threads = analyser.running.len();
    loop {
        let (stuck, hopeless) = pool::settle_overtime(&analyser.running);
        health.set_stuck(stuck);
        if threads > 0 && hopeless == threads {
            if !analyser
                .stuck
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                error!(
                    threads,
                    "every analysis thread is stuck in a task past its batch's time limit: \
                     their batches are settled, the others go back to the queue, and the worker \
                     exits with code {EXIT_THREADS_STUCK} for its supervisor to restart it"
                );
                shutdown.cancel();
            }
            // What was queued for the pool will never run here: it goes back unrun.
            for job in analyser.pumps.take_queued() {
                job();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(OVERTIME_CHECK) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// How often batches are checked against their time limits.
const OVERTIME_CHECK: Duration = Duration::from_millis(50);

/// The worker's exit code once every analysis thread is stuck in a task past its batch's time
/// limit (after it settled those batches and gave the rest back): restart it.
pub const EXIT_THREADS_STUCK: u8 = 7;

/// Every analysis thread was stuck past a time limit (exit code [`EXIT_THREADS_STUCK`]).
#[derive(Debug, thiserror::Error)]
#[error("every analysis thread is stuck in a task past its batch's time limit; restart the worker")]
pub struct ThreadsStuck;

/// Checks the settings before anything connects.
fn check(args: &WorkerArgs) -> anyhow::Result<()> {
    args.conn.check().map_err(UsageError)?;
    for q in &args.queues {
        topology::validate_queue(q).map_err(UsageError)?;
    }
    for q in &args.celery.queues {
        topology::validate_queue(q).map_err(|e| UsageError(format!("--celery-queue: {e}")))?;
    }
    args.celery.alias_table().map_err(UsageError)?;
    if args.prefetch == 0 {
        return Err(UsageError("--prefetch must be at least 1".into()).into());
    }
    Ok(())
}

/// Starts the metrics endpoints when `--metrics-addr` is given.
async fn serve_metrics(
    args: &WorkerArgs,
    threads: usize,
    health: &Arc<metrics::Health>,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = args.metrics_addr else {
        return Ok(None);
    };
    let handle = metrics::recorder()?;
    // The recorder is installed now: publish the gauges it starts with.
    health.publish();
    ::metrics::gauge!("taskmill_worker_threads").set(threads as f64);
    let server = metrics::serve(addr, handle, health.clone(), stats.clone(), stop.clone()).await?;
    info!(%addr, "serving /metrics, /healthz, /readyz and /stats");
    Ok(Some(server))
}

/// Runs sessions until shutdown, reconnecting with backoff.
async fn sessions(shared: &Shared, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        if shutdown.is_cancelled() {
            shared.stats.report();
            return Ok(());
        }
        Stats::add(&shared.stats.sessions, 1);
        let outcome = session::session(shared, shutdown, &mut backoff).await;
        shared.health.set_rabbitmq(false);
        shared.health.set_consuming(false);
        match outcome {
            Ok(session::Ended::Resharded) => continue,
            Ok(session::Ended::Stopped) => {
                shared.stats.report();
                return Ok(());
            }
            Err(e) if refused(&e) => {
                shared.stats.report();
                return Err(e.context("stopping: a service refused the worker's credentials"));
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(
                    "worker session ended: {}; reconnecting in {delay:?}",
                    taskmill_common::error_text(&*e)
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
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
            || c.downcast_ref::<StoreError>()
                .is_some_and(StoreError::refused)
    })
}

/// The worker's exit code for an error: 2 for a bad setting, 5 for a service that refused it
/// or could not be reached, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<UsageError>()) {
        2
    } else if e.chain().any(|c| c.is::<ThreadsStuck>()) {
        EXIT_THREADS_STUCK
    } else if refused(e)
        || e.chain()
            .any(|c| c.is::<amqp::ConnectError>() || c.is::<StoreError>())
    {
        5
    } else {
        1
    }
}
