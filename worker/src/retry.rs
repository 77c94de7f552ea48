//! Retry policy: exponential delays with jitter, held in the broker.
//!
//! A batch that fails transiently is published again, with its attempt header raised, to a
//! delay queue `{ns}.{queue}.delay.{ms}`: a quorum queue whose message TTL is the delay and
//! whose dead-letter target is the work exchange with the work queue's routing key. When the
//! TTL ends the broker moves the batch back to its work queue. Nothing waits in worker memory,
//! and a delay of any length never meets RabbitMQ's consumer timeout.
//!
//! Jitter: each delay is multiplied by 0.8, 1.0 or 1.2, chosen from job, batch and attempt, so
//! that batches that failed together do not all come back together. Three buckets (rather than
//! a continuous spread) keep the number of delay queues small: each delay is one queue, since
//! a queue expires messages only from its head.

use std::collections::BTreeMap;

use clap::Args;

/// Retry settings; each can be overridden per task with a job parameter of the same name
/// (`retry_max_attempts`, `retry_base_ms`, `retry_factor`, `retry_max_delay_ms`).
#[derive(Args, Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last, the batch is dead-lettered.
    #[arg(
        long = "retry-max-attempts",
        env = "TASKMILL_RETRY_MAX_ATTEMPTS",
        default_value_t = RetryPolicy::default().max_attempts
    )]
    pub max_attempts: u32,
    /// Delay before the first retry, in ms.
    #[arg(
        long = "retry-base-ms",
        env = "TASKMILL_RETRY_BASE_MS",
        default_value_t = RetryPolicy::default().base_ms
    )]
    pub base_ms: u64,
    /// Each further retry waits this many times longer.
    #[arg(
        long = "retry-factor",
        env = "TASKMILL_RETRY_FACTOR",
        default_value_t = RetryPolicy::default().factor
    )]
    pub factor: f64,
    /// Longest delay, in ms.
    #[arg(
        long = "retry-max-delay-ms",
        env = "TASKMILL_RETRY_MAX_DELAY_MS",
        default_value_t = RetryPolicy::default().max_delay_ms
    )]
    pub max_delay_ms: u64,
}

impl Default for RetryPolicy {
    /// The defaults of the flags: 5 attempts, 1 s, ×2, at most 10 minutes.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_ms: 1000,
            factor: 2.0,
            max_delay_ms: 600_000,
        }
    }
}

impl RetryPolicy {
    /// This policy with a job's `retry_*` parameters applied (unparseable ones are ignored).
    pub fn for_params(&self, params: &BTreeMap<String, String>) -> Self {
        fn get<T: std::str::FromStr>(p: &BTreeMap<String, String>, k: &str, d: T) -> T {
            p.get(k).and_then(|v| v.trim().parse().ok()).unwrap_or(d)
        }
        Self {
            max_attempts: get(params, "retry_max_attempts", self.max_attempts).max(1),
            base_ms: get(params, "retry_base_ms", self.base_ms),
            factor: get(params, "retry_factor", self.factor),
            max_delay_ms: get(params, "retry_max_delay_ms", self.max_delay_ms),
        }
    }

    /// Whether attempt `attempt` (1-based) that just failed may be followed by another.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay after failed attempt `attempt` (1-based), jitter included, in ms (≥ 1).
    pub fn delay_ms(&self, attempt: u32, job: &str, batch: u64) -> u64 {
        let exp = self
            .factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let raw = (self.base_ms as f64 * exp).min(self.max_delay_ms as f64);
        let bucket = taskmill_common::tasks::chaos::draw(0x717, job, batch, attempt);
        let jitter = if bucket < 1.0 / 3.0 {
            0.8
        } else if bucket < 2.0 / 3.0 {
            1.0
        } else {
            1.2
        };
        ((raw * jitter).round() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy::default();
        let d: Vec<u64> = (1..=12).map(|a| p.delay_ms(a, "j", 1)).collect();
        for (i, &x) in d.iter().enumerate() {
            let nominal = (1000f64 * 2f64.powi(i as i32)).min(600_000.0);
            assert!(
                x as f64 >= nominal * 0.8 - 1.0 && x as f64 <= nominal * 1.2 + 1.0,
                "{i}: {x}"
            );
        }
        assert!(d[11] <= 720_000);
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }

    #[test]
    fn params_override() {
        let params = BTreeMap::from([
            ("retry_max_attempts".to_string(), "2".to_string()),
            ("retry_base_ms".to_string(), "10".to_string()),
        ]);
        let p = RetryPolicy::default().for_params(&params);
        assert_eq!(p.max_attempts, 2);
        assert_eq!(p.base_ms, 10);
        assert!(p.delay_ms(1, "j", 0) <= 12);
    }
}
