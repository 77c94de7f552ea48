//! `producer enqueue`: read records from URLs, files and stdin, batch them, publish them.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use taskmill_common::{
    config::{validate_job_id, validate_name, ConnArgs},
    envelope::{
        bounded, Record, DEFAULT_MAX_MESSAGE_BYTES, HEADER_ETA, HEADER_EXPIRES,
        HEADER_RATE_INTERVAL, HEADER_RATE_KEY, HEADER_TIME_LIMIT,
    },
    now_ms,
    store::{NewJob, PublishTotals, Registered, Store, StoreError},
    topology::{self, Names},
};

use crate::{
    batcher::{Batcher, Prepared},
    error::CliError,
    publisher::Publisher,
    sources::{self, HttpOptions, ProblemLog, Problems, DEFAULT_MAX_RECORD_BYTES},
};

/// Arguments of `enqueue`.
#[derive(Args, Debug, Clone)]
pub struct EnqueueArgs {
    /// Fetch records from this URL (repeatable). A response holds one JSON object or an array.
    #[arg(long = "url", help_heading = "Sources")]
    pub urls: Vec<String>,
    /// URL with `{id}` in it, fetched once for each number of `--ids`.
    #[arg(long, requires = "ids", help_heading = "Sources")]
    pub url_template: Option<String>,
    /// Range of ids for `--url-template`, like `1-10000` (inclusive).
    #[arg(long, requires = "url_template", help_heading = "Sources")]
    pub ids: Option<String>,
    /// Read records from a file: JSON Lines, a JSON array, or one JSON document; `-` for stdin.
    #[arg(long = "file", help_heading = "Sources")]
    pub files: Vec<PathBuf>,
    /// Task to run on each batch.
    #[arg(long, env = "TASKMILL_TASK", default_value = "post-stats")]
    pub task: String,
    /// Task parameter (repeatable).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Records per batch (one message each).
    #[arg(long, env = "TASKMILL_BATCH_SIZE", default_value_t = 10)]
    pub batch_size: usize,
    /// Work queue (short name).
    #[arg(long, env = "TASKMILL_QUEUE", default_value = topology::DEFAULT_QUEUE)]
    pub queue: String,
    /// Job id (default: a new UUID).
    #[arg(long)]
    pub job: Option<String>,
    /// Start no batch before this long from now: `30s`, `5m`, `2h`, `1d`, `500ms`.
    #[arg(
        long,
        value_name = "DURATION",
        conflicts_with = "eta",
        help_heading = "Timing"
    )]
    pub countdown: Option<String>,
    /// Start no batch before this time (RFC 3339, like `2026-12-01T08:00:00Z`).
    #[arg(long, value_name = "TIME", help_heading = "Timing")]
    pub eta: Option<String>,
    /// Drop the batches not started within this long from now (counted `batches_expired`).
    #[arg(long, value_name = "DURATION", help_heading = "Timing")]
    pub expires: Option<String>,
    /// Enqueue even when the live workers do not know the task or its parameters (a worker
    /// not deployed yet).
    #[arg(long)]
    pub no_check: bool,
    /// Priority, 0 (default) to 9: a higher band's batches overtake a backlog of lower ones.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: u8,
    /// At most this many batches start, across all workers: `100/s`, `30/m`, `500/h`.
    #[arg(long, value_name = "N/s", help_heading = "Timing")]
    pub rate_limit: Option<String>,
    /// Jobs with the same rate key share one rate budget (default: the job's own).
    #[arg(
        long,
        value_name = "KEY",
        requires = "rate_limit",
        help_heading = "Timing"
    )]
    pub rate_key: Option<String>,
    /// The longest one batch may run; longer counts as a transient failure (`time_limit`).
    #[arg(long, value_name = "DURATION", help_heading = "Timing")]
    pub time_limit: Option<String>,
    /// While a job with this key is pending or running, enqueue nothing and print that job's
    /// id instead (race-free across producers).
    #[arg(long, value_name = "KEY")]
    pub unique_key: Option<String>,
    /// A partial batch goes out when no record came for this many ms (a slow stdin).
    #[arg(long, env = "TASKMILL_LINGER_MS", default_value_t = 200)]
    pub linger_ms: u64,
    /// The producer's lease on the job while it publishes, in seconds: if the producer dies
    /// (kill -9), the job becomes `interrupted` this long after its last renewal.
    #[arg(long, env = "TASKMILL_LEASE_SECONDS", default_value_t = 30)]
    pub lease_seconds: u64,
    /// HTTP requests in flight at once.
    #[arg(
        long,
        env = "TASKMILL_CONCURRENCY",
        default_value_t = 32,
        help_heading = "Sources"
    )]
    pub concurrency: usize,
    /// Retries of a URL after connection errors, timeouts, 429 and 5xx.
    #[arg(
        long,
        env = "TASKMILL_HTTP_RETRIES",
        default_value_t = 3,
        help_heading = "Sources"
    )]
    pub http_retries: u32,
    /// Timeout of one HTTP request, in seconds.
    #[arg(
        long,
        env = "TASKMILL_HTTP_TIMEOUT",
        default_value_t = 30,
        help_heading = "Sources"
    )]
    pub http_timeout: u64,
    /// A record, line or document larger than this (bytes) is skipped and reported.
    #[arg(long, env = "TASKMILL_MAX_RECORD_BYTES", default_value_t = DEFAULT_MAX_RECORD_BYTES, help_heading = "Sources")]
    pub max_record_bytes: usize,
    /// Publisher confirms in flight at once.
    #[arg(long, env = "TASKMILL_CONFIRM_WINDOW", default_value_t = 2000)]
    pub confirm_window: usize,
    /// Largest message body; larger batches are split, a larger single record is skipped.
    #[arg(long, env = "TASKMILL_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Follow the job until it finishes (progress bar on a terminal) and exit like `wait`.
    #[arg(long, help_heading = "Output")]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit 3).
    #[arg(long, help_heading = "Output")]
    pub timeout: Option<f64>,
    /// Print one JSON object (the enqueue report) instead of the job id, and with --wait a
    /// second one, the final status.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
}

