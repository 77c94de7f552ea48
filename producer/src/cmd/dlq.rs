//! `producer dlq`: inspect, replay and purge dead letters.
//!
//! Dead letters sit in the quorum queue `{ns}.dead`. Reading them without removing them uses
//! `basic.get` without ack and gives them back (nack with requeue) at the end, so `list` and
//! `show` change nothing. `replay` republishes matching batches to their original work queue
//! with the attempt counter reset, the headers of their attempt and death removed and their
//! job's options kept (time limit, rate limit, expiry, start time), waits for the broker's
//! confirm, and only then acks the dead letter. Before publishing it reopens the batch in its
//! job (no longer dead, the job running again, its summary to be folded again), and puts the
//! dead count back if the broker does not take the batch. Every command reads only the dead letters
//! that were there when it started (the queue's depth then): a replayed batch that fails
//! again comes back behind them and is left for the next replay, so a command always ends.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use lapin::{
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection,
};
use serde_json::{json, Value};

use crate::error::CliError;
use taskmill_common::{
    amqp,
    config::ConnArgs,
    envelope::{self, HEADER_ATTEMPT, JOB_OPTION_HEADERS},
    store::Store,
    topology::{self, Names},
};

/// Arguments of `dlq`.
#[derive(Args, Debug, Clone)]
pub struct DlqArgs {
    /// What to do with the dead letters.
    #[command(subcommand)]
    pub action: DlqAction,
}

/// The `dlq` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum DlqAction {
    /// One line a dead letter: JOB:BATCH, task, error kind, attempts, time, error (with
    /// --json: job, batch, task, kind, error, attempts, at_ms, queue).
    List {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter as JSON: job, batch, task, kind, error, attempts, at_ms, queue, params
    /// and records.
    Show {
        /// The batch, as `JOB:BATCH` (its message id).
        id: String,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their work queue with attempts reset.
    Replay {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// All of them.
        #[arg(long, conflicts_with = "job")]
        all: bool,
    },
    /// Delete dead letters.
    Purge {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// All of them.
        #[arg(long, conflicts_with = "job")]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// One dead letter as read from the queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Job id, from the message id or the envelope.
    pub job: Option<String>,
    /// Batch number.
    pub batch: Option<u64>,
    /// Task name, when the body decodes.
    pub task: Option<String>,
    /// Error kind (`x-taskmill-error-kind`, or `delivery_limit`, `queue_full`... for the
    /// broker's own dead-letterings).
    pub kind: String,
    /// Error text.
    pub error: String,
    /// Attempts made.
    pub attempts: i64,
    /// When it died, ms since the epoch (0 if unknown).
    pub at_ms: i64,
    /// Full name of the work queue it came from.
    pub queue: Option<String>,
}

impl DeadLetter {
    fn from_message(m: &BasicGetMessage) -> Self {
        let p = &m.delivery.properties;
        let from_id = p
            .message_id()
            .as_ref()
            .and_then(|id| envelope::parse_message_id(id.as_str()));
        let env = envelope::decode(&m.delivery.data, usize::MAX).ok();
        let (job, batch) = match (&env, from_id) {
            (Some(e), _) => (Some(e.job.clone()), Some(e.batch)),
            (None, Some((j, b))) => (Some(j), Some(b)),
            (None, None) => (None, None),
        };
        let why = taskmill_common::dead::reason_of(p, 0);
        DeadLetter {
            job,
            batch,
            task: env.as_ref().map(|e| e.task.clone()),
            kind: why.kind,
            error: why.error,
            attempts: why.attempts,
            at_ms: why.at_ms,
            queue: why.queue,
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "job": self.job, "batch": self.batch, "task": self.task, "kind": self.kind,
            "error": self.error, "attempts": self.attempts, "at_ms": self.at_ms,
            "queue": self.queue,
        })
    }
}

struct DeadQueue {
    conn: Connection,
    channel: Channel,
    names: Names,
    /// Messages taken but not acked; given back by `release`.
    held: Vec<BasicGetMessage>,
    /// Dead letters still to read of those there at the start.
    left: u32,
}

impl DeadQueue {
    async fn open(conn_args: &ConnArgs) -> anyhow::Result<Self> {
        let names = Names::new(&conn_args.namespace);
        let conn = amqp::connect(&conn_args.amqp_url, "taskmill-producer-dlq").await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        topology::declare(&channel, &names, &[]).await?;
        let depth = channel
            .queue_declare(
                names.dead_queue().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count();
        Ok(Self {
            conn,
            channel,
            names,
            held: Vec::new(),
            left: depth,
        })
    }

    /// The next of the dead letters that were there at the start, or None when none is left.
    async fn next(&mut self) -> anyhow::Result<Option<BasicGetMessage>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        Ok(self
            .channel
            .basic_get(
                self.names.dead_queue().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?)
    }

    /// Gives back every held message (they stay dead letters) and closes.
    async fn release(self) -> anyhow::Result<()> {
        if let Some(last) = self.held.last() {
            last.delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: true,
                    requeue: true,
                })
                .await?;
        }
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
        Ok(())
    }
}

