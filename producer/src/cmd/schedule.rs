//! Periodic jobs: `producer schedule add|list|show|remove|pause|resume` keeps schedules in
//! Redis, `producer scheduler` runs them.
//!
//! A schedule is a period (`--every 30s`, aligned on the epoch, so every scheduler agrees on
//! the ticks) or a five-field cron expression (UTC), and the enqueue options of each tick's
//! job. Each tick enqueues the job `sched-NAME-SECONDS` (the tick's Unix time): several
//! schedulers may run at once, on different machines, and a tick two of them reach is
//! enqueued once, because the job registration refuses an id that exists. The schedule's
//! `next_ms` moves from a tick only by compare-and-set, so no tick is skipped or run twice by
//! a scheduler that lags behind another. Correctness needs no lock and no leader.

use std::{process::ExitCode, time::Duration};

use clap::{Args, Subcommand};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use taskmill_common::{config::ConnArgs, now_ms, store::Store};

use crate::{
    error::{usage, CliError},
    schedules::{self, rfc3339, tick_job, view, Added, NewSchedule, Paused, Schedule, GRACE_MS},
};

/// Ticks enqueued for a schedule in one pass at most.
const MAX_TICKS_A_PASS: usize = 100;

/// Arguments of `schedule`.
#[derive(Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ScheduleAction,
}

