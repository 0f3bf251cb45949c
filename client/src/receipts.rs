//! What the console keeps of the messages it sends and shows, free of I/O: for read receipts,
//! the private messages it showed and has not yet said it read (the latest per sender: one
//! receipt covers those before it), and the latest it sent to each user, to show which of
//! them a receipt reaches; for unsends, the latest it sent to users and groups (what
//! `:unsend` takes back) and the latest it showed (what an unsend it gets names).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use cim_proto::v1::chat_message::Target;

/// Private messages read and not yet told: the latest per sender, for at most
/// [`Unreported::SENDERS`] senders.
#[derive(Debug, Default)]
pub struct Unreported {
    latest: HashMap<u64, u64>,
}

impl Unreported {
    /// Senders kept: while the router is away, receipts for further senders are not kept
    /// (receipts are best effort; the router keeps at most 1,000 readers per sender too).
    pub const SENDERS: usize = 1_000;

    /// The message `msg_id` from `sender` was read.
    pub fn read(&mut self, sender: u64, msg_id: u64) {
        if self.latest.len() >= Self::SENDERS && !self.latest.contains_key(&sender) {
            return;
        }
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

/// Messages sent: the private ones not yet read, per recipient (the latest
/// [`SentLog::PER_USER`] to each of the latest [`SentLog::USERS`] recipients), and the latest
/// [`SentLog::UNSENDABLE`] to anyone or any group, read or not, with the start of their text.
#[derive(Debug, Default)]
pub struct SentLog {
    /// Recipient -> (msg id, text's start), oldest first.
    by_user: HashMap<u64, VecDeque<(u64, String)>>,
    /// Recipients, the one sent to longest ago first.
    order: VecDeque<u64>,
    /// The latest sent, oldest first.
    latest: VecDeque<SentMessage>,
}

/// A message the console sent to a user or a group.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    /// Its recipient.
    pub to: Target,
    /// How the console named the recipient.
    pub to_shown: String,
    /// Its id.
    pub msg_id: u64,
    /// The start of its text.
    pub excerpt: String,
}

/// The start of `body` that the logs keep: [`SentLog::EXCERPT_CHARS`] characters, then `...`
/// if there was more.
fn excerpt(body: &str) -> String {
    let mut excerpt: String = body.chars().take(SentLog::EXCERPT_CHARS).collect();
    if excerpt.len() < body.len() {
        excerpt.push_str("...");
    }
    excerpt
}

impl SentLog {
    /// Messages remembered per recipient.
    pub const PER_USER: usize = 50;
    /// Recipients remembered.
    pub const USERS: usize = 1_000;
    /// Characters of a message's text remembered.
    pub const EXCERPT_CHARS: usize = 40;
    /// The latest messages to anyone remembered for unsending.
    pub const UNSENDABLE: usize = 50;

