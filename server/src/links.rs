//! Router links on the server side: accepts routers' mutual-TLS connections, answers their
//! pushes and kicks, and sends session events and client messages to a router over the same
//! connections (round robin, failing over to the next router).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cim_core::batch::{BATCHES_IN_FLIGHT, Batcher, answer_all};
use cim_core::fnv::fnv1a;
use cim_core::transport::read_only_frame;
use cim_proto::v1::{
    FetchInbox, Forward, ForwardBatch, ForwardBatchResult, GroupChangePush, GroupCommand,
    GroupRequest, GroupResult, KickResult, NoticePush, PresencePush, Pull, PullResult,
    PushBatchResult, PushResult, Recipient, RenewResult, RenewSessions, RouterRequest, SendAck,
    ServerControl, ServerRequest, SessionBatchResult, SessionClosed, SessionClosedBatch,
    SessionOpened, SessionOpenedBatch, SessionRef, SessionResult, TrimInbox, chat_message,
    router_request, server_control, server_request,
};
use cim_proto::{ProstMessage, write_frame};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::session::State;

/// Largest frame on router links (a push carries its recipient list).
pub const MAX_INTERNAL_FRAME: usize = 4 * 1024 * 1024;
/// Sessions per renewal request.
const RENEW_CHUNK: usize = 2000;
/// Time a router has to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request to a router failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// No router is connected to this server.
    #[error("no router connected")]
    NoRouter,
    /// Every connected router failed to answer.
    #[error("router request failed: {0}")]
    Failed(String),
}

/// Requests (and where each one's answer goes) queued before callers wait, per kind.
const BATCH_QUEUE: usize = 4096;
/// Most requests in one batch.
const MAX_BATCH: usize = 256;
/// Most encoded bytes of requests in one batch: half the frame limit, so that 256 sends near
/// the 16 KiB body limit (over 4 MiB) are never refused whole as too large.
const MAX_BATCH_BYTES: usize = MAX_INTERNAL_FRAME / 2;

/// Whether a failed request may be sent again to the next router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failover {
    /// Always: the request does the same once or twice (session reports, reads, renewals,
    /// sends that carry a client message id, which routers store once).
    Always,
    /// Only when it surely never reached the router (no stream could be opened): a send with
    /// client message id 0 has no dedup, and a router that timed out or dropped its link
    /// after reading it may have stored it. Its sender is told to send again (`retry`) and
    /// decides, as after any unconfirmed send.
    OnlyUnsent,
}

impl Failover {
    /// How a request carrying `forwards` may fail over.
    fn of_forwards<'a>(mut forwards: impl Iterator<Item = &'a Forward>) -> Self {
        let once_only = forwards.any(|f| f.message.as_ref().is_none_or(|m| m.client_msg_id == 0));
        if once_only {
            Self::OnlyUnsent
        } else {
            Self::Always
        }
    }
}

/// A request waiting to leave in a batch, with where its answer goes.
type Pending<Q, R> = (Q, oneshot::Sender<Result<R, LinkError>>);

/// Requests of one kind that leave for a router in batches ([`send_batches`]).
struct BatchQueue<Q, R> {
    queue: mpsc::Sender<Pending<Q, R>>,
    /// Taken by the task that sends the batches.
    queued: Mutex<Option<mpsc::Receiver<Pending<Q, R>>>>,
}

impl<Q, R> Default for BatchQueue<Q, R> {
    fn default() -> Self {
        let (queue, queued) = mpsc::channel(BATCH_QUEUE);
        Self {
            queue,
            queued: Mutex::new(Some(queued)),
        }
    }
}

impl<Q, R> BatchQueue<Q, R> {
    /// Queues `request` for the next batch and waits for its answer.
    async fn call(&self, request: Q) -> Result<R, LinkError> {
        let stopped = || LinkError::Failed("batch sender stopped".into());
        let (reply_tx, reply_rx) = oneshot::channel();
        self.queue
            .send((request, reply_tx))
            .await
            .map_err(|_| stopped())?;
        reply_rx.await.map_err(|_| stopped())?
    }

