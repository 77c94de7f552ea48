//! taskmill-broker: RabbitMQ for the producer, the worker and the dead-letter tools.
//!
//! - [`amqp`]: connecting (with errors in one sentence), batch properties, header helpers and
//!   the one confirmed publish that retries, dead letters and replays use.
//! - [`dead`]: the one reader of a dead letter's headers (why its batch died).
//! - [`topology`]: declaring the exchanges and queues (names come from
//!   `taskmill_protocol::names`).
//! - [`Backoff`]: the one exponential backoff every reconnect and retry loop uses.

pub mod amqp;
pub mod dead;
pub mod topology;

use std::time::Duration;

/// Exponential backoff: each [`Backoff::next_delay`] returns the current delay and doubles it, up to
/// a ceiling; [`Backoff::reset`] starts over.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
    current: Duration,
    max: Duration,
}

impl Backoff {
    /// Starting at `first`, never longer than `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            current: first,
            max,
        }
    }

    /// The delay to wait now; the next one is twice as long (up to the ceiling).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// The delay `next_delay` would return, without moving on.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
