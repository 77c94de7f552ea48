//! What to enqueue: a typed job spec, validated once ([`JobSpec::validate`]) by every front
//! door the same way, and the parsers that turn the text forms of its options (`30s`,
//! `100/s`, an RFC 3339 time) into it.

use std::{collections::BTreeMap, time::Duration};

use taskmill_broker::topology;
use taskmill_protocol::{
    envelope::DEFAULT_MAX_MESSAGE_BYTES,
    names::{validate_job_id, validate_key},
    now_ms,
};

use crate::error::{Error, Result};
pub use taskmill_store::chains::{Chain, Step, Trigger};

/// When a job's batches may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// This long after the enqueue (`--countdown`).
    After(Duration),
    /// At this time, ms since the epoch (`--eta`).
    At(u64),
}

/// How many batches of a job (or of a rate key) may start, across all workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The interval between two starts, in ms (at least 1).
    pub interval_ms: u64,
}

impl std::str::FromStr for Rate {
    type Err = String;
    /// `N/s`, `N/m` or `N/h`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_rate(s).map(|interval_ms| Rate { interval_ms })
    }
}

/// A job to enqueue: the task, its parameters, how its records are batched and routed, and
/// the options that steer it. The defaults are the command line's. Setters take values as
/// they come; [`JobSpec::validate`] (run by every enqueue) refuses what is out of range, in one
/// sentence naming the option.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Task name.
    pub task: String,
    /// Task parameters, as text (checked against the catalog's declared types).
    pub params: BTreeMap<String, String>,
    /// Records per batch (one message each).
    pub batch_size: usize,
    /// Work queue (short name).
    pub queue: String,
    /// The job's id; a new UUID when None.
    pub id: Option<String>,
    /// Priority, 0 (default) to 9.
    pub priority: u8,
    /// Spread the queue over at least this many shards (quorum queues whose leaders a
    /// cluster places on different nodes; 1 to 16). None: as many as the queue has already
    /// (1 for a new queue). A queue's shard count only grows.
    pub shards: Option<u16>,
    /// While a job with this key is pending or running, nothing is enqueued.
    pub unique_key: Option<String>,
    /// No batch starts before then.
    pub start: Option<Start>,
    /// Batches not started within this long from the enqueue are dropped.
    pub expires: Option<Duration>,
    /// The longest one batch may run.
    pub time_limit: Option<Duration>,
    /// At most this many batches start, across all workers.
    pub rate_limit: Option<Rate>,
    /// The key the rate limit is shared under (default: the job).
    pub rate_key: Option<String>,
    /// Check the task and parameters against the live workers' catalog.
    pub check: bool,
    /// Publisher confirms in flight at once.
    pub confirm_window: usize,
    /// Largest message; a batch encoding larger is split.
    pub max_message_bytes: usize,
    /// A partial batch goes out when no record came for this long.
    pub linger: Duration,
    /// The enqueue's lease on the job: if it dies, the job is `interrupted` this long after
    /// its last renewal.
    pub lease: Duration,
    /// Follow-up steps: when this job finishes, a job of the first step's task runs over its
    /// batch results, then the next step over that one's, and so on ([`JobSpec::then`]).
    /// `root` empty: this job starts the chain.
    pub then: Option<Chain>,
    /// The job this one follows up (set by the worker that publishes a follow-up), or
    /// `group:G` for the chord follow-up of group G.
    pub parent: Option<String>,
    /// How the job (or group) it follows up ended: its state and counters (set by the worker
    /// that publishes a follow-up; shown by `status` as the follow-up's `parent_outcome`).
    pub parent_outcome: Option<serde_json::Value>,
    /// The group the job belongs to: `producer status --group`, `wait --group` read them.
    pub group: Option<String>,
    /// When the job ends, its final status is POSTed here (http or https), with retries.
    pub on_complete: Option<String>,
}

impl JobSpec {
    /// A job of `task` with the command line's defaults: batches of 10, queue `tasks`.
    pub fn new(task: &str) -> Self {
        Self {
            task: task.into(),
            params: BTreeMap::new(),
            batch_size: 10,
            queue: topology::DEFAULT_QUEUE.into(),
            id: None,
            priority: 0,
            shards: None,
            unique_key: None,
            start: None,
            expires: None,
            time_limit: None,
            rate_limit: None,
            rate_key: None,
            check: true,
            confirm_window: 2000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            linger: Duration::from_millis(200),
            lease: Duration::from_secs(30),
            then: None,
            parent: None,
            parent_outcome: None,
            group: None,
            on_complete: None,
        }
    }