impl EnqueueArgs {
    /// Arguments with the defaults of the command line and no sources.
    pub fn new(task: &str) -> Self {
        Self {
            urls: Vec::new(),
            url_template: None,
            ids: None,
            files: Vec::new(),
            task: task.into(),
            params: Vec::new(),
            batch_size: 10,
            queue: topology::DEFAULT_QUEUE.into(),
            job: None,
            unique_key: None,
            countdown: None,
            eta: None,
            expires: None,
            time_limit: None,
            rate_limit: None,
            rate_key: None,
            priority: 0,
            no_check: false,
            linger_ms: 200,
            lease_seconds: 30,
            concurrency: 32,
            http_retries: 3,
            http_timeout: 30,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            confirm_window: 2000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            wait: false,
            timeout: None,
            json: false,
        }
    }
}

/// What an enqueue did.
#[derive(Debug, Clone)]
pub struct EnqueueReport {
    /// Job id.
    pub job: String,
    /// Batches published and confirmed.
    pub batches: u64,
    /// Records in them.
    pub records: u64,
    /// What could not be read.
    pub problems: Problems,
    /// Seconds from start to the last confirm.
    pub seconds: f64,
    /// A signal stopped the reading: the job is `interrupted` with what was published.
    pub interrupted: bool,
    /// Nothing was enqueued: this job holds the unique key (`job` is this id then).
    pub duplicate_of: Option<String>,
}

