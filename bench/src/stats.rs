//! Measurement bookkeeping, free of I/O: latency percentiles and a delivery tracker that finds
//! lost and duplicated messages. Tested with plain values, since the harness's numbers are only
//! as good as this.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u64>,
}

/// Percentiles of a latency distribution, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Latencies {
    /// Adds one sample.
    pub fn record(&mut self, micros: u64) {
        self.samples.push(micros);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Nearest-rank percentiles (all zero without samples).
    pub fn percentiles(&self) -> Percentiles {
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let rank = |q: f64| -> u64 {
            if sorted.is_empty() {
                return 0;
            }
            let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[idx]
        };
        Percentiles {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: sorted.last().copied().unwrap_or(0),
        }
    }
}

/// Identifies one bench message: who sent it and its number in that sender's sequence.
pub type MessageKey = (u32, u64);

/// Who a message is for, by client index: what the harness sent it to, not what the cluster
/// says it stored (a cluster that stored a message for fewer users, or the wrong one, must
/// show as lost or misdelivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// One client (a private message).
    One(u32),
    /// Every client of the run but this one, the sender (a message to the group).
    AllBut(u32),
}

impl Audience {
    fn includes(self, client: u32) -> bool {
        match self {
            Audience::One(to) => client == to,
            Audience::AllBut(sender) => client != sender,
        }
    }

    /// How many of `clients` clients should receive it.
    pub fn size(self, clients: u32) -> u64 {
        match self {
            Audience::One(_) => 1,
            Audience::AllBut(_) => u64::from(clients.saturating_sub(1)),
        }
    }
}

/// Tracks which acked messages reached which recipients.
#[derive(Debug)]
pub struct Tracker {
    /// Clients in the run (indexes `0..clients`).
    clients: u32,
    /// Acked messages and who each is for.
    expected: HashMap<MessageKey, Audience>,
    /// (recipient, message) pairs seen.
    seen: HashSet<(u32, MessageKey)>,
    duplicated: u64,
}

/// What the tracker concluded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Messages acked by cim.
    pub sent: u64,
    /// Deliveries expected from the acked messages (their audiences summed).
    pub expected: u64,
    /// Distinct (recipient, message) deliveries seen.
    pub delivered: u64,
    /// Expected deliveries never seen.
    pub lost: u64,
    /// Deliveries seen more than once.
    pub duplicated: u64,
    /// Deliveries of acked messages to a client they were not for.
    pub misdelivered: u64,
}

impl Tracker {
    /// A tracker for a run of `clients` clients.
    pub fn new(clients: u32) -> Self {
        Self {
            clients,
            expected: HashMap::new(),
            seen: HashSet::new(),
            duplicated: 0,
        }
    }

    /// `key` was acked and is for `audience`.
    pub fn acked(&mut self, key: MessageKey, audience: Audience) {
        self.expected.insert(key, audience);
    }

    /// `recipient` received `key`.
    pub fn received(&mut self, recipient: u32, key: MessageKey) {
        if !self.seen.insert((recipient, key)) {
            self.duplicated += 1;
        }
    }

    /// Counts so far. Deliveries of messages whose ack was never seen (a send still in flight
    /// when the run stopped) count as delivered but not as expected.
    pub fn summary(&self) -> Summary {
        let expected: u64 = self.expected.values().map(|a| a.size(self.clients)).sum();
        let mut reached: HashMap<MessageKey, u64> = HashMap::new();
        let mut misdelivered = 0;
        for &(recipient, key) in &self.seen {
            match self.expected.get(&key) {
                Some(audience) if audience.includes(recipient) => {
                    *reached.entry(key).or_default() += 1;
                }
                Some(_) => misdelivered += 1,
                None => {}
            }
        }
        let lost = self
            .expected
            .iter()
            .map(|(key, audience)| {
                let reached = reached.get(key).copied().unwrap_or(0);
                audience.size(self.clients).saturating_sub(reached)
            })
            .sum();
        Summary {
            sent: self.expected.len() as u64,
            expected,
            delivered: self.seen.len() as u64,
            lost,
            duplicated: self.duplicated,
            misdelivered,
        }
    }
}

/// The body of a bench message: sender index, sequence number, send time, padded to `size`.
pub fn encode_body(sender: u32, counter: u64, sent_at_us: u64, size: usize) -> String {
    let mut body = format!("b|{sender}|{counter}|{sent_at_us}|");
    while body.len() < size {
        body.push('x');
    }
    body
}

