//! What a worker counted, shared with whoever started it (tests, the benchmark).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what this worker did; shared with whoever started it.
#[derive(Debug)]
pub struct Stats {
    /// Batches whose result this worker stored.
    pub batches_done: AtomicU64,
    /// Batches delivered again whose result was already stored (acked, not counted).
    pub batches_duplicate: AtomicU64,
    /// Batches sent to a delay queue for another attempt.
    pub batches_retried: AtomicU64,
    /// Batches dead-lettered.
    pub batches_dead: AtomicU64,
    /// Copies of batches (retries, dead letters) parked in Redis while a broker alarm blocked
    /// publishing, and published from there later (by any worker).
    pub copies_parked: AtomicU64,
    /// Batches dropped unrun because their job was cancelled.
    pub batches_cancelled: AtomicU64,
    /// Batches dropped unrun, quietly, because their job was deleted.
    pub batches_deleted: AtomicU64,
    /// Batches of a task this worker lacks, given back for a worker that has it.
    pub batches_deferred: AtomicU64,
    /// Records in the batches stored.
    pub records_done: AtomicU64,
    /// Sessions started (1 + reconnects).
    pub sessions: AtomicU64,
    /// Failed Redis calls (each retried with backoff).
    pub store_errors: AtomicU64,
    /// `basic.ack` frames sent (one may settle many batches).
    pub acks_sent: AtomicU64,
    /// Batches received and not settled yet (analysing, or waiting to be stored and acked).
    pub in_flight: std::sync::atomic::AtomicI64,
    /// Batch latency in ms: from the batch's creation to its result stored.
    pub latency_ms: Hist,
    /// Time in this worker in µs: from the delivery's arrival to its result stored (the rest
    /// of the latency is the broker's and the network's).
    pub in_worker_us: Hist,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            batches_done: AtomicU64::new(0),
            batches_duplicate: AtomicU64::new(0),
            batches_retried: AtomicU64::new(0),
            batches_dead: AtomicU64::new(0),
            copies_parked: AtomicU64::new(0),
            batches_cancelled: AtomicU64::new(0),
            batches_deleted: AtomicU64::new(0),
            batches_deferred: AtomicU64::new(0),
            records_done: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            in_flight: std::sync::atomic::AtomicI64::new(0),
            acks_sent: AtomicU64::new(0),
            // 1 ms to 1 day.
            latency_ms: histogram(86_400_000),
            // 1 µs to 1 day.
            in_worker_us: histogram(86_400_000_000),
        }
    }
}

impl Stats {
    /// Counts `n` more (or, negative, fewer) batches in flight, here and in `/metrics`.
    pub(crate) fn in_flight(&self, n: i64) {
        self.in_flight.fetch_add(n, Ordering::Relaxed);
        ::metrics::gauge!("taskmill_batches_in_flight").increment(n as f64);
    }

    /// No batch in flight (a session ended: what it held was settled or given back).
    pub(crate) fn clear_in_flight(&self) {
        self.in_flight.store(0, Ordering::Relaxed);
        ::metrics::gauge!("taskmill_batches_in_flight").set(0.0);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    /// A counter's current value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Records the latencies (ms) and the times in this worker (µs) of batches stored now.
    pub(crate) fn record_latencies(
        &self,
        latencies_ms: impl IntoIterator<Item = u64>,
        in_worker_us: impl IntoIterator<Item = u64>,
    ) {
        record(&self.latency_ms, latencies_ms);
        record(&self.in_worker_us, in_worker_us);
    }

    /// The counters and latency quantiles as JSON (the worker's `/stats`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "batches_done": Self::get(&self.batches_done),
            "batches_duplicate": Self::get(&self.batches_duplicate),
            "batches_retried": Self::get(&self.batches_retried),
            "batches_dead": Self::get(&self.batches_dead),
            "copies_parked": Self::get(&self.copies_parked),
            "batches_cancelled": Self::get(&self.batches_cancelled),
            "batches_deleted": Self::get(&self.batches_deleted),
            "batches_deferred": Self::get(&self.batches_deferred),
            "records_done": Self::get(&self.records_done),
            "sessions": Self::get(&self.sessions),
            "store_errors": Self::get(&self.store_errors),
            "in_flight": self.in_flight.load(Ordering::Relaxed).max(0),
            "acks_sent": Self::get(&self.acks_sent),
            "latency_ms": quantiles_json(&self.latency_ms),
            "in_worker_us": quantiles_json(&self.in_worker_us),
        })
    }

    /// Logs the totals (once the worker stops).
    pub(crate) fn report(&self) {
        let (p50, p95, p99, max) = self.latency_quantiles();
        tracing::info!(
            batches_done = Self::get(&self.batches_done),
            batches_duplicate = Self::get(&self.batches_duplicate),
            batches_retried = Self::get(&self.batches_retried),
            batches_dead = Self::get(&self.batches_dead),
            records_done = Self::get(&self.records_done),
            latency_p50_ms = p50,
            latency_p95_ms = p95,
            latency_p99_ms = p99,
            latency_max_ms = max,
            "worker totals"
        );
    }

    /// (p50, p95, p99, max) batch latency in ms.
    pub fn latency_quantiles(&self) -> (u64, u64, u64, u64) {
        quantiles(&self.latency_ms)
    }
}

/// A histogram shared between the sink and `/stats`.
pub type Hist = std::sync::Mutex<hdrhistogram::Histogram<u64>>;

/// A histogram from 1 to `max`, 3 significant figures.
fn histogram(max: u64) -> Hist {
    std::sync::Mutex::new(
        hdrhistogram::Histogram::new_with_bounds(1, max, 3)
            .expect("constant histogram bounds are valid"),
    )
}

fn record(h: &Hist, values: impl IntoIterator<Item = u64>) {
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    for v in values {
        h.saturating_record(v.max(1));
    }
}

/// (p50, p95, p99, max) of a histogram.
fn quantiles(h: &Hist) -> (u64, u64, u64, u64) {
    let h = h.lock().unwrap_or_else(|e| e.into_inner());
    (
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.95),
        h.value_at_quantile(0.99),
        h.max(),
    )
}

/// p50, p95, p99 and max of a histogram, as JSON.
fn quantiles_json(h: &Hist) -> serde_json::Value {
    let (p50, p95, p99, max) = quantiles(h);
    serde_json::json!({"p50": p50, "p95": p95, "p99": p99, "max": max})
}
