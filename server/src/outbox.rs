//! Per-session delivery queue. Pushed messages wait here and leave on server-opened streams:
//! one stream per message while the client keeps up, and several messages per stream (one
//! `DeliveryBatch` frame) when deliveries queue up behind a busy or slow client. One sender
//! task sends a stream at a time; a second starts only while every running sender's stream has
//! gone unanswered for longer than [`stall_after`] since it was opened, and runs until the
//! queue is empty. That bounds the streams and tasks a fan-out costs by the number of
//! recipients, not of messages.
//!
//! A delivery that fails is not retried here: its entry stays in the recipient's inbox, and the
//! client pulls it when it sees the gap or reconnects.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cim_core::metrics::Gauge;
use cim_core::transport::read_only_frame;
use cim_proto::v1::DeliveryAck;
use cim_proto::{FrameError, SharedDelivery, encode_delivery_batch};

use crate::session::State;

/// Time a client has to take a delivery and ack it.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one session may have open for deliveries at once. Two, not more: every further
/// stream in flight takes deliveries that would otherwise share a batch, and each stream costs
/// packets, acks and a task on both ends. With 4, a 1000-member group delivered about 30% less.
/// The second opens only when the first is slow (see [`stall_after`]).
const MAX_SENDERS: usize = 2;
/// A delivery stream whose ack has not come within this many round trips is taken as slow
/// (a lost packet, a busy client), and what queued behind it leaves on a second stream.
const STALL_RTTS: u32 = 2;
/// Lower bound of the stall time, for round trips too short to measure well (loopback).
const MIN_STALL: Duration = Duration::from_millis(2);
/// Most deliveries sent on one stream.
const MAX_BATCH: usize = 128;
/// Most encoded bytes sent on one stream (the client's frame cap is
/// [`cim_proto::DEFAULT_MAX_FRAME`]; one delivery alone always fits it).
const MAX_BATCH_BYTES: usize = cim_proto::DEFAULT_MAX_FRAME / 2;
/// Deliveries waiting for one session before new ones are left to the client's pull.
const MAX_PENDING: usize = 4096;
/// Bytes of deliveries (as a batch carries them) waiting for one session before new ones are
/// left to the client's pull: a client that takes its streams slowly (acking each just before
/// [`DELIVERY_TIMEOUT`]) held up to [`MAX_PENDING`] of the largest messages, 64 MiB, for as
/// long as its senders kept the queue full.
const MAX_PENDING_BYTES: usize = 1024 * 1024;
/// Bytes of messages waiting in all of a server's outboxes (each counted once, however many
/// sessions it waits for) past which a session that already has deliveries waiting takes no
/// more: many slow sessions, each within its own cap, cannot take the server's memory either.
/// A session with none waiting still takes each delivery, so clients that keep up see no
/// difference; the others pull.
const MAX_QUEUED_BYTES: i64 = 256 * 1024 * 1024;

/// A pushed message, encoded once for all its recipients on this server, counted in the
/// server's `queued_bytes` until no outbox holds it any more.
pub(crate) struct QueuedMessage {
    delivery: SharedDelivery,
    queued_bytes: Gauge,
}

impl QueuedMessage {
    pub(crate) fn new(delivery: SharedDelivery, queued_bytes: &Gauge) -> Arc<Self> {
        queued_bytes.inc_by(delivery.batch_len(0) as i64);
        Arc::new(Self {
            delivery,
            queued_bytes: queued_bytes.clone(),
        })
    }
}

impl Drop for QueuedMessage {
    fn drop(&mut self) {
        self.queued_bytes.dec_by(self.delivery.batch_len(0) as i64);
    }
}

/// The deliveries waiting for one session, and the tasks sending them.
pub(crate) struct Outbox {
    user: u64,
    conn: quinn::Connection,
    queue: Mutex<Queue>,
}

/// One recipient's delivery: its inbox seq and the message, encoded once for all recipients.
pub(crate) struct Queued {
    pub(crate) seq: u64,
    pub(crate) message: Arc<QueuedMessage>,
}

