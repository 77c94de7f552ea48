//! Periodic schedules and closed groups from code: what `producer schedule` and `producer group
//! close` do, for a program.
//!
//! A schedule added here is stored as `producer schedule add` stores it, without its first
//! tick: the first `producer scheduler` that sees it checks it as `schedule add` does (the
//! enqueue options parsed as `producer enqueue` parses them, the cron expression and time
//! zone) and sets its first tick, or pauses it with `last_error` saying why. What can be checked
//! here (name, period, policy, the options a tick cannot take) is refused at once.

use std::{collections::HashMap, time::Duration};

use serde_json::{json, Value};
use taskmill_protocol::names::{validate_key, validate_name};
use taskmill_store::chains::{chord_id, Chain, Closed, GroupInfo, Step};

use crate::{Client, Error, Result};

/// The longest schedule name: its ticks' job ids (`sched-NAME-SECONDS`) stay within the 100
/// characters of a job id.
const MAX_NAME: usize = 64;

/// When a schedule's ticks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Period {
    /// Every this long (at least 1 s), on multiples of it since the Unix epoch.
    Every(Duration),
    /// At the times of a five-field cron expression, in an IANA time zone (UTC when None).
    Cron {
        /// The expression: `0 3 * * *`.
        expr: String,
        /// `Europe/Paris`.
        timezone: Option<String>,
    },
}

/// A schedule to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSchedule {
    /// Its name (letters, digits, `-`, `_`; at most 64).
    pub name: String,
    /// When it ticks.
    pub period: Period,
    /// Ticks missed while no scheduler ran: None skips them, `Some(n)` runs the last n.
    pub catch_up: Option<u32>,
    /// The options of `producer enqueue` for each tick's job (`["--file", "/data/posts.jsonl",
    /// "--task", "post-stats"]`).
    pub enqueue: Vec<String>,
}

impl NewSchedule {
    /// The stored spec (as `producer schedule add` writes it), or why it cannot be added.
    fn spec(&self) -> Result<Value> {
        let invalid = |m: String| Err(Error::Invalid(m));
        validate_name("schedule", &self.name).map_err(Error::Invalid)?;
        if self.name.len() > MAX_NAME {
            return invalid(format!(
                "schedule name {:?} is longer than {MAX_NAME} characters",
                self.name
            ));
        }
        let missed = match self.catch_up {
            None => "skip".to_string(),
            Some(n) => format!("catch-up:{n}"),
        };
        let mut spec = json!({"missed": missed, "enqueue": self.enqueue});
        match &self.period {
            Period::Every(d) if d.as_millis() < 1000 => {
                return invalid(format!("every {d:?}: at least 1s"))
            }
            Period::Every(d) => spec["every_ms"] = json!(d.as_millis() as u64),
            Period::Cron { expr, timezone } => {
                if expr.split_whitespace().count() < 5 {
                    return invalid(format!(
                        "cron {expr:?} is not a cron expression (five fields: minute hour day month weekday)"
                    ));
                }
                spec["cron"] = json!(expr);
                if let Some(tz) = timezone {
                    if tz.trim().is_empty() {
                        return invalid("timezone is empty".into());
                    }
                    spec["timezone"] = json!(tz);
                }
            }
        }
        check_enqueue_options(&self.name, &self.enqueue).map_err(Error::Invalid)?;
        if self.enqueue.is_empty() {
            return invalid("a schedule needs enqueue options (a source at least)".into());
        }
        Ok(spec)
    }
}

/// What every tick of schedule `name` cannot take among its enqueue options: `--job`,
/// `--wait`, `--timeout` (each tick's job is `sched-NAME-SECONDS`), `--file -` (stdin).
pub fn check_enqueue_options(name: &str, enqueue: &[String]) -> Result<(), String> {
    for refused in ["--job", "--wait", "--timeout"] {
        if enqueue
            .iter()
            .any(|a| a == refused || a.starts_with(&format!("{refused}=")))
        {
            return Err(format!(
                "{refused} is not an option of a schedule (each tick's job is sched-{name}-SECONDS)"
            ));
        }
    }
    if enqueue.windows(2).any(|w| w[0] == "--file" && w[1] == "-")
        || enqueue.iter().any(|a| a == "--file=-")
    {
        return Err("--file - (stdin) cannot be read at each tick: name a file or a URL".into());
    }
    Ok(())
}

/// A schedule as stored: its spec and its last run.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleInfo {
    /// Its name.
    pub name: String,
    /// Its spec (`every_ms` or `cron` and `timezone`, `missed`, `enqueue`), as stored; None
    /// when it cannot be read (edited by hand).
    pub spec: Option<Value>,
    /// The next tick (ms since the epoch); None until a scheduler has checked it.
    pub next_ms: Option<u64>,
    /// Paused.
    pub paused: bool,
    /// The last tick run, its job, and the last error (why a tick failed, or why a scheduler
    /// refused it).
    pub last_tick_ms: Option<u64>,
    /// The last tick's job.
    pub last_job: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
}

