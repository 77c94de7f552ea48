//! `producer enqueue`: read records from URLs, files and stdin, batch them, publish them.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Args;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use taskmill_client::{
    spec::{parse_duration, parse_rate, parse_rfc3339},
    Hooks, JobSpec, Rate, Step, Trigger,
};
use taskmill_common::{
    config::{validate_name, ConnArgs},
    envelope::{Record, DEFAULT_MAX_MESSAGE_BYTES},
    topology,
};

pub use taskmill_client::EnqueueReport;

use crate::{
    error::usage,
    sources::{self, HttpOptions, ProblemLog, Redirects, DEFAULT_MAX_RECORD_BYTES},
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
    /// Spread the queue over at least N shards: quorum queues (`QUEUE`, `QUEUE.s1`...) whose
    /// leaders a RabbitMQ cluster places on different nodes, batch n going to shard n mod N.
    /// Kept in Redis for the queue and only raised; workers consume every shard.
    #[arg(long, env = "TASKMILL_SHARDS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(topology::MAX_SHARDS)))]
    pub shards: Option<u16>,
    /// Job id (default: a new UUID).
    #[arg(long)]
    pub job: Option<String>,
    /// Put the job in group G: `producer status --group G` counts the group's jobs by state,
    /// `producer wait --group G` waits for all of them.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
    /// When the job ends (completed, with errors, cancelled, stalled...), POST its final
    /// status as JSON to this URL; retried with backoff until it answers 2xx (workers deliver
    /// it; `status` shows the attempts).
    #[arg(long, value_name = "URL")]
    pub on_complete: Option<String>,
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
    /// Priority, 0 (default) to 9, in two bands (1-4, 5-9): a higher band's batches overtake
    /// the lower ones' backlog, in the queue and in each worker's hands; they wait only for
    /// the batches the workers' analysis threads are running (one a thread).
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
    /// Timeout of one HTTP request, its whole body included, in seconds.
    #[arg(
        long,
        env = "TASKMILL_HTTP_TIMEOUT",
        default_value_t = 30,
        help_heading = "Sources"
    )]
    pub http_timeout: u64,
    /// An HTTP response is cut after this many bytes (its records before the cut are kept,
    /// the source counts as failed); a declared longer one is not read. Default: no cap (a
    /// response streams in flat memory; --http-timeout bounds it).
    #[arg(
        long,
        env = "TASKMILL_MAX_RESPONSE_BYTES",
        value_name = "BYTES",
        help_heading = "Sources"
    )]
    pub max_response_bytes: Option<u64>,
    /// Which HTTP redirects a source may follow: none, same-host (same scheme, host and
    /// port), any (at most 10 hops).
    #[arg(
        long,
        env = "TASKMILL_FOLLOW_REDIRECTS",
        value_enum,
        default_value_t = Redirects::SameHost,
        help_heading = "Sources"
    )]
    pub follow_redirects: Redirects,
    /// A record, line or document larger than this (bytes) is skipped and reported.
    #[arg(long, env = "TASKMILL_MAX_RECORD_BYTES", default_value_t = DEFAULT_MAX_RECORD_BYTES, help_heading = "Sources")]
    pub max_record_bytes: usize,
    /// Publisher confirms in flight at once.
    #[arg(long, env = "TASKMILL_CONFIRM_WINDOW", default_value_t = 2000)]
    pub confirm_window: usize,
    /// Largest message body; larger batches are split, a larger single record is skipped.
    #[arg(long, env = "TASKMILL_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Follow the job until it finishes (progress bar on a terminal) and exit like `wait`
    /// (with --then, like `wait --chain`: until the chain's last job finishes).
    #[arg(long, help_heading = "Output")]
    pub wait: bool,
    /// With --wait: give up after this long (exit 3): `90s`, `5m`, or seconds.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = crate::cmd::wait::timeout_arg,
        help_heading = "Output"
    )]
    pub timeout: Option<std::time::Duration>,
    /// Print one JSON object (the enqueue report) instead of the job id, and with --wait a
    /// second one, the final status.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// Follow-up jobs (`--then` and its options).
    #[command(flatten)]
    pub follow: ThenArgs,
}

