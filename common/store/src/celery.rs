//! Celery ingress, the Redis side: a Celery call is a job of one batch whose id is the Celery
//! task id, registered whole (its batches and records known at once) with its Celery settings
//! in the job hash (`celery`: [`CelerySettings`] as JSON). The script that finishes the job
//! (`celery_finish` in `prelude.lua`) writes the outcome where Celery's Redis result backend
//! reads it, `SET` with expiry and `PUBLISH` on the key's channel, in the same atomic step as
//! the result itself: SUCCESS with the task's result, FAILURE with the dead-letter reason,
//! REVOKED when cancelled or expired. A stored SUCCESS is never overwritten. A call with the
//! rest of a Celery chain goes to the namespace's outbox on SUCCESS (in that same step), and a
//! worker publishes the chain's next call from there; a failure is written for every call
//! left in the chain too, as Celery does.

use serde::{Deserialize, Serialize};

use crate::{NewJob, Store, StoreError};

/// What a job made from a Celery call keeps of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CelerySettings {
    /// Where the result goes: the backend's key prefix and the task id.
    pub key: String,
    /// How long the result is kept, in seconds (Celery's `result_expires`).
    pub expires: u64,
    /// The call's parent in a Celery workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The Celery group it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The workflow's first call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    /// The Celery queue the call came from (a next step without a queue of its own goes there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The rest of a Celery chain, as Celery sends it (signatures, the next one last): on
    /// SUCCESS the job goes to the outbox and a worker publishes the next step; on a failure
    /// every step left gets the same failure, as Celery's own workers do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<serde_json::Value>,
    /// Results packed as msgpack (the app's `result_serializer = "msgpack"`), else JSON.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub msgpack: bool,
}

/// What registering a Celery call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CeleryRegistered {
    /// Registered now, or by an earlier delivery of the same call that did not get as far as
    /// its ack: publish its batch.
    Publish,
    /// An earlier delivery of the call ran it to the end: nothing to publish.
    Finished,
    /// Another job has this id: the call cannot be a job.
    Taken,
}

/// A Celery outcome written without a job (a call refused before it became one).
#[derive(Debug, Clone)]
pub struct CeleryRefusal<'a> {
    /// The Celery task id.
    pub id: &'a str,
    /// `FAILURE` (or `REVOKED`).
    pub status: &'a str,
    /// The exception's type, as `get()` raises it.
    pub exc_type: &'a str,
    /// The exception's module (`taskmill` is not loaded in the Python app, so Celery makes the
    /// type up in `celery.exceptions`).
    pub exc_module: &'a str,
    /// What went wrong.
    pub message: &'a str,
}

impl Store {
    /// Registers the Celery call `job` (its token: derived from the task id, so that a
    /// redelivery finds its own registration), published whole in `batches` batches of
    /// `records` records in all, with its `options` (fields of the job hash that say how it
    /// runs, for people: `eta_ms`, `expires_ms`, `priority`, `time_limit_ms`).
    pub async fn register_celery_call(
        &self,
        job: &NewJob<'_>,
        batches: u64,
        records: u64,
        settings: &CelerySettings,
        options: &[(&str, u64)],
    ) -> Result<CeleryRegistered, StoreError> {
        let settings = serde_json::to_string(settings).unwrap_or_default();
        let options: serde_json::Map<String, serde_json::Value> = options
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        let options = serde_json::Value::Object(options).to_string();
        match self
            .register(job, Some((batches, records, &settings, &options)))
            .await?
        {
            redis::Value::Int(1) => Ok(CeleryRegistered::Publish),
            redis::Value::Int(2) => Ok(CeleryRegistered::Finished),
            _ => Ok(CeleryRegistered::Taken),
        }
    }

    /// Writes a refused call's outcome at `settings.key`; false when a SUCCESS was there.
    pub async fn celery_refuse(
        &self,
        settings: &CelerySettings,
        refusal: &CeleryRefusal<'_>,
    ) -> Result<bool, StoreError> {
        let mut con = self.con().await;
        let written: i64 = self
            .scripts
            .celery_result
            .key(&settings.key)
            .arg(refusal.id)
            .arg(refusal.status)
            .arg(refusal.exc_type)
            .arg(refusal.exc_module)
            .arg(refusal.message)
            .arg(taskmill_protocol::now_ms())
            .arg(settings.expires)
            .arg(serde_json::to_string(settings).unwrap_or_default())
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        self.replicated(&mut con).await?;
        Ok(written == 1)
    }

    /// The Celery settings of job `job`, when it was made from a Celery call.
    pub async fn celery_settings(&self, job: &str) -> Result<Option<CelerySettings>, StoreError> {
        let mut con = self.con().await;
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.keys.job(job))
            .arg("celery")
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// The Celery result stored at `key`, as its JSON text.
    pub async fn celery_result(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut con = self.con().await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }
}