impl EnqueueReport {
    /// Nothing enqueued: `holder` has the unique key.
    fn duplicate(holder: String, started: Instant) -> Self {
        Self {
            job: holder.clone(),
            batches: 0,
            records: 0,
            problems: Problems::default(),
            seconds: started.elapsed().as_secs_f64(),
            interrupted: false,
            duplicate_of: Some(holder),
        }
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "job": self.job,
            "batches": self.batches,
            "records": self.records,
            "records_invalid": self.problems.records_invalid,
            "sources_failed": self.problems.sources_failed,
            "problems": self.problems.samples,
            "more_problems": self.problems.more,
            "seconds": self.seconds,
            "interrupted": self.interrupted,
            "duplicate": self.duplicate_of.is_some(),
        })
    }

    /// What the store records when publishing ends.
    fn totals(&self) -> PublishTotals {
        let p = &self.problems;
        let mut samples = p.samples.clone();
        if p.more > 0 {
            samples.push(format!("... and {} more", p.more));
        }
        PublishTotals {
            batches: self.batches,
            records: self.records,
            records_invalid: p.records_invalid,
            sources_failed: p.sources_failed,
            problems: samples,
            interrupted: self.interrupted,
        }
    }

    /// One paragraph for people, on stderr.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "enqueued job {}: {} records in {} batches in {:.2} s",
            self.job, self.records, self.batches, self.seconds
        );
        let p = &self.problems;
        if p.records_invalid > 0 || p.sources_failed > 0 {
            s.push_str(&format!(
                "\nskipped {} invalid records; {} sources failed:",
                p.records_invalid, p.sources_failed
            ));
            for line in &p.samples {
                s.push_str("\n  ");
                s.push_str(line);
            }
            if p.more > 0 {
                s.push_str(&format!("\n  ... and {} more", p.more));
            }
        }
        s
    }
}

fn parse_params(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| usage(format!("--param {p:?} is not KEY=VALUE")))?;
            if k.trim().is_empty() {
                return Err(usage(format!("--param {p:?} has an empty key")));
            }
            Ok((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

fn usage(msg: String) -> anyhow::Error {
    CliError::Usage(msg).into()
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

/// The job's start time and expiry, in ms since the epoch, from `--countdown`/`--eta` and
/// `--expires`.
fn timing(args: &EnqueueArgs) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let now = now_ms();
    let eta = match (&args.countdown, &args.eta) {
        (Some(c), _) => {
            Some(now + parse_duration(c).map_err(|e| usage(format!("--countdown {e}")))?)
        }
        (None, Some(t)) => Some(parse_rfc3339(t).map_err(|e| usage(format!("--eta {e}")))?),
        (None, None) => None,
    };
    let expires = args
        .expires
        .as_deref()
        .map(|e| parse_duration(e).map_err(|e| usage(format!("--expires {e}"))))
        .transpose()?
        .map(|d| now + d);
    if let (Some(eta), Some(exp)) = (eta, expires) {
        if exp <= eta {
            return Err(usage(
                "--expires ends before the batches may start (--countdown/--eta)".into(),
            ));
        }
    }
    Ok((eta, expires))
}

/// Checks the job's arguments (not its sources) before anything is connected.
fn validate_job(conn: &ConnArgs, args: &EnqueueArgs) -> anyhow::Result<()> {
    let check = |r: Result<(), String>| r.map_err(usage);
    check(validate_name("namespace", &conn.namespace))?;
    check(topology::validate_queue(&args.queue))?;
    if args.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1".into()));
    }
    if let Some(job) = &args.job {
        check(validate_job_id(job))?;
    }
    if let Some(key) = &args.unique_key {
        check(validate_job_id(key).map_err(|e| format!("--unique-key: {e}")))?;
    }
    Ok(())
}

/// Checks the sources of the command line (URLs and files) before anything is connected.
fn validate_sources(args: &EnqueueArgs) -> anyhow::Result<()> {
    let check = |r: Result<(), String>| r.map_err(usage);
    if args.urls.is_empty() && args.url_template.is_none() && args.files.is_empty() {
        return Err(usage(
            "no records to read: give --url, --url-template with --ids, or --file".into(),
        ));
    }
    for u in &args.urls {
        check(sources::check_url(u).map_err(|e| format!("--url {e}")))?;
    }
    if let Some(u) = &args.url_template {
        check(sources::check_url(u).map_err(|e| format!("--url-template {e}")))?;
    }
    if let Some(t) = &args.url_template {
        if !t.contains("{id}") {
            return Err(usage(format!("--url-template {t:?} has no {{id}} in it")));
        }
    }
    if args.files.iter().filter(|f| f.as_os_str() == "-").count() > 1 {
        return Err(usage("--file - (stdin) can be given only once".into()));
    }
    for f in &args.files {
        if f.as_os_str() != "-" && !f.is_file() {
            return Err(usage(format!("--file {}: no such file", f.display())));
        }
    }
    Ok(())
}

/// Batch numbers reserved at a time, ahead of publishing: one Redis round trip per this many
/// batches instead of one per group (a round trip in the publishing path cost a sixth of
/// the throughput). While a job publishes, a forged batch number can fall at most this far
/// above the batches really published.
const RESERVE_AHEAD: u64 = 1024;

/// Where prepared batches go: the job is registered when its first batch is ready (so an
/// input with no record registers nothing); batch numbers are reserved in Redis before they
/// are published (workers refuse numbers above the reservation); `batches_published` follows
/// the confirms, written beside the publishing by a task of its own.
struct Outlet<'a, F: FnOnce(&str)> {
    store: &'a Store,
    publisher: Publisher,
    job: &'a str,
    new_job: NewJob<'a>,
    on_registered: Option<F>,
    reserved: u64,
    published: Option<tokio::sync::watch::Sender<u64>>,
    /// The job that holds the unique key, when registering found one.
    duplicate_of: Option<String>,
    /// The job's start time, expiry and priority, recorded with it.
    timing: (Option<u64>, Option<u64>, u8),
    lease: std::time::Duration,
    /// Stops the lease keeper when the outlet goes.
    lease_keeper: Option<tokio_util::sync::DropGuard>,
}

