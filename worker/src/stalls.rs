//! Jobs whose batches can no longer arrive, found and finished as `stalled`.
//!
//! An operator who purges a work queue, or deletes a delay queue with retries in it, takes
//! batches away that no worker will ever meet: their job would wait for them for ever. One
//! worker of a namespace at a time (a lock in Redis) looks, every [`period`], at the jobs that
//! made no progress for `--stall-after` (the scripts keep `{ns}:active`, each job scored by
//! its last progress: registered, a batch settled, a retry counted, publishing ended). Such a
//! job is given up on when, at two looks a period apart with no progress between:
//! - publishing has ended (a live producer still holds its lease);
//! - its work queue, its priority bands and every delay queue of them hold no message at all
//!   (a passive declare each; any message, of any job, holds the verdict back), and neither
//!   do the dead-letter events that are not counted yet;
//! - no worker consuming its queue that beat in the last minute holds a batch in flight (a
//!   frozen worker's batches go back to the queue once the broker's heartbeat gives up on it).
//!
//! Its batches not settled are then counted lost (`batches_lost`), its problems say why, and it
//! finishes `stalled` (`Store::mark_stalled` checks again, atomically, that it made no progress).
//! A lost batch that comes back after all is stored and counted as usual.

use std::{collections::HashMap, time::Duration};

use lapin::{options::QueueDeclareOptions, types::FieldTable, Connection};
use taskmill_common::{
    amqp, now_ms,
    store::{JobStatus, Store, StoreError},
    task::Registry,
    topology::{self, Names},
};
use tracing::{debug, warn};

/// How often the watcher looks at a namespace's quiet jobs: a quarter of `stall_after`, within
/// 5 s (more than two heartbeats of a worker, so that a batch just taken shows in flight) and
/// 30 s.
pub(crate) fn period(stall_after: Duration) -> Duration {
    (stall_after / 4).clamp(Duration::from_secs(5), Duration::from_secs(30))
}

/// A worker that beat this recently may still hold unacknowledged batches (the broker gives
/// them back once its heartbeat gives up on the connection: 20 s at the default heartbeat).
const WORKER_SEEN_MS: u64 = 60_000;

/// Jobs looked at per round, oldest progress first.
const JOBS_PER_ROUND: usize = 100;

/// The watcher of one worker process.
pub(crate) struct Watcher {
    names: Names,
    amqp_url: String,
    stall_after: Duration,
    owner: String,
    registry: Registry,
    amqp: Option<Connection>,
    /// Jobs found quiet at the last look, with their score then.
    suspects: HashMap<String, f64>,
}

impl Watcher {
    pub(crate) fn new(
        names: Names,
        amqp_url: String,
        stall_after: Duration,
        owner: String,
        registry: Registry,
    ) -> Self {
        Self {
            names,
            amqp_url,
            stall_after,
            owner,
            registry,
            amqp: None,
            suspects: HashMap::new(),
        }
    }

    /// One look: gives up on the jobs quiet at this look and the last.
    pub(crate) async fn tick(&mut self, store: &Store) {
        let lock = store.keys().stall_watch();
        if !store
            .hold_lock(&lock, &self.owner, period(self.stall_after) * 3)
            .await
        {
            self.rest();
            return;
        }
        let before = now_ms().saturating_sub(self.stall_after.as_millis() as u64);
        let quiet = match store.quiet_jobs(before, JOBS_PER_ROUND).await {
            Ok(q) => q,
            Err(e) => return debug!("reading the quiet jobs: {e}"),
        };
        if quiet.is_empty() {
            self.rest();
            return;
        }
        let mut idle: HashMap<String, bool> = HashMap::new();
        let mut suspects = HashMap::new();
        for (job, score) in quiet {
            let status = match store.job_status(&job).await {
                Ok(Some(s)) => s,
                // Expired or deleted, or a hash that is no job's: nothing to wait for.
                Ok(None) | Err(StoreError::BadJob(_)) => {
                    let _ = store.forget_active(&job).await;
                    continue;
                }
                Err(e) => return debug!("reading job {job}: {e}"),
            };
            if status.is_finished() {
                let _ = store.forget_active(&job).await;
                continue;
            }
            if status.batches_total.is_none() {
                continue;
            }
            let quiet_queue = match idle.get(&status.queue) {
                Some(v) => *v,
                None => {
                    let v = self.queue_idle(store, &status.queue).await;
                    idle.insert(status.queue.clone(), v);
                    v
                }
            };
            if !quiet_queue {
                continue;
            }
            if self.suspects.get(&job) == Some(&score) {
                self.give_up(store, &status, score).await;
            } else {
                suspects.insert(job, score);
            }
        }
        self.suspects = suspects;
    }

