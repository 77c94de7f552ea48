//! The enqueue core every front door shares: the catalog check, registration when the first
//! batch is ready, batch numbers reserved ahead, confirm-window publishing, the lease on the
//! job while it publishes, and the totals when publishing ends.

use std::{collections::BTreeMap, time::Instant};

use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use taskmill_broker::topology::{self, Names};
use taskmill_protocol::{
    envelope::{
        bounded, Record, HEADER_ETA, HEADER_EXPIRES, HEADER_RATE_INTERVAL, HEADER_RATE_KEY,
        HEADER_TIME_LIMIT,
    },
    now_ms,
};
use taskmill_store::{NewJob, PublishTotals, Registered, Store, StoreError};
use taskmill_task::{check_params, ParamSpec};

use crate::{
    batcher::{Batcher, Prepared},
    error::{Error, Result},
    problems::{ProblemLog, Problems},
    publisher::Publisher,
    spec::JobSpec,
    Settings,
};

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
    /// What the enqueue noticed and went on with (live workers of the queue that lack the
    /// task: their batches go back until a worker that has it takes them).
    pub warnings: Vec<String>,
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
            warnings: Vec::new(),
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
            "warnings": self.warnings,
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
        let count =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let mut s = format!(
            "enqueued job {}: {} in {} in {:.2} s",
            self.job,
            count(self.records, "record", "records"),
            count(self.batches, "batch", "batches"),
            self.seconds
        );
        for w in &self.warnings {
            s.push_str("\nwarning: ");
            s.push_str(w);
        }
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

/// Checks a task and its parameters against the catalog of live workers: an unknown task, an
/// unknown parameter or a value of the wrong type is a usage error that says what is valid.
/// With no live worker to ask, it warns and lets the job go.
pub async fn check(store: &Store, task: &str, params: &BTreeMap<String, String>) -> Result<()> {
    let catalog = store.catalog().await?;
    if catalog.is_empty() {
        tracing::warn!(
            "no live worker has recorded its tasks in this namespace: task {task:?} and its parameters are not checked"
        );
        return Ok(());
    }
    let Some(entry) = catalog.iter().find(|e| e["name"] == task) else {
        let names: Vec<&str> = catalog.iter().filter_map(|e| e["name"].as_str()).collect();
        return Err(Error::Invalid(format!(
            "unknown task {:?}: the live workers serve {} (or enqueue without the catalog check, for a worker not deployed yet)",
            bounded(task, 200),
            names.join(", ")
        )));
    };
    let specs: Vec<ParamSpec> = serde_json::from_value(entry["params"].clone()).unwrap_or_default();
    check_params(task, &specs, params).map_err(Error::Invalid)
}

/// A warning when some live workers of `queue` lack `task` (a rolling deploy half-way, a mixed
/// fleet): their batches go back until a worker that has it takes them. From the workers'
/// heartbeats; a worker too old to say which tasks it has is not counted.
async fn lacking(store: &Store, queue: &str, task: &str) -> Option<String> {
    let now = now_ms();
    let workers = store.workers().await.ok()?;
    let live: Vec<&Value> = workers
        .iter()
        .filter(|w| {
            taskmill_store::heartbeat_alive(w, now)
                && w["queues"]
                    .as_array()
                    .is_some_and(|qs| qs.iter().any(|q| q == queue))
                && w["tasks"].is_array()
        })
        .collect();
    let without = live
        .iter()
        .filter(|w| {
            !w["tasks"]
                .as_array()
                .is_some_and(|ts| ts.iter().any(|t| t == task))
        })
        .count();
    (without > 0).then(|| {
        format!(
            "{without} of the {} live workers of queue {queue} lack task {}: they give its batches back until a worker that has it takes them",
            live.len(),
            bounded(task, 200)
        )
    })
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
    /// The job's time limit, rate interval and rate key, recorded with it for readers.
    limits: (Option<u64>, Option<u64>, Option<String>),
    lease: std::time::Duration,
    /// Stops the lease keeper when the outlet goes.
    lease_keeper: Option<tokio_util::sync::DropGuard>,
}

