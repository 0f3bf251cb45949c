//! A map whose records expire, for the in-memory store's idempotency records (one or two per
//! message). It is split into shards, each with its own map and expiry queue, so that no
//! insert pays for rehashing or moving every record at once. As one map, each time the record
//! count passed a power of two the insert that grew it rehashed all of them (and the expiry
//! queue copied itself) under the store's lock: at 10,000 messages a second that stalled every
//! send for tens of milliseconds at 114,688, 229,376 and 262,144 records, and those stalls were
//! the p99 latency. A shard grows by its own share only.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::Duration;

use tokio::time::Instant;

/// How much of an [`ExpiringMap`]'s cap a value takes.
pub(super) trait Weight {
    fn weight(&self) -> usize;
}

/// Records that expire a fixed time after they were created, in `SHARDS` shards, with a cap
/// of `MAX_WEIGHT` on their total weight beyond which the oldest go early. Over the cap, the
/// shards an upsert touches that hold more than their share lose their oldest records: with
/// keys spread evenly that is close to oldest overall, and under the cap one heavy record (a
/// big group's message) never pushes out its shard's others.
pub(super) struct ExpiringMap<K, V, const SHARDS: usize, const MAX_WEIGHT: usize> {
    shards: Box<[Shard<K, V>]>,
    /// The weight of all shards' records.
    total: usize,
    /// Picks a key's shard (independent of the shards' own hashers).
    shard_of: RandomState,
    /// Upserts so far: every [`SWEEP_EVERY`]th also prunes the next shard in turn, so expired
    /// records go even from shards no key lands in any more.
    upserts: usize,
}

/// How often an upsert prunes a shard besides its own.
pub(super) const SWEEP_EVERY: usize = 16;

/// The map's own fields and the time its next record expires share a cache line: a shard is
/// one of hundreds, so what an upsert reads of it has usually left the cache since the last
/// one. (Reading the expiry queue's front on every upsert instead cost a cache miss each time.)
#[repr(C, align(64))]
struct Shard<K, V> {
    records: HashMap<K, (V, Instant)>,
    /// The front of `expiry`'s time: when pruning has something to do.
    next_expiry: Option<Instant>,
    /// (expiry, key) of the records, oldest first. An entry whose record has since expired and
    /// been created again (a different expiry) is skipped when it comes up.
    expiry: VecDeque<(Instant, K)>,
    weight: usize,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Self {
        Self {
            records: HashMap::new(),
            next_expiry: None,
            expiry: VecDeque::new(),
            weight: 0,
        }
    }
}

/// When a shard's oldest records go before they expire.
#[derive(Clone, Copy)]
struct Cap {
    /// Most weight in all shards.
    total: usize,
    /// A shard's share of it.
    share: usize,
}

impl<K: Hash + Eq + Copy, V: Weight> Shard<K, V> {
    /// Forgets expired records, then the oldest ones while all shards together (`total`) weigh
    /// more than the cap and this one more than its share.
    fn prune(&mut self, now: Instant, total: &mut usize, cap: Cap) {
        let over = |shard: usize, total: usize| total > cap.total && shard > cap.share;
        if self.next_expiry.is_none_or(|at| at > now) && !over(self.weight, *total) {
            return;
        }
        while let Some(&(expires, key)) = self.expiry.front() {
            if expires > now && !over(self.weight, *total) {
                break;
            }
            self.expiry.pop_front();
            if self.records.get(&key).is_some_and(|(_, e)| *e == expires)
                && let Some((value, _)) = self.records.remove(&key)
            {
                self.weight -= value.weight();
                *total -= value.weight();
            }
        }
        self.next_expiry = self.expiry.front().map(|(at, _)| *at);
    }
}

impl<K, V, const SHARDS: usize, const MAX_WEIGHT: usize> Default
    for ExpiringMap<K, V, SHARDS, MAX_WEIGHT>
{
    fn default() -> Self {
        const { assert!(SHARDS > 0) };
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            total: 0,
            shard_of: RandomState::new(),
            upserts: 0,
        }
    }
}