impl Queued {
    fn batch_len(&self) -> usize {
        self.message.delivery.batch_len(self.seq)
    }
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Queued>,
    /// [`Queued::batch_len`] of everything in `pending`.
    pending_bytes: usize,
    /// The session is not confirmed yet: deliveries queue, none leaves (see [`Outbox::held`]).
    held: bool,
    senders: usize,
    /// Senders whose stream has waited for its ack past [`stall_after`].
    stalled: usize,
    /// Highest seq dropped without delivery (0: none), told to the client in each `Pong`.
    missed_up_to: u64,
    /// Highest seq queued here or told to the client as missed: what the session's router
    /// compares with its inbox at each renewal.
    told_up_to: u64,
    /// An inbox head a renewal reported past `told_up_to`, and when. Pushes the router issued
    /// before it answered may still be on their way (its push queue lags under load), so the
    /// head counts as missed only if they have not come [`BEHIND_SETTLE`] later: a busy
    /// client would otherwise pull what is already queued to it.
    behind: Option<(u64, Instant)>,
}

/// See `Queue::behind`.
const BEHIND_SETTLE: Duration = Duration::from_secs(1);

impl Queue {
    /// Whether a delivery of `len` bytes may wait here: always when nothing else waits (the
    /// client keeps up), else within [`MAX_PENDING`] and [`MAX_PENDING_BYTES`] and while the
    /// server is not `crowded` (see [`MAX_QUEUED_BYTES`]).
    fn admits(&self, len: usize, crowded: bool) -> bool {
        self.pending.is_empty()
            || (self.pending.len() < MAX_PENDING
                && self.pending_bytes + len <= MAX_PENDING_BYTES
                && !crowded)
    }

    /// Queues `delivery`, whose [`Queued::batch_len`] is `len`.
    fn enqueue(&mut self, delivery: Queued, len: usize) {
        self.pending_bytes += len;
        self.pending.push_back(delivery);
    }

    /// See [`Outbox::behind`].
    fn behind(&mut self, head: u64, now: Instant) {
        let reported = self.behind.map_or(0, |(head, _)| head);
        if head > self.told_up_to && head > reported {
            self.behind = Some((head, now));
        }
    }

    /// See [`Outbox::missed_up_to`].
    fn missed_up_to(&mut self, now: Instant) -> u64 {
        if let Some((head, at)) = self.behind
            && now >= at + BEHIND_SETTLE
        {
            self.behind = None;
            if head > self.told_up_to {
                self.told_up_to = head;
                self.missed_up_to = self.missed_up_to.max(head);
            }
        }
        self.missed_up_to
    }

    /// Whether what is pending wants another sender: none runs, or every running one waits on
    /// a slow stream and fewer than [`MAX_SENDERS`] run.
    fn wants_sender(&self) -> bool {
        !self.held
            && !self.pending.is_empty()
            && (self.senders == 0 || (self.senders < MAX_SENDERS && self.stalled == self.senders))
    }

    /// Takes the oldest deliveries, as many as fit one stream (at least one if any wait).
    fn take_batch(&mut self) -> Vec<Queued> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.pending.front() {
            let len = next.batch_len();
            if !batch.is_empty() && (batch.len() >= MAX_BATCH || bytes + len > MAX_BATCH_BYTES) {
                break;
            }
            bytes += len;
            batch.extend(self.pending.pop_front());
        }
        self.pending_bytes -= bytes;
        batch
    }
}

impl Outbox {
    /// An outbox that holds what is pushed to it until [`Outbox::release`]: a login's session
    /// takes pushes from before the router has confirmed it (so none falls between the
    /// router's read of the inbox and the session), but sends nothing to a client whose token
    /// the router may still refuse.
    pub(crate) fn held(user: u64, conn: quinn::Connection) -> Arc<Self> {
        Arc::new(Self {
            user,
            conn,
            queue: Mutex::new(Queue {
                held: true,
                ..Queue::default()
            }),
        })
    }

    /// The highest seq dropped without delivery, or stored and never pushed (see
    /// [`Outbox::behind`]), 0 if none: the client pulls up to it.
    pub(crate) fn missed_up_to(&self) -> u64 {
        self.queue().missed_up_to(Instant::now())
    }

    /// The highest seq queued here or told to the client as missed (see [`Outbox::behind`]).
    pub(crate) fn told_up_to(&self) -> u64 {
        self.queue().told_up_to
    }