impl<F: FnOnce(&str)> Outlet<'_, F> {
    async fn send(&mut self, ready: Vec<Prepared>, batches_so_far: u64) -> anyhow::Result<()> {
        if ready.is_empty() {
            return Ok(());
        }
        if self.duplicate_of.is_some() {
            return Ok(());
        }
        if let Some(f) = self.on_registered.take() {
            if let Registered::Duplicate(holder) = self.store.register_job(&self.new_job).await? {
                self.duplicate_of = Some(holder);
                self.on_registered = Some(f);
                return Ok(());
            }
            self.store
                .set_timing(self.job, self.timing.0, self.timing.1, self.timing.2)
                .await?;
            let lease_ms = self.lease.as_millis() as u64;
            self.store
                .renew_lease(self.job, now_ms() + lease_ms)
                .await?;
            f(self.job);
            self.published = Some(spawn_published_writer(self.store.clone(), self.job));
            self.lease_keeper = Some(spawn_lease_keeper(self.store.clone(), self.job, self.lease));
        }
        if batches_so_far > self.reserved {
            self.reserved = batches_so_far + RESERVE_AHEAD;
            self.store.reserve_batches(self.job, self.reserved).await?;
        }
        self.publisher.publish_many(ready).await?;
        if let Some(tx) = &self.published {
            let _ = tx.send(self.publisher.confirmed_batches);
        }
        Ok(())
    }
}

/// Renews the producer's lease on the job every third of it, until the guard is dropped (the
/// enqueue ended) or the process dies (then the lease lapses and the job is `interrupted`).
fn spawn_lease_keeper(
    store: Store,
    job: &str,
    lease: std::time::Duration,
) -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let job = job.to_string();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(lease / 3) => {}
                _ = stop.cancelled() => return,
            }
            let until = now_ms() + lease.as_millis() as u64;
            if let Err(e) = store.renew_lease(&job, until).await {
                warn!("renewing the lease on the job: {e}");
            }
        }
    });
    guard
}

/// Least time between two writes of `batches_published`: confirms arrive every publish round
/// (about 600 a second at full speed), and a Redis call each cost the producer and Redis more
/// than a percent of the throughput; 20 ms keeps the count within a few hundred batches of
/// the confirms (the confirm window already leaves up to 2,000 unconfirmed).
const PUBLISHED_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// Writes the latest confirmed count into `batches_published` when it changes, at most once
/// every [`PUBLISHED_EVERY`] (the latest count is written after the pause), off the publishing
/// path; ends when the sender is dropped.
fn spawn_published_writer(store: Store, job: &str) -> tokio::sync::watch::Sender<u64> {
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let job = job.to_string();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let n = *rx.borrow_and_update();
            if let Err(e) = store.set_published(&job, n).await {
                warn!("recording the batches published: {e}");
            }
            tokio::time::sleep(PUBLISHED_EVERY).await;
        }
    });
    tx
}

