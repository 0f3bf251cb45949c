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

#[cfg(test)]
mod tests {
    //! The queue's own bookkeeping against a scripted server on a real QUIC connection: which
    //! sends share a stream, what a caller that gives up leaves behind, and what a failed
    //! stream does to the sends it carried.

    use std::net::SocketAddr;
    use std::task::Poll;
    use std::time::Duration;

    use cim_core::transport::{self, Link};
    use cim_core::{ALPN_CLIENT, tls};
    use cim_proto::v1::{ChatMessage, ClientRequest, client_request};
    use cim_proto::{read_frame, write_frame};
    use tokio::sync::{Semaphore, mpsc};

    use super::*;

    /// What the scripted server does with a stream once it has read all of it.
    #[derive(Clone, Copy)]
    enum Answer {
        /// An ack for every send, in order.
        All,
        /// An ack for the first send, then the end of the stream.
        FirstThenEnd,
    }

    /// A server that reports the client message ids of each stream it reads (to its end), then
    /// waits for a permit from `release` before it answers as `answer` says.
    struct ScriptedServer {
        streams: mpsc::UnboundedReceiver<Vec<u64>>,
        release: Arc<Semaphore>,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
        _certs: tempfile::TempDir,
    }

    impl ScriptedServer {
        /// The server and a queue on a connection to it taking `per_stream` sends a stream.
        async fn start(per_stream: u32, answer: Answer) -> (Self, Arc<SendQueue>) {
            let certs = tempfile::tempdir().unwrap();
            let paths = cim_certs::generate(certs.path(), &[]).unwrap();
            let server_tls = tls::server_config(
                &paths.server_cert(),
                &paths.server_key(),
                &[ALPN_CLIENT],
                None,
            )
            .unwrap();
            let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let server = transport::server_endpoint(loopback, server_tls, Link::Client).unwrap();
            let client_tls = tls::client_config(
                tls::load_roots(&paths.ca_cert()).unwrap(),
                &[ALPN_CLIENT],
                None,
            )
            .unwrap();
            let client = transport::client_endpoint(
                loopback,
                transport::client_config(client_tls, Link::Client).unwrap(),
            )
            .unwrap();
            let addr = server.local_addr().unwrap();
            let (streams_tx, streams) = mpsc::unbounded_channel();
            let release = Arc::new(Semaphore::new(0));
            let accepting = server.clone();
            let permits = release.clone();
            tokio::spawn(async move {
                let conn = accepting.accept().await.unwrap().await.unwrap();
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(answer_stream(
                        send,
                        recv,
                        answer,
                        streams_tx.clone(),
                        permits.clone(),
                    ));
                }
            });
            let conn = client
                .connect(addr, &transport::server_name(&addr))
                .unwrap()
                .await
                .unwrap();
            let server = ScriptedServer {
                streams,
                release,
                _endpoints: (server, client),
                _certs: certs,
            };
            (server, SendQueue::new(conn, per_stream))
        }

        /// [`ScriptedServer::start`], then send 1, alone on its stream and left unanswered.
        async fn with_one_in_flight(
            per_stream: u32,
            answer: Answer,
        ) -> (Self, Arc<SendQueue>, Vec<SendHandle>) {
            let (mut server, queue) = Self::start(per_stream, answer).await;
            let first = start_sends(&queue, [1]).await;
            assert_eq!(server.next_stream().await, vec![1]);
            (server, queue, first)
        }

        /// The ids of the next stream the server has read.
        async fn next_stream(&mut self) -> Vec<u64> {
            tokio::time::timeout(Duration::from_secs(10), self.streams.recv())
                .await
                .expect("a stream within 10 s")
                .expect("server running")
        }

        /// Sends `id` with nothing else in flight: it must go out at once on a stream of its
        /// own.
        async fn next_send_goes_alone(&mut self, queue: &Arc<SendQueue>, id: u64) {
            let next = start_sends(queue, [id]).await;
            assert_eq!(self.next_stream().await, vec![id]);
            self.answer(1);
            for handle in next {
                assert_eq!(acked(handle).await, (id, Carried::Alone));
            }
        }

