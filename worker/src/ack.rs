//! Which deliveries to acknowledge, and how: a pure tracker of outstanding delivery tags.
//!
//! Each consuming channel delivers tags in increasing order. After a group of batches is
//! stored, one `basic.ack(multiple)` can acknowledge every tag up to the highest one below
//! which nothing else is outstanding (a batch waiting for its retry copy, say); the rest are
//! acknowledged one by one. No I/O here: the sink carries the plan out.

use std::collections::BTreeSet;

/// Outstanding (delivered, not yet acked or nacked) tags of each consuming channel.
#[derive(Debug, Default)]
pub struct AckTracker {
    chans: Vec<BTreeSet<u64>>,
}

/// How to acknowledge a set of tags of one channel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckPlan {
    /// Ack with `multiple` up to this tag (inclusive), when more than one tag is covered.
    pub multiple_up_to: Option<u64>,
    /// Tags to ack one by one (a lone tag below the cut is here too).
    pub singles: Vec<u64>,
}

impl AckTracker {
    /// A tracker for `channels` consuming channels.
    pub fn new(channels: usize) -> Self {
        Self {
            chans: vec![BTreeSet::new(); channels],
        }
    }

    /// A delivery arrived on `chan`.
    pub fn delivered(&mut self, chan: usize, tag: u64) {
        if let Some(set) = self.chans.get_mut(chan) {
            set.insert(tag);
        }
    }

    /// Tags still outstanding on `chan`.
    pub fn outstanding(&self, chan: usize) -> usize {
        self.chans.get(chan).map_or(0, BTreeSet::len)
    }

    /// A tag acked or nacked on its own: no longer outstanding.
    pub fn forget(&mut self, chan: usize, tag: u64) {
        if let Some(set) = self.chans.get_mut(chan) {
            set.remove(&tag);
        }
    }

    /// `tags` of `chan` are all to be acked now: forgets them and says how.
    pub fn settle(&mut self, chan: usize, mut tags: Vec<u64>) -> AckPlan {
        tags.sort_unstable();
        tags.dedup();
        let Some(set) = self.chans.get_mut(chan) else {
            return AckPlan {
                multiple_up_to: None,
                singles: tags,
            };
        };
        for t in &tags {
            set.remove(t);
        }
        // The smallest tag still outstanding that is not being acked now.
        let cut = set.first().copied().unwrap_or(u64::MAX);
        let below = tags.iter().take_while(|&&t| t < cut).count();
        let mut plan = AckPlan::default();
        if below > 1 {
            plan.multiple_up_to = Some(tags[below - 1]);
            plan.singles = tags[below..].to_vec();
        } else {
            plan.singles = tags;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(tags: &[u64]) -> AckTracker {
        let mut t = AckTracker::new(2);
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
    fn an_outstanding_tag_stops_the_multiple_ack() {
        // 3 waits for its retry copy: 1-2 together, 4-5 one by one.
        let mut t = tracker(&[1, 2, 3, 4, 5]);
        let plan = t.settle(0, vec![1, 2, 4, 5]);
        assert_eq!(plan.multiple_up_to, Some(2));
        assert_eq!(plan.singles, vec![4, 5]);
        assert_eq!(t.outstanding(0), 1);
        // Once 3 is settled on its own, later groups ack in one go again.
        t.forget(0, 3);
        t.delivered(0, 6);
        t.delivered(0, 7);
        let plan = t.settle(0, vec![6, 7]);
        assert_eq!(plan.multiple_up_to, Some(7));
    }

    #[test]
    fn a_single_tag_is_acked_alone_and_channels_are_separate() {
        let mut t = tracker(&[1, 2]);
        t.delivered(1, 1);
        let plan = t.settle(0, vec![1]);
        assert_eq!(plan.multiple_up_to, None);
        assert_eq!(plan.singles, vec![1]);
        assert_eq!(t.outstanding(1), 1);
        let plan = t.settle(9, vec![5]);
        assert_eq!(plan.singles, vec![5]);
    }
}
