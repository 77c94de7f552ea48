//! One connection's life: connect, declare, consume, hand deliveries to rayon and their
//! outcomes to the sink, drain on shutdown, close. Reconnecting is the caller's loop.

use std::{sync::Arc, time::Duration};

use futures::{
    future::BoxFuture,
    stream::{BoxStream, FuturesUnordered},
    FutureExt, StreamExt,
};
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::{FieldTable, ShortString},
    Channel, Connection,
};
use taskmill_common::{amqp, store::Store, topology};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    ack::AckTracker,
    dead_events,
    drain::{Drain, Phase},
    pool::{Arrived, Processed},
    sink::Sink,
    Shared,
};

/// Most deliveries handed to the rayon pool as one job.
const RAYON_GROUP: usize = 64;

/// How often a session looks whether its queues' shard counts grew.
const SHARDS_CHECK: Duration = Duration::from_secs(5);

/// A delivery stream item: channel index, short queue name, delivery or error.
/// What a consumer gave: a delivery (or its error), or None once that consumer ended.
type Incoming = (usize, String, Option<lapin::Result<Delivery>>);

/// Everything one session holds.
struct Session {
    conn: Connection,
    publish_conn: Connection,
    channels: Vec<Channel>,
    tags: Vec<ShortString>,
    deliveries: BoxStream<'static, Incoming>,
    tracker: Arc<std::sync::Mutex<AckTracker>>,
    events_ch: Channel,
    events_task: JoinHandle<anyhow::Result<()>>,
    events_stop: CancellationToken,
    sink_task: JoinHandle<anyhow::Result<()>>,
    tx: Option<mpsc::Sender<Processed>>,
    hard_stop: CancellationToken,
    drain: Drain,
    /// Cancelled when a queue's shard count grew beyond what this session consumes: it
    /// drains as for a shutdown, and the next session consumes every shard.
    resharded: CancellationToken,
}

/// How a session that did not fail ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Shut down (a signal, or every thread stuck).
    Stopped,
    /// A queue's shard count grew: the worker opens a new session at once.
    Resharded,
}

/// Connects, consumes until shutdown or a queue's new shards (Ok) or until the connection
/// fails (Err), closes.
pub(crate) async fn session(
    shared: &Shared,
    shutdown: &CancellationToken,
    backoff: &mut taskmill_common::Backoff,
) -> anyhow::Result<Ended> {
    let mut s = Session::open(shared).await?;
    backoff.reset();
    let result = s.consume(shared, shutdown).await;
    let resharded = s.resharded.is_cancelled() && !shutdown.is_cancelled();
    let closed = s.close(result).await;
    // Sessions run one at a time: whatever this one still counted in flight was settled or
    // went back to the broker with its connection.
    shared.stats.clear_in_flight();
    closed.map(|()| {
        if resharded {
            Ended::Resharded
        } else {
            Ended::Stopped
        }
    })
}

/// Every [`SHARDS_CHECK`] until `stop`: cancels `grown` once one of `queues` has more shards
/// in Redis than the session consumes (a producer's `--shards`). Redis errors are the sink's
/// to report; this only looks again later.
async fn watch_shards(
    store: Store,
    queues: Vec<(String, u16)>,
    grown: CancellationToken,
    stop: CancellationToken,
) {
    let names: Vec<String> = queues.iter().map(|(q, _)| q.clone()).collect();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SHARDS_CHECK) => {}
            _ = stop.cancelled() => return,
        }
        if let Ok(now) = store.shards_of(&names).await {
            if let Some(((q, had), n)) = queues.iter().zip(now).find(|((_, had), n)| n > had) {
                info!(queue = %q, shards = n, was = had,
                    "the queue has new shards: finishing what is in hand to consume them all");
                grown.cancel();
                return;
            }
        }
    }
}