impl<K: Hash + Eq + Copy, V: Weight, const SHARDS: usize, const MAX_WEIGHT: usize>
    ExpiringMap<K, V, SHARDS, MAX_WEIGHT>
{
    const CAP: Cap = Cap {
        total: MAX_WEIGHT,
        share: MAX_WEIGHT.div_ceil(SHARDS),
    };

    fn shard_index(&self, key: &K) -> usize {
        (self.shard_of.hash_one(key) % SHARDS as u64) as usize
    }

    /// Applies `update` to the value of `key`: the one whose record has not expired, or a new
    /// one from `create` whose record expires `ttl` from `now`. Prunes `key`'s shard and one
    /// more first.
    pub fn upsert<R>(
        &mut self,
        key: K,
        now: Instant,
        ttl: Duration,
        create: impl FnOnce() -> V,
        update: impl FnOnce(&mut V) -> R,
    ) -> R {
        self.upserts = self.upserts.wrapping_add(1);
        if self.upserts.is_multiple_of(SWEEP_EVERY) {
            let sweep = self.upserts / SWEEP_EVERY % SHARDS;
            self.shards[sweep].prune(now, &mut self.total, Self::CAP);
        }
        let index = self.shard_index(&key);
        self.shards[index].prune(now, &mut self.total, Self::CAP);
        let total = &mut self.total;
        let Shard {
            records,
            next_expiry,
            expiry,
            weight,
        } = &mut self.shards[index];
        let (value, _) = match records.entry(key) {
            Entry::Occupied(live) if live.get().1 > now => live.into_mut(),
            // New, or expired but not yet pruned: records made with different `ttl`s are not
            // in expiry order in the queue.
            stale_or_new => {
                let expires = now + ttl;
                let value = create();
                *weight += value.weight();
                *total += value.weight();
                expiry.push_back((expires, key));
                next_expiry.get_or_insert(expires);
                match stale_or_new {
                    Entry::Occupied(mut stale) => {
                        let (old, _) = stale.insert((value, expires));
                        *weight -= old.weight();
                        *total -= old.weight();
                        stale.into_mut()
                    }
                    Entry::Vacant(new) => new.insert((value, expires)),
                }
            }
        };
        let before = value.weight();
        let result = update(value);
        *weight = *weight - before + value.weight();
        *total = *total - before + value.weight();
        result
    }

    /// Live and not yet pruned records.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.records.len()).sum()
    }

    /// Their total weight (checked against the shards').
    #[cfg(test)]
    pub fn weight(&self) -> usize {
        assert_eq!(
            self.total,
            self.shards.iter().map(|s| s.weight).sum::<usize>()
        );
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value weighing its own size.
    impl Weight for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    const TTL: Duration = Duration::from_secs(10);

    /// The value `key` has now, creating `fresh` if it has none.
    fn value_of<const S: usize, const M: usize>(
        map: &mut ExpiringMap<u64, Vec<u8>, S, M>,
        key: u64,
        fresh: u8,
    ) -> Vec<u8> {
        map.upsert(key, Instant::now(), TTL, || vec![fresh], |v| v.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn records_last_their_ttl_and_are_created_anew_after_it() {
        let mut map = ExpiringMap::<u64, Vec<u8>, 4, 1_000>::default();
        assert_eq!(value_of(&mut map, 1, 7), vec![7]);
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert_eq!(value_of(&mut map, 1, 8), vec![7]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(value_of(&mut map, 1, 9), vec![9]);
        assert_eq!((map.len(), map.weight()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn every_shard_is_pruned_within_a_sweep_wherever_the_inserts_land() {
        let mut map = ExpiringMap::<u64, Vec<u8>, 8, 1_000>::default();
        for key in 0..100 {
            value_of(&mut map, key, 1);
        }
        tokio::time::advance(TTL).await;
        // All of these could land in one shard; the sweep still reaches the other seven.
        let sweep = (8 * SWEEP_EVERY) as u64;
        for key in 1_000..1_000 + sweep {
            value_of(&mut map, key, 1);
        }
        assert_eq!(map.len() as u64, sweep);
        assert_eq!(map.weight() as u64, sweep);
    }

    #[tokio::test]
    async fn beyond_the_cap_the_oldest_records_go_first() {
        let mut map = ExpiringMap::<u64, Vec<u8>, 1, 1_000>::default();
        let now = Instant::now();
        for key in [100, 101, 102] {
            map.upsert(key, now, TTL, Vec::new, |v| v.resize(600, 0));
        }
        // 1,200 was over the cap when the third record came: the first went.
        assert_eq!((map.len(), map.weight()), (2, 1_200));
        // Still over it at the next call: 101 goes too, and 102 keeps its value.
        let len = map.upsert(102, now, TTL, Vec::new, |v| v.len());
        assert_eq!((len, map.len(), map.weight()), (600, 1, 600));
    }

    #[tokio::test]
    async fn under_the_cap_a_record_heavier_than_its_shards_share_stays() {
        let mut map = ExpiringMap::<u64, Vec<u8>, 4, 1_000>::default();
        let now = Instant::now();
        map.upsert(1, now, TTL, Vec::new, |v| v.resize(600, 0));
        for key in 2..100 {
            map.upsert(key, now, TTL, Vec::new, |v| v.push(0));
        }
        let len = map.upsert(1, now, TTL, Vec::new, |v| v.len());
        assert_eq!((len, map.len(), map.weight()), (600, 99, 698));
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_made_again_outlives_its_predecessors_queue_entry() {
        let mut map = ExpiringMap::<u64, Vec<u8>, 1, 1_000>::default();
        let start = Instant::now();
        map.upsert(1, start, TTL, || vec![1], |_| ());
        // A shorter ttl puts key 2's entry behind one that expires later.
        map.upsert(2, start, Duration::from_secs(1), || vec![2], |_| ());
        tokio::time::advance(Duration::from_secs(2)).await;
        // Expired, not pruned (key 1's entry is in front): made again, expiring at 12 s.
        assert_eq!(value_of(&mut map, 2, 3), vec![3]);
        tokio::time::advance(Duration::from_secs(9)).await;
        // Pruning at 11 s takes key 1 and skips key 2's first entry, which is not its record's.
        assert_eq!(value_of(&mut map, 4, 4), vec![4]);
        assert_eq!(value_of(&mut map, 2, 5), vec![3]);
        assert_eq!((map.len(), map.weight()), (2, 2));
    }
}