    fn take_queued(&self) -> Option<mpsc::Receiver<Pending<Q, R>>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The routers currently connected to this server.
#[derive(Default)]
pub struct RouterLinks {
    conns: Mutex<Vec<quinn::Connection>>,
    next: AtomicUsize,
    forwards: BatchQueue<Forward, SendAck>,
    opened: BatchQueue<SessionOpened, SessionResult>,
    closed: BatchQueue<SessionClosed, SessionResult>,
    /// Renewal chunks on their way to a router; close reports wait for them.
    renewing: cim_core::pending::Pending,
}

/// What [`RouterLinks::renew`] found.
#[derive(Debug, Default)]
pub struct Renewed {
    /// Sessions whose route now belongs to another login, as `(user, session)`.
    pub lost: Vec<(u64, u64)>,
    /// Sessions whose inbox gave out entries past what was told to them, as `(user, session,
    /// last seq given out)`: the router pushed those to no one, or its pushes were lost.
    pub behind: Vec<(u64, u64, u64)>,
}

/// A renewal chunk on its way (see [`RouterLinks::renew`]); dropped once answered.
struct RenewalInFlight<'a>(&'a RouterLinks);

impl<'a> RenewalInFlight<'a> {
    /// Counts a chunk on its way until the returned guard is dropped.
    fn start(links: &'a RouterLinks) -> Self {
        links.renewing.add();
        Self(links)
    }
}

impl Drop for RenewalInFlight<'_> {
    fn drop(&mut self) {
        self.0.renewing.done();
    }
}

impl RouterLinks {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<quinn::Connection>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of connected routers.
    pub fn len(&self) -> usize {
        self.conns().len()
    }

    /// Whether no router is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a router link, keeping the list ordered by address (group affinity indexes it).
    fn add(&self, conn: quinn::Connection) {
        let mut conns = self.conns();
        conns.push(conn);
        conns.sort_by_key(|c| c.remote_address());
    }

    fn remove(&self, conn: &quinn::Connection) {
        self.conns().retain(|c| c.stable_id() != conn.stable_id());
    }

    /// Sends one request and reads one reply, trying each connected router in turn.
    async fn call<R: ProstMessage + Default>(
        &self,
        request: &ServerRequest,
    ) -> Result<R, LinkError> {
        self.call_from(request, None, Failover::Always).await
    }

    /// Every router link, starting at the one chosen by `affinity` (a stable hash) or else
    /// the next in rotation.
    fn candidates(&self, affinity: Option<u64>) -> Vec<quinn::Connection> {
        let conns = self.conns();
        if conns.is_empty() {
            return Vec::new();
        }
        let start = match affinity {
            Some(hash) => hash as usize,
            None => self.next.fetch_add(1, Ordering::Relaxed),
        };
        (0..conns.len())
            .map(|i| conns[start.wrapping_add(i) % conns.len()].clone())
            .collect()
    }

