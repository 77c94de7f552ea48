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
//! - `{ns}.{queue}.s{i}`: shards 1 to N−1 of a work queue spread over N (shard 0 is the work
//!   queue itself), quorum queues like it, bound by their own routing key.
//!
//! Namespaces and queue names cannot contain `.` (see `config::validate_name`), so every
//! name above has exactly one reading.

pub use taskmill_protocol::names::{
    band_rank, base_queue, priority_queue, retry_queue, shard_queue, tier_at_most, validate_key,
    validate_queue, validate_routed_queue, with_bands, with_shards, Names, BAND_RANKS,
    DEAD_EVENTS_MAX, DEFAULT_QUEUE, DELAY_TIERS_MS, DELIVERY_LIMIT, MAX_SHARDS, PRIORITY_BANDS,
};

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
    Channel, ExchangeKind,
};

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

/// Declares the exchanges, the dead-letter queues and the given work queues (short names,
/// each with how many shards it is spread over), each with its shards and priority bands.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    queues: &[(String, u16)],
) -> lapin::Result<()> {
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
    for queue in queues
        .iter()
        .flat_map(|(q, shards)| with_shards(q, *shards))
    {
        let queue = &queue;
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