impl Session {
    async fn open(shared: &Shared) -> anyhow::Result<Self> {
        let args = &shared.args;
        let store = Store::connect(
            &args.conn.redis_url,
            &args.conn.namespace,
            args.conn.result_ttl,
        )
        .await?;
        shared.health.set_redis(true);
        *shared
            .analyser
            .rate_store
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(store.clone());
        // Each queue's shards: raised to --shards, else as many as it has.
        let mut queues = Vec::with_capacity(args.queues.len());
        for q in &args.queues {
            queues.push((q.clone(), store.shards(q, args.shards).await?));
        }
        let conn = amqp::connect(&args.conn.amqp_url, "taskmill-worker").await?;
        // Retries and dead letters go out on a connection of their own: a broker alarm blocks
        // publishing connections, and this one must keep consuming and acking meanwhile.
        let publish_conn = amqp::connect(&args.conn.amqp_url, "taskmill-worker-publish").await?;
        let publish_ch = publish_conn.create_channel().await?;
        publish_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        topology::declare(&publish_ch, &shared.names, &queues).await?;
        let (events_ch, events) = consume(&conn, &shared.names.dead_events(), 32).await?;
        let events_stop = CancellationToken::new();
        let events_task =
            tokio::spawn(dead_events::run(events, store.clone(), events_stop.clone()));
        let (channels, tags, deliveries) = consume_queues(&conn, shared, &queues).await?;
        let resharded = CancellationToken::new();
        tokio::spawn(watch_shards(
            store.clone(),
            queues.clone(),
            resharded.clone(),
            events_stop.clone(),
        ));
        // The delay queues this session declares, and a look at their heads now and then.
        let declared = crate::sweep::Declared::default();
        let sweep_ch = publish_conn.create_channel().await?;
        sweep_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        tokio::spawn(crate::sweep::run(
            sweep_ch,
            shared.names.clone(),
            declared.clone(),
            events_stop.clone(),
        ));
        // Stored batches wait for lower tags at most half a prefetch a channel.
        let tracker = Arc::new(std::sync::Mutex::new(AckTracker::new(
            channels.len(),
            usize::from(args.prefetch) / 2,
        )));
        let hard_stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel(usize::from(args.prefetch) * tags.len() + 16);
        let sink = Sink {
            store,
            channel: publish_ch,
            tracker: tracker.clone(),
            consumers: channels.clone(),
            names: shared.names.clone(),
            policy: args.retry,
            stats: shared.stats.clone(),
            health: shared.health.clone(),
            hard_stop: hard_stop.clone(),
            declared,
            registry: shared.analyser.registry.clone(),
            unknown_task_wait: std::time::Duration::from_secs(args.unknown_task_wait),
            publishing: publish_conn.status().clone(),
            id: uuid::Uuid::new_v4().simple().to_string(),
        };
        let shown: Vec<String> = queues
            .iter()
            .map(|(q, n)| match n {
                1 => q.clone(),
                n => format!("{q} ({n} shards)"),
            })
            .collect();
        info!(queues = %shown.join(","), "consuming");
        shared.health.set_rabbitmq(true);
        shared.health.set_consuming(true);
        Ok(Self {
            conn,
            publish_conn,
            channels,
            tags,
            deliveries,
            tracker,
            events_ch,
            events_task,
            events_stop,
            sink_task: tokio::spawn(sink.run(rx)),
            tx: Some(tx),
            hard_stop,
            drain: Drain::new(Duration::from_secs(args.shutdown_timeout)),
            resharded,
        })
    }