/// What `schedule` does.
#[derive(Subcommand, Debug, Clone)]
pub enum ScheduleAction {
    /// Add a schedule: `schedule add nightly --cron "0 3 * * *" -- --file posts.jsonl`.
    Add(AddArgs),
    /// List the schedules: period, next tick, last job, state.
    List {
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one schedule.
    Show {
        /// The schedule.
        name: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule (its jobs stay).
    Remove {
        /// The schedule.
        name: String,
    },
    /// Pause a schedule: no tick runs until it is resumed.
    Pause {
        /// The schedule.
        name: String,
    },
    /// Resume a paused schedule from its next tick (the ticks of the pause are not run).
    Resume {
        /// The schedule.
        name: String,
    },
}

/// Arguments of `schedule add`.
#[derive(Args, Debug, Clone)]
pub struct AddArgs {
    /// The schedule's name (letters, digits, `-`, `_`; at most 64).
    pub name: String,
    /// Run every this long (`30s`, `5m`, `1h`; at least 1 s), on multiples of it since the
    /// Unix epoch.
    #[arg(long, value_name = "DURATION", required_unless_present = "cron")]
    pub every: Option<String>,
    /// Run at the times of this cron expression (five fields, UTC unless --timezone):
    /// `*/5 * * * *`.
    #[arg(long, value_name = "EXPR", conflicts_with = "every")]
    pub cron: Option<String>,
    /// The IANA time zone of --cron's times (`Europe/Paris`): wall-clock times, across DST
    /// changes (a time skipped runs at the first after the gap, a time repeated runs once).
    #[arg(long, value_name = "ZONE", requires = "cron")]
    pub timezone: Option<String>,
    /// Ticks more than a minute late (every scheduler was down): `skip` them, or
    /// `catch-up:N` to run the last N of them.
    #[arg(long, default_value = "skip", value_name = "skip|catch-up:N")]
    pub missed: String,
    /// The options of `producer enqueue` for each tick's job, after `--`.
    #[arg(last = true, required = true, value_name = "ENQUEUE OPTIONS")]
    pub enqueue: Vec<String>,
}

/// The command `schedule`.
pub async fn run(conn: &ConnArgs, args: &ScheduleArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let missing = |name: &str| -> anyhow::Error {
        CliError::NoSuchJob(format!(
            "no schedule {name:?} in namespace {}",
            conn.namespace
        ))
        .into()
    };
    match &args.action {
        ScheduleAction::Add(a) => {
            let new = NewSchedule {
                name: a.name.clone(),
                every: a.every.clone(),
                cron: a.cron.clone(),
                timezone: a.timezone.clone(),
                missed: a.missed.clone(),
                enqueue: a.enqueue.clone(),
            };
            let (schedule, next) = match schedules::add(&store, &new).await? {
                Added::Yes(schedule, next) => (schedule, next),
                Added::Invalid(why) => return Err(usage(why)),
                Added::Exists => {
                    return Err(usage(format!(
                        "schedule {:?} exists: remove it first, or choose another name",
                        a.name
                    )))
                }
            };
            crate::out::line(&a.name);
            eprintln!(
                "producer: schedule {} added ({}), first tick {}; `producer scheduler` runs it",
                a.name,
                schedule.period(),
                schedule.local_time(next).unwrap_or_else(|| rfc3339(next))
            );
        }
        ScheduleAction::List { json } => {
            let mut all = Vec::new();
            for name in store.schedule_names().await? {
                if let Some(v) = view(&store, &name).await? {
                    all.push(v);
                }
            }
            if *json {
                crate::out::line(&Value::from(all).to_string());
            } else {
                print_table(&all);
            }
        }
        ScheduleAction::Show { name, json } => {
            let v = view(&store, name).await?.ok_or_else(|| missing(name))?;
            if *json {
                crate::out::line(&v.to_string());
            } else {
                for (k, val) in v.as_object().into_iter().flatten() {
                    crate::out::line(&format!("{k}: {}", plain(val)));
                }
            }
        }
        ScheduleAction::Remove { name } => {
            if !store.remove_schedule(name).await? {
                return Err(missing(name));
            }
            eprintln!("producer: schedule {name} removed (its jobs stay)");
        }
        ScheduleAction::Pause { name } | ScheduleAction::Resume { name } => {
            let pause = matches!(args.action, ScheduleAction::Pause { .. });
            match schedules::set_paused(&store, name, pause).await? {
                Paused::Done => {}
                Paused::NoSuch => return Err(missing(name)),
                Paused::Unreadable(why) => return Err(usage(why)),
            }
            eprintln!(
                "producer: schedule {name} {}",
                if pause { "paused" } else { "resumed" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn print_table(all: &[Value]) {
    let rows: Vec<[String; 6]> = all
        .iter()
        .map(|v| {
            [
                plain(&v["name"]),
                plain(&v["period"]),
                if v["paused"] == true {
                    "paused".into()
                } else {
                    "active".into()
                },
                if v["next_local"].is_string() {
                    plain(&v["next_local"])
                } else {
                    plain(&v["next"])
                },
                plain(&v["last_job"]),
                plain(&v["last_error"]),
            ]
        })
        .collect();
    let head = ["NAME", "PERIOD", "STATE", "NEXT", "LAST JOB", "LAST ERROR"];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        crate::out::line(s.trim_end());
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]);
    }
}

/// Arguments of `scheduler`.
#[derive(Args, Debug, Clone)]
pub struct SchedulerArgs {}

/// The command `scheduler`: runs the namespace's schedules until SIGINT or SIGTERM.
pub async fn run_scheduler(conn: &ConnArgs, _args: &SchedulerArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            crate::cmd::signalled().await;
            stop.cancel();
        }
    });
    info!(namespace = %conn.namespace, "scheduler started");
    while !stop.is_cancelled() {
        let wake = pass(&store, conn).await;
        let pause = Duration::from_millis(wake.saturating_sub(now_ms()).clamp(20, 1000));
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => {}
        }
    }
    info!("scheduler stopped");
    Ok(ExitCode::SUCCESS)
}

/// One look at every schedule, enqueueing the ticks that are due; when the next is due.
async fn pass(store: &Store, conn: &ConnArgs) -> u64 {
    let mut wake = now_ms() + 1000;
    let names = match store.schedule_names().await {
        Ok(n) => n,
        Err(e) => {
            warn!("reading the schedules: {e}");
            return wake;
        }
    };
    for name in names {
        match run_due(store, conn, &name).await {
            Ok(Some(next)) => wake = wake.min(next),
            Ok(None) => {}
            Err(e) => {
                warn!(schedule = %name, "{e}");
                let _ = store.schedule_error(&name, &e).await;
            }
        }
    }
    wake
}