    /// [`RouterLinks::call`] starting at the router chosen by `affinity` (a stable hash), so
    /// related requests go through the same router while the router set is stable, and
    /// trying the next router after a failure only as `failover` allows.
    async fn call_from<R: ProstMessage + Default>(
        &self,
        request: &ServerRequest,
        affinity: Option<u64>,
        failover: Failover,
    ) -> Result<R, LinkError> {
        let candidates = self.candidates(affinity);
        if candidates.is_empty() {
            return Err(LinkError::NoRouter);
        }
        let mut last_error = String::new();
        for conn in candidates {
            // Only a stream that could not be opened says the router never saw the request.
            let maybe_seen =
                match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&conn, request)).await {
                    Ok(Ok(reply)) => return Ok(reply),
                    Ok(Err(e)) => {
                        last_error = e.to_string();
                        !matches!(e, cim_core::transport::ExchangeError::Connection(_))
                    }
                    Err(_) => {
                        last_error = "timed out".into();
                        true
                    }
                };
            tracing::debug!(router = %conn.remote_address(), error = %last_error, "router request failed");
            if maybe_seen && failover == Failover::OnlyUnsent {
                last_error = format!("{last_error} (the router may have acted on it)");
                break;
            }
        }
        Err(LinkError::Failed(last_error))
    }

    /// Reports a newly opened session; the router confirms its route. Reports made while
    /// earlier ones are in flight (a login storm) leave together.
    pub async fn session_opened(
        &self,
        user_id: u64,
        session_id: u64,
        server_id: &str,
    ) -> Result<SessionResult, LinkError> {
        self.opened
            .call(SessionOpened {
                user_id,
                session_id,
                server_id: server_id.to_string(),
            })
            .await
    }

    /// Reports a closed session; the router removes its route. Reports made while earlier
    /// ones are in flight (a logout storm, a drain) leave together. A report waits for the
    /// renewal chunks on their way (at most [`REQUEST_TIMEOUT`]): a chunk that listed the
    /// session before it closed, answered after this report on another router (or on
    /// another stream of the same one), would put the released route back for a lease.
    pub async fn session_closed(
        &self,
        user_id: u64,
        session_id: u64,
        server_id: &str,
    ) -> Result<SessionResult, LinkError> {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, self.renewing.none()).await;
        self.closed
            .call(SessionClosed {
                user_id,
                session_id,
                server_id: server_id.to_string(),
            })
            .await
    }

    /// Renews the routes of `sessions` through any router (or through `via`), a chunk at a
    /// time, leaving out the sessions no longer `open` when their chunk goes: the router puts
    /// an absent route back, so renewing a session whose close was reported meanwhile would
    /// show its user online, on a route to nothing, for a lease. Each session goes with the
    /// highest seq told to it (`(user, session, told_up_to)`).
    pub async fn renew(
        &self,
        sessions: &[(u64, u64, u64)],
        via: Option<&quinn::Connection>,
        open: impl Fn(u64, u64) -> bool,
    ) -> Result<Renewed, LinkError> {
        let mut renewed = Renewed::default();
        for chunk in sessions.chunks(RENEW_CHUNK) {
            // Counted before the sessions are checked: a close after the check waits for it.
            let _in_flight = RenewalInFlight::start(self);
            let chunk: Vec<(u64, u64, u64)> = chunk
                .iter()
                .copied()
                .filter(|&(user, session, _)| open(user, session))
                .collect();
            if chunk.is_empty() {
                continue;
            }
            let request = ServerRequest {
                kind: Some(server_request::Kind::Renew(RenewSessions {
                    sessions: chunk
                        .iter()
                        .map(|&(user_id, session_id, told_up_to)| SessionRef {
                            user_id,
                            session_id,
                            told_up_to,
                        })
                        .collect(),
                })),
            };
            let reply: RenewResult = match via {
                Some(conn) => tokio::time::timeout(REQUEST_TIMEOUT, exchange(conn, &request))
                    .await
                    .map_err(|_| LinkError::Failed("timed out".into()))?
                    .map_err(|e| LinkError::Failed(e.to_string()))?,
                None => self.call(&request).await?,
            };
            let lost: HashSet<u64> = reply.lost_users.into_iter().collect();
            let behind: HashMap<u64, u64> = reply
                .behind
                .into_iter()
                .map(|head| (head.user_id, head.last_seq))
                .collect();
            for &(user, session, _) in &chunk {
                if lost.contains(&user) {
                    renewed.lost.push((user, session));
                } else if let Some(&head) = behind.get(&user) {
                    renewed.behind.push((user, session, head));
                }
            }
        }
        Ok(renewed)
    }

    /// Reads a page of `user`'s inbox for a client's pull (see [`Pull`] for `trim_up_to`).
    pub async fn fetch(
        &self,
        user_id: u64,
        pull: &Pull,
        limit: u32,
    ) -> Result<PullResult, LinkError> {
        let request = ServerRequest {
            kind: Some(server_request::Kind::Fetch(FetchInbox {
                user_id,
                after_seq: pull.after_seq,
                limit,
                trim_up_to: pull.trim_up_to,
            })),
        };
        self.call(&request).await
    }

    /// Reports what clients acknowledged, so routers can trim inboxes. A router that could not
    /// trim (its store failed) answers with a code: that is a failure, so the caller keeps
    /// the acks for the next report (taken as done, they were lost, and the user's next
    /// client got those messages again).
    pub async fn trim(&self, acked: &[(u64, u64)]) -> Result<(), LinkError> {
        let request = ServerRequest {
            kind: Some(server_request::Kind::Trim(TrimInbox {
                acked: acked
                    .iter()
                    .map(|&(user_id, seq)| Recipient { user_id, seq })
                    .collect(),
            })),
        };
        let result: SessionResult = self.call(&request).await?;
        if result.code.is_empty() {
            Ok(())
        } else {
            Err(LinkError::Failed(format!(
                "trim refused: {} ({})",
                result.code, result.message
            )))
        }
    }

    /// Hands a client's message to a router; the reply is the sender's ack. A named group's
    /// messages all go through the same router, which orders them; a broadcast (`all`) goes
    /// on its own, since storing it for everyone online takes long enough to hold up the
    /// acks of a whole batch; private messages are batched while the server is busy.
    ///
    /// A private send with a client message id that a router refused as `unavailable` (it
    /// stored nothing: no store, no message-id node) is offered to the other routers in
    /// turn. Group sends are not: a group's messages are ordered by meeting at one router, and
    /// a router whose store only blips refuses some and stores others.
    pub async fn forward(&self, forward: Forward) -> Result<SendAck, LinkError> {
        let (affinity, private) = match forward.message.as_ref().and_then(|m| m.target.as_ref()) {
            Some(chat_message::Target::Group(g)) if g == cim_proto::BROADCAST_GROUP => {
                (None, false)
            }
            Some(chat_message::Target::Group(g)) => (Some(fnv1a(g.as_bytes())), false),
            _ => (None, true),
        };
        let resendable = private
            && forward
                .message
                .as_ref()
                .is_some_and(|m| m.client_msg_id != 0)
            && self.len() > 1;
        let again = resendable.then(|| forward.clone());
        let ack = if private {
            self.forwards.call(forward).await?
        } else {
            let failover = Failover::of_forwards(std::iter::once(&forward));
            let request = ServerRequest {
                kind: Some(server_request::Kind::Forward(forward)),
            };
            self.call_from(&request, affinity, failover).await?
        };
        match again {
            Some(forward) if ack.code == cim_proto::SEND_UNAVAILABLE => {
                Ok(self.forward_past_unavailable(forward).await.unwrap_or(ack))
            }
            _ => Ok(ack),
        }
    }

    /// Offers a send with a client message id to each router in turn until one answers other
    /// than `unavailable`. `None` if every one refused it; a `retry` answer if one may have
    /// stored it (it read the send and gave no answer).
    async fn forward_past_unavailable(&self, forward: Forward) -> Option<SendAck> {
        let client_msg_id = forward.message.as_ref().map_or(0, |m| m.client_msg_id);
        let request = ServerRequest {
            kind: Some(server_request::Kind::Forward(forward)),
        };
        let mut unknown = false;
        for conn in self.candidates(None) {
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange::<SendAck>(&conn, &request)).await
            {
                Ok(Ok(ack)) if ack.code != cim_proto::SEND_UNAVAILABLE => return Some(ack),
                Ok(Ok(_)) => {}
                // The id makes trying the next router safe, but this one may have stored it.
                Ok(Err(_)) | Err(_) => unknown = true,
            }
        }
        unknown.then(|| SendAck {
            client_msg_id,
            code: cim_proto::SEND_RETRY.into(),
            message: "no router took the send; send again with the same client_msg_id".into(),
            ..Default::default()
        })
    }

    /// Runs a client's group request at a router.
    pub async fn group(
        &self,
        user_id: u64,
        request: GroupRequest,
    ) -> Result<GroupResult, LinkError> {
        let request = ServerRequest {
            kind: Some(server_request::Kind::Group(GroupCommand {
                user_id,
                request: Some(request),
            })),
        };
        self.call(&request).await
    }
}