/// `--then TASK` and its options: the follow-up steps of a job (`enqueue`) or of a group
/// (`group close`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ThenArgs {
    /// Follow-up job: when this job (or group) finishes, run TASK over its batch results (one
    /// record a result, in batch order). Repeat for a chain: each step runs over the results of
    /// the one before. Its id is this job's with `.then1` (`.then2`, ...) added (a group's:
    /// `G.chord`).
    #[arg(long = "then", value_name = "TASK", help_heading = "Follow-up jobs")]
    pub then: Vec<String>,
    /// A parameter of the --then before it (repeatable).
    #[arg(
        long = "then-param",
        value_name = "KEY=VALUE",
        requires = "then",
        help_heading = "Follow-up jobs"
    )]
    pub then_params: Vec<String>,
    /// When the --then before it runs: complete (every batch settled: completed, with errors,
    /// or stalled; the default) or success (completed without a dead batch).
    #[arg(
        long = "then-on",
        value_name = "WHEN",
        requires = "then",
        help_heading = "Follow-up jobs"
    )]
    pub then_on: Vec<String>,
    /// Records (results) per batch of the --then before it (default 10).
    #[arg(
        long = "then-batch-size",
        value_name = "N",
        requires = "then",
        help_heading = "Follow-up jobs"
    )]
    pub then_batch_size: Vec<usize>,
    /// Where each of the --then options stood on the command line (set by the parser), to
    /// give each option to the --then before it.
    #[arg(skip)]
    pub then_at: ThenAt,
}

/// The positions of the `--then` options among the arguments.
#[derive(Debug, Clone, Default)]
pub struct ThenAt {
    then: Vec<usize>,
    params: Vec<usize>,
    on: Vec<usize>,
    batch_size: Vec<usize>,
}

impl ThenAt {
    /// Read from `enqueue`'s matches.
    pub fn from_matches(m: &clap::ArgMatches) -> Self {
        let at = |id: &str| {
            m.indices_of(id)
                .map(|i| i.collect::<Vec<_>>())
                .unwrap_or_default()
        };
        Self {
            then: at("then"),
            params: at("then_params"),
            on: at("then_on"),
            batch_size: at("then_batch_size"),
        }
    }
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
            shards: None,
            job: None,
            group: None,
            on_complete: None,
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
            max_response_bytes: None,
            follow_redirects: Redirects::SameHost,
            confirm_window: 2000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            wait: false,
            timeout: None,
            json: false,
            follow: ThenArgs::default(),
        }
    }
}

impl ThenArgs {
    /// The follow-up steps of `--then` and its options, each option given to the `--then`
    /// before it (all to the last, when the positions are unknown: arguments built in code).
    pub fn steps(&self) -> anyhow::Result<Vec<Step>> {
        let mut steps: Vec<Step> = self
            .then
            .iter()
            .map(|task| Step {
                task: task.clone(),
                params: Default::default(),
                batch_size: 10,
                on: Trigger::Complete,
            })
            .collect();
        if steps.is_empty() {
            return Ok(steps);
        }
        let starts = &self.then_at.then;
        let last = steps.len() - 1;
        // The step an option belongs to: the last --then before its position.
        let owner = |flag: &str, pos: Option<&usize>| -> anyhow::Result<usize> {
            match pos {
                None => Ok(last),
                Some(p) => starts
                    .iter()
                    .rposition(|s| s < p)
                    .ok_or_else(|| usage(format!("{flag} comes before any --then"))),
            }
        };
        let mut owners = Vec::new();
        for (i, p) in self.then_params.iter().enumerate() {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| usage(format!("--then-param {p:?} is not KEY=VALUE")))?;
            if k.trim().is_empty() {
                return Err(usage(format!("--then-param {p:?} has an empty key")));
            }
            owners.push((owner("--then-param", self.then_at.params.get(i))?, k, v));
        }
        for (s, k, v) in owners {
            steps[s].params.insert(k.trim().to_string(), v.to_string());
        }
        for (i, on) in self.then_on.iter().enumerate() {
            let s = owner("--then-on", self.then_at.on.get(i))?;
            steps[s].on = on
                .parse()
                .map_err(|e: String| usage(format!("--then-on {e}")))?;
        }
        for (i, n) in self.then_batch_size.iter().enumerate() {
            let s = owner("--then-batch-size", self.then_at.batch_size.get(i))?;
            steps[s].batch_size = *n;
        }
        Ok(steps)
    }
}

