//! A map whose records expire, for the in-memory store's idempotency records (one or two per
//! message), built so that no insert pays for moving every record at once. As one `HashMap`
//! and one `VecDeque`, each time the record count passed a power of two the insert that grew
//! them rehashed or copied all of them under the store's lock: at 10,000 messages a second that
//! stalled every send for tens of milliseconds at 114,688, 229,376 and 262,144 records, and
//! those stalls were the p99 latency. Here the records sit in 256 maps (a map grows by 1/256 of
//! them at a time) and their expiry order in a queue of fixed-size chunks (growing it moves
//! a few words per chunk).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::Duration;

use tokio::time::Instant;

/// How much of an [`ExpiringMap`]'s cap a value takes.
pub(super) trait Weight {
    fn weight(&self) -> usize;
}

/// Records that expire a fixed time after they were created, in `SHARDS` maps, with a cap of
/// `MAX_WEIGHT` on their total weight beyond which the oldest go early.
pub(super) struct ExpiringMap<K, V, const SHARDS: usize, const MAX_WEIGHT: usize> {
    shards: Box<[HashMap<K, (V, Instant)>]>,
    /// Picks a key's shard (independent of the shards' own hashers).
    shard_of: RandomState,
    /// (expiry, key) of every record, oldest first. An entry whose record has since expired
    /// and been created again (a different expiry) is skipped when it comes up.
    expiry: ChunkedQueue<(Instant, K)>,
    /// The weight of all records.
    total: usize,
}

impl<K, V, const SHARDS: usize, const MAX_WEIGHT: usize> Default
    for ExpiringMap<K, V, SHARDS, MAX_WEIGHT>
{
    fn default() -> Self {
        const { assert!(SHARDS > 0) };
        Self {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
            shard_of: RandomState::new(),
            expiry: ChunkedQueue::default(),
            total: 0,
        }
    }
}

impl<K: Hash + Eq + Copy, V: Weight, const SHARDS: usize, const MAX_WEIGHT: usize>
    ExpiringMap<K, V, SHARDS, MAX_WEIGHT>
{
    fn shard_index(&self, key: &K) -> usize {
        (self.shard_of.hash_one(key) % SHARDS as u64) as usize
    }

    /// Forgets expired records, then the oldest ones while all of them weigh more than the cap.
    fn prune(&mut self, now: Instant) {
        while let Some(&(expires, key)) = self.expiry.front() {
            if expires > now && self.total <= MAX_WEIGHT {
                break;
            }
            self.expiry.pop_front();
            let index = self.shard_index(&key);
            if let Entry::Occupied(record) = self.shards[index].entry(key)
                && record.get().1 == expires
            {
                self.total -= record.remove().0.weight();
            }
        }
    }

    /// Applies `update` to the value of `key`: the one whose record has not expired, or a new
    /// one from `create` whose record expires `ttl` from `now`. Prunes first.
    pub fn upsert<R>(
        &mut self,
        key: K,
        now: Instant,
        ttl: Duration,
        create: impl FnOnce() -> V,
        update: impl FnOnce(&mut V) -> R,
    ) -> R {
        self.prune(now);
        let index = self.shard_index(&key);
        let Self {
            shards,
            expiry,
            total,
            ..
        } = self;
        let (value, _) = match shards[index].entry(key) {
            Entry::Occupied(live) if live.get().1 > now => live.into_mut(),
            // New, or expired but not yet pruned: records made with different `ttl`s are not
            // in expiry order in the queue.
            stale_or_new => {
                let expires = now + ttl;
                let value = create();
                *total += value.weight();
                expiry.push_back((expires, key));
                match stale_or_new {
                    Entry::Occupied(mut stale) => {
                        let (old, _) = stale.insert((value, expires));
                        *total -= old.weight();
                        stale.into_mut()
                    }
                    Entry::Vacant(new) => new.insert((value, expires)),
                }
            }
        };
        let before = value.weight();
        let result = update(value);
        *total = *total - before + value.weight();
        result
    }

    /// The value of `key` if its record has not expired at `now`.
    pub fn get(&self, key: &K, now: Instant) -> Option<&V> {
        self.shards[self.shard_index(key)]
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(value, _)| value)
    }

    /// Live and not yet pruned records.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    /// Their total weight (checked against the records').
    #[cfg(test)]
    pub fn weight(&self) -> usize {
        let records: usize = self
            .shards
            .iter()
            .flat_map(|shard| shard.values())
            .map(|(value, _)| value.weight())
            .sum();
        assert_eq!(self.total, records);
        self.total
    }
}

