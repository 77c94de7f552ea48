//! Groups of jobs (`enqueue --group G`): `status --group G` and `wait --group G`.

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use serde_json::{json, Value};
use taskmill_client::{Client, Error};
use taskmill_common::store::JobStatus;

use super::wait::WaitEnd;

/// A group's jobs as read now.
pub struct GroupView {
    /// The group.
    pub group: String,
    /// Its jobs' statuses, by id.
    pub jobs: Vec<JobStatus>,
    /// Jobs whose hash cannot be read (each with why).
    pub unreadable: Vec<Value>,
}

impl GroupView {
    /// Reads every job of `group` (ids whose job expired are left out); `Ok(None)` when the
    /// group has no job.
    pub async fn read(client: &Client, group: &str) -> anyhow::Result<Option<Self>> {
        let ids = client.store().group_jobs(group).await?;
        let mut view = Self {
            group: group.to_string(),
            jobs: Vec::new(),
            unreadable: Vec::new(),
        };
        for id in ids {
            match client.job(&id).status().await {
                Ok(s) => view.jobs.push(s),
                Err(Error::NoSuchJob(_)) => {}
                Err(Error::Unreadable(bad)) => view.unreadable.push(bad.to_json()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok((!view.jobs.is_empty() || !view.unreadable.is_empty()).then_some(view))
    }

    /// Jobs by state.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        for s in &self.jobs {
            *c.entry(s.state().to_string()).or_insert(0) += 1;
        }
        if !self.unreadable.is_empty() {
            c.insert("unreadable".into(), self.unreadable.len() as u64);
        }
        c
    }

    /// Every job finished.
    pub fn finished(&self) -> bool {
        self.jobs.iter().all(JobStatus::is_finished)
    }

    /// How waiting on it ends: every job completed, or not.
    pub fn end(&self) -> WaitEnd {
        if self.unreadable.is_empty() && self.jobs.iter().all(|s| s.state() == "completed") {
            WaitEnd::Completed
        } else {
            WaitEnd::Failed
        }
    }

    /// One JSON object: the group, its counts, whether it finished, each job's status.
    pub fn to_json(&self) -> Value {
        json!({
            "group": self.group,
            "jobs": self.jobs.len() + self.unreadable.len(),
            "counts": self.counts(),
            "finished": self.finished(),
            "statuses": self.jobs.iter().map(JobStatus::to_json).chain(self.unreadable.iter().cloned()).collect::<Vec<_>>(),
        })
    }

    /// For people: the counts, then a line a job.
    pub fn describe(&self) -> String {
        let counts: Vec<String> = self
            .counts()
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        let mut s = format!(
            "group {}: {} jobs, {}\n  {}",
            self.group,
            self.jobs.len() + self.unreadable.len(),
            if self.finished() {
                "finished"
            } else {
                "not finished"
            },
            counts.join(", ")
        );
        for j in &self.jobs {
            let total = j
                .batches_total
                .map_or_else(|| "?".to_string(), |t| t.to_string());
            s.push_str(&format!(
                "\n  {}  {}  {} done, {} dead of {} batches",
                j.job,
                j.state(),
                j.batches_done,
                j.batches_dead,
                total
            ));
        }
        for u in &self.unreadable {
            s.push_str(&format!(
                "\n  {}  unreadable: {}",
                u["job"].as_str().unwrap_or("?"),
                u["unreadable"].as_str().unwrap_or("?")
            ));
        }
        s
    }
}

fn no_group(group: &str) -> anyhow::Error {
    Error::NoSuchJob(format!(
        "no job in group {group:?} in this namespace (wrong namespace, or they expired)"
    ))
    .into()
}

/// `status --group G`.
pub async fn status(client: &Client, group: &str, json: bool) -> anyhow::Result<ExitCode> {
    let view = GroupView::read(client, group)
        .await?
        .ok_or_else(|| no_group(group))?;
    if json {
        crate::out::line(&view.to_json().to_string());
    } else {
        crate::out::line(&view.describe());
    }
    Ok(ExitCode::SUCCESS)
}

/// `wait --group G`: until every job of the group finished (exit 0 when all completed, 1
/// otherwise) or the timeout (3).
pub async fn wait(
    client: &Client,
    group: &str,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        let view = GroupView::read(client, group)
            .await?
            .ok_or_else(|| no_group(group))?;
        let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if view.finished() || timed_out {
            if json {
                crate::out::line(&view.to_json().to_string());
            } else {
                crate::out::line(&view.describe());
            }
            let end = if view.finished() {
                view.end()
            } else {
                WaitEnd::TimedOut
            };
            if end == WaitEnd::TimedOut {
                eprintln!("producer: timed out waiting for group {group}");
            }
            return Ok(ExitCode::from(end.code()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
