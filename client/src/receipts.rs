//! What the console keeps for read receipts, free of I/O: the private messages it showed and
//! has not yet said it read (the latest per sender: one receipt covers those before it), and
//! the latest it sent to each user, to show which of them a receipt reaches.

use std::collections::{HashMap, VecDeque};

/// Private messages read and not yet told: the latest per sender.
#[derive(Debug, Default)]
pub struct Unreported {
    latest: HashMap<u64, u64>,
}

impl Unreported {
    /// The message `msg_id` from `sender` was read.
    pub fn read(&mut self, sender: u64, msg_id: u64) {
        let latest = self.latest.entry(sender).or_default();
        *latest = (*latest).max(msg_id);
    }

    /// The receipts to give, `(sender, latest msg id)` by sender; none are kept after.
    pub fn take(&mut self) -> Vec<(u64, u64)> {
        let mut receipts: Vec<(u64, u64)> = self.latest.drain().collect();
        receipts.sort_unstable();
        receipts
    }
}

/// Private messages sent and not yet read, per recipient: the latest [`SentLog::PER_USER`]
/// to each of the latest [`SentLog::USERS`] recipients, with the start of their text.
#[derive(Debug, Default)]
pub struct SentLog {
    /// Recipient -> (msg id, text's start), oldest first.
    by_user: HashMap<u64, VecDeque<(u64, String)>>,
    /// Recipients, the one sent to longest ago first.
    order: VecDeque<u64>,
}

impl SentLog {
    /// Messages remembered per recipient.
    pub const PER_USER: usize = 50;
    /// Recipients remembered.
    pub const USERS: usize = 1_000;
    /// Characters of a message's text remembered.
    pub const EXCERPT_CHARS: usize = 40;

    /// `body` went to `to` as message `msg_id`.
    pub fn sent(&mut self, to: u64, msg_id: u64, body: &str) {
        let mut excerpt: String = body.chars().take(Self::EXCERPT_CHARS).collect();
        if excerpt.len() < body.len() {
            excerpt.push_str("...");
        }
        if let Some(at) = self.order.iter().position(|u| *u == to) {
            self.order.remove(at);
        } else if self.order.len() >= Self::USERS
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_user.remove(&oldest);
        }
        self.order.push_back(to);
        let sent = self.by_user.entry(to).or_default();
        if sent.len() >= Self::PER_USER {
            sent.pop_front();
        }
        sent.push_back((msg_id, excerpt));
    }

    /// `reader` read our messages up to `up_to_msg_id`, which covers those with ids up to
    /// it: the text's start of the one of them sent last, which this log then forgets with the
    /// rest it covers. `None` when it holds none (sent before this console started, or told
    /// read already). Ids are only roughly in the order of sending (routers' clocks differ),
    /// so every message is looked at, not only those before the first one not covered.
    pub fn read(&mut self, reader: u64, up_to_msg_id: u64) -> Option<String> {
        let sent = self.by_user.get_mut(&reader)?;
        let mut latest = None;
        sent.retain_mut(|(id, text)| {
            let covered = *id <= up_to_msg_id;
            if covered {
                latest = Some(std::mem::take(text));
            }
            !covered
        });
        if sent.is_empty() {
            self.by_user.remove(&reader);
            self.order.retain(|u| *u != reader);
        }
        latest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_receipt_per_sender_for_the_latest_message_read() {
        let mut unreported = Unreported::default();
        unreported.read(7, 100);
        unreported.read(7, 90);
        unreported.read(3, 50);
        unreported.read(7, 120);
        assert_eq!(unreported.take(), [(3, 50), (7, 120)]);
        assert_eq!(unreported.take(), []);
    }

    #[test]
    fn a_receipt_names_the_latest_message_it_covers_once() {
        let mut log = SentLog::default();
        log.sent(2, 10, "first");
        log.sent(2, 20, "second");
        log.sent(2, 30, "third");
        log.sent(5, 25, "to someone else");
        assert_eq!(log.read(2, 5), None);
        assert_eq!(log.read(2, 25).as_deref(), Some("second"));
        // Told already: a receipt that covers no more names nothing.
        assert_eq!(log.read(2, 25), None);
        assert_eq!(log.read(2, 1_000).as_deref(), Some("third"));
        assert_eq!(log.read(2, 1_000), None);
        assert_eq!(log.read(9, 1_000), None);
        assert_eq!(log.read(5, 25).as_deref(), Some("to someone else"));
        assert!(log.by_user.is_empty() && log.order.is_empty());
    }

    #[test]
    fn an_id_out_of_order_is_covered_all_the_same() {
        let mut log = SentLog::default();
        log.sent(2, 10, "first");
        // Issued by a router whose clock is behind the first one's.
        log.sent(2, 8, "second");
        log.sent(2, 30, "third");
        assert_eq!(log.read(2, 10).as_deref(), Some("second"));
        assert_eq!(log.read(2, 30).as_deref(), Some("third"));
    }

    #[test]
    fn the_log_is_capped_and_keeps_only_a_texts_start() {
        let mut log = SentLog::default();
        let long = "x".repeat(SentLog::EXCERPT_CHARS + 1);
        for id in 1..=(SentLog::PER_USER as u64 + 1) {
            log.sent(1, id, &long);
        }
        assert_eq!(log.by_user[&1].len(), SentLog::PER_USER);
        assert_eq!(log.by_user[&1][0].0, 2);
        assert!(log.by_user[&1][0].1.ends_with("x..."));
        for user in 2..=(SentLog::USERS as u64 + 1) {
            log.sent(user, 1, "hi");
        }
        // User 1 was sent to longest ago: forgotten.
        assert_eq!(log.order.len(), SentLog::USERS);
        assert_eq!(log.read(1, u64::MAX), None);
        assert_eq!(log.read(2, 1).as_deref(), Some("hi"));
    }
}
