//! What the fleet shares in Redis beside the jobs: the task catalog, workers' heartbeats, the
//! namespace's keys, locks, the dashboard's samples, and what the stalled-job watcher reads
//! and writes (jobs not finished by last progress, the delay queues, its verdict).

use serde_json::Value;

use crate::{Store, StoreError};
use taskmill_protocol::now_ms;

impl Store {
    /// Records the tasks a worker serves in the catalog (JSON entries by task name), each
    /// expiring after `ttl_secs` unless renewed: the catalog shows the tasks of the live
    /// workers.
    pub async fn publish_catalog(
        &self,
        entries: &[(String, Value)],
        ttl_secs: u64,
    ) -> Result<(), StoreError> {
        let mut con = self.con().await;
        let mut pipe = redis::pipe();
        for (name, entry) in entries {
            for queue in entry["queues"].as_array().into_iter().flatten() {
                if let Some(q) = queue.as_str() {
                    pipe.cmd("SET")
                        .arg(self.keys.served(q, name))
                        .arg(1)
                        .arg("EX")
                        .arg(ttl_secs.max(1))
                        .ignore();
                }
            }
            pipe.cmd("SADD").arg(self.keys.catalog()).arg(name).ignore();
            // The set of names lives as long as its entries (it never expired before).
            pipe.cmd("EXPIRE")
                .arg(self.keys.catalog())
                .arg(ttl_secs.max(1))
                .ignore();
            pipe.cmd("SET")
                .arg(self.keys.catalog_task(name))
                .arg(entry.to_string())
                .arg("EX")
                .arg(ttl_secs.max(1))
                .ignore();
        }
        pipe.query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Whether a live worker consuming `queue` (short name) serves `task`.
    pub async fn served(&self, queue: &str, task: &str) -> Result<bool, StoreError> {
        let mut con = self.con().await;
        redis::cmd("EXISTS")
            .arg(self.keys.served(queue, task))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The catalog: the entries of the tasks live workers serve, by name.
    pub async fn catalog(&self) -> Result<Vec<Value>, StoreError> {
        let mut con = self.con().await;
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.catalog())
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        names.sort();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names.iter().map(|n| self.keys.catalog_task(n)).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for (name, entry) in names.iter().zip(raw) {
            match entry.and_then(|e| serde_json::from_str(&e).ok()) {
                Some(v) => out.push(v),
                None => {
                    // No live worker serves it any more.
                    let _: Result<i64, _> = redis::cmd("SREM")
                        .arg(self.keys.catalog())
                        .arg(name)
                        .query_async(&mut con)
                        .await;
                }
            }
        }
        Ok(out)
    }

    /// Records a worker's heartbeat: its JSON (kept `keep_secs` so that a worker that
    /// stopped is still shown, as gone), and its id in the index by `now_ms`. Ids older than
    /// `keep_secs` leave the index.
    pub async fn heartbeat(
        &self,
        id: &str,
        entry: &Value,
        now_ms: u64,
        keep_secs: u64,
    ) -> Result<(), StoreError> {
        let mut con = self.con().await;
        let index = self.keys.workers();
        redis::pipe()
            .cmd("SET")
            .arg(self.keys.worker(id))
            .arg(entry.to_string())
            .arg("EX")
            .arg(keep_secs)
            .ignore()
            .cmd("ZADD")
            .arg(&index)
            .arg(now_ms)
            .arg(id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(now_ms.saturating_sub(keep_secs * 1000))
            .ignore()
            .cmd("EXPIRE")
            .arg(&index)
            .arg(keep_secs)
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The workers' last heartbeats, most recent first.
    pub async fn workers(&self) -> Result<Vec<Value>, StoreError> {
        let mut con = self.con().await;
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.keys.workers())
            .arg(0)
            .arg(-1)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.worker(id)).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(raw
            .into_iter()
            .flatten()
            .filter_map(|e| serde_json::from_str(&e).ok())
            .collect())
    }

    /// Every key of this namespace (`{ns}:*`, read with SCAN, so Redis is never blocked).
    pub async fn keys_of_namespace(&self) -> Result<Vec<String>, StoreError> {
        let mut con = self.con().await;
        let pattern = format!("{}:*", self.keys.ns());
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            out.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Deletes these keys (a thousand a command).
    pub async fn delete_keys(&self, keys: &[String]) -> Result<(), StoreError> {
        let mut con = self.con().await;
        for chunk in keys.chunks(1000) {
            redis::cmd("DEL")
                .arg(chunk)
                .query_async::<i64>(&mut con)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// How many shards work queue `queue` is spread over, raised to `at_least` first when it
    /// was fewer (counts only grow: a shard nobody consumed any more would strand its
    /// batches). A value edited by hand that is not a count reads as 1; the answer is kept
    /// within 1 to `MAX_SHARDS`.
    pub async fn shards(&self, queue: &str, at_least: u16) -> Result<u16, StoreError> {
        let mut con = self.con().await;
        let n: i64 = redis::Script::new(include_str!("lua/shards.lua"))
            .key(self.keys.shards())
            .arg(queue)
            .arg(at_least.clamp(1, taskmill_protocol::names::MAX_SHARDS))
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(clamp_shards(n))
    }

    /// How many shards each of `queues` is spread over, as [`Store::shards`] reads them.
    pub async fn shards_of(&self, queues: &[String]) -> Result<Vec<u16>, StoreError> {
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.con().await;
        let raw: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.shards())
            .arg(queues)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(raw
            .into_iter()
            .map(|v| {
                clamp_shards(v.and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(1.0) as i64)
            })
            .collect())
    }

    /// Takes the lock `key` for `owner`, or keeps it when `owner` holds it already; it lapses
    /// after `ttl` unless taken again. True when `owner` holds it now.
    pub async fn hold_lock(&self, key: &str, owner: &str, ttl: std::time::Duration) -> bool {
        const HOLD: &str = r"
            if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
            if redis.call('GET', KEYS[1]) == ARGV[1] then
                redis.call('PEXPIRE', KEYS[1], ARGV[2])
                return 1
            end
            return 0
        ";
        let mut con = self.con().await;
        redis::Script::new(HOLD)
            .key(key)
            .arg(owner)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async::<i64>(&mut con)
            .await
            .is_ok_and(|held| held == 1)
    }

    /// Jobs not finished whose last progress is at or before `before_ms` (ms), oldest first,
    /// at most `limit`, each with its score as stored (for [`Store::mark_stalled`]).
    pub async fn quiet_jobs(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let mut con = self.con().await;
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.active_jobs())
            .arg("-inf")
            .arg(before_ms)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Takes `job` out of the jobs not finished (its hash is gone, or it is finished).
    pub async fn forget_active(&self, job: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
        redis::cmd("ZREM")
            .arg(self.keys.active_jobs())
            .arg(job)
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Records that a delay queue exists (full name): a job's retries may wait there.
    pub async fn add_delay_queue(&self, name: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
        redis::cmd("SADD")
            .arg(self.keys.delay_queues())
            .arg(name)
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The delay queues workers declared (full names; some may have been deleted since).
    pub async fn delay_queues(&self) -> Result<Vec<String>, StoreError> {
        let mut con = self.con().await;
        redis::cmd("SMEMBERS")
            .arg(self.keys.delay_queues())
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Forgets a delay queue that no longer exists.
    pub async fn forget_delay_queue(&self, name: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
        redis::cmd("SREM")
            .arg(self.keys.delay_queues())
            .arg(name)
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Gives up on the batches of `job` not settled yet, if it made no progress since `score`
    /// (its last progress, as [`Store::quiet_jobs`] gave it): they are counted lost, `problem`
    /// (with `{lost}` replaced by their number) joins its problems, and the job finishes
    /// (`stalled`; an interrupted job keeps its state). Returns None when nothing changed
    /// (progress since, finished, still publishing), else the batches lost and whether the
    /// job wants a summary folded.
    pub async fn mark_stalled(
        &self,
        job: &str,
        score: f64,
        problem: &str,
    ) -> Result<Option<(u64, bool)>, StoreError> {
        let mut con = self.con().await;
        let (code, lost, summary): (i64, i64, i64) = self
            .scripts
            .stall
            .key(self.keys.job(job))
            .arg(now_ms())
            .arg(score)
            .arg(problem)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok((code == 1).then_some((lost.max(0) as u64, summary == 1)))
    }

    /// Takes a lock that lapses after `ttl` (SET NX PX); true when this call took it.
    pub async fn try_lock(&self, key: &str, ttl: std::time::Duration) -> bool {
        let mut con = self.con().await;
        redis::cmd("SET")
            .arg(key)
            .arg(now_ms())
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async::<Option<String>>(&mut con)
            .await
            .ok()
            .flatten()
            .is_some()
    }

    /// Appends a sample to a capped list (newest last), keeping the last `keep` samples.
    pub async fn push_sample(
        &self,
        key: &str,
        sample: &Value,
        keep: usize,
    ) -> Result<(), StoreError> {
        let mut con = self.con().await;
        redis::pipe()
            .cmd("RPUSH")
            .arg(key)
            .arg(sample.to_string())
            .ignore()
            .cmd("LTRIM")
            .arg(key)
            .arg(-(keep as i64))
            .arg(-1)
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// The samples of a capped list, oldest first.
    pub async fn samples(&self, key: &str) -> Result<Vec<Value>, StoreError> {
        let mut con = self.con().await;
        let raw: Vec<String> = redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(raw
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect())
    }
}

/// A shard count as stored, within 1 to `MAX_SHARDS`.
fn clamp_shards(n: i64) -> u16 {
    n.clamp(1, i64::from(taskmill_protocol::names::MAX_SHARDS)) as u16
}
