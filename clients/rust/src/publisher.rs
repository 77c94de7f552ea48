//! Publishing batches with a window of publisher confirms.
//!
//! Each batch is published persistent and mandatory; up to `window` confirms are in flight at
//! once instead of one round trip a batch. A batch is counted only when the broker confirmed
//! it. A nack or a return means the batch is published again; a lost connection means the
//! publisher reconnects, declares the topology again and republishes every batch that was not
//! confirmed (the worker's idempotent store makes a duplicate harmless).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    BasicProperties, Channel, Connection, PublisherConfirm,
};
use tracing::{debug, warn};

use taskmill_broker::{
    amqp,
    topology::{self, Names},
    Backoff,
};

use crate::error::{Error, Result};

/// How long the broker may go on refusing batches (nacks: a full queue with `reject-publish`,
/// say) before enqueue gives up; meanwhile it publishes them again with backoff, which is the
/// backpressure a full queue asks for (the workers drain it).
const REFUSED_AT_MOST: Duration = Duration::from_secs(120);
/// A refusal is logged at most once in this while (with how many there were).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);
/// How many reconnects in a row before enqueue gives up.
const MAX_RECONNECTS: u32 = 8;
/// A batch refused this many times in a row is published again on a new connection (which
/// may go to another node of a cluster). Seen on a three-node cluster: after the node the
/// producer was connected to died, the batches it had left unconfirmed were nacked on every
/// republish through the new connection, for as long as it stayed open, while new batches on
/// it were taken. A full queue (a length limit with reject-publish) refuses on any connection;
/// for it this costs a reconnect every few rounds of the backoff.
const REFUSALS_BEFORE_RECONNECT: u32 = 3;
/// Most bytes of unconfirmed batches held (for republishing) at once, whatever the window:
/// a window of 2,000 batches of 100 posts would otherwise hold 70 MB.
const MAX_INFLIGHT_BYTES: usize = 16 * 1024 * 1024;

struct InFlight {
    batch: u64,
    records: u64,
    body: Vec<u8>,
    props: BasicProperties,
    confirm: Option<PublisherConfirm>,
    refusals: u32,
    /// When it was last handed to the broker.
    sent: Instant,
}

/// A confirm-mode publisher to one work queue.
pub struct Publisher {
    amqp_url: String,
    names: Names,
    queue: String,
    /// Where batches are routed: the queue, or one of its priority bands.
    routing_key: String,
    /// How many shards the queue is spread over: batch n of a job goes to shard n mod
    /// shards (a priority band is not sharded).
    shards: u16,
    window: usize,
    conn: Connection,
    channel: Channel,
    inflight: VecDeque<InFlight>,
    /// Bytes of the bodies in `inflight`.
    inflight_bytes: usize,
    /// Batches confirmed so far.
    pub confirmed_batches: u64,
    /// Records in confirmed batches.
    pub confirmed_records: u64,
    /// Since when the broker refuses batches (reset by an accepted one), the backoff before
    /// publishing a refused one again, refusals not yet logged and when the last log was.
    refused_since: Option<Instant>,
    refusal_backoff: Backoff,
    refusals_unlogged: u64,
    refusal_logged: Option<Instant>,
    /// When the last pause for refusals ended: a batch refused that was sent before it was
    /// refused in the same burst, and goes again without another pause.
    paused: Option<Instant>,
}

async fn open(
    amqp_url: &str,
    names: &Names,
    queue: &str,
    shards: u16,
) -> Result<(Connection, Channel)> {
    let conn = amqp::connect(amqp_url, "taskmill-producer")
        .await
        .map_err(|e| Error::Broker(taskmill_protocol::error_text(&e)))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| Error::broker("opening a channel", &e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| Error::broker("enabling publisher confirms", &e))?;
    topology::declare(&channel, names, &[(queue.to_string(), shards)])
        .await
        .map_err(|e| Error::broker("declaring the topology", &e))?;
    Ok((conn, channel))
}

impl Publisher {
    /// Routes the batches to `routing_key` (a priority band of the queue) instead.
    pub fn with_routing_key(mut self, routing_key: String) -> Self {
        self.routing_key = routing_key;
        self
    }

    /// Connects, enables confirms and declares the topology for `queue`, spread over
    /// `shards` shards.
    pub async fn connect(
        amqp_url: &str,
        names: Names,
        queue: &str,
        shards: u16,
        window: usize,
    ) -> Result<Self> {
        let shards = shards.max(1);
        let (conn, channel) = open(amqp_url, &names, queue, shards).await?;
        Ok(Self {
            amqp_url: amqp_url.to_string(),
            names,
            queue: queue.to_string(),
            routing_key: queue.to_string(),
            shards,
            window: window.max(1),
            conn,
            channel,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            confirmed_batches: 0,
            confirmed_records: 0,
            refused_since: None,
            refusal_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            refusals_unlogged: 0,
            refusal_logged: None,
            paused: None,
        })
    }

