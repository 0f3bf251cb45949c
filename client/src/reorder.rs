//! Exactly-once, in-order delivery on the client, and the reconnect schedule: pure logic with
//! no sockets or clocks, tested with plain values.

use std::collections::BTreeMap;
use std::time::Duration;

/// Most out-of-order entries held while waiting for a gap to fill; beyond this, later entries
/// are dropped and fetched again by a pull.
const MAX_PENDING: usize = 10_000;

/// Releases inbox entries in sequence order, each once.
#[derive(Debug)]
pub struct Reorder<T> {
    last: u64,
    pending: BTreeMap<u64, T>,
    duplicates: u64,
    skipped: u64,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Self::new(0)
    }
}

impl<T> Reorder<T> {
    /// Starts after sequence number `last` (0: nothing seen yet).
    pub fn new(last: u64) -> Self {
        Self {
            last,
            pending: BTreeMap::new(),
            duplicates: 0,
            skipped: 0,
        }
    }

    /// Highest sequence number up to which everything was released.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether entries are held back waiting for missing ones.
    pub fn has_gap(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Entries dropped because they were already released or already held.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Sequence numbers given up on because the inbox no longer had them.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Offers entry `seq`; returns the entries that can now be released, in order.
    pub fn offer(&mut self, seq: u64, item: T) -> Vec<T> {
        if seq <= self.last || self.pending.contains_key(&seq) {
            self.duplicates += 1;
            return Vec::new();
        }
        if seq != self.last.saturating_add(1) && self.pending.len() >= MAX_PENDING {
            return Vec::new();
        }
        self.pending.insert(seq, item);
        self.release()
    }

    /// The inbox's oldest entry after `last` is `first`: anything before it is gone for good
    /// (trimmed by the inbox caps), so stop waiting for it. Entries before `first` that are
    /// held (pushed before the trim) are released with it, in order. Returns entries now
    /// releasable.
    pub fn skip_to(&mut self, first: u64) -> Vec<T> {
        let mut out = Vec::new();
        if first > self.last.saturating_add(1) {
            let later = self.pending.split_off(&first);
            let held = std::mem::replace(&mut self.pending, later);
            self.skipped += first - self.last - 1 - held.len() as u64;
            out.extend(held.into_values());
            self.last = first - 1;
        }
        out.extend(self.release());
        out
    }

    /// Continues after `last` when nothing is held back: everything up to it was delivered
    /// before, to this client or an earlier one of the same user (the server says so at login).
    /// Unlike [`Reorder::skip_to`], nothing counts as skipped.
    pub fn start_after(&mut self, last: u64) {
        if self.pending.is_empty() && last > self.last {
            self.last = last;
        }
    }

    fn release(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(next) = self.last.checked_add(1)
            && let Some(item) = self.pending.remove(&next)
        {
            self.last = next;
            out.push(item);
        }
        out
    }
}

/// Exponential backoff with full jitter: attempt n waits a random time in
/// `[0, min(max, base * 2^n)]`, so a crowd of clients does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `base`, capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The wait before the next attempt; `random` is a uniformly random `u64`.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(if millis == 0 {
            0
        } else {
            random % (millis + 1)
        })
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn releases_in_order_and_drops_duplicates() {
        let mut r = Reorder::new(0);
        assert_eq!(r.offer(2, "b"), Vec::<&str>::new());
        assert!(r.has_gap());
        assert_eq!(r.offer(2, "b again"), Vec::<&str>::new());
        assert_eq!(r.offer(1, "a"), vec!["a", "b"]);
        assert_eq!(r.offer(1, "a again"), Vec::<&str>::new());
        assert_eq!((r.last(), r.duplicates(), r.has_gap()), (2, 2, false));
    }

    #[test]
    fn skipping_gives_up_on_trimmed_entries() {
        let mut r = Reorder::new(5);
        assert!(r.offer(9, 9).is_empty());
        assert_eq!(r.skip_to(8), Vec::<i32>::new());
        assert_eq!(r.offer(8, 8), vec![8, 9]);
        assert_eq!((r.last(), r.skipped()), (9, 2));
    }

    #[test]
    fn skipping_releases_what_is_held_before_the_oldest_entry() {
        let mut r = Reorder::new(40);
        assert!(r.offer(50, 50).is_empty());
        assert!(r.offer(1052, 1052).is_empty());
        // The inbox was trimmed past 50 while it waited for 41..49: 50 was pushed already.
        assert_eq!(r.skip_to(1051), vec![50]);
        assert_eq!(r.offer(1051, 1051), vec![1051, 1052]);
        assert_eq!((r.last(), r.skipped()), (1052, 1009));
        // Near the largest seq, nothing overflows.
        let mut r = Reorder::<i32>::new(u64::MAX);
        assert!(r.skip_to(u64::MAX).is_empty());
        assert_eq!(r.last(), u64::MAX);
    }

    #[test]
    fn starting_after_a_seq_counts_nothing_skipped_and_needs_an_empty_buffer() {
        let mut r = Reorder::new(0);
        r.start_after(50);
        assert_eq!((r.last(), r.skipped()), (50, 0));
        assert_eq!(r.offer(51, 51), vec![51]);
        assert_eq!(
            r.offer(50, 50),
            Vec::<i32>::new(),
            "delivered before: a duplicate"
        );
        assert!(r.offer(53, 53).is_empty());
        r.start_after(60);
        assert_eq!(r.last(), 51, "something is held back: the base stays");
    }

    #[test]
    fn the_largest_seq_does_not_overflow() {
        let mut r = Reorder::new(u64::MAX - 1);
        assert_eq!(r.offer(u64::MAX, 1), vec![1]);
        assert_eq!(r.offer(u64::MAX, 2), Vec::<i32>::new());
        assert_eq!(r.last(), u64::MAX);
    }

    proptest! {
        #[test]
        fn any_arrival_order_with_duplicates_releases_each_once_in_order(
            order in Just((1..=60u64).collect::<Vec<_>>()).prop_shuffle(),
            dups in proptest::collection::vec(1..=60u64, 0..30),
        ) {
            let mut r = Reorder::new(0);
            let mut released = Vec::new();
            for seq in order.iter().chain(dups.iter()) {
                released.extend(r.offer(*seq, *seq));
            }
            prop_assert_eq!(released, (1..=60).collect::<Vec<_>>());
        }

        #[test]
        fn backoff_stays_within_its_growing_ceiling(randoms in proptest::collection::vec(any::<u64>(), 1..20)) {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            for (n, random) in randoms.iter().enumerate() {
                let ceiling = Duration::from_millis(100 * (1u64 << n.min(20))).min(Duration::from_secs(5));
                prop_assert!(b.next_delay(*random) <= ceiling);
            }
        }
    }
}