async fn exchange<R: ProstMessage + Default>(
    conn: &quinn::Connection,
    request: &ServerRequest,
) -> Result<R, cim_core::transport::ExchangeError> {
    cim_core::transport::exchange(conn, request, MAX_INTERNAL_FRAME).await
}

/// Router handshakes under way at once; past it new ones are refused (routers are few, and
/// dial again).
const MAX_ROUTER_HANDSHAKES: usize = 64;
/// Time a router has to finish its handshake. Without it, a peer that reaches the internal
/// port and never finishes one (it needs no certificate to start) kept each attempt for as
/// long as it sent a packet every few seconds.
const ROUTER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts router connections until shutdown. Mutual TLS refuses peers without a certificate
/// from the cluster CA; [`MAX_ROUTER_HANDSHAKES`] and [`ROUTER_HANDSHAKE_TIMEOUT`] bound what
/// the others hold meanwhile.
pub(crate) async fn accept_routers(
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_ROUTER_HANDSHAKES));
    let mut refused: u64 = 0;
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        // A place only for a peer that proved it receives packets at its address (a QUIC
        // Retry, one round trip, no state kept): spoofed first packets cannot fill them.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            // Logged at the 1st, 2nd, 4th, 8th... refusal.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(peer = %incoming.remote_address(), refused, "too many router handshakes under way; refused");
            }
            incoming.refuse();
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let conn = match tokio::time::timeout(ROUTER_HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "router handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "router handshake timed out");
                    return;
                }
            };
            drop(handshake);
            tracing::info!(%peer, "router connected");
            state.links.add(conn.clone());
            // A new router link may follow a moment out of discovery (routes removed) or a
            // store restart: re-announce every session at once.
            let renewing = state.clone();
            let via = conn.clone();
            tokio::spawn(async move { renew_sessions(&renewing, Some(&via)).await });
            serve_router(&conn, &state).await;
            state.links.remove(&conn);
            tracing::info!(%peer, reason = ?conn.close_reason(), "router disconnected");
        });
    }
}

