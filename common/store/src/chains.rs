//! Follow-up jobs (`enqueue --then`): the outbox that fires them.
//!
//! A job enqueued with follow-up steps keeps them in its hash (`then`: JSON, see
//! [`Chain`]). The script that finishes the job (`finish_j` in `prelude.lua`, run by whichever
//! script stores the last batch's outcome) also sets `then_fired_ms` (once) and adds the job to
//! the namespace's outbox, `{ns}:outbox` (a sorted set of job ids by the time they fired): the
//! trigger is written in the same atomic step as the result that causes it, so no finished job
//! can lose its follow-up. Any worker then publishes the follow-up (claiming the entry first, so
//! that one worker at a time does), and settles the entry: `then_job` (the follow-up's id) or
//! `then_note` (why none runs) written on the parent, the entry removed. A worker that dies
//! between the two leaves the entry for the next one; the follow-up's id is derived from the
//! chain, so publishing it again is refused by the registration and counts as published.

use serde::{Deserialize, Serialize};

use crate::{Store, StoreError};

/// When a follow-up step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Once every batch of the job before it is settled (completed, completed with errors, or
    /// stalled): the default.
    #[default]
    Complete,
    /// Only when the job before it completed without a dead batch.
    Success,
}

impl Trigger {
    /// `complete` or `success`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Complete => "complete",
            Trigger::Success => "success",
        }
    }
}

impl std::str::FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "complete" => Ok(Trigger::Complete),
            "success" => Ok(Trigger::Success),
            other => Err(format!("{other:?} is not complete or success")),
        }
    }
}

/// One follow-up step: a task run over the batch results of the job before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Task name.
    pub task: String,
    /// Task parameters, as text.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    /// Records (results of the job before) per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// When it runs.
    #[serde(default)]
    pub on: Trigger,
}

fn default_batch_size() -> usize {
    10
}

/// What a job's hash keeps of its chain (`then`): the first job's id, the number of the next
/// step, and the steps still to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// The id of the chain's first job.
    pub root: String,
    /// The number of `steps[0]` in the chain (1 for the first follow-up).
    pub next: u32,
    /// The steps still to run, the next first.
    pub steps: Vec<Step>,
}

impl Chain {
    /// The id of the follow-up `steps[0]` becomes: `{root}.then{next}` (a root too long for
    /// the 100-character limit is cut and given a hash of itself).
    pub fn next_id(&self) -> String {
        derived_id(&self.root, &format!(".then{}", self.next))
    }

    /// The chain the follow-up keeps: the steps after its own.
    pub fn rest(&self) -> Option<Chain> {
        (self.steps.len() > 1).then(|| Chain {
            root: self.root.clone(),
            next: self.next + 1,
            steps: self.steps[1..].to_vec(),
        })
    }
}

/// What `close_group` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The group is closed now.
    Now,
    /// It was closed already, with the same follow-up: nothing changed.
    Already,
    /// It was closed already with another follow-up: nothing changed.
    Conflict,
    /// The group has no job.
    NoSuchGroup,
}

/// A closed group (`producer group close`) and its chord follow-up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// When it was closed (ms since the epoch).
    pub closed_ms: Option<u64>,
    /// Its chord follow-up, as given to the close (the chain's root is the follow-up's id).
    pub then: Option<Chain>,
    /// When every job had ended and the follow-up fired.
    pub fired_ms: Option<u64>,
    /// The follow-up job, once published.
    pub then_job: Option<String>,
    /// What happened to the follow-up (published, skipped and why).
    pub then_note: Option<String>,
    /// The ids of the group's jobs that have ended.
    #[serde(skip)]
    pub ended: Vec<String>,
}

/// The outbox entry of group `g`'s chord follow-up (job ids never hold `:`).
pub fn group_entry(g: &str) -> String {
    format!("group:{g}")
}

/// The id a chord follow-up of group `g` gets: `{g}.chord` (bounded like [`Chain::next_id`]).
pub fn chord_id(g: &str) -> String {
    derived_id(g, ".chord")
}

/// `{root}{suffix}`, a root too long for the 100-character limit cut and given a hash of
/// itself.
fn derived_id(root: &str, suffix: &str) -> String {
    if root.len() + suffix.len() <= 100 {
        return format!("{root}{suffix}");
    }
    // FNV-1a: the same id from every worker.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in root.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let cut: String = root.chars().take(70).collect();
    format!("{cut}.{h:016x}{suffix}")
}

/// Settles an outbox entry. KEYS: parent job, outbox, claim. ARGV: parent id, child id (or
/// ''), note.
static SETTLE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'then_job', ARGV[2]) end
  redis.call('HSET', KEYS[1], 'then_note', ARGV[3])
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
",
    )
});