    /// The client holds everything up to `seq` (its login found the inbox empty there).
    pub(crate) fn caught_up_to(&self, seq: u64) {
        let mut queue = self.queue();
        queue.told_up_to = queue.told_up_to.max(seq);
    }

    /// The inbox gave out entries up to `head` (a router says, at a renewal). Unless pushes of
    /// them come in within [`BEHIND_SETTLE`], they were pushed to no one: the client is told
    /// to pull up to it.
    pub(crate) fn behind(&self, head: u64) {
        self.queue().behind(head, Instant::now());
    }

    /// Whether the outbox is still held (its session not yet confirmed).
    pub(crate) fn is_held(&self) -> bool {
        self.queue().held
    }

    /// Lets held deliveries and later ones leave.
    pub(crate) fn release(self: &Arc<Self>, state: &Arc<State>) {
        let mut queue = self.queue();
        queue.held = false;
        self.start_sender_if_wanted(&mut queue, state);
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every critical section leaves the queue consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `delivery` and starts a sender if it wants one ([`Queue::wants_sender`]).
    /// Returns false (and drops the delivery, for the client to pull) when the session is
    /// too far behind ([`Queue::admits`]).
    pub(crate) fn push(self: &Arc<Self>, delivery: Queued, state: &Arc<State>) -> bool {
        let crowded = state.config.metrics.queued_bytes.get() > MAX_QUEUED_BYTES;
        let mut queue = self.queue();
        queue.told_up_to = queue.told_up_to.max(delivery.seq);
        let len = delivery.batch_len();
        if !queue.admits(len, crowded) {
            queue.missed_up_to = queue.missed_up_to.max(delivery.seq);
            return false;
        }
        queue.enqueue(delivery, len);
        self.start_sender_if_wanted(&mut queue, state);
        true
    }

    fn start_sender_if_wanted(self: &Arc<Self>, queue: &mut Queue, state: &Arc<State>) {
        if queue.wants_sender() {
            queue.senders += 1;
            tokio::spawn(self.clone().send_loop(state.clone()));
        }
    }

    /// Takes the next batch, or retires this sender when nothing is left.
    fn next_batch(&self) -> Option<Vec<Queued>> {
        let mut queue = self.queue();
        if queue.pending.is_empty() {
            queue.senders -= 1;
            return None;
        }
        Some(queue.take_batch())
    }

    async fn send_loop(self: Arc<Self>, state: Arc<State>) {
        let metrics = &state.config.metrics;
        while let Some(batch) = self.next_batch() {
            let count = batch.len() as u64;
            let batch_up_to = batch.iter().map(|q| q.seq).max().unwrap_or(0);
            let sending = send_batch(&self.conn, batch);
            tokio::pin!(sending);
            // One timer per stream: first the stall time, then the delivery timeout.
            let opened = tokio::time::Instant::now();
            let stall = stall_after(self.conn.rtt()).min(DELIVERY_TIMEOUT);
            let timer = tokio::time::sleep_until(opened + stall);
            tokio::pin!(timer);
            let mut slow = false;
            let result = loop {
                tokio::select! {
                    // An ack that is in never counts as slow.
                    biased;
                    result = &mut sending => break result,
                    () = &mut timer => {
                        if slow {
                            break Err(DeliveryError::Timeout);
                        }
                        slow = true;
                        timer.as_mut().reset(opened + DELIVERY_TIMEOUT);
                        let mut queue = self.queue();
                        queue.stalled += 1;
                        self.start_sender_if_wanted(&mut queue, &state);
                    }
                }
            };
            if slow {
                self.queue().stalled -= 1;
            }
            match result {
                Ok(acked) => {
                    metrics.deliveries.inc_by(count);
                    state.record_ack(self.user, acked);
                }
                Err(e) => {
                    // Whatever is still queued would fail the same way; the client pulls it,
                    // told by its next Pong if it stays connected.
                    let dropped = {
                        let mut queue = self.queue();
                        queue.senders -= 1;
                        let pending = std::mem::take(&mut queue.pending);
                        queue.pending_bytes = 0;
                        let pending_up_to = pending.iter().map(|q| q.seq).max().unwrap_or(0);
                        queue.missed_up_to = queue.missed_up_to.max(batch_up_to).max(pending_up_to);
                        pending.len() as u64
                    };
                    metrics.delivery_failures.inc_by(count + dropped);
                    tracing::debug!(user = self.user, count, dropped, error = %e, "delivery failed");
                    return;
                }
            }
        }
    }
}

/// How long a delivery stream may wait for its ack before a second stream takes what queued
/// behind it, for a connection with smoothed round trip `rtt`. One stream at a time lets
/// deliveries to a busy client share batches (a 1000-member group delivered 18% and 58% more
/// in two runs than with two streams always open); a second one after a stall keeps a lost
/// packet from holding up everything behind it until its retransmission, which with one
/// stream only grew the lossy relay's p99 by about 20%.
fn stall_after(rtt: Duration) -> Duration {
    (rtt * STALL_RTTS).max(MIN_STALL)
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("timed out")]
    Timeout,
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Finish(#[from] quinn::ClosedStream),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
}

/// Sends one batch on a new stream and returns the sequence number up to which the client
/// says it has everything. The caller bounds it with [`DELIVERY_TIMEOUT`].
async fn send_batch(
    conn: &quinn::Connection,
    deliveries: Vec<Queued>,
) -> Result<u64, DeliveryError> {
    let frame = encode_delivery_batch(
        deliveries.iter().map(|d| (d.seq, &d.message.delivery)),
        cim_proto::DEFAULT_MAX_FRAME,
    )?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_chunk(frame).await?;
    send.finish()?;
    let ack: DeliveryAck = read_only_frame(&mut recv, 1024).await?;
    Ok(ack.seq)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cim_proto::v1::{Delivery, DeliveryBatch};

    fn queued(seq: u64, body_len: usize, queued_bytes: &Gauge) -> Queued {
        Queued {
            seq,
            message: QueuedMessage::new(
                SharedDelivery::new(Delivery {
                    body: "x".repeat(body_len),
                    ..Default::default()
                }),
                queued_bytes,
            ),
        }
    }

    fn queue_of(bodies: &[usize]) -> Queue {
        let mut queue = Queue {
            held: false,
            senders: 1,
            ..Queue::default()
        };
        let gauge = Gauge::default();
        for (i, len) in bodies.iter().enumerate() {
            let delivery = queued(i as u64 + 1, *len, &gauge);
            let len = delivery.batch_len();
            queue.enqueue(delivery, len);
        }
        queue
    }

    #[test]
    fn a_session_behind_takes_deliveries_within_its_caps_and_the_servers() {
        let gauge = Gauge::default();
        let mut queue = queue_of(&[]);
        let big = queued(1, 16_000, &gauge);
        let len = big.batch_len();
        assert!(queue.admits(len, true), "nothing waits: always");
        queue.enqueue(big, len);
        assert!(
            !queue.admits(10, true),
            "a crowded server keeps only what keeps up"
        );
        assert!(queue.admits(10, false));
        // The byte cap: about 65 of the largest messages wait, not MAX_PENDING of them.
        let mut seq = 1;
        loop {
            let next = queued(seq + 1, 16_000, &gauge);
            let len = next.batch_len();
            if !queue.admits(len, false) {
                break;
            }
            queue.enqueue(next, len);
            seq += 1;
        }
        assert!(
            (60..=66).contains(&queue.pending.len()),
            "{}",
            queue.pending.len()
        );
        assert!(queue.pending_bytes <= MAX_PENDING_BYTES);
        // The count cap, for small ones.
        let mut small = queue_of(&[1; MAX_PENDING - 1]);
        assert!(small.admits(10, false));
        let last = queued(MAX_PENDING as u64, 1, &gauge);
        let len = last.batch_len();
        small.enqueue(last, len);
        assert!(!small.admits(10, false));
        // Batches taken give their bytes back.
        while !queue.take_batch().is_empty() {}
        assert_eq!(queue.pending_bytes, 0);
    }

    #[test]
    fn a_message_counts_in_the_servers_queued_bytes_until_its_last_copy_is_gone() {
        let gauge = Gauge::default();
        let first = queued(1, 1000, &gauge);
        let len = first.message.delivery.batch_len(0) as i64;
        assert_eq!(gauge.get(), len);
        let second = Queued {
            seq: 2,
            message: first.message.clone(),
        };
        assert_eq!(gauge.get(), len, "shared by two sessions: counted once");
        drop(first);
        assert_eq!(gauge.get(), len);
        drop(second);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn an_inbox_head_past_what_was_pushed_is_told_as_missed_once_it_had_time_to_come() {
        let start = Instant::now();
        let settled = start + BEHIND_SETTLE;
        let mut queue = queue_of(&[10, 10]);
        queue.told_up_to = 2;
        queue.behind(2, start);
        assert_eq!(queue.missed_up_to(settled), 0, "both were pushed");
        queue.behind(5, start);
        assert_eq!(queue.missed_up_to(start), 0, "its push may be on its way");
        assert_eq!(queue.missed_up_to(settled), 5);
        assert_eq!(queue.told_up_to, 5);
        queue.missed_up_to = 0;
        queue.behind(5, settled);
        assert_eq!(
            queue.missed_up_to(settled + BEHIND_SETTLE),
            0,
            "told already"
        );
        // A push that comes meanwhile settles it.
        queue.behind(7, settled);
        queue.told_up_to = 7;
        assert_eq!(queue.missed_up_to(settled + BEHIND_SETTLE), 0);
    }

    fn seqs(batch: &[Queued]) -> Vec<u64> {
        batch.iter().map(|d| d.seq).collect()
    }

    #[test]
    fn batches_keep_inbox_order_and_respect_the_count_cap() {
        let mut queue = queue_of(&[10; 300]);
        let first = queue.take_batch();
        assert_eq!(first.len(), MAX_BATCH);
        assert_eq!(seqs(&first), (1..=MAX_BATCH as u64).collect::<Vec<_>>());
        let second = queue.take_batch();
        assert_eq!(second[0].seq, MAX_BATCH as u64 + 1);
        let third = queue.take_batch();
        assert_eq!(third.len(), 300 - 2 * MAX_BATCH);
        assert!(queue.take_batch().is_empty());
    }

    #[test]
    fn batches_fit_the_clients_frame_cap() {
        let big = cim_proto::DEFAULT_MAX_FRAME / 5;
        let mut queue = queue_of(&[big; 6]);
        let mut total = 0;
        while !queue.pending.is_empty() {
            let batch = queue.take_batch();
            let frame = encode_delivery_batch(
                batch.iter().map(|d| (d.seq, &d.message.delivery)),
                cim_proto::DEFAULT_MAX_FRAME,
            )
            .unwrap();
            assert!(frame.len() - cim_proto::LENGTH_PREFIX <= MAX_BATCH_BYTES);
            let (decoded, _) =
                cim_proto::decode_frame::<DeliveryBatch>(&frame, cim_proto::DEFAULT_MAX_FRAME)
                    .unwrap()
                    .unwrap();
            assert_eq!(
                seqs(&batch),
                decoded.deliveries.iter().map(|d| d.seq).collect::<Vec<_>>()
            );
            total += batch.len();
        }
        assert_eq!(total, 6);
    }

    #[test]
    fn a_second_sender_starts_only_behind_a_slow_one() {
        let mut queue = queue_of(&[]);
        queue.senders = 0;
        assert!(!queue.wants_sender(), "nothing to send");
        queue = queue_of(&[10]);
        queue.senders = 0;
        assert!(queue.wants_sender(), "first sender");
        queue.senders = 1;
        assert!(!queue.wants_sender(), "queues behind a stream in flight");
        queue.stalled = 1;
        assert!(queue.wants_sender(), "the stream in flight is slow");
        queue.senders = 2;
        assert!(!queue.wants_sender(), "one slow, one running");
        queue.stalled = 2;
        assert!(!queue.wants_sender(), "at most MAX_SENDERS");
    }

    #[test]
    fn a_held_outbox_sends_nothing_until_released() {
        let mut queue = queue_of(&[10, 10]);
        queue.senders = 0;
        queue.held = true;
        assert!(!queue.wants_sender(), "held: the session is not confirmed");
        queue.held = false;
        assert!(queue.wants_sender(), "released");
    }

    #[test]
    fn an_oversized_delivery_still_goes_alone() {
        let mut queue = queue_of(&[MAX_BATCH_BYTES, 1]);
        assert_eq!(seqs(&queue.take_batch()), vec![1]);
        assert_eq!(seqs(&queue.take_batch()), vec![2]);
    }
}