/// Starts the tasks that send the batched requests: client messages and session reports.
pub(crate) fn run_batches(state: &Arc<State>) {
    tokio::spawn(send_batches(
        state.clone(),
        |links| &links.forwards,
        |forwards| Failover::of_forwards(forwards.iter()),
        |forwards| server_request::Kind::Forwards(ForwardBatch { forwards }),
        |result: ForwardBatchResult| result.acks,
    ));
    tokio::spawn(send_batches(
        state.clone(),
        |links| &links.opened,
        |_| Failover::Always,
        |sessions| server_request::Kind::SessionsOpened(SessionOpenedBatch { sessions }),
        |result: SessionBatchResult| result.results,
    ));
    tokio::spawn(send_batches(
        state.clone(),
        |links| &links.closed,
        |_| Failover::Always,
        |sessions| server_request::Kind::SessionsClosed(SessionClosedBatch { sessions }),
        |result: SessionBatchResult| result.results,
    ));
}

/// Sends the requests queued in one [`BatchQueue`] in batches: each batch takes everything
/// queued (up to [`MAX_BATCH`]); up to [`BATCHES_IN_FLIGHT`] batches travel at once, shared by
/// all the router links (each batch goes to the routers in turn, as far as `failover` says a
/// batch may go on). `request` makes a batch's request, `answers` takes the answers, one per
/// request in order, out of its reply.
async fn send_batches<Q, R, B>(
    state: Arc<State>,
    queue: fn(&RouterLinks) -> &BatchQueue<Q, R>,
    failover: fn(&[Q]) -> Failover,
    request: fn(Vec<Q>) -> server_request::Kind,
    answers: fn(B) -> Vec<R>,
) where
    Q: ProstMessage + Send + 'static,
    R: Send + 'static,
    B: ProstMessage + Default + 'static,
{
    let Some(queued) = queue(&state.links).take_queued() else {
        return;
    };
    let mut batches = Batcher::new(queued, BATCHES_IN_FLIGHT, MAX_BATCH).weighed(
        |(request, _): &Pending<Q, R>| request.encoded_len(),
        MAX_BATCH_BYTES,
    );
    // Keeps running through a drain: clients still connected may send until they leave.
    while let Some((batch, permit)) = batches.next().await {
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (requests, replies): (Vec<Q>, Vec<_>) = batch.into_iter().unzip();
            let failover = failover(&requests);
            let request = ServerRequest {
                kind: Some(request(requests)),
            };
            let results = state
                .links
                .call_from::<B>(&request, None, failover)
                .await
                .map(answers);
            let short = LinkError::Failed("router answered a batch partly".into());
            answer_all(replies, results, short);
        });
    }
}

/// Renews the routes of every local session; ends sessions that lost their route to a newer
/// login.
pub(crate) async fn renew_sessions(state: &State, via: Option<&quinn::Connection>) {
    let sessions = state.session_refs();
    if sessions.is_empty() {
        return;
    }
    match state
        .links
        .renew(&sessions, via, |user, session| {
            state.has_session(user, session)
        })
        .await
    {
        Ok(renewed) => {
            for (user, session) in renewed.lost {
                tracing::info!(
                    user,
                    session,
                    "route belongs to another login; ending session"
                );
                state.kick(user, session, "logged in elsewhere");
            }
            for (user, session, head) in renewed.behind {
                state.inbox_behind(user, session, head);
            }
        }
        Err(e) => tracing::warn!(error = %e, "route renewal failed"),
    }
}