    /// Nothing to watch (or another worker watches): forget what was seen, let go of the
    /// connection.
    fn rest(&mut self) {
        self.suspects.clear();
        self.amqp = None;
    }

    async fn give_up(&self, store: &Store, status: &JobStatus, score: f64) {
        let problem = format!(
            "stalled: {{lost}} batches never came back: no progress for {} s while queue {} (its \
             priority bands and delay queues) held nothing and no worker held one of its batches; \
             a queue purged or deleted in the console loses its batches",
            self.stall_after.as_secs(),
            status.queue,
        );
        match store.mark_stalled(&status.job, score, &problem).await {
            Ok(Some((lost, fold))) => {
                warn!(job = %status.job, lost, queue = %status.queue,
                    "job stalled: its batches not settled can no longer arrive");
                metrics::counter!("taskmill_jobs_stalled_total").increment(1);
                if let (true, Some(task)) = (fold, self.registry.get(status.task())) {
                    crate::sink::fold(store.clone(), status.job.clone(), task).await;
                }
            }
            Ok(None) => {}
            Err(e) => warn!(job = %status.job, "marking the job stalled: {e}"),
        }
    }

    /// True when nothing of work queue `queue` is in the broker or in a worker's hands.
    async fn queue_idle(&mut self, store: &Store, queue: &str) -> bool {
        let now = now_ms();
        match store.workers().await {
            Ok(workers) => {
                let busy = workers.iter().any(|w| {
                    let serves = w["queues"]
                        .as_array()
                        .is_some_and(|q| q.iter().any(|q| q.as_str() == Some(queue)));
                    let seen = w["last_seen_ms"].as_u64().unwrap_or(0);
                    serves
                        && w["stopped_ms"].as_u64().is_none()
                        && now.saturating_sub(seen) <= WORKER_SEEN_MS
                        && w["in_flight"].as_i64().unwrap_or(0) > 0
                });
                if busy {
                    return false;
                }
            }
            Err(e) => {
                debug!("reading the workers: {e}");
                return false;
            }
        }
        let delay_queues = match store.delay_queues().await {
            Ok(d) => d,
            Err(e) => {
                debug!("reading the delay queues: {e}");
                return false;
            }
        };
        // Copies parked in Redis during a broker alarm are batches on their way back.
        if store.parked_count().await.map_or(true, |n| n > 0) {
            return false;
        }
        // Every shard and band; a count that cannot be read means no verdict this time.
        let shards = match store.shards_of(&[queue.to_string()]).await {
            Ok(n) => n.first().copied().unwrap_or(1),
            Err(e) => {
                debug!("reading the shards of {queue}: {e}");
                return false;
            }
        };
        let routed = topology::with_shards(queue, shards);
        let mut names: Vec<(String, bool)> = routed
            .iter()
            .map(|r| (self.names.queue(r), false))
            .collect();
        names.push((self.names.dead_events(), false));
        for d in delay_queues {
            let ours = routed.iter().any(|r| {
                d.strip_prefix(&self.names.queue(r))
                    .and_then(|rest| rest.strip_prefix(".delay."))
                    .is_some_and(|ms| ms.parse::<u64>().is_ok())
            });
            if ours {
                names.push((d, true));
            }
        }
        for (name, is_delay) in names {
            match self.messages(&name).await {
                Ok(Some(0)) => {}
                Ok(Some(_)) => return false,
                Ok(None) => {
                    if is_delay {
                        let _ = store.forget_delay_queue(&name).await;
                    }
                }
                Err(e) => {
                    debug!("looking into {name}: {e:#}");
                    self.amqp = None;
                    return false;
                }
            }
        }
        true
    }

    /// Messages ready in queue `name` (a passive declare), None when it does not exist.
    async fn messages(&mut self, name: &str) -> anyhow::Result<Option<u32>> {
        if self.amqp.as_ref().is_none_or(|c| !c.status().connected()) {
            self.amqp = Some(amqp::connect(&self.amqp_url, "taskmill-worker-watch").await?);
        }
        let Some(conn) = &self.amqp else {
            return Ok(None);
        };
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match ch
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => {
                let _ = ch.close(200, "".into()).await;
                Ok(Some(q.message_count()))
            }
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == 404) => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::period;
    use std::time::Duration;

    #[test]
    fn the_watcher_looks_every_quarter_of_the_wait_within_bounds() {
        assert_eq!(period(Duration::from_secs(2)), Duration::from_secs(5));
        assert_eq!(period(Duration::from_secs(60)), Duration::from_secs(15));
        assert_eq!(period(Duration::from_secs(3600)), Duration::from_secs(30));
    }
}
