//! A worker's upkeep beside its sessions, each on a period and a Redis connection of its own
//! (connected again when it has none): the cancelled jobs read every 250 ms, the task catalog
//! renewed, the heartbeat the dashboard's workers page and the stalled-job watcher read, the
//! watcher itself, and the follow-up jobs published from the outbox (`chains`).

use std::{sync::Arc, time::Duration};

use taskmill_common::{amqp, task::Registry, topology::Names};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{pool, stalls, Stats, WorkerArgs};

/// The upkeep tasks of one worker, stopped with the token they were started with.
pub(crate) struct Upkeep {
    background: Arc<BackgroundStore>,
    beat: Arc<Heartbeat>,
    tasks: Vec<JoinHandle<()>>,
}

impl Upkeep {
    /// Starts them; they run until `stop` is cancelled.
    pub(crate) fn start(
        args: &WorkerArgs,
        threads: usize,
        registry: &Registry,
        stats: &Arc<Stats>,
        cancelled: &pool::Cancelled,
        stop: CancellationToken,
    ) -> Self {
        let background = Arc::new(BackgroundStore {
            conn: args.conn.clone(),
            store: Default::default(),
        });
        let mut tasks = Vec::new();
        let cancelled = cancelled.clone();
        tasks.push(tokio::spawn(every(
            background.clone(),
            CANCELLED_POLL,
            stop.clone(),
            move |s| watch_cancelled(s, cancelled.clone()),
        )));
        let entries = Arc::new(catalog_entries(registry, &args.queues));
        tasks.push(tokio::spawn(every(
            background.clone(),
            CATALOG_EVERY,
            stop.clone(),
            move |s| {
                let entries = entries.clone();
                async move { publish_catalog(s, &entries).await }
            },
        )));
        let beat = Arc::new(Heartbeat::new(
            args,
            threads,
            registry.names(),
            stats.clone(),
        ));
        tasks.push(tokio::spawn(every(
            background.clone(),
            HEARTBEAT_EVERY,
            stop.clone(),
            {
                let beat = beat.clone();
                move |s| {
                    let beat = beat.clone();
                    async move { beat.send(&s, false).await }
                }
            },
        )));
        // Follow-up jobs of finished jobs (`enqueue --then`), from the namespace's outbox.
        let settings = args.conn.client_settings();
        let outlets = Arc::new(crate::chains::Outlets::default());
        let who = beat.id.clone();
        tasks.push(tokio::spawn(every(
            background.clone(),
            OUTBOX_EVERY,
            stop.clone(),
            move |s| {
                let (outlets, settings, who) = (outlets.clone(), settings.clone(), who.clone());
                async move { crate::chains::sweep(s, &outlets, &settings, &who).await }
            },
        )));
        // Completion webhooks of ended jobs (`enqueue --on-complete`).
        let http = reqwest::Client::builder()
            .user_agent(concat!("taskmill/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        let secret = args.webhook_secret.clone();
        let who = beat.id.clone();
        tasks.push(tokio::spawn(every(
            background.clone(),
            OUTBOX_EVERY,
            stop.clone(),
            move |s| {
                let (http, secret, who) = (http.clone(), secret.clone(), who.clone());
                async move { crate::hooks::sweep(s, &http, secret.as_deref(), &who).await }
            },
        )));
        // Jobs whose batches can no longer arrive (a queue purged in the console) finish as
        // `stalled`, looked for by one worker of the namespace at a time.
        if args.stall_after > 0 {
            let stall_after = Duration::from_secs(args.stall_after);
            let watcher = Arc::new(tokio::sync::Mutex::new(stalls::Watcher::new(
                Names::new(&args.conn.namespace),
                args.conn.amqp_url.clone(),
                stall_after,
                beat.id.clone(),
                registry.clone(),
            )));
            tasks.push(tokio::spawn(every(
                background.clone(),
                stalls::period(stall_after),
                stop,
                move |s| {
                    let watcher = watcher.clone();
                    async move { watcher.lock().await.tick(&s).await }
                },
            )));
        }
        Self {
            background,
            beat,
            tasks,
        }
    }

    /// Waits for the tasks (their token cancelled), then records the last heartbeat, which
    /// says the worker stopped (a killed one just stops beating).
    pub(crate) async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(s) = self.background.get().await {
            self.beat.send(&s, true).await;
        }
    }
}

/// How often a worker records its heartbeat, and how long a stopped worker stays listed.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT_KEEP_SECS: u64 = 3600;

/// What a worker says about itself every [`HEARTBEAT_EVERY`] (the dashboard's workers page).
struct Heartbeat {
    id: String,
    fixed: serde_json::Value,
    stats: Arc<Stats>,
}

impl Heartbeat {
    fn new(args: &WorkerArgs, threads: usize, tasks: Vec<&str>, stats: Arc<Stats>) -> Self {
        let started = taskmill_common::now_ms();
        let host = amqp::hostname();
        let pid = std::process::id();
        // Workers started in one process in the same millisecond (a custom binary running
        // two, the tests) still have ids of their own.
        static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            id: format!("{host}:{pid}:{started}:{n}"),
            fixed: serde_json::json!({
                "host": host,
                "pid": pid,
                "version": env!("CARGO_PKG_VERSION"),
                "queues": args.queues,
                "tasks": tasks,
                "threads": threads,
                "prefetch": args.prefetch,
                "started_ms": started,
            }),
            stats,
        }
    }

