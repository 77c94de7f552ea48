//! Celery ingress: a worker started with `--celery-queue NAME` also consumes a queue that
//! Celery apps publish to, and turns each call into a taskmill job of one batch whose id is
//! the Celery task id. The call's records (`args[0]`) and parameters (`kwargs`) become the
//! batch, published with confirms to the worker's first work queue with the call's ETA,
//! expiry and time limit as taskmill headers; the job is registered whole first (its batch
//! count known), with a token derived from the task id, so a call delivered again finds its
//! own registration and publishes its batch again (the store keeps one result a batch), or,
//! when it finished already, nothing. The Celery message is acked only once its batch is
//! confirmed. From there it is a batch like any other (retries, delay tiers, dead letters,
//! cancel, status and the dashboard); the script that finishes the job writes the Celery
//! result (`taskmill_store::celery`). A call that cannot be a job gets a FAILURE result
//! saying why (unknown task, pickle, bad parameters), so `get()` raises instead of waiting.

mod next;
pub mod wire;

pub(crate) use next::NextCalls;

use std::collections::BTreeMap;

use futures::StreamExt as _;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
    Channel, Connection, ExchangeKind,
};
use serde_json::Value;
use taskmill_client::{batcher::Batcher, publisher::Publisher, ProblemLog};
use taskmill_common::{
    amqp,
    config::validate_job_id,
    envelope::{Record, HEADER_ETA, HEADER_EXPIRES, HEADER_TIME_LIMIT},
    store::{
        celery::{CeleryRefusal, CeleryRegistered, CelerySettings},
        NewJob, Store,
    },
    task::Registry,
    topology::{priority_queue, Names},
    Backoff,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::args::WorkerArgs;
use wire::{Call, Refused};

/// Celery messages read before their batches are published and they are acked together.
const ROUND: usize = 256;

/// Runs the ingress until `shutdown`, reconnecting with backoff.
pub(crate) async fn run(args: WorkerArgs, registry: Registry, shutdown: CancellationToken) {
    let aliases = match args.celery.alias_table() {
        Ok(a) => a,
        Err(e) => {
            warn!("celery ingress: {e}");
            return;
        }
    };
    let ingress = Ingress {
        names: Names::new(&args.conn.namespace),
        queue: args
            .queues
            .first()
            .cloned()
            .unwrap_or_else(|| "tasks".into()),
        args,
        registry,
        aliases,
    };
    let mut backoff = Backoff::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(10),
    );
    while !shutdown.is_cancelled() {
        match ingress.session(&shutdown, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(
                    "celery ingress: {}; reconnecting in {delay:?}",
                    taskmill_common::error_text(&*e)
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

struct Ingress {
    args: WorkerArgs,
    names: Names,
    /// The work queue the calls' batches go to.
    queue: String,
    registry: Registry,
    aliases: BTreeMap<String, String>,
}

/// A call ready to publish: its registration and its batches.
struct Ready {
    call: Call,
    /// The Celery queue it came from.
    celery_queue: String,
    /// Its priority (the message's, 0 to 9).
    priority: u8,
    task: String,
    params: BTreeMap<String, String>,
    records: u64,
    batches: Vec<taskmill_client::batcher::Prepared>,
}

impl Ingress {
    async fn session(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let conn_args = &self.args.conn;
        let store = Store::connect(
            &conn_args.redis_url,
            &conn_args.namespace,
            conn_args.result_ttl,
        )
        .await?;
        let conn = amqp::connect(&conn_args.amqp_url, "taskmill-celery-ingress").await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(ROUND as u16, BasicQosOptions::default())
            .await?;
        let mut consumers = Vec::new();
        for q in &self.args.celery.queues {
            declare_celery_queue(&conn, &channel, q, &self.args.celery.queue_type).await?;
            let consumer = channel
                .basic_consume(
                    q.as_str().into(),
                    format!("taskmill-celery-{}", uuid::Uuid::new_v4().simple())
                        .as_str()
                        .into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let queue = q.clone();
            consumers.push(consumer.map(move |d| (queue.clone(), d)));
        }
        // One publisher a priority band the calls use (Celery's `priority`, 0 to 9 as
        // taskmill's), made on first use.
        let mut publishers: BTreeMap<String, Publisher> = BTreeMap::new();
        backoff.reset();
        info!(queues = %self.args.celery.queues.join(","), to = %self.queue, "celery ingress consuming");
        let mut deliveries = futures::stream::select_all(consumers).ready_chunks(ROUND);
        loop {
            let round = tokio::select! {
                _ = shutdown.cancelled() => break,
                round = deliveries.next() => round,
            };
            let Some(round) = round else {
                anyhow::bail!("the broker ended the consumers (was a Celery queue deleted?)");
            };
            let mut got = Vec::with_capacity(round.len());
            for (queue, d) in round {
                got.push((queue, d?));
            }
            self.round(&store, &mut publishers, &channel, got).await?;
        }
        for p in publishers.values_mut() {
            let _ = p.finish().await;
        }
        let _ = conn.close(200, "worker stopping".into()).await;
        Ok(())
    }

    /// Turns one round of deliveries into jobs, publishes their batches, and acks them once
    /// every batch is confirmed. Any error leaves them unacked (the broker redelivers them
    /// when the session's connection goes).
    async fn round(
        &self,
        store: &Store,
        publishers: &mut BTreeMap<String, Publisher>,
        channel: &Channel,
        deliveries: Vec<(String, Delivery)>,
    ) -> anyhow::Result<()> {
        let Some(last) = deliveries.last().map(|(_, d)| d.delivery_tag) else {
            return Ok(());
        };
        let mut ready = Vec::new();
        for (queue, d) in &deliveries {
            let p = &d.properties;
            let decoded = wire::decode(
                p.content_type().as_ref().map(|s| s.as_str()),
                p.content_encoding().as_ref().map(|s| s.as_str()),
                p.headers().as_ref(),
                &d.data,
            )
            .and_then(|call| self.prepare(call, queue, p.priority().unwrap_or(0).min(9)));
            match decoded {
                Ok(r) => ready.push(r),
                Err(refused) => self.refuse(store, &refused).await?,
            }
        }
        // Registered together (one round trip for the round), then published together.
        let registered =
            futures::future::join_all(ready.iter().map(|r| self.register(store, r))).await;
        let mut batches: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for (r, outcome) in ready.into_iter().zip(registered) {
            match outcome? {
                CeleryRegistered::Publish => batches
                    .entry(priority_queue(&self.queue, r.priority))
                    .or_default()
                    .extend(r.batches),
                CeleryRegistered::Finished => {}
                CeleryRegistered::Taken => {
                    let why = format!(
                        "a taskmill job with id {} exists already (a task id used twice)",
                        r.call.id
                    );
                    self.refuse(store, &refusal(&r.call.id, "ValueError", why))
                        .await?;
                }
            }
        }
        for (routing_key, batches) in batches {
            let publisher = match publishers.entry(routing_key.clone()) {
                std::collections::btree_map::Entry::Occupied(p) => p.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => v.insert(
                    Publisher::connect(
                        &self.args.conn.amqp_url,
                        self.names.clone(),
                        &self.queue,
                        // A call is one batch, batch 0: shard 0 whatever the queue's shards.
                        1,
                        ROUND,
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .with_routing_key(routing_key),
                ),
            };
            publisher
                .publish_many(batches)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            publisher
                .settle_all()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
        Ok(())
    }

    /// The task, parameters and batch of a call, or why it cannot run.
    fn prepare(&self, call: Call, queue: &str, priority: u8) -> Result<Ready, Refused> {
        let refuse = |exc_type, why: String| refusal(&call.id, exc_type, why);
        if let Err(e) = validate_job_id(&call.id) {
            return Err(refuse(
                "ValueError",
                format!("the Celery task id cannot be a taskmill job id: {e}"),
            ));
        }
        if let Some(what) = call.workflow.first() {
            return Err(refuse(
                "NotImplementedError",
                format!("taskmill does not run Celery {what}s yet: call the task alone"),
            ));
        }
        let Some(task) = self.task_for(&call.task) else {
            return Err(refuse(
                "NotRegistered",
                format!(
                    "{:?}: no such task on this worker (it serves {}; map other names with --celery-alias NAME=TASK)",
                    call.task,
                    self.registry.names().join(", ")
                ),
            ));
        };
        if call.args.len() > 1 {
            return Err(refuse(
                "TypeError",
                format!(
                    "{task} takes one positional argument, the records, and got {}; pass parameters as keyword arguments",
                    call.args.len()
                ),
            ));
        }
        let records: Vec<Value> = match call.args.first() {
            Some(Value::Array(a)) => a.clone(),
            Some(Value::Null) | None => Vec::new(),
            // One object (a step of a chain gets the result before it): one record.
            Some(other) => vec![other.clone()],
        };
        if records.is_empty() {
            return Err(refuse(
                "ValueError",
                format!("{task} got no records: pass them as the first argument, a list"),
            ));
        }
        let params: BTreeMap<String, String> = call
            .kwargs
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect();
        if let Err(e) =
            taskmill_common::task::check_params(&task, self.registry.params(&task), &params)
        {
            return Err(refuse("TypeError", e));
        }
        let mut headers = Vec::new();
        if let Some(eta) = call.eta_ms {
            headers.push((HEADER_ETA, eta as i64));
        }
        if let Some(exp) = call.expires_ms {
            headers.push((HEADER_EXPIRES, exp as i64));
        }
        if let Some(limit) = call.time_limit {
            headers.push((HEADER_TIME_LIMIT, limit.as_millis() as i64));
        }
        let n = records.len();
        let mut batcher = Batcher::new(&call.id, &task, &params, n, self.args.max_message_bytes)
            .with_headers(headers);
        let problems = ProblemLog::default();
        let mut batches = Vec::new();
        for r in &records {
            batcher.push(Record::from_value(r), &mut batches, &problems);
        }
        batcher.flush(&mut batches, &problems);
        if batches.len() != 1 || problems.snapshot().records_invalid > 0 {
            return Err(refuse(
                "ValueError",
                format!(
                    "the call's {n} records do not fit one message of {} bytes (--max-message-bytes): send fewer a call",
                    self.args.max_message_bytes
                ),
            ));
        }
        Ok(Ready {
            priority,
            celery_queue: queue.to_string(),
            call,
            task,
            params,
            records: n as u64,
            batches,
        })
    }

    /// The task a Celery name runs: an alias, the name itself, or its last dotted part with
    /// `_` as `-`.
    fn task_for(&self, name: &str) -> Option<String> {
        if let Some(t) = self.aliases.get(name) {
            return Some(t.clone());
        }
        if self.registry.get(name).is_some() {
            return Some(name.to_string());
        }
        let last = name.rsplit('.').next().unwrap_or(name).replace('_', "-");
        self.registry.get(&last).map(|_| last)
    }

    /// Where a call's result goes (a refused call's: nothing else is known).
    fn settings(&self, id: &str) -> CelerySettings {
        CelerySettings {
            key: format!("{}{id}", self.args.celery.key_prefix),
            expires: self.args.celery.result_expires,
            parent_id: None,
            group_id: None,
            root_id: None,
            queue: None,
            chain: Vec::new(),
            msgpack: self.args.celery.result_serializer == "msgpack",
        }
    }

    async fn register(
        &self,
        store: &Store,
        r: &Ready,
    ) -> Result<CeleryRegistered, taskmill_common::store::StoreError> {
        let token = format!("celery-{}", r.call.id);
        let job = NewJob {
            id: &r.call.id,
            task: &r.task,
            queue: &self.queue,
            params: &r.params,
            unique_key: None,
            token: &token,
            then: "",
            parent: r.call.parent_id.as_deref().unwrap_or(""),
            group: "",
            on_complete: "",
            parent_outcome: "",
        };
        let settings = CelerySettings {
            parent_id: r.call.parent_id.clone(),
            group_id: r.call.group.clone(),
            root_id: r.call.root_id.clone(),
            queue: Some(r.celery_queue.clone()),
            chain: r.call.chain.clone(),
            ..self.settings(&r.call.id)
        };
        let mut options: Vec<(&str, u64)> = Vec::new();
        for (field, v) in [
            ("eta_ms", r.call.eta_ms),
            ("expires_ms", r.call.expires_ms),
            (
                "time_limit_ms",
                r.call.time_limit.map(|t| t.as_millis() as u64),
            ),
            (
                "priority",
                (r.priority > 0).then_some(u64::from(r.priority)),
            ),
        ] {
            if let Some(v) = v {
                options.push((field, v));
            }
        }
        store
            .register_celery_call(&job, r.batches.len() as u64, r.records, &settings, &options)
            .await
    }

    /// Tells the app why its call does not run (when the message says who asked).
    async fn refuse(&self, store: &Store, refused: &Refused) -> anyhow::Result<()> {
        let Some(id) = refused.id.as_deref() else {
            warn!(
                "celery ingress: a message without a task id dropped: {}",
                refused.why
            );
            return Ok(());
        };
        warn!(task_id = id, "celery call refused: {}", refused.why);
        let settings = self.settings(id);
        store
            .celery_refuse(
                &settings,
                &CeleryRefusal {
                    id,
                    status: "FAILURE",
                    exc_type: refused.exc_type,
                    exc_module: exc_module(refused.exc_type),
                    message: &refused.why,
                },
            )
            .await?;
        Ok(())
    }
}

fn refusal(id: &str, exc_type: &'static str, why: String) -> Refused {
    Refused {
        id: Some(id.to_string()),
        exc_type,
        why,
    }
}

/// Where the exception a refusal names lives in the app, so that `get()` raises the real
/// class when it has it (Celery makes the others up in `celery.exceptions`).
fn exc_module(exc_type: &str) -> &'static str {
    match exc_type {
        "TypeError" | "ValueError" | "NotImplementedError" => "builtins",
        "NotRegistered" => "celery.exceptions",
        "ContentDisallowed" | "DecodeError" => "kombu.exceptions",
        _ => "taskmill",
    }
}

/// Makes sure a Celery queue exists without changing one the app declared: a passive declare
/// first (on a channel of its own: a missing queue closes it); when missing, declared as
/// kombu declares a default queue (durable, bound to a direct exchange of its name), classic
/// or quorum as asked.
async fn declare_celery_queue(
    conn: &Connection,
    channel: &Channel,
    queue: &str,
    queue_type: &str,
) -> anyhow::Result<()> {
    let probe = conn.create_channel().await?;
    let passive = probe
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    if passive.is_ok() {
        let _ = probe.close(200, "".into()).await;
        return Ok(());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut args = FieldTable::default();
    if queue_type == "quorum" {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    channel.queue_declare(queue.into(), durable, args).await?;
    channel
        .exchange_declare(
            queue.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            queue.into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(
        queue,
        queue_type, "declared the Celery queue (the app had not yet)"
    );
    Ok(())
}

/// Whether the worker runs the ingress.
pub(crate) fn wanted(args: &WorkerArgs) -> bool {
    !args.celery.queues.is_empty()
}