/// Items in a chunk of a [`ChunkedQueue`].
const CHUNK: usize = 1024;

/// A FIFO queue in chunks of [`CHUNK`] items: it grows a chunk at a time and never moves the
/// items it holds.
struct ChunkedQueue<T> {
    chunks: VecDeque<VecDeque<T>>,
}

impl<T> Default for ChunkedQueue<T> {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
        }
    }
}

impl<T> ChunkedQueue<T> {
    fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push_back(item),
            _ => {
                let mut chunk = VecDeque::with_capacity(CHUNK);
                chunk.push_back(item);
                self.chunks.push_back(chunk);
            }
        }
    }

    fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let item = first.pop_front();
        if first.is_empty() {
            self.chunks.pop_front();
        }
        item
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
    async fn expired_records_go_whichever_shard_the_next_insert_lands_in() {
        let mut map = ExpiringMap::<u64, Vec<u8>, 8, 1_000>::default();
        for key in 0..100 {
            value_of(&mut map, key, 1);
        }
        tokio::time::advance(TTL).await;
        value_of(&mut map, 1_000, 1);
        assert_eq!((map.len(), map.weight()), (1, 1));
    }

    #[tokio::test]
    async fn beyond_the_cap_the_oldest_records_go_first_across_shards() {
        let mut map = ExpiringMap::<u64, Vec<u8>, 4, 1_000>::default();
        let now = Instant::now();
        for (key, size) in [(100, 600), (101, 500), (102, 600)] {
            map.upsert(key, now, TTL, Vec::new, |v| v.resize(size, 0));
        }
        // 1,100 was over the cap when the third record came: the first went.
        assert_eq!((map.len(), map.weight()), (2, 1_100));
        // Still over it at the next call: 101 goes too, and 102 keeps its value.
        let len = map.upsert(102, now, TTL, Vec::new, |v| v.len());
        assert_eq!((len, map.len(), map.weight()), (600, 1, 600));
        // Under the cap a record heavier than a shard's share of it stays.
        for key in 1_000..1_300 {
            map.upsert(key, now, TTL, Vec::new, |v| v.push(0));
        }
        let len = map.upsert(102, now, TTL, Vec::new, |v| v.len());
        assert_eq!((len, map.len(), map.weight()), (600, 301, 900));
    }

    #[test]
    fn a_chunked_queue_is_first_in_first_out_across_chunks() {
        let mut queue = ChunkedQueue::default();
        for i in 0..2 * CHUNK + 3 {
            queue.push_back(i);
        }
        let sizes: Vec<usize> = queue.chunks.iter().map(VecDeque::len).collect();
        assert_eq!(sizes, vec![CHUNK, CHUNK, 3]);
        for i in 0..CHUNK + 1 {
            assert_eq!(queue.pop_front(), Some(i));
        }
        assert_eq!(queue.chunks.len(), 2);
        queue.push_back(7);
        let rest: Vec<usize> = std::iter::from_fn(|| queue.pop_front()).collect();
        let expected: Vec<usize> = (CHUNK + 1..2 * CHUNK + 3).chain([7]).collect();
        assert_eq!(rest, expected);
        assert!(queue.front().is_none() && queue.chunks.is_empty());
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
