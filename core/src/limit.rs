//! Rate limits, as plain data structures that take the current time as an argument (no
//! clocks inside), so they are tested with constructed instants.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use cim_proto::v1::{ChatMessage, GroupRequest, chat_message, group_request};

/// What a broadcast to everyone online costs against the sender's message rate (on a server)
/// or request rate (over HTTP): it is stored in every online user's inbox and pushed to every
/// server, so at a server's default 200 a second a session broadcasts at most 4 a second
/// (burst 8).
pub const BROADCAST_COST: u32 = 50;

/// What `message` costs against its sender's rate: one send, or [`BROADCAST_COST`] for a
/// broadcast (to the group `all`).
pub fn send_cost(message: &ChatMessage) -> u32 {
    match &message.target {
        Some(chat_message::Target::Group(g)) if g == cim_proto::BROADCAST_GROUP => BROADCAST_COST,
        _ => 1,
    }
}

/// What joining or leaving a group (or an owner's invitation, removal or handover) costs
/// against the requester's rate (on a server or over HTTP): the change is told to up to 100
/// other members, so at a server's default 200 a second a session changes its groups at
/// most 20 times a second.
pub const MEMBERSHIP_CHANGE_COST: u32 = 10;

/// What a group request costs: [`MEMBERSHIP_CHANGE_COST`] for a change of members (a join,
/// a leave, an owner's invitation, removal or handover), else one.
pub fn group_request_cost(request: &GroupRequest) -> u32 {
    match group_request::Op::try_from(request.op) {
        Ok(
            group_request::Op::Join
            | group_request::Op::Leave
            | group_request::Op::Invite
            | group_request::Op::Remove
            | group_request::Op::Transfer,
        ) => MEMBERSHIP_CHANGE_COST,
        _ => 1,
    }
}

