//! Telling the batch that kills workers from the batches that were only in a dying worker's
//! hands.
//!
//! A quorum queue counts every delivery that ends without an ack, whoever was at fault: a
//! worker that dies takes its whole prefetch back to the queue, and each of those batches is
//! one delivery closer to the queue's delivery limit. So taskmill counts for itself, only for
//! batches delivered again (a first delivery costs nothing): `{ns}:job:{id}:starts`, a hash of
//! batch → how many times a worker started it after a redelivery, and batch`:solo` → how many
//! times it started running alone in its worker; both forgotten once it runs to an end (its
//! ack may still be lost with its worker). A redelivered batch that was never started again is
//! innocent (it was only prefetched); one that was started before is a suspect and runs
//! alone; one that was running alone each time a worker died, twice, is the culprit and is
//! dead-lettered as `worker_crash`. An innocent batch redelivered many times (workers dying
//! for other reasons) goes back to the queue as a new message, its delivery count at zero, so
//! that the broker's delivery limit never catches it.

use crate::{Store, StoreError};

/// Starts alone, each ended by a worker's death, that make a batch the culprit.
pub const SOLO_LIMIT: u64 = 2;

/// Deliveries after which a batch never started again is given back with a fresh count (half
/// the queues' delivery limit).
pub const RESET_AT: i64 = taskmill_protocol::names::DELIVERY_LIMIT / 2;

/// What a worker does with a batch delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivered {
    /// Run it as usual (counted as started).
    Run,
    /// It was running when a worker died before: run it alone ([`Store::solo_start`] when it
    /// starts).
    Alone,
    /// It was running alone each time a worker died, this many times: dead-letter it as
    /// `worker_crash`.
    Culprit(u64),
    /// Never started again and delivered this often: publish it again as a new message (its
    /// delivery count at zero) and ack this one.
    Renew,
}

/// KEYS: the job's starts hash. ARGV: batch, delivery count (-1 when unknown), RESET_AT,
/// SOLO_LIMIT, ttl. Returns {action (0 run, 1 alone, 2 culprit, 3 renew), solo starts}.
static CHECK: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local starts = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
local solo = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':solo') or '0') or 0
if solo >= tonumber(ARGV[4]) then return {2, solo} end
if starts == 0 and tonumber(ARGV[2]) >= tonumber(ARGV[3]) then return {3, solo} end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
if starts >= 1 then return {1, solo} end
return {0, solo}
",
    )
});

impl Store {
    /// The starts hash of `job`.
    fn starts_key(&self, job: &str) -> String {
        format!("{}:starts", self.keys.job(job))
    }

    /// Batch `batch` of `job` was delivered again (`delivery_count` times before, when the
    /// broker says): what to do with it, counted as started when it runs.
    pub async fn redelivered(
        &self,
        job: &str,
        batch: u64,
        delivery_count: Option<i64>,
    ) -> Result<Redelivered, StoreError> {
        let mut con = self.con().await;
        let (action, solo): (i64, u64) = CHECK
            .key(self.starts_key(job))
            .arg(batch)
            .arg(delivery_count.unwrap_or(-1))
            .arg(RESET_AT)
            .arg(SOLO_LIMIT)
            .arg(self.ttl)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(match action {
            1 => Redelivered::Alone,
            2 => Redelivered::Culprit(solo),
            3 => Redelivered::Renew,
            _ => Redelivered::Run,
        })
    }

    /// These batches ran to an end (whatever their outcome) after a redelivery: their starts
    /// are forgotten, so that losing their acks in a later death makes no suspect of them.
    pub async fn ran_through(&self, batches: &[(String, u64)]) -> Result<(), StoreError> {
        if batches.is_empty() {
            return Ok(());
        }
        let mut con = self.con().await;
        let mut pipe = redis::pipe();
        for (job, batch) in batches {
            pipe.hdel(
                self.starts_key(job),
                &[batch.to_string(), format!("{batch}:solo")],
            )
            .ignore();
        }
        let _: () = pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// A suspect batch starts running alone in its worker (nothing else runs until it ends).
    pub async fn solo_start(&self, job: &str, batch: u64) -> Result<(), StoreError> {
        let mut con = self.con().await;
        let key = self.starts_key(job);
        let _: () = redis::pipe()
            .hincr(&key, format!("{batch}:solo"), 1)
            .ignore()
            .expire(&key, self.ttl as i64)
            .ignore()
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
