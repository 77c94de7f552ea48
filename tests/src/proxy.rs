//! A TCP proxy for cutting and restoring connections in tests.
//!
//! `cut()` closes every open connection and refuses new ones (accepts and drops them at once)
//! until `restore()`. Counters let a test await events instead of sleeping: bytes forwarded,
//! connections refused while cut.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct State {
    cut: AtomicBool,
    bytes: AtomicU64,
    refused: AtomicU64,
    accepted: AtomicU64,
    /// Cancelled to close the current connections.
    generation: Mutex<CancellationToken>,
}

/// A running proxy.
#[derive(Clone)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Starts a proxy to `target` on a free local port.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            target,
        )
        .await
    }

    /// Starts a proxy to `target` listening on `bind`.
    pub async fn start_on(bind: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.cut.load(Ordering::SeqCst) {
                    st.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let token = st
                    .generation
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, &st) => {}
                        _ = pipe(sr, cw, &st) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self { addr, state })
    }

    /// An AMQP URL through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f?heartbeat=5", self.addr)
    }

    /// A Redis URL through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        let mut g = self
            .state
            .generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.cancel();
        *g = CancellationToken::new();
    }

    /// An outage: cuts, waits until the client has tried to reconnect (at least one refused
    /// connection), then restores.
    pub async fn outage(&self) {
        self.cut();
        crate::until(
            "the client trying to reconnect",
            std::time::Duration::from_secs(60),
            || async { self.refused() >= 1 },
        )
        .await;
        self.restore();
    }

    /// An outage once `bytes` went through (a part of the client's work on the wire).
    pub async fn outage_after(&self, bytes: u64) {
        crate::until(
            "a part of the traffic through the proxy",
            std::time::Duration::from_secs(60),
            || async { self.bytes() >= bytes },
        )
        .await;
        self.outage().await;
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Bytes forwarded so far, both ways.
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::SeqCst)
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: &State,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                st.bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
}
