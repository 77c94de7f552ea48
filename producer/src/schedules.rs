//! Periodic schedules as stored in Redis and shown by the command line and the dashboard: the
//! spec (a period or a cron expression, the missed-tick policy, the enqueue options), the tick
//! arithmetic, each tick's job id, and the view of one schedule. `producer schedule` and
//! `producer scheduler` (`cmd/schedule.rs`) write and run them.

use std::str::FromStr;

use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use taskmill_common::store::Store;

use crate::cmd::enqueue::EnqueueArgs;

/// How late a tick may be and still run under `--missed skip` (a scheduler that was busy or
/// restarting); older ticks were missed while every scheduler was down.
pub const GRACE_MS: u64 = 60_000;
/// A schedule as stored (`spec` of its hash).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Schedule {
    /// The period in ms, or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// a cron expression (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// `skip` or `catch-up:N`.
    pub missed: String,
    /// The enqueue options.
    pub enqueue: Vec<String>,
}

/// `producer enqueue`'s flags alone, to parse a schedule's options.
#[derive(Parser, Debug)]
#[command(name = "enqueue")]
struct EnqueueOptions {
    #[command(flatten)]
    args: EnqueueArgs,
}

impl Schedule {
    /// The first tick after `t_ms`.
    pub fn next_after(&self, t_ms: u64) -> Result<u64, String> {
        if let Some(every) = self.every_ms {
            return Ok((t_ms / every + 1) * every);
        }
        let expr = self.cron.as_deref().unwrap_or_default();
        let cron = croner::Cron::from_str(expr)
            .map_err(|e| format!("--cron {expr:?} is not a cron expression: {e}"))?;
        let start = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(t_ms as i64)
            .ok_or_else(|| format!("{t_ms} ms is not a time"))?;
        let next = cron
            .find_next_occurrence(&start, false)
            .map_err(|e| format!("--cron {expr:?} has no next time: {e}"))?;
        Ok(next.timestamp_millis().max(0) as u64)
    }

    /// How many missed ticks to run (`catch-up:N`), 0 for `skip`.
    pub fn catch_up(&self) -> Result<usize, String> {
        match self.missed.as_str() {
            "skip" => Ok(0),
            m => m
                .strip_prefix("catch-up:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("--missed {m:?}: use skip or catch-up:N")),
        }
    }

    /// The enqueue options of tick job `job`.
    pub fn enqueue_args(&self, job: &str) -> Result<EnqueueArgs, String> {
        let argv = std::iter::once("enqueue".to_string())
            .chain(self.enqueue.iter().cloned())
            .chain(["--job".to_string(), job.to_string()]);
        EnqueueOptions::try_parse_from(argv)
            .map(|o| o.args)
            .map_err(|e| {
                format!(
                    "the enqueue options {:?}: {}",
                    self.enqueue,
                    e.to_string().lines().next().unwrap_or_default()
                )
            })
    }

    /// `every 30s` or `cron EXPR`.
    pub fn period(&self) -> String {
        match (&self.every_ms, &self.cron) {
            (Some(ms), _) => format!("every {}", human_ms(*ms)),
            (_, Some(c)) => format!("cron {c}"),
            _ => "?".into(),
        }
    }
}

fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// The job id of schedule `name`'s tick at `tick_ms`.
pub fn tick_job(name: &str, tick_ms: u64) -> String {
    format!("sched-{name}-{}", tick_ms / 1000)
}

/// A time (ms since the epoch) as RFC 3339, to the second, UTC.
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// A schedule as `list` and `show` print it.
pub async fn view(store: &Store, name: &str) -> anyhow::Result<Option<Value>> {
    let Some(fields) = store.schedule(name).await? else {
        return Ok(None);
    };
    let schedule: Option<Schedule> = serde_json::from_str(&fields["spec"]).ok();
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    let text = |k: &str| {
        fields
            .get(k)
            .filter(|v| !v.is_empty())
            .map_or(Value::Null, |v| Value::from(v.as_str()))
    };
    Ok(Some(json!({
        "name": name,
        "period": schedule.as_ref().map_or("unreadable".into(), Schedule::period),
        "every_ms": schedule.as_ref().and_then(|s| s.every_ms),
        "cron": schedule.as_ref().and_then(|s| s.cron.clone()),
        "missed": schedule.as_ref().map(|s| s.missed.clone()),
        "enqueue": schedule.as_ref().map(|s| s.enqueue.clone()),
        "paused": fields.get("paused").is_some_and(|p| p == "1"),
        "next_ms": num("next_ms"),
        "next": num("next_ms").map(rfc3339),
        "last_tick_ms": num("last_tick_ms"),
        "last_job": text("last_job"),
        "last_error": text("last_error"),
    })))
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    fn every(ms: u64) -> Schedule {
        Schedule {
            every_ms: Some(ms),
            cron: None,
            missed: "skip".into(),
            enqueue: vec!["--file".into(), "x".into()],
        }
    }

    #[test]
    fn ticks_are_multiples_of_the_period_or_the_cron_times() {
        assert_eq!(every(1000).next_after(1_500), Ok(2_000));
        assert_eq!(every(1000).next_after(2_000), Ok(3_000));
        assert_eq!(every(60_000).next_after(59_999), Ok(60_000));
        let cron = Schedule {
            every_ms: None,
            cron: Some("*/5 * * * *".into()),
            ..every(1)
        };
        // 2026-12-07T08:03:00Z → 08:05:00Z.
        assert_eq!(cron.next_after(1_796_630_580_000), Ok(1_796_630_700_000));
        let bad = Schedule {
            cron: Some("61 * * * *".into()),
            ..cron
        };
        assert!(bad.next_after(0).is_err());
    }

    #[test]
    fn missed_ticks_are_skipped_or_caught_up() {
        assert_eq!(every(1000).catch_up(), Ok(0));
        let s = Schedule {
            missed: "catch-up:3".into(),
            ..every(1000)
        };
        assert_eq!(s.catch_up(), Ok(3));
        let s = Schedule {
            missed: "later".into(),
            ..every(1000)
        };
        assert!(s.catch_up().is_err());
    }

    #[test]
    fn a_tick_s_job_takes_the_schedule_s_enqueue_options() {
        let a = every(1000)
            .enqueue_args("sched-x-1")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.job.as_deref(), Some("sched-x-1"));
        assert_eq!(a.files, vec![std::path::PathBuf::from("x")]);
    }
}