    /// Adds a follow-up step: when the job before it finishes (the trigger says how), a job
    /// of the step's task runs over that job's batch results, one record a result.
    pub fn then(mut self, step: Step) -> Self {
        match &mut self.then {
            Some(chain) => chain.steps.push(step),
            None => {
                self.then = Some(Chain {
                    root: String::new(),
                    next: 1,
                    steps: vec![step],
                })
            }
        }
        self
    }

    /// A task parameter (checked against the catalog's declared type).
    pub fn param(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        self.params.insert(key.into(), value.to_string());
        self
    }

    /// Records per batch.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Work queue (short name).
    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = queue.into();
        self
    }

    /// The job's id, instead of a new UUID (refused when a job has it already).
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Priority 0 (default) to 9.
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Spread the queue over at least `n` shards (1 to 16; counts only grow).
    pub fn shards(mut self, n: u16) -> Self {
        self.shards = Some(n);
        self
    }

    /// While a job with this key is pending or running, enqueue nothing: the handle returned
    /// is that job's.
    pub fn unique_key(mut self, key: &str) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Start no batch before this long from now.
    pub fn countdown(mut self, after: Duration) -> Self {
        self.start = Some(Start::After(after));
        self
    }

    /// Start no batch before this time (ms since the epoch).
    pub fn eta_ms(mut self, at: u64) -> Self {
        self.start = Some(Start::At(at));
        self
    }

    /// Drop the batches not started within this long from now.
    pub fn expires(mut self, within: Duration) -> Self {
        self.expires = Some(within);
        self
    }

    /// The longest one batch may run.
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }

    /// At most this many batches start, across all workers.
    pub fn rate_limit(mut self, rate: Rate) -> Self {
        self.rate_limit = Some(rate);
        self
    }

    /// Share the rate limit with every job of this key.
    pub fn rate_key(mut self, key: &str) -> Self {
        self.rate_key = Some(key.into());
        self
    }

    /// Enqueue even when no live worker declares the task or its parameters.
    pub fn no_check(mut self) -> Self {
        self.check = false;
        self
    }

    /// Publisher confirms in flight at once.
    pub fn confirm_window(mut self, n: usize) -> Self {
        self.confirm_window = n;
        self
    }

    /// Refuses what is out of range, before anything is connected: [`Error::Invalid`]
    /// saying `field: why` (the field's name in this struct, the HTTP API and Python).
    pub fn validate(&self) -> Result<()> {
        self.check()
            .map_err(|(field, why)| Error::Invalid(format!("{field}: {why}")))
    }

    /// What [`JobSpec::validate`] checks, as the field at fault and why, so that each front
    /// door can name the field its own way (the command line by its flag).
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        topology::validate_queue(&self.queue).map_err(|e| ("queue", e))?;
        if self.task.trim().is_empty() {
            return Err(("task", "must not be empty".into()));
        }
        if self.batch_size == 0 {
            return Err(("batch_size", "must be at least 1".into()));
        }
        if self.priority > 9 {
            return Err((
                "priority",
                format!("{} is out of range: 0 to 9", self.priority),
            ));
        }
        if let Some(k) = self.params.keys().find(|k| k.trim().is_empty()) {
            return Err(("params", format!("{k:?} is not a parameter name")));
        }
        check_shards(self.shards).map_err(|e| ("shards", e))?;
        if let Some(id) = &self.id {
            validate_job_id(id).map_err(|e| ("id", e))?;
        }
        for step in self.then.iter().flat_map(|c| &c.steps) {
            if step.task.trim().is_empty() {
                return Err(("then", "a follow-up step's task must not be empty".into()));
            }
            if step.batch_size == 0 {
                return Err((
                    "then",
                    format!(
                        "the batch size of follow-up {} must be at least 1",
                        step.task
                    ),
                ));
            }
            if let Some(k) = step.params.keys().find(|k| k.trim().is_empty()) {
                return Err(("then", format!("{k:?} is not a parameter name")));
            }
        }
        if let Some(key) = &self.unique_key {
            validate_key("unique key", key).map_err(|e| ("unique_key", e))?;
        }
        if let Some(g) = &self.group {
            validate_key("group", g).map_err(|e| ("group", e))?;
        }
        if let Some(url) = &self.on_complete {
            check_hook_url(url).map_err(|e| ("on_complete", e))?;
        }
        if let Some(key) = &self.rate_key {
            validate_key("rate key", key).map_err(|e| ("rate_key", e))?;
        }
        if self.time_limit.is_some_and(|t| t.as_millis() == 0) {
            return Err(("time_limit", "must be more than 0".into()));
        }
        if self.confirm_window == 0 {
            return Err(("confirm_window", "must be at least 1".into()));
        }
        if let Err(Error::Invalid(e)) = self.timing() {
            return Err(("expires", e));
        }
        Ok(())
    }

    /// The start time and expiry, in ms since the epoch.
    pub fn timing(&self) -> Result<(Option<u64>, Option<u64>)> {
        let now = now_ms();
        let eta = match self.start {
            Some(Start::After(d)) => Some(now + d.as_millis() as u64),
            Some(Start::At(t)) => Some(t),
            None => None,
        };
        let expires = self.expires.map(|d| now + d.as_millis() as u64);
        if let (Some(eta), Some(exp)) = (eta, expires) {
            if exp <= eta {
                return Err(Error::Invalid(
                    "ends before the batches may start (countdown/eta)".into(),
                ));
            }
        }
        Ok((eta, expires))
    }
}

