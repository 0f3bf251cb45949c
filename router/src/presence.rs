//! Presence announcements (a user came online or went offline, told to the users who share a
//! group with it), queued and made by a fixed number of workers. Each announcement reads the
//! user's groups, their members and those members' routes, so a login storm after a server
//! failure must not start one task per login: the queue holds one entry per user (a newer
//! state replaces a queued one, so a user who flaps is announced once, in its latest state),
//! announces each user on one worker at a time (its announcements arrive in order), and
//! drops announcements past [`MAX_PENDING`] users (presence is a hint; the members listing
//! reads routes directly).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::service::Service;

/// Most users with an announcement waiting; past it new ones are dropped.
const MAX_PENDING: usize = 100_000;
/// Announcements made at once.
const WORKERS: usize = 16;

/// Users waiting to be announced, in arrival order.
#[derive(Default)]
struct Pending {
    /// The state to announce for each waiting user.
    latest: HashMap<u64, bool>,
    /// The waiting users, oldest first, each once.
    order: VecDeque<u64>,
    /// Users a worker is announcing now.
    busy: HashSet<u64>,
}

/// The queue of presence announcements.
pub(crate) struct PresenceQueue {
    pending: Mutex<Pending>,
    max_pending: usize,
    ready: Notify,
    dropped: AtomicU64,
}

impl Default for PresenceQueue {
    fn default() -> Self {
        Self::with_capacity(MAX_PENDING)
    }
}

impl PresenceQueue {
    fn with_capacity(max_pending: usize) -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
            max_pending,
            ready: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the announcement that `user` is now `online` (or offline), replacing one
    /// still waiting for that user.
    pub(crate) fn announce(&self, user: u64, online: bool) {
        {
            let mut pending = self.lock();
            if let Some(state) = pending.latest.get_mut(&user) {
                *state = online;
                return;
            }
            if pending.latest.len() >= self.max_pending {
                drop(pending);
                // Logged at the 1st, 2nd, 4th, 8th... drop, not at every one.
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(dropped, "presence queue full; announcements dropped");
                }
                return;
            }
            pending.latest.insert(user, online);
            pending.order.push_back(user);
        }
        self.ready.notify_one();
    }

    /// The oldest waiting announcement whose user no worker is announcing, marked busy.
    fn take(&self) -> Option<(u64, bool)> {
        let mut pending = self.lock();
        let Pending {
            latest,
            order,
            busy,
        } = &mut *pending;
        // At most `WORKERS` users are busy, so this skips at most that many.
        let at = order.iter().position(|user| !busy.contains(user))?;
        let user = order.remove(at)?;
        let online = latest.remove(&user)?;
        busy.insert(user);
        Some((user, online))
    }

    /// Waits for an announcement to make.
    async fn next(&self) -> (u64, bool) {
        loop {
            let ready = self.ready.notified();
            if let Some(next) = self.take() {
                return next;
            }
            ready.await;
        }
    }

    /// Ends the announcement of `user`; one queued for it meanwhile can now be taken.
    fn done(&self, user: u64) {
        let waiting = {
            let mut pending = self.lock();
            pending.busy.remove(&user);
            pending.latest.contains_key(&user)
        };
        if waiting {
            self.ready.notify_one();
        }
    }
}

/// Makes the queued announcements of `service` until `shutdown`.
pub(crate) async fn run(service: Arc<Service>, shutdown: CancellationToken) {
    let workers = (0..WORKERS).map(|_| {
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (user, online) = tokio::select! {
                    next = service.presence.next() => next,
                    _ = shutdown.cancelled() => return,
                };
                service.announce_now(user, online).await;
                service.presence.done(user);
            }
        })
    });
    futures_util::future::join_all(workers).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_state_replaces_a_waiting_one() {
        let queue = PresenceQueue::default();
        queue.announce(1, true);
        queue.announce(2, true);
        queue.announce(1, false);
        assert_eq!(queue.take(), Some((1, false)));
        assert_eq!(queue.take(), Some((2, true)));
        assert_eq!(queue.take(), None);
    }

    #[test]
    fn one_user_is_announced_by_one_worker_at_a_time() {
        let queue = PresenceQueue::default();
        queue.announce(1, true);
        assert_eq!(queue.take(), Some((1, true)));
        // Offline while online is being announced: it waits, and others go past it.
        queue.announce(1, false);
        queue.announce(2, true);
        assert_eq!(queue.take(), Some((2, true)));
        assert_eq!(queue.take(), None);
        queue.done(1);
        assert_eq!(queue.take(), Some((1, false)));
    }

    #[test]
    fn past_the_cap_new_users_are_dropped() {
        let queue = PresenceQueue::with_capacity(2);
        queue.announce(1, true);
        queue.announce(2, true);
        queue.announce(3, true);
        // A user already waiting still takes its newer state.
        queue.announce(2, false);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(queue.take(), Some((1, true)));
        assert_eq!(queue.take(), Some((2, false)));
        assert_eq!(queue.take(), None);
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_for_a_new_announcement() {
        let queue = Arc::new(PresenceQueue::default());
        let worker = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        queue.announce(7, true);
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), worker).await;
        assert_eq!(next.unwrap().unwrap(), (7, true));
    }
}