fn matches(d: &DeadLetter, job: Option<&str>) -> bool {
    job.is_none_or(|j| d.job.as_deref() == Some(j))
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (d, s) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Lists dead letters (all, or one job's) without removing them.
pub async fn list(conn: &ConnArgs, job: Option<&str>) -> anyhow::Result<Vec<DeadLetter>> {
    let mut q = DeadQueue::open(conn).await?;
    let mut out = Vec::new();
    while let Some(m) = q.next().await? {
        let d = DeadLetter::from_message(&m);
        if matches(&d, job) {
            out.push(d);
        }
        q.held.push(m);
    }
    q.release().await?;
    // By job, then batch (the queue's order is the order they died in).
    out.sort_by(|a, b| (&a.job, a.batch).cmp(&(&b.job, b.batch)));
    Ok(out)
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replayed {
    /// Dead letters sent back to their work queue.
    pub replayed: u64,
    /// Matching dead letters left where they are, each with the reason.
    pub skipped: Vec<String>,
}

/// Republishes matching dead letters (of those there when it starts) to their work queue.
/// A dead letter whose original queue is not a work queue of this namespace is skipped and
/// reported; it stays a dead letter.
pub async fn replay(conn: &ConnArgs, job: Option<&str>) -> anyhow::Result<Replayed> {
    let store = Store::connect(&conn.redis_url, &conn.namespace, conn.result_ttl).await?;
    let mut q = DeadQueue::open(conn).await?;
    let mut out = Replayed::default();
    while let Some(m) = q.next().await? {
        let d = DeadLetter::from_message(&m);
        if !matches(&d, job) {
            q.held.push(m);
            continue;
        }
        let label = match (&d.job, d.batch) {
            (Some(j), Some(b)) => envelope::message_id(j, b),
            _ => "a dead letter without job or batch".into(),
        };
        let short = d
            .queue
            .as_deref()
            .and_then(|full| q.names.short_queue(full))
            .filter(|s| topology::validate_routed_queue(s).is_ok())
            .map(str::to_string);
        let Some(short) = short else {
            out.skipped.push(format!(
                "{label}: its original queue {:?} is not a work queue of namespace {}",
                d.queue.as_deref().map(|s| envelope::bounded(s, 200)),
                q.names.ns
            ));
            q.held.push(m);
            continue;
        };
        // Reopened first, so that the replayed batch, however fast a worker settles it, is
        // counted once: done, or dead again.
        let identity = d.job.as_deref().zip(d.batch);
        let reopened = match identity {
            Some((j, b)) => store.reopen_batch(j, b).await?,
            None => None,
        };
        let props = replay_properties(&m.delivery.properties);
        let routed = amqp::publish_confirmed(
            &q.channel,
            &q.names.work_exchange(),
            &short,
            &m.delivery.data,
            props,
        )
        .await;
        let routed = match routed {
            Ok(r) => r,
            Err(e) => {
                if let (Some((j, b)), Some(reason)) = (identity, &reopened) {
                    store.record_dead(j, b, reason).await?;
                }
                return Err(e.into());
            }
        };
        if !routed {
            if let (Some((j, b)), Some(reason)) = (identity, &reopened) {
                store.record_dead(j, b, reason).await?;
            }
        }
        if routed {
            m.delivery.acker.ack(BasicAckOptions::default()).await?;
            out.replayed += 1;
        } else {
            out.skipped.push(format!(
                "{label}: the broker did not route it to work queue {short:?} (no such queue?)"
            ));
            q.held.push(m);
        }
    }
    q.release().await?;
    Ok(out)
}

/// The original properties with the attempt reset to 1, the headers of its attempt and death
/// removed, and its job's options kept.
fn replay_properties(p: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = p.headers() {
        for (k, v) in old.inner() {
            let k = k.as_str();
            if (k.starts_with("x-taskmill-") && !JOB_OPTION_HEADERS.contains(&k))
                || k == "x-delivery-count"
                || k.starts_with("x-death")
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death")
            {
                continue;
            }
            headers.insert(k.into(), v.clone());
        }
    }
    headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongLongInt(1));
    p.clone().with_headers(headers)
}

/// Deletes matching dead letters; returns how many.
pub async fn purge(conn: &ConnArgs, job: Option<&str>) -> anyhow::Result<u64> {
    let mut q = DeadQueue::open(conn).await?;
    let mut purged = 0;
    while let Some(m) = q.next().await? {
        if matches(&DeadLetter::from_message(&m), job) {
            m.delivery.acker.ack(BasicAckOptions::default()).await?;
            purged += 1;
        } else {
            q.held.push(m);
        }
    }
    q.release().await?;
    Ok(purged)
}

/// One dead letter (by its message id `JOB:BATCH`) as JSON: what `list` shows, plus its
/// params, records and headers; None when it is not in the dead-letter queue.
pub async fn find(conn: &ConnArgs, id: &str) -> anyhow::Result<Option<Value>> {
    let mut q = DeadQueue::open(conn).await?;
    let mut found = None;
    while let Some(m) = q.next().await? {
        let d = DeadLetter::from_message(&m);
        let this = match (&d.job, d.batch) {
            (Some(j), Some(b)) => envelope::message_id(j, b) == id,
            _ => false,
        };
        if this && found.is_none() {
            let env = envelope::decode(&m.delivery.data, usize::MAX);
            let records = match &env {
                Ok(e) => json!(e.records),
                Err(e) => json!(format!("<{e}; {} bytes>", m.delivery.data.len())),
            };
            let params = env.as_ref().map(|e| json!(e.params)).unwrap_or(Value::Null);
            let mut v = d.to_json();
            if let Some(o) = v.as_object_mut() {
                o.insert("params".into(), params);
                o.insert("records".into(), records);
                o.insert("headers".into(), headers_json(&m.delivery.properties));
            }
            found = Some(v);
        }
        q.held.push(m);
    }
    q.release().await?;
    Ok(found)
}

/// A message's headers as JSON (text bounded, nested tables as objects).
fn headers_json(p: &BasicProperties) -> Value {
    fn value(v: &AMQPValue) -> Value {
        match v {
            AMQPValue::LongString(s) => json!(envelope::bounded(
                &String::from_utf8_lossy(s.as_bytes()),
                1024
            )),
            AMQPValue::ShortString(s) => json!(s.as_str()),
            AMQPValue::Boolean(b) => json!(b),
            AMQPValue::FieldTable(t) => Value::Object(
                t.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), value(v)))
                    .collect(),
            ),
            AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value).collect()),
            other => {
                amqp::int_value(other).map_or_else(|| json!(format!("{other:?}")), |n| json!(n))
            }
        }
    }
    p.headers()
        .as_ref()
        .map(|h| {
            Value::Object(
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), value(v)))
                    .collect(),
            )
        })
        .unwrap_or_else(|| json!({}))
}