    /// The consume loop: Ok once drained (or out of time), Err when the connection failed.
    async fn consume(
        &mut self,
        shared: &Shared,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut inflight: FuturesUnordered<BoxFuture<'static, (bool, Vec<Processed>)>> =
            FuturesUnordered::new();
        // Deliveries that arrived while the pool had as many groups as it takes: they go
        // together as the next group, so that under load a wake-up of the pool carries many
        // batches. Priority bands first.
        let mut waiting = Waiting::default();
        // Groups of priority bands on the pool now: they have their own allowance, so that a
        // band's batch never waits for groups of the backlog to finish.
        let mut urgent = 0;
        let mut ended = false;
        // Set while deliveries wait for more to join them (see `WorkerArgs::gather_ms`): the
        // consumers are not polled meanwhile, so that arrivals wake nobody.
        let linger_for = Duration::from_millis(shared.args.gather_ms);
        let mut linger: Option<Instant> = None;
        loop {
            // One group at a time while batches are short, else one a thread (the pumps'
            // rule: see `Pumps::groups_wanted`), asked only when deliveries wait.
            while let Some(rank) = waiting.top_rank().filter(|_| linger.is_none()) {
                let wanted = shared.analyser.pumps.groups_wanted();
                let is_urgent = rank > 0;
                let room = if is_urgent {
                    urgent < wanted
                } else {
                    inflight.len() - urgent < wanted
                };
                if !room {
                    break;
                }
                let group = waiting.take(rank, RAYON_GROUP);
                urgent += usize::from(is_urgent);
                let analysed = shared.analyser.analyse_group(group);
                inflight.push(analysed.map(move |g| (is_urgent, g)).boxed());
            }
            let in_hand = inflight.len() + waiting.len();
            if self.drain.progress(ended, in_hand) {
                return Ok(());
            }
            let deadline = self.drain.deadline();
            let draining = self.drain.draining();
            tokio::select! {
                Some((was_urgent, group)) = inflight.next(), if !inflight.is_empty() => {
                    urgent -= usize::from(was_urgent);
                    to_sink(self.tx.as_ref(), group).await?;
                }
                res = &mut self.sink_task => return Err(ended_with(res, "the result writer")),
                res = &mut self.events_task, if !draining => {
                    return Err(ended_with(res, "the dead-letter counter"));
                }
                // (A drain does not wait out a gather: what waits goes at once.)
                _ = shutdown.cancelled(), if !draining => {
                    ended |= self.start_drain(shared, in_hand).await;
                    linger = None;
                }
                _ = self.resharded.cancelled(), if !draining => {
                    ended |= self.start_drain(shared, in_hand).await;
                    linger = None;
                }
                d = self.deliveries.next(), if !ended && linger.is_none() => match d {
                    Some((chan, queue, Some(Ok(delivery)))) => {
                        let (group, end) = self.gather(vec![(chan, queue, delivery)])?;
                        ended |= end;
                        shared.stats.in_flight(group.len() as i64);
                        waiting.extend(group);
                        // An idle pool and few ordinary batches: let more come first.
                        if !linger_for.is_zero()
                            && !ended
                            && !draining
                            && inflight.is_empty()
                            && waiting.top_rank() == Some(0)
                            && waiting.len() < RAYON_GROUP
                        {
                            linger = Some(Instant::now() + linger_for);
                        }
                    }
                    Some((_, _, Some(Err(e)))) => return Err(anyhow::Error::new(e).context("consuming")),
                    // Ours, cancelled for the drain: the others may still deliver.
                    Some((_, _, None)) if draining => {}
                    Some((_, queue, None)) => return Err(consumer_ended(&queue)),
                    None if draining => ended = true,
                    None => anyhow::bail!("the broker cancelled the consumer"),
                },
                _ = sleep_until(linger), if linger.is_some() => {
                    linger = None;
                    loop {
                        let before = waiting.len();
                        let (group, end) = self.gather(Vec::new())?;
                        ended |= end;
                        shared.stats.in_flight(group.len() as i64);
                        waiting.extend(group);
                        if end || waiting.len() - before < RAYON_GROUP {
                            break;
                        }
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    if self.drain.tick(Instant::now()) {
                        warn!(left = in_hand,
                            "shutdown timeout: the batches still in hand go back to the queue");
                        self.hard_stop.cancel();
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The deliveries that arrived (none or one) and whatever else has already arrived, up
    /// to a group; their tags become outstanding. Also says whether the stream ended.
    fn gather(
        &mut self,
        first: Vec<(usize, String, Delivery)>,
    ) -> anyhow::Result<(Vec<Arrived>, bool)> {
        let now = std::time::Instant::now();
        let mut group: Vec<Arrived> = first.into_iter().map(|(c, q, d)| (c, q, d, now)).collect();
        let mut ended = false;
        while group.len() < RAYON_GROUP {
            match self.deliveries.next().now_or_never() {
                Some(Some((c, q, Some(Ok(d))))) => group.push((c, q, d, now)),
                Some(Some((_, _, None))) if self.drain.draining() => {}
                Some(Some((_, q, None))) => return Err(consumer_ended(&q)),
                Some(Some((_, _, Some(Err(e))))) => {
                    return Err(anyhow::Error::new(e).context("consuming"))
                }
                Some(None) => {
                    ended = self.drain.draining();
                    break;
                }
                None => break,
            }
        }
        let mut tracker = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        for (c, _, d, _) in &group {
            tracker.delivered(*c, d.delivery_tag);
        }
        Ok((group, ended))
    }

    /// The first signal: stop consuming and start the drain clock. True when the consumers
    /// could not be cancelled (then no more deliveries are awaited).
    async fn start_drain(&mut self, shared: &Shared, in_hand: usize) -> bool {
        self.drain.signal(Instant::now());
        self.events_stop.cancel();
        shared.health.set_consuming(false);
        if self.resharded.is_cancelled() {
            info!(
                in_hand,
                "new shards: finishing the batches in hand, then consuming again"
            );
        } else {
            info!(in_hand, "shutting down: finishing the batches in hand");
        }
        let mut failed = false;
        for (ch, tag) in self.channels.iter().zip(&self.tags) {
            if let Err(e) = ch
                .basic_cancel(tag.clone(), BasicCancelOptions::default())
                .await
            {
                warn!("cancelling consumer {tag}: {e}");
                failed = true;
            }
        }
        failed
    }

    /// Lets the sink finish (within the drain's deadline) when the loop ended well, stops it
    /// otherwise, and closes the connections.
    async fn close(mut self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        drop(self.tx.take());
        let drained = result.is_ok() && matches!(self.drain.phase(), Phase::Drained { .. });
        if drained {
            tokio::select! {
                res = &mut self.sink_task => {
                    if let Ok(Err(e)) = res {
                        warn!("result writer: {e:#}");
                    }
                }
                _ = sleep_until(self.drain.deadline()) => {
                    warn!("shutdown timeout while storing results: the rest go back to the queue");
                    self.hard_stop.cancel();
                }
            }
        } else {
            self.hard_stop.cancel();
            self.sink_task.abort();
        }
        self.events_stop.cancel();
        // (The loop may have taken its result already: a JoinHandle is awaited once.)
        if !self.events_task.is_finished() {
            let _ = (&mut self.events_task).await;
        }
        // Closing waits for the broker's answer; a broker that does not answer must not keep
        // the worker from exiting (it requeues everything unacked when the TCP connection ends).
        let close = async {
            for ch in self.channels.iter().chain([&self.events_ch]) {
                let _ = ch.close(200, "worker shutting down".into()).await;
            }
            let _ = self.conn.close(200, "worker shutting down".into()).await;
            let _ = self
                .publish_conn
                .close(200, "worker shutting down".into())
                .await;
        };
        if tokio::time::timeout(Duration::from_secs(5), close)
            .await
            .is_err()
        {
            warn!("the broker did not answer the close within 5 s");
        }
        if result.is_ok() {
            info!("worker stopped");
        }
        result
    }
}

/// Opens a channel with per-consumer prefetch and consumes `queue` on it.
async fn consume(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(Channel, lapin::Consumer)> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, consumer))
}

/// One channel and consumer a work queue's shard and priority band (delivery tags then arrive in
/// order on each channel, which lets the sink acknowledge many batches with one
/// multiple-ack), merged into one stream. A band's batches thus never wait behind the backlog
/// of the queue beside it: each has its own prefetch.
async fn consume_queues(
    conn: &Connection,
    shared: &Shared,
    queues: &[(String, u16)],
) -> anyhow::Result<(Vec<Channel>, Vec<ShortString>, BoxStream<'static, Incoming>)> {
    let mut channels = Vec::new();
    let mut tags = Vec::new();
    let mut streams = Vec::new();
    let routed = queues
        .iter()
        .flat_map(|(q, shards)| topology::with_shards(q, *shards));
    for (i, q) in routed.enumerate() {
        let (ch, consumer) = consume(conn, &shared.names.queue(&q), shared.args.prefetch).await?;
        tags.push(consumer.tag());
        channels.push(ch);
        // Its end is an item too: select_all would otherwise drop an ended consumer quietly
        // and go on with the others (a queue deleted in the console, say).
        let end = (i, q.clone(), None);
        streams.push(
            consumer
                .map(move |d| (i, q.clone(), Some(d)))
                .chain(futures::stream::once(async move { end }))
                .boxed(),
        );
    }
    Ok((channels, tags, futures::stream::select_all(streams).boxed()))
}

/// Deliveries not yet on the pool, by priority rank (see `topology::band_rank`), each rank in
/// order of arrival.
#[derive(Default)]
struct Waiting {
    ranks: [std::collections::VecDeque<Arrived>; topology::BAND_RANKS],
}

impl Waiting {
    fn extend(&mut self, arrived: Vec<Arrived>) {
        let last = self.ranks.len() - 1;
        for a in arrived {
            self.ranks[topology::band_rank(&a.1).min(last)].push_back(a);
        }
    }

    fn len(&self) -> usize {
        self.ranks.iter().map(std::collections::VecDeque::len).sum()
    }

    /// The highest rank that has deliveries waiting.
    fn top_rank(&self) -> Option<usize> {
        self.ranks.iter().rposition(|r| !r.is_empty())
    }

    /// The oldest `n` deliveries (or fewer) of `rank`.
    fn take(&mut self, rank: usize, n: usize) -> Vec<Arrived> {
        let r = &mut self.ranks[rank];
        let n = n.min(r.len());
        r.drain(..n).collect()
    }
}

/// The error of a consumer the broker ended while the worker still wanted it: the session
/// ends and the next declares the topology again and consumes again.
fn consumer_ended(short: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the broker cancelled the consumer of queue {short} (the queue was deleted, in the \
         console say, or its node went down); declaring the queues again and consuming again"
    )
}

/// Hands analysed batches to the sink, in order.
async fn to_sink(
    tx: Option<&mpsc::Sender<Processed>>,
    group: Vec<Processed>,
) -> anyhow::Result<()> {
    let Some(tx) = tx else {
        anyhow::bail!("the result writer stopped");
    };
    for p in group {
        if tx.send(p).await.is_err() {
            anyhow::bail!("the result writer stopped");
        }
    }
    Ok(())
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The error for a task of the session that ended while it should run.
fn ended_with(
    res: Result<anyhow::Result<()>, tokio::task::JoinError>,
    what: &str,
) -> anyhow::Error {
    match res {
        Ok(Err(e)) => e.context(format!("{what} failed")),
        Ok(Ok(())) => anyhow::anyhow!("{what} stopped"),
        Err(e) => anyhow::anyhow!("{what} failed: {e}"),
    }
}
