//! The store of TLS 1.3 resumption secrets that lets clients reconnect with 0-RTT. rustls's own
//! `ServerSessionMemoryCache` allocates its table for its whole capacity up front (6 MB for
//! 65,536 sessions) and every new session writes a random slot of it, so the table's pages
//! became resident about one per handshake: 1.3 KB of server memory per connection at 10,000
//! connections. This store grows with what it holds and forgets the oldest sessions first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Session secrets by ticket id, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct ResumptionStore {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    secrets: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys in the order they were stored; may still name secrets already taken.
    order: VecDeque<Vec<u8>>,
}

impl ResumptionStore {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl rustls::server::StoresServerSessions for ResumptionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut inner = self.inner();
        if let Some(old) = inner.secrets.get_mut(&key) {
            *old = value;
            return true;
        }
        while inner.order.len() >= self.capacity {
            if let Some(oldest) = inner.order.pop_front() {
                inner.secrets.remove(&oldest);
            }
        }
        inner.order.push_back(key.clone());
        inner.secrets.insert(key, value);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner().secrets.get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        // A taken secret must be gone for good: a ticket is good for one resumption.
        self.inner().secrets.remove(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::ResumptionStore;
    use rustls::server::StoresServerSessions;

    fn key(i: u8) -> Vec<u8> {
        vec![i; 32]
    }

    #[test]
    fn secrets_are_taken_once_and_the_oldest_go_first() {
        let store = ResumptionStore::new(3);
        for i in 0..3 {
            assert!(store.put(key(i), vec![i]));
        }
        assert_eq!(store.get(&key(0)), Some(vec![0]));
        assert_eq!(store.take(&key(1)), Some(vec![1]));
        assert_eq!(store.take(&key(1)), None);
        // Full (a taken key keeps its place until it comes round): the oldest goes.
        assert!(store.put(key(3), vec![3]));
        assert_eq!(store.get(&key(0)), None);
        assert_eq!(store.get(&key(2)), Some(vec![2]));
        // Replacing a stored secret does not evict anything.
        assert!(store.put(key(2), vec![22]));
        assert_eq!(store.get(&key(2)), Some(vec![22]));
        assert_eq!(store.get(&key(3)), Some(vec![3]));
        for i in 4..100 {
            store.put(key(i), vec![i]);
        }
        let inner = store.inner();
        assert!(inner.order.len() <= 3 && inner.secrets.len() <= 3);
        assert!(inner.secrets.keys().all(|k| inner.order.contains(k)));
    }
}