async fn show(conn: &ConnArgs, id: &str, as_json: bool) -> anyhow::Result<bool> {
    let Some(mut v) = find(conn, id).await? else {
        return Ok(false);
    };
    if let Some(o) = v.as_object_mut() {
        o.remove("headers");
    }
    if as_json {
        crate::out::line(&v.to_string());
    } else {
        crate::out::line(&serde_json::to_string_pretty(&v).context("formatting the dead letter")?);
    }
    Ok(true)
}

/// The command.
pub async fn run(conn: &ConnArgs, args: &DlqArgs) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match &args.action {
        DlqAction::List { job, json } => {
            let letters = list(conn, job.as_deref()).await?;
            let mut out = String::new();
            for d in &letters {
                if *json {
                    out.push_str(&d.to_json().to_string());
                } else {
                    out.push_str(&format!(
                        "{}:{}  {}  {}  attempts={}  {}  {}",
                        d.job.as_deref().unwrap_or("?"),
                        d.batch.map(|b| b.to_string()).unwrap_or_else(|| "?".into()),
                        d.task.as_deref().unwrap_or("?"),
                        d.kind,
                        d.attempts,
                        when(d.at_ms),
                        d.error
                    ));
                }
                out.push('\n');
            }
            crate::out::print(&out);
            if !*json {
                eprintln!("{} dead letters", letters.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Show { id, json } => {
            if show(conn, id, *json).await? {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(CliError::NoSuchJob(format!(
                    "no dead letter {:?} (give it as JOB:BATCH, as `dlq list` shows)",
                    envelope::bounded(id, 200)
                ))
                .into())
            }
        }
        DlqAction::Replay { job, all } => {
            if job.is_none() && !all {
                return Err(CliError::Usage(
                    "say which dead letters to replay: --job JOB or --all".into(),
                )
                .into());
            }
            let r = replay(conn, job.as_deref()).await?;
            for s in &r.skipped {
                eprintln!("skipped {s}");
            }
            eprintln!(
                "replayed {} dead letters{}",
                r.replayed,
                if r.skipped.is_empty() {
                    String::new()
                } else {
                    format!("; skipped {} (they stay dead letters)", r.skipped.len())
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Purge { job, all, yes } => {
            if job.is_none() && !all {
                return Err(CliError::Usage(
                    "say which dead letters to purge: --job JOB or --all".into(),
                )
                .into());
            }
            let what = match job {
                Some(j) => format!("purge the dead letters of job {j}"),
                None => "purge ALL dead letters".to_string(),
            };
            if !crate::out::confirm(&what, *yes)? {
                eprintln!("nothing purged");
                return Ok(ExitCode::from(crate::error::EXIT_USAGE));
            }
            let n = purge(conn, job.as_deref()).await?;
            eprintln!("purged {n} dead letters");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::when(0), "-");
        assert_eq!(super::when(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