/// A token bucket: bursts up to `capacity`, sustained `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, per_second: u32, now: Instant) -> Self {
        Self {
            capacity: f64::from(capacity.max(1)),
            per_second: f64::from(per_second),
            tokens: f64::from(capacity.max(1)),
            last: now,
        }
    }

    /// Takes one token if available.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.try_take_n(1, now)
    }

    /// Takes `n` tokens if that many are available (a costlier request); at most the whole
    /// capacity is asked for.
    pub fn try_take_n(&mut self, n: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        let n = f64::from(n).min(self.capacity);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// The address a client is counted under by per-address limits (router and server alike): an
/// IPv6 client counts under its /64 (one host commonly holds a whole /64 and could rotate
/// through it), an IPv4-mapped one under its IPv4 address.
pub fn address_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// Counts events per key in fixed windows (e.g. failed logins per user per minute). Memory is
/// bounded: when more than `max_keys` keys are tracked, expired windows are dropped, and if
/// that is not enough the half with the fewest events goes (the oldest first among equal
/// counts): a flood of new keys, one event each, cannot push out a key near its limit (a
/// user a password guesser has nearly locked) to reset its count.
#[derive(Debug)]
pub struct WindowCounter<K> {
    window: Duration,
    max_keys: usize,
    counts: HashMap<K, (u32, Instant)>,
}

impl<K: Hash + Eq + Clone> WindowCounter<K> {
    /// Counts in windows of `window`, tracking at most about `max_keys` keys.
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            counts: HashMap::new(),
        }
    }

    /// Events counted for `key` in its current window.
    pub fn count(&self, key: &K, now: Instant) -> u32 {
        match self.counts.get(key) {
            Some((n, start)) if now.saturating_duration_since(*start) < self.window => *n,
            _ => 0,
        }
    }

    /// Counts one event for `key`; returns the count including it.
    pub fn hit(&mut self, key: K, now: Instant) -> u32 {
        self.hit_n(key, 1, now)
    }

    /// Counts `n` events for `key` (one costing that many); returns the count including them.
    pub fn hit_n(&mut self, key: K, n: u32, now: Instant) -> u32 {
        if self.counts.len() >= self.max_keys && !self.counts.contains_key(&key) {
            self.prune(now);
        }
        let window = self.window;
        let slot = self.counts.entry(key).or_insert((0, now));
        if now.saturating_duration_since(slot.1) >= window {
            *slot = (0, now);
        }
        slot.0 = slot.0.saturating_add(n);
        slot.0
    }

    /// Takes back one event counted for `key` in its current window (one that turned out not
    /// to count, e.g. refused as busy and to be retried).
    pub fn forgive(&mut self, key: &K) {
        if let Some((n, _)) = self.counts.get_mut(key) {
            *n = n.saturating_sub(1);
        }
    }

    /// Forgets `key` (e.g. after a successful login).
    pub fn reset(&mut self, key: &K) {
        self.counts.remove(key);
    }

    fn prune(&mut self, now: Instant) {
        let window = self.window;
        self.counts
            .retain(|_, (_, start)| now.saturating_duration_since(*start) < window);
        if self.counts.len() >= self.max_keys {
            let mut weights: Vec<(u32, Instant)> = self.counts.values().copied().collect();
            weights.sort_unstable();
            let cutoff = weights[weights.len() / 2];
            self.counts.retain(|_, weight| *weight > cutoff);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_counts_under_its_64_and_a_mapped_one_as_ipv4() {
        let key = |s: &str| address_key(s.parse().unwrap()).to_string();
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:198.51.100.4"), "198.51.100.4");
    }

    #[test]
    fn joins_and_leaves_cost_more_than_other_group_requests() {
        let cost = |op: group_request::Op| {
            group_request_cost(&GroupRequest {
                op: op as i32,
                name: "team".into(),
                ..Default::default()
            })
        };
        for op in [
            group_request::Op::Join,
            group_request::Op::Leave,
            group_request::Op::Invite,
            group_request::Op::Remove,
            group_request::Op::Transfer,
        ] {
            assert_eq!(cost(op), MEMBERSHIP_CHANGE_COST, "{op:?}");
        }
        for op in [
            group_request::Op::Create,
            group_request::Op::Members,
            group_request::Op::Mine,
        ] {
            assert_eq!(cost(op), 1, "{op:?}");
        }
        // An op this version does not know costs one (the router answers it as MINE).
        let unknown = GroupRequest {
            op: 99,
            ..Default::default()
        };
        assert_eq!(group_request_cost(&unknown), 1);
    }

    #[test]
    fn a_forgiven_event_no_longer_counts() {
        let t0 = Instant::now();
        let mut c = WindowCounter::new(Duration::from_secs(60), 10);
        c.hit("a", t0);
        c.hit("a", t0);
        c.forgive(&"a");
        assert_eq!(c.count(&"a", t0), 1);
        c.forgive(&"a");
        c.forgive(&"a");
        assert_eq!(c.count(&"a", t0), 0);
        c.forgive(&"unknown");
        assert_eq!(c.count(&"unknown", t0), 0);
    }

    #[test]
    fn bucket_allows_bursts_then_the_sustained_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 2, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(500)));
        assert!(!b.try_take(t0 + Duration::from_millis(500)));
        // Refills never exceed the capacity.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
    }

    #[test]
    fn windows_count_and_expire() {
        let t0 = Instant::now();
        let mut c = WindowCounter::new(Duration::from_secs(60), 100);
        assert_eq!(c.hit("alice", t0), 1);
        assert_eq!(c.hit("alice", t0 + Duration::from_secs(10)), 2);
        assert_eq!(c.count(&"alice", t0 + Duration::from_secs(59)), 2);
        assert_eq!(c.count(&"alice", t0 + Duration::from_secs(61)), 0);
        assert_eq!(c.hit("alice", t0 + Duration::from_secs(61)), 1);
        c.reset(&"alice");
        assert_eq!(c.count(&"alice", t0 + Duration::from_secs(61)), 0);
    }

    #[test]
    fn a_flood_of_new_keys_does_not_reset_a_busy_one() {
        let t0 = Instant::now();
        let mut c = WindowCounter::new(Duration::from_secs(60), 100);
        let target = "target".to_string();
        for _ in 0..4 {
            c.hit(target.clone(), t0);
        }
        for i in 0..10_000u32 {
            c.hit(i.to_string(), t0 + Duration::from_millis(1));
        }
        assert_eq!(c.count(&target, t0 + Duration::from_secs(1)), 4);
        assert!(c.counts.len() <= 101, "{}", c.counts.len());
    }

    #[test]
    fn memory_stays_bounded() {
        let t0 = Instant::now();
        let mut c = WindowCounter::new(Duration::from_secs(60), 10);
        for i in 0..1000u32 {
            c.hit(i, t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(c.counts.len() <= 11, "{}", c.counts.len());
    }
}
