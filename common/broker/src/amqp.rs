//! Connecting to RabbitMQ.

use lapin::{types::LongString, Connection, ConnectionProperties};

use taskmill_protocol::redact;

/// Error connecting to the broker: one sentence with the (redacted) URL and the cause once.
#[derive(Debug)]
pub struct ConnectError {
    /// The URL without its password (the last one tried, when several were).
    pub url: String,
    /// What lapin reported.
    pub source: lapin::Error,
    /// How many nodes were tried (each failed); 1 for a single URL.
    pub tried: usize,
}

impl ConnectError {
    /// The broker refused the credentials or the vhost: trying again cannot help.
    pub fn refused(&self) -> bool {
        matches!(self.source.kind(), lapin::ErrorKind::ProtocolError(e) if matches!(e.get_id(), 403 | 530))
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source.kind() {
            lapin::ErrorKind::ProtocolError(e) if self.refused() => write!(
                f,
                "RabbitMQ at {} refused the connection ({}): check the user, password and vhost of the AMQP URL",
                self.url,
                e.get_message().as_str().split(" - ").next().unwrap_or("refused")
            ),
            _ if self.tried > 1 => write!(
                f,
                "cannot connect to any of the {} RabbitMQ nodes of the AMQP URL (the last tried, {}: {})",
                self.tried,
                self.url,
                taskmill_protocol::error_text(&self.source)
            ),
            _ => write!(
                f,
                "cannot connect to RabbitMQ at {}: {}",
                self.url,
                taskmill_protocol::error_text(&self.source)
            ),
        }
    }
}

impl std::error::Error for ConnectError {}

/// This machine's name (`HOSTNAME`, else `/etc/hostname`), for naming connections and
/// workers.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// The AMQP heartbeat taskmill asks for when the URL names none, in seconds. The broker's
/// own default (60 s) let a frozen worker (SIGSTOP, a paused VM) hold its prefetched batches
/// for a minute or two; with 10 s the broker gives them to other workers after about 20 s.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// `url` with `heartbeat=DEFAULT_HEARTBEAT_SECS` added unless it names a heartbeat.
pub fn with_default_heartbeat(url: &str) -> String {
    let query = url.split_once('?').map(|(_, q)| q);
    if query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("heartbeat="))) {
        return url.to_string();
    }
    let sep = if query.is_some() { '&' } else { '?' };
    format!("{url}{sep}heartbeat={DEFAULT_HEARTBEAT_SECS}")
}

/// How long one node of several may take to accept a connection before the next is tried
/// (a node that is up but does not answer, e.g. stopped with SIGSTOP or partitioned).
pub const NODE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a connection named `name` (shown in the RabbitMQ console's Connections page), with
/// a heartbeat of [`DEFAULT_HEARTBEAT_SECS`] unless the URL sets one.
///
/// `urls` is one URL or several nodes of one cluster separated by commas: they are tried in a
/// shuffled order (so that a fleet spreads over the nodes, as RabbitMQ's Java client does),
/// each for at most [`NODE_CONNECT_TIMEOUT`], and the first that accepts is used; refused
/// credentials end the attempt at once (every node of a cluster shares its users). A caller
/// that reconnects after a lost connection calls this again, and so moves to a live node.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, ConnectError> {
    let host = hostname();
    let props = ConnectionProperties::default().with_connection_name(LongString::from(format!(
        "{name}@{host}:{}",
        std::process::id()
    )));
    let mut nodes = taskmill_protocol::url_list(urls);
    if nodes.len() <= 1 {
        return Connection::connect(&with_default_heartbeat(urls.trim()), props)
            .await
            .map_err(|source| ConnectError {
                url: redact(urls),
                source,
                tried: 1,
            });
    }
    shuffle(&mut nodes);
    let tried = nodes.len();
    let mut last = None;
    for url in nodes {
        let with_heartbeat = with_default_heartbeat(url);
        let attempt = Connection::connect(&with_heartbeat, props.clone());
        let source = match tokio::time::timeout(NODE_CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(source)) => source,
            Err(_) => lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", NODE_CONNECT_TIMEOUT.as_secs()),
                ),
            ))),
        };
        let e = ConnectError {
            url: redact(url),
            source,
            tried,
        };
        if e.refused() {
            return Err(e);
        }
        last = Some(e);
    }
    Err(last.unwrap_or_else(|| unreachable!("a list of several URLs was tried")))
}

