//! A count of things on their way (renewals sent, events not yet handed over) that others can
//! wait to see reach zero.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Things on their way, counted; [`Pending::none`] waits until there are none.
#[derive(Debug, Default)]
pub struct Pending {
    count: AtomicUsize,
    changed: Notify,
}

impl Pending {
    /// `n` more on their way.
    pub fn add(&self, n: usize) {
        self.count.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` of them arrived (or were given up); wakes whoever waits.
    pub fn done(&self, n: usize) {
        self.count.fetch_sub(n, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// How many are on their way.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until none is on its way (at once if none is).
    pub async fn none(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn none_waits_for_the_last_one() {
        let pending = Arc::new(Pending::default());
        pending.none().await;
        pending.add(2);
        let waiter = tokio::spawn({
            let pending = pending.clone();
            async move { pending.none().await }
        });
        pending.done(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one is still on its way");
        pending.done(1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken once none is left")
            .expect("waiter ran");
    }
}