    /// The routing key of batch `batch`: its shard of the queue, or the priority band.
    fn route(&self, batch: u64) -> std::borrow::Cow<'_, str> {
        if self.shards <= 1 || self.routing_key != self.queue {
            return self.routing_key.as_str().into();
        }
        topology::shard_queue(&self.queue, (batch % u64::from(self.shards)) as u16).into()
    }

    async fn send(&self, item: &InFlight) -> lapin::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                self.names.work_exchange().into(),
                self.route(item.batch).as_ref().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &item.body,
                item.props.clone(),
            )
            .await
    }

    /// Publishes batches `(batch, records, body, properties)`; waits for the oldest confirms
    /// when the window is full. The publishes of one call are handed to the connection
    /// together, so that its I/O thread writes them in one go instead of one wake-up each.
    pub async fn publish_many(
        &mut self,
        batches: Vec<(u64, u64, Vec<u8>, BasicProperties)>,
    ) -> Result<()> {
        let mut items = batches
            .into_iter()
            .map(|(batch, records, body, props)| InFlight {
                batch,
                records,
                body,
                props,
                confirm: None,
                refusals: 0,
                sent: Instant::now(),
            });
        loop {
            let group: Vec<InFlight> = items.by_ref().take(self.window).collect();
            if group.is_empty() {
                return Ok(());
            }
            // join_all polls the futures in order, so the broker sees them in order.
            let sent = futures::future::join_all(group.iter().map(|item| self.send(item))).await;
            let mut failure = None;
            for (mut item, res) in group.into_iter().zip(sent) {
                match res {
                    Ok(c) => item.confirm = Some(c),
                    Err(e) => failure = failure.or(Some(e)),
                }
                self.hold(item, false);
            }
            if let Some(e) = failure {
                self.recover(e).await?;
            }
            // A full window waits for a quarter of it to be confirmed, not for one confirm:
            // the next publishes then go out back to back, many chunks a wake-up, instead of
            // a chunk for each confirm the broker sends.
            if self.inflight.len() >= self.window || self.inflight_bytes > MAX_INFLIGHT_BYTES {
                self.settle((self.window - self.window / 4).saturating_sub(1))
                    .await?;
            }
        }
    }

    /// Waits until all published batches are confirmed.
    pub async fn finish(&mut self) -> Result<()> {
        self.settle(0).await?;
        let _ = self.conn.close(200, "producer done".into()).await;
        Ok(())
    }

    /// Waits until all published batches are confirmed, keeping the connection open.
    pub async fn settle_all(&mut self) -> Result<()> {
        self.settle(0).await
    }

    /// Asks a worker to fold job `job`'s summary once it is finished (a control message on the
    /// job's queue), then closes. Best effort: without it, the job's last batch still does it.
    pub async fn request_summary_and_close(&mut self, job: &str) {
        use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
        let mut headers = FieldTable::default();
        headers.insert(
            taskmill_protocol::envelope::HEADER_CONTROL.into(),
            AMQPValue::LongString(LongString::from("summarize")),
        );
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(format!("{job}:summary")))
            .with_headers(headers);
        let sent = amqp::publish_confirmed(
            &self.channel,
            &self.names.work_exchange(),
            &self.routing_key,
            b"",
            props,
        )
        .await;
        if !matches!(sent, Ok(true)) {
            warn!("could not ask the workers for job {job}'s summary: {sent:?}");
        }
        let _ = self.conn.close(200, "producer done".into()).await;
    }

    /// Holds a published batch until its confirm: last, or first (the oldest) when it was
    /// taken out to be settled and goes back.
    fn hold(&mut self, item: InFlight, first: bool) {
        self.inflight_bytes += item.body.len();
        if first {
            self.inflight.push_front(item);
        } else {
            self.inflight.push_back(item);
        }
    }

    /// The oldest batch held, taken out.
    fn take_oldest(&mut self) -> Option<InFlight> {
        let item = self.inflight.pop_front()?;
        self.inflight_bytes -= item.body.len();
        Some(item)
    }

    /// Waits for confirms until at most `keep` are outstanding (and at most
    /// [`MAX_INFLIGHT_BYTES`] of them).
    async fn settle(&mut self, keep: usize) -> Result<()> {
        while self.inflight.len() > keep || self.inflight_bytes > MAX_INFLIGHT_BYTES {
            let Some(mut item) = self.take_oldest() else {
                break;
            };
            let outcome = match item.confirm.take() {
                Some(c) => c.await,
                None => Err(lapin::Error::from(
                    lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
                )),
            };
            let outcome = outcome.map(amqp::refusal);
            match outcome {
                Ok(None) => {
                    self.confirmed_batches += 1;
                    self.confirmed_records += item.records;
                    if self.refused_since.take().is_some() {
                        self.refusal_backoff.reset();
                        self.refusals_unlogged = 0;
                        debug!("the broker takes batches again");
                    }
                }
                Ok(Some(why)) => {
                    item.refusals += 1;
                    let since = *self.refused_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > REFUSED_AT_MOST {
                        return Err(Error::Broker(format!(
                            "the broker refused batches for {} s (batch {} {} times, {why}): a \
                             full queue (a length limit with reject-publish) that no worker \
                             drains, or an unroutable queue",
                            REFUSED_AT_MOST.as_secs(),
                            item.batch,
                            item.refusals
                        )));
                    }
                    self.refusals_unlogged += 1;
                    // One pause a round: batches refused in the burst before the last pause
                    // go again at once.
                    if self.paused.is_none_or(|p| item.sent >= p) {
                        let delay = self.refusal_backoff.next_delay();
                        if self
                            .refusal_logged
                            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY)
                        {
                            warn!(
                                refused = self.refusals_unlogged,
                                last = %why,
                                "the broker refuses batches (a full queue, or unroutable): \
                                 publishing them again with backoff ({delay:?} now) for up to {} s",
                                REFUSED_AT_MOST.as_secs()
                            );
                            self.refusal_logged = Some(Instant::now());
                            self.refusals_unlogged = 0;
                        }
                        tokio::time::sleep(delay).await;
                        self.paused = Some(Instant::now());
                    }
                    item.sent = Instant::now();
                    if item.refusals % REFUSALS_BEFORE_RECONNECT == 0 {
                        warn!(
                            batch = item.batch,
                            "batch refused {} times in a row ({why}): publishing the unconfirmed \
                             batches again on a new connection",
                            item.refusals
                        );
                        self.hold(item, true);
                        self.reopen().await?;
                        continue;
                    }
                    match self.send(&item).await {
                        Ok(c) => {
                            item.confirm = Some(c);
                            self.hold(item, false);
                        }
                        Err(e) => {
                            self.hold(item, true);
                            self.recover(e).await?;
                        }
                    }
                }
                Err(e) => {
                    self.hold(item, true);
                    self.recover(e).await?;
                }
            }
        }
        Ok(())
    }

    /// Reconnects after a connection or channel error and republishes every unconfirmed batch.
    async fn recover(&mut self, error: lapin::Error) -> Result<()> {
        self.reconnect(Error::broker("publishing", &error)).await
    }

    /// Replaces a connection that refuses batches over and over (see
    /// [`REFUSALS_BEFORE_RECONNECT`]) and republishes every unconfirmed batch on the new one.
    async fn reopen(&mut self) -> Result<()> {
        let _ = self
            .conn
            .close(200, "replaced: it refused batches".into())
            .await;
        self.reconnect(Error::Broker("the connection refused batches".into()))
            .await
    }

    /// Opens a new connection (with backoff, up to [`MAX_RECONNECTS`] attempts) and
    /// republishes every unconfirmed batch on it; `last` is why.
    async fn reconnect(&mut self, mut last: Error) -> Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        for attempt in 1..=MAX_RECONNECTS {
            let delay = backoff.next_delay();
            warn!(
                unconfirmed = self.inflight.len(),
                "broker connection lost ({last}); reconnecting in {delay:?} (attempt {attempt})"
            );
            tokio::time::sleep(delay).await;
            match open(&self.amqp_url, &self.names, &self.queue, self.shards).await {
                Ok((conn, channel)) => {
                    let _ = self.conn.close(200, "reconnecting".into()).await;
                    self.conn = conn;
                    self.channel = channel;
                    let mut ok = true;
                    for i in 0..self.inflight.len() {
                        match self.send(&self.inflight[i]).await {
                            Ok(c) => self.inflight[i].confirm = Some(c),
                            Err(e) => {
                                last = Error::broker("publishing again", &e);
                                ok = false;
                                break;
                            }
                        }
                    }
                    if ok {
                        debug!(republished = self.inflight.len(), "reconnected");
                        return Ok(());
                    }
                }
                Err(e) => last = e,
            }
        }
        Err(Error::Broker(format!(
            "the broker connection could not be restored after {MAX_RECONNECTS} attempts: {last}"
        )))
    }
}