impl EnqueueArgs {
    /// The job these flags describe, each text form parsed and every value checked, in one
    /// sentence naming the flag (before anything is connected).
    pub fn spec(&self) -> anyhow::Result<JobSpec> {
        let mut spec = JobSpec::new(&self.task)
            .batch_size(self.batch_size)
            .queue(&self.queue)
            .priority(self.priority)
            .confirm_window(self.confirm_window);
        for p in &self.params {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| usage(format!("--param {p:?} is not KEY=VALUE")))?;
            if k.trim().is_empty() {
                return Err(usage(format!("--param {p:?} has an empty key")));
            }
            spec.params.insert(k.trim().to_string(), v.to_string());
        }
        spec.id = self.job.clone();
        spec.shards = self.shards;
        spec.group = self.group.clone();
        spec.on_complete = self.on_complete.clone();
        spec.unique_key = self.unique_key.clone();
        spec.rate_key = self.rate_key.clone();
        spec.check = !self.no_check;
        spec.max_message_bytes = self.max_message_bytes;
        spec.linger = Duration::from_millis(self.linger_ms);
        spec.lease = Duration::from_secs(self.lease_seconds.max(1));
        let duration = |flag: &str, raw: &str| {
            parse_duration(raw)
                .map(Duration::from_millis)
                .map_err(|e| usage(format!("{flag} {e}")))
        };
        if let Some(c) = &self.countdown {
            spec = spec.countdown(duration("--countdown", c)?);
        } else if let Some(t) = &self.eta {
            spec = spec.eta_ms(parse_rfc3339(t).map_err(|e| usage(format!("--eta {e}")))?);
        }
        if let Some(e) = &self.expires {
            spec = spec.expires(duration("--expires", e)?);
        }
        if let Some(t) = &self.time_limit {
            spec = spec.time_limit(duration("--time-limit", t)?);
        }
        if let Some(r) = &self.rate_limit {
            let interval_ms = parse_rate(r).map_err(|e| usage(format!("--rate-limit {e}")))?;
            spec = spec.rate_limit(Rate { interval_ms });
        }
        for step in self.follow.steps()? {
            spec = spec.then(step);
        }
        spec.check().map_err(|(field, why)| {
            let flag = match field {
                "id" => "job",
                "params" => "param",
                other => other,
            };
            usage(format!("--{} {why}", flag.replace('_', "-")))
        })?;
        Ok(spec)
    }
}

/// Checks the sources of the command line (URLs and files) before anything is connected.
fn validate_sources(args: &EnqueueArgs) -> anyhow::Result<()> {
    let check = |r: Result<(), String>| r.map_err(usage);
    if args.urls.is_empty() && args.url_template.is_none() && args.files.is_empty() {
        return Err(usage(
            "no records to read: give --url, --url-template with --ids, or --file",
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
        return Err(usage("--file - (stdin) can be given only once"));
    }
    for f in &args.files {
        if f.as_os_str() != "-" && !f.is_file() {
            return Err(usage(format!("--file {}: no such file", f.display())));
        }
    }
    Ok(())
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
    validate_name("namespace", &conn.namespace).map_err(usage)?;
    validate_sources(args)?;
    let spec = args.spec()?;
    let ids = args
        .ids
        .as_deref()
        .map(sources::parse_ids)
        .transpose()
        .map_err(usage)?;
    let client = crate::client(conn).await?;
    let problems = ProblemLog::default();
    let log = problems.clone();
    let mut readers = None;
    let start = || {
        let (mut rx, r) = spawn_sources(args, ids, &log);
        readers = Some(r);
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    };
    let hooks = Hooks {
        problems,
        on_registered,
        stop,
    };
    let report = client.enqueue_chunks(&spec, start, hooks).await?;
    if let Some(readers) = readers {
        if report.interrupted {
            // Stop reading; a reader blocked on stdin ends with the process.
            readers.http.abort();
        } else {
            readers.finish().await?;
        }
    }
    Ok(report)
}

/// The tasks that read the sources.
pub(crate) struct Readers {
    files: tokio::task::JoinHandle<()>,
    http: tokio::task::JoinHandle<()>,
}

impl Readers {
    async fn finish(self) -> anyhow::Result<()> {
        self.files.await.context("reading files")?;
        self.http.await.context("fetching URLs")
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
        max_record_bytes: args.max_record_bytes,
        max_response_bytes: args.max_response_bytes,
        redirects: args.follow_redirects,
        ..HttpOptions::default()
    };
    let http_problems = problems.clone();
    let http = tokio::spawn(async move {
        let templated = template
            .into_iter()
            .flat_map(move |t| sources::expand_template(t, ids.unwrap_or((1, 0))));
        let all = Box::new(urls.into_iter().chain(templated));
        let log = http_problems.clone();
        if let Err(e) = sources::fetch_all(all, &http_opts, tx, http_problems).await {
            log.failed(format!("cannot start the HTTP client: {e}"));
        }
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
            job: Some(report.job.clone()),
            group: None,
            timeout: args.timeout,
            json: args.json,
            // With follow-ups, to the end of the chain.
            chain: !args.follow.then.is_empty(),
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
