//! Reading jobs: statuses (settling a lapsed publishing lease once), results a page at a time,
//! dead batches, the namespace's listing and its index rebuilt.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{BadJobHash, JobRead, JobStatus, Store, StoreError, LEASE_GRACE_MS};
use taskmill_protocol::now_ms;

impl Store {
    /// A job's status, or None when no such job is known (or it expired); a hash that is
    /// not a job's is [`StoreError::BadJob`]. A lapsed publishing lease is settled first.
    pub async fn job_status(&self, job: &str) -> Result<Option<JobStatus>, StoreError> {
        let read = self.job_statuses(&[job.to_string()]).await?;
        match read.into_iter().next().flatten() {
            None => Ok(None),
            Some(Ok(status)) => Ok(Some(status)),
            Some(Err(bad)) => Err(bad.into()),
        }
    }

    /// Several jobs' statuses, one round trip a chunk of 500: None where a job is gone, `Err`
    /// where its hash cannot be read as a job (the others are read all the same). A job whose
    /// producer's lease lapsed is settled by the lease script, once, and read again only when
    /// the script changed it: no read loops.
    #[tracing::instrument(level = "debug", skip_all, fields(jobs = ids.len()))]
    pub async fn job_statuses(&self, ids: &[String]) -> Result<Vec<Option<JobRead>>, StoreError> {
        let mut out = self.read_hashes(ids).await?;
        let now = now_ms();
        let lapsed: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Some(Ok(s)) if s.lease_lapsed(now)))
            .map(|(i, _)| i)
            .collect();
        if lapsed.is_empty() {
            return Ok(out);
        }
        let mut pipe = redis::pipe();
        for &i in &lapsed {
            pipe.cmd("EVALSHA")
                .arg(self.scripts.check_lease.get_hash())
                .arg(1)
                .arg(self.keys.job(&ids[i]))
                .arg(now)
                .arg(LEASE_GRACE_MS);
        }
        let changed: Vec<i64> = self.query_with_scripts(&pipe).await?;
        let again: Vec<usize> = lapsed
            .into_iter()
            .zip(changed)
            .filter(|&(_, c)| c == 1)
            .map(|(i, _)| i)
            .collect();
        let ids_again: Vec<String> = again.iter().map(|&i| ids[i].clone()).collect();
        for (i, read) in again.into_iter().zip(self.read_hashes(&ids_again).await?) {
            out[i] = read;
        }
        Ok(out)
    }

    /// The job hashes of `ids`, parsed, as they are (nothing settled).
    async fn read_hashes(&self, ids: &[String]) -> Result<Vec<Option<JobRead>>, StoreError> {
        let mut con = self.con().await;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for id in chunk {
                pipe.cmd("HGETALL").arg(self.keys.job(id));
            }
            let hashes: Vec<redis::RedisResult<BTreeMap<String, String>>> =
                pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
            for (id, f) in chunk.iter().zip(hashes) {
                out.push(match f {
                    Ok(f) if f.is_empty() => None,
                    Ok(f) => Some(JobStatus::from_hash(id, &f)),
                    Err(e) => Some(Err(self.unreadable(id, "key", e)?)),
                });
            }
        }
        Ok(out)
    }

    /// A read of one of a job's keys that failed: unreadable when the key holds another
    /// type than taskmill writes there (edited by hand), else the error.
    pub(crate) fn unreadable(
        &self,
        job: &str,
        what: &str,
        e: redis::RedisError,
    ) -> Result<BadJobHash, StoreError> {
        if e.code() == Some("WRONGTYPE") {
            Ok(BadJobHash::new(
                job,
                what,
                "not a hash (the key holds another type: written by something else)",
            ))
        } else {
            Err(self.err(e))
        }
    }

    /// All stored batch results of a job, by batch number.
    pub async fn results(&self, job: &str) -> Result<Vec<(u64, Value)>, StoreError> {
        self.hash_by_batch(job, "results", &self.keys.results(job))
            .await
    }

    /// How many batch results are stored for a job: readers that page through batch numbers
    /// stop once they have seen this many (a total edited by hand cannot make them loop).
    pub async fn results_count(&self, job: &str) -> Result<u64, StoreError> {
        let mut con = self.con().await;
        match redis::cmd("HLEN")
            .arg(self.keys.results(job))
            .query_async(&mut con)
            .await
        {
            Ok(n) => Ok(n),
            Err(e) => Err(self.unreadable(job, "results", e)?.into()),
        }
    }

    /// The stored results of batches `from..to` of a job, in batch order (batches without a
    /// result, dead or not done yet, are left out): one round trip, memory bounded by the
    /// range.
    pub async fn results_range(
        &self,
        job: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Value)>, StoreError> {
        if to <= from {
            return Ok(Vec::new());
        }
        let mut con = self.con().await;
        let got: Vec<Option<String>> = match redis::cmd("HMGET")
            .arg(self.keys.results(job))
            .arg((from..to).collect::<Vec<u64>>())
            .query_async(&mut con)
            .await
        {
            Ok(got) => got,
            Err(e) => return Err(self.unreadable(job, "results", e)?.into()),
        };
        Ok((from..to)
            .zip(got)
            .filter_map(|(b, v)| {
                let v = v?;
                Some((b, serde_json::from_str(&v).unwrap_or(Value::String(v))))
            })
            .collect())
    }

    /// Why each dead batch of a job died, by batch number.
    pub async fn dead_batches(&self, job: &str) -> Result<Vec<(u64, Value)>, StoreError> {
        self.hash_by_batch(job, "dead batches", &self.keys.dead(job))
            .await
    }

    /// A hash of batch number → JSON text, parsed and in batch order.
    async fn hash_by_batch(
        &self,
        job: &str,
        what: &str,
        key: &str,
    ) -> Result<Vec<(u64, Value)>, StoreError> {
        let mut con = self.con().await;
        let raw: BTreeMap<String, String> =
            match redis::cmd("HGETALL").arg(key).query_async(&mut con).await {
                Ok(raw) => raw,
                Err(e) => return Err(self.unreadable(job, what, e)?.into()),
            };
        let mut out: Vec<(u64, Value)> = raw
            .into_iter()
            .filter_map(|(k, v)| {
                let batch = k.parse().ok()?;
                Some((batch, serde_json::from_str(&v).unwrap_or(Value::String(v))))
            })
            .collect();
        out.sort_by_key(|(b, _)| *b);
        Ok(out)
    }

    /// Job ids, oldest first, with their creation time in ms. Ids whose job expired are
    /// left out, and dropped from the index.
    pub async fn jobs(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut con = self.con().await;
        let raw: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.jobs())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        let mut exists = Vec::with_capacity(raw.len());
        for chunk in raw.chunks(1000) {
            let mut pipe = redis::pipe();
            for (j, _) in chunk {
                pipe.cmd("EXISTS").arg(self.keys.job(j));
            }
            let got: Vec<i64> = pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
            exists.extend(got);
        }
        let mut live = Vec::with_capacity(raw.len());
        let mut gone = Vec::new();
        for ((j, s), e) in raw.into_iter().zip(exists) {
            if e > 0 {
                live.push((j, s as u64));
            } else {
                gone.push(j);
            }
        }
        if !gone.is_empty() {
            redis::cmd("ZREM")
                .arg(self.keys.jobs())
                .arg(&gone)
                .query_async::<i64>(&mut con)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(live)
    }

    /// Puts every job hash of the namespace back into the `{ns}:jobs` index (by its creation
    /// time), for an index deleted or damaged by hand: the hashes are found with `SCAN`.
    /// Returns how many jobs were missing from it.
    pub async fn reindex(&self) -> Result<u64, StoreError> {
        let mut con = self.con().await;
        let prefix = self.keys.job("");
        let mut cursor: u64 = 0;
        let mut added = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            // A job's own hash: `{ns}:job:{id}`, not one of its `:results`, `:dead`... keys
            // (ids never hold a `:`).
            let ids: Vec<&str> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&prefix))
                .filter(|id| !id.is_empty() && !id.contains(':'))
                .collect();
            if !ids.is_empty() {
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.cmd("HGET").arg(self.keys.job(id)).arg("created_ms");
                }
                let created: Vec<Option<u64>> =
                    pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
                let mut pipe = redis::pipe();
                for (id, at) in ids.iter().zip(created) {
                    pipe.cmd("ZADD")
                        .arg(self.keys.jobs())
                        .arg("NX")
                        .arg(at.unwrap_or(0))
                        .arg(*id);
                }
                let got: Vec<u64> = pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
                added += got.iter().sum::<u64>();
            }
            cursor = next;
            if cursor == 0 {
                return Ok(added);
            }
        }
    }
}
