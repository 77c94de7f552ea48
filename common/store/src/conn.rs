//! The connection to Redis: one server, or the primary that the sentinels name.
//!
//! The Redis client's connection manager reconnects to the address it was made for; under
//! Sentinel that address may since have become a replica (its writes answered `READONLY`) or
//! be gone. So every error that may mean the primary moved (the connection lost or refused, a
//! timeout, `READONLY`, `MASTERDOWN`) marks the connection stale, and the next command asks
//! the sentinels again (each in turn, until one names the primary), connects to the address
//! named, and checks with `ROLE` that it is a primary before using it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::ErrorKind;
use taskmill_protocol::redis_url::{self, RedisTarget, SentinelUrl, WaitFor};

/// A connection to Redis that follows a failover; see the module's text.
pub(crate) struct Conn {
    target: RedisTarget,
    /// What writes that must survive a failover wait for.
    pub(crate) wait: WaitFor,
    current: RwLock<ConnectionManager>,
    stale: AtomicBool,
    resolving: AtomicBool,
}

fn config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)))
}

fn invalid(detail: String) -> redis::RedisError {
    (ErrorKind::InvalidClientConfig, "bad REDIS_URL", detail).into()
}

/// An error that passes (the caller retries): no sentinel answered, or the address named is
/// not a primary yet.
fn passing(what: &'static str, detail: String) -> redis::RedisError {
    (ErrorKind::Io, what, detail).into()
}

impl Conn {
    pub(crate) async fn open(url: &str) -> Result<Self, redis::RedisError> {
        let spec = redis_url::parse(url).map_err(invalid)?;
        let manager = connect(&spec.target).await?;
        Ok(Self {
            target: spec.target,
            wait: spec.wait,
            current: RwLock::new(manager),
            stale: AtomicBool::new(false),
            resolving: AtomicBool::new(false),
        })
    }

    /// A handle on the current connection; after an error that marked it stale (see
    /// [`Conn::saw`]), first a new one: under Sentinel to the primary the sentinels name now,
    /// else to the one server (when that works; else the old connection, whose next error
    /// marks it stale again).
    pub(crate) async fn get(&self) -> ConnectionManager {
        if self.stale.load(Ordering::Acquire)
            && self
                .resolving
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            match connect(&self.target).await {
                Ok(m) => {
                    if let Ok(mut cur) = self.current.write() {
                        *cur = m;
                    }
                    self.stale.store(false, Ordering::Release);
                    match &self.target {
                        RedisTarget::Sentinel(s) => {
                            tracing::info!(master = %s.master, "connected to the primary the sentinels name")
                        }
                        RedisTarget::Direct(_) => {
                            tracing::info!("a Redis command timed out: connected to Redis again")
                        }
                    }
                }
                Err(e) => match &self.target {
                    RedisTarget::Sentinel(s) => {
                        tracing::warn!(master = %s.master, "no primary yet: {e}")
                    }
                    RedisTarget::Direct(_) => tracing::warn!("connecting to Redis again: {e}"),
                },
            }
            self.resolving.store(false, Ordering::Release);
        }
        match self.current.read() {
            Ok(cur) => cur.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes the next command ask the sentinels again (under Sentinel; else nothing).
    pub(crate) fn suspect(&self) {
        if matches!(self.target, RedisTarget::Sentinel(_)) {
            self.stale.store(true, Ordering::Release);
        }
    }

    /// Notes an error: one that may mean the primary moved makes the next command ask the
    /// sentinels again.
    pub(crate) fn saw(&self, e: &redis::RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
        {
            self.suspect();
        }
        // One server: the connection manager reconnects by itself when the connection
        // drops, not when a reply never comes (seen: a worker's connection that answered no
        // command after its first, every call timing out for minutes, while Redis had sent
        // every reply and served other clients).
        if e.is_timeout() && matches!(self.target, RedisTarget::Direct(_)) {
            self.stale.store(true, Ordering::Release);
        }
    }
}

/// A new connection: to the one server, or to the primary the sentinels name.
async fn connect(target: &RedisTarget) -> Result<ConnectionManager, redis::RedisError> {
    match target {
        RedisTarget::Direct(url) => {
            redis::Client::open(url.as_str())?
                .get_connection_manager_with_config(config())
                .await
        }
        RedisTarget::Sentinel(s) => resolve(s).await,
    }
}

/// Asks the sentinels, in the order given, for the primary's address; connects to the first
/// address one names and checks that it is a primary.
async fn resolve(s: &SentinelUrl) -> Result<ConnectionManager, redis::RedisError> {
    let mut errors = Vec::new();
    for (host, port) in &s.sentinels {
        match ask_sentinel(s, host, *port).await {
            Ok(Some((h, p))) => return connect_primary(s, &h, p).await,
            Ok(None) => errors.push(format!("{host}:{port} knows no primary {:?}", s.master)),
            Err(e) => errors.push(format!("{host}:{port}: {e}")),
        }
    }
    if errors.iter().all(|e| e.contains("knows no primary")) {
        return Err((
            ErrorKind::MasterNameNotFoundBySentinel,
            "no sentinel knows that primary",
            errors.join("; "),
        )
            .into());
    }
    Err(passing("no sentinel named a primary", errors.join("; ")))
}

async fn ask_sentinel(
    s: &SentinelUrl,
    host: &str,
    port: u16,
) -> Result<Option<(String, u16)>, redis::RedisError> {
    let client = redis::Client::open(s.sentinel_url(host, port))?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut con = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(&s.master)
        .query_async(&mut con)
        .await?;
    Ok(addr.and_then(|(h, p)| p.parse().ok().map(|p| (h, p))))
}

async fn connect_primary(
    s: &SentinelUrl,
    host: &str,
    port: u16,
) -> Result<ConnectionManager, redis::RedisError> {
    let mut m = redis::Client::open(s.primary_url(host, port))?
        .get_connection_manager_with_config(config().set_number_of_retries(1))
        .await?;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut m).await?;
    match role.first() {
        Some(redis::Value::BulkString(r)) if r.as_slice() == b"master" => Ok(m),
        Some(redis::Value::SimpleString(r)) if r == "master" => Ok(m),
        _ => Err(passing(
            "the sentinels name a server that is not a primary (a failover under way?)",
            format!("{host}:{port}"),
        )),
    }
}
