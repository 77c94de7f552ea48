//! Periodic schedules as stored in Redis and shown by the command line and the dashboard: the
//! spec (a period or a cron expression, the missed-tick policy, the enqueue options), the tick
//! arithmetic, each tick's job id, and the view of one schedule. `producer schedule` and
//! `producer scheduler` (`cmd/schedule.rs`) write and run them.

use std::str::FromStr;

use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use taskmill_client::spec::parse_duration;
use taskmill_common::{config::validate_name, now_ms, store::Store};

use crate::cmd::enqueue::EnqueueArgs;

/// The longest schedule name: its ticks' job ids (`sched-NAME-SECONDS`) stay within the 100
/// characters of a job id.
const MAX_NAME: usize = 64;
/// The shortest period.
const MIN_EVERY_MS: u64 = 1000;
/// How late a tick may be and still run under `--missed skip` (a scheduler that was busy or
/// restarting); older ticks were missed while every scheduler was down.
pub const GRACE_MS: u64 = 60_000;
/// A schedule as stored (`spec` of its hash).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Schedule {
    /// The period in ms, or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// a cron expression (in `timezone`, UTC without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The IANA time zone the cron expression's times are in (`Europe/Paris`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// `skip` or `catch-up:N`.
    pub missed: String,
    /// The enqueue options.
    pub enqueue: Vec<String>,
}