impl<'a, F: FnOnce(&str)> Outlet<'a, F> {
    fn new(
        store: &'a Store,
        publisher: Publisher,
        new_job: NewJob<'a>,
        spec: &'a JobSpec,
        on_registered: F,
        (eta_ms, expires_ms): (Option<u64>, Option<u64>),
        rate_key: Option<String>,
    ) -> Self {
        Outlet {
            store,
            publisher,
            job: new_job.id,
            new_job,
            on_registered: Some(on_registered),
            reserved: 0,
            published: None,
            duplicate_of: None,
            timing: (eta_ms, expires_ms, spec.priority),
            limits: (
                spec.time_limit.map(|t| t.as_millis() as u64),
                spec.rate_limit.map(|r| r.interval_ms),
                rate_key,
            ),
            lease: spec.lease.max(std::time::Duration::from_secs(1)),
            lease_keeper: None,
        }
    }

    async fn send(&mut self, ready: Vec<Prepared>, batches_so_far: u64) -> Result<()> {
        if ready.is_empty() {
            return Ok(());
        }
        if self.duplicate_of.is_some() {
            return Ok(());
        }
        if self.on_registered.is_some() {
            // Registered before `on_registered` is taken: a registration refused (another
            // producer registered this id first) leaves it, so that giving up does not mark
            // the other producer's job interrupted.
            let registered = patiently("registering the job", || {
                self.store.register_job(&self.new_job)
            })
            .await?;
            if let Registered::Duplicate(holder) = registered {
                self.duplicate_of = Some(holder);
                return Ok(());
            }
            let Some(f) = self.on_registered.take() else {
                return Ok(());
            };
            let (eta, expires, priority) = self.timing;
            patiently("recording the job's timing", || {
                self.store.set_timing(self.job, eta, expires, priority)
            })
            .await?;
            let (time_limit, rate, key) = &self.limits;
            patiently("recording the job's limits", || {
                self.store
                    .set_limits(self.job, *time_limit, *rate, key.as_deref())
            })
            .await?;
            let lease_ms = self.lease.as_millis() as u64;
            patiently("taking the job's lease", || {
                self.store.renew_lease(self.job, now_ms() + lease_ms)
            })
            .await?;
            f(self.job);
            self.published = Some(spawn_published_writer(self.store.clone(), self.job));
            self.lease_keeper = Some(spawn_lease_keeper(self.store.clone(), self.job, self.lease));
        }
        if batches_so_far > self.reserved {
            self.reserved = batches_so_far + RESERVE_AHEAD;
            let reserved = self.reserved;
            patiently("reserving batch numbers", || {
                self.store.reserve_batches(self.job, reserved)
            })
            .await?;
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

/// How an enqueue reports and is stopped, beside its records.
pub struct Hooks<F: FnOnce(&str)> {
    /// Where records that cannot be sent are noted (the front door's readers note theirs too).
    pub problems: ProblemLog,
    /// Called with the job's id once it is registered, before its first batch is published.
    pub on_registered: F,
    /// Cancelled to stop early (a signal): reading stops, what was sent is confirmed, and the
    /// job becomes `interrupted` with the batches published so far (they still run).
    pub stop: CancellationToken,
}

/// Enqueues, as the job `spec` describes, the chunks of records of the stream `start` gives;
/// `start` runs once the spec, the services and the task catalog have accepted the job, so
/// that nothing is read or fetched for a job that is refused. The job is registered when its
/// first batch is ready; no record at all registers nothing and is [`Error::Invalid`].
pub(crate) async fn enqueue_records<S, F>(
    settings: &Settings,
    store: &Store,
    spec: &JobSpec,
    start: impl FnOnce() -> S,
    hooks: Hooks<F>,
) -> Result<EnqueueReport>
where
    S: futures::Stream<Item = Vec<Record>> + Unpin,
    F: FnOnce(&str),
{
    spec.validate()?;
    let Hooks {
        problems,
        on_registered,
        stop,
    } = hooks;
    let (eta_ms, expires_ms) = spec.timing()?;
    let started = Instant::now();
    let warnings = checked(store, spec).await?;
    let job = match new_job_id(store, spec).await? {
        Ok(job) => job,
        Err(holder) => return Ok(EnqueueReport::duplicate(holder, started)),
    };
    let names = Names::new(&settings.namespace);
    // The queue's shards: raised to what the spec asks for, else as many as it has.
    let shards = store
        .shards(&spec.queue, spec.shards.unwrap_or(1))
        .await
        .map_err(Error::from)?;
    let publisher = Publisher::connect(
        &settings.amqp_url,
        names,
        &spec.queue,
        shards,
        spec.confirm_window,
    )
    .await?
    .with_routing_key(topology::priority_queue(&spec.queue, spec.priority));
    let (headers, text_headers) = option_headers(spec, &job, eta_ms, expires_ms);
    let rate_key = text_headers.first().map(|(_, k)| k.clone());
    let token = uuid::Uuid::new_v4().simple().to_string();
    // The chain this job keeps: its own id is the root when it starts one.
    let then = spec
        .then
        .as_ref()
        .map(|c| {
            let mut c = c.clone();
            if c.root.is_empty() {
                c.root = job.clone();
            }
            serde_json::to_string(&c).unwrap_or_default()
        })
        .unwrap_or_default();
    let parent_outcome = spec
        .parent_outcome
        .as_ref()
        .map(|v| v.to_string())
        .unwrap_or_default();
    let new_job = NewJob {
        id: &job,
        task: &spec.task,
        queue: &spec.queue,
        params: &spec.params,
        unique_key: spec.unique_key.as_deref(),
        token: &token,
        then: &then,
        parent: spec.parent.as_deref().unwrap_or(""),
        group: spec.group.as_deref().unwrap_or(""),
        on_complete: spec.on_complete.as_deref().unwrap_or(""),
        parent_outcome: &parent_outcome,
    };
    let mut outlet = Outlet::new(
        store,
        publisher,
        new_job,
        spec,
        on_registered,
        (eta_ms, expires_ms),
        rate_key,
    );
    let records = start();
    let mut batcher = Batcher::new(
        &job,
        &spec.task,
        &spec.params,
        spec.batch_size,
        spec.max_message_bytes,
    )
    .with_headers(headers)
    .with_text_headers(text_headers);
    let pumped = pump(
        records,
        &mut batcher,
        &mut outlet,
        spec.linger,
        &problems,
        &stop,
    )
    .await;
    let mut publisher = outlet.publisher;
    let settled = match pumped {
        Ok(interrupted) => publisher.settle_all().await.map(|()| interrupted),
        Err(e) => Err(e),
    };
    let interrupted = match settled {
        Ok(interrupted) => interrupted,
        Err(e) => {
            // Giving up after registering: the job is interrupted now, saying why, rather
            // than when its lease lapses (what was confirmed still runs).
            if outlet.on_registered.is_none() {
                give_up(store, &job, &problems, &publisher, &e).await;
            }
            return Err(e);
        }
    };
    if let Some(holder) = outlet.duplicate_of {
        return Ok(EnqueueReport::duplicate(holder, started));
    }

    let p = problems.snapshot();
    if outlet.on_registered.is_some() {
        return Err(nothing_read(&p, interrupted));
    }
    let report = EnqueueReport {
        job: job.clone(),
        batches: publisher.confirmed_batches,
        records: publisher.confirmed_records,
        problems: p,
        seconds: started.elapsed().as_secs_f64(),
        interrupted,
        duplicate_of: None,
        warnings,
    };
    let totals = report.totals();
    if patiently("recording the end of publishing", || {
        store.finish_publishing(&job, &totals)
    })
    .await?
    {
        publisher.request_summary_and_close(&job).await;
    } else {
        publisher.finish().await?;
    }
    Ok(report)
}

/// How long an enqueue waits out Redis errors that pass (a Sentinel failover, a restart, a
/// replica late to acknowledge) before it gives up: about a failover and a half.
const STORE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs a store call again while its error passes, with backoff (100 ms to 2 s), for up to
/// [`STORE_PATIENCE`]: the publishing goes on through a failover instead of ending the job
/// `interrupted`. Each call is idempotent (the registration by its token).
async fn patiently<T, F, Fut>(what: &str, mut f: F) -> std::result::Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, StoreError>>,
{
    let deadline = tokio::time::Instant::now() + STORE_PATIENCE;
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match f().await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + delay < deadline => {
                warn!("{what}: {e}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// The catalog's checks, when the spec asks for them: an unknown task or a parameter it
/// refuses is an error; live workers of the queue that lack the task are a warning (logged and
/// returned).
async fn checked(store: &Store, spec: &JobSpec) -> Result<Vec<String>> {
    if !spec.check {
        warn!(task = %bounded(&spec.task, 200), "not checked: the task and its parameters are not checked against the catalog");
        return Ok(Vec::new());
    }
    check(store, &spec.task, &spec.params).await?;
    for step in spec.then.iter().flat_map(|c| &c.steps) {
        check(store, &step.task, &step.params)
            .await
            .map_err(|e| match e {
                Error::Invalid(m) => Error::Invalid(format!("follow-up step: {m}")),
                other => other,
            })?;
    }
    let warnings: Vec<String> = lacking(store, &spec.queue, &spec.task)
        .await
        .into_iter()
        .collect();
    for w in &warnings {
        warn!("{w}");
    }
    Ok(warnings)
}

/// The new job's id: the spec's (refused when such a job exists) or a fresh one; `Err` with
/// the holder when another job holds the spec's unique key.
async fn new_job_id(store: &Store, spec: &JobSpec) -> Result<std::result::Result<String, String>> {
    let job = spec
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    if store.job_exists(&job).await? {
        return Err(Error::JobExists(job));
    }
    if let Some(key) = &spec.unique_key {
        if let Some(holder) = store.unique_holder(key).await? {
            return Ok(Err(holder));
        }
    }
    Ok(Ok(job))
}

/// Headers with numbers, and headers with text.
type OptionHeaders = (Vec<(&'static str, i64)>, Vec<(&'static str, String)>);

/// The headers every batch of the job carries for its options: numbers (start time, expiry,
/// time limit, rate interval) and text (the rate key, by default the job's own).
fn option_headers(
    spec: &JobSpec,
    job: &str,
    eta_ms: Option<u64>,
    expires_ms: Option<u64>,
) -> OptionHeaders {
    let mut headers = Vec::new();
    if let Some(eta) = eta_ms {
        headers.push((HEADER_ETA, eta as i64));
    }
    if let Some(exp) = expires_ms {
        headers.push((HEADER_EXPIRES, exp as i64));
    }
    if let Some(limit) = spec.time_limit {
        headers.push((HEADER_TIME_LIMIT, limit.as_millis() as i64));
    }
    let mut text_headers = Vec::new();
    if let Some(rate) = spec.rate_limit {
        headers.push((HEADER_RATE_INTERVAL, rate.interval_ms as i64));
        let key = spec
            .rate_key
            .clone()
            .unwrap_or_else(|| format!("job-{job}"));
        text_headers.push((HEADER_RATE_KEY, key));
    }
    (headers, text_headers)
}

/// The enqueue failed after the job was registered: the job ends `interrupted` now with what
/// was confirmed (which still runs) and the reason among its problems, rather than when its
/// lease lapses.
async fn give_up(
    store: &Store,
    job: &str,
    problems: &ProblemLog,
    publisher: &Publisher,
    e: &Error,
) {
    let p = problems.snapshot();
    let mut samples = p.samples.clone();
    samples.push(format!("the producer gave up: {e}"));
    let totals = PublishTotals {
        batches: publisher.confirmed_batches,
        records: publisher.confirmed_records,
        records_invalid: p.records_invalid,
        sources_failed: p.sources_failed,
        problems: samples,
        interrupted: true,
    };
    if let Err(se) = store.finish_publishing(job, &totals).await {
        warn!("marking job {job} interrupted: {se}");
    }
}

/// The error of an enqueue that registered nothing: stopped before the first batch, every
/// source unreachable, or nothing readable (with the first problems).
fn nothing_read(p: &Problems, interrupted: bool) -> Error {
    if interrupted {
        return Error::Interrupted(
            "interrupted before the first batch: no job was registered".into(),
        );
    }
    let unreachable = p.sources_unreachable > 0
        && p.sources_unreachable == p.sources_failed
        && p.records_invalid == 0;
    let mut msg = if unreachable {
        format!(
            "nothing to enqueue: every source failed on the network ({} unreachable)",
            p.sources_unreachable
        )
    } else {
        "nothing to enqueue: no record could be read".to_string()
    };
    for line in p.samples.iter().take(5) {
        msg.push_str("\n  ");
        msg.push_str(line);
    }
    if unreachable {
        Error::SourcesUnreachable(msg)
    } else {
        Error::Invalid(msg)
    }
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
) -> Result<bool> {
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
