//! Message ids: 64-bit, unique across routers and roughly time-ordered. Layout (snowflake):
//! 41 bits of milliseconds since 2025-01-01, 10 bits of node id, 12 bits of sequence.

use std::sync::Mutex;

const EPOCH_MS: u64 = 1_735_689_600_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;

/// Generates message ids for one router.
#[derive(Debug)]
pub struct IdGenerator {
    node: u64,
    last: Mutex<(u64, u64)>,
}

impl IdGenerator {
    /// A generator for node `node` (only the low 10 bits are used).
    pub fn new(node: u64) -> Self {
        Self {
            node: node & ((1 << NODE_BITS) - 1),
            last: Mutex::new((0, 0)),
        }
    }

    /// The next id, given the current time in milliseconds since the Unix epoch. Within one
    /// millisecond up to 4096 ids are issued; beyond that the clock is borrowed from the
    /// future, so ids stay unique and increasing even if the wall clock steps back.
    pub fn next(&self, now_ms: u64) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms.saturating_sub(EPOCH_MS);
        let (ms, seq) = if now > last.0 {
            (now, 0)
        } else if last.1 + 1 < (1 << SEQ_BITS) {
            (last.0, last.1 + 1)
        } else {
            (last.0 + 1, 0)
        };
        *last = (ms, seq);
        (ms << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | seq
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_even_when_the_clock_stalls_or_steps_back() {
        let ids = IdGenerator::new(3);
        let mut prev = 0;
        for i in 0..10_000u64 {
            let now = EPOCH_MS + 1_000 - (i % 7); // stalls and steps back
            let id = ids.next(now);
            assert!(id > prev);
            prev = id;
        }
    }

    #[test]
    fn nodes_never_collide() {
        let a = IdGenerator::new(1);
        let b = IdGenerator::new(2);
        assert_ne!(a.next(EPOCH_MS + 5), b.next(EPOCH_MS + 5));
    }
}
