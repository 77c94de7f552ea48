//! Completion webhooks (`enqueue --on-complete URL`), the Redis side. A job registered with a
//! webhook keeps its URL in its hash (`on_complete`). The script that ends the job (any of
//! them: `finish_j` and `cancel.lua` call `hook_fire` in `prelude.lua`) sets `hook_fired_ms`
//! once and adds the job to the namespace's `hooks` set, scored by when the next attempt is
//! due: the trigger is written in the same atomic step as the end it reports, so a worker
//! that dies cannot lose it. Workers take due entries (a claim key each, so that one worker
//! at a time delivers), POST the job's status, and record each attempt with
//! [`Store::hook_attempted`]: delivered (the entry removed), failed (due again later), or
//! given up on. A worker that dies holding a claim delays the delivery by the claim's length.

use crate::{Store, StoreError};

/// Records one delivery attempt. KEYS: job, hooks, claim. ARGV: id, now, outcome (`ok`,
/// `retry` or `gave_up`), error text, when the next attempt is due (for `retry`). Returns the
/// attempts made so far (0 when the job is gone: its entry is dropped).
static ATTEMPTED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('DEL', KEYS[3])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
local n = redis.call('HINCRBY', KEYS[1], 'hook_attempts', 1)
if ARGV[3] == 'ok' then
  redis.call('HSET', KEYS[1], 'hook_delivered_ms', ARGV[2])
  redis.call('HDEL', KEYS[1], 'hook_error')
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif ARGV[3] == 'retry' then
  redis.call('HSET', KEYS[1], 'hook_error', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'hook_error', ARGV[4], 'hook_gave_up_ms', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return n
",
    )
});

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAttempt {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed (the error text); the next attempt is due at this time (ms since the epoch).
    Retry(String, u64),
    /// It failed and no attempt is left (the error text).
    GaveUp(String),
}

impl Store {
    /// Jobs whose webhook is due now, at most `n`, the longest due first.
    pub async fn hooks_due(&self, n: usize) -> Result<Vec<String>, StoreError> {
        let mut con = self.con().await;
        redis::cmd("ZRANGE")
            .arg(self.keys.hooks())
            .arg("-inf")
            .arg(taskmill_protocol::now_ms())
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(n)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Claims `job`'s webhook for `ms` (true when this caller has it now).
    pub async fn claim_hook(&self, job: &str, who: &str, ms: u64) -> Result<bool, StoreError> {
        self.claim(&self.keys.hook_claim(job), who, ms).await
    }

    /// Records an attempt to deliver `job`'s webhook and lets go of the claim; the attempts
    /// made so far.
    pub async fn hook_attempted(
        &self,
        job: &str,
        attempt: &HookAttempt,
    ) -> Result<u64, StoreError> {
        let (outcome, error, next) = match attempt {
            HookAttempt::Delivered => ("ok", "", 0),
            HookAttempt::Retry(e, at) => ("retry", e.as_str(), *at),
            HookAttempt::GaveUp(e) => ("gave_up", e.as_str(), 0),
        };
        let mut con = self.con().await;
        let n: u64 = ATTEMPTED
            .key(self.keys.job(job))
            .key(self.keys.hooks())
            .key(self.keys.hook_claim(job))
            .arg(job)
            .arg(taskmill_protocol::now_ms())
            .arg(outcome)
            .arg(error)
            .arg(next)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        self.replicated(&mut con).await?;
        Ok(n)
    }
}