/// Enqueues schedule `name`'s due ticks (in order; a tick more than [`GRACE_MS`] late only
/// within `catch-up:N`), moving its `next_ms` past each; its next tick, None when paused or
/// gone. Err (the tick is tried again at the next pass) when a tick could not be enqueued.
async fn run_due(store: &Store, conn: &ConnArgs, name: &str) -> Result<Option<u64>, String> {
    for _ in 0..MAX_TICKS_A_PASS {
        let Some(fields) = store.schedule(name).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        if fields.get("paused").is_some_and(|p| p == "1") {
            return Ok(None);
        }
        let schedule: Schedule = serde_json::from_str(&fields["spec"])
            .map_err(|e| format!("the schedule's spec is not readable: {e}"))?;
        let now = now_ms();
        let seen = fields.get("next_ms");
        let Some(tick) = seen.and_then(|n| n.parse::<u64>().ok()) else {
            // Added by a client (or resumed, or edited by hand): checked here as `schedule
            // add` checks it, then its first tick set (or it is paused, saying why).
            adopt(store, name, &schedule, seen.map(String::as_str)).await?;
            continue;
        };
        if tick > now {
            return Ok(Some(tick));
        }
        let mut following = schedule.next_after(tick)?;
        // Under catch-up:N, a late tick runs when fewer than N later ticks are late too.
        let late = now - tick > GRACE_MS && {
            let keep = schedule.catch_up()?;
            let mut later_late = 0;
            let mut t = following;
            while t + GRACE_MS < now && later_late < keep {
                later_late += 1;
                t = schedule.next_after(t)?;
            }
            later_late >= keep
        };
        if late && schedule.catch_up()? == 0 {
            // Every late tick is skipped: on to the first within the grace, at once.
            following = following.max(schedule.next_after(now - GRACE_MS)?);
        }
        let (job, note) = if late {
            (
                String::new(),
                "skipped: more than a minute late".to_string(),
            )
        } else {
            let job = tick_job(name, tick);
            (job.clone(), enqueue_tick(conn, &schedule, &job).await?)
        };
        if !job.is_empty() {
            info!(schedule = %name, job = %job, "{note}");
        }
        store
            .advance_schedule(name, tick, following, &job, if late { &note } else { "" })
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(Some(now_ms()))
}

/// Checks schedule `name` as `schedule add` would and sets its first tick; one that fails the
/// check is paused, with `refused by the scheduler: WHY` as its last error.
async fn adopt(
    store: &Store,
    name: &str,
    schedule: &Schedule,
    seen: Option<&str>,
) -> Result<(), String> {
    let new = NewSchedule {
        name: name.to_string(),
        every: schedule.every_ms.map(|ms| format!("{ms}ms")),
        cron: schedule.cron.clone(),
        timezone: schedule.timezone.clone(),
        missed: schedule.missed.clone(),
        enqueue: schedule.enqueue.clone(),
    };
    let (next, refused) = match new.checked().and_then(|s| s.next_after(now_ms())) {
        Ok(next) => (next, None),
        Err(why) => (0, Some(format!("refused by the scheduler: {why}"))),
    };
    if let Some(why) = &refused {
        warn!(schedule = %name, "{why}; paused");
    }
    store
        .adopt_schedule(name, seen, next, refused.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Enqueues one tick's job; what became of it (enqueued, or enqueued already by another
/// scheduler, or its unique key held). Err when it could not be enqueued.
async fn enqueue_tick(conn: &ConnArgs, schedule: &Schedule, job: &str) -> Result<String, String> {
    let args = schedule.enqueue_args(job)?;
    match crate::cmd::enqueue::enqueue(conn, &args, |_| {}).await {
        Ok(report) => Ok(match report.duplicate_of {
            Some(holder) => format!("not enqueued: job {holder} holds the unique key"),
            None => format!("enqueued {} batches", report.batches),
        }),
        Err(e) => {
            let exists = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<taskmill_client::Error>(),
                    Some(taskmill_client::Error::JobExists(_))
                )
            });
            if exists {
                Ok("enqueued by another scheduler".into())
            } else {
                Err(format!("enqueueing {job}: {e:#}"))
            }
        }
    }
}