/// Runs an enqueue: reads every source, registers the job when its first batch is ready and
/// calls `on_registered` with its id (before that batch is published), and publishes the
/// batches. Fails, registering nothing, when no record could be read.
pub async fn enqueue(
    conn: &ConnArgs,
    args: &EnqueueArgs,
    on_registered: impl FnOnce(&str),
) -> anyhow::Result<EnqueueReport> {
    enqueue_until(conn, args, on_registered, CancellationToken::new()).await
}

/// [`enqueue`], stopping early when `stop` is cancelled (a signal): reading stops, what was
/// sent is confirmed, and the job becomes `interrupted` with the batches published so far
/// (they still run).
pub async fn enqueue_until(
    conn: &ConnArgs,
    args: &EnqueueArgs,
    on_registered: impl FnOnce(&str),
    stop: CancellationToken,
) -> anyhow::Result<EnqueueReport> {
    validate_sources(args)?;
    let ids = args
        .ids
        .as_deref()
        .map(sources::parse_ids)
        .transpose()
        .map_err(usage)?;
    let problems = ProblemLog::default();
    let log = problems.clone();
    let start = move || {
        let (mut rx, readers) = spawn_sources(args, ids, &log);
        let records = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (records, Some(readers))
    };
    enqueue_records(conn, args, start, problems, on_registered, stop).await
}