/// Checks a shard count asked for: 1 to [`topology::MAX_SHARDS`].
pub fn check_shards(shards: Option<u16>) -> std::result::Result<(), String> {
    match shards {
        Some(n) if n == 0 || n > topology::MAX_SHARDS => Err(format!(
            "{n} is out of range: 1 to {}",
            topology::MAX_SHARDS
        )),
        _ => Ok(()),
    }
}

/// `N/s`, `N/m` or `N/h` as the interval between starts, in ms (at least 1).
pub fn parse_rate(raw: &str) -> Result<u64, String> {
    let err = || format!("{raw:?} is not a rate like 100/s, 30/m or 500/h");
    let (n, per) = raw.trim().split_once('/').ok_or_else(err)?;
    let n: f64 = n.trim().parse().map_err(|_| err())?;
    let per_ms = match per.trim() {
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return Err(err()),
    };
    if !(n > 0.0 && n.is_finite()) {
        return Err(err());
    }
    Ok(((per_ms / n).round() as u64).max(1))
}

/// `30s`, `5m`, `2h`, `1d`, `500ms`, or a number of seconds, as ms.
pub fn parse_duration(raw: &str) -> Result<u64, String> {
    let t = raw.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s, 5m, 2h, 1d or 500ms"))?;
    let ms = match unit {
        "ms" => 1.0,
        "" | "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err(format!("{raw:?}: unknown unit {unit:?} (ms, s, m, h or d)")),
    };
    Ok((n * ms).round() as u64)
}

/// Checks a completion webhook's URL: http or https, with a host.
pub fn check_hook_url(raw: &str) -> std::result::Result<(), String> {
    let rest = raw
        .strip_prefix("http://")
        .or_else(|| raw.strip_prefix("https://"))
        .ok_or_else(|| format!("{raw:?} is not an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || raw.chars().any(char::is_whitespace) {
        return Err(format!("{raw:?} is not a URL with a host"));
    }
    Ok(())
}

/// An RFC 3339 time (`2026-12-01T08:00:00Z`, `…+01:00`, with optional fractions) as ms since
/// the epoch.
pub fn parse_rfc3339(raw: &str) -> Result<u64, String> {
    let err = || format!("{raw:?} is not an RFC 3339 time like 2026-12-01T08:00:00Z");
    let t = raw.trim();
    let (date, rest) = t.split_once(['T', 't', ' ']).ok_or_else(err)?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>());
    let (Some(Ok(y)), Some(Ok(mo)), Some(Ok(day))) = (d.next(), d.next(), d.next()) else {
        return Err(err());
    };
    let zone_at = rest.find(['Z', 'z', '+', '-']).ok_or_else(err)?;
    let (clock, zone) = rest.split_at(zone_at);
    let mut c = clock.splitn(3, ':');
    let (Some(Ok(h)), Some(Ok(mi)), Some(Ok(sec))) = (
        c.next().map(str::parse::<i64>),
        c.next().map(str::parse::<i64>),
        c.next().map(str::parse::<f64>),
    ) else {
        return Err(err());
    };
    let offset_min = match zone {
        "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (oh, om) = z[1..].split_once(':').ok_or_else(err)?;
            sign * (oh.parse::<i64>().map_err(|_| err())? * 60
                + om.parse::<i64>().map_err(|_| err())?)
        }
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec >= 61.0 {
        return Err(err());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 - offset_min * 60;
    let ms = secs as f64 * 1000.0 + sec * 1000.0;
    if ms < 0.0 {
        return Err(err());
    }
    Ok(ms.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_rates_and_times() {
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("1.5m"), Ok(90_000));
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("2"), Ok(2_000));
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Ok(1_000));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.250+01:00"),
            Ok(1_700_000_000_250)
        );
        assert!(parse_rfc3339("2023-13-01T00:00:00Z").is_err());
        assert!(parse_rfc3339("tomorrow").is_err());
        assert_eq!(parse_rate("20/s"), Ok(50));
        assert_eq!(parse_rate("30/m"), Ok(2_000));
        assert!(parse_rate("fast").is_err() && parse_rate("0/s").is_err());
    }
}