    /// `body` went to `to` (shown as `to_shown`) as message `msg_id`.
    pub fn sent(&mut self, to: u64, to_shown: &str, msg_id: u64, body: &str) {
        let excerpt = excerpt(body);
        self.remember(Target::ToUser(to), to_shown, msg_id, excerpt.clone());
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

    /// `body` went to `group` as message `msg_id`.
    pub fn sent_in_group(&mut self, group: &str, msg_id: u64, body: &str) {
        let target = Target::Group(group.to_string());
        self.remember(target, &format!("#{group}"), msg_id, excerpt(body));
    }

    fn remember(&mut self, to: Target, to_shown: &str, msg_id: u64, excerpt: String) {
        if self.latest.len() >= Self::UNSENDABLE {
            self.latest.pop_front();
        }
        self.latest.push_back(SentMessage {
            to,
            to_shown: to_shown.to_string(),
            msg_id,
            excerpt,
        });
    }

    /// The latest message sent (to `to`, if given) that is remembered and not unsent.
    pub fn latest(&self, to: Option<&Target>) -> Option<&SentMessage> {
        self.latest
            .iter()
            .rev()
            .find(|m| to.is_none_or(|to| m.to == *to))
    }

    /// Message `msg_id` to `to` was unsent (or its unsend refused for good): forgotten, so
    /// that neither `:unsend` nor a receipt names it again.
    pub fn unsent(&mut self, to: &Target, msg_id: u64) {
        self.latest.retain(|m| (&m.to, m.msg_id) != (to, msg_id));
        if let Target::ToUser(user) = to
            && let Some(sent) = self.by_user.get_mut(user)
        {
            sent.retain(|(id, _)| *id != msg_id);
        }
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

/// Messages the console showed that may be unsent (private and group ones; the latest
/// [`Shown::KEPT`]), and the unsends it told, so that an unsend says which message it takes
/// back, once.
#[derive(Debug, Default)]
pub struct Shown {
    /// Msg id -> (sender, group (none for a private message), text's start).
    texts: HashMap<u64, (u64, Option<String>, String)>,
    /// The ids in `texts`, the one shown longest ago first.
    order: VecDeque<u64>,
    /// Unsends told, as (sender, group, msg id), the oldest first.
    told: VecDeque<(u64, Option<String>, u64)>,
}

/// What an unsend takes back, as far as the console knows.
#[derive(Debug, PartialEq, Eq)]
pub enum Unsent {
    /// A message it showed, the start of whose text this is.
    Shown(String),
    /// A message it did not show (or no longer remembers).
    NotShown,
    /// A message whose unsend it told already.
    Told,
}

impl Shown {
    /// Messages (and unsends) remembered.
    pub const KEPT: usize = 1_000;

    /// Message `msg_id` from `sender` (in `group`, if any) was shown.
    pub fn shown(&mut self, sender: u64, group: Option<&str>, msg_id: u64, body: &str) {
        if self.order.len() >= Self::KEPT
            && let Some(oldest) = self.order.pop_front()
        {
            self.texts.remove(&oldest);
        }
        let shown = (sender, group.map(str::to_string), excerpt(body));
        if self.texts.insert(msg_id, shown).is_none() {
            self.order.push_back(msg_id);
        }
    }

    /// `sender` unsent its message `msg_id` (in `group`, if any). A message of that id from
    /// anyone else, or elsewhere, is no message of `sender`'s there to take back: it is kept,
    /// and the unsend reads as one of a message not shown.
    pub fn unsent(&mut self, sender: u64, group: Option<&str>, msg_id: u64) -> Unsent {
        let told = (sender, group.map(str::to_string), msg_id);
        if self.told.contains(&told) {
            return Unsent::Told;
        }
        if self.told.len() >= Self::KEPT {
            self.told.pop_front();
        }
        self.told.push_back(told);
        match self.texts.entry(msg_id) {
            Entry::Occupied(shown)
                if shown.get().0 == sender && shown.get().1.as_deref() == group =>
            {
                self.order.retain(|id| *id != msg_id);
                Unsent::Shown(shown.remove().2)
            }
            _ => Unsent::NotShown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_wait_for_a_bounded_number_of_senders() {
        let mut unreported = Unreported::default();
        for sender in 0..Unreported::SENDERS as u64 + 10 {
            unreported.read(sender, 1);
        }
        unreported.read(0, 2);
        let receipts = unreported.take();
        assert_eq!(receipts.len(), Unreported::SENDERS);
        assert_eq!(receipts[0], (0, 2), "a sender kept still moves forward");
    }

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
        log.sent(2, "u", 10, "first");
        log.sent(2, "u", 20, "second");
        log.sent(2, "u", 30, "third");
        log.sent(5, "u", 25, "to someone else");
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
        log.sent(2, "u", 10, "first");
        // Issued by a router whose clock is behind the first one's.
        log.sent(2, "u", 8, "second");
        log.sent(2, "u", 30, "third");
        assert_eq!(log.read(2, 10).as_deref(), Some("second"));
        assert_eq!(log.read(2, 30).as_deref(), Some("third"));
    }

    #[test]
    fn the_log_is_capped_and_keeps_only_a_texts_start() {
        let mut log = SentLog::default();
        let long = "x".repeat(SentLog::EXCERPT_CHARS + 1);
        for id in 1..=(SentLog::PER_USER as u64 + 1) {
            log.sent(1, "u", id, &long);
        }
        assert_eq!(log.by_user[&1].len(), SentLog::PER_USER);
        assert_eq!(log.by_user[&1][0].0, 2);
        assert!(log.by_user[&1][0].1.ends_with("x..."));
        for user in 2..=(SentLog::USERS as u64 + 1) {
            log.sent(user, "u", 1, "hi");
        }
        // User 1 was sent to longest ago: forgotten.
        assert_eq!(log.order.len(), SentLog::USERS);
        assert_eq!(log.read(1, u64::MAX), None);
        assert_eq!(log.read(2, 1).as_deref(), Some("hi"));
    }

    #[test]
    fn unsend_takes_the_latest_message_sent_and_forgets_it() {
        let mut log = SentLog::default();
        log.sent(2, "bob (2)", 10, "to bob");
        log.sent(3, "carol (3)", 20, "to carol");
        log.sent(2, "bob (2)", 30, "to bob again");
        log.sent_in_group("team", 40, "to the team");
        let (bob, carol) = (Target::ToUser(2), Target::ToUser(3));
        let team = Target::Group("team".into());
        assert_eq!(log.latest(None).map(|m| m.msg_id), Some(40));
        assert_eq!(
            log.latest(Some(&team)).map(|m| m.to_shown.as_str()),
            Some("#team")
        );
        log.unsent(&team, 40);
        assert_eq!(log.latest(None).map(|m| m.msg_id), Some(30));
        assert_eq!(log.latest(Some(&carol)).map(|m| m.msg_id), Some(20));
        assert_eq!(log.latest(Some(&Target::ToUser(9))), None);
        log.unsent(&bob, 30);
        let latest = log.latest(Some(&bob)).cloned();
        assert_eq!(
            latest,
            Some(SentMessage {
                to: bob,
                to_shown: "bob (2)".into(),
                msg_id: 10,
                excerpt: "to bob".into()
            })
        );
        // A receipt no longer names the unsent message.
        assert_eq!(log.read(2, 30).as_deref(), Some("to bob"));
        for id in 100..100 + SentLog::UNSENDABLE as u64 {
            log.sent(4, "dan (4)", id, "x");
        }
        assert_eq!(log.latest(Some(&carol)), None, "pushed out by later ones");
    }

    #[test]
    fn an_unsend_names_the_message_shown_once() {
        let mut shown = Shown::default();
        shown.shown(2, None, 10, "hello there");
        shown.shown(3, None, 11, "from carol");
        shown.shown(2, Some("team"), 13, "to the team");
        assert_eq!(
            shown.unsent(2, None, 10),
            Unsent::Shown("hello there".into())
        );
        // Its second copy, and an unsend of a message not shown here.
        assert_eq!(shown.unsent(2, None, 10), Unsent::Told);
        assert_eq!(shown.unsent(2, None, 12), Unsent::NotShown);
        assert_eq!(shown.unsent(2, None, 12), Unsent::Told);
        // Not bob's message: carol's stays.
        assert_eq!(shown.unsent(2, None, 11), Unsent::NotShown);
        assert_eq!(
            shown.unsent(3, None, 11),
            Unsent::Shown("from carol".into())
        );
        // Not said where it was: the team's message stays.
        assert_eq!(shown.unsent(2, Some("club"), 13), Unsent::NotShown);
        let in_team = shown.unsent(2, Some("team"), 13);
        assert_eq!(in_team, Unsent::Shown("to the team".into()));
        for id in 100..100 + Shown::KEPT as u64 + 1 {
            shown.shown(5, None, id, "x");
        }
        assert_eq!(shown.texts.len(), Shown::KEPT);
        let oldest = shown.unsent(5, None, 100);
        assert_eq!(oldest, Unsent::NotShown, "the oldest is forgotten");
        assert_eq!(shown.unsent(5, None, 101), Unsent::Shown("x".into()));
    }
}
