//! Dead letters: list, show, replay and purge the batches in `{ns}.dead`, for every front door
//! (the producer's `dlq` command, the dashboard).
//!
//! Reading them without removing them uses `basic.get` without ack and gives them back (nack
//! with requeue) at the end, so listing and showing change nothing. A replay republishes
//! matching batches to their original work queue with the attempt counter reset, the headers
//! of their attempt and death removed and their job's options kept (time limit, rate limit,
//! expiry, start time), waits for the broker's confirm, and only then acks the dead letter.
//! Before publishing it reopens the batch in its job (no longer dead, the job running again,
//! its summary to be folded again), and puts the dead count back if the broker does not take
//! the batch. Every call reads only the dead letters that were there when it started (the
//! queue's depth then): a replayed batch that fails again comes back behind them and is left
//! for the next replay, so a call always ends.

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
use taskmill_broker::{amqp, topology};
use taskmill_protocol::{
    envelope::{self, HEADER_ATTEMPT, JOB_OPTION_HEADERS},
    names::Names,
};

use crate::{Client, Error, Result, Settings};

fn lapin_err(e: lapin::Error) -> Error {
    Error::broker("the dead-letter queue", &e)
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
        let why = taskmill_broker::dead::reason_of(p, 0);
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
    async fn open(settings: &Settings) -> Result<Self> {
        let names = Names::new(&settings.namespace);
        let conn = amqp::connect(&settings.amqp_url, "taskmill-dlq")
            .await
            .map_err(|e| Error::broker("connecting to RabbitMQ", &e))?;
        let channel = conn.create_channel().await.map_err(lapin_err)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(lapin_err)?;
        topology::declare(&channel, &names, &[])
            .await
            .map_err(lapin_err)?;
        let depth = channel
            .queue_declare(
                names.dead_queue().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(lapin_err)?
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
    async fn next(&mut self) -> Result<Option<BasicGetMessage>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        self.channel
            .basic_get(
                self.names.dead_queue().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(lapin_err)
    }

    /// Gives back every held message (they stay dead letters) and closes.
    async fn release(self) -> Result<()> {
        if let Some(last) = self.held.last() {
            last.delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: true,
                    requeue: true,
                })
                .await
                .map_err(lapin_err)?;
        }
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
        Ok(())
    }
}

fn matches(d: &DeadLetter, job: Option<&str>) -> bool {
    job.is_none_or(|j| d.job.as_deref() == Some(j))
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replayed {
    /// Dead letters sent back to their work queue.
    pub replayed: u64,
    /// Matching dead letters left where they are, each with the reason.
    pub skipped: Vec<String>,
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

impl Client {
    /// Lists dead letters (all, or one job's) without removing them.
    pub async fn dead_letters(&self, job: Option<&str>) -> Result<Vec<DeadLetter>> {
        list(self.settings(), job).await
    }

    /// Republishes matching dead letters (of those there when it starts) to their work queue.
    /// A dead letter whose original queue is not a work queue of this namespace is skipped and
    /// reported; it stays a dead letter.
    pub async fn replay_dead(&self, job: Option<&str>) -> Result<Replayed> {
        let store = self.store();
        let mut q = DeadQueue::open(self.settings()).await?;
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
                // A shard's batch goes back to shard 0 (the work queue itself), which exists
                // whatever the queue's shards became.
                .map(|s| topology::retry_queue(s).to_string());
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
                    return Err(lapin_err(e));
                }
            };
            if !routed {
                if let (Some((j, b)), Some(reason)) = (identity, &reopened) {
                    store.record_dead(j, b, reason).await?;
                }
            }
            if routed {
                m.delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(lapin_err)?;
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

    /// Deletes matching dead letters; returns how many.
    pub async fn purge_dead(&self, job: Option<&str>) -> Result<u64> {
        purge(self.settings(), job).await
    }

    /// One dead letter (by its message id `JOB:BATCH`) as JSON: what `list` shows, plus its
    /// params, records and headers; None when it is not in the dead-letter queue.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<Value>> {
        find(self.settings(), id).await
    }
}

/// [`Client::dead_letters`] from settings. Needs RabbitMQ only (no client, no Redis): the command line's way.
pub async fn list(settings: &Settings, job: Option<&str>) -> Result<Vec<DeadLetter>> {
    let mut q = DeadQueue::open(settings).await?;
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

/// [`Client::purge_dead`] from settings. Needs RabbitMQ only (no client, no Redis): the command line's way.
pub async fn purge(settings: &Settings, job: Option<&str>) -> Result<u64> {
    let mut q = DeadQueue::open(settings).await?;
    let mut purged = 0;
    while let Some(m) = q.next().await? {
        if matches(&DeadLetter::from_message(&m), job) {
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(lapin_err)?;
            purged += 1;
        } else {
            q.held.push(m);
        }
    }
    q.release().await?;
    Ok(purged)
}

/// [`Client::dead_letter`] from settings. Needs RabbitMQ only (no client, no Redis): the command line's way.
pub async fn find(settings: &Settings, id: &str) -> Result<Option<Value>> {
    let mut q = DeadQueue::open(settings).await?;
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