/// Enqueues, as a job described by `args` (its sources are not read), the chunks of records
/// of the stream `start` gives; `start` runs once the job's arguments, the services and the
/// task catalog have accepted it, so that nothing is read or fetched for a job that is
/// refused. The readers it may return are the tasks feeding the stream, waited for before
/// publishing ends. The core of [`enqueue_until`] and of [`crate::client`].
pub(crate) async fn enqueue_records<S>(
    conn: &ConnArgs,
    args: &EnqueueArgs,
    start: impl FnOnce() -> (S, Option<Readers>),
    problems: ProblemLog,
    on_registered: impl FnOnce(&str),
    stop: CancellationToken,
) -> anyhow::Result<EnqueueReport>
where
    S: futures::Stream<Item = Vec<Record>> + Unpin,
{
    validate_job(conn, args)?;
    let params = parse_params(&args.params)?;
    let (eta_ms, expires_ms) = timing(args)?;
    let started = Instant::now();
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    if args.no_check {
        warn!(task = %bounded(&args.task, 200), "--no-check: the task and its parameters are not checked");
    } else {
        crate::cmd::tasks::check(&store, &args.task, &params).await?;
    }
    let job = args
        .job
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    if store.job_exists(&job).await? {
        return Err(StoreError::JobExists(job).into());
    }
    if let Some(key) = &args.unique_key {
        if let Some(holder) = store.unique_holder(key).await? {
            return Ok(EnqueueReport::duplicate(holder, started));
        }
    }
    let names = Names::new(&conn.namespace);
    let publisher = Publisher::connect(&conn.amqp_url, names, &args.queue, args.confirm_window)
        .await?
        .with_routing_key(topology::priority_queue(&args.queue, args.priority));
    let mut outlet = Outlet {
        store: &store,
        publisher,
        job: &job,
        new_job: NewJob {
            id: &job,
            task: &args.task,
            queue: &args.queue,
            params: &params,
            unique_key: args.unique_key.as_deref(),
        },
        on_registered: Some(on_registered),
        reserved: 0,
        published: None,
        duplicate_of: None,
        timing: (None, None, 0),
        lease: std::time::Duration::from_secs(args.lease_seconds.max(1)),
        lease_keeper: None,
    };
    let (records, readers) = start();
    let mut headers = Vec::new();
    if let Some(eta) = eta_ms {
        headers.push((HEADER_ETA, eta as i64));
    }
    if let Some(exp) = expires_ms {
        headers.push((HEADER_EXPIRES, exp as i64));
    }
    if let Some(limit) = &args.time_limit {
        let ms = parse_duration(limit).map_err(|e| usage(format!("--time-limit {e}")))?;
        if ms == 0 {
            return Err(usage("--time-limit must be more than 0".into()));
        }
        headers.push((HEADER_TIME_LIMIT, ms as i64));
    }
    let mut text_headers = Vec::new();
    if let Some(rate) = &args.rate_limit {
        let interval = parse_rate(rate).map_err(|e| usage(format!("--rate-limit {e}")))?;
        headers.push((HEADER_RATE_INTERVAL, interval as i64));
        let key = args
            .rate_key
            .clone()
            .unwrap_or_else(|| format!("job-{job}"));
        validate_job_id(&key).map_err(|e| usage(format!("--rate-key: {e}")))?;
        text_headers.push((HEADER_RATE_KEY, key));
    }
    outlet.timing = (eta_ms, expires_ms, args.priority);
    let mut batcher = Batcher::new(
        &job,
        &args.task,
        &params,
        args.batch_size,
        args.max_message_bytes,
    )
    .with_headers(headers)
    .with_text_headers(text_headers);
    let linger = std::time::Duration::from_millis(args.linger_ms);
    let interrupted = pump(records, &mut batcher, &mut outlet, linger, &problems, &stop).await?;
    if let Some(readers) = readers {
        if interrupted {
            // Stop reading; a reader blocked on stdin ends with the process.
            readers.http.abort();
        } else {
            readers.finish().await?;
        }
    }
    let mut publisher = outlet.publisher;
    publisher.settle_all().await?;
    if let Some(holder) = outlet.duplicate_of {
        return Ok(EnqueueReport::duplicate(holder, started));
    }

    let p = problems.snapshot();
    if outlet.on_registered.is_some() && interrupted {
        return Err(CliError::Interrupted(
            "interrupted before the first batch: no job was registered".into(),
        )
        .into());
    }
    if outlet.on_registered.is_some() {
        // Nothing was read: no job was registered, nothing published.
        let mut msg = "nothing to enqueue: no record could be read".to_string();
        for line in p.samples.iter().take(5) {
            msg.push_str("\n  ");
            msg.push_str(line);
        }
        return Err(usage(msg));
    }
    let report = EnqueueReport {
        job: job.clone(),
        batches: publisher.confirmed_batches,
        records: publisher.confirmed_records,
        problems: p,
        seconds: started.elapsed().as_secs_f64(),
        interrupted,
        duplicate_of: None,
    };
    if store.finish_publishing(&job, &report.totals()).await? {
        publisher.request_summary_and_close(&job).await;
    } else {
        publisher.finish().await?;
    }
    Ok(report)
}

/// Feeds what the sources send into the batcher and the batches into the outlet; a partial
/// batch goes out when nothing came for `linger`, and at the end. True when `stop` ended it
/// (the records read but not batched yet are dropped).
async fn pump<F: FnOnce(&str), S: futures::Stream<Item = Vec<Record>> + Unpin>(
    mut rx: S,
    batcher: &mut Batcher,
    outlet: &mut Outlet<'_, F>,
    linger: std::time::Duration,
    problems: &ProblemLog,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    loop {
        let next = async {
            if batcher.has_pending() {
                tokio::time::timeout(linger, rx.next()).await
            } else {
                Ok(rx.next().await)
            }
        };
        let chunk = tokio::select! {
            next = next => next,
            _ = stop.cancelled() => return Ok(true),
        };
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(_) => {
                // Nothing came for a while (a slow stream): the partial batch goes out.
                let mut ready = Vec::new();
                batcher.flush(&mut ready, problems);
                outlet.send(ready, batcher.numbered()).await?;
                continue;
            }
        };
        let Some(chunk) = chunk else { break };
        let mut ready = Vec::new();
        for record in chunk {
            batcher.push(record, &mut ready, problems);
        }
        outlet.send(ready, batcher.numbered()).await?;
        if outlet.duplicate_of.is_some() {
            return Ok(false);
        }
    }
    let mut ready = Vec::new();
    batcher.flush(&mut ready, problems);
    outlet.send(ready, batcher.numbered()).await?;
    Ok(false)
}