        /// Lets `n` more streams be answered.
        fn answer(&self, n: usize) {
            self.release.add_permits(n);
        }
    }

    async fn answer_stream(
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        answer: Answer,
        streams: mpsc::UnboundedSender<Vec<u64>>,
        release: Arc<Semaphore>,
    ) {
        let mut ids = Vec::new();
        while let Some(request) = read_frame::<ClientRequest, _>(&mut recv, 4096)
            .await
            .unwrap()
        {
            match request.kind {
                Some(client_request::Kind::Send(m)) => ids.push(m.client_msg_id),
                other => panic!("not a send: {other:?}"),
            }
        }
        let _ = streams.send(ids.clone());
        release.acquire().await.unwrap().forget();
        for (i, id) in ids.into_iter().enumerate() {
            if i == 1 && matches!(answer, Answer::FirstThenEnd) {
                break;
            }
            let ack = SendAck {
                client_msg_id: id,
                msg_id: 1000 + id,
                ..SendAck::default()
            };
            write_frame(&mut send, &ack, 4096).await.unwrap();
        }
        send.finish().unwrap();
        let _ = send.stopped().await;
    }

    /// A send started by [`start_sends`].
    type SendHandle = tokio::task::JoinHandle<Result<(SendAck, Carried), ClientError>>;

    fn frame(client_msg_id: u64) -> Bytes {
        let request = ClientRequest {
            kind: Some(client_request::Kind::Send(ChatMessage {
                client_msg_id,
                body: format!("message {client_msg_id}"),
                ..ChatMessage::default()
            })),
        };
        cim_proto::encode_frame(&request, 4096).unwrap()
    }

    /// Starts sends `ids` as tasks of their own (in that order) and lets them queue.
    async fn start_sends(
        queue: &Arc<SendQueue>,
        ids: impl IntoIterator<Item = u64>,
    ) -> Vec<SendHandle> {
        let handles = ids
            .into_iter()
            .map(|id| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.send(id, frame(id)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        handles
    }

    async fn acked(handle: SendHandle) -> (u64, Carried) {
        let (ack, carried) = handle.await.unwrap().unwrap();
        assert_eq!(ack.msg_id, 1000 + ack.client_msg_id);
        (ack.client_msg_id, carried)
    }

    #[tokio::test]
    async fn sends_queued_behind_one_in_flight_share_a_stream_and_get_their_own_acks() {
        let (mut server, queue, first) = ScriptedServer::with_one_in_flight(32, Answer::All).await;
        let queued = start_sends(&queue, 2..=6).await;
        assert_eq!(server.next_stream().await, vec![2, 3, 4, 5, 6]);
        server.answer(2);
        for handle in first {
            assert_eq!(acked(handle).await, (1, Carried::Alone));
        }
        for (handle, id) in queued.into_iter().zip(2..) {
            assert_eq!(acked(handle).await, (id, Carried::Shared));
        }
        server.next_send_goes_alone(&queue, 7).await;
    }

    #[tokio::test]
    async fn a_queue_longer_than_a_stream_takes_so_many_streams() {
        let (mut server, queue, first) = ScriptedServer::with_one_in_flight(2, Answer::All).await;
        let queued = start_sends(&queue, 2..=6).await;
        let mut streams = vec![
            server.next_stream().await,
            server.next_stream().await,
            server.next_stream().await,
        ];
        streams.sort();
        assert_eq!(streams, vec![vec![2, 3], vec![4, 5], vec![6]]);
        server.answer(4);
        for handle in first.into_iter().chain(queued) {
            acked(handle).await;
        }
    }

    #[tokio::test]
    async fn a_send_given_up_while_queued_is_not_sent() {
        let (mut server, queue, first) = ScriptedServer::with_one_in_flight(32, Answer::All).await;
        // Queued behind the first, then given up before its stream opens.
        let mut gave_up = Box::pin(queue.send(2, frame(2)));
        let polled = std::future::poll_fn(|cx| Poll::Ready(gave_up.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the send was queued, not answered");
        drop(gave_up);
        let queued = start_sends(&queue, [3]).await;
        assert_eq!(server.next_stream().await, vec![3]);
        server.answer(2);
        for handle in first.into_iter().chain(queued) {
            acked(handle).await;
        }
        // The send given up is no longer counted in flight.
        server.next_send_goes_alone(&queue, 4).await;
    }

    #[tokio::test]
    async fn a_failed_stream_fails_only_its_unanswered_sends() {
        let (mut server, queue, first) =
            ScriptedServer::with_one_in_flight(32, Answer::FirstThenEnd).await;
        let queued = start_sends(&queue, 2..=4).await;
        assert_eq!(server.next_stream().await, vec![2, 3, 4]);
        server.answer(2);
        for handle in first {
            assert_eq!(acked(handle).await, (1, Carried::Alone));
        }
        let mut results = Vec::new();
        for handle in queued {
            results.push(handle.await.unwrap());
        }
        let (ack, carried) = results.remove(0).unwrap();
        assert_eq!((ack.client_msg_id, carried), (2, Carried::Shared));
        // Failed, not lost: `send_with_id` tries any failed attempt again with the same
        // client message id.
        for result in results {
            assert!(result.is_err(), "{result:?}");
        }
    }
}
