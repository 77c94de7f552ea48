//! Periodic schedules in Redis: `{ns}:schedules` (the names) and one hash a schedule,
//! `{ns}:schedule:{name}`: `spec` (JSON, written by `producer schedule add` or a client),
//! `next_ms` (the next tick not yet enqueued; absent until a scheduler has checked a schedule
//! that a client added, or resumed: see [`Store::adopt_schedule`]), `paused`, and the last run
//! (`last_tick_ms`, `last_job`, `last_error`). Schedules do not expire. Several schedulers may read them at once: a tick's
//! job id is derived from the schedule and the tick, so enqueueing it twice is refused by the
//! job registration, and `next_ms` moves only from the tick a scheduler handled (compare and
//! set), so no scheduler moves it back or past a tick another has not handled.

use std::collections::HashMap;

use crate::{Store, StoreError};

/// Sets `next_ms` to ARGV[2] only while it is still ARGV[1] ('' for absent); 1 when set.
static ADOPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if (redis.call('HGET', KEYS[1], 'next_ms') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'next_ms', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'paused', 1, 'last_error', ARGV[3]) end
return 1
",
    )
});

/// Moves `next_ms` from ARGV[1] to ARGV[2] and records the tick's job or error, only while
/// `next_ms` is still ARGV[1]; 1 when it moved.
static ADVANCE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('HGET', KEYS[1], 'next_ms') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'next_ms', ARGV[2], 'last_tick_ms', ARGV[1], 'last_job', ARGV[3],
  'last_error', ARGV[4], 'last_run_ms', ARGV[5])
return 1
",
    )
});

impl Store {
    /// Adds schedule `name` (its spec as JSON, its first tick: None leaves it to the first
    /// scheduler that checks it); false when one of that name exists.
    pub async fn add_schedule(
        &self,
        name: &str,
        spec: &str,
        next_ms: Option<u64>,
    ) -> Result<bool, StoreError> {
        let mut con = self.con().await;
        let key = self.keys.schedule(name);
        let (added, _): (bool, i64) = redis::pipe()
            .atomic()
            .cmd("HSETNX")
            .arg(&key)
            .arg("spec")
            .arg(spec)
            .cmd("SADD")
            .arg(self.keys.schedules())
            .arg(name)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        if added {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&key).arg("paused").arg(0);
            if let Some(next) = next_ms {
                cmd.arg("next_ms").arg(next);
            }
            let _: () = cmd.query_async(&mut con).await.map_err(|e| self.err(e))?;
        }
        Ok(added)
    }

    /// The schedules' names, sorted.
    pub async fn schedule_names(&self) -> Result<Vec<String>, StoreError> {
        let mut con = self.con().await;
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.schedules())
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        names.sort();
        Ok(names)
    }

    /// Schedule `name`'s fields; None when there is none (or its spec is gone).
    pub async fn schedule(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, StoreError> {
        let mut con = self.con().await;
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.schedule(name))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(fields.contains_key("spec").then_some(fields))
    }

    /// Removes schedule `name`; false when there was none.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool, StoreError> {
        let mut con = self.con().await;
        let (removed, _): (i64, i64) = redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.keys.schedule(name))
            .cmd("SREM")
            .arg(self.keys.schedules())
            .arg(name)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(removed > 0)
    }

    /// Pauses or resumes schedule `name` (a resumed one starts from `next_ms`, so the ticks
    /// of the pause are not run; None: from the tick after the time a scheduler checks it
    /// again); false when there is none.
    pub async fn pause_schedule(
        &self,
        name: &str,
        paused: bool,
        next_ms: Option<u64>,
    ) -> Result<bool, StoreError> {
        if self.schedule(name).await?.is_none() {
            return Ok(false);
        }
        let mut con = self.con().await;
        let key = self.keys.schedule(name);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset(&key, "paused", u8::from(paused))
            .ignore();
        if !paused {
            match next_ms {
                Some(next) => pipe.hset(&key, "next_ms", next).ignore(),
                None => pipe.hdel(&key, "next_ms").ignore(),
            };
        }
        let _: () = pipe.query_async(&mut con).await.map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// A scheduler that checked schedule `name` (its `next_ms` absent, or `seen` when it was
    /// not a time) sets its first tick `next_ms`, only if nobody changed it meanwhile;
    /// `refused`: the check failed, the schedule is paused with that reason. True when set.
    pub async fn adopt_schedule(
        &self,
        name: &str,
        seen: Option<&str>,
        next_ms: u64,
        refused: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut con = self.con().await;
        let set: i64 = ADOPT
            .key(self.keys.schedule(name))
            .arg(seen.unwrap_or(""))
            .arg(next_ms)
            .arg(refused.unwrap_or(""))
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(set == 1)
    }

    /// After tick `tick_ms` of schedule `name` was enqueued as `job` (or failed with
    /// `error`): moves `next_ms` to `next_ms`, only if it is still `tick_ms`; false when
    /// another scheduler moved it first.
    pub async fn advance_schedule(
        &self,
        name: &str,
        tick_ms: u64,
        next_ms: u64,
        job: &str,
        error: &str,
    ) -> Result<bool, StoreError> {
        let mut con = self.con().await;
        let moved: i64 = ADVANCE
            .key(self.keys.schedule(name))
            .arg(tick_ms)
            .arg(next_ms)
            .arg(job)
            .arg(error)
            .arg(taskmill_protocol::now_ms())
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(moved == 1)
    }

    /// Records a failed attempt at the current tick (it is tried again).
    pub async fn schedule_error(&self, name: &str, error: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
        let _: () = redis::cmd("HSET")
            .arg(self.keys.schedule(name))
            .arg("last_error")
            .arg(error)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
