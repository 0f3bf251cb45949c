//! Sends that share a stream. While a send of this client waits for its ack, the sends that
//! come after it queue up and go out together on one stream: up to the server's
//! `max_sends_per_stream` messages one after the other, and an ack for each comes back in the
//! same order. A burst of sends (or a queue flushed after a reconnect) then costs one stream,
//! one server task and a few shared datagrams instead of a stream each. A lone send still gets
//! a stream of its own at once, with no wait. Retries stay with the caller: a send whose
//! stream fails gets an error and is sent again with the same client message id, which cim
//! stores once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use cim_core::transport::{read_only_frame, take_end};
use cim_proto::read_required;
use cim_proto::v1::SendAck;
use tokio::sync::oneshot;

use crate::{ClientError, SEND_ATTEMPT_TIMEOUT};

/// Largest ack frame.
const MAX_ACK_FRAME: usize = 4096;

/// Most sends this client puts on one stream, whatever the server allows.
const MAX_SENDS_PER_STREAM: usize = 32;

/// The sends of one connection.
pub(crate) struct SendQueue {
    conn: quinn::Connection,
    /// Sends one stream may carry: the server's `max_sends_per_stream`, at most
    /// [`MAX_SENDS_PER_STREAM`]. 1 for servers that take one per stream.
    per_stream: usize,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    /// Sends started and not answered yet.
    in_flight: usize,
    /// Sends waiting for the next stream, in the order they came.
    waiting: Vec<Waiting>,
    /// Whether a flush task will take `waiting`.
    flushing: bool,
}

/// A send waiting for a stream.
struct Waiting {
    client_msg_id: u64,
    /// The encoded `ClientRequest` frame.
    frame: Bytes,
    reply: oneshot::Sender<Result<(SendAck, Carried), ClientError>>,
}

/// How a send went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carried {
    /// On a stream of its own.
    Alone,
    /// On a stream with other sends.
    Shared,
}

impl SendQueue {
    /// The queue of `conn`, whose server takes up to `max_sends_per_stream` sends per stream
    /// (0 from servers that do not say, which take one).
    pub(crate) fn new(conn: quinn::Connection, max_sends_per_stream: u32) -> Arc<Self> {
        Arc::new(Self {
            conn,
            per_stream: (max_sends_per_stream as usize).clamp(1, MAX_SENDS_PER_STREAM),
            state: Mutex::default(),
        })
    }

    /// The connection the sends go out on.
    pub(crate) fn conn(&self) -> &quinn::Connection {
        &self.conn
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `frame` (an encoded `ClientRequest` carrying the send with `client_msg_id`) and
    /// returns the server's ack. Cancel-safe: a caller that gives up leaves the stream it
    /// shares with others to them.
    pub(crate) async fn send(
        self: &Arc<Self>,
        client_msg_id: u64,
        frame: Bytes,
    ) -> Result<(SendAck, Carried), ClientError> {
        let reply = {
            let mut state = self.state();
            state.in_flight += 1;
            if self.per_stream <= 1 || (state.in_flight == 1 && !state.flushing) {
                None
            } else {
                let (reply, answer) = oneshot::channel();
                state.waiting.push(Waiting {
                    client_msg_id,
                    frame: frame.clone(),
                    reply,
                });
                if !state.flushing {
                    state.flushing = true;
                    tokio::spawn(self.clone().flush());
                }
                Some(answer)
            }
        };
        let _in_flight = InFlight(self);
        match reply {
            None => Ok((send_alone(&self.conn, &frame).await?, Carried::Alone)),
            Some(answer) => answer
                .await
                .unwrap_or_else(|_| Err(ClientError::Connection("send stream dropped".into()))),
        }
    }

    /// Takes what is waiting, after letting the sends that are ready to run join it, and sends
    /// it on as many streams as it needs, side by side.
    async fn flush(self: Arc<Self>) {
        tokio::task::yield_now().await;
        let mut waiting = {
            let mut state = self.state();
            state.flushing = false;
            std::mem::take(&mut state.waiting)
        };
        // A caller that gave up while its send waited has retried it or failed: not sent.
        waiting.retain(|w| !w.reply.is_closed());
        let mut streams = Vec::new();
        let mut waiting = waiting.into_iter().peekable();
        while waiting.peek().is_some() {
            let batch: VecDeque<Waiting> = waiting.by_ref().take(self.per_stream).collect();
            streams.push(batch);
        }
        let last = streams.pop();
        for batch in streams {
            tokio::spawn(exchange(self.conn.clone(), batch));
        }
        if let Some(batch) = last {
            exchange(self.conn.clone(), batch).await;
        }
    }
}

/// Takes a send (counted in `in_flight` when this is made) off the count when dropped.
struct InFlight<'a>(&'a SendQueue);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.state().in_flight -= 1;
    }
}

/// One send on a stream of its own.
async fn send_alone(conn: &quinn::Connection, frame: &Bytes) -> Result<SendAck, ClientError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(frame)
        .await
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    send.finish()
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    Ok(read_only_frame(&mut recv, MAX_ACK_FRAME).await?)
}

/// Sends `batch` on one stream and hands each its ack. When the stream fails, every send not
/// answered yet gets the error.
async fn exchange(conn: quinn::Connection, mut batch: VecDeque<Waiting>) {
    let carried = if batch.len() > 1 {
        Carried::Shared
    } else {
        Carried::Alone
    };
    let result = tokio::time::timeout(SEND_ATTEMPT_TIMEOUT, async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut frames: Vec<Bytes> = batch.iter().map(|w| w.frame.clone()).collect();
        let write = async {
            send.write_all_chunks(&mut frames)
                .await
                .map_err(|e| ClientError::Connection(e.to_string()))?;
            send.finish()
                .map_err(|e| ClientError::Connection(e.to_string()))
        };
        // Acks are read while the frames go out, and still after a failed write: a server
        // that will not take a frame (too large, say) answers the ones before it and puts a
        // refusal in its place before it stops reading. Those answers reach their sends;
        // without them every send of the stream would be retried, the refused one with the
        // others again.
        let read = async {
            while let Some(waiting) = batch.front() {
                let ack: SendAck = read_required(&mut recv, MAX_ACK_FRAME).await?;
                // A refusal of an unreadable frame names no message (0).
                let refusal = ack.client_msg_id == 0 && !ack.code.is_empty();
                if ack.client_msg_id != waiting.client_msg_id && !refusal {
                    return Err(ClientError::Protocol(format!(
                        "ack for message {} where {} was due",
                        ack.client_msg_id, waiting.client_msg_id
                    )));
                }
                if let Some(waiting) = batch.pop_front() {
                    let _ = waiting.reply.send(Ok((ack, carried)));
                }
            }
            take_end(&mut recv);
            Ok(())
        };
        let (written, read) = tokio::join!(write, read);
        // Every send answered: a failed write no longer matters. Otherwise the write's error
        // (if any) says why.
        read.map_err(|e| written.err().unwrap_or(e))
    })
    .await
    .unwrap_or(Err(ClientError::Timeout));
    if let Err(e) = result {
        tracing::debug!(error = %e, unanswered = batch.len(), "send stream failed");
        for waiting in batch {
            let _ = waiting.reply.send(Err(e.duplicate()));
        }
    }
}