    async fn send(&self, store: &taskmill_common::store::Store, stopped: bool) {
        let now = taskmill_common::now_ms();
        // Its counters are the ones `/stats` serves.
        let mut entry = self.stats.to_json();
        if let Some(e) = entry.as_object_mut() {
            e.extend(self.fixed.as_object().cloned().unwrap_or_default());
            e.insert("id".into(), self.id.clone().into());
            e.insert("last_seen_ms".into(), now.into());
            e.insert(
                "heartbeat_ms".into(),
                (HEARTBEAT_EVERY.as_millis() as u64).into(),
            );
            e.insert("stopped_ms".into(), stopped.then_some(now).into());
        }
        if let Err(e) = store
            .heartbeat(&self.id, &entry, now, HEARTBEAT_KEEP_SECS)
            .await
        {
            warn!("recording the heartbeat: {e}");
        }
    }
}

/// How often the cancelled jobs are read from Redis.
const CANCELLED_POLL: Duration = Duration::from_millis(250);

/// How often the outbox of follow-up jobs is looked at.
const OUTBOX_EVERY: Duration = Duration::from_millis(500);

/// How often a worker renews its tasks in the catalog, and how long an entry lives.
const CATALOG_EVERY: Duration = Duration::from_secs(20);
const CATALOG_TTL_SECS: u64 = 60;

/// Runs `tick` with a Redis store now and then every `period`, until `stop`; connects (again)
/// when it has no store. For the worker's background upkeep, beside the sessions.
async fn every<F, Fut>(
    store: Arc<BackgroundStore>,
    period: Duration,
    stop: CancellationToken,
    mut tick: F,
) where
    F: FnMut(taskmill_common::store::Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        if let Some(s) = store.get().await {
            tick(s).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One Redis connection shared by the worker's background tasks, made when first needed and
/// again after a failed attempt.
struct BackgroundStore {
    conn: taskmill_common::config::ConnArgs,
    store: tokio::sync::Mutex<Option<taskmill_common::store::Store>>,
}

impl BackgroundStore {
    async fn get(&self) -> Option<taskmill_common::store::Store> {
        let mut store = self.store.lock().await;
        if store.is_none() {
            let c = &self.conn;
            *store =
                taskmill_common::store::Store::connect(&c.redis_url, &c.namespace, c.result_ttl)
                    .await
                    .ok();
        }
        store.clone()
    }
}

/// Keeps `cancelled` equal to the namespace's cancelled jobs (read every 250 ms). Errors are
/// retried quietly: the worst a stale set does is run a batch that a cancel would have dropped.
async fn watch_cancelled(store: taskmill_common::store::Store, cancelled: pool::Cancelled) {
    if let Ok(ids) = store.cancelled_jobs().await {
        *cancelled.write().unwrap_or_else(|e| e.into_inner()) = ids;
    }
}

/// The catalog entries of this worker's tasks.
fn catalog_entries(registry: &Registry, queues: &[String]) -> Vec<(String, serde_json::Value)> {
    let worker = format!("{}:{}", amqp::hostname(), std::process::id());
    registry
        .names()
        .into_iter()
        .filter_map(|name| {
            let task = registry.get(name)?;
            let entry = serde_json::json!({
                "name": name,
                "description": task.description(),
                "params": registry.params(name),
                "queues": queues,
                "worker": worker,
            });
            Some((name.to_string(), entry))
        })
        .collect()
}

/// Records the worker's tasks in the catalog (every 20 s; entries live 60 s).
async fn publish_catalog(
    store: taskmill_common::store::Store,
    entries: &[(String, serde_json::Value)],
) {
    let mut now = entries.to_vec();
    for (_, e) in &mut now {
        e["seen_ms"] = serde_json::json!(taskmill_common::now_ms());
    }
    if let Err(e) = store.publish_catalog(&now, CATALOG_TTL_SECS).await {
        warn!("recording the task catalog: {e}");
    }
}