/// Whether `notice` is a frame only the server itself sends its clients (its login's answer,
/// a pong, a kick, a drain, a token): a router's notice must not pass for one. Every kind is
/// named, so a new one is decided on here.
fn is_servers_own(notice: &server_control::Kind) -> bool {
    use server_control::Kind;
    match notice {
        Kind::LoginResult(_)
        | Kind::Pong(_)
        | Kind::Kick(_)
        | Kind::Drain(_)
        | Kind::TokenRenewal(_) => true,
        Kind::Presence(_)
        | Kind::GroupChange(_)
        | Kind::GroupInvite(_)
        | Kind::GroupOwner(_)
        | Kind::GroupOwnerChange(_)
        | Kind::ReadReceipt(_) => false,
    }
}

/// Passes `notice` to the local sessions of `recipients` and answers with those found.
async fn notify_and_reply(
    state: &State,
    send: &mut quinn::SendStream,
    recipients: &[u64],
    notice: &server_control::Kind,
) -> Result<(), cim_proto::FrameError> {
    let reply = PushResult {
        delivered: state.notify(recipients, notice),
        absent: Vec::new(),
    };
    write_frame(send, &reply, MAX_INTERNAL_FRAME).await
}

async fn serve_router(conn: &quinn::Connection, state: &Arc<State>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let state = state.clone();
        tokio::spawn(async move {
            let request: RouterRequest = match read_only_frame(&mut recv, MAX_INTERNAL_FRAME).await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "bad router request");
                    let _ = send.reset(cim_core::close::code(cim_core::close::PROTOCOL));
                    return;
                }
            };
            let written = match request.kind {
                Some(router_request::Kind::Push(push)) => {
                    let Some(delivery) = push.delivery else {
                        let _ = send.reset(cim_core::close::code(cim_core::close::PROTOCOL));
                        return;
                    };
                    let (delivered, absent) = state.deliver(&push.recipients, delivery);
                    let reply = PushResult { delivered, absent };
                    write_frame(&mut send, &reply, MAX_INTERNAL_FRAME).await
                }
                Some(router_request::Kind::Batch(batch)) => {
                    let results = batch
                        .pushes
                        .into_iter()
                        .map(|push| match push.delivery {
                            Some(delivery) => {
                                let (delivered, absent) = state.deliver(&push.recipients, delivery);
                                PushResult { delivered, absent }
                            }
                            None => PushResult::default(),
                        })
                        .collect();
                    write_frame(&mut send, &PushBatchResult { results }, MAX_INTERNAL_FRAME).await
                }
                Some(router_request::Kind::Presence(PresencePush {
                    recipients,
                    presence: Some(presence),
                })) => {
                    let notice = server_control::Kind::Presence(presence);
                    notify_and_reply(&state, &mut send, &recipients, &notice).await
                }
                Some(router_request::Kind::GroupChange(GroupChangePush {
                    recipients,
                    change: Some(change),
                })) => {
                    let notice = server_control::Kind::GroupChange(change);
                    notify_and_reply(&state, &mut send, &recipients, &notice).await
                }
                // Any notice but the server's own frames, which only it may send.
                Some(router_request::Kind::Notice(NoticePush {
                    recipients,
                    notice: Some(ServerControl { kind: Some(notice) }),
                })) if !is_servers_own(&notice) => {
                    notify_and_reply(&state, &mut send, &recipients, &notice).await
                }
                Some(router_request::Kind::Kick(kick)) => {
                    let found = state.kick(kick.user_id, kick.session_id, &kick.reason);
                    write_frame(&mut send, &KickResult { found }, MAX_INTERNAL_FRAME).await
                }
                // A notice without its content or of the server's own, or a kind this server
                // does not know.
                Some(
                    router_request::Kind::Presence(_)
                    | router_request::Kind::GroupChange(_)
                    | router_request::Kind::Notice(_),
                )
                | None => {
                    let _ = send.reset(cim_core::close::code(cim_core::close::PROTOCOL));
                    return;
                }
            };
            if written.is_ok() {
                let _ = send.finish();
            }
        });
    }
}
