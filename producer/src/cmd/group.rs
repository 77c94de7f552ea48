//! Groups of jobs (`enqueue --group G`): `status --group G`, `wait --group G`, and
//! `group close G [--then TASK]...` (no more jobs join; the chord follow-up runs once over the
//! results of them all, when every one has ended).

use std::{collections::BTreeMap, process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use taskmill_client::{Client, Error};
use taskmill_common::{
    config::ConnArgs,
    store::{
        chains::{Closed, GroupInfo, Step},
        JobStatus,
    },
};

use super::{enqueue::ThenArgs, wait::WaitEnd};
use crate::error::usage;

/// Arguments of `group`.
#[derive(Args, Debug, Clone)]
pub struct GroupArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: GroupAction,
}

/// What `group` does.
#[derive(Subcommand, Debug, Clone)]
pub enum GroupAction {
    /// Close a group: no more jobs join it (`enqueue --group` is refused), and its follow-up
    /// (--then: a chord) runs once over the results of all its jobs when every one has ended.
    Close(CloseArgs),
}

/// Arguments of `group close`.
#[derive(Args, Debug, Clone)]
pub struct CloseArgs {
    /// The group.
    pub group: String,
    /// The follow-up (chord) and its options: `--then TASK [--then-param K=V]... [--then-on
    /// complete|success]`, repeatable for a chain after it. Its id is `G.chord`.
    #[command(flatten)]
    pub follow: ThenArgs,
    /// Do not check the follow-up's task and parameters against the live workers' catalog
    /// (a worker not deployed yet).
    #[arg(long)]
    pub no_check: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A group's jobs as read now.
pub struct GroupView {
    /// The group.
    pub group: String,
    /// Its jobs' statuses, by id.
    pub jobs: Vec<JobStatus>,
    /// Jobs whose hash cannot be read (each with why).
    pub unreadable: Vec<Value>,
    /// Its close and chord follow-up.
    pub info: GroupInfo,
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
            info: client.store().group_info(group).await?,
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
            "closed": self.info.closed_ms.is_some(),
            "closed_ms": self.info.closed_ms,
            "then": self.info.then,
            "then_fired_ms": self.info.fired_ms,
            "then_job": self.info.then_job,
            "then_note": self.info.then_note,
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
        if self.info.closed_ms.is_some() {
            s.push_str("\n  closed");
            if let Some(then) = &self.info.then {
                let steps: Vec<&str> = then.steps.iter().map(|s| s.task.as_str()).collect();
                let what = match (&self.info.then_job, &self.info.then_note) {
                    (Some(child), Some(note)) => format!("{note}: job {child}"),
                    (None, Some(note)) => note.clone(),
                    _ if self.info.fired_ms.is_some() => "publishing".into(),
                    _ => format!(
                        "on {} of every job, as job {}",
                        then.steps[0].on.as_str(),
                        then.root
                    ),
                };
                s.push_str(&format!("; then {} ({what})", steps.join(" → ")));
            }
        }
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

pub(crate) fn no_group(group: &str) -> anyhow::Error {
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
/// otherwise) or the timeout (3). With `chain`, then until the group's chord follow-up is
/// published (or will not be), and on along its chain: the last job's status is printed.
pub async fn wait(
    client: &Client,
    group: &str,
    timeout: Option<Duration>,
    chain: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    loop {
        let view = GroupView::read(client, group)
            .await?
            .ok_or_else(|| no_group(group))?;
        let timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if view.finished() || timed_out {
            let mut end = if view.finished() {
                view.end()
            } else {
                WaitEnd::TimedOut
            };
            if chain && end != WaitEnd::TimedOut && view.info.then.is_some() {
                match chord_job(client, group, deadline).await? {
                    Some(child) => {
                        let left = deadline
                            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
                        return super::wait::chain_from(client, &child, left, json).await;
                    }
                    None => {
                        // Skipped (the group's note says why) or timed out.
                        let info = client.store().group_info(group).await?;
                        if info.then_note.is_none() {
                            end = WaitEnd::TimedOut;
                        } else if end == WaitEnd::Completed {
                            end = WaitEnd::Failed;
                        }
                    }
                }
            }
            let view = GroupView::read(client, group)
                .await?
                .ok_or_else(|| no_group(group))?;
            if json {
                crate::out::line(&view.to_json().to_string());
            } else {
                crate::out::line(&view.describe());
            }
            if end == WaitEnd::TimedOut {
                eprintln!("producer: timed out waiting for group {group}");
            }
            return Ok(ExitCode::from(end.code()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The group's chord follow-up once published; `None` when none runs (its note says why) or
/// the deadline came first.
async fn chord_job(
    client: &Client,
    group: &str,
    deadline: Option<tokio::time::Instant>,
) -> anyhow::Result<Option<String>> {
    loop {
        let info = client.store().group_info(group).await?;
        if let Some(child) = info.then_job {
            return Ok(Some(child));
        }
        if info.then_note.is_some() || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Closes `group` with chord follow-up `steps` (none: it only takes no more jobs): whether
/// it was closed now or already, and the follow-up's id.
pub(crate) async fn close(
    client: &Client,
    group: &str,
    steps: Vec<Step>,
    check: bool,
) -> anyhow::Result<(Closed, Option<String>)> {
    match client.close_group(group, steps, check).await {
        Err(Error::Invalid(why)) => Err(usage(why)),
        Ok((Closed::Conflict, _)) => Err(usage(format!(
            "group {group} is closed already, with another follow-up"
        ))),
        other => Ok(other?),
    }
}

/// `group close G [--then TASK]...`.
pub async fn run(conn: &ConnArgs, args: &GroupArgs) -> anyhow::Result<ExitCode> {
    let GroupAction::Close(c) = &args.action;
    let steps = c.follow.steps()?;
    let client = crate::client(conn).await?;
    let (closed, chord) = close(&client, &c.group, steps.clone(), !c.no_check).await?;
    let what = if closed == Closed::Now {
        "closed"
    } else {
        "closed already"
    };
    if c.json {
        crate::out::line(
            &json!({
                "group": c.group,
                "closed": true,
                "already": closed == Closed::Already,
                "then_job_id": chord,
            })
            .to_string(),
        );
    } else {
        let mut line = format!("group {} {what}", c.group);
        if let (Some(step), Some(chord)) = (steps.first(), &chord) {
            line.push_str(&format!(
                "; its follow-up {} runs as job {chord} once every job in it has ended",
                step.task
            ));
        }
        crate::out::line(&line);
    }
    Ok(ExitCode::SUCCESS)
}