/// Parses [`encode_body`]'s output: `(sender, counter, sent_at_us)`.
pub fn decode_body(body: &str) -> Option<(u32, u64, u64)> {
    let mut parts = body.strip_prefix("b|")?.split('|');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

/// Width of a `--timeline` window: short enough to show a stall of tens of milliseconds, long
/// enough for a percentile at 10,000 messages a second.
pub const TIMELINE_WINDOW_US: u64 = 100_000;

/// The latencies of the messages sent within one window of time.
#[derive(Debug, Default)]
pub struct Window {
    /// When the window starts, in microseconds since the earliest send among the samples
    /// (the earliest delivered message's).
    pub start_us: u64,
    pub latencies: Latencies,
}

/// Groups (send time, latency) samples into windows of `width_us` (more than 0) by send time,
/// from the earliest send on; windows nobody sent in are left out.
pub fn timeline_windows(mut samples: Vec<(u64, u64)>, width_us: u64) -> Vec<Window> {
    samples.sort_unstable();
    let Some(&(first, _)) = samples.first() else {
        return Vec::new();
    };
    let mut windows: Vec<Window> = Vec::new();
    for (sent, latency) in samples {
        let start_us = (sent - first) / width_us * width_us;
        if windows.last().is_none_or(|w| w.start_us != start_us) {
            windows.push(Window {
                start_us,
                latencies: Latencies::default(),
            });
        }
        if let Some(w) = windows.last_mut() {
            w.latencies.record(latency);
        }
    }
    windows
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn timeline_windows_group_by_send_time_from_the_first_send() {
        // Out of order, as deliveries arrive; nothing sent in the window at 300.
        let samples = vec![(1_250, 7), (1_000, 5), (1_099, 9), (1_100, 40), (1_450, 1)];
        let windows = timeline_windows(samples, 100);
        let summary: Vec<(u64, usize, u64)> = windows
            .iter()
            .map(|w| (w.start_us, w.latencies.len(), w.latencies.percentiles().max))
            .collect();
        assert_eq!(
            summary,
            vec![(0, 2, 9), (100, 1, 40), (200, 1, 7), (400, 1, 1)]
        );
        assert!(timeline_windows(Vec::new(), 100).is_empty());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut l = Latencies::default();
        for v in 1..=1000 {
            l.record(v);
        }
        let p = l.percentiles();
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500, 900, 990, 999, 1000)
        );
        assert_eq!(Latencies::default().percentiles(), Percentiles::default());
    }

    #[test]
    fn tracker_finds_lost_and_duplicated_deliveries() {
        let mut t = Tracker::new(4);
        t.acked((1, 1), Audience::AllBut(1)); // group message to clients 0, 2 and 3
        t.acked((1, 2), Audience::One(2));
        t.acked((2, 1), Audience::One(0));
        t.received(0, (1, 1));
        t.received(2, (1, 1));
        t.received(2, (1, 1)); // duplicate
        t.received(3, (1, 1));
        t.received(2, (1, 2));
        // (2, 1) never arrives; (3, 9) arrives without a recorded ack.
        t.received(0, (3, 9));
        let s = t.summary();
        assert_eq!(
            s,
            Summary {
                sent: 3,
                expected: 5,
                delivered: 5,
                lost: 1,
                duplicated: 1,
                misdelivered: 0,
            }
        );
    }

    #[test]
    fn one_recipient_twice_does_not_hide_another_missing() {
        let mut t = Tracker::new(3);
        t.acked((1, 1), Audience::AllBut(1));
        t.received(0, (1, 1));
        t.received(0, (1, 1));
        let s = t.summary();
        assert_eq!((s.lost, s.duplicated), (1, 1));
    }

    #[test]
    fn a_delivery_to_the_wrong_client_is_misdelivered_and_lost() {
        let mut t = Tracker::new(3);
        t.acked((0, 1), Audience::One(1));
        t.acked((1, 1), Audience::AllBut(1));
        t.received(2, (0, 1)); // for client 1
        t.received(1, (1, 1)); // back to its sender
        t.received(0, (1, 1));
        t.received(2, (1, 1));
        let s = t.summary();
        assert_eq!((s.lost, s.misdelivered, s.duplicated), (1, 2, 0));
    }

    #[test]
    fn bodies_round_trip_and_pad() {
        let body = encode_body(7, 42, 123_456, 64);
        assert_eq!(body.len(), 64);
        assert_eq!(decode_body(&body), Some((7, 42, 123_456)));
        assert_eq!(decode_body("hello"), None);
    }
}
