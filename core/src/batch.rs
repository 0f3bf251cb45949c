//! Batching for request/reply links: requests queue while earlier batches are in flight and
//! leave together, so an idle link waits for no timer (only two scheduler turns) and a busy one
//! sends fewer, larger requests.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// Batches of one queue in flight at once. Two, not more: a batch leaves as soon as a slot is
/// free, so every further slot splits a busy link's traffic into more, smaller batches (more
/// datagrams, acks and task wake-ups per message). Against 8: lower p99 at `cim-bench private
/// --rate 10000` in 6 of 7 paired runs, `bench/cluster.sh private` 5-9% faster (BENCHMARKS.md).
pub const BATCHES_IN_FLIGHT: usize = 2;

/// Times a batch yields to the runtime before it leaves, taking in what the tasks that ran in
/// the meantime queued. Work-conserving: an idle runtime comes straight back, so an idle link
/// waits for no timer; a busy one sends fewer, larger batches. At `cim-bench private --rate
/// 10000` two turns doubled the link batches (3-4 to 7-10 items) and halved the cluster's
/// internal datagrams per message.
const LINGER_TURNS: usize = 2;

/// Takes batches off a queue, with a bounded number in flight.
pub struct Batcher<T> {
    queue: mpsc::Receiver<T>,
    slots: Arc<Semaphore>,
    max: usize,
    /// Size of an item, and the most a batch may hold by it.
    weigh: fn(&T) -> usize,
    max_weight: usize,
    /// An item taken off the queue that did not fit its batch: the first of the next.
    held: Option<T>,
}

impl<T> Batcher<T> {
    /// Batches of at most `max` items from `queue`, at most `in_flight` at a time.
    pub fn new(queue: mpsc::Receiver<T>, in_flight: usize, max: usize) -> Self {
        Self {
            queue,
            slots: Arc::new(Semaphore::new(in_flight.max(1))),
            max: max.max(1),
            weigh: |_| 0,
            max_weight: usize::MAX,
            held: None,
        }
    }

    /// Also at most `max_weight` by `weigh` per batch (e.g. encoded bytes, so that a batch of
    /// large items stays under the link's frame limit). An item heavier than that alone still
    /// goes, alone.
    pub fn weighed(mut self, weigh: fn(&T) -> usize, max_weight: usize) -> Self {
        self.weigh = weigh;
        self.max_weight = max_weight;
        self
    }

    /// The next batch (one item at least, then whatever is queued by the end of the
    /// [`LINGER_TURNS`], while it fits) and its in-flight slot, released when the permit
    /// drops. `None` once the queue is closed and empty.
    pub async fn next(&mut self) -> Option<(Vec<T>, OwnedSemaphorePermit)> {
        let first = match self.held.take() {
            Some(held) => held,
            None => self.queue.recv().await?,
        };
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        let mut weight = (self.weigh)(&first);
        let mut batch = vec![first];
        'turns: for turn in 0..=LINGER_TURNS {
            if turn > 0 {
                tokio::task::yield_now().await;
            }
            while batch.len() < self.max {
                let Ok(next) = self.queue.try_recv() else {
                    break;
                };
                let next_weight = (self.weigh)(&next);
                if weight.saturating_add(next_weight) > self.max_weight {
                    self.held = Some(next);
                    break 'turns;
                }
                weight += next_weight;
                batch.push(next);
            }
            if batch.len() >= self.max {
                break;
            }
        }
        Some((batch, permit))
    }
}

/// Answers each waiting caller with its result, or every caller with the batch's error. A
/// reply list shorter than the batch answers the rest with `short`.
pub fn answer_all<R, E: Clone>(
    callers: Vec<oneshot::Sender<Result<R, E>>>,
    results: Result<Vec<R>, E>,
    short: E,
) {
    match results {
        Ok(results) => {
            let mut results = results.into_iter();
            for caller in callers {
                let _ = caller.send(results.next().ok_or_else(|| short.clone()));
            }
        }
        Err(e) => {
            for caller in callers {
                let _ = caller.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_take_what_is_queued_up_to_the_maximum() {
        let (tx, rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let mut batcher = Batcher::new(rx, 1, 3);
        let (first, permit) = batcher.next().await.unwrap();
        assert_eq!(first, vec![0, 1, 2]);
        drop(permit);
        let (second, _permit) = batcher.next().await.unwrap();
        assert_eq!(second, vec![3, 4]);
        drop(tx);
    }

    #[tokio::test]
    async fn batches_stay_within_their_weight_and_an_overweight_item_goes_alone() {
        let (tx, rx) = mpsc::channel(16);
        for size in [40, 50, 20, 200, 30, 30] {
            tx.send(size).await.unwrap();
        }
        drop(tx);
        let mut batcher = Batcher::new(rx, 1, 10).weighed(|size: &usize| *size, 100);
        let mut batches = Vec::new();
        while let Some((batch, permit)) = batcher.next().await {
            batches.push(batch);
            drop(permit);
        }
        assert_eq!(batches, [vec![40, 50], vec![20], vec![200], vec![30, 30]]);
    }

    #[tokio::test]
    async fn every_caller_gets_an_answer() {
        let (a, ra) = oneshot::channel::<Result<u32, String>>();
        let (b, rb) = oneshot::channel();
        answer_all(vec![a, b], Ok(vec![7]), "short".to_string());
        assert_eq!(ra.await.unwrap(), Ok(7));
        assert_eq!(rb.await.unwrap(), Err("short".to_string()));
    }
}
