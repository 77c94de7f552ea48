//! Which deliveries to acknowledge, and how: a pure tracker of delivery tags.
//!
//! Each consuming channel delivers tags in increasing order. A stored batch is acknowledged
//! with `basic.ack(multiple)` up to the highest tag below which nothing is outstanding (still
//! being analysed or stored, or waiting for its retry copy to be confirmed). A stored tag
//! above an outstanding one waits: it is covered by the next multiple-ack once the lower tags
//! are settled, so that groups finishing out of order still cost one ack frame, not one a
//! batch (every ack is a command in the quorum queue's log). At most `defer_limit` stored tags
//! wait on a channel; beyond that (a lower batch is slow) they are acknowledged one by one.
//! A tag marked held (its settling waits on the broker for longer than a moment: a retry copy
//! that a blocked connection cannot publish, during a memory alarm) holds nothing back: while
//! the lowest outstanding tag is held, stored tags go one by one at once, or the batches that
//! succeed would wait with it and their prefetch slots stay taken.
//! No I/O here: the sink carries the plans out.

use std::collections::BTreeSet;

/// Delivery tags of each consuming channel: outstanding (delivered, not settled) and stored
/// (to be acked, waiting for the tags below them).
#[derive(Debug, Default)]
pub struct AckTracker {
    chans: Vec<Chan>,
    defer_limit: usize,
}

#[derive(Debug, Default, Clone)]
struct Chan {
    outstanding: BTreeSet<u64>,
    stored: BTreeSet<u64>,
    /// Outstanding tags whose settling waits on the broker (see the module's text).
    held: BTreeSet<u64>,
}

/// How to acknowledge tags of one channel now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckPlan {
    /// Ack with `multiple` up to this tag (inclusive).
    pub multiple_up_to: Option<u64>,
    /// Tags to ack one by one.
    pub singles: Vec<u64>,
}

impl AckPlan {
    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.multiple_up_to.is_none() && self.singles.is_empty()
    }

    /// Ack frames the plan sends.
    pub fn frames(&self) -> usize {
        usize::from(self.multiple_up_to.is_some()) + self.singles.len()
    }
}

impl AckTracker {
    /// A tracker for `channels` consuming channels; at most `defer_limit` stored tags wait on
    /// a channel for the tags below them.
    pub fn new(channels: usize, defer_limit: usize) -> Self {
        Self {
            chans: vec![Chan::default(); channels],
            defer_limit: defer_limit.max(1),
        }
    }

    /// A delivery arrived on `chan`.
    pub fn delivered(&mut self, chan: usize, tag: u64) {
        if let Some(c) = self.chans.get_mut(chan) {
            c.outstanding.insert(tag);
        }
    }

    /// Tags still outstanding on `chan`.
    pub fn outstanding(&self, chan: usize) -> usize {
        self.chans.get(chan).map_or(0, |c| c.outstanding.len())
    }

    /// Stored tags waiting on `chan`.
    pub fn waiting(&self, chan: usize) -> usize {
        self.chans.get(chan).map_or(0, |c| c.stored.len())
    }

    /// A tag acked or nacked on its own: no longer outstanding. Stored tags it held back may
    /// be acked now.
    pub fn forget(&mut self, chan: usize, tag: u64) -> AckPlan {
        let limit = self.defer_limit;
        match self.chans.get_mut(chan) {
            Some(c) => {
                c.outstanding.remove(&tag);
                c.held.remove(&tag);
                c.release(limit)
            }
            None => AckPlan::default(),
        }
    }

    /// Outstanding `tag` of `chan` waits on the broker for long: the stored tags above it stop
    /// waiting for it (they go one by one).
    pub fn hold(&mut self, chan: usize, tag: u64) -> AckPlan {
        let limit = self.defer_limit;
        match self.chans.get_mut(chan) {
            Some(c) if c.outstanding.contains(&tag) => {
                c.held.insert(tag);
                c.release(limit)
            }
            _ => AckPlan::default(),
        }
    }

    /// `tags` of `chan` are stored: they are acked now or when the tags below them are.
    pub fn settle(&mut self, chan: usize, tags: Vec<u64>) -> AckPlan {
        let limit = self.defer_limit;
        let Some(c) = self.chans.get_mut(chan) else {
            let mut singles = tags;
            singles.sort_unstable();
            singles.dedup();
            return AckPlan {
                multiple_up_to: None,
                singles,
            };
        };
        for t in tags {
            if c.outstanding.remove(&t) {
                c.held.remove(&t);
                c.stored.insert(t);
            }
        }
        c.release(limit)
    }

    /// Everything stored, acked now (the session ends): one plan a channel.
    pub fn flush(&mut self) -> Vec<(usize, AckPlan)> {
        self.chans
            .iter_mut()
            .enumerate()
            .map(|(i, c)| (i, c.release(0)))
            .filter(|(_, p)| !p.is_empty())
            .collect()
    }
}

