//! What the application was last told of each user's presence, so that what it knows already
//! is not told again: a takeover confirms online a user who was online, and its router
//! announces that as it does any login.

use std::collections::HashMap;

/// Users remembered at most; past it the memory starts over (an event may then repeat).
const MAX_KNOWN: usize = 10_000;

/// The presence last told to the application, per user.
#[derive(Debug, Default)]
pub(crate) struct KnownPresence {
    online: HashMap<u64, bool>,
}

impl KnownPresence {
    /// Whether `online` is news about `user` to the application.
    pub(crate) fn is_news(&self, user: u64, online: bool) -> bool {
        self.online.get(&user) != Some(&online)
    }

    /// Records that the application was told `online` about `user`.
    pub(crate) fn told(&mut self, user: u64, online: bool) {
        if self.online.len() >= MAX_KNOWN && !self.online.contains_key(&user) {
            self.online.clear();
        }
        self.online.insert(user, online);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_is_news() {
        let mut known = KnownPresence::default();
        assert!(known.is_news(7, true), "the first word of a user is news");
        known.told(7, true);
        assert!(!known.is_news(7, true), "online again, as after a takeover");
        assert!(known.is_news(7, false));
        known.told(7, false);
        assert!(known.is_news(7, true));
        assert!(known.is_news(8, false), "another user");
    }

    #[test]
    fn memory_starts_over_past_its_cap() {
        let mut known = KnownPresence::default();
        for user in 0..MAX_KNOWN as u64 {
            known.told(user, true);
        }
        assert_eq!(known.online.len(), MAX_KNOWN);
        known.told(0, false);
        assert_eq!(
            known.online.len(),
            MAX_KNOWN,
            "a known user takes no new place"
        );
        known.told(u64::MAX, true);
        assert_eq!(known.online.len(), 1);
        assert!(known.is_news(1, true), "forgotten");
    }
}
