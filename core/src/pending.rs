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
    /// One more on its way.
    pub fn add(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// One of them arrived (or was given up); wakes whoever waits.
    pub fn done(&self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until none is on its way (at once if none is).
    pub async fn none(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
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
        pending.add();
        pending.add();
        let waiter = tokio::spawn({
            let pending = pending.clone();
            async move { pending.none().await }
        });
        pending.done();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one is still on its way");
        pending.done();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken once none is left")
            .expect("waiter ran");
    }
}
