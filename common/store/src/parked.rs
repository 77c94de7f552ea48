//! Copies of batches parked in Redis while a broker alarm blocks publishing (`{ns}:parked`:
//! id → what to publish, as JSON; `{ns}:parked-bodies`: id → the body). A worker whose retry
//! or dead-letter copy cannot be published parks it here and acks the original, so that the
//! failing batch gives its prefetch slot back; the parked copies are published by any
//! worker once its publishing connection is unblocked, each under a claim, then removed.

use redis::AsyncCommands;

use crate::{Store, StoreError};

/// Most copies parked in a namespace at once: beyond it a copy waits for the broker as
/// before (holding its batch's prefetch slot), so that an alarm cannot fill Redis.
pub const MAX_PARKED: u64 = 10_000;

/// Largest body parked (bytes); a larger copy waits for the broker.
pub const MAX_PARKED_BODY: usize = 1024 * 1024;

/// How long a worker's claim on a parked copy lasts while it publishes it.
const CLAIM_MS: u64 = 30_000;

impl Store {
    /// Parks copy `id` (`meta`: where and how to publish it, JSON) with `body`: false when the
    /// namespace holds [`MAX_PARKED`] copies already or the body is over
    /// [`MAX_PARKED_BODY`] (the caller then waits for the broker). Parking the same id twice
    /// keeps one copy.
    pub async fn park(&self, id: &str, meta: &str, body: &[u8]) -> Result<bool, StoreError> {
        if body.len() > MAX_PARKED_BODY {
            return Ok(false);
        }
        let mut con = self.con().await;
        let parked: u64 = con
            .hlen(self.keys.parked())
            .await
            .map_err(|e| self.err(e))?;
        if parked >= MAX_PARKED {
            return Ok(false);
        }
        redis::pipe()
            .atomic()
            .hset(self.keys.parked_bodies(), id, body)
            .ignore()
            .hset(self.keys.parked(), id, meta)
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        self.replicated(&mut con).await?;
        Ok(true)
    }

    /// How many copies are parked.
    pub async fn parked_count(&self) -> Result<u64, StoreError> {
        let mut con = self.con().await;
        con.hlen(self.keys.parked()).await.map_err(|e| self.err(e))
    }

    /// Up to `limit` parked copies that no other worker is publishing now, each claimed for
    /// `who`: `(id, meta, body)`. A copy whose body is missing (edited by hand) is dropped.
    pub async fn claim_parked(
        &self,
        who: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let mut con = self.con().await;
        let ids: Vec<String> = redis::cmd("HRANDFIELD")
            .arg(self.keys.parked())
            .arg(limit.max(1))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for id in ids {
            if !self
                .claim(&self.keys.parked_claim(&id), who, CLAIM_MS)
                .await?
            {
                continue;
            }
            let meta: Option<String> = con
                .hget(self.keys.parked(), &id)
                .await
                .map_err(|e| self.err(e))?;
            let body: Option<Vec<u8>> = con
                .hget(self.keys.parked_bodies(), &id)
                .await
                .map_err(|e| self.err(e))?;
            match (meta, body) {
                (Some(meta), Some(body)) => out.push((id, meta, body)),
                _ => self.unpark(&id).await?,
            }
        }
        Ok(out)
    }

    /// Removes parked copy `id` (published, or unusable) and its claim.
    pub async fn unpark(&self, id: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
        redis::pipe()
            .atomic()
            .hdel(self.keys.parked(), id)
            .ignore()
            .hdel(self.keys.parked_bodies(), id)
            .ignore()
            .del(self.keys.parked_claim(id))
            .ignore()
            .query_async::<()>(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        self.replicated(&mut con).await
    }

    /// Lets go of the claim on parked copy `id` (it could not be published yet).
    pub async fn release_parked(&self, id: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
        con.del::<_, ()>(self.keys.parked_claim(id))
            .await
            .map_err(|e| self.err(e))
    }
}
