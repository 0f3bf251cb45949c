//! Route selection: which server a logging-in user is assigned to. Pure logic over a list of
//! candidate servers, so every strategy is tested with plain values.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use cim_core::discovery::ServerInfo;
use cim_core::fnv::fnv1a;

/// Virtual nodes per server on the consistent-hash ring.
const VNODES: u32 = 160;

/// How a server is picked for a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Each login takes the next server in id order.
    #[default]
    RoundRobin,
    /// A uniformly random server.
    Random,
    /// A hash ring over server ids: a user keeps its server while the set is stable, and
    /// removing one of N servers moves only about 1/N of users.
    ConsistentHash,
    /// The server reporting the fewest connections.
    LeastLoaded,
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Self::RoundRobin),
            "random" => Ok(Self::Random),
            "consistent-hash" => Ok(Self::ConsistentHash),
            "least-loaded" => Ok(Self::LeastLoaded),
            other => Err(format!(
                "unknown route strategy {other:?} (expected round-robin, random, consistent-hash or least-loaded)"
            )),
        }
    }
}

/// Picks servers according to a strategy.
#[derive(Debug, Default)]
pub struct Selector {
    strategy: Strategy,
    counter: AtomicUsize,
}

impl Selector {
    /// A selector using `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            counter: AtomicUsize::new(0),
        }
    }

    /// Picks a server for `user_id` among `candidates` (all of which are usable). `random` is a
    /// caller-supplied random number, used by [`Strategy::Random`].
    pub fn pick<'a>(
        &self,
        candidates: &'a [ServerInfo],
        user_id: u64,
        random: u64,
    ) -> Option<&'a ServerInfo> {
        if candidates.is_empty() {
            return None;
        }
        match self.strategy {
            Strategy::RoundRobin => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                candidates.get(n % candidates.len())
            }
            Strategy::Random => candidates.get((random % candidates.len() as u64) as usize),
            Strategy::ConsistentHash => consistent_hash(candidates, user_id),
            Strategy::LeastLoaded => candidates.iter().min_by_key(|s| (s.load, s.id.as_str())),
        }
    }
}

/// The server owning `user_id` on a ring of `VNODES` points per server.
fn consistent_hash(servers: &[ServerInfo], user_id: u64) -> Option<&ServerInfo> {
    let key = mix(user_id);
    // The owner is the server with the first point clockwise from the key.
    let mut best: Option<(u64, &ServerInfo)> = None;
    let mut lowest: Option<(u64, &ServerInfo)> = None;
    for server in servers {
        let base = fnv1a(server.id.as_bytes());
        for v in 0..VNODES {
            let point = mix(base ^ u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if point >= key && best.is_none_or(|(p, _)| point < p) {
                best = Some((point, server));
            }
            if lowest.is_none_or(|(p, _)| point < p) {
                lowest = Some((point, server));
            }
        }
    }
    best.or(lowest).map(|(_, s)| s)
}

/// splitmix64 finaliser: spreads nearby inputs over the whole ring.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn servers(n: usize) -> Vec<ServerInfo> {
        (0..n)
            .map(|i| ServerInfo {
                id: format!("s{i}"),
                client_addr: "127.0.0.1:1".parse().unwrap(),
                internal_addr: "127.0.0.1:2".parse().unwrap(),
                load: (10 - i) as u32,
                incarnation: 0,
            })
            .collect()
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let list = servers(3);
        let sel = Selector::new(Strategy::RoundRobin);
        let mut counts = [0; 3];
        for u in 0..30 {
            let s = sel.pick(&list, u, 0).unwrap();
            counts[list.iter().position(|x| x.id == s.id).unwrap()] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }

    #[test]
    fn least_loaded_picks_the_emptiest() {
        let list = servers(3);
        assert_eq!(
            Selector::new(Strategy::LeastLoaded)
                .pick(&list, 1, 0)
                .unwrap()
                .id,
            "s2"
        );
    }

    #[test]
    fn random_uses_the_supplied_number() {
        let list = servers(3);
        assert_eq!(
            Selector::new(Strategy::Random)
                .pick(&list, 1, 4)
                .unwrap()
                .id,
            "s1"
        );
        assert!(Selector::new(Strategy::Random).pick(&[], 1, 4).is_none());
    }

    #[test]
    fn consistent_hash_moves_about_one_nth_when_a_server_leaves() {
        let list = servers(5);
        let sel = Selector::new(Strategy::ConsistentHash);
        let users = 10_000u64;
        let before: Vec<String> = (0..users)
            .map(|u| sel.pick(&list, u, 0).unwrap().id.clone())
            .collect();
        let removed = "s2";
        let rest: Vec<ServerInfo> = list.iter().filter(|s| s.id != removed).cloned().collect();
        let mut moved = 0;
        for u in 0..users {
            let after = &sel.pick(&rest, u, 0).unwrap().id;
            if before[u as usize] != removed {
                assert_eq!(
                    after, &before[u as usize],
                    "user {u} moved although its server stayed"
                );
            } else {
                moved += 1;
            }
        }
        // Only the removed server's users move: about 1/5 of them, within a generous band.
        let share = moved as f64 / users as f64;
        assert!((0.12..0.28).contains(&share), "moved share {share}");
    }
}
