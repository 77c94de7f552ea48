//! Prometheus metrics and health endpoints (`--metrics-addr`).
//!
//! - `GET /metrics`: Prometheus text. Names are stable, for dashboards and alerts:
//!   `taskmill_batches_total{task,outcome}` (`done`, `retried`, `dead`),
//!   `taskmill_records_total{task,outcome}` (`done`, `invalid`),
//!   `taskmill_task_duration_seconds{task}`, `taskmill_batch_latency_seconds{task}` and
//!   `taskmill_batch_in_worker_seconds{task}` (histograms), `taskmill_batches_in_flight`,
//!   `taskmill_worker_threads`, `taskmill_connected{to}` (`rabbitmq`, `redis`),
//!   `taskmill_delayed_batches_moved_total` (batches moved back from a delay queue kept past
//!   its TTL: `sweep.rs`).
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when connected to RabbitMQ and Redis and consuming, else 503 and why.
//! - `GET /stats`: this worker's counters and exact batch-latency quantiles (HdrHistogram) as
//!   JSON, for the benchmark harness and for people.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Histogram buckets in seconds, from half a millisecond to a minute.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// What `/readyz` reports; also mirrored in `taskmill_connected`.
#[derive(Debug)]
pub struct Health {
    rabbitmq: AtomicBool,
    redis: AtomicBool,
    consuming: AtomicBool,
    stuck: std::sync::atomic::AtomicUsize,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Nothing connected yet.
    pub fn new() -> Self {
        Self {
            rabbitmq: AtomicBool::new(false),
            redis: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            stuck: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Analysis threads that have run their batch for more than twice its time limit.
    pub fn set_stuck(&self, n: usize) {
        self.stuck.store(n, Ordering::Relaxed);
        metrics::gauge!("taskmill_analysis_threads_stuck").set(n as f64);
    }

    /// Publishes `taskmill_connected` as it stands (once the recorder is installed).
    pub fn publish(&self) {
        for (to, up) in [("rabbitmq", &self.rabbitmq), ("redis", &self.redis)] {
            let up = up.load(Ordering::Relaxed);
            metrics::gauge!("taskmill_connected", "to" => to).set(f64::from(u8::from(up)));
        }
    }

    /// Connected to RabbitMQ (or not).
    pub fn set_rabbitmq(&self, up: bool) {
        self.rabbitmq.store(up, Ordering::Relaxed);
        metrics::gauge!("taskmill_connected", "to" => "rabbitmq").set(f64::from(u8::from(up)));
    }
    /// Redis answering (or not). Called after every Redis call, so the gauge is only touched
    /// when the state changes.
    pub fn set_redis(&self, up: bool) {
        if self.redis.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!("taskmill_connected", "to" => "redis").set(f64::from(u8::from(up)));
        }
    }
    /// Consumers registered (or not).
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Relaxed);
    }
    /// None when ready, else what is missing.
    pub fn not_ready(&self) -> Option<String> {
        let mut missing = Vec::new();
        if !self.rabbitmq.load(Ordering::Relaxed) {
            missing.push("not connected to RabbitMQ".to_string());
        }
        if !self.redis.load(Ordering::Relaxed) {
            missing.push("Redis not answering".to_string());
        }
        if !self.consuming.load(Ordering::Relaxed) {
            missing.push("not consuming".to_string());
        }
        let stuck = self.stuck.load(Ordering::Relaxed);
        if stuck > 0 {
            missing.push(format!(
                "{stuck} analysis threads stuck (running a batch past its time limit)"
            ));
        }
        (!missing.is_empty()).then(|| missing.join(", "))
    }
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install_recorder()?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    health: Arc<Health>,
    stats: Arc<crate::Stats>,
}

async fn stats_json(State(s): State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(s.stats.to_json())
}

async fn render(State(s): State<AppState>) -> String {
    s.handle.render()
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Binds `addr` and serves the endpoints until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
    stats: Arc<crate::Stats>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/stats", get(stats_json))
        .with_state(AppState {
            handle,
            health,
            stats,
        });
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}
