//! A small bounded queue with one receiver, for what the server tells a session's control
//! stream from outside (kick, drain, notices: presence and group changes).
//!
//! Every session holds one for its whole life, and those messages are rare, so it is built for
//! memory rather than throughput: a tokio `mpsc` channel allocates its shared state padded to
//! cache lines plus a block of 32 slots up front, about 1.5 KB per session; this holds a lock,
//! an empty `VecDeque` and a `Notify` until something is sent. Its semantics are the channel's:
//! `try_send` fails when the queue is full or the receiver is gone, and `recv` returns `None`
//! once every sender is gone and the queue is empty. A queue that grew in a burst gives its
//! memory back once it is empty again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// What the senders and the receiver share.
struct Shared<T> {
    queue: Mutex<VecDeque<T>>,
    /// Most messages queued at once.
    capacity: usize,
    /// Wakes the receiver: something queued, or the last sender gone.
    wake: Notify,
    /// Live [`Sender`]s.
    senders: AtomicUsize,
    receiver_gone: AtomicBool,
}

/// Queue room kept while the queue is empty; more is given back.
const KEEP_WHEN_EMPTY: usize = 4;

impl<T> Shared<T> {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates a mailbox holding at most `capacity` messages.
pub(crate) fn mailbox<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        capacity,
        wake: Notify::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Why a message was not queued; it comes back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError<T> {
    Full(T),
    Closed(T),
}

/// Queues messages for the [`Receiver`]; cloned as a channel sender is.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `message` unless the mailbox is full or its receiver is gone.
    pub(crate) fn try_send(&self, message: T) -> Result<(), TrySendError<T>> {
        if self.shared.receiver_gone.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(message));
        }
        {
            let mut queue = self.shared.queue();
            if queue.len() >= self.shared.capacity {
                return Err(TrySendError::Full(message));
            }
            queue.push_back(message);
        }
        self.shared.wake.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake.notify_one();
        }
    }
}

/// Takes the queued messages, oldest first.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next message, or `None` once the mailbox is empty and every sender is gone.
    /// Cancel-safe: a message is taken only when this returns it.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        loop {
            // A wake-up that comes between these checks and the wait is kept by `Notify` as a
            // permit, so the wait returns at once.
            if let Some(message) = self.pop() {
                return Some(message);
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                // A last message may have come with the last sender's drop.
                return self.pop();
            }
            self.shared.wake.notified().await;
        }
    }
}

impl<T> Receiver<T> {
    fn pop(&self) -> Option<T> {
        let mut queue = self.shared.queue();
        let message = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEEP_WHEN_EMPTY {
            queue.shrink_to(KEEP_WHEN_EMPTY);
        }
        message
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    use std::time::Duration;

    /// Polls `future` once; whether it is still pending.
    async fn pending<F: Future>(future: &mut Pin<Box<F>>) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn messages_arrive_in_order_and_a_full_mailbox_refuses_more() {
        let (tx, mut rx) = mailbox(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(tx.try_send(4), Ok(()));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(4));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_message_sent_later() {
        let (tx, mut rx) = mailbox(4);
        let mut waiting = Box::pin(rx.recv());
        assert!(pending(&mut waiting).await, "nothing queued yet");
        tx.try_send("kick").expect("queued");
        let got = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(got.expect("woken"), Some("kick"));
    }

    #[tokio::test]
    async fn recv_ends_once_every_sender_is_gone_after_the_queue_drains() {
        let (tx, mut rx) = mailbox(4);
        let second = tx.clone();
        tx.try_send(1).expect("queued");
        drop(tx);
        second.try_send(2).expect("queued");
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        let mut waiting = Box::pin(rx.recv());
        assert!(pending(&mut waiting).await, "a sender is still there");
        drop(second);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(got.expect("ended"), None);
    }

    #[tokio::test]
    async fn a_recv_dropped_after_its_wake_up_loses_nothing() {
        let (tx, mut rx) = mailbox(4);
        {
            let mut waiting = Box::pin(rx.recv());
            assert!(pending(&mut waiting).await, "nothing queued yet");
            tx.try_send(7).expect("queued");
            // Dropped woken but not polled again, as a `select!` branch that lost the race.
        }
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.expect("not lost"), Some(7));
        tx.try_send(8).expect("queued");
        assert_eq!(rx.recv().await, Some(8));
    }

    /// A send and the last sender's drop on another thread, racing the receiver's checks and
    /// its wait, round after round. A sender that did not wake the receiver leaves a round
    /// waiting; a wake-up lost in the narrow window between the checks and the wait would show
    /// only now and then (`recv` relies on `Notify` keeping it as a permit).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receiver_wakes_for_sends_and_the_last_drop_on_another_thread() {
        for round in 0..1_000u32 {
            let (tx, mut rx) = mailbox(4);
            let sender = tokio::spawn(async move {
                tx.try_send(round).expect("queued");
                // The last sender goes here, ending the receiver's second wait.
            });
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                (rx.recv().await, rx.recv().await)
            })
            .await;
            assert_eq!(got, Ok((Some(round), None)), "round {round}");
            sender.await.expect("no panic");
        }
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_back_what_a_burst_grew() {
        let (tx, mut rx) = mailbox(64);
        for i in 0..64 {
            tx.try_send(i).expect("queued");
        }
        for i in 0..64 {
            assert_eq!(rx.recv().await, Some(i));
        }
        assert!(rx.shared.queue().capacity() <= KEEP_WHEN_EMPTY);
    }

    #[test]
    fn sending_after_the_receiver_is_gone_fails() {
        let (tx, rx) = mailbox(4);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(TrySendError::Closed(1)));
    }
}