impl Chan {
    /// The stored tags that can be acked now: those below the lowest outstanding tag in one
    /// multiple-ack; and, when more than `limit` wait, all the others one by one.
    fn release(&mut self, limit: usize) -> AckPlan {
        let cut = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let below: Vec<u64> = self.stored.range(..cut).copied().collect();
        for t in &below {
            self.stored.remove(t);
        }
        let mut plan = AckPlan::default();
        match below.len() {
            0 => {}
            1 => plan.singles.push(below[0]),
            _ => plan.multiple_up_to = below.last().copied(),
        }
        let held_below = self
            .outstanding
            .first()
            .is_some_and(|t| self.held.contains(t));
        if self.stored.len() > limit || held_below {
            plan.singles.extend(std::mem::take(&mut self.stored));
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(tags: &[u64]) -> AckTracker {
        let mut t = AckTracker::new(2, 100);
        for &tag in tags {
            t.delivered(0, tag);
        }
        t
    }

    #[test]
    fn a_contiguous_group_is_one_multiple_ack() {
        let mut t = tracker(&[1, 2, 3, 4]);
        let plan = t.settle(0, vec![3, 1, 2, 4]);
        assert_eq!(plan.multiple_up_to, Some(4));
        assert!(plan.singles.is_empty());
        assert_eq!(t.outstanding(0), 0);
    }

    #[test]
    fn groups_finishing_out_of_order_cost_one_ack() {
        // 1-3 and 4-6 analysed in parallel; 4-6 are stored first and wait.
        let mut t = tracker(&[1, 2, 3, 4, 5, 6, 7]);
        let plan = t.settle(0, vec![4, 5, 6]);
        assert!(plan.is_empty());
        assert_eq!(t.waiting(0), 3);
        // 1-3 stored: one ack covers 1-6 (7 is still outstanding).
        let plan = t.settle(0, vec![1, 2, 3]);
        assert_eq!(plan.multiple_up_to, Some(6));
        assert!(plan.singles.is_empty());
        assert_eq!((t.outstanding(0), t.waiting(0)), (1, 0));
    }

    #[test]
    fn a_tag_settled_on_its_own_releases_the_tags_above_it() {
        // 3 waits for its retry copy: 1-2 together, 4-5 wait.
        let mut t = tracker(&[1, 2, 3, 4, 5]);
        let plan = t.settle(0, vec![1, 2, 4, 5]);
        assert_eq!(plan.multiple_up_to, Some(2));
        assert!(plan.singles.is_empty());
        // 3 acked on its own: 4-5 go in one ack.
        let plan = t.forget(0, 3);
        assert_eq!(plan.multiple_up_to, Some(5));
        assert_eq!((t.outstanding(0), t.waiting(0)), (0, 0));
    }

    #[test]
    fn a_held_tag_holds_nothing_back() {
        let mut t = tracker(&[1, 2, 3, 4, 5, 6]);
        // 2 waits for its retry copy; 3-4 stored wait for it, as long as it is short.
        assert_eq!(t.settle(0, vec![1]).singles, vec![1]);
        assert!(t.settle(0, vec![3, 4]).is_empty());
        // Its copy cannot go out (an alarm): 3-4 go now, and 5 at once when stored.
        assert_eq!(t.hold(0, 2).singles, vec![3, 4]);
        assert_eq!(t.settle(0, vec![5]).singles, vec![5]);
        // Settled at last: 6 is the lowest outstanding tag again, and not held.
        assert!(t.forget(0, 2).is_empty());
        assert_eq!(t.settle(0, vec![6]).singles, vec![6]);
        assert_eq!((t.outstanding(0), t.waiting(0)), (0, 0));
        // A tag no longer outstanding cannot be held.
        assert!(t.hold(0, 2).is_empty());
    }

    #[test]
    fn a_slow_batch_holds_back_at_most_the_limit() {
        let mut t = AckTracker::new(1, 3);
        for tag in 1..=6 {
            t.delivered(0, tag);
        }
        // 1 is slow: 2-4 wait, then 5 makes four waiting: all go one by one.
        assert!(t.settle(0, vec![2, 3, 4]).is_empty());
        let plan = t.settle(0, vec![5]);
        assert_eq!(plan.singles, vec![2, 3, 4, 5]);
        assert_eq!(plan.frames(), 4);
        assert_eq!(t.waiting(0), 0);
    }

    #[test]
    fn flush_acks_everything_stored_and_channels_are_separate() {
        let mut t = tracker(&[1, 2, 3]);
        t.delivered(1, 1);
        assert!(t.settle(0, vec![2, 3]).is_empty());
        let plan = t.settle(1, vec![1]);
        assert_eq!(plan.singles, vec![1]);
        assert_eq!(t.outstanding(0), 1);
        let flushed = t.flush();
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].0, 0);
        assert_eq!(flushed[0].1.singles, vec![2, 3]);
        let plan = t.settle(9, vec![5, 5]);
        assert_eq!(plan.singles, vec![5]);
    }
}
