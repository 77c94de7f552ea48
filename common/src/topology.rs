//! Names of exchanges and queues, and their declaration.
//!
//! Both binaries declare the topology at start and after every reconnect, with identical
//! arguments, so that whichever starts first creates it and nobody's declaration fails.
//!
//! - `{ns}.work`: direct exchange; the producer publishes a batch with the short queue name as
//!   routing key.
//! - `{ns}.{queue}`: quorum work queue bound to `{ns}.work`; its dead-letter exchange is
//!   `{ns}.dlx` and it has a delivery limit, so that a batch that kills worker after worker
//!   still ends among the dead letters.
//! - `{ns}.dlx`: fanout exchange of dead letters, bound to two quorum queues: `{ns}.dead`,
//!   which people inspect and replay (`producer dlq`), and `{ns}.dead.events`, which workers
//!   consume to count every dead letter in its job, whoever dead-lettered it (a worker, or the
//!   broker itself when a batch reached the delivery limit).
//! - `{ns}.{queue}.delay.{ms}`: retry delay queues, one per tier of [`DELAY_TIERS_MS`].
//!
//! Namespaces and queue names cannot contain `.` (see `config::validate_name`), so every
//! name above has exactly one reading.

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    Channel, ExchangeKind,
};

/// Default short name of the work queue.
pub const DEFAULT_QUEUE: &str = "tasks";

/// How many times the broker delivers a batch before it dead-letters it itself. Counts
/// deliveries that ended without an ack (a worker died or lost its connection); taskmill's
/// own retries are new messages and do not count here.
pub const DELIVERY_LIMIT: i64 = 10;

/// The delays a retry can wait, in ms: a small fixed set, so that a work queue has at most
/// this many delay queues whatever the retry settings. A computed delay is rounded to one of
/// its two neighbouring tiers (see the worker's retry policy).
pub const DELAY_TIERS_MS: &[u64] = &[
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    1_800_000, 3_600_000, 10_800_000, 21_600_000, 43_200_000, 86_400_000,
];

/// Longest queue of dead-letter events kept for counting when no worker runs.
const DEAD_EVENTS_MAX: i64 = 1_000_000;

/// Names of one namespace's broker objects.
#[derive(Debug, Clone)]
pub struct Names {
    /// The namespace prefix.
    pub ns: String,
}

impl Names {
    /// Names under namespace `ns`.
    pub fn new(ns: &str) -> Self {
        Self { ns: ns.to_string() }
    }
    /// The exchange that producers publish batches to.
    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.ns)
    }
    /// The full name of work queue `queue`.
    pub fn queue(&self, queue: &str) -> String {
        format!("{}.{}", self.ns, queue)
    }
    /// The dead-letter exchange.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dlx", self.ns)
    }
    /// The dead-letter queue.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// The queue of dead-letter copies that workers consume to count them in their jobs.
    pub fn dead_events(&self) -> String {
        format!("{}.dead.events", self.ns)
    }
    /// The delay queue that holds retries of work queue `queue` for `delay_ms`.
    pub fn delay_queue(&self, queue: &str, delay_ms: u64) -> String {
        format!("{}.{}.delay.{}", self.ns, queue, delay_ms)
    }
    /// The short queue name of a full work-queue name of this namespace.
    pub fn short_queue<'a>(&self, full: &'a str) -> Option<&'a str> {
        full.strip_prefix(self.ns.as_str())?.strip_prefix('.')
    }
}

/// Checks a short queue name given on the command line.
pub fn validate_queue(queue: &str) -> Result<(), String> {
    crate::config::validate_name("queue name", queue)?;
    if matches!(queue, "dead" | "dlx" | "work") {
        return Err(format!(
            "queue name {queue:?} is reserved for taskmill's own use"
        ));
    }
    Ok(())
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

/// Declares the delay queue for retries of `queue` after `delay_ms`: a quorum queue whose
/// TTL moves its messages back to the work queue (at-least-once dead-lettering).
pub async fn declare_delay_queue(
    channel: &Channel,
    names: &Names,
    queue: &str,
    delay_ms: u64,
) -> lapin::Result<String> {
    let name = names.delay_queue(queue, delay_ms);
    let mut args = quorum_args();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_string()));
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(delay_ms as i64),
    );
    args.insert("x-dead-letter-exchange".into(), s(&names.work_exchange()));
    args.insert("x-dead-letter-routing-key".into(), s(queue));
    args.insert("x-dead-letter-strategy".into(), s("at-least-once"));
    args.insert("x-overflow".into(), s("reject-publish"));
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    Ok(name)
}

/// Declares the exchanges, the dead-letter queue and the given work queues (short names).
pub async fn declare(channel: &Channel, names: &Names, queues: &[String]) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            names.work_exchange().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            names.dead_exchange().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue_opts = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut events_args = quorum_args();
    events_args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(DEAD_EVENTS_MAX),
    );
    for (queue, args) in [
        (names.dead_queue(), quorum_args()),
        (names.dead_events(), events_args),
    ] {
        let queue: ShortString = queue.into();
        channel
            .queue_declare(queue.clone(), queue_opts, args)
            .await?;
        channel
            .queue_bind(
                queue,
                names.dead_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for queue in queues {
        let mut args = quorum_args();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(names.dead_exchange().into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        let full: ShortString = names.queue(queue).into();
        channel
            .queue_declare(full.clone(), queue_opts, args)
            .await?;
        channel
            .queue_bind(
                full,
                names.work_exchange().into(),
                queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}
