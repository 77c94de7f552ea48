//! Retry policy: exponential delays with jitter, held in the broker.
//!
//! A batch that fails transiently is published again, with its attempt header raised, to a
//! delay queue `{ns}.{queue}.delay.{ms}`: a quorum queue whose message TTL is the delay and
//! whose dead-letter target is the work exchange with the work queue's routing key. When the
//! TTL ends the broker moves the batch back to its work queue. Nothing waits in worker memory,
//! and a delay of any length never meets RabbitMQ's consumer timeout.
//!
//! Delays come in a fixed set of tiers (`topology::DELAY_TIERS_MS`, 100 ms to a day), since a
//! queue expires messages only from its head and so holds one delay: a work queue never has
//! more delay queues than tiers, whatever the settings. A computed delay between two tiers
//! goes to the upper one with a probability that keeps its mean exact (drawn from job, batch
//! and attempt), which also spreads batches that failed together over two return times.

use std::collections::BTreeMap;

use clap::Args;
use taskmill_common::{task::hash::draw, topology::DELAY_TIERS_MS};

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

    /// The nominal delay after failed attempt `attempt` (1-based), in ms.
    pub fn nominal_delay_ms(&self, attempt: u32) -> f64 {
        let exp = self
            .factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        (self.base_ms as f64 * exp).min(self.max_delay_ms as f64)
    }

    /// The delay after failed attempt `attempt` (1-based): one of the tiers of
    /// `DELAY_TIERS_MS`, the lower or the upper neighbour of the nominal delay, drawn so that
    /// the mean is the nominal delay.
    pub fn delay_ms(&self, attempt: u32, job: &str, batch: u64) -> u64 {
        let tiers = DELAY_TIERS_MS;
        let raw = self.nominal_delay_ms(attempt);
        let upper = tiers.iter().position(|&t| t as f64 >= raw);
        let Some(upper) = upper else {
            return tiers[tiers.len() - 1];
        };
        if upper == 0 {
            return tiers[0];
        }
        let (lo, hi) = (tiers[upper - 1] as f64, tiers[upper] as f64);
        let p_upper = (raw - lo) / (hi - lo);
        if draw(0x717, job, batch, attempt) < p_upper {
            tiers[upper]
        } else {
            tiers[upper - 1]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_tiers_around_the_nominal_delay() {
        let p = RetryPolicy::default();
        for attempt in 1..=12 {
            let nominal = p.nominal_delay_ms(attempt);
            for batch in 0..50 {
                let d = p.delay_ms(attempt, "j", batch);
                assert!(DELAY_TIERS_MS.contains(&d), "{d}");
                let i = DELAY_TIERS_MS.iter().position(|&t| t == d).unwrap();
                let lower_ok = d as f64 <= nominal;
                let next_ok = DELAY_TIERS_MS
                    .get(i + 1)
                    .is_none_or(|&n| n as f64 >= nominal);
                let prev_ok = i == 0 || DELAY_TIERS_MS[i - 1] as f64 <= nominal;
                assert!(
                    (lower_ok && next_ok) || prev_ok,
                    "{attempt}: {d} for {nominal}"
                );
            }
        }
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }

    #[test]
    fn any_settings_use_few_queues() {
        let mut seen = std::collections::BTreeSet::new();
        for base in [1, 7, 200, 333, 1000, 4999] {
            let p = RetryPolicy {
                base_ms: base,
                factor: 1.7,
                ..RetryPolicy::default()
            };
            for attempt in 1..=20 {
                for batch in 0..20 {
                    seen.insert(p.delay_ms(attempt, "job", batch));
                }
            }
        }
        assert!(seen.len() <= DELAY_TIERS_MS.len(), "{seen:?}");
    }

    #[test]
    fn mean_delay_is_nominal() {
        let p = RetryPolicy {
            base_ms: 3000,
            ..RetryPolicy::default()
        };
        let n = 4000;
        let sum: u64 = (0..n).map(|b| p.delay_ms(1, "job", b)).sum();
        let mean = sum as f64 / n as f64;
        assert!((2800.0..3200.0).contains(&mean), "{mean}");
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
        assert!(p.delay_ms(1, "j", 0) <= 100);
    }
}