impl Store {
    /// The ids of the jobs of `group` (those registered; ids of expired jobs are left out).
    pub async fn group_jobs(&self, group: &str) -> Result<Vec<String>, StoreError> {
        let mut con = self.con().await;
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.group(group))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        ids.sort();
        Ok(ids)
    }

    /// Closes `group`: it takes no more jobs, and its chord follow-up `then` (if any; the
    /// chain's root is the follow-up's id, see [`chord_id`]) fires once every job in it has
    /// ended.
    pub async fn close_group(
        &self,
        group: &str,
        then: Option<&Chain>,
    ) -> Result<Closed, StoreError> {
        let then = then
            .map(|c| serde_json::to_string(c).unwrap_or_default())
            .unwrap_or_default();
        let mut con = self.con().await;
        let got: i64 = self
            .scripts
            .close_group
            .key(self.keys.group(group))
            .key(self.keys.group_info(group))
            .arg(group)
            .arg(taskmill_protocol::now_ms())
            .arg(then)
            .arg(self.ttl)
            .invoke_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        self.replicated(&mut con).await?;
        Ok(match got {
            1 => Closed::Now,
            2 => Closed::Already,
            3 => Closed::Conflict,
            _ => Closed::NoSuchGroup,
        })
    }

    /// Group `group`'s close and chord follow-up (all `None` while it is open), and which of
    /// its jobs have ended.
    pub async fn group_info(&self, group: &str) -> Result<GroupInfo, StoreError> {
        let mut con = self.con().await;
        let (fields, ended): (std::collections::HashMap<String, String>, Vec<String>) =
            redis::pipe()
                .hgetall(self.keys.group_info(group))
                .smembers(self.keys.group_done(group))
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
        let num = |k: &str| fields.get(k).and_then(|v| v.parse().ok());
        Ok(GroupInfo {
            closed_ms: num("closed_ms"),
            then: fields
                .get("then")
                .and_then(|v| serde_json::from_str(v).ok()),
            fired_ms: num("fired_ms"),
            then_job: fields.get("then_job").cloned(),
            then_note: fields.get("then_note").cloned(),
            ended,
        })
    }

    /// The oldest `n` jobs of the outbox (finished, their follow-up not yet settled).
    pub async fn outbox(&self, n: usize) -> Result<Vec<String>, StoreError> {
        let mut con = self.con().await;
        redis::cmd("ZRANGE")
            .arg(self.keys.outbox())
            .arg(0)
            .arg(n.saturating_sub(1))
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))
    }

    /// Claims `job`'s outbox entry for `ms` (true when this caller has it now): one worker at
    /// a time publishes a follow-up.
    pub async fn claim_outbox(&self, job: &str, who: &str, ms: u64) -> Result<bool, StoreError> {
        self.claim(&self.keys.outbox_claim(job), who, ms).await
    }

    /// Takes claim `key` for `ms` unless someone holds it (true when this caller has it now).
    pub(crate) async fn claim(&self, key: &str, who: &str, ms: u64) -> Result<bool, StoreError> {
        let mut con = self.con().await;
        let got: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(who)
            .arg("NX")
            .arg("PX")
            .arg(ms)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(got.is_some())
    }

    /// Lets go of a claim without settling (publishing failed; the next sweep tries again).
    pub async fn release_outbox(&self, job: &str) -> Result<(), StoreError> {
        let mut con = self.con().await;
        redis::cmd("DEL")
            .arg(self.keys.outbox_claim(job))
            .query_async::<i64>(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Settles outbox entry `job` (a job id, or a group's [`group_entry`]): its follow-up
    /// `child` (when one was published) and a note saying what happened, on the job (or the
    /// group's info); the entry and the claim removed.
    pub async fn settle_outbox(
        &self,
        job: &str,
        child: Option<&str>,
        note: &str,
    ) -> Result<(), StoreError> {
        let mut con = self.con().await;
        let target = match job.strip_prefix("group:") {
            Some(g) => self.keys.group_info(g),
            None => self.keys.job(job),
        };
        SETTLE
            .key(target)
            .key(self.keys.outbox())
            .key(self.keys.outbox_claim(job))
            .arg(job)
            .arg(child.unwrap_or(""))
            .arg(note)
            .invoke_async::<i64>(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        self.replicated(&mut con).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_up_ids_are_derived_and_bounded() {
        let step = Step {
            task: "t".into(),
            params: Default::default(),
            batch_size: 10,
            on: Trigger::Complete,
        };
        let c = Chain {
            root: "c1".into(),
            next: 1,
            steps: vec![step.clone(), step],
        };
        assert_eq!(c.next_id(), "c1.then1");
        assert_eq!(c.rest().map(|r| r.next_id()), Some("c1.then2".into()));
        let long = Chain {
            root: "x".repeat(100),
            ..c
        };
        let id = long.next_id();
        assert!(id.len() <= 100 && id.ends_with(".then1"), "{id}");
        assert_eq!(id, long.next_id());
    }
}