/// The tasks that read the sources.
pub(crate) struct Readers {
    files: tokio::task::JoinHandle<()>,
    http: tokio::task::JoinHandle<Result<(), reqwest::Error>>,
}

impl Readers {
    async fn finish(self) -> anyhow::Result<()> {
        self.files.await.context("reading files")?;
        self.http
            .await
            .context("fetching URLs")?
            .context("starting the HTTP client")
    }
}

/// Starts reading every source (files and stdin on a blocking thread, URLs with bounded
/// concurrency) into one bounded channel of record chunks.
fn spawn_sources(
    args: &EnqueueArgs,
    ids: Option<(u64, u64)>,
    problems: &ProblemLog,
) -> (mpsc::Receiver<Vec<Record>>, Readers) {
    let (tx, rx) = mpsc::channel::<Vec<Record>>(16);
    let files = args.files.clone();
    let file_tx = tx.clone();
    let file_problems = problems.clone();
    let max_record = args.max_record_bytes;
    let files = tokio::task::spawn_blocking(move || {
        for f in files {
            if f.as_os_str() == "-" {
                let stdin = std::io::stdin().lock();
                sources::read_records(stdin, "stdin", max_record, &file_tx, &file_problems);
                continue;
            }
            let name = f.display().to_string();
            match std::fs::File::open(&f) {
                Ok(file) => {
                    sources::read_records(file, &name, max_record, &file_tx, &file_problems);
                }
                Err(e) => file_problems.failed(format!("{name}: cannot open: {e}")),
            }
        }
    });
    let urls: Vec<String> = args.urls.clone();
    let template = args.url_template.clone();
    let http_opts = HttpOptions {
        concurrency: args.concurrency.max(1),
        retries: args.http_retries,
        timeout: std::time::Duration::from_secs(args.http_timeout.max(1)),
        ..HttpOptions::default()
    };
    let http_problems = problems.clone();
    let http = tokio::spawn(async move {
        let templated = template
            .into_iter()
            .flat_map(move |t| sources::expand_template(t, ids.unwrap_or((1, 0))));
        let all = Box::new(urls.into_iter().chain(templated));
        sources::fetch_all(all, &http_opts, tx, http_problems).await
    });
    (rx, Readers { files, http })
}

/// The command: prints the job id first (or, with --json, the report as one JSON object),
/// then the report on stderr; follows the job with --wait. SIGINT/SIGTERM stop the reading:
/// what was sent is confirmed, the job becomes `interrupted` (its published batches still
/// run) and the command exits 1.
pub async fn run(conn: &ConnArgs, args: &EnqueueArgs) -> anyhow::Result<std::process::ExitCode> {
    let json = args.json;
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    let report = enqueue_until(
        conn,
        args,
        |job| {
            if !json {
                crate::out::line(job);
            }
        },
        stop,
    )
    .await?;
    if let Some(holder) = &report.duplicate_of {
        if json {
            crate::out::line(&report.to_json().to_string());
        } else {
            crate::out::line(holder);
        }
        eprintln!(
            "producer: job {holder} holds unique key {:?} and is still pending or running: nothing enqueued",
            args.unique_key.as_deref().unwrap_or_default()
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if json {
        crate::out::line(&report.to_json().to_string());
    }
    eprintln!("{}", report.describe());
    if report.interrupted {
        eprintln!(
            "producer: interrupted: job {} has the {} batches published so far; `producer wait {}` follows them",
            report.job, report.batches, report.job
        );
        return Ok(std::process::ExitCode::from(crate::error::EXIT_UNFINISHED));
    }
    if args.wait {
        let wait = crate::cmd::wait::WaitArgs {
            job: report.job.clone(),
            timeout: args.timeout,
            json: args.json,
        };
        return crate::cmd::wait::run(conn, &wait).await;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Cancels `stop` at the first SIGINT or SIGTERM.
async fn stop_on_signal(stop: CancellationToken) {
    super::signalled().await;
    eprintln!(
        "producer: signal received: stopping; waiting for the broker to confirm what was sent"
    );
    stop.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times() {
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