/// Shuffles the nodes in place (Fisher–Yates), seeded from the clock and the process id:
/// processes started together still spread over the nodes.
fn shuffle(nodes: &mut [&str]) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = (nanos ^ (u64::from(std::process::id()) << 32)) | 1;
    for i in (1..nodes.len()).rev() {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        nodes.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

use lapin::{
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties,
};

use taskmill_protocol::envelope::{Envelope, CONTENT_TYPE, HEADER_ATTEMPT};

/// Properties of a batch message: persistent, MessagePack, stable message id, creation time,
/// and the attempt counter (absent on the first attempt, which it means).
pub fn batch_properties(envelope: &Envelope, attempt: u32) -> BasicProperties {
    batch_properties_of(&envelope.job, envelope.batch, envelope.created_ms, attempt)
}

/// [`batch_properties`] from the batch's job, number and creation time.
pub fn batch_properties_of(
    job: &str,
    batch: u64,
    created_ms: u64,
    attempt: u32,
) -> BasicProperties {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(ShortString::from(taskmill_protocol::envelope::message_id(
            job, batch,
        )))
        .with_timestamp(created_ms / 1000);
    // No header means the first attempt: a first publish carries no table for the broker and
    // every worker to parse.
    if attempt == 1 {
        return props;
    }
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    props.with_headers(headers)
}

/// An integer header, whatever integer type the sender chose.
pub fn header_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    int_value(props.headers().as_ref()?.inner().get(name)?)
}

/// An AMQP integer (of any width, or a timestamp) as i64; None for other types.
pub fn int_value(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// A string header.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The attempt number of a delivered batch (1 when the header is missing).
pub fn attempt_of(props: &BasicProperties) -> u32 {
    header_i64(props, HEADER_ATTEMPT)
        .and_then(|a| u32::try_from(a).ok())
        .filter(|a| *a >= 1)
        .unwrap_or(1)
}

/// Publishes one message with `mandatory` on a confirm-mode channel and waits for the
/// broker's confirm: true when the broker took it (acked, not returned as unroutable).
pub async fn publish_confirmed(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> lapin::Result<bool> {
    let options = lapin::options::BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(exchange.into(), routing_key.into(), options, body, props)
        .await?
        .await?;
    Ok(accepted(confirm))
}

/// Whether a publisher confirm says the broker took the message: acked, and not returned as
/// unroutable (a `mandatory` message that no queue took comes back before its ack).
pub fn accepted(confirm: lapin::Confirmation) -> bool {
    refusal(confirm).is_none()
}

/// Why a publisher confirm says the broker did not take the message (`nacked`, or
/// `returned` with the broker's reply), or None when it did.
pub fn refusal(confirm: lapin::Confirmation) -> Option<String> {
    let nacked = confirm.is_nack();
    match (nacked, confirm.take_message()) {
        (_, Some(r)) => Some(format!("returned ({} {})", r.reply_code, r.reply_text)),
        (true, None) => Some("nacked".into()),
        (false, None) => None,
    }
}

/// A copy of `props` with `extra` headers added (replacing same-named ones).
pub fn with_extra_headers(
    props: &BasicProperties,
    extra: impl IntoIterator<Item = (&'static str, AMQPValue)>,
) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert(k.into(), v);
    }
    props.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_added_unless_the_url_names_one() {
        assert_eq!(
            with_default_heartbeat("amqp://h:5672/%2f"),
            "amqp://h:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_default_heartbeat("amqp://h/%2f?frame_max=8192"),
            "amqp://h/%2f?frame_max=8192&heartbeat=10"
        );
        assert_eq!(
            with_default_heartbeat("amqp://h/%2f?heartbeat=5"),
            "amqp://h/%2f?heartbeat=5"
        );
    }
}