/// An IANA time zone by name (`Europe/Paris`, `America/New_York`, `UTC`).
fn time_zone(name: &str) -> Result<chrono_tz::Tz, String> {
    name.parse::<chrono_tz::Tz>().map_err(|_| {
        format!("--timezone {name:?} is not an IANA time zone name (such as Europe/Paris or UTC)")
    })
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
        let tz = time_zone(self.timezone.as_deref().unwrap_or("UTC"))?;
        // Cron times are wall-clock times of the zone: across a DST change, a time that does
        // not exist runs at the first one after the gap, a time that exists twice runs once.
        let next = cron
            .find_next_occurrence(&start.with_timezone(&tz), false)
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
        use clap::{CommandFactory as _, FromArgMatches as _};
        EnqueueOptions::command()
            .try_get_matches_from(argv)
            .and_then(|m| {
                let mut o = EnqueueOptions::from_arg_matches(&m)?;
                o.args.follow.then_at = crate::cmd::enqueue::ThenAt::from_matches(&m);
                Ok(o.args)
            })
            .map_err(|e| {
                format!(
                    "the enqueue options {:?}: {}",
                    self.enqueue,
                    e.to_string().lines().next().unwrap_or_default()
                )
            })
    }

    /// `ms` as an RFC 3339 time in the schedule's time zone (None without one).
    pub fn local_time(&self, ms: u64) -> Option<String> {
        let tz = time_zone(self.timezone.as_deref()?).ok()?;
        let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms as i64)?;
        Some(
            t.with_timezone(&tz)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    }

    /// `every 30s` or `cron EXPR`.
    pub fn period(&self) -> String {
        match (&self.every_ms, &self.cron) {
            (Some(ms), _) => format!("every {}", human_ms(*ms)),
            (_, Some(c)) => match &self.timezone {
                Some(tz) => format!("cron {c} ({tz})"),
                None => format!("cron {c}"),
            },
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

/// A schedule to add, as `producer schedule add` and `POST /api/schedules` take it.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct NewSchedule {
    /// Its name (letters, digits, `-`, `_`; at most 64).
    pub name: String,
    /// A period (`30s`, `5m`), or
    #[serde(default)]
    pub every: Option<String>,
    /// a five-field cron expression (UTC, or in `timezone`).
    #[serde(default)]
    pub cron: Option<String>,
    /// The IANA time zone of the cron expression (`Europe/Paris`).
    #[serde(default)]
    pub timezone: Option<String>,
    /// `skip` (the default) or `catch-up:N`.
    #[serde(default = "skip")]
    pub missed: String,
    /// The options of `producer enqueue` for each tick's job.
    pub enqueue: Vec<String>,
}

fn skip() -> String {
    "skip".into()
}

impl NewSchedule {
    /// Checks everything a tick needs (name, period, policy, enqueue options as `enqueue`
    /// would check them, nothing a tick cannot do again); the schedule to store, or why not.
    pub fn checked(&self) -> Result<Schedule, String> {
        validate_name("schedule", &self.name)?;
        if self.name.len() > MAX_NAME {
            return Err(format!(
                "schedule name {:?} is longer than {MAX_NAME} characters",
                self.name
            ));
        }
        let every_ms = match (&self.every, &self.cron) {
            (Some(_), Some(_)) => return Err("give --every or --cron, not both".into()),
            (None, None) => return Err("give --every DURATION or --cron EXPR".into()),
            (Some(raw), None) => {
                let ms = parse_duration(raw).map_err(|e| format!("--every {e}"))?;
                if ms < MIN_EVERY_MS {
                    return Err(format!("--every {raw}: at least 1s"));
                }
                Some(ms)
            }
            (None, Some(_)) => None,
        };
        if let Some(tz) = &self.timezone {
            if self.cron.is_none() {
                return Err(
                    "--timezone goes with --cron (an --every period has no time zone)".into(),
                );
            }
            time_zone(tz)?;
        }
        let schedule = Schedule {
            every_ms,
            cron: self.cron.clone(),
            timezone: self.timezone.clone(),
            missed: self.missed.clone(),
            enqueue: self.enqueue.clone(),
        };
        schedule.catch_up()?;
        schedule.next_after(now_ms())?;
        taskmill_client::schedules::check_enqueue_options(&self.name, &self.enqueue)?;
        let parsed = schedule.enqueue_args(&tick_job(&self.name, 0))?;
        if parsed.files.iter().any(|f| f.as_os_str() == "-") {
            return Err(
                "--file - (stdin) cannot be read at each tick: name a file or a URL".into(),
            );
        }
        parsed.spec().map_err(|e| format!("{e:#}"))?;
        Ok(schedule)
    }
}

/// What adding a schedule came to.
pub enum Added {
    /// Stored, with its first tick.
    Yes(Schedule, u64),
    /// Refused, saying why.
    Invalid(String),
    /// One of that name exists.
    Exists,
}

/// Checks and stores a new schedule.
pub async fn add(store: &Store, new: &NewSchedule) -> anyhow::Result<Added> {
    let schedule = match new.checked() {
        Ok(s) => s,
        Err(why) => return Ok(Added::Invalid(why)),
    };
    let next = match schedule.next_after(now_ms()) {
        Ok(n) => n,
        Err(why) => return Ok(Added::Invalid(why)),
    };
    if !store
        .add_schedule(&new.name, &serde_json::to_string(&schedule)?, Some(next))
        .await?
    {
        return Ok(Added::Exists);
    }
    Ok(Added::Yes(schedule, next))
}

/// What pausing or resuming came to.
pub enum Paused {
    /// Done.
    Done,
    /// No such schedule.
    NoSuch,
    /// Its spec cannot be read (edited by hand): it can be paused and removed, not resumed.
    Unreadable(String),
}

/// Pauses or resumes schedule `name` (resumed from its next tick).
pub async fn set_paused(store: &Store, name: &str, pause: bool) -> anyhow::Result<Paused> {
    let Some(fields) = store.schedule(name).await? else {
        return Ok(Paused::NoSuch);
    };
    let next = match serde_json::from_str::<Schedule>(&fields["spec"]) {
        Ok(schedule) => match schedule.next_after(now_ms()) {
            Ok(n) => n,
            Err(why) => return Ok(Paused::Unreadable(why)),
        },
        Err(_) if pause => 0,
        Err(e) => {
            return Ok(Paused::Unreadable(format!(
                "schedule {name}'s spec is not readable ({e}): remove it and add it again"
            )))
        }
    };
    Ok(if store.pause_schedule(name, pause, Some(next)).await? {
        Paused::Done
    } else {
        Paused::NoSuch
    })
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
    let Some(info) = taskmill_client::ScheduleInfo::read(store, name).await? else {
        return Ok(None);
    };
    let schedule: Option<Schedule> = info
        .spec
        .clone()
        .and_then(|s| serde_json::from_value(s).ok());
    Ok(Some(json!({
        "name": name,
        "period": schedule.as_ref().map_or("unreadable".into(), Schedule::period),
        "every_ms": schedule.as_ref().and_then(|s| s.every_ms),
        "cron": schedule.as_ref().and_then(|s| s.cron.clone()),
        "timezone": schedule.as_ref().and_then(|s| s.timezone.clone()),
        "next_local": schedule
            .as_ref()
            .zip(info.next_ms)
            .and_then(|(s, ms)| s.local_time(ms)),
        "missed": schedule.as_ref().map(|s| s.missed.clone()),
        "enqueue": schedule.as_ref().map(|s| s.enqueue.clone()),
        "paused": info.paused,
        "next_ms": info.next_ms,
        "next": info.next_ms.map(rfc3339),
        "last_tick_ms": info.last_tick_ms,
        "last_job": info.last_job,
        "last_error": info.last_error,
    })))
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    fn every(ms: u64) -> Schedule {
        Schedule {
            every_ms: Some(ms),
            cron: None,
            timezone: None,
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
    fn cron_times_are_wall_clock_times_of_the_time_zone() {
        let at = |cron: &str, tz: Option<&str>| Schedule {
            every_ms: None,
            cron: Some(cron.into()),
            timezone: tz.map(Into::into),
            ..every(1)
        };
        let ms = |rfc: &str| {
            chrono::DateTime::parse_from_rfc3339(rfc)
                .unwrap_or_else(|e| panic!("{rfc}: {e}"))
                .timestamp_millis() as u64
        };
        let three = at("0 3 * * *", Some("Europe/Paris"));
        // 03:00 in Paris is 02:00 UTC in winter (CET) and 01:00 UTC in summer (CEST).
        assert_eq!(
            three.next_after(ms("2026-12-07T00:00:00Z")),
            Ok(ms("2026-12-07T02:00:00Z"))
        );
        assert_eq!(
            three.next_after(ms("2026-07-01T00:00:00Z")),
            Ok(ms("2026-07-01T01:00:00Z"))
        );
        // 02:30 does not exist in Paris on 2026-03-29 (02:00 → 03:00): it runs at 03:00 CEST.
        let gap = at("30 2 * * *", Some("Europe/Paris"));
        assert_eq!(
            gap.next_after(ms("2026-03-28T12:00:00Z")),
            Ok(ms("2026-03-29T01:00:00Z"))
        );
        // 02:30 exists twice on 2026-10-25 (03:00 → 02:00): it runs once, at the first.
        let twice = at("30 2 * * *", Some("Europe/Paris"));
        let first = twice.next_after(ms("2026-10-24T12:00:00Z"));
        assert_eq!(first, Ok(ms("2026-10-25T00:30:00Z")));
        assert_eq!(
            twice.next_after(ms("2026-10-25T00:30:00Z")),
            Ok(ms("2026-10-26T01:30:00Z"))
        );
        assert_eq!(three.period(), "cron 0 3 * * * (Europe/Paris)");
        assert!(at("0 3 * * *", Some("Mars/Olympus")).next_after(0).is_err());
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