impl ScheduleInfo {
    /// Schedule `name` as stored; None when there is none.
    pub async fn read(store: &taskmill_store::Store, name: &str) -> Result<Option<Self>> {
        Ok(store
            .schedule(name)
            .await?
            .map(|f| Self::from_fields(name, &f)))
    }

    fn from_fields(name: &str, f: &HashMap<String, String>) -> Self {
        let text = |k: &str| f.get(k).filter(|v| !v.is_empty()).cloned();
        let num = |k: &str| f.get(k).and_then(|v| v.parse().ok());
        Self {
            name: name.to_string(),
            spec: f.get("spec").and_then(|s| serde_json::from_str(s).ok()),
            next_ms: num("next_ms"),
            paused: f.get("paused").is_some_and(|p| p == "1"),
            last_tick_ms: num("last_tick_ms"),
            last_job: text("last_job"),
            last_error: text("last_error"),
        }
    }
}

impl Client {
    /// Adds a schedule (`producer schedule add`); [`Error::Invalid`] saying why it cannot be
    /// added (one of that name exists, a bad name, period or option).
    pub async fn add_schedule(&self, new: &NewSchedule) -> Result<()> {
        let spec = new.spec()?;
        if !self
            .store
            .add_schedule(&new.name, &spec.to_string(), None)
            .await?
        {
            return Err(Error::Invalid(format!("schedule {:?} exists", new.name)));
        }
        Ok(())
    }

    /// The namespace's schedules, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        let mut all = Vec::new();
        for name in self.store.schedule_names().await? {
            if let Some(s) = self.schedule(&name).await? {
                all.push(s);
            }
        }
        Ok(all)
    }

    /// One schedule; None when there is none.
    pub async fn schedule(&self, name: &str) -> Result<Option<ScheduleInfo>> {
        ScheduleInfo::read(&self.store, name).await
    }

    /// Pauses a schedule (false when there is none).
    pub async fn pause_schedule(&self, name: &str) -> Result<bool> {
        Ok(self.store.pause_schedule(name, true, None).await?)
    }

    /// Resumes a schedule from the first tick after now: the next scheduler pass checks it
    /// again and sets it (false when there is none).
    pub async fn resume_schedule(&self, name: &str) -> Result<bool> {
        Ok(self.store.pause_schedule(name, false, None).await?)
    }

    /// Removes a schedule; its jobs stay (false when there was none).
    pub async fn remove_schedule(&self, name: &str) -> Result<bool> {
        Ok(self.store.remove_schedule(name).await?)
    }

    /// Closes group `group` (`producer group close`): no more jobs join it, and `then` (its
    /// chord follow-up, and steps after it) runs once over the results of all its jobs when
    /// every one has ended. What closing did ([`Closed::Now`], [`Closed::Already`] the same
    /// way, or [`Closed::Conflict`]: closed before with other steps, nothing changed), and
    /// the follow-up's id (`G.chord`), None without steps. [`Error::NoSuchJob`] when the group
    /// has no job. With `check`, each step's task and parameters are checked against the
    /// catalog first, as an enqueue's follow-up steps are ([`Error::Invalid`] when refused).
    pub async fn close_group(
        &self,
        group: &str,
        then: Vec<Step>,
        check: bool,
    ) -> Result<(Closed, Option<String>)> {
        validate_key("group", group).map_err(Error::Invalid)?;
        if then.iter().any(|s| s.batch_size == 0) {
            return Err(Error::Invalid("a follow-up step's batch size is 0".into()));
        }
        if check {
            for step in &then {
                crate::enqueue::check(&self.store, &step.task, &step.params)
                    .await
                    .map_err(|e| match e {
                        Error::Invalid(m) => Error::Invalid(format!("follow-up step: {m}")),
                        other => other,
                    })?;
            }
        }
        let chain = (!then.is_empty()).then(|| Chain {
            root: chord_id(group),
            next: 1,
            steps: then,
        });
        match self.store.close_group(group, chain.as_ref()).await? {
            closed @ (Closed::Now | Closed::Already | Closed::Conflict) => {
                Ok((closed, chain.map(|c| c.root)))
            }
            Closed::NoSuchGroup => Err(Error::NoSuchJob(format!(
                "no job in group {group:?} in this namespace (wrong namespace, or they expired)"
            ))),
        }
    }

    /// Group `group`: its job ids (sorted) and its close and chord follow-up.
    pub async fn group(&self, group: &str) -> Result<(Vec<String>, GroupInfo)> {
        let ids = self.store.group_jobs(group).await?;
        let info = self.store.group_info(group).await?;
        Ok((ids, info))
    }
}
