//! The worker's shutdown as a state machine, with no I/O: running → draining (consumers
//! cancelled, the batches in hand finish, until a deadline) → stopped, or → hard stop when
//! the deadline passes first (what is left goes back to the broker unacked).

use std::time::Duration;

use tokio::time::Instant;

/// Where a session is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Consuming.
    Running,
    /// A signal came: no new deliveries; finish what is in hand before the deadline.
    Draining {
        /// When the rest is given back.
        deadline: Instant,
    },
    /// No more deliveries and nothing in hand: the rest of the results are being stored,
    /// still before the deadline.
    Drained {
        /// When the rest is given back.
        deadline: Instant,
    },
    /// The deadline passed: stop storing and acking; the broker requeues the rest.
    HardStop,
}

/// The drain of one worker.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    phase: Phase,
    timeout: Duration,
}

impl Drain {
    /// Running, with `timeout` to drain once a signal comes.
    pub fn new(timeout: Duration) -> Self {
        Self {
            phase: Phase::Running,
            timeout,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A shutdown signal at `now`: true when this starts the drain (only the first does).
    pub fn signal(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Running {
            return false;
        }
        self.phase = Phase::Draining {
            deadline: now + self.timeout,
        };
        true
    }

    /// Whether new deliveries are refused.
    pub fn draining(&self) -> bool {
        self.phase != Phase::Running
    }

    /// The deadline, while draining or drained.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining { deadline } | Phase::Drained { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Progress while draining: true (and `Drained`) once no more deliveries can come and
    /// nothing is in hand.
    pub fn progress(&mut self, deliveries_ended: bool, in_hand: usize) -> bool {
        if let Phase::Draining { deadline } = self.phase {
            if deliveries_ended && in_hand == 0 {
                self.phase = Phase::Drained { deadline };
            }
        }
        matches!(self.phase, Phase::Drained { .. })
    }

    /// The clock reached `now`: true (and `HardStop`) when the deadline has passed.
    pub fn tick(&mut self, now: Instant) -> bool {
        if let Phase::Draining { deadline } = self.phase {
            if now >= deadline {
                self.phase = Phase::HardStop;
            }
        }
        self.phase == Phase::HardStop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_that_finishes_in_time() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::from_secs(30));
        assert!(!d.draining() && d.deadline().is_none());
        assert!(!d.progress(true, 0), "running is not drained");
        assert!(d.signal(t0));
        assert!(!d.signal(t0), "a second signal does not restart the drain");
        assert_eq!(d.deadline(), Some(t0 + Duration::from_secs(30)));
        assert!(!d.progress(false, 3));
        assert!(!d.progress(true, 1));
        assert!(!d.tick(t0 + Duration::from_secs(29)));
        assert!(d.progress(true, 0));
        assert!(matches!(d.phase(), Phase::Drained { .. }));
        assert!(
            !d.tick(t0 + Duration::from_secs(31)),
            "drained stays drained"
        );
    }

    #[test]
    fn a_drain_that_runs_out_of_time() {
        let t0 = Instant::now();
        let mut d = Drain::new(Duration::from_secs(2));
        assert!(
            !d.tick(t0 + Duration::from_secs(5)),
            "no deadline while running"
        );
        d.signal(t0);
        assert!(d.tick(t0 + Duration::from_secs(2)));
        assert_eq!(d.phase(), Phase::HardStop);
        assert!(!d.progress(true, 0), "a hard stop is not drained");
        assert!(d.draining());
    }
}
